-- forget: delete whatever the store holds for a scope (an operator's decision), so the
-- next request with the key runs, and wake its waiters.
--
-- KEYS[1]  the scope's hash
--
-- Returns 1 if there was a record, else 0. Publishing is best effort (redis.pcall).
--
-- The scope's wake-up channel is not an argument: it is `{prefix}done:{<scope hex>}`
-- (`RedisStore::channel`), and KEYS[1] is `{prefix}{<scope hex>}`, whose last 66 bytes
-- are the hash tag, so the script builds it when it publishes.
local existed = redis.call('DEL', KEYS[1])
if existed == 1 then
  redis.pcall('SPUBLISH', string.sub(KEYS[1], 1, -67) .. 'done:' .. string.sub(KEYS[1], -66), 'r')
end
return existed
