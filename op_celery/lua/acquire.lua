-- Admit one request for a project, or say how long to wait: GCRA on the Redis clock, at the
-- slowest of the configured rate and the rate learned from the server.
--
-- KEYS[1]  bucket key, e.g. op-celery:{<client_id>}:bucket: the theoretical arrival time (TAT),
--          integer microseconds on the Redis clock; expires when it no longer holds a booking.
-- KEYS[2]  pause key, ...:pause: present while the project is paused after a 429; its value is
--          the pause's end in microseconds (a bare "1" from an older version: its TTL is the end).
-- KEYS[3]  learned key, ...:learned: a hash written by learn.lua from the x-ratelimit-* headers;
--          field interval_us is the learned emission interval (headroom included).
-- KEYS[4]  backoff key, ...:backoff: a hash written by backoff.lua after 429s without headers;
--          fields wmax (requests/s at the last 429) and t0 (its time, microseconds).
-- KEYS[5]  tally key, ...:tally: a hash counting admissions while nothing paces the project
--          (fields n, ts: this second's count and start; p, ps: the one before), for backoff.lua.
-- KEYS[6]  line key, ...:line: the waiting line of refused callers that joined it (ARGV[8]):
--          the time in microseconds at which the next one to join is told to come back.
-- ARGV[1]  configured emission interval in microseconds (period / limit, rounded up); 0 = none.
-- ARGV[2]  burst, an integer >= 1: requests admitted at once after idling.
-- ARGV[3]  longest reservation in microseconds, an integer >= 0: when the next slot is at most
--          this far ahead, it is booked for the caller, who sends then.
-- ARGV[4]  backoff reduction, 0 < beta < 1: right after a 429 the rate is wmax * (1 - beta).
-- ARGV[5]  probing gain, gamma > 0: how fast the rate grows past wmax (see below).
-- ARGV[6]  backoff period K in microseconds: the rate is back at wmax K after the 429.
-- ARGV[7]  the time in microseconds, for tests that drive time; 0 = Redis TIME (always in use).
-- ARGV[8]  longest place in the waiting line in microseconds, an integer >= 0; 0 = refused
--          callers do not join it.
--
-- The rate learned from 429s follows CUBIC's curve (RFC 9438), scaled to wmax so that K is a
-- time: with x = (t - t0) / K, rate = wmax * (1 + beta * (x - 1)^3) up to K (concave: quickly
-- near wmax, then flat around it) and wmax * (1 + gamma * (x - 1)^3) after (probing upwards
-- ever faster). A learned header rate replaces it.
--
-- Returns one integer (an array reply would cost the caller more to parse than the script costs
-- Redis to run):
--   >= 10^12  granted now: the clock at the admission, in microseconds since the epoch;
--   1..10^12  granted later: a slot was booked this many microseconds from now (a reservation;
--             never more than ARGV[3], far below 10^12 = 11.6 days);
--   < 0       refused: minus the microseconds until a request can be admitted (until the pause
--             ends, when paused). A pause is never booked through. A caller that joins the
--             waiting line is told instead when its turn comes: one interval after the one who
--             joined before it, and never before a request can be admitted.
--
-- The waiting line: refused callers that come back when told "a request can be admitted in w"
-- all come back at once, one of them is admitted and the rest are refused again, so a backlog
-- of N throttled events costs N refusals per interval (a worker busy with nothing but them,
-- and another project's events queued behind them). In line, each is told a different time, an
-- interval apart, and comes back about when its slot is free: about one refusal per event. The
-- line only spaces the callers out; admission is still the bucket's alone, so a pause or a
-- slower rate meanwhile refuses them again (and they join the line's end). A caller whose turn
-- would be further than ARGV[8] away is told to come back then without taking a place, so a
-- line never runs far ahead of a rate that changes; the line expires when its last turn has
-- come.
--
-- A request is admitted when TAT - now <= tolerance = (burst - 1) * interval; admitting moves
-- TAT to max(TAT, now) + interval. Hence in any half-open span of one period there are at most
-- limit + burst - 1 admissions, at the slowest rate that applies.

local configured_us = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_reserve_us = tonumber(ARGV[3])
local beta = tonumber(ARGV[4])
local gamma = tonumber(ARGV[5])
local k_us = tonumber(ARGV[6])
local now_us = tonumber(ARGV[7])
if now_us <= 0 then
  local time = redis.call('TIME')
  now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local interval_us = configured_us
local learned_us = tonumber(redis.call('HGET', KEYS[3], 'interval_us'))
if learned_us then
  if learned_us > interval_us then interval_us = learned_us end
else
  local backoff = redis.call('HMGET', KEYS[4], 'wmax', 't0')
  local wmax = tonumber(backoff[1])
  if wmax then
    local x = (now_us - tonumber(backoff[2])) / k_us
    if x < 0 then x = 0 end
    local gain = beta
    if x > 1 then gain = gamma end
    local rate = wmax * (1 + gain * (x - 1) ^ 3)
    local backoff_us = math.ceil(1000000 / rate)
    if backoff_us > interval_us then interval_us = backoff_us end
  end
end

local line_max_us = tonumber(ARGV[8])

-- Refused: the caller waits wait_us, or joins the waiting line behind the ones already in it.
local function refuse(wait_us)
  if line_max_us <= 0 or interval_us <= 0 then
    return -wait_us
  end
  local turn_us = now_us + wait_us
  local line_us = tonumber(redis.call('GET', KEYS[6]))
  if line_us and line_us > turn_us then
    turn_us = line_us
  end
  if turn_us - now_us > line_max_us then
    return -math.max(wait_us, line_max_us)
  end
  local next_us = turn_us + interval_us
  redis.call('SET', KEYS[6], string.format('%.0f', next_us),
             'PX', math.max(1, math.ceil((next_us - now_us) / 1000)))
  return -(turn_us - now_us)
end

local pause = redis.call('GET', KEYS[2])
if pause then
  local pause_end_us = tonumber(pause) or 0
  if pause_end_us < 1e12 then
    pause_end_us = now_us + redis.call('PTTL', KEYS[2]) * 1000
  end
  if pause_end_us > now_us then
    return refuse(pause_end_us - now_us)
  end
end

if interval_us <= 0 then
  -- Nothing paces the project: count what is sent, so a first 429 knows the rate it hit.
  local tally = redis.call('HMGET', KEYS[5], 'n', 'ts')
  local ts = tonumber(tally[2])
  if ts == nil or now_us - ts >= 1000000 then
    local p, ps = 0, 0
    if ts ~= nil and now_us - ts < 2000000 then
      p, ps = tonumber(tally[1]), now_us - ts
    end
    redis.call('HSET', KEYS[5], 'n', 1, 'ts', string.format('%.0f', now_us), 'p', p,
               'ps', string.format('%.0f', ps))
  else
    redis.call('HINCRBY', KEYS[5], 'n', 1)
  end
  redis.call('PEXPIRE', KEYS[5], 15000)
  return now_us
end

local tolerance_us = (burst - 1) * interval_us
local tat_us = tonumber(redis.call('GET', KEYS[1]))
if tat_us == nil or tat_us < now_us then
  tat_us = now_us
end

local wait_us = tat_us - tolerance_us - now_us
if wait_us > max_reserve_us or (wait_us > 0 and max_reserve_us <= 0) then
  return refuse(wait_us)
end

local new_tat_us = tat_us + interval_us
redis.call('SET', KEYS[1], string.format('%.0f', new_tat_us),
           'PX', math.max(1, math.ceil((new_tat_us - now_us) / 1000)))
if wait_us > 0 then
  return wait_us
end
return now_us
