-- KEYS[1]: the cooldown; KEYS[2..]: one TAT per budget. ARGV[1]: horizon, ARGV[2]: now ("" = Redis's
-- clock), ARGV[3]: lead, then (interval, tolerance) per budget. Returns {reserved (0/1), wait, reason}.
-- See decide() in ratelimit.py.
local now
if ARGV[2] ~= '' then now = tonumber(ARGV[2]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local start, reason = now + tonumber(ARGV[3]), ''
local cooldown = tonumber(redis.call('GET', KEYS[1]) or '0')
if cooldown > start then start, reason = cooldown, 'cooldown after HTTP 429' end
local tats = {}
for i = 2, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  local allowed = tat - tonumber(ARGV[2 * i + 1])
  if allowed > start then start, reason = allowed, 'rate limit' end
end
local wait = start - now
if wait > tonumber(ARGV[1]) then return {0, string.format('%.6f', wait), reason, string.format('%.6f', start)} end
for i = 2, #KEYS do
  local tat = tats[i]
  if start > tat then tat = start end
  tat = tat + tonumber(ARGV[2 * i])
  redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 60000)
end
return {1, string.format('%.6f', wait), reason, string.format('%.6f', start)}
