-- KEYS: one sorted set of calls sent per budget. ARGV[1]: now ("" = Redis's clock), ARGV[2]: a unique member,
-- then each budget's cap. Returns the wait as a string ("0" when logged). See _admit_in() in ratelimit.py.
local now
if ARGV[1] ~= '' then now = tonumber(ARGV[1]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local wait = 0
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%.6f', now - 1))
  local cap = tonumber(ARGV[i + 2])
  local n = redis.call('ZCARD', KEYS[i])
  if n >= cap then
    local aged = redis.call('ZRANGE', KEYS[i], n - cap, n - cap, 'WITHSCORES')
    local w = tonumber(aged[2]) + 1 - now
    if w > wait then wait = w end
  end
end
if wait > 0 then return string.format('%.6f', wait) end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], string.format('%.6f', now), ARGV[2])
  redis.call('PEXPIRE', KEYS[i], 2000)
end
return '0'
