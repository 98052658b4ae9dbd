-- Mark an event delivered: remember it, end its claim, and (when the ledger lives in the
-- broker's Redis) forget its outbox record in the same round trip.
--
-- KEYS[1]  the ledger's delivered key of the event, e.g. op-celery:{<event id>}:delivered.
-- KEYS[2]  its in-flight key, e.g. op-celery:{<event id>}:inflight (same slot).
-- KEYS[3]  optional: the outbox's records hash of the event's queue (broker key prefix included).
-- KEYS[4]  optional: the outbox's due set of that queue.
-- KEYS[1] and KEYS[2] share the hash tag {<event id>}; KEYS[3] and KEYS[4] are passed only when
-- the ledger's Redis is also the broker's, a single server (no broker runs on a Redis Cluster).
-- ARGV[1]  seconds to remember the event (OP_CELERY_LEDGER_TTL).
-- ARGV[2]  the event id, the field of its outbox record.

redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
redis.call('DEL', KEYS[2])
if #KEYS == 4 then
  redis.call('HDEL', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
end
return 1
