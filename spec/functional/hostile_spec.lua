-- Clients that would hold the router's connections or memory: each is cut
-- off with an answer, and the router keeps serving everyone else.
local H = require "spec.helpers"
local core = require "sglr.core"

describe("hostile clients", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w1" })
    r = H.router({ "--worker-urls", w.url, "--policy", "round_robin",
      "--client-header-timeout-secs", "1", "--client-body-timeout-secs", "1",
      "--keepalive-timeout-secs", "1", "--max-connections", "8" })
  end)
  teardown(H.stop_all)

  local function status_of(out) return tonumber(out:match("^HTTP/1%.1 (%d+)")) end

  it("answer 408 to headers that never finish (slowloris)", function()
    local t0 = core.now()
    local out = H.raw(r.port, "POST /generate HTTP/1.1\r\nHost: r\r\nX-Slow: ", { timeout_ms = 5000 })
    assert.equal(408, status_of(out))
    assert.is_true(core.now() - t0 < 4000)
  end)

  it("answer 408 to a body that stalls", function()
    local out = H.raw(r.port, "POST /generate HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n{\"te",
      { timeout_ms = 5000 })
    assert.equal(408, status_of(out))
    assert.equal(200, assert(H.get(r.url, "/liveness")).status)
  end)

  it("answer 503 above --max-connections, and serve again once below", function()
    local uv = require "luv"
    local held = {}
    for i = 1, 8 do
      held[i] = uv.new_tcp()
      held[i]:connect("127.0.0.1", r.port, function() end)
    end
    -- the router sees the 8 (with the liveness checks of this spec, 8 or 9)
    local out
    H.wait_for(function()
      out = H.raw(r.port, "GET /liveness HTTP/1.1\r\nHost: r\r\n\r\n", { timeout_ms = 2000 })
      return status_of(out) == 503
    end, 5000, "a 503 above the cap")
    assert.truthy(out:find("too many client connections", 1, true))
    for _, t in ipairs(held) do t:close() end
    H.wait_for(function()
      local res = H.get(r.url, "/liveness")
      return res and res.status == 200
    end, 5000, "service below the cap")
  end)

  it("refuse what a strict HTTP/1.1 server refuses, with 400", function()
    for _, req in ipairs({
      "GET /liveness HTTP/1.1\r\n\r\n",
      "GET /liveness\r\n",
      "POST /generate HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n",
    }) do
      assert.equal(400, status_of(H.raw(r.port, req, { timeout_ms = 3000 })), req)
    end
  end)
end)

describe("huge prompts", function()
  local w, r
  setup(function()
    w = H.sim({ "--id", "w1" })
    r = H.router({ "--worker-urls", w.url, "--policy", "cache_aware" })
  end)
  teardown(H.stop_all)

  it("put at most 1 MiB of routing text in the cache-aware tree", function()
    local text = string.rep("lorem ipsum ", 700000)       -- 8.4 MB
    local res = assert(H.post(r.url, "/generate", H.gen_body(text)))
    assert.equal(200, res.status)
    local size = H.metric(H.scrape(r), ('sgl_router_tree_size{worker="%s"}'):format(w.url))
    assert.is_true(size > 0 and size <= 1024 * 1024, "tree holds " .. size)
  end)

  it("are checked off the loop and still refused when malformed", function()
    local body = '{"text": "' .. string.rep("x", 3 * 1024 * 1024) .. '", "stream": "yes"}'
    local res = assert(H.post(r.url, "/generate", body))
    assert.equal(400, res.status)
    assert.truthy(res.json.error.message:find("stream", 1, true))
  end)
end)

describe("request loops", function()
  local w, a, b
  setup(function()
    w = H.sim({ "--id", "w1" })
    a = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--disable-retries" })
    b = H.router({ "--worker-urls", a.url, "--policy", "round_robin", "--disable-retries" })
  end)
  teardown(H.stop_all)

  it("refuse the router itself as a worker", function()
    local res = assert(H.post(a.url, "/add_worker?url=" .. a.url, ""))
    assert.equal(400, res.status)
    assert.truthy(res.json.error.message:find("this router itself", 1, true))
  end)

  it("answer 508 when a request comes back through another router", function()
    -- b forwards to a; a is then given b as a worker: a request to a that
    -- a sends to b comes back to a and is stopped there
    assert.equal(200, assert(H.post(b.url, "/generate", H.gen_body("x"))).status)
    assert.equal(200, assert(H.post(a.url, "/remove_worker?url=" .. w.url, "")).status)
    assert.equal(200, assert(H.post(a.url, "/add_worker?url=" .. b.url, "")).status)
    local t0 = core.now()
    local res = assert(H.post(a.url, "/generate", H.gen_body("loop")))
    assert.equal(508, res.status)
    assert.is_true(core.now() - t0 < 5000)
  end)
end)
