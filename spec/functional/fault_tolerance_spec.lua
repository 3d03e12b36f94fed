-- Retries, circuit breakers and health checks against sim workers with
-- injected faults.
local H = require "spec.helpers"
local core = require "sglr.core"

local function count_by_status(r, n, prefix)
  local by, workers = {}, {}
  for i = 1, n do
    local res = assert(H.post(r.url, "/generate", H.gen_body((prefix or "q") .. i)))
    by[res.status] = (by[res.status] or 0) + 1
    local w = H.worker_of(res)
    if w then workers[w] = (workers[w] or 0) + 1 end
  end
  return by, workers
end

local function worker_state(r, url)
  for _, w in ipairs(H.list_workers(r).workers) do
    if w.url == url then return w end
  end
end

describe("retries", function()
  teardown(H.stop_all)

  it("hide a failing worker among healthy ones", function()
    local good1, good2 = H.sim({ "--id", "good1" }), H.sim({ "--id", "good2" })
    local bad = H.sim({ "--id", "bad", "--fail-rate", "1", "--fail-status", "500" })
    local r = H.router({ "--worker-urls", good1.url, bad.url, good2.url, "--policy", "round_robin",
      "--retry-initial-backoff-ms", "1", "--cb-failure-threshold", "1000" })
    local by = count_by_status(r, 12)
    assert.same({ [200] = 12 }, by)
  end)

  it("let the worker's error through when disabled", function()
    local good = H.sim({ "--id", "good" })
    local bad = H.sim({ "--id", "bad", "--fail-rate", "1", "--fail-status", "500" })
    local r = H.router({ "--worker-urls", good.url, bad.url, "--policy", "round_robin",
      "--disable-retries", "--cb-failure-threshold", "1000" })
    local by = count_by_status(r, 6)
    assert.equal(3, by[200])
    assert.equal(3, by[500])
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    if res.status ~= 500 then res = assert(H.post(r.url, "/generate", H.gen_body("y"))) end
    assert.equal(500, res.status)
    assert.equal("injected failure", res.json.error.message)
  end)

  it("return the last worker error when every attempt fails", function()
    local b1 = H.sim({ "--id", "b1", "--fail-rate", "1", "--fail-status", "503" })
    local b2 = H.sim({ "--id", "b2", "--fail-rate", "1", "--fail-status", "503" })
    local r = H.router({ "--worker-urls", b1.url, b2.url, "--policy", "round_robin",
      "--retry-initial-backoff-ms", "1", "--retry-max-retries", "2", "--cb-failure-threshold", "1000" })
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    assert.equal(503, res.status)
    assert.equal("injected failure", res.json.error.message)
    -- three attempts in all, spread over both workers
    local s1 = assert(H.get(b1.url, "/sim/stats")).json.requests
    local s2 = assert(H.get(b2.url, "/sim/stats")).json.requests
    assert.equal(3, s1 + s2)
    assert.is_true(s1 >= 1 and s2 >= 1)
  end)

  it("back off between attempts", function()
    local b1 = H.sim({ "--id", "b1", "--fail-rate", "1", "--fail-status", "502" })
    local r = H.router({ "--worker-urls", b1.url, "--policy", "round_robin", "--retry-max-retries", "2",
      "--retry-initial-backoff-ms", "100", "--retry-backoff-multiplier", "2", "--retry-jitter-factor", "0",
      "--cb-failure-threshold", "1000" })
    local t0 = core.now()
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    local dt = core.now() - t0
    assert.equal(502, res.status)
    -- 100 ms + 200 ms of backoff
    assert.is_true(dt >= 290 and dt < 1500, "took " .. dt .. " ms")
  end)

  it("retry a worker that refuses connections on another worker", function()
    local good = H.sim({ "--id", "good" })
    local dead = H.sim({ "--id", "dead" })
    local r = H.router({ "--worker-urls", dead.url, good.url, "--policy", "round_robin",
      "--retry-initial-backoff-ms", "1", "--health-check-interval-secs", "3600" })
    H.stop(dead.proc)
    local by = count_by_status(r, 6)
    assert.same({ [200] = 6 }, by)
  end)
end)

describe("circuit breaker", function()
  teardown(H.stop_all)

  it("opens after the threshold, spares the others, and closes after a probe", function()
    local good = H.sim({ "--id", "good" })
    local bad = H.sim({ "--id", "bad", "--fail-rate", "1", "--fail-status", "500" })
    local r = H.router({ "--worker-urls", good.url, bad.url, "--policy", "round_robin", "--disable-retries",
      "--cb-failure-threshold", "3", "--cb-success-threshold", "2", "--cb-timeout-duration-secs", "0.5",
      "--cb-window-duration-secs", "60" })
    local by = count_by_status(r, 6)         -- 3 reach the bad worker
    assert.equal(3, by[500])
    assert.equal("open", worker_state(r, bad.url).circuit)
    assert.equal("closed", worker_state(r, good.url).circuit)
    -- while open, everything goes to the good worker
    local by2, workers = count_by_status(r, 6, "open")
    assert.same({ [200] = 6 }, by2)
    assert.same({ good = 6 }, workers)
    -- the worker recovers; after the timeout probes close the breaker
    assert.equal(200, assert(H.get(bad.url, "/sim/set?fail_rate=0")).status)
    core.sleep(600)
    local _, w3 = count_by_status(r, 6, "later")
    assert.is_true((w3.bad or 0) >= 2, "bad got " .. tostring(w3.bad))
    assert.equal("closed", worker_state(r, bad.url).circuit)
  end)

  it("reopens when the half-open probe fails", function()
    local bad = H.sim({ "--id", "bad", "--fail-rate", "1" })
    local good = H.sim({ "--id", "good" })
    local r = H.router({ "--worker-urls", bad.url, good.url, "--policy", "round_robin", "--disable-retries",
      "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "0.3" })
    local function served() return assert(H.get(bad.url, "/sim/stats")).json.requests end
    count_by_status(r, 4)
    assert.equal("open", worker_state(r, bad.url).circuit)
    assert.equal(2, served())
    core.sleep(350)   -- the open timeout elapses (the breaker keeps time, not events)
    -- half-open: one probe reaches the bad worker and fails; the breaker
    -- reopens, so the other requests go to the good worker
    local by, workers = count_by_status(r, 3, "probe")
    assert.equal(3, served())
    assert.same({ [200] = 2, [500] = 1 }, by)
    assert.same({ bad = 1, good = 2 }, workers)
    assert.equal("open", worker_state(r, bad.url).circuit)
  end)

  it("answers 503 when every circuit is open", function()
    local bad = H.sim({ "--id", "bad", "--fail-rate", "1" })
    local r = H.router({ "--worker-urls", bad.url, "--policy", "round_robin", "--disable-retries",
      "--cb-failure-threshold", "2", "--cb-timeout-duration-secs", "60" })
    count_by_status(r, 2)
    local res = assert(H.post(r.url, "/generate", H.gen_body("x")))
    assert.equal(503, res.status)
    assert.truthy(res.json.error.message:find("circuits open", 1, true), res.json.error.message)
  end)

  it("does not count client errors against the worker", function()
    local w = H.sim({ "--id", "w", "--fail-rate", "1", "--fail-status", "400" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin", "--cb-failure-threshold", "2" })
    local by = count_by_status(r, 5)
    assert.same({ [400] = 5 }, by)
    assert.equal("closed", worker_state(r, w.url).circuit)
  end)
end)

describe("health checks", function()
  teardown(H.stop_all)

  it("mark a killed worker unhealthy and readmit it when it comes back", function()
    local a = H.sim({ "--id", "a" })
    local b = H.sim({ "--id", "b" })
    local r = H.router({ "--worker-urls", a.url, b.url, "--policy", "round_robin",
      "--health-check-interval-secs", "0.1", "--health-failure-threshold", "2",
      "--health-success-threshold", "2", "--health-check-timeout-secs", "1" })
    H.stop(b.proc)
    H.wait_for(function() return worker_state(r, b.url).healthy == false end, 5000, "b unhealthy")
    local res = assert(H.get(r.url, "/health"))
    assert.equal(503, res.status)
    assert.same({ b.url }, res.json.error.unhealthy)
    -- unhealthy workers stay registered and get no traffic
    assert.equal(2, #H.list_workers(r).urls)
    local by, workers = count_by_status(r, 4)
    assert.same({ [200] = 4 }, by)
    assert.same({ a = 4 }, workers)
    -- restart on the same port
    local p = H.spawn({ "sim-worker", "--port", tostring(b.port), "--id", "b" })
    H.wait_output(p, "listening")
    H.wait_for(function() return worker_state(r, b.url).healthy end, 5000, "b healthy again")
    assert.equal(200, assert(H.get(r.url, "/health")).status)
    local _, w2 = count_by_status(r, 4, "back")
    assert.equal(2, w2.b)
  end)

  it("follow the worker's /health answer", function()
    local a = H.sim({ "--id", "a" })
    local r = H.router({ "--worker-urls", a.url, "--policy", "round_robin",
      "--health-check-interval-secs", "0.1", "--health-failure-threshold", "1" })
    assert.equal(200, assert(H.get(a.url, "/sim/set?healthy=0")).status)
    H.wait_for(function() return worker_state(r, a.url).healthy == false end, 5000, "unhealthy")
    assert.equal(503, assert(H.get(r.url, "/readiness")).status)
    assert.equal(503, assert(H.post(r.url, "/generate", H.gen_body("x"))).status)
  end)

  it("start with the healthy workers when one never comes up", function()
    local a = H.sim({ "--id", "a" })
    local r = H.router({ "--worker-urls", a.url, "http://127.0.0.1:1", "--policy", "round_robin",
      "--worker-startup-timeout-secs", "0.5" })
    assert.truthy(r.proc.out:find("http://127.0.0.1:1", 1, true))
    assert.is_false(worker_state(r, "http://127.0.0.1:1").healthy)
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x"))).status)
  end)

  it("exit with a clear message when no worker comes up", function()
    local p = H.spawn({ "run", "--port", "0", "--prometheus-port", "0", "--worker-urls", "http://127.0.0.1:1",
      "--worker-startup-timeout-secs", "0.3", "--worker-startup-check-interval", "0.1" })
    local code = H.wait_stopped(p, 10000)
    assert.equal(1, code)
    assert.truthy(p.out:find("none of the workers became healthy", 1, true))
  end)
end)
