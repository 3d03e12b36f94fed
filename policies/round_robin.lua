-- Round-robin routing: workers take requests in turn.
--
-- The cursor is the index of the last pick. The next pick is cursor % n + 1
-- with n the current list size, so when workers are added or removed between
-- calls the index stays in range and the cycle simply continues over the new
-- list. Workers explicitly marked healthy = false are skipped without
-- breaking the order of the others.
--
-- select returns the worker and its reason: "only_choice" when one worker
-- is available, else "next_in_turn".

local setmetatable = setmetatable

local P = {
  name = "round_robin",
  version = "1.0.0",
  -- keeps no reference to req after select returns: the router may reuse
  -- the request's table for a later request
  transient_req = true,
  description = "Send requests to workers in turn.",
}

P.options = {}

local mt = { __index = P }

function P.new(conf, rt)
  return setmetatable({ cursor = 0 }, mt)
end

function P:select(req, workers)
  local n = #workers
  if n == 0 then return nil, "no workers" end
  local i = self.cursor
  for _ = 1, n do
    i = i % n + 1
    local w = workers[i]
    if w.healthy ~= false then
      self.cursor = i
      return w, n == 1 and "only_choice" or "next_in_turn"
    end
  end
  return nil, "no healthy workers"
end

function P:stats()
  return { cursor = self.cursor }
end

return P
