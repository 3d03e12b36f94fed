-- The PD dispatcher (flow.lua: pd.pick, pd.dispatch) against a fake
-- runtime: a fake client exchange whose relay_pd returns a scripted PD
-- exchange, a real worker registry with prefill and decode workers, and
-- policies that record what they are asked.
local flow_mod = require "sglr.flow"
local workers_mod = require "sglr.workers"
local retry = require "sglr.retry"
local stats = require "sglr.stats"
local router = require "sglr.router"

local pd = flow_mod.pd

-- failures a worker's breaker has recorded
local function fails(w) return #w.breaker.failures end

local function recording_policy(name)
  local p = { name = name, asked = {}, done = {} }
  function p.select(self, _, workers)
    local roles = {}
    for i, w in ipairs(workers) do roles[i] = w.role end
    self.asked[#self.asked + 1] = roles
    return workers[1]
  end
  function p.on_done(self, _, w, status)
    self.done[#self.done + 1] = { url = w.url, status = status }
  end
  return p
end

-- A flow over one prefill and one decode worker (plus spares).
local function setup(opts)
  opts = opts or {}
  local conf = { retry_initial_backoff_ms = 1 }
  local r = { conf = conf, cors_check = false, merge = router.merge, retry = retry.new(conf),
    limiter = { acquire = function() return true end, release = function() end, depth = function() return 0 end } }
  r.sent = {}
  function r.send_error(_, _, status, message) r.sent[#r.sent + 1] = { status = status, message = message } end
  r.workers = workers_mod.new(conf, { added = function(w) w.m = stats.for_worker(w.url, "t", w.role) end })
  r.prefill = assert(r.workers:add(opts.prefill_url or "http://127.0.0.1:9101", { role = "prefill",
    bootstrap_port = opts.bootstrap_port }))
  r.decode = assert(r.workers:add("http://127.0.0.1:9201", { role = "decode" }))
  r.policy, r.dpolicy = recording_policy("p"), recording_policy("d")
  r.flow = flow_mod.new(r)
  local req = { route = "generate", id = "req-1", t0 = require("sglr.core").now(), retries = 0,
    rs = stats.for_route("generate"), extra = {}, stream = false, policy = r.policy, dpolicy = r.dpolicy,
    pd_shape = 0 }      -- as pd.prepare leaves it: batch 0 (one prompt), no flags
  return r, req
end

-- A client exchange whose relay_pd answers with `script`: either
-- { err = ..., leg = ... } or the PD exchange's results.
local function fake_x(script)
  local x = { responded = nil, calls = {} }
  function x.relay_pd(_, ppool, dpool, _, _, _, _, _, _, _, host, port)
    x.calls[#x.calls + 1] = { prefill = ppool:url(), decode = dpool:url(), host = host, port = port }
    if script.err then return nil, script.err, script.leg end
    local closed = false
    local pdx = {}
    function pdx.prefill_status() return script.prefill_status or 200 end
    function pdx.status() return script.decode_status or 200 end
    function pdx.read_prefill() return script.prefill_body or "" end
    function pdx.prefill_header() return "application/json" end
    function pdx.read() return script.decode_body or "" end
    function pdx.header() return "application/json" end
    function pdx.pipe()
      x.piped = true
      return script.pipe_ok ~= false or nil, script.pipe_err, script.pipe_err and "decode" or nil,
        script.prefill_result or "ok", script.decode_result or "ok"
    end
    function pdx.outcome() return script.prefill_result or "ok", script.decode_result or "ok" end
    function pdx.close() closed = true end
    x.pdx_closed = function() return closed end
    return pdx, script.prefill_status or 200, script.decode_status or 200
  end
  function x.respond(_, status, _, body) x.responded = { status = status, body = body } end
  function x.state() return x.responded and "done" or "handling" end
  function x.write() end
  function x.finish() end
  function x.abort() x.aborted = true end
  function x.closed() return false end
  return x
end

local function dispatch(r, req, x)
  local now = require("sglr.core").now()
  local pw, dw = pd.pick(r.flow, req, now)
  assert(pw and dw, "pick found no pair")
  return pd.dispatch(r.flow, x, req, now + 10000, true, pw, dw)
end

describe("PD dispatcher", function()
  it("picks the prefill with the prefill policy and the decode with the decode policy", function()
    local r, req = setup()
    local pw, dw = pd.pick(r.flow, req, require("sglr.core").now())
    assert.equal(r.prefill, pw)
    assert.equal(r.decode, dw)
    assert.same({ { "prefill" } }, r.policy.asked)
    assert.same({ { "decode" } }, r.dpolicy.asked)
  end)

  it("tells the legs the prefill's host (IPv6 in brackets) and bootstrap port", function()
    local r, req = setup({ prefill_url = "http://[::1]:9101", bootstrap_port = 8998 })
    local x = fake_x({})
    assert.equal("done", dispatch(r, req, x))
    assert.equal("[::1]", x.calls[1].host)
    assert.equal(8998, x.calls[1].port)
    -- no bootstrap port: null on the wire (nil here)
    local r2, req2 = setup()
    local x2 = fake_x({})
    dispatch(r2, req2, x2)
    assert.equal("127.0.0.1", x2.calls[1].host)
    assert.is_nil(x2.calls[1].port)
  end)

  it("settles both legs with their own policies on success", function()
    local r, req = setup()
    local x = fake_x({})
    assert.equal("done", dispatch(r, req, x))
    assert.is_true(x.piped)
    assert.same({ { url = r.prefill.url, status = 200 } }, r.policy.done)
    assert.same({ { url = r.decode.url, status = 200 } }, r.dpolicy.done)
    assert.equal(0, r.prefill.load)
    assert.equal(0, r.decode.load)
    assert.equal("closed", r.prefill.breaker.state)
  end)

  it("retries elsewhere on a retryable prefill status, without blaming the decode", function()
    local r, req = setup()
    local x = fake_x({ prefill_status = 503, prefill_body = '{"error":"busy"}' })
    local verdict, status, body = dispatch(r, req, x)
    assert.equal("retry", verdict)
    assert.equal(503, status)
    assert.equal('{"error":"busy"}', body)
    assert.is_true(x.pdx_closed())          -- the decode leg was cancelled
    assert.is_true(req.failed[r.prefill.url])
    assert.is_nil(req.failed[r.decode.url])
    assert.equal(1, fails(r.prefill))
    assert.equal(0, fails(r.decode))
    assert.equal(0, r.decode.load)
  end)

  it("answers with a non-retryable prefill status and body at once", function()
    local r, req = setup()
    local x = fake_x({ prefill_status = 400, prefill_body = '{"error":"bad prompt"}' })
    assert.equal("done", dispatch(r, req, x))
    assert.same({ status = 400, body = '{"error":"bad prompt"}' }, x.responded)
    assert.is_nil(x.piped)
  end)

  it("retries a transport failure on the decode leg, avoiding only the decode", function()
    local r, req = setup()
    local x = fake_x({ err = "connect", leg = "decode" })
    local verdict, status = dispatch(r, req, x)
    assert.equal("retry", verdict)
    assert.equal(502, status)
    assert.is_true(req.failed[r.decode.url])
    assert.is_nil(req.failed[r.prefill.url])
    assert.equal(1, fails(r.decode))
    assert.equal(0, fails(r.prefill))
  end)

  it("does not retry a timeout, and answers 400 for a body PD cannot split", function()
    local r, req = setup()
    assert.equal("fail", (dispatch(r, req, fake_x({ err = "timeout", leg = "prefill" }))))
    local r2, req2 = setup()
    assert.equal("done", dispatch(r2, req2, fake_x({ err = "bad_request", leg = "empty batch" })))
    assert.same({ { status = 400, message = "empty batch" } }, r2.sent)
    assert.equal(0, fails(r2.prefill))
  end)

  it("lets a client that left cancel both legs without blaming either worker", function()
    local r, req = setup()
    assert.equal("done", dispatch(r, req, fake_x({ err = "client_closed", leg = "decode" })))
    assert.equal("client_closed", req.error)
    assert.equal(0, fails(r.prefill) + fails(r.decode))
    assert.equal(0, r.prefill.load + r.decode.load)
  end)
end)
