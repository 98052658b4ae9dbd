-- Note what may have lost messages since the last look, and say when that last happened.
--
-- A message vanishes without a trace only in kombu's window between BRPOP and its unacked
-- write, so only when a consumer's connection ends there: a consumer that died (it stopped
-- saying it is alive), one that reconnected (lua/outbox_alive.lua notes those), or a Redis
-- that restarted (its run id changed).
--
-- KEYS[1]  the outbox's consumers set: consumer id -> until when it is known to be alive.
-- KEYS[2]  the outbox's losses set: what may have lost a message -> the latest time it may
--          have lost it (Redis time, s since the epoch).
-- KEYS[3]  the Redis run id the last look saw.
-- ARGV[1]  this Redis server's run id now (INFO server).
-- ARGV[2]  seconds a loss is remembered.
--
-- Returns {now, latest loss time or ''}, as strings.

local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_s, 'WITHSCORES')
for i = 1, #dead, 2 do
  -- Died at the latest when it was last known alive.
  redis.call('ZADD', KEYS[2], dead[i + 1], 'died:' .. dead[i])
  redis.call('ZREM', KEYS[1], dead[i])
end
local seen = redis.call('GET', KEYS[3])
if seen ~= ARGV[1] then
  if seen then
    redis.call('ZADD', KEYS[2], now_s, 'redis-restarted:' .. ARGV[1])
  end
  redis.call('SET', KEYS[3], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_s - tonumber(ARGV[2]))
local latest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local answer = {string.format('%.6f', now_s), ''}
if #latest == 2 then
  answer[2] = latest[2]
end
return answer
