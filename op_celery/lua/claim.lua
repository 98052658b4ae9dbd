-- Claim an event for sending, unless it was delivered or another worker is sending it.
--
-- KEYS[1]  the ledger's delivered key of the event, e.g. op-celery:{<event id>}:delivered.
-- KEYS[2]  its in-flight key, e.g. op-celery:{<event id>}:inflight (same slot).
-- ARGV[1]  a token naming this attempt.
-- ARGV[2]  how long the claim holds, in milliseconds (it outlives a killed worker by no more).
--
-- Returns 0 when claimed, -1 when already delivered, else the milliseconds until the other
-- worker's claim runs out (at least 1).

if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local left = redis.call('PTTL', KEYS[2])
if left < 1 then
  return 1
end
return left
