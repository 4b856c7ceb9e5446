-- reserve: take a lease on a scope, or report what holds it.
--
-- KEYS[1]  the scope's hash ({prefix}{<scope hex>})
-- ARGV[1]  request fingerprint (32 raw bytes)
-- ARGV[2]  fencing token (16 raw bytes)
-- ARGV[3]  lease in milliseconds
-- ARGV[4]  '1' if the caller keeps completed records locally (it then needs their TTL)
--
-- Returns 1 (reserved), 2 (in flight), 3 (fingerprint mismatch), or for a completed
-- record {blob, pttl}: the record's blob (never parsed here) and, if asked for, its
-- remaining TTL in milliseconds, so a client may keep it locally no longer than Redis
-- does ({blob} otherwise).
-- One read for every answer: a replay (the common retry) needs no second call.
--
-- Answering "in flight" marks the pending record (field `w` = 1): someone may now wait
-- for it, so its complete or release publishes on the scope's channel. Without the mark
-- they publish nothing, and a request nobody waits for costs Redis no pub/sub work.
local h = redis.call('HMGET', KEYS[1], 'st', 'fp', 'rec', 'tok', 'w')
local st, fp, rec, tok, w = h[1], h[2], h[3], h[4], h[5]
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
  if ARGV[4] == '1' then
    return {rec or '', redis.call('PTTL', KEYS[1])}
  end
  return {rec or ''}
end
if tok == ARGV[2] then
  -- This token's own lease: the same reserve sent again (a client library re-sends a
  -- command after a reconnect; a reserve that timed out locally may have run). Answer
  -- "reserved" as the first run did, and count the lease from now, when the caller
  -- learns it holds it.
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if not w then
  redis.call('HSET', KEYS[1], 'w', '1')
end
return 2
