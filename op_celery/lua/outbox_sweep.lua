-- Find the outbox records whose message is on no queue list and in no worker's hands.
--
-- KEYS[1]     outbox hash: event id -> record (JSON with the task id under "id").
-- KEYS[2]     outbox due set: event id -> time (s since the epoch) to look at the record again.
-- KEYS[3]     kombu's unacked hash: delivery tag -> [message, exchange, routing key] (JSON).
-- KEYS[4...]  the queue lists to look in (each queue's list per priority step).
-- ARGV[1]     grace period in seconds: a record looked at is due again that long after now.
-- ARGV[2]     records to look at, at most.
-- ARGV[3]     messages to scan, at most: with more on the lists and in unacked, judge later.
-- ARGV[4...]  optional: event ids to look at again now (the suspects of a previous call),
--             instead of the due records; their due times are left as they are.
--
-- Returns {0} when no record is due; {-1, messages} when there are too many messages to scan
-- now; else {1, record, record, ...}: the records whose task id is nowhere, i.e. whose message
-- was lost between kombu's BRPOP and its HSET into unacked. Every record looked at (lost or
-- not) is due again after the grace period; records without a body are dropped from the set.
-- A message's task id is the first '"id": "..."' of its JSON: the protocol-2 header "id",
-- which comes before any other key spelt "id" (the body is encoded: its quotes are escaped).

local now = redis.call('TIME')
local now_s = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due
if #ARGV > 3 then
  due = {unpack(ARGV, 4)}
else
  due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_s, 'LIMIT', 0, tonumber(ARGV[2]))
end
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
-- A plain find and a list read in chunks: four times faster than a pattern over one LRANGE.
local present = {}
local function mark(message)
  local _, head = string.find(message, '"id": "', 1, true)
  if head then
    local tail = string.find(message, '"', head + 1, true)
    if tail then present[string.sub(message, head + 1, tail - 1)] = true end
  end
end
local CHUNK = 500
for i = 4, #KEYS do
  local length = redis.call('LLEN', KEYS[i])
  for start = 0, length - 1, CHUNK do
    for _, message in ipairs(redis.call('LRANGE', KEYS[i], start, start + CHUNK - 1)) do
      mark(message)
    end
  end
end
for _, message in ipairs(redis.call('HVALS', KEYS[3])) do
  mark(message)
end
local again = now_s + tonumber(ARGV[1])
local lost = {1}
for _, event in ipairs(due) do
  local record = redis.call('HGET', KEYS[1], event)
  if not record then
    redis.call('ZREM', KEYS[2], event)
  else
    if #ARGV == 3 then
      redis.call('ZADD', KEYS[2], again, event)
    end
    local id = string.match(record, '^{"id": "([^"]*)"')
    if not (id and present[id]) then
      lost[#lost + 1] = record
    end
  end
end
return lost
