-- The worker registry fed by sources: each worker remembers where it came
-- from (/list_workers shows it), and removing a worker removes every
-- metric series of it, so workers that come and go (as pods do) never grow
-- /metrics.
local core = require "sglr.core"
local H = require "spec.helpers"

describe("worker registry", function()
  local w1, r
  local fakes = {}            -- tiny workers served by this spec: { url, srv }

  -- A worker on this spec's loop: healthy, answers /generate with 200, or
  -- with 503 when failing (which opens its circuit breaker: more series),
  -- after delay_ms.
  local function fake(failing, delay_ms)
    local f = {}
    f.srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local path = x:path()
      if path == "/health" then return x:respond(200, { ["content-type"] = "text/plain" }, "") end
      if delay_ms then core.sleep(delay_ms) end
      if failing then
        return x:respond(503, { ["content-type"] = "application/json" }, '{"error":"busy"}')
      end
      x:respond(200, { ["content-type"] = "application/json" }, '{"text":"ok","meta_info":{"id":"fake"}}')
    end))
    f.url = "http://127.0.0.1:" .. f.srv:port()
    return f
  end

  setup(function()
    w1 = H.sim({ "--id", "w1" })
    r = H.router({ "--worker-urls", w1.url, "--policy", "round_robin", "--disable-retries",
      "--cb-failure-threshold", "1", "--log-level", "warn" })
    for i = 1, 10 do fakes[i] = fake(i % 2 == 0) end
  end)
  teardown(function()
    for _, f in ipairs(fakes) do f.srv:close() end
    H.stop_all()
  end)

  local function view(url)
    for _, w in ipairs(H.list_workers(r).workers) do
      if w.url == url then return w end
    end
  end

  it("shows each worker's source in /list_workers", function()
    local v = view(w1.url)
    assert.equal("static", v.source)
    assert.equal(w1.url:match("//(.*)$"), v.address)
    assert.equal(200, assert(H.post(r.url, "/add_worker?url=" .. fakes[1].url)).status)
    assert.equal("admin", view(fakes[1].url).source)
    assert.equal(200, assert(H.post(r.url, "/remove_worker?url=" .. fakes[1].url)).status)
    assert.is_nil(view(fakes[1].url))
  end)

  -- The series lines of /metrics (comments dropped), and the keys (the
  -- series without their values).
  local function series(text)
    local lines, keys = {}, {}
    for line in text:gmatch("[^\n]+") do
      if line:sub(1, 1) ~= "#" then
        lines[#lines + 1] = line
        keys[#keys + 1] = line:match("^(%S+)")
      end
    end
    return lines, keys
  end

  local function cycle(f)
    local res = assert(H.post(r.url, "/add_worker?url=" .. f.url))
    assert.equal(200, res.status, res.body)
    -- round robin over w1 and f: one of the two requests reaches f
    for i = 1, 2 do assert(H.post(r.url, "/generate", H.gen_body("hello " .. i))) end
    res = assert(H.post(r.url, "/remove_worker?url=" .. f.url))
    assert.equal(200, res.status, res.body)
  end

  it("removes every series of a removed worker: 1,000 adds and removes do not grow /metrics", function()
    -- each fake once: every kind of per-worker series has been made (and
    -- removed) once, as have the per-route ones the traffic makes
    for _, f in ipairs(fakes) do cycle(f) end
    local warm_lines = series(H.scrape(r))
    for i = 1, 1000 - #fakes do cycle(fakes[i % #fakes + 1]) end
    local text = H.scrape(r)
    local lines, keys = series(text)
    for _, f in ipairs(fakes) do
      local left = {}
      for _, k in ipairs(keys) do
        if k:find(f.url, 1, true) then left[#left + 1] = k end
      end
      assert.same({}, left, "series left of " .. f.url)
    end
    assert.equal(#warm_lines, #lines)
    -- w1's own series are still there, and traffic was counted
    assert.truthy(text:find('sgl_router_processed_requests_total{worker="' .. w1.url .. '"}', 1, true))
    assert.equal(1, H.metric(text, "sgl_router_active_workers"))
    assert.same({ w1.url }, H.list_workers(r).urls)
  end)

  it("does not bring a removed worker's series back when a request in flight ends after it", function()
    local slow = fake(true, 300)
    fakes[#fakes + 1] = slow
    assert.equal(200, assert(H.post(r.url, "/add_worker?url=" .. slow.url)).status)
    -- two requests at once: round robin sends one to each worker
    local done = 0
    for i = 1, 2 do
      core.spawn(function()
        H.post(r.url, "/generate", H.gen_body("slow " .. i))
        done = done + 1
      end)
    end
    H.wait_for(function() return view(slow.url).load == 1 end, 5000, "a request on the slow worker")
    assert.equal(200, assert(H.post(r.url, "/remove_worker?url=" .. slow.url)).status)
    -- it fails (503) after its worker went: its breaker opens, unseen
    H.wait_for(function() return done == 2 end, 5000, "both requests")
    local text = H.scrape(r)
    assert.is_nil(text:find(slow.url, 1, true), "a series of the removed worker came back")
  end)
end)
