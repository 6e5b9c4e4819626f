-- KEYS[1]: the cooldown, KEYS[2]: the streak, KEYS[3]: when the streak last grew. ARGV: retry-after
-- ("" = none), base, cap, now ("" = Redis's clock), streak seconds, fresh ("1": a new streak). Returns the
-- cooldown's end.
local now
if ARGV[4] ~= '' then now = tonumber(ARGV[4]) else
  local t = redis.call('TIME'); now = tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local cooldown = tonumber(redis.call('GET', KEYS[1]) or '0')
local streak = tonumber(redis.call('GET', KEYS[2]) or '0')
if cooldown <= now then
  if ARGV[6] == '1' then streak = 1 else streak = streak + 1 end
  redis.call('SET', KEYS[2], streak, 'EX', tonumber(ARGV[5]))
end
local pause = tonumber(ARGV[1])
if not pause then
  local doublings = streak - 1
  if doublings > 30 then doublings = 30 end
  pause = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ doublings)
end
if pause < 0 then pause = 0 end
local untl = now + pause
if untl > cooldown then
  redis.call('SET', KEYS[1], string.format('%.6f', untl), 'PX', math.ceil(pause * 1000) + 1000)
  cooldown = untl
end
return string.format('%.6f', cooldown)
