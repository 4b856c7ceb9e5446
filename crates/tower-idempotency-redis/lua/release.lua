-- release: delete the token's pending lease (fingerprint included) and wake waiters.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
-- ARGV[2]  the scope's wake-up channel (same hash tag as KEYS[1])
--
-- Returns 1 if the token held a pending lease, else 0 (nothing changed).
local h = redis.call('HMGET', KEYS[1], 'st', 'tok')
if h[1] == 'p' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SPUBLISH', ARGV[2], 'r')
  return 1
end
return 0
