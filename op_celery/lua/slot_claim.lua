-- Take a slot of the project's rate limit and, when one is granted, claim the event: the two
-- round trips before a request in one (``_delivery``), on a Redis that holds both the
-- limiter's and the ledger's keys (not a cluster, where they live in two hash slots).
--
-- KEYS[1..6]   acquire.lua's KEYS[1..6] (the project's bucket, pause, learned, backoff, tally
--              and line keys).
-- KEYS[7]      claim.lua's KEYS[1]: the event's delivered key.
-- KEYS[8]      claim.lua's KEYS[2]: its in-flight key (same slot as KEYS[7]).
-- ARGV[1..8]   acquire.lua's ARGV[1..8].
-- ARGV[9]      claim.lua's ARGV[1]: the token naming this attempt.
-- ARGV[10]     claim.lua's ARGV[2]: how long the claim holds once the request starts, in
--              milliseconds; the wait for a booked slot is added, since the caller sleeps
--              until its slot before it sends.
--
-- Returns {acquire's answer} when refused (nothing is claimed: a throttled event costs the
-- ledger nothing), else {acquire's answer, claim's answer}. The two scripts are included
-- whole (``_lua.lua`` expands the ``--@include`` lines), each as a function whose KEYS and
-- ARGV are its own, so each file stays the one definition of its operation.

local function acquire(KEYS, ARGV)
--@include acquire.lua
end

local function claim(KEYS, ARGV)
--@include claim.lua
end

local slot = acquire({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]},
                     {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]})
if slot < 0 then
  return {slot}
end
local hold_ms = tonumber(ARGV[10])
if slot < 1e12 then
  -- A booked slot: ``slot`` microseconds from now.
  hold_ms = hold_ms + math.ceil(slot / 1000)
end
return {slot, claim({KEYS[7], KEYS[8]}, {ARGV[9], string.format('%d', hold_ms)})}
