-- Policies as live code in the real router: options checked at start,
-- hot reload (POST /admin/policy, SIGHUP, sglr reload) under load,
-- migrate keeping cache affinity, refusal of broken code, and rollback
-- after run-time errors.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

-- A policy that sends everything to the worker listening on `port`; with
-- `boom`, its select raises on requests whose text contains "boom".
local function to_port(port, boom)
  return ([[
local P = { name = "to_port", version = "%s", options = {
  port = { type = "number", default = %d, description = "port of the worker to route to" },
} }
function P.new(conf, rt) return setmetatable({ port = conf.port }, { __index = P }) end
function P:select(req, workers)
  %s
  for _, w in ipairs(workers) do
    if w.url:find(":" .. self.port, 1, true) then return w end
  end
  return nil, "worker on port " .. self.port .. " not available"
end
return P
]]):format(boom and "2.0.0" or "1.0.0", port,
    boom and [[if (req.text or ""):find("boom", 1, true) then error("boom in select") end]] or "")
end

local function write(path, content)
  local f = assert(io.open(path, "w"))
  f:write(content)
  f:close()
end

local function gen(r, text, headers)
  return assert(H.post(r.url, "/generate", H.gen_body(text or "hello"), headers))
end

local function policy_state(r, headers)
  local res = assert(H.get(r.url, "/admin/policy", headers))
  assert.equal(200, res.status, res.body)
  return res.json.pools
end

local function reload(r, body, headers)
  return assert(H.post(r.url, "/admin/policy", body and cjson.encode(body) or "", headers))
end

describe("policy options at start", function()
  teardown(H.stop_all)

  local function start_fails(args, want)
    local full = { "run", "--port", "0", "--prometheus-port", "0" }
    for _, a in ipairs(args) do full[#full + 1] = a end
    local p = H.spawn(full)
    local code = H.wait_stopped(p, 10000)
    assert.is_not.equal(0, code)
    assert.truthy(p.out:find(want, 1, true), p.out)
  end

  it("refuses an unknown option, a bad type and a value out of range, naming the option", function()
    start_fails({ "--policy", "cache_aware", "--policy-opt", "nope=1" }, "policy 'cache_aware' has no option 'nope'")
    start_fails({ "--policy-opt", "cache_threshold=high" }, "option 'cache_threshold' must be a number")
    start_fails({ "--policy-opt", "cache_threshold=2" }, "option 'cache_threshold' must be in [0, 1]")
    start_fails({ "--policy", "round_robin", "--policy-opt", "x=1" }, "policy 'round_robin' has no option 'x'")
  end)

  it("refuses an SGLang-named flag that contradicts --policy-opt", function()
    start_fails({ "--cache-threshold", "0.2", "--policy-opt", "cache_threshold=0.4" },
      "--cache-threshold 0.2 and --policy-opt cache_threshold=0.4 disagree")
  end)

  it("lists the options of the policy given with --help", function()
    local p = H.spawn({ "run", "--policy", "power_of_two", "--help" })
    assert.equal(0, H.wait_stopped(p))
    assert.truthy(p.out:find("Policy power_of_two", 1, true))
    assert.truthy(p.out:find("load_check_interval", 1, true))
  end)

  it("hands the policy its options (a file's own, and power_of_two's interval)", function()
    local w1, w2 = H.sim({ "--id", "w1" }), H.sim({ "--id", "w2" })
    local file = H.tmpfile(to_port(w1.port), ".lua")
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file, "--policy-opt", "port=" .. w2.port })
    assert.equal("w2", H.worker_of(gen(r)))
    assert.equal(w2.port, policy_state(r).regular.options.port)
    local r2 = H.router({ "--worker-urls", w1.url, "--policy", "power_of_two", "--policy-opt", "load_check_interval=3" })
    assert.equal(3, policy_state(r2).regular.options.load_check_interval)
    os.remove(file)
  end)
end)

describe("policy hot reload", function()
  local w1, w2, file
  setup(function()
    w1 = H.sim({ "--id", "w1", "--latency-ms", "60" })
    w2 = H.sim({ "--id", "w2", "--latency-ms", "60" })
  end)
  teardown(function()
    H.stop_all()
    if file then os.remove(file) end
  end)
  before_each(function()
    file = H.tmpfile(to_port(w1.port), ".lua")
  end)

  it("swaps the policy under load: no request fails, new ones follow the new code, in-flight ones finish", function()
    local auth = { authorization = "Bearer adm" }
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file, "--admin-api-key", "adm" })
    local log, stop = {}, false
    local loops = {}
    for c = 1, 4 do
      loops[c] = function()
        local i = 0
        while not stop do
          i = i + 1
          local e = { t0 = core.now() }
          local res = H.post(r.url, "/generate", H.gen_body("c" .. c .. " " .. i))
          e.t1, e.status, e.worker = core.now(), res and res.status, H.worker_of(res)
          log[#log + 1] = e
        end
        return true
      end
    end
    local done = core.event()
    core.spawn(function() H.parallel(loops) done:set(true) end)
    H.wait_for(function() return #log >= 8 end, 10000, "requests before the reload")

    write(file, to_port(w2.port))
    assert.equal(401, reload(r).status)          -- the admin key guards it
    local sent = core.now()
    local res = reload(r, nil, auth)
    local answered = core.now()
    assert.equal(200, res.status, res.body)
    assert.equal("ok", res.json.result)
    H.wait_for(function()
      local n = 0
      for _, e in ipairs(log) do if e.t0 > answered then n = n + 1 end end
      return n >= 12
    end, 10000, "requests after the reload")
    stop = true
    done:wait(10000)

    local before, after, in_flight = 0, 0, 0
    for _, e in ipairs(log) do
      assert.equal(200, e.status)
      if e.t1 < sent then
        before = before + 1
        assert.equal("w1", e.worker)
      elseif e.t0 < sent then
        -- picked by the old instance, finished after the swap
        in_flight = in_flight + 1
        assert.equal("w1", e.worker)
      elseif e.t0 > answered then
        after = after + 1
        assert.equal("w2", e.worker)
      end
    end
    assert.is_true(before > 0 and after >= 12 and in_flight > 0, ("%d %d %d"):format(before, in_flight, after))
    local pools = policy_state(r, auth)
    assert.equal("to_port", pools.regular.previous_good.name)
    assert.equal(1, H.metric(H.scrape(r), 'sgl_router_policy_reloads_total{pool="regular",result="ok"}'))
  end)

  it("keeps cache_aware's prefixes on their workers across a reload (migrate)", function()
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "cache_aware" })
    local placed = {}
    for i = 1, 8 do
      local text = ("shared system prompt number %d. "):format(i):rep(8)
      placed[i] = H.worker_of(gen(r, text))
    end
    local hash = policy_state(r).regular.hash
    local misses = H.metric(H.scrape(r), "sgl_router_cache_misses_total")
    assert.equal(200, reload(r).status)
    -- the reload's probe routed a synthetic request: no metric saw it
    assert.equal(misses, H.metric(H.scrape(r), "sgl_router_cache_misses_total"))
    -- asked in the other order: a fresh tree would place them anew
    for i = 8, 1, -1 do
      local text = ("shared system prompt number %d. "):format(i):rep(8) .. "next turn " .. i
      assert.equal(placed[i], H.worker_of(gen(r, text)), "prefix " .. i)
    end
    local state = policy_state(r).regular
    assert.equal(hash, state.hash)
    assert.equal("ok", state.events[#state.events].result)
  end)

  it("refuses broken code and keeps serving with the old policy", function()
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file })
    local hash = policy_state(r).regular.hash
    write(file, "local P = {\n")                   -- a syntax error on disk
    local res = reload(r)
    assert.equal(422, res.status)
    assert.truthy(res.json.error.message:find("cannot load", 1, true), res.body)
    res = reload(r, { options = { port = "not a port" } })
    assert.equal(422, res.status)
    assert.truthy(res.json.error.message:find("option 'port' must be a number", 1, true), res.body)
    res = reload(r, { code = [[
local P = { name = "raiser", options = {} }
function P.new() return setmetatable({}, { __index = P }) end
function P:select() error("broken select") end
return P]] })
    assert.equal(422, res.status)
    assert.truthy(res.json.error.message:find("broken select", 1, true), res.body)
    res = reload(r, { code = [[
local P = { name = "liar", options = {} }
function P.new() return setmetatable({}, { __index = P }) end
function P:select() return { url = "http://elsewhere" } end
return P]] })
    assert.equal(422, res.status)
    assert.truthy(res.json.error.message:find("not one of the workers", 1, true), res.body)

    for i = 1, 3 do assert.equal("w1", H.worker_of(gen(r, "still " .. i))) end
    local state = policy_state(r).regular
    assert.equal(hash, state.hash)
    local refused = 0
    for _, e in ipairs(state.events) do if e.result == "refused" then refused = refused + 1 end end
    assert.equal(4, refused)
    assert.equal(4, H.metric(H.scrape(r), 'sgl_router_policy_reloads_total{pool="regular",result="refused"}'))
  end)

  it("rolls back to the last good version when the new select raises at run time", function()
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file,
      "--policy-rollback-min-requests", "6", "--policy-rollback-error-rate", "0.5" })
    local good_hash = policy_state(r).regular.hash
    local res = reload(r, { code = to_port(w2.port, true) })
    assert.equal(200, res.status, res.body)
    assert.equal("w2", H.worker_of(gen(r, "fine")))
    -- every request is served: the ones whose select raised by the old instance
    for i = 1, 8 do
      local g = gen(r, "boom " .. i)
      assert.equal(200, g.status, g.body)
      assert.equal("w1", H.worker_of(g))
    end
    local state = policy_state(r).regular
    assert.equal(good_hash, state.hash)
    assert.equal("rollback", state.events[#state.events].result)
    assert.truthy(state.events[#state.events].message:find("boom in select", 1, true))
    assert.equal("w1", H.worker_of(gen(r, "fine again")))
    local m = H.scrape(r)
    assert.equal(1, H.metric(m, 'sgl_router_policy_reloads_total{pool="regular",result="rollback"}'))
    assert.is_true(H.metric(m, 'sgl_router_policy_select_errors_total{pool="regular"}') >= 6)
    assert.equal(1, H.metric(m, ('sgl_router_policy_info{pool="regular",name="to_port",version="1.0.0",hash="%s"}')
      :format(good_hash)))
  end)

  it("answers 500 and logs the error when a select raises and there is nothing to fall back to", function()
    write(file, to_port(w1.port, true))
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file })
    local res = gen(r, "boom")
    assert.equal(500, res.status)
    assert.equal("internal_error", res.json.error.type)
    H.wait_output(r.proc, "regular policy select failed: [^\n]*boom in select", 2000)
    assert.equal(1, H.metric(H.scrape(r), 'sgl_router_policy_select_errors_total{pool="regular"}'))
    assert.equal("w1", H.worker_of(gen(r, "fine")))
  end)

  it("reloads from disk on SIGHUP", function()
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file })
    assert.equal("w1", H.worker_of(gen(r)))
    write(file, to_port(w2.port))
    H.kill(r.proc, "sighup")
    H.wait_for(function() return H.worker_of(gen(r)) == "w2" end, 5000, "the reloaded policy")
    assert.is_falsy(r.proc.exited)
  end)

  it("reloads through sglr reload, with the admin key, and says why it refused", function()
    local r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", file, "--admin-api-key", "adm" })
    local code_file = H.tmpfile(to_port(w2.port), ".lua")
    local p = H.spawn({ "reload", "--url", r.url, "--code", code_file })
    assert.equal(1, H.wait_stopped(p))
    assert.truthy(p.out:find("401", 1, true), p.out)
    p = H.spawn({ "reload", "--url", r.url, "--admin-api-key", "adm", "--code", code_file })
    assert.equal(0, H.wait_stopped(p), p.out)
    assert.truthy(p.out:find("reloaded: regular: to_port", 1, true), p.out)
    assert.equal("w2", H.worker_of(gen(r)))
    p = H.spawn({ "reload", "--url", r.url, "--admin-api-key", "adm", "--policy-opt", "nope=1" })
    assert.equal(1, H.wait_stopped(p))
    assert.truthy(p.out:find("has no option 'nope'", 1, true), p.out)
    os.remove(code_file)
  end)
end)

describe("policy reload in PD mode", function()
  teardown(H.stop_all)

  it("reloads the pool it is asked to and names the pools it has", function()
    local p1 = H.prefill_sim("p1")
    local d1 = H.sim({ "--id", "d1", "--role", "decode" })
    local r = H.router({ "--pd-disaggregation", "--prefill", p1.url, tostring(p1.bootstrap_port),
      "--decode", d1.url, "--policy", "round_robin" })
    local res = reload(r, { pool = "decode", policy = "random" })
    assert.equal(200, res.status, res.body)
    local pools = policy_state(r)
    assert.equal("round_robin", pools.prefill.name)
    assert.equal("random", pools.decode.name)
    res = reload(r, { pool = "regular", policy = "random" })
    assert.equal(422, res.status)
    assert.truthy(res.json.error.message:find("decode, prefill", 1, true), res.body)
    assert.equal(200, gen(r).status)
  end)
end)

describe("what select sees", function()
  teardown(H.stop_all)

  it("per request route, path, model, headers, client, max tokens, text; per worker its state", function()
    local w1 = H.sim({ "--id", "w1" })
    local file = H.tmpfile([[
local P = { name = "seer", version = "1.0.0", options = {} }
function P.new() return setmetatable({ seen = {} }, { __index = P }) end
function P:select(req, workers)
  local w = workers[1]
  self.seen[#self.seen + 1] = {
    route = req.route, path = req.path, model = req.model, tenant = req.headers["x-tenant"],
    client = req.client, max_tokens = req.max_tokens, text = req.text,
    url = w.url, role = w.role, load = w.load, healthy = w.healthy, circuit = w.circuit,
    labels = type(w.labels), latency = w.latency_ms, reported = w.reported_load,
  }
  return w
end
function P:stats() return { seen = self.seen } end
return P
]], ".lua")
    local r = H.router({ "--worker-urls", w1.url, "--policy", file })
    local body = { model = "m1", max_tokens = 7, messages = { { role = "user", content = "hi there" } } }
    assert.equal(200, assert(H.post(r.url, "/v1/chat/completions", body, { ["x-tenant"] = "t1" })).status)
    assert.equal(200, assert(H.get(r.url, "/get_loads")).status)
    assert.equal(200, gen(r, "second").status)
    local seen = H.list_workers(r).policy_stats.seen
    os.remove(file)
    local a, b = seen[1], seen[2]
    assert.equal("chat", a.route)
    assert.equal("/v1/chat/completions", a.path)
    assert.equal("m1", a.model)
    assert.equal("t1", a.tenant)
    assert.equal("127.0.0.1", a.client)
    assert.equal(7, a.max_tokens)
    assert.truthy(a.text:find("hi there", 1, true))
    assert.same({ w1.url, "regular", 0, true, "closed", "table" }, { a.url, a.role, a.load, a.healthy, a.circuit, a.labels })
    assert.is_false(a.latency)
    assert.is_false(a.reported)
    assert.equal("/generate", b.path)
    assert.equal(4, b.max_tokens)                   -- sampling_params.max_new_tokens
    assert.is_number(b.latency)
    assert.is_number(b.reported)
  end)
end)
