-- Store the rate a server announced in its x-ratelimit-* headers, for every worker's acquire.
-- Returns {interval_us, changed, limit, window_ms}.
--
-- KEYS[1]  learned key, e.g. op-celery:{<client_id>}:learned: hash of limit, window_ms,
--          interval_us (window / limit, slowed by the headroom), at (µs of the first learning).
-- KEYS[2]  backoff key, ...:backoff (backoff.lua): deleted, the headers supersede it.
-- ARGV[1]  x-ratelimit-limit, an integer >= 1.
-- ARGV[2]  x-ratelimit-reset in milliseconds (> 0): the time left in the server's window.
-- ARGV[3]  headroom factor, 0 < f <= 1: the learned rate is f * limit / window.
-- ARGV[4]  milliseconds the learned rate lives without a refresh.
-- ARGV[5]  the time in microseconds, for tests that drive time; 0 = Redis TIME.
--
-- The window is inferred from the resets seen: the answer that opens a window says the whole
-- window, later ones less, so the window is the largest reset seen for the same limit. A new
-- limit starts afresh. Every call renews the expiry; a shrinking window is followed only once
-- the key has expired (until then the pool runs slower than it could, never faster).

local limit = tonumber(ARGV[1])
local reset_ms = tonumber(ARGV[2])
local factor = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[4])
local now_us = tonumber(ARGV[5])
if now_us <= 0 then
  local time = redis.call('TIME')
  now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local old = redis.call('HMGET', KEYS[1], 'limit', 'window_ms', 'interval_us')
local window_ms = reset_ms
if tonumber(old[1]) == limit and (tonumber(old[2]) or 0) > window_ms then
  window_ms = tonumber(old[2])
end
local interval_us = math.ceil(window_ms * 1000 / (limit * factor))
local changed = 0
if tonumber(old[3]) ~= interval_us then changed = 1 end
if changed == 1 or tonumber(old[1]) ~= limit or tonumber(old[2]) ~= window_ms then
  redis.call('HSET', KEYS[1], 'limit', limit, 'window_ms', window_ms, 'interval_us', interval_us,
             'at', string.format('%.0f', now_us))
end
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('DEL', KEYS[2])
return {interval_us, changed, limit, window_ms}
