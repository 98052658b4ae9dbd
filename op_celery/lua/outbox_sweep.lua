-- Pick the outbox records due to be looked at, and count the messages a look at them reads.
--
-- KEYS[1]     outbox hash: event id -> record (JSON).
-- KEYS[2]     outbox due set: event id -> time (s since the epoch) to look at the record again.
-- KEYS[3]     kombu's unacked hash of the broker (only its size is read here).
-- KEYS[4...]  the queue's lists, one per priority step (only their lengths are read here).
-- ARGV[1]     grace period in seconds: a record picked is due again that long after now.
-- ARGV[2]     records to pick, at most.
-- ARGV[3]     messages to read, at most: with more on the lists and in unacked, pick none now.
--
-- Returns {0} when no record is due; {-1, messages} when the lists and unacked hold more than
-- ARGV[3] messages (the records stay due); else {1, messages, record, record, ...}: the records
-- due, each now due again a grace period later (due entries without a record are dropped).
-- Which of them lost their message the caller decides by reading the messages themselves, as
-- JSON (_outbox.Sweeper): nothing in kombu's messages is searched here.

local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_s, 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then
  return {0}
end
local total = redis.call('HLEN', KEYS[3])
for i = 4, #KEYS do
  total = total + redis.call('LLEN', KEYS[i])
end
if total > tonumber(ARGV[3]) then
  return {-1, total}
end
local again = now_s + tonumber(ARGV[1])
local picked = {1, total}
for _, event in ipairs(due) do
  local record = redis.call('HGET', KEYS[1], event)
  if record then
    redis.call('ZADD', KEYS[2], again, event)
    picked[#picked + 1] = record
  else
    redis.call('ZREM', KEYS[2], event)
  end
end
return picked
