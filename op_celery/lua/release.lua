-- Give up a claim on an event, if it is still this attempt's (it may have run out and been
-- taken by another worker, whose claim must stay).
--
-- KEYS[1]  the event's in-flight key, e.g. op-celery:{<event id>}:inflight.
-- ARGV[1]  the token the claim was made with.
--
-- Returns 1 when the claim was released, 0 when it was not this attempt's.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
