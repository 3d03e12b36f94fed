-- The router's HTTP surface against real sim workers: inference routes,
-- streaming, fan-out and informational endpoints.
local H = require "spec.helpers"
local cjson = require "cjson.safe"

describe("router endpoints", function()
  local w1, w2, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2", "--decode-ms-per-token", "30" })
    r = H.router({ "--worker-urls", w1.url, w2.url, "--policy", "round_robin" })
  end)
  teardown(H.stop_all)

  it("routes /generate and returns the worker's status, content-type and body", function()
    local res = assert(H.post(r.url, "/generate", H.gen_body("hello there")))
    assert.equal(200, res.status)
    assert.equal("application/json", res.headers["content-type"])
    assert.equal("tok1 tok2 tok3 tok4", res.json.text)
    assert.equal(4, res.json.meta_info.completion_tokens)
  end)

  it("alternates workers with round_robin", function()
    local seen = {}
    for i = 1, 4 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("q" .. i)))
      seen[#seen + 1] = H.worker_of(res)
    end
    assert.are_not.equal(seen[1], seen[2])
    assert.equal(seen[1], seen[3])
    assert.equal(seen[2], seen[4])
  end)

  it("routes /v1/chat/completions in the OpenAI shape", function()
    local res = assert(H.post(r.url, "/v1/chat/completions", {
      model = "sim-model", max_tokens = 3,
      messages = { { role = "system", content = "be brief" }, { role = "user", content = "hi" } } }))
    assert.equal(200, res.status)
    assert.equal("chat.completion", res.json.object)
    assert.equal("assistant", res.json.choices[1].message.role)
    assert.equal(3, res.json.usage.completion_tokens)
    assert.is_number(res.json.usage.prompt_tokens_details.cached_tokens)
  end)

  it("routes /v1/completions", function()
    local res = assert(H.post(r.url, "/v1/completions", { prompt = "once upon", max_tokens = 2 }))
    assert.equal(200, res.status)
    assert.equal("text_completion", res.json.object)
    assert.equal("tok1 tok2", res.json.choices[1].text)
  end)

  it("streams SSE chunks as the worker sends them", function()
    -- pin to the slow worker (30 ms per token): 10 tokens take ~300 ms, the
    -- first chunk must arrive long before the stream ends
    local body = cjson.encode({ text = "stream me", stream = true, sampling_params = { max_new_tokens = 10 } })
    local res
    for _ = 1, 2 do
      res = assert(H.post(r.url, "/generate", body))
      if H.worker_of(res) == "w2" then break end
    end
    assert.equal("w2", H.worker_of(res))
    assert.equal(200, res.status)
    assert.equal("text/event-stream", res.headers["content-type"])
    assert.truthy(res.body:find("data: [DONE]", 1, true))
    local events = 0
    for _ in res.body:gmatch("data: {") do events = events + 1 end
    assert.equal(10, events)
    assert.is_true(res.first_body_ms < res.total_ms - 150,
      ("first chunk at %.0f ms, end at %.0f ms"):format(res.first_body_ms, res.total_ms))
  end)

  it("streams chat completions ending in [DONE]", function()
    local res = assert(H.post(r.url, "/v1/chat/completions", { stream = true, max_tokens = 2,
      messages = { { role = "user", content = "hi" } } }))
    assert.equal(200, res.status)
    assert.truthy(res.body:find('"delta"', 1, true))
    assert.truthy(res.body:match("data: %[DONE%]\n\n$"))
  end)

  it("answers /health, /liveness and /readiness", function()
    local res = assert(H.get(r.url, "/health"))
    assert.equal(200, res.status)
    assert.equal(200, assert(H.get(r.url, "/liveness")).status)
    res = assert(H.get(r.url, "/readiness"))
    assert.equal(200, res.status)
    assert.same({ status = "ready", healthy_workers = 2, total_workers = 2 }, res.json)
  end)

  it("proxies informational GETs to a healthy worker", function()
    for _, path in ipairs({ "/health_generate", "/get_server_info", "/get_model_info", "/v1/models" }) do
      local res = assert(H.get(r.url, path))
      assert.equal(200, res.status, path)
    end
    assert.equal(1, assert(H.get(r.url, "/get_server_info")).json.dp_size)
    assert.equal("sim-model", assert(H.get(r.url, "/v1/models")).json.data[1].id)
  end)

  it("flushes the cache on all workers", function()
    local res = assert(H.post(r.url, "/flush_cache"))
    assert.equal(200, res.status)
    assert.truthy(res.body:find("Cache flushed on all servers", 1, true))
  end)

  it("reports each worker's load", function()
    local res = assert(H.get(r.url, "/get_loads"))
    assert.equal(200, res.status)
    assert.equal(2, #res.json.workers)
    for _, e in ipairs(res.json.workers) do
      assert.equal(0, e.load)
      assert.truthy(e.worker == w1.url or e.worker == w2.url)
    end
  end)

  it("lists workers", function()
    local lw = H.list_workers(r)
    assert.same({ w1.url, w2.url }, lw.urls)
    assert.is_true(lw.workers[1].healthy)
  end)
end)

describe("router with an unreachable worker", function()
  local w1, dead, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    dead = H.sim({ "--id", "dead" })
    r = H.router({ "--worker-urls", w1.url, dead.url, "--policy", "round_robin",
      "--disable-retries", "--health-check-interval-secs", "3600" })
    H.stop(dead.proc)
  end)
  teardown(H.stop_all)

  it("answers 502 with a JSON error when the chosen worker is down", function()
    local statuses = {}
    for i = 1, 2 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("x" .. i)))
      statuses[res.status] = res
    end
    assert.truthy(statuses[200])
    local bad = assert(statuses[502], "expected one 502")
    assert.equal("worker_unreachable", bad.json.error.type)
  end)

  it("reports -1 for an unreachable worker's load", function()
    local res = assert(H.get(r.url, "/get_loads"))
    local by = {}
    for _, e in ipairs(res.json.workers) do by[e.worker] = e.load end
    assert.equal(0, by[w1.url])
    assert.equal(-1, by[dead.url])
  end)

  it("answers /flush_cache with 500 when a worker fails", function()
    local res = assert(H.post(r.url, "/flush_cache"))
    assert.equal(500, res.status)
    assert.equal(1, #res.json.error.workers)
  end)
end)
