-- Random routing: every request goes to a worker picked uniformly at random.
--
-- Stateless, so it needs no bookkeeping when workers come and go. The
-- runtime passes only workers that may take a request; a worker explicitly
-- marked healthy = false is still skipped, so a stale list never routes to
-- a known-bad worker.
--
-- select returns the worker and its reason: "only_choice" when one worker
-- is available, else "random".

local setmetatable, random = setmetatable, math.random

local P = {
  name = "random",
  version = "1.0.0",
  -- keeps no reference to req after select returns: the router may reuse
  -- the request's table for a later request
  transient_req = true,
  description = "Send each request to a uniformly random worker.",
}

P.options = {}

local mt = { __index = P }

-- rt.random(n) -> integer in [1, n]; seeded or virtual in specs and the
-- simulator. Without an rt, math.random.
function P.new(conf, rt)
  local rand = rt and rt.random or random
  return setmetatable({ random = rand }, mt)
end

function P:select(req, workers)
  local n = #workers
  if n == 0 then return nil, "no workers" end
  local w = workers[self.random(n)]
  if w and w.healthy ~= false then return w, n == 1 and "only_choice" or "random" end

  -- Rare path: the pick was unhealthy; choose among the healthy ones.
  local ok = {}
  for i = 1, n do
    if workers[i].healthy ~= false then ok[#ok + 1] = workers[i] end
  end
  if #ok == 0 then return nil, "no healthy workers" end
  return ok[self.random(#ok)], #ok == 1 and "only_choice" or "random"
end

return P
