-- sglr.proc: spawn, output, signals, stop (with `sh` as the child).
local proc = require "sglr.proc"
local core = require "sglr.core"

describe("sglr.proc", function()
  local started = {}
  local function spawn(script, opts)
    local p = assert(proc.spawn("sh", { "-c", script }, opts))
    started[#started + 1] = p
    return p
  end
  after_each(function()
    proc.stop_all(started, 0)
    started = {}
  end)

  it("keeps the output and cuts it into lines per stream", function()
    local lines = {}
    local p = spawn("printf 'a\\nb'; printf 'c\\n' >&2; printf 'no newline'", {
      on_line = function(line, stream) lines[#lines + 1] = stream .. ":" .. line end })
    assert.same({ 0, 0 }, { p:wait(5000) })
    table.sort(lines)
    assert.same({ "stderr:c", "stdout:a", "stdout:bno newline" }, lines)
    assert.truthy(p.out:find("no newline", 1, true))
  end)

  it("keeps only the last bytes when told", function()
    local p = spawn("printf '0123456789'", { keep = 4 })
    p:wait(5000)
    assert.equal("6789", p.out)
  end)

  it("reports the exit status and the signal", function()
    local p = spawn("exit 3")
    assert.same({ 3, 0 }, { p:wait(5000) })
    assert.equal("exit status 3", p:status_text())
    p = spawn("exec sleep 30")
    assert.is_true(proc.alive(p.pid))
    assert(p:kill("sigterm"))
    assert.same({ 0, 15 }, { p:wait(5000) })
    assert.equal("signal 15", p:status_text())
    assert.is_false(proc.alive(p.pid))
  end)

  it("waits for output, or says why it will not come", function()
    local p = spawn("echo 'ready on port 1234'; exec sleep 30")
    assert.equal("1234", p:wait_output("port (%d+)", 5000))
    local m, err = p:wait_output("never", 50)
    assert.is_nil(m)
    assert.truthy(err:find("timed out", 1, true))
    p = spawn("echo bye")
    m, err = p:wait_output("never", 5000)
    assert.is_nil(m)
    assert.truthy(err:find("exited (exit status 0)", 1, true))
  end)

  it("stops with SIGKILL what ignores SIGTERM, after the grace period", function()
    local p = spawn("trap '' TERM; echo armed; while :; do sleep 0.05; done")
    p:wait_output("armed", 5000)
    local t0 = core.now()
    assert.same({ 0, 9 }, { p:stop(200) })
    assert.is_true(core.now() - t0 >= 200)
  end)

  it("signals a whole process group", function()
    local p = spawn("sleep 30 & echo child $!; wait", { group = true })
    local child = tonumber(p:wait_output("child (%d+)", 5000))
    p:stop(2000)
    assert.is_false(proc.alive(child))
  end)

  it("says when a command cannot be found", function()
    local p, err = proc.spawn("no-such-command-for-sglr", {})
    assert.is_nil(p)
    assert.equal("cannot run 'no-such-command-for-sglr': not found in PATH", err)
    assert.equal(nil, proc.which("/nonexistent/x"))
    assert.truthy(proc.which("sh"):match("/sh$"))
  end)

  it("finds distinct free ports, by address or name", function()
    for _, host in ipairs({ "127.0.0.1", "localhost" }) do
      local ports = assert(proc.free_ports(host, 3))
      assert.equal(3, #ports)
      assert.is_true(ports[1] ~= ports[2] and ports[2] ~= ports[3] and ports[1] ~= ports[3])
    end
  end)
end)
