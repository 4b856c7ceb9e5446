-- release: delete the token's pending lease (fingerprint included) and wake waiters.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
-- ARGV[2]  the scope's wake-up channel (same hash tag as KEYS[1])
--
-- Returns 1 if the token held a pending lease, else 0 (nothing changed).
--
-- Publishes on ARGV[2] only if a reserve answered "in flight" for this lease (field
-- `w`), and best effort (redis.pcall, its error ignored): the lease is already deleted,
-- and a refused SPUBLISH (e.g. an ACL user without channel permissions) must not turn
-- that into an error; waiters then poll.
local h = redis.call('HMGET', KEYS[1], 'st', 'tok', 'w')
if h[1] == 'p' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if h[3] then
    redis.pcall('SPUBLISH', ARGV[2], 'r')
  end
  return 1
end
return 0
