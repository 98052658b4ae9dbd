-- Pause a project: no request is admitted until the pause ends. Extends, never shortens.
--
-- KEYS[1]  pause key, e.g. op-celery:{<client_id>}:pause.
-- ARGV[1]  pause length in milliseconds, a positive integer, counted from now on the Redis clock.
--
-- Sets the pause to end at max(its current end, now + ARGV[1]) and returns the milliseconds
-- left until it ends. The end is the key's TTL, so it is kept by the Redis clock alone.

local pause_ms = tonumber(ARGV[1])
local remaining_ms = redis.call('PTTL', KEYS[1])
if remaining_ms < pause_ms then
  redis.call('SET', KEYS[1], '1', 'PX', pause_ms)
  return pause_ms
end
return remaining_ms
