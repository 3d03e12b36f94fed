local core = require "sglr.core"
local workers = require "sglr.workers"

describe("worker registry", function()
  local function urls(list)
    local out = {}
    for i, w in ipairs(list) do out[i] = w.url end
    return out
  end

  it("gives each caller of available() a list that no later call changes", function()
    local ws = workers.new({})
    assert(ws:add("http://127.0.0.1:1"))
    assert(ws:add("http://127.0.0.1:2"))
    -- a policy that yields (say, awaiting rt.http) between getting its
    -- candidates and choosing among them, while another request routes
    local seen
    core.spawn(function()
      local avail = ws:available(core.now(), { ["http://127.0.0.1:1"] = true })
      core.sleep(5)
      seen = urls(avail)
    end)
    local other = ws:available(core.now(), { ["http://127.0.0.1:2"] = true })
    assert.same({ "http://127.0.0.1:1" }, urls(other))
    local t = core.now()
    while not seen and core.now() - t < 2000 do core.sleep(5) end
    assert.same({ "http://127.0.0.1:2" }, seen)
    assert.same({ "http://127.0.0.1:1" }, urls(other))
  end)

  it("remembers each worker's source and pod, and runs the same hooks for every source", function()
    local events = {}
    local ws = workers.new({}, {
      added = function(w) events[#events + 1] = "+" .. w.source .. " " .. w.url end,
      removed = function(w) events[#events + 1] = "-" .. w.source .. " " .. w.url end,
    })
    local a = assert(ws:add("http://127.0.0.1:1"))
    assert.equal("static", a.source)                   -- the default
    assert.is_nil(a.pod)
    local b = assert(ws:add("http://127.0.0.1:2/", { source = "admin" }))
    assert.equal("admin", b.source)
    local pod = { namespace = "ml", name = "worker-0", uid = "u-1", extra = "dropped" }
    local c = assert(ws:add("http://10.0.0.5:8000", { source = "discovery", pod = pod }))
    assert.same({ namespace = "ml", name = "worker-0", uid = "u-1" }, c.pod)
    pod.name = "changed later"
    assert.equal("worker-0", c.pod.name)              -- a copy
    assert.same({ "http://10.0.0.5:8000" }, urls(ws:from_source("discovery")))
    assert.same({ "http://127.0.0.1:1" }, urls(ws:from_source("static")))
    -- every worker gets a breaker and joins health checks alike
    for _, w in ipairs(ws.list) do assert.truthy(w.breaker) end
    assert.equal(3, ws:healthy_count())

    assert(ws:remove("http://127.0.0.1:2"))
    assert(ws:remove("http://10.0.0.5:8000", { source = "discovery", uid = "u-1" }))
    assert(ws:remove("http://127.0.0.1:1"))
    assert.same({ "+static http://127.0.0.1:1", "+admin http://127.0.0.1:2", "+discovery http://10.0.0.5:8000",
      "-admin http://127.0.0.1:2", "-discovery http://10.0.0.5:8000", "-static http://127.0.0.1:1" }, events)
    assert.equal(0, #ws.list)
  end)

  it("lets a source remove only what it gave", function()
    local ws = workers.new({})
    assert(ws:add("http://127.0.0.1:1", { source = "static" }))
    assert(ws:add("http://10.0.0.5:8000", { source = "discovery", pod = { namespace = "n", name = "p", uid = "new" } }))
    local w, err = ws:remove("http://127.0.0.1:1", { source = "discovery" })
    assert.is_nil(w)
    assert.equal("worker http://127.0.0.1:1 came from static, not discovery", err)
    -- a pod recreated at the same IP is another pod: the old one's removal
    -- leaves the new one alone
    w, err = ws:remove("http://10.0.0.5:8000", { source = "discovery", uid = "old" })
    assert.is_nil(w)
    assert.equal("worker http://10.0.0.5:8000 is not pod old", err)
    assert.equal(2, #ws.list)
    -- a duplicate names the source that has it
    w, err = ws:add("http://127.0.0.1:1", { source = "discovery", pod = { namespace = "n", name = "q", uid = "x" } })
    assert.is_nil(w)
    assert.equal("worker http://127.0.0.1:1 is already registered (from static)", err)
  end)

  it("refuses an unknown source or a malformed pod as misuse", function()
    local ws = workers.new({})
    assert.has_error(function() ws:add("http://127.0.0.1:1", { source = "dns" }) end,
      "workers:add: unknown source 'dns'")
    assert.has_error(function() ws:add("http://127.0.0.1:1", { source = "discovery", pod = { name = "p", uid = "u" } }) end,
      "workers:add: opts.pod.namespace must be a non-empty string")
    assert.equal(0, #ws.list)
  end)

  it("refuses worker URLs with control bytes", function()
    local w, err = workers.check_url("http://127.0.0.1:8000\r\nx-evil: 1")
    assert.is_nil(w)
    assert.truthy(err:find("control bytes", 1, true))
    assert.is_nil(workers.check_url("http://127.0.0.1:80\0"))
  end)

  it("keeps one worker per address, however the URL spells it", function()
    local ws = workers.new({})
    assert(ws:add("http://127.0.0.1"))
    local w, err = ws:add("http://127.0.0.1:80/")
    assert.is_nil(w)
    assert.truthy(err:find("already registered as http://127.0.0.1", 1, true))
    assert(ws:add("http://LOCALHOST:8000"))
    assert.is_nil((ws:add("http://localhost:8000")))
    assert.equal("http://localhost:8000", ws:get("http://LocalHost:8000").url)
    -- removing by either spelling finds it
    assert(ws:remove("http://127.0.0.1:80"))
    assert(ws:add("http://127.0.0.1:80"))
  end)
end)
