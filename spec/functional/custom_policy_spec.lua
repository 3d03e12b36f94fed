-- A policy file given by path is used as is, without rebuilding anything.
local H = require "spec.helpers"

describe("custom policy file", function()
  local w1, w2, r, file
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2" })
    file = H.tmpfile(([[
local P = { name = "marker", version = "1.0.0", options = {} }
function P.new(conf, rt) return setmetatable({}, { __index = P }) end
function P:select(req, workers)
  for _, w in ipairs(workers) do
    if w.url:find(":%d", 1, true) then return w end
  end
  return nil, "marker worker not available"
end
return P
]]):format(w2.port), ".lua")
    r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file })
  end)
  teardown(function()
    H.stop_all()
    os.remove(file)
  end)

  it("sends every request to the worker the script picks", function()
    for i = 1, 6 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("q" .. i)))
      assert.equal(200, res.status)
      assert.equal("w2", H.worker_of(res))
    end
    assert.equal("marker", H.list_workers(r).policy)
  end)

  it("answers 503 with the script's reason when it picks nothing", function()
    assert.equal(200, assert(H.post(r.url, "/remove_worker?url=" .. w2.url)).status)
    local res = assert(H.post(r.url, "/generate", H.gen_body("q")))
    assert.equal(503, res.status)
    assert.truthy(res.json.error.message:find("marker worker not available", 1, true))
  end)

  it("refuses to start with a policy file that is not a policy", function()
    local bad = H.tmpfile("return 42\n", ".lua")
    local p = H.spawn({ "run", "--port", "0", "--prometheus-port", "0", "--policy", bad })
    local code = H.wait_stopped(p, 10000)
    os.remove(bad)
    assert.is_not.equal(0, code)
    assert.truthy(p.out:find("policy", 1, true))
  end)
end)

describe("a policy that blocks the event loop", function()
  local r, file
  setup(function()
    local w = H.sim({ "--id", "w1" })
    -- busy for 1.5 s when the prompt asks for it, like an eviction gone wrong
    file = H.tmpfile([[
local P = { name = "stall", version = "1.0.0", options = {} }
function P.new(conf, rt) return setmetatable({ rt = rt }, { __index = P }) end
function P:select(req, workers)
  if (req.text or ""):find("STALL", 1, true) then
    local t = self.rt.now()
    while self.rt.now() - t < 1500 do end
  end
  return workers[1]
end
return P
]], ".lua")
    r = H.router({ "--worker-urls", w.url, "--policy", file })
  end)
  teardown(function()
    H.stop_all()
    os.remove(file)
  end)

  it("is reported in the log and in the loop lag metric", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("STALL here")))
    assert.equal(200, res.status)
    H.wait_output(r.proc, "event loop blocked", 3000)
    local m = assert(H.get("http://127.0.0.1:" .. r.metrics_port, "/metrics"))
    -- one observation of at least a second: the +Inf count exceeds the 1 s bucket
    local le1 = tonumber(m.body:match('sgl_router_event_loop_lag_seconds_bucket{le="1"} (%d+)'))
    local inf = tonumber(m.body:match('sgl_router_event_loop_lag_seconds_bucket{le="%+Inf"} (%d+)'))
    assert.is_true(inf - le1 >= 1, m.body:match("sgl_router_event_loop_lag[^\n]*"))
  end)
end)

describe("examples/custom_policy.lua in the real router", function()
  teardown(H.stop_all)

  it("keeps a session on one worker through request headers", function()
    local w1, w2 = H.sim({ "--id", "w1" }), H.sim({ "--id", "w2" })
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "examples/custom_policy.lua" })
    -- The worker of each session, by the script's own hashing of these
    -- (kernel-chosen) URLs. Requests without the header go to the least
    -- loaded worker, w1 when idle: so take sessions of each worker, and
    -- the ones on w2 show that the header reached the script.
    local P = dofile("examples/custom_policy.lua")
    local p = P.new({}, {})
    local fake = { { url = w1.url, load = 0, id = "w1" }, { url = w2.url, load = 0, id = "w2" } }
    local want, per_worker = {}, { w1 = 0, w2 = 0 }
    for i = 1, 64 do
      local session = "session-" .. i
      local id = p:select({ headers = { ["x-session-id"] = session } }, fake).id
      if per_worker[id] < 2 then
        want[#want + 1] = { session = session, worker = id }
        per_worker[id] = per_worker[id] + 1
      end
    end
    assert.same({ w1 = 2, w2 = 2 }, per_worker)
    for i = 1, 3 do
      for _, s in ipairs(want) do
        local res = assert(H.post(r.url, "/generate", H.gen_body("q" .. i), { ["x-session-id"] = s.session }))
        assert.equal(200, res.status)
        assert.equal(s.worker, H.worker_of(res), "session " .. s.session)
      end
    end
  end)
end)

describe("a policy script that fails", function()
  teardown(H.stop_all)

  it("costs the request a 500 and nothing else", function()
    local w = H.sim({ "--id", "w" })
    local file = H.tmpfile([[
local P = { name = "flaky", version = "1.0.0", options = {} }
function P.new(conf, rt) return setmetatable({ n = 0 }, { __index = P }) end
function P:select(req, workers)
  self.n = self.n + 1
  if self.n % 2 == 0 then error("policy bug on every second request") end
  return workers[1]
end
return P
]], ".lua")
    local r = H.router({ "--worker-urls", w.url, "--policy", file })
    local statuses = {}
    for i = 1, 4 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("q" .. i)))
      statuses[#statuses + 1] = res.status
      if res.status == 500 then assert.equal("internal_error", res.json.error.type) end
    end
    os.remove(file)
    assert.same({ 200, 500, 200, 500 }, statuses)
    assert.equal(0, H.list_workers(r).workers[1].load)
    H.wait_for(function() return r.proc.out:find("policy bug on every second request", 1, true) end, 2000, "logged error")
  end)
end)
