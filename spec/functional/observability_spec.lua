-- Metrics and logs: counters move by exactly what a known sequence of
-- requests should cause; promtool accepts the exposition; logs land in
-- --log-dir, one access line per request, valid JSON with --log-json.
local H = require "spec.helpers"
local cjson = require "cjson.safe"

local scrape, metric = H.scrape, H.metric

describe("metrics", function()
  local good, bad, r
  setup(function()
    good = H.sim({ "--id", "good" })
    bad = H.sim({ "--id", "bad", "--fail-first", "1", "--fail-status", "500" })
    r = H.router({ "--worker-urls", good.url, bad.url, "--policy", "round_robin",
      "--retry-initial-backoff-ms", "1", "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "60" })
  end)
  teardown(H.stop_all)

  it("count requests, retries, errors and breaker transitions exactly", function()
    local before = scrape(r)
    -- 1: good worker; 2: bad worker fails once -> retried on good
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("a"))).status)
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("b"))).status)
    -- a client error
    assert.equal(400, assert(H.post(r.url, "/generate", "{bad")).status)
    -- open the bad worker's breaker: make it fail twice more
    assert.equal(200, assert(H.get(bad.url, "/sim/set?fail_rate=1")).status)
    for i = 1, 4 do H.post(r.url, "/v1/completions", { prompt = "c" .. i }) end
    local after = scrape(r)
    local d = function(s) return metric(after, s) - metric(before, s) end
    assert.equal(3, d('sgl_router_requests_total{route="generate"}'))
    assert.equal(4, d('sgl_router_requests_total{route="completions"}'))
    assert.equal(1, d('sgl_router_request_errors_total{route="generate",error_type="bad_request"}'))
    assert.is_true(d('sgl_router_retries_total{route="generate"}') == 1)
    assert.equal(1, d(('sgl_router_cb_state_transitions_total{worker="%s",from="closed",to="open"}'):format(bad.url)))
    assert.equal(1, metric(after, ('sgl_router_cb_state{worker="%s"}'):format(bad.url)))
    assert.equal(0, metric(after, ('sgl_router_cb_state{worker="%s"}'):format(good.url)))
    assert.equal(2, metric(after, "sgl_router_active_workers"))
    assert.equal(1, metric(after, ('sgl_router_worker_health{worker="%s"}'):format(good.url)))
    assert.equal(0, metric(after, ('sgl_router_running_requests{worker="%s"}'):format(good.url)))
    assert.equal(3, d('sgl_router_request_duration_seconds_count{route="generate"}'))
    assert.is_true(d(('sgl_router_processed_requests_total{worker="%s"}'):format(good.url)) >= 5)
    assert.is_true(d(('sgl_router_policy_decisions_total{policy="round_robin",worker="%s"}'):format(good.url)) >= 5)
  end)

  it("pass promtool check metrics", function()
    local text = scrape(r)
    local file = H.tmpfile(text, ".prom")
    local ok, _, code = os.execute("promtool check metrics < " .. file .. " > " .. file .. ".out 2>&1")
    local out = io.open(file .. ".out"):read("*a")
    os.remove(file)
    os.remove(file .. ".out")
    assert.is_true(ok == true or ok == 0, "promtool: " .. out .. tostring(code))
  end)

  it("serve only /metrics on the metrics listener", function()
    local res = assert(H.get("http://127.0.0.1:" .. r.metrics_port, "/other"))
    assert.equal(404, res.status)
  end)
end)

describe("cache_aware decision metrics", function()
  teardown(H.stop_all)

  it("count a cache miss and a hit, and the matched prefix share", function()
    local a, b = H.sim({ "--id", "a" }), H.sim({ "--id", "b" })
    local r = H.router({ "--worker-urls", a.url, b.url, "--policy", "cache_aware" })
    local before = scrape(r)
    local text = string.rep("shared prefix text ", 20)
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body(text))).status)   -- miss
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body(text))).status)   -- hit
    local after = scrape(r)
    local d = function(s) return metric(after, s) - metric(before, s) end
    assert.equal(1, d("sgl_router_cache_misses_total"))
    assert.equal(1, d("sgl_router_cache_hits_total"))
    assert.equal(2, d("sgl_router_cache_match_ratio_count"))
    assert.equal(#text, d('sgl_router_cache_prefix_chars_total{result="hit"}'))
    assert.equal(#text, d('sgl_router_cache_prefix_chars_total{result="miss"}'))
    assert.equal(1, d('sgl_router_cache_match_ratio_bucket{le="0.05"}'))
    -- tree size per worker: the text was recorded under one worker
    local sa = metric(after, ('sgl_router_tree_size{worker="%s"}'):format(a.url))
    local sb = metric(after, ('sgl_router_tree_size{worker="%s"}'):format(b.url))
    assert.equal(#text, sa + sb)
  end)

  it("let a policy register its own metrics through rt.metrics", function()
    local w = H.sim({ "--id", "w" })
    local file = H.tmpfile([[
local P = { name = "counting", version = "1.0.0", options = {} }
function P.new(conf, rt)
  local self = setmetatable({}, { __index = P })
  self.picks = rt.metrics.counter("my_policy_picks_total", "Picks by my policy.", { "route" })
  return self
end
function P:select(req, workers)
  self.picks:inc(1, req.route)
  return workers[1]
end
return P
]], ".lua")
    local r = H.router({ "--worker-urls", w.url, "--policy", file })
    for i = 1, 3 do assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x" .. i))).status) end
    os.remove(file)
    assert.equal(3, metric(scrape(r), 'my_policy_picks_total{route="generate"}'))
  end)
end)

describe("logs", function()
  local dir
  setup(function()
    dir = os.tmpname()
    os.remove(dir)
  end)
  teardown(function()
    H.stop_all()
    os.execute("rm -rf " .. dir)
  end)

  it("write one JSON access line per request to the daily file in --log-dir", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--log-json", "--log-dir", dir })
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-request-id"] = "req-one" })).status)
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x", { stream = true }),
      { ["x-request-id"] = "req-two" })).status)
    assert.equal(404, assert(H.get(r.url, "/nope")).status)
    local file = dir .. "/sglr.log." .. os.date("!%Y-%m-%d")
    local lines
    H.wait_for(function()
      local f = io.open(file)
      if not f then return false end
      local text = f:read("*a")
      f:close()
      lines = {}
      for l in text:gmatch("[^\n]+") do lines[#lines + 1] = l end
      local n = 0
      for _, l in ipairs(lines) do if l:find('"msg":"request"', 1, true) then n = n + 1 end end
      return n >= 3
    end, 5000, "access lines in " .. file)
    local access = {}
    for _, l in ipairs(lines) do
      local rec = cjson.decode(l)
      assert.is_table(rec, "not JSON: " .. l)
      assert.is_string(rec.level)
      if rec.msg == "request" then access[#access + 1] = rec end
    end
    -- the two inference requests and the 404 (the startup health probes
    -- are the router's own, not requests it served)
    assert.equal(3, #access)
    assert.equal("/nope", access[3].route)
    assert.equal(404, access[3].status)
    assert.equal("req-one", access[1].request_id)
    assert.equal("generate", access[1].route)
    assert.equal(w.url, access[1].worker)
    assert.equal(200, access[1].status)
    assert.equal(false, access[1].stream)
    assert.equal(0, access[1].retries)
    assert.is_number(access[1].duration_ms)
    assert.equal(true, access[2].stream)
  end)

  it("print human-readable lines on stderr by default", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-request-id"] = "visible-id" })).status)
    H.wait_for(function() return r.proc.out:find("request_id=visible-id", 1, true) end, 3000, "access line")
    assert.truthy(r.proc.out:match("info%s+request .*status=200"))
  end)

  it("keep a request's warning before its access line (access lines are queued per loop turn)", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--disable-retries" })
    assert.equal(200, assert(H.get(w.url, "/sim/set?reset_rate=1")).status)
    assert.equal(502, assert(H.post(r.url, "/generate", H.gen_body("x"), { ["x-request-id"] = "order-id" })).status)
    H.wait_for(function() return r.proc.out:find("request_id=order-id retries=0", 1, true) end, 3000, "access line")
    local warn_at = r.proc.out:find("worker request failed", 1, true)
    local access_at = r.proc.out:find("info  request duration_ms=[%d.]+ error=")
    assert.truthy(warn_at and access_at)
    assert.truthy(warn_at < access_at)
  end)

  it("log the status of a request whose body is validated on the thread pool (over 1 MB)", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
    local body = H.gen_body(string.rep("a", 1536 * 1024))
    assert.equal(200, assert(H.post(r.url, "/generate", body, { ["x-request-id"] = "big-id" })).status)
    assert.equal(400, assert(H.post(r.url, "/generate", "{" .. string.rep(" ", 1536 * 1024),
      { ["x-request-id"] = "big-bad" })).status)
    H.wait_for(function() return r.proc.out:find("request_id=big-bad", 1, true) end, 3000, "access lines")
    assert.truthy(r.proc.out:find("request_id=big-id retries=0 route=generate status=200", 1, true))
    assert.truthy(r.proc.out:find("error=bad_request request_id=big-bad retries=0 route=generate status=400", 1, true))
  end)

  it("log worker state changes", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--health-check-interval-secs", "0.1",
      "--health-failure-threshold", "1" })
    H.get(w.url, "/sim/set?healthy=0")
    H.wait_for(function() return r.proc.out:find("worker unhealthy", 1, true) end, 3000, "unhealthy log")
    assert.equal(200, assert(H.post(r.url, "/remove_worker?url=" .. w.url)).status)
    H.wait_for(function() return r.proc.out:find("worker removed", 1, true) end, 3000, "removed log")
  end)
end)

describe("upstream replays", function()
  teardown(H.stop_all)

  it("count and log a request sent again after a reused connection failed unanswered", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--disable-retries",
      "--log-level", "debug" })
    local series = ('sgl_router_upstream_replays_total{worker="%s"}'):format(w.url)
    -- leaves an idle keep-alive connection to the worker in the router's pool
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("a"))).status)
    assert.equal(0, metric(scrape(r), series))
    assert.truthy(scrape(r):find(series .. " 0", 1, true))
    -- the worker now drops every inference connection unanswered: the
    -- request fails on the reused connection, goes out once more on a new
    -- one (retries are disabled: this is below them), and fails there too
    assert.equal(200, assert(H.get(w.url, "/sim/set?reset_rate=1")).status)
    assert.equal(502, assert(H.post(r.url, "/generate", H.gen_body("b"))).status)
    assert.equal(3, assert(H.get(w.url, "/sim/stats")).json.requests)
    assert.equal(1, metric(scrape(r), series))
    H.wait_for(function() return r.proc.out:find("upstream " .. w.url .. ": a reused keep-alive", 1, true) end,
      3000, "replay log line")
  end)
end)
