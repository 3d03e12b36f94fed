-- sglr launch: N sim workers and the router started by one command; what a
-- client sees, and which processes are left after a crash, a stop and a
-- SIGKILL of the launcher (read from /proc by pid).
local H = require "spec.helpers"
local core = require "sglr.core"
local proc = require "sglr.proc"
local uv = require "luv"

-- (`sglr` in a worker command is the launcher's own binary)
local SIM_CMD = "sglr sim-worker --port {port} --id r{rank}"

-- launch(n, extra, worker_flags, opts) -> { proc, url, workers = { r0 = { pid, url } }, router_pid }
-- opts.cmd: the worker command template; opts.group: the launcher in a
-- process group of its own (as a shell runs a foreground job)
local function launch(n, extra, worker_flags, opts)
  opts = opts or {}
  local args = { "launch", "--dp-size", tostring(n), "--worker-cmd", opts.cmd or SIM_CMD,
    "--port", "0", "--prometheus-port", "0", "--policy", "round_robin",
    "--worker-startup-check-interval", "0.1", "--worker-stop-grace-secs", "2",
    "--health-check-interval-secs", "0.2", "--health-failure-threshold", "1",
    "--health-success-threshold", "1", "--shutdown-grace-secs", "5" }
  for _, a in ipairs(extra or {}) do args[#args + 1] = a end
  if worker_flags then
    args[#args + 1] = "--"
    for _, a in ipairs(worker_flags) do args[#args + 1] = a end
  end
  local p = H.spawn(args, { group = opts.group })
  local port = tonumber(H.wait_output(p, "router listening on http:\\?/\\?/127%.0%.0%.1:(%d+)", 15000))
  local l = { proc = p, url = "http://127.0.0.1:" .. port, workers = {} }
  for id, pid, url in p.out:gmatch("worker (r%d+) started pid=(%d+) url=(%S+)") do
    l.workers[id] = { pid = tonumber(pid), url = url }
  end
  l.router_pid = tonumber(p.out:match("router started pid=(%d+)"))
  return l
end

local function all_pids(l)
  local pids = { l.router_pid }
  for _, w in pairs(l.workers) do pids[#pids + 1] = w.pid end
  return pids
end

local function wait_all_gone(pids, timeout_ms)
  H.wait_for(function()
    for _, pid in ipairs(pids) do
      if proc.alive(pid) then return false end
    end
    return true
  end, timeout_ms or 5000, "processes " .. table.concat(pids, ", ") .. " to be gone")
end

local function generate(l, text)
  local res = assert(H.post(l.url, "/generate", H.gen_body(text or "hello")))
  assert.equal(200, res.status)
  return H.worker_of(res)
end

describe("sglr launch", function()
  after_each(function() H.stop_all() end)

  it("starts N workers and spreads requests over them through the router", function()
    local l = launch(3)
    assert.equal(3, #all_pids(l) - 1)
    assert.truthy(l.router_pid)
    local seen = {}
    for i = 1, 6 do
      local w = generate(l, "request " .. i)
      seen[w] = (seen[w] or 0) + 1
    end
    assert.same({ r0 = 2, r1 = 2, r2 = 2 }, seen)
    -- each worker's lines carry its rank
    for _, id in ipairs({ "r0", "r1", "r2" }) do
      assert.truthy(l.proc.out:find("[" .. id .. "] sim-worker " .. id .. " listening on", 1, true))
    end
  end)

  it("restarts a worker that died, and the router sends it requests again", function()
    local l = launch(2)
    local old = l.workers.r1
    assert.is_true(proc.alive(old.pid))
    assert(uv.kill(old.pid, "sigkill"))
    local new_pid = tonumber(H.wait_output(l.proc, "worker r1 healthy again pid=(%d+)", 10000))
    assert.are_not.equal(old.pid, new_pid)
    assert.is_false(proc.alive(old.pid))
    assert.is_true(proc.alive(new_pid))
    -- back in rotation: the router's health checks let it in again
    local back = H.wait_for(function()
      return generate(l, "after restart") == "r1"
    end, 5000, "r1 to serve again")
    assert.is_true(back)
    -- and the rest of the fleet was left alone
    assert.is_true(proc.alive(l.workers.r0.pid))
    assert.is_true(proc.alive(l.router_pid))
  end)

  -- Ctrl-C on a terminal signals the whole foreground process group: the
  -- workers, in groups of their own, must hear of it from the launcher only
  -- once the router is done. Each worker also leaves a `sleep` that ignores
  -- SIGTERM behind in its group, which the stop must take too.
  it("on Ctrl-C lets the router drain, then stops every worker and what it started", function()
    local cmd = "sh -c '(trap \"\" TERM; exec sleep 30) & echo grandchild $!; exec \"$0\" sim-worker --port {port} --id r{rank} \"$@\"' '"
      .. H.bin .. "'"
    local l = launch(2, nil, { "--latency-ms", "800" }, { cmd = cmd, group = true })
    local pids = all_pids(l)
    for pid in l.proc.out:gmatch("%] grandchild (%d+)") do pids[#pids + 1] = tonumber(pid) end
    assert.equal(5, #pids)
    local res
    local done = core.event()
    core.spawn(function()
      res = H.post(l.url, "/generate", H.gen_body("slow one"))
      done:set(true)
    end)
    -- the request is at a worker when the stop begins
    H.wait_for(function()
      for _, w in pairs(l.workers) do
        if H.get(w.url, "/sim/stats").json.inflight > 0 then return true end
      end
    end, 5000, "the request to reach a worker")
    H.kill(l.proc, "sigint")
    assert.is_true(done:wait(10000))
    assert.equal(200, res and res.status)
    assert.same({ 0, 0 }, { H.wait_stopped(l.proc, 15000) })   -- (exit status, signal)
    wait_all_gone(pids, 1000)
    -- in that order: the router said goodbye before the workers were stopped
    local bye = l.proc.out:find("bye", 1, true)
    local workers = l.proc.out:find("stopping 2 worker(s)", 1, true)
    assert.truthy(bye and workers and bye < workers)
  end)

  it("leaves no worker and no router behind when the launcher is SIGKILLed", function()
    local l = launch(2)
    local pids = all_pids(l)
    assert.equal(3, #pids)
    for _, pid in ipairs(pids) do assert.is_true(proc.alive(pid)) end
    H.kill(l.proc, "sigkill")
    H.wait_stopped(l.proc, 5000)
    wait_all_gone(pids, 5000)
  end)

  it("fails, and stops the others, when a worker exits before it is healthy", function()
    local p = H.spawn({ "launch", "--dp-size", "2", "--port", "0", "--prometheus-port", "0",
      "--worker-startup-check-interval", "0.1",
      "--worker-cmd", "sh -c 'if [ {rank} = 1 ]; then echo broken >&2; exit 3; fi; exec sleep 30'" })
    assert.equal(1, H.wait_stopped(p, 10000))
    assert.truthy(p.out:find("[r1] broken", 1, true))
    assert.truthy(p.out:find("worker r1 exited (exit status 3)", 1, true))
    local r0 = tonumber(p.out:match("worker r0 started pid=(%d+)"))
    wait_all_gone({ r0 }, 1000)
  end)

  it("refuses a command line it cannot run, naming the flag", function()
    local p = H.spawn({ "launch", "--dp-size", "2" })
    assert.equal(2, H.wait_stopped(p))
    assert.truthy(p.out:find("--model-path is required", 1, true))
    p = H.spawn({ "launch", "--worker-cmd", "x", "--policy", "nope" })
    assert.equal(2, H.wait_stopped(p))
    assert.truthy(p.out:find("sglr launch: --policy: unknown policy 'nope'", 1, true))
    p = H.spawn({ "launch", "--worker-cmd", "/nonexistent/worker --port {port}", "--port", "0",
      "--prometheus-port", "0" })
    assert.equal(1, H.wait_stopped(p))
    assert.truthy(p.out:find("cannot run '/nonexistent/worker'", 1, true))
  end)
end)
