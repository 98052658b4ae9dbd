-- Admit one request for a project, or say how long to wait: GCRA on the Redis clock.
--
-- KEYS[1]  bucket key, e.g. op-celery:{<client_id>}:bucket: the theoretical arrival time (TAT),
--          integer microseconds on the Redis clock; expires when it no longer holds a booking.
-- KEYS[2]  pause key, e.g. op-celery:{<client_id>}:pause: present (with a TTL) while the
--          project is paused after a 429.
-- ARGV[1]  emission interval in microseconds, a positive integer: period / limit, rounded up.
-- ARGV[2]  burst tolerance in microseconds, an integer >= 0: (burst - 1) * emission interval.
-- ARGV[3]  longest reservation in microseconds, an integer >= 0 (optional, default 0): when the
--          next slot is at most this far ahead, it is booked for the caller, who sends then.
--
-- Returns one integer (an array reply would cost the caller more to parse than the script costs
-- Redis to run):
--   >= 10^12  granted now: the Redis clock at the admission, in microseconds since the epoch;
--   1..10^12  granted later: a slot was booked this many microseconds from now (a reservation;
--             never more than ARGV[3], far below 10^12 = 11.6 days);
--   < 0       refused: minus the microseconds until a request can be admitted (until the pause
--             ends, when paused). A pause is never booked through.
--
-- Nothing time-related comes from the caller: the clock is Redis TIME, so workers' clocks do not
-- matter. A request is admitted when TAT - now <= tolerance; admitting moves TAT to
-- max(TAT, now) + interval. Hence in any half-open span of one period there are at most
-- limit + burst - 1 admissions.

local interval_us = tonumber(ARGV[1])
local tolerance_us = tonumber(ARGV[2])
local max_reserve_us = tonumber(ARGV[3] or '0')

local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])

local pause_ms = redis.call('PTTL', KEYS[2])
if pause_ms > 0 then
  return -pause_ms * 1000
end

local tat_us = tonumber(redis.call('GET', KEYS[1]))
if tat_us == nil or tat_us < now_us then
  tat_us = now_us
end

local wait_us = tat_us - tolerance_us - now_us
if wait_us > max_reserve_us or (wait_us > 0 and max_reserve_us <= 0) then
  return -wait_us
end

local new_tat_us = tat_us + interval_us
redis.call('SET', KEYS[1], string.format('%.0f', new_tat_us),
           'PX', math.ceil((new_tat_us - now_us) / 1000))
if wait_us > 0 then
  return wait_us
end
return now_us
