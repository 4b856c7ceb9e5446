-- inspect: what the store holds for a scope, for an operator.
--
-- KEYS[1]  the scope's hash
--
-- Returns {} when absent, else {st, tok, rec, pttl, le, now, ttl}: the state ('p' or
-- 'c'), the owner's token, the record blob ('' while pending), the key's remaining TTL
-- in ms, the end of a kept lease and the Redis clock in ms ('' when the lease is not
-- kept), and the TTL the record was completed with ('' if unknown).
local h = redis.call('HMGET', KEYS[1], 'st', 'tok', 'rec', 'le', 'ttl')
if not h[1] then
  return {}
end
local now = ''
if h[4] then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
return {h[1], h[2] or '', h[3] or '', redis.call('PTTL', KEYS[1]), h[4] or '', now, h[5] or ''}
