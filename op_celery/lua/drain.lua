-- A worker's task, done with its event, settles the message it took before (if any) and takes
-- the next one off the queue itself, as kombu would take it: out of the list, into kombu's
-- unacked hash and index in the same step, so a taker that dies leaves it where the
-- visibility-timeout sweep gives it back. Only a message the package's tasks can run at once
-- is taken: one of its task names, no ETA, no expiry, no compression, JSON with a base64 body
-- (what every publish of the package writes); anything else stays for kombu's consumer, and
-- so does everything behind it (the queue's order is kept).
--
-- KEYS[1]  the queue's Redis list (broker key prefix included), at its default priority.
-- KEYS[2]  kombu's unacked hash (delivery tag -> JSON of [message, exchange, routing key]).
-- KEYS[3]  kombu's unacked index (delivery tag scored by the time it was taken).
-- ARGV[1]  now, in seconds since the epoch (the index's score).
-- ARGV[2]  the delivery tag of the message taken before, now finished; "" for none.
-- ARGV[3]  1 to take the next message, 0 to only settle ARGV[2].
-- ARGV[4...]  the task names that may be taken.
-- Returns the message as it was on the list, or false.

if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
if ARGV[3] ~= '1' then
  return false
end
local raw = redis.call('LINDEX', KEYS[1], -1)
if not raw then
  return false
end
local ok, message = pcall(cjson.decode, raw)
if not ok or type(message) ~= 'table' then
  return false
end
local headers, properties = message['headers'], message['properties']
if type(headers) ~= 'table' or type(properties) ~= 'table' then
  return false
end
local function absent(value)
  return value == nil or value == cjson.null
end
if not (absent(headers['eta']) and absent(headers['expires']) and absent(headers['compression'])) then
  return false
end
if message['content-type'] ~= 'application/json' or properties['body_encoding'] ~= 'base64' then
  return false
end
local tag, info = properties['delivery_tag'], properties['delivery_info']
if type(tag) ~= 'string' or type(info) ~= 'table' or type(headers['id']) ~= 'string' then
  return false
end
local known = false
for i = 4, #ARGV do
  if headers['task'] == ARGV[i] then
    known = true
    break
  end
end
if not known then
  return false
end
-- The writes a full Redis refuses (HSET, ZADD) come before the pop: Redis does not undo a
-- script's earlier commands when a later one fails, so a refusal must leave the message queued.
local entry = '[' .. raw .. ',' .. cjson.encode(info['exchange'] or '') .. ','
  .. cjson.encode(info['routing_key'] or '') .. ']'
redis.call('HSET', KEYS[2], tag, entry)
redis.call('ZADD', KEYS[3], ARGV[1], tag)
redis.call('RPOP', KEYS[1])
return raw
