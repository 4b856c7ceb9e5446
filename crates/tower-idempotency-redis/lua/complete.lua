-- complete: replace the token's pending lease with the completed record.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
-- ARGV[2]  the record blob (opaque bytes)
-- ARGV[3]  TTL of the record in milliseconds
--
-- Returns 1 (stored, or already stored by this token: a retry after a lost reply) or
-- 0 (fenced: the token no longer holds the scope, nothing written). A kept lease that
-- lapsed (field `le`, see reserve.lua) is still this token's: nobody else took it, and
-- its record is what really happened. The TTL is kept in field `ttl`, so an operator can
-- tell the record's age.
--
-- Publishes on the scope's channel only if a reserve answered "in flight" for this lease
-- (field `w`): nobody else listens. Publishing is best effort (redis.pcall, its error
-- ignored): the record is already written, and a refused SPUBLISH (e.g. an ACL user
-- without channel permissions) must not turn that into an error; waiters then poll.
--
-- The channel is not an argument: it is `{prefix}done:{<scope hex>}`
-- (`RedisStore::channel`), and KEYS[1] is `{prefix}{<scope hex>}`, whose last 66 bytes
-- are the hash tag, so the script builds it when it publishes. Sent on every complete,
-- it cost the client about 1.1 k instructions per new key (callgrind: the name built,
-- then encoded as one more argument) for a publish that few completes make.
local h = redis.call('HMGET', KEYS[1], 'st', 'tok', 'w', 'le')
if h[2] ~= ARGV[1] then
  return 0
end
if h[1] == 'p' then
  if h[4] then
    redis.call('HDEL', KEYS[1], 'le')
  end
  redis.call('HSET', KEYS[1], 'st', 'c', 'rec', ARGV[2], 'ttl', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  if h[3] then
    redis.pcall('SPUBLISH', string.sub(KEYS[1], 1, -67) .. 'done:' .. string.sub(KEYS[1], -66), 'c')
  end
end
return 1
