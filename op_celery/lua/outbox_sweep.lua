-- Pick the outbox records due to be looked at, and count the messages a look at them reads.
--
-- KEYS[1]     outbox hash: event id -> record (JSON).
-- KEYS[2]     outbox due set: event id -> time (s since the epoch) to look at the record again.
-- KEYS[3]     outbox missing hash: event id -> "<last seen> <first missed>" (s since the epoch)
--             for a record whose message was found nowhere and is not judged yet.
-- KEYS[4]     kombu's unacked hash of the broker (only its size is read here).
-- KEYS[5...]  the queue's lists, one per priority step (only their lengths are read here).
-- ARGV[1]     records to pick, at most.
-- ARGV[2]     messages to read, at most: with more on the lists and in unacked, pick none now.
--
-- Returns {0} when no record is due; {-1, messages} when the lists and unacked hold more than
-- ARGV[2] messages (the records stay due); else {1, messages, now, then per record picked:
-- record, its due time, its missing entry or ''}: the records due (due and missing entries
-- without a record are dropped). Nothing else changes here: the sweeper makes a record due
-- again a grace period after it saw its message, so a record's message was last seen a grace
-- period before its due time (or the record was written then). Which records lost their
-- message the caller decides by reading the messages themselves, as JSON (_outbox.Sweeper):
-- nothing in kombu's messages is searched here.

local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_s, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[1]))
if #due == 0 then
  return {0}
end
local total = redis.call('HLEN', KEYS[4])
for i = 5, #KEYS do
  total = total + redis.call('LLEN', KEYS[i])
end
if total > tonumber(ARGV[2]) then
  return {-1, total}
end
local picked = {1, total, string.format('%.6f', now_s)}
for i = 1, #due, 2 do
  local event = due[i]
  local record = redis.call('HGET', KEYS[1], event)
  if record then
    picked[#picked + 1] = record
    picked[#picked + 1] = due[i + 1]
    picked[#picked + 1] = redis.call('HGET', KEYS[3], event) or ''
  else
    redis.call('ZREM', KEYS[2], event)
    redis.call('HDEL', KEYS[3], event)
  end
end
return picked
