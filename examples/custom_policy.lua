-- A custom policy: session affinity. Requests carrying the same session
-- header go to the same worker (rendezvous hashing, so adding or removing a
-- worker moves only that worker's sessions); requests without it go to the
-- least loaded worker. select states why (the reason shows in
-- x-sglr-decision and GET /admin/decisions). Use it without rebuilding anything:
--
--   sglr run --policy examples/custom_policy.lua --worker-urls http://w1:8000 http://w2:8000 \
--     --policy-opt session_header=x-user-id
--
-- Edit it while the router runs, then `kill -HUP <router pid>` or
-- `sglr reload --url http://127.0.0.1:30000`: the new code routes new
-- requests once its select answers a synthetic request (else the router
-- keeps this version and says why).
local P = { name = "session_affinity", version = "1.0.0" }

P.options = {
  session_header = { type = "string", default = "x-session-id",
    description = "Request header that names the session." },
}

function P.new(conf, rt)
  return setmetatable({ header = conf.session_header or "x-session-id", rt = rt }, { __index = P })
end

-- FNV-1a over session .. url: the worker with the highest score wins.
local bit = require "bit"
local function score(s)
  local h = 2166136261
  for i = 1, #s do
    h = bit.bxor(h, s:byte(i))
    h = bit.tobit(h * 16777619)
  end
  return h
end

function P:select(req, workers)
  if #workers == 0 then return nil, "no workers" end
  local session = req.headers and req.headers[self.header]
  if session then
    local best, best_score
    for _, w in ipairs(workers) do
      local sc = score(session .. w.url)
      if not best or sc > best_score then best, best_score = w, sc end
    end
    return best, "session"
  end
  local best = workers[1]
  for _, w in ipairs(workers) do
    if w.load < best.load then best = w end
  end
  return best, "least_loaded"
end

return P
