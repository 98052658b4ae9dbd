-- Pause a project: no request is admitted until the pause ends. Extends, never shortens.
--
-- KEYS[1]  pause key, e.g. op-celery:{<client_id>}:pause.
-- KEYS[2]  bucket key, ...:bucket: the TAT of acquire.lua, moved to the pause's end so workers
--          come back one interval apart, not all at once.
-- ARGV[1]  pause length in milliseconds, a positive integer, counted from now on the Redis clock.
--
-- Sets the pause to end at max(its current end, now + ARGV[1]) and returns the milliseconds
-- left until it ends. The key holds the end in microseconds (what acquire.lua compares) and
-- expires then, so its TTL is the time left.

local pause_ms = tonumber(ARGV[1])
local remaining_ms = redis.call('PTTL', KEYS[1])
if remaining_ms < pause_ms then
  local time = redis.call('TIME')
  local end_us = tonumber(time[1]) * 1000000 + tonumber(time[2]) + pause_ms * 1000
  redis.call('SET', KEYS[1], string.format('%.0f', end_us), 'PX', pause_ms)
  local tat_us = tonumber(redis.call('GET', KEYS[2])) or 0
  if tat_us < end_us then
    redis.call('SET', KEYS[2], string.format('%.0f', end_us), 'PX', pause_ms + 1)
  end
  return pause_ms
end
return remaining_ms
