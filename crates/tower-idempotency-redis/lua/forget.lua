-- forget: delete whatever the store holds for a scope (an operator's decision), so the
-- next request with the key runs, and wake its waiters.
--
-- KEYS[1]  the scope's hash
-- ARGV[1]  the scope's wake-up channel (same hash tag as KEYS[1])
--
-- Returns 1 if there was a record, else 0. Publishing is best effort (redis.pcall).
local existed = redis.call('DEL', KEYS[1])
if existed == 1 then
  redis.pcall('SPUBLISH', ARGV[1], 'r')
end
return existed
