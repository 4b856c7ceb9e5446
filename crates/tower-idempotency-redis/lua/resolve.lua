-- resolve: make a scope replay the operator's record, keeping the fingerprint of the
-- request that first used the key.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  the record blob (opaque bytes)
-- ARGV[2]  TTL of the record in milliseconds
--
-- Returns 1 (stored), 0 (absent: nothing to resolve) or 2 (a live lease holds the key).
-- The token is cleared, so the owner of a lapsed lease, alive after all, can no longer
-- overwrite the operator's answer (its complete is fenced). Waiters are woken (best
-- effort, redis.pcall).
--
-- The scope's wake-up channel is not an argument: it is `{prefix}done:{<scope hex>}`
-- (`RedisStore::channel`), and KEYS[1] is `{prefix}{<scope hex>}`, whose last 66 bytes
-- are the hash tag, so the script builds it when it publishes.
local h = redis.call('HMGET', KEYS[1], 'st', 'le')
if not h[1] then
  return 0
end
if h[1] == 'p' then
  if not h[2] then
    return 2
  end
  local t = redis.call('TIME')
  if tonumber(h[2]) > tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) then
    return 2
  end
  redis.call('HDEL', KEYS[1], 'le', 'w')
end
redis.call('HSET', KEYS[1], 'st', 'c', 'rec', ARGV[1], 'ttl', ARGV[2], 'tok', '')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.pcall('SPUBLISH', string.sub(KEYS[1], 1, -67) .. 'done:' .. string.sub(KEYS[1], -66), 'c')
return 1
