-- make install into a temporary DESTDIR, then SGLang's Python entry points
-- run from there (python3 from the machine, nothing else): launch_router,
-- launch_server and Router(...).start(), against sim workers.
local H = require "spec.helpers"
local proc = require "sglr.proc"
local uv = require "luv"

local build = H.bin:match("^(.*)/[^/]+$") or "."
local dest = os.tmpname()
local pydir            -- where the package went, found in dest
local env              -- ours, with PYTHONPATH=pydir and no SGLR_BIN

local function run(bin, args, opts)
  local p = H.spawn(args, { bin = bin, env = opts and opts.env })
  return H.wait_stopped(p, (opts and opts.timeout_ms) or 60000), p.out, p
end

local function python(args, timeout_ms)
  return run("python3", args, { env = env, timeout_ms = timeout_ms })
end

-- the pids whose parent is pid, from /proc
local function children(pid)
  local out = {}
  for name in uv.fs_scandir_next, assert(uv.fs_scandir("/proc")) do
    if name:match("^%d+$") then
      local f = io.open("/proc/" .. name .. "/stat")
      local stat = f and f:read("*a")
      if f then f:close() end
      if stat and tonumber(stat:match("^%d+ %b() %a (%d+)")) == pid then out[#out + 1] = tonumber(name) end
    end
  end
  return out
end

local function router_port(p)
  return tonumber(H.wait_output(p, "router listening on http:\\?/\\?/127%.0%.0%.1:(%d+)", 15000))
end

local function generate(port)
  local res = assert(H.post("http://127.0.0.1:" .. port, "/generate", H.gen_body("hello")))
  assert.equal(200, res.status)
  return H.worker_of(res)
end

describe("make install", function()
  setup(function()
    os.remove(dest)
    local code, out = run("make", { "-s", "install", "BUILD=" .. build, "DESTDIR=" .. dest, "JOBS=1" })
    assert(code == 0, "make install failed:\n" .. out)
    local init = assert(io.popen("find '" .. dest .. "' -path '*/sglang_router/__init__.py'")):read("*l")
    assert(init, "no sglang_router package under " .. dest)
    pydir = init:match("^(.*)/sglang_router/__init__.py$")
    env = {}
    for k, v in pairs(uv.os_environ()) do
      if k ~= "SGLR_BIN" and k ~= "PYTHONPATH" then env[#env + 1] = k .. "=" .. v end
    end
    env[#env + 1] = "PYTHONPATH=" .. pydir
  end)

  teardown(function()
    H.stop_all()
    os.execute("rm -rf '" .. dest .. "'")
  end)

  after_each(function() H.stop_all() end)

  it("installs sglr, its man page and the Python package under PREFIX", function()
    local bin = dest .. "/usr/local/bin/sglr"
    assert.truthy(proc.which(bin))
    assert.equal(dest .. "/usr/local/lib", pydir:sub(1, #dest + 14))
    local code, out = run(bin, { "--version" })
    assert.equal(0, code)
    assert.truthy(out:match("^sglr %d"))
    local f = assert(io.open(dest .. "/usr/local/share/man/man1/sglr.1"))
    local man = f:read("*a")
    f:close()
    assert.truthy(man:match("^%.TH SGLR 1 "))
    -- written from the help of each command
    for _, s in ipairs({ ".SH SGLR RUN", "\\fB\\-\\-worker\\-urls", ".SH SGLR LAUNCH", "\\fB\\-\\-dp\\-size <n>" }) do
      assert.truthy(man:find(s, 1, true), s)
    end
    if proc.which("groff") then
      code, out = run("groff", { "-man", "-ww", "-z", dest .. "/usr/local/share/man/man1/sglr.1" })
      assert.equal(0, code)
      assert.equal("", out)
    end
  end)

  it("python3 -m sglang_router.launch_router --help lists the router's flags", function()
    local code, out = python({ "-m", "sglang_router.launch_router", "--help" })
    assert.equal(0, code)
    for _, flag in ipairs({ "--worker-urls", "--policy", "--cache-threshold", "--prometheus-port" }) do
      assert.truthy(out:find(flag, 1, true), flag)
    end
  end)

  it("python3 -m sglang_router.launch_router becomes the installed router", function()
    local w = H.sim({ "--id", "w1" })
    local p = H.spawn({ "-m", "sglang_router.launch_router", "--worker-urls", w.url, "--port", "0",
      "--prometheus-port", "0", "--worker-startup-check-interval", "0.1" }, { bin = "python3", env = env })
    local port = router_port(p)
    assert.equal("w1", generate(port))
    assert.equal(dest .. "/usr/local/bin/sglr", uv.fs_readlink("/proc/" .. p.pid .. "/exe"))
    H.kill(p, "sigterm")
    assert.same({ 0, 0 }, { H.wait_stopped(p) })   -- (exit status, signal)
  end)

  it("Router(...).start() routes until SIGTERM, then its router is gone", function()
    local a, b = H.sim({ "--id", "a" }), H.sim({ "--id", "b" })
    local script = table.concat({
      "import sys",
      "from sglang_router import Router, PolicyType",
      "Router(worker_urls=sys.argv[1:], policy=PolicyType.RoundRobin, port=0, prometheus_port=0,",
      "       worker_startup_check_interval=0.1).start()",
      "print('start returned')",
    }, "\n")
    local p = H.spawn({ "-c", script, a.url, b.url }, { bin = "python3", env = env })
    local port = router_port(p)
    local seen = {}
    for _ = 1, 4 do seen[generate(port)] = true end
    assert.same({ a = true, b = true }, seen)
    local kids = children(p.pid)
    assert.equal(1, #kids)
    assert.equal(dest .. "/usr/local/bin/sglr", uv.fs_readlink("/proc/" .. kids[1] .. "/exe"))
    H.kill(p, "sigterm")
    assert.same({ 0, 0 }, { H.wait_stopped(p) })   -- (exit status, signal)
    assert.truthy(p.out:find("start returned", 1, true))
    assert.truthy(p.out:find("shutting down on SIGTERM", 1, true))
    assert.is_false(proc.alive(kids[1]))
  end)

  it("python3 -m sglang_router.launch_server co-launches workers and the router", function()
    local p = H.spawn({ "-m", "sglang_router.launch_server", "--model-path", "sim", "--dp-size", "2",
      "--host", "127.0.0.1", "--port", "0", "--router-prometheus-port", "0",
      "--router-worker-cmd", "'" .. H.bin .. "' sim-worker --port {port} --id r{rank}",
      "--router-policy", "round_robin", "--router-worker-startup-check-interval", "0.1",
      "--decode-ms-per-token", "1" }, { bin = "python3", env = env })
    local port = router_port(p)
    local seen = {}
    for _ = 1, 4 do seen[generate(port)] = true end
    assert.same({ r0 = true, r1 = true }, seen)
    -- the SGLang flag went to the workers, after --
    assert.truthy(p.out:find("cmd=[^\n]* sim%-worker %-%-port %d+ %-%-id r0 %-%-decode%-ms%-per%-token 1"))
    local pids = children(p.pid)
    assert.equal(3, #pids)
    H.kill(p, "sigterm")
    assert.same({ 0, 0 }, { H.wait_stopped(p, 15000) })
    for _, pid in ipairs(pids) do assert.is_false(proc.alive(pid)) end
  end)
end)
