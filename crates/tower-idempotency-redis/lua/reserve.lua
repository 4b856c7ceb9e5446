-- reserve: take a lease on a scope, or report what holds it.
--
-- KEYS[1]  the scope's hash ({prefix}{<scope hex>})
-- ARGV[1]  request fingerprint (32 raw bytes)
-- ARGV[2]  fencing token (16 raw bytes)
-- ARGV[3]  lease in milliseconds
--
-- Returns 1 (reserved), 2 (in flight), 3 (fingerprint mismatch), or the completed
-- record's blob (a bulk string, never parsed here).
-- One read for every answer: a replay (the common retry) needs no second call.
local h = redis.call('HMGET', KEYS[1], 'st', 'fp', 'rec')
local st, fp, rec = h[1], h[2], h[3]
if not st then
  redis.call('HSET', KEYS[1], 'st', 'p', 'tok', ARGV[2], 'fp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if fp ~= ARGV[1] then
  return 3
end
if st == 'c' then
  -- A completed hash always has `rec`; an empty blob would only come from a damaged
  -- hash, and the client then reports a decode error instead of replaying nothing.
  return rec or ''
end
return 2
