-- Write an event's outbox record, and push its message in the same step when one is given, so
-- the message never exists without its record.
--
-- KEYS[1]  the queue's list (kombu's key for the message's priority), or any key when ARGV[1]
--          is empty.
-- KEYS[2]  the outbox's records hash of the queue: event id -> record.
-- KEYS[3]  the outbox's due set of the queue: event id -> time to look at the record.
-- ARGV[1]  the message as kombu's Redis transport stores it; empty: write the record only.
-- ARGV[2]  the event id.
-- ARGV[3]  the record (JSON).
-- ARGV[4]  when the record is due, in seconds since the epoch: the caller's clock plus the
--          grace period (the Redis clock would cost over a quarter of this script's time;
--          a skewed caller only makes its records due that much earlier or later).

if ARGV[1] ~= '' then
  redis.call('LPUSH', KEYS[1], ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
return 1
