-- renew: extend the lease of the token that holds a scope.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
-- ARGV[2]  lease in milliseconds
--
-- Returns 1 if the token holds the scope (pending: the lease is extended; completed by
-- this token: nothing changes, the record keeps its TTL), else 0. A kept lease (field
-- `le`, see reserve.lua) moves its end, and the record lives at least that long; it may
-- have lapsed already: nobody else took it, so its token still holds it.
local h = redis.call('HMGET', KEYS[1], 'st', 'tok', 'le')
if h[2] ~= ARGV[1] then
  return 0
end
if h[1] == 'p' then
  local lease = tonumber(ARGV[2])
  if h[3] then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    redis.call('HSET', KEYS[1], 'le', now + lease)
    if redis.call('PTTL', KEYS[1]) < lease then
      redis.call('PEXPIRE', KEYS[1], lease)
    end
  else
    redis.call('PEXPIRE', KEYS[1], lease)
  end
end
return 1
