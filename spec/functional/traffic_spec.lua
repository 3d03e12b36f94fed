-- Traffic control: concurrency queue, request timeout, request ids, CORS.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

local function slow_body(tokens)
  return cjson.encode({ text = "slow", sampling_params = { max_new_tokens = tokens } })
end

-- Wait until the router's /metrics shows the series at the value.
local function await_metric(r, series, value)
  H.wait_for(function() return H.metric(H.scrape(r), series) == value end, 5000, series .. " = " .. value)
end

describe("concurrency limit", function()
  teardown(H.stop_all)

  it("queues beyond the limit and answers 429 when the queue is full", function()
    local w = H.sim({ "--id", "w", "--decode-ms-per-token", "20" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin",
      "--max-concurrent-requests", "1", "--queue-size", "1", "--queue-timeout-secs", "30" })
    -- the first holds the slot, the second waits in the queue, the third
    -- finds the queue full
    local res = H.parallel({
      function() return H.post(r.url, "/generate", slow_body(10)) end,
      function()
        await_metric(r, "sgl_router_inflight_requests", 1)
        return H.post(r.url, "/generate", slow_body(10))
      end,
      function()
        await_metric(r, "sgl_router_rate_limit_queue_depth", 1)
        return H.post(r.url, "/generate", slow_body(10))
      end,
    })
    assert.equal(200, res[1].status)
    assert.equal(200, res[2].status)   -- waited in the queue
    assert.equal(429, res[3].status)
    assert.equal("rate_limited", res[3].json.error.type)
    -- health and admin routes are not limited: answered while the slot is
    -- taken and the queue is full
    local res2 = H.parallel({
      function() return H.post(r.url, "/generate", slow_body(10)) end,
      function()
        await_metric(r, "sgl_router_inflight_requests", 1)
        return H.post(r.url, "/generate", slow_body(10))
      end,
      function()
        await_metric(r, "sgl_router_rate_limit_queue_depth", 1)
        return { H.get(r.url, "/health"), H.get(r.url, "/list_workers") }
      end,
    })
    assert.equal(200, res2[1].status)
    assert.equal(200, res2[2].status)
    assert.equal(200, res2[3][1].status)
    assert.equal(200, res2[3][2].status)
  end)

  it("answers 408 to a request that waited past --queue-timeout-secs", function()
    local w = H.sim({ "--id", "w", "--decode-ms-per-token", "50" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin",
      "--max-concurrent-requests", "1", "--queue-size", "5", "--queue-timeout-secs", "0.2" })
    local res = H.parallel({
      function() return H.post(r.url, "/generate", slow_body(10)) end,
      function()
        await_metric(r, "sgl_router_inflight_requests", 1)
        return H.post(r.url, "/generate", slow_body(1))
      end,
    })
    assert.equal(200, res[1].status)
    assert.equal(408, res[2].status)
  end)

  it("holds the slot of a streaming request until the stream ends", function()
    local w = H.sim({ "--id", "w", "--decode-ms-per-token", "30" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin",
      "--max-concurrent-requests", "1", "--queue-size", "0" })
    local stream = cjson.encode({ text = "s", stream = true, sampling_params = { max_new_tokens = 10 } })
    local res = H.parallel({
      function() return H.post(r.url, "/generate", stream) end,
      function()
        -- the worker's response head is in: the stream is being passed on
        await_metric(r, 'sgl_router_time_to_first_byte_seconds_count{route="generate"}', 1)
        return H.post(r.url, "/generate", slow_body(1))
      end,
    })
    assert.equal(200, res[1].status)
    assert.truthy(res[1].body:find("[DONE]", 1, true))
    assert.equal(429, res[2].status)
  end)
end)

describe("request timeout", function()
  teardown(H.stop_all)

  it("answers 504 when the worker hangs", function()
    local w = H.sim({ "--id", "w", "--hang" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--request-timeout-secs", "0.5" })
    local t0 = core.now()
    local res = assert(H.post(r.url, "/generate", slow_body(1)))
    local dt = core.now() - t0
    assert.equal(504, res.status)
    assert.equal("timeout", res.json.error.type)
    assert.is_true(dt >= 450 and dt < 2000, "took " .. dt)
    -- the worker's load was released
    assert.equal(0, H.list_workers(r).workers[1].load)
  end)

  it("ends a stream that runs past the timeout with an SSE error event", function()
    local w = H.sim({ "--id", "w", "--decode-ms-per-token", "100" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--request-timeout-secs", "0.5" })
    local res = assert(H.post(r.url, "/generate",
      cjson.encode({ text = "s", stream = true, sampling_params = { max_new_tokens = 20 } })))
    assert.equal(200, res.status)
    assert.truthy(res.body:find('"type":"timeout"', 1, true), res.body)
    assert.is_nil(res.body:find("[DONE]", 1, true))
    assert.equal(0, H.list_workers(r).workers[1].load)
  end)
end)

describe("request ids", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w" })
    r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
  end)
  teardown(H.stop_all)

  it("propagates and echoes the client's id", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-request-id"] = "abc-123" }))
    assert.equal("abc-123", res.headers["x-request-id"])
    assert.equal("abc-123", res.headers["x-sim-request-id"])
    res = assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-trace-id"] = "trace-9" }))
    assert.equal("trace-9", res.headers["x-request-id"])
    assert.equal("trace-9", res.headers["x-sim-request-id"])
    -- an empty one is skipped for the next name; a long one passes whole
    res = assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-request-id"] = "", ["x-trace-id"] = "t-2" }))
    assert.equal("t-2", res.headers["x-request-id"])
    local long = ("abcdefgh"):rep(100)
    res = assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-correlation-id"] = long }))
    assert.equal(long, res.headers["x-request-id"])
    assert.equal(long, res.headers["x-sim-request-id"])
  end)

  it("generates SGLang-shaped ids when none is given", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    assert.truthy(res.headers["x-request-id"]:match("^gnt%-%w+$"))
    assert.equal(28, #res.headers["x-request-id"])
    res = assert(H.post(r.url, "/v1/chat/completions", { messages = { { role = "user", content = "x" } } }))
    assert.truthy(res.headers["x-request-id"]:match("^chatcmpl%-%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w%w$"))
    res = assert(H.post(r.url, "/v1/completions", { prompt = "x" }))
    assert.truthy(res.headers["x-request-id"]:match("^cmpl%-%w+$"))
    assert.equal(res.headers["x-request-id"], res.headers["x-sim-request-id"])
  end)

  it("honours --request-id-headers", function()
    local r2 = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--request-id-headers", "x-my-id" })
    local res = assert(H.post(r2.url, "/generate", H.gen_body("x"), { ["x-my-id"] = "mine", ["x-request-id"] = "other" }))
    assert.equal("mine", res.headers["x-request-id"])
  end)
end)

describe("CORS", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w" })
    r = H.router({ "--worker-urls", w.url, "--policy", "round_robin",
      "--cors-allowed-origins", "https://app.example.com" })
  end)
  teardown(H.stop_all)

  it("answers a preflight from an allowed origin", function()
    local res = assert(H.request(r.url, "OPTIONS", "/v1/chat/completions", nil, {
      origin = "https://app.example.com", ["access-control-request-method"] = "POST",
      ["access-control-request-headers"] = "content-type" }))
    assert.equal(204, res.status)
    assert.equal("https://app.example.com", res.headers["access-control-allow-origin"])
    assert.truthy(res.headers["access-control-allow-methods"]:find("POST", 1, true))
  end)

  it("refuses a preflight from another origin", function()
    local res = assert(H.request(r.url, "OPTIONS", "/v1/chat/completions", nil, {
      origin = "https://evil.example.com", ["access-control-request-method"] = "POST" }))
    assert.equal(403, res.status)
    assert.is_nil(res.headers["access-control-allow-origin"])
  end)

  it("adds CORS headers to responses for allowed origins only", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("x"), { origin = "https://app.example.com" }))
    assert.equal("https://app.example.com", res.headers["access-control-allow-origin"])
    res = assert(H.post(r.url, "/generate", H.gen_body("x"), { origin = "https://evil.example.com" }))
    assert.equal(200, res.status)
    assert.is_nil(res.headers["access-control-allow-origin"])
  end)
end)

describe("CORS not configured", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w" })
    r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
  end)
  teardown(H.stop_all)

  it("sends no CORS headers, whatever the Origin", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("x"), { origin = "https://any.example.com" }))
    assert.equal(200, res.status)
    assert.is_nil(res.headers["access-control-allow-origin"])
    res = assert(H.get(r.url, "/v1/models", { origin = "https://any.example.com" }))
    assert.is_nil(res.headers["access-control-allow-origin"])
  end)

  it("refuses preflights", function()
    local res = assert(H.request(r.url, "OPTIONS", "/v1/chat/completions", nil, {
      origin = "https://any.example.com", ["access-control-request-method"] = "POST",
      ["access-control-request-headers"] = "x-anything" }))
    assert.equal(403, res.status)
    assert.is_nil(res.headers["access-control-allow-origin"])
    assert.is_nil(res.headers["access-control-allow-headers"])
  end)
end)
