-- release: delete the token's pending lease (fingerprint included) and wake waiters.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
--
-- Returns 1 if the token held a pending lease, else 0 (nothing changed).
--
-- Publishes on the scope's channel only if a reserve answered "in flight" for this lease
-- (field `w`), and best effort (redis.pcall, its error ignored): the lease is already
-- deleted, and a refused SPUBLISH (e.g. an ACL user without channel permissions) must not
-- turn that into an error; waiters then poll.
--
-- The scope's wake-up channel is not an argument: it is `{prefix}done:{<scope hex>}`
-- (`RedisStore::channel`), and KEYS[1] is `{prefix}{<scope hex>}`, whose last 66 bytes
-- are the hash tag, so the script builds it when it publishes.
local h = redis.call('HMGET', KEYS[1], 'st', 'tok', 'w')
if h[1] == 'p' and h[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if h[3] then
    redis.pcall('SPUBLISH', string.sub(KEYS[1], 1, -67) .. 'done:' .. string.sub(KEYS[1], -66), 'r')
  end
  return 1
end
return 0
