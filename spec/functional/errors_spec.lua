-- Clear JSON errors with the right status, and no effect on other requests.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

describe("router errors", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w1", "--decode-ms-per-token", "20" })
    r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--max-payload-size", "2000" })
  end)
  teardown(H.stop_all)

  local function expect_error(res, status, etype)
    assert.equal(status, res.status)
    assert.equal("application/json", res.headers["content-type"])
    assert.is_table(res.json, "body is not JSON: " .. res.body)
    assert.is_string(res.json.error.message)
    if etype then assert.equal(etype, res.json.error.type) end
  end

  it("answers 400 to malformed JSON", function()
    local res = assert(H.post(r.url, "/generate", '{"text": "unterminated'))
    expect_error(res, 400, "invalid_request_error")
    assert.truthy(res.json.error.message:find("JSON"))
  end)

  it("answers 400 to wrong field types", function()
    expect_error(assert(H.post(r.url, "/v1/chat/completions", '{"messages": "hi"}')), 400)
    expect_error(assert(H.post(r.url, "/generate", '{"text": "a", "stream": "yes"}')), 400)
    expect_error(assert(H.post(r.url, "/v1/completions", '{"max_tokens": 3}')), 400)
    expect_error(assert(H.post(r.url, "/generate", '[1, 2]')), 400)
  end)

  it("answers 404 to an unknown path and 405 to a wrong method", function()
    expect_error(assert(H.get(r.url, "/nope")), 404, "not_found")
    expect_error(assert(H.get(r.url, "/generate")), 405, "method_not_allowed")
    expect_error(assert(H.post(r.url, "/list_workers")), 405, "method_not_allowed")
  end)

  it("answers 413 to a body over --max-payload-size", function()
    local big = H.gen_body(string.rep("a", 5000))
    local res = assert(H.post(r.url, "/generate", big))
    expect_error(res, 413)
  end)

  it("answers 413 to a chunked body that grows past the limit", function()
    local chunk = string.rep("b", 1500)
    local req = "POST /generate HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n" ..
      string.format("%x\r\n%s\r\n", #chunk, chunk) .. string.format("%x\r\n%s\r\n", #chunk, chunk) .. "0\r\n\r\n"
    local out = H.raw(r.port, req)
    assert.truthy(out:match("^HTTP/1.1 413"))
  end)

  it("answers 400 to a malformed request line and keeps serving", function()
    local out = H.raw(r.port, "BLAH\r\n\r\n")
    assert.truthy(out:match("^HTTP/1.1 400"), out)
    assert.equal(200, assert(H.get(r.url, "/liveness")).status)
  end)

  it("does not disturb requests in flight when a client misbehaves", function()
    local body = cjson.encode({ text = "long", stream = true, sampling_params = { max_new_tokens = 15 } })
    local results = H.parallel({
      function() return H.post(r.url, "/generate", body) end,
      function()
        core.sleep(50)
        H.raw(r.port, "GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        H.raw(r.port, "POST /generate HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc", { close_after_ms = 20 })
        return H.post(r.url, "/generate", "{{{{")
      end,
    })
    local stream = results[1]
    assert.equal(200, stream.status)
    assert.truthy(stream.body:find("data: [DONE]", 1, true))
    assert.equal(400, results[2].status)
  end)
end)

describe("router with a worker that resets connections", function()
  teardown(H.stop_all)

  it("answers 502 when the worker drops the request", function()
    local w = H.sim({ "--id", "w", "--reset-rate", "1" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--disable-retries" })
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    assert.equal(502, res.status)
    assert.equal("worker_unreachable", res.json.error.type)
    assert.truthy(res.json.error.message:find("reset", 1, true))
  end)

  it("cuts the client's stream when the worker dies mid-stream", function()
    local w = H.sim({ "--id", "w", "--crash-after-tokens", "2", "--decode-ms-per-token", "5" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
    local res, err = H.post(r.url, "/generate", H.gen_body("x", { stream = true }))
    -- the response started (200) and then ended without its terminator
    assert.is_nil(res)
    assert.equal("reset", err)
    assert.equal(200, assert(H.get(r.url, "/liveness")).status)
  end)
end)

describe("router without workers", function()
  local r
  setup(function() r = H.router({ "--policy", "round_robin" }) end)
  teardown(H.stop_all)

  it("answers 503 when no worker is available", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("hi")))
    assert.equal(503, res.status)
    assert.equal("no_workers", res.json.error.type)
    assert.equal(503, assert(H.get(r.url, "/readiness")).status)
  end)
end)

describe("request bodies", function()
  local r
  setup(function() r = H.router({ "--policy", "round_robin" }) end)
  teardown(H.stop_all)

  it("are freed when their request is answered, not when the collector runs", function()
    local body = string.rep("a", 1024 * 1024)
    for _ = 1, 50 do
      assert.equal(404, assert(H.post(r.url, "/nope", body)).status)
    end
    -- 50 MB went through; with nothing in flight, no body is held
    assert.equal(0, H.metric(H.scrape(r), "sgl_router_request_body_bytes"))
  end)
end)
