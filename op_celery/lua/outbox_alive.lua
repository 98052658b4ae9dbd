-- A consumer of the broker says it is alive; or that it has just reconnected, so a message in
-- transit on its broken connection may have been lost; or that it has stopped cleanly.
--
-- KEYS[1]  the outbox's consumers set: consumer id -> until when (Redis time, s since the
--          epoch) it is known to be alive.
-- KEYS[2]  the outbox's losses set: what may have lost a message -> the latest time (Redis
--          time) it may have lost it.
-- ARGV[1]  the consumer's id.
-- ARGV[2]  seconds the consumer counts as alive from now, without saying so again.
-- ARGV[3]  'beat': alive; 'reconnected': alive again after a broken connection (a loss now);
--          'stopped': stopped cleanly (it loses nothing: kombu reads a BRPOP reply in flight
--          before closing), so forgotten.
--
-- Returns the Redis time, as a string.

local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
if ARGV[3] == 'stopped' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now_s + tonumber(ARGV[2]), ARGV[1])
  if ARGV[3] == 'reconnected' then
    redis.call('ZADD', KEYS[2], now_s, 'reconnected:' .. ARGV[1] .. ':' .. now[1] .. now[2])
  end
end
return string.format('%.6f', now_s)
