-- renew: extend the lease of the token that holds a scope.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  fencing token (16 raw bytes)
-- ARGV[2]  lease in milliseconds
--
-- Returns 1 if the token holds the scope (pending: the lease is extended; completed by
-- this token: nothing changes, the record keeps its TTL), else 0.
local h = redis.call('HMGET', KEYS[1], 'st', 'tok')
if h[2] ~= ARGV[1] then
  return 0
end
if h[1] == 'p' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
