-- reserve: take a lease on a scope, or report what holds it.
--
-- KEYS[1]  the scope's hash ({prefix}{<scope hex>})
-- ARGV[1]  request fingerprint (32 raw bytes)
-- ARGV[2]  fencing token (16 raw bytes)
-- ARGV[3]  lease in milliseconds
-- ARGV[4]  '1' if the caller keeps completed records locally (it then needs their TTL)
-- ARGV[5]  how long to keep a lapsed lease as "uncertain", in milliseconds from now
--          ('0': not kept, a lapsed lease is gone and the next request runs)
--
-- Returns 1 (reserved), 2 (in flight), 3 (fingerprint mismatch), 4 (uncertain: a kept
-- lease lapsed before it completed), or for a completed record {blob, pttl}: the
-- record's blob (never parsed here) and, if asked for, its remaining TTL in milliseconds,
-- so a client may keep it locally no longer than Redis does ({blob} otherwise).
-- One round trip for every answer: a replay (the common retry) needs no second call.
--
-- A pending record lives as long as its lease (PEXPIRE), unless its reserve keeps lapsed
-- leases: then it lives `ARGV[5]`, and field `le` holds the end of the lease (Redis
-- clock, ms). A reserve that does not keep lapsed leases takes such a record over.
--
-- Answering "in flight" marks the pending record (field `w` = 1): someone may now wait
-- for it, so its complete or release publishes on the scope's channel. Without the mark
-- they publish nothing, and a request nobody waits for costs Redis no pub/sub work.
--
-- The state first, alone: on a new key this answers one nil, where an `HMGET` of every
-- field the other answers need built a reply table of six (Redis 7.0 under callgrind:
-- 44.4 k instructions per new-key reserve instead of 50.7 k). A replay then reads the
-- two fields it answers with (43.8 k instead of 45.2 k); the rare answers, the four they
-- need. `HMGET`, not `HGET` (1.8 k less): the least-privilege ACL in the crate's docs
-- allows `HMGET`, and a user set up by it must keep working after an upgrade.
local st = redis.call('HMGET', KEYS[1], 'st')[1]

-- The two common answers first, before the script builds anything else: every call pays
-- for each closure, table and number it makes (and the garbage collector after it), so
-- a new key and a replay return before the functions and numbers below exist. On a new
-- key that keeps no lapsed lease, this is what `take` below does.
if not st and ARGV[5] == '0' then
  redis.call('HSET', KEYS[1], 'st', 'p', 'tok', ARGV[2], 'fp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if st == 'c' then
  local h = redis.call('HMGET', KEYS[1], 'fp', 'rec')
  if h[1] ~= ARGV[1] then
    return 3
  end
  -- A completed hash always has `rec`; an empty blob would only come from a damaged
  -- hash, and the client then reports a decode error instead of replaying nothing.
  if ARGV[4] == '1' then
    return {h[2] or '', redis.call('PTTL', KEYS[1])}
  end
  return {h[2] or ''}
end

local h = redis.call('HMGET', KEYS[1], 'fp', 'tok', 'w', 'le')
local fp, tok, w, le = h[1], h[2], h[3], h[4]
local lease = tonumber(ARGV[3])
local keep = tonumber(ARGV[5])

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A new pending record of this token.
local function take()
  if keep > lease then
    redis.call('HSET', KEYS[1], 'st', 'p', 'tok', ARGV[2], 'fp', ARGV[1], 'le', now_ms() + lease)
    redis.call('PEXPIRE', KEYS[1], keep)
  else
    redis.call('HSET', KEYS[1], 'st', 'p', 'tok', ARGV[2], 'fp', ARGV[1])
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  return 1
end

if not st then
  return take()
end
if st == 'p' and tok == ARGV[2] and fp == ARGV[1] then
  -- This token's own lease: the same reserve sent again (a client library re-sends a
  -- command after a reconnect; a reserve that timed out locally may have run). Answer
  -- "reserved" as the first run did, and count the lease from now, when the caller
  -- learns it holds it.
  if le then
    redis.call('HSET', KEYS[1], 'le', now_ms() + lease)
    if redis.call('PTTL', KEYS[1]) < lease then
      redis.call('PEXPIRE', KEYS[1], lease)
    end
  else
    redis.call('PEXPIRE', KEYS[1], lease)
  end
  return 1
end
if st == 'p' and le and tonumber(le) <= now_ms() then
  -- A kept lease that lapsed before it completed: it may or may not have happened.
  if keep == 0 then
    redis.call('DEL', KEYS[1])
    return take()
  end
  if fp ~= ARGV[1] then
    return 3
  end
  return 4
end
if fp ~= ARGV[1] then
  return 3
end
if not w then
  redis.call('HSET', KEYS[1], 'w', '1')
end
return 2
