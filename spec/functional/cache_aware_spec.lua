-- cache_aware and power_of_two against real sim workers, and the in-flight
-- load accounting they depend on.
local H = require "spec.helpers"
local cjson = require "cjson.safe"

local function prompt(i, len)
  -- a long shared-looking prompt unique by i
  return ("request %d: "):format(i) .. string.rep("lorem ipsum dolor sit amet ", len or 20)
end

describe("cache_aware routing", function()
  local ws, r
  setup(function()
    ws = {}
    local urls = {}
    for i = 1, 4 do
      ws[i] = H.sim({ "--id", "w" .. i })
      urls[i] = ws[i].url
    end
    local args = { "--policy", "cache_aware", "--worker-urls" }
    for _, u in ipairs(urls) do args[#args + 1] = u end
    r = H.router(args)
  end)
  teardown(H.stop_all)

  it("sends the same prompt to the same worker", function()
    local counts = {}
    local text = "You are a helpful assistant. " .. string.rep("Context paragraph. ", 50)
    for _ = 1, 12 do
      local res = assert(H.post(r.url, "/generate", H.gen_body(text)))
      assert.equal(200, res.status)
      local w = H.worker_of(res)
      counts[w] = (counts[w] or 0) + 1
    end
    local best = 0
    for _, n in pairs(counts) do best = math.max(best, n) end
    assert.is_true(best >= 10, cjson.encode(counts))
  end)

  it("follows a shared prefix to the worker that holds it", function()
    local system = "SYSTEM: " .. string.rep("shared instructions ", 40)
    local first = assert(H.post(r.url, "/v1/chat/completions", { messages = {
      { role = "system", content = system }, { role = "user", content = "question one" } } }))
    for i = 2, 6 do
      local res = assert(H.post(r.url, "/v1/chat/completions", { messages = {
        { role = "system", content = system }, { role = "user", content = "question " .. i } } }))
      assert.equal(H.worker_of(first), H.worker_of(res))
      -- the worker reports the shared prefix as cached
      assert.is_true(res.json.usage.prompt_tokens_details.cached_tokens > 0)
    end
  end)

  it("spreads unique prompts over every worker", function()
    local counts = {}
    local fns = {}
    for i = 1, 16 do
      fns[i] = function() return H.post(r.url, "/generate", H.gen_body(prompt(1000 + i))) end
    end
    for _, res in ipairs(H.parallel(fns)) do
      assert.equal(200, res.status)
      counts[H.worker_of(res)] = true
    end
    for i = 1, 4 do assert.is_true(counts["w" .. i], "w" .. i .. " got nothing") end
  end)

  it("forgets a removed worker's prefixes", function()
    local text = "removal test " .. string.rep("x y z ", 50)
    local first = H.worker_of(assert(H.post(r.url, "/generate", H.gen_body(text))))
    local url
    for i = 1, 4 do if "w" .. i == first then url = ws[i].url end end
    assert.equal(200, assert(H.post(r.url, "/remove_worker?url=" .. url)).status)
    local again = assert(H.post(r.url, "/generate", H.gen_body(text)))
    assert.equal(200, again.status)
    assert.are_not.equal(first, H.worker_of(again))
    assert.equal(200, assert(H.post(r.url, "/add_worker?url=" .. url)).status)
  end)

  it("shows its decisions in /list_workers", function()
    local st = H.list_workers(r).policy_stats
    assert.is_true(st.hits > 0)
    assert.is_true(st.misses > 0)
  end)
end)

describe("power_of_two routing", function()
  teardown(H.stop_all)

  it("avoids a worker that reports a high load", function()
    local busy = H.sim({ "--id", "busy", "--load-offset", "1000" })
    local idle = H.sim({ "--id", "idle" })
    local r = H.router({ "--policy", "power_of_two", "--worker-urls", busy.url, idle.url,
      "--worker-startup-check-interval", "0.1" })
    -- the load poll runs on the startup check interval: wait for the first
    local function polled()
      return (H.list_workers(r).policy_stats.polled_loads or {})[busy.url] == 1000
    end
    H.wait_for(polled, 5000, "the busy worker's polled load")
    for i = 1, 10 do
      local res = assert(H.post(r.url, "/generate", H.gen_body("p" .. i)))
      assert.equal("idle", H.worker_of(res))
    end
  end)
end)

describe("load accounting", function()
  teardown(H.stop_all)

  it("returns every worker's in-flight count to zero", function()
    local a = H.sim({ "--id", "a", "--decode-ms-per-token", "10" })
    local b = H.sim({ "--id", "b", "--decode-ms-per-token", "10", "--fail-rate", "0.5" })
    local c = H.sim({ "--id", "c", "--decode-ms-per-token", "10", "--crash-after-tokens", "3" })
    local r = H.router({ "--policy", "round_robin", "--worker-urls", a.url, b.url, c.url,
      "--retry-initial-backoff-ms", "1", "--cb-failure-threshold", "1000" })
    local stream = cjson.encode({ text = "s", stream = true, sampling_params = { max_new_tokens = 8 } })
    local plain = cjson.encode({ text = "p", sampling_params = { max_new_tokens = 4 } })
    local req = "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
      .. #stream .. "\r\n\r\n" .. stream
    local fns = {}
    for i = 1, 24 do
      local kind = i % 4
      fns[i] = function()
        if kind == 0 then return H.post(r.url, "/generate", stream)
        elseif kind == 1 then return H.post(r.url, "/generate", plain)
        elseif kind == 2 then return { aborted = H.raw(r.port, req, { close_after_ms = 25 }) }
        else return H.post(r.url, "/generate", "{broken") end
      end
    end
    local res = H.parallel(fns)
    assert.equal(24, #res)
    -- the router saw every kind of ending: completed, streamed, failed, cut
    H.wait_for(function()
      for _, w in ipairs(H.list_workers(r).workers) do
        if w.load ~= 0 then return false end
      end
      return true
    end, 3000, "loads back to zero")
    local total = 0
    for _, w in ipairs(H.list_workers(r).workers) do total = total + w.processed end
    assert.is_true(total >= 18)
  end)
end)
