-- After a 429: pause the project (every worker) and, unless the server's headers taught its
-- rate, lower the rate learned from 429s. Returns {pause_ms, lowered, wmax_milli}.
--
-- KEYS[1]  pause key, e.g. op-celery:{<client_id>}:pause: value = the pause's end (µs), TTL =
--          its length.
-- KEYS[2]  bucket key, ...:bucket: the TAT of acquire.lua, moved to the pause's end so workers
--          come back one interval apart, not all at once.
-- KEYS[3]  learned key, ...:learned (learn.lua): while it exists, a 429 only pauses.
-- KEYS[4]  backoff key, ...:backoff: hash of wmax (requests/s at the last lowering), t0 (its
--          time, µs), until (the last pause's end, µs), plen (its length, ms).
-- KEYS[5]  tally key, ...:tally: what acquire.lua counted while nothing paced the project.
-- ARGV[1]  the server's retry-after in milliseconds, or -1 when it gave none.
-- ARGV[2]  pause in milliseconds when the server gave no retry-after.
-- ARGV[3]  longest pause in milliseconds (a doubled pause stops there).
-- ARGV[4]  reduction beta, 0 < beta < 1 (see acquire.lua).
-- ARGV[5]  period K in microseconds (see acquire.lua).
-- ARGV[6]  milliseconds the backoff key lives after the last 429.
-- ARGV[7]  configured emission interval in microseconds; 0 = none (caps the rate at a 429).
-- ARGV[8]  the time in microseconds, for tests that drive time; 0 = Redis TIME.
-- ARGV[9]  probing gain gamma (see acquire.lua).
-- ARGV[10] margin, 0 <= m < 1: the curve levels off at (1 - m) of the rate of the 429.
--
-- The rules:
-- * A 429 during a pause (its request was admitted before the pause began) changes nothing
--   but extends the pause to a longer retry-after.
-- * Without retry-after, a 429 that comes back within twice the last pause after it ended
--   doubles the pause (the server's window has not reset yet); otherwise the pause is ARGV[2].
-- * The rate is lowered at most once per pause, to (1 - beta) of the rate in use at the 429,
--   to climb back to (1 - margin) of it
--   (without retry-after, that rate halved first when the 429 came back within twice the pause
--   after it ended and that pause had been doubled already: twice in a row too fast): the CUBIC rate of acquire.lua, or the configured rate when only it paced
--   the project. When nothing paced it, the rate of the 429 is what acquire.lua counted divided
--   by the server's window: a fixed window spent, then waited out, so the time it took plus
--   the pause, taken down to whole seconds (a retry-after is rounded up; windows are whole
--   seconds as a rule). A window of 1.5 s would be taken for 1 s, and cost a few 429s, each
--   lowering the rate, until the rate came down.

local retry_after_ms = tonumber(ARGV[1])
local default_ms = tonumber(ARGV[2])
local max_ms = tonumber(ARGV[3])
local beta = tonumber(ARGV[4])
local k_us = tonumber(ARGV[5])
local ttl_ms = tonumber(ARGV[6])
local configured_us = tonumber(ARGV[7])
local now_us = tonumber(ARGV[8])
local gamma = tonumber(ARGV[9])
local margin = tonumber(ARGV[10])
if now_us <= 0 then
  local time = redis.call('TIME')
  now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local pause_end_us = 0
local pause = redis.call('GET', KEYS[1])
if pause then
  pause_end_us = tonumber(pause) or 0
  if pause_end_us < 1e12 then
    pause_end_us = now_us + redis.call('PTTL', KEYS[1]) * 1000
  end
end

local state = redis.call('HMGET', KEYS[4], 'wmax', 't0', 'until', 'plen')
local wmax = tonumber(state[1])

local function set_pause(end_us)
  local ms = math.ceil((end_us - now_us) / 1000)
  redis.call('SET', KEYS[1], string.format('%.0f', end_us), 'PX', ms)
  local tat_us = tonumber(redis.call('GET', KEYS[2])) or 0
  if tat_us < end_us then
    redis.call('SET', KEYS[2], string.format('%.0f', end_us), 'PX', ms + 1)
  end
  return ms
end

if pause_end_us > now_us then
  local remaining_ms = math.ceil((pause_end_us - now_us) / 1000)
  if retry_after_ms > remaining_ms then
    remaining_ms = set_pause(now_us + retry_after_ms * 1000)
  end
  return {remaining_ms, 0, math.floor((wmax or 0) * 1000)}
end

local pause_ms = retry_after_ms
local last_until = tonumber(state[3])
local last_ms = tonumber(state[4]) or default_ms
local too_soon = last_until ~= nil and now_us - last_until < 2000 * last_ms
if pause_ms < 0 then
  pause_ms = default_ms
  if too_soon then pause_ms = math.min(2 * last_ms, max_ms) end
end
pause_ms = math.max(1, pause_ms)

local lowered = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  local rate
  local first = false
  if wmax then
    local x = (now_us - tonumber(state[2])) / k_us
    if x < 0 then x = 0 end
    local gain = beta
    if x > 1 then gain = gamma end
    rate = wmax * (1 + gain * (x - 1) ^ 3)
  else
    local tally = redis.call('HMGET', KEYS[5], 'n', 'ts', 'p', 'ps')
    if tally[1] or configured_us <= 0 then
      local sent = (tonumber(tally[1]) or 0) + (tonumber(tally[3]) or 0)
      local span_us = (tonumber(tally[4]) or 0) + now_us - (tonumber(tally[2]) or now_us)
      local window_s = (span_us + pause_ms * 1000) / 1000000
      if window_s >= 1 then
        -- The window ends within the pause (a retry-after is rounded up to whole seconds):
        -- for a window of whole seconds, the whole second below span + pause.
        window_s = math.max(span_us / 1000000, math.floor(window_s))
      end
      rate = math.max(1, sent) / window_s
      first = true
    else
      rate = 1000000 / configured_us  -- the configured rate was the pace
    end
  end
  if configured_us > 0 and rate > 1000000 / configured_us then
    rate = 1000000 / configured_us
  end
  if too_soon and wmax and retry_after_ms < 0 and last_ms > default_ms then
    rate = rate / 2  -- the last lowering did not stop the 429s: halve, as TCP after a timeout
  end
  if not first then
    rate = rate * (1 - margin)  -- the rate of a 429 is too fast: level off a little below it
  end
  wmax = rate
  lowered = 1
end
redis.call('DEL', KEYS[5])
local end_us = now_us + pause_ms * 1000
if lowered == 1 then
  -- The curve starts when sending resumes: a pause is no time to grow in (RFC 7661's point).
  redis.call('HSET', KEYS[4], 'wmax', tostring(wmax), 't0', string.format('%.0f', end_us))
end
redis.call('HSET', KEYS[4], 'until', string.format('%.0f', end_us), 'plen', pause_ms)
redis.call('PEXPIRE', KEYS[4], ttl_ms)
set_pause(end_us)
return {pause_ms, lowered, math.floor((wmax or 0) * 1000)}
