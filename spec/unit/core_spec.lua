-- The runtime primitives scripts build on (sglr.core): sleep, events,
-- spawn, request ids, and the native client against the native server.
local core = require "sglr.core"

describe("sglr.core", function()
  it("sleeps for at least the given time", function()
    local t = core.now()
    core.sleep(30)
    assert.is_true(core.now() - t >= 29.5)
  end)

  it("wakes an event waiter with the value given to set", function()
    local ev = core.event()
    core.spawn(function() core.sleep(5); ev:set("hello") end)
    local ok, v = ev:wait(1000)
    assert.is_true(ok)
    assert.equal("hello", v)
    -- once set, later waits return at once
    assert.is_true((ev:wait(0)))
  end)

  it("times out an event wait", function()
    local ok, err = core.event():wait(20)
    assert.is_nil(ok)
    assert.equal("timeout", err)
  end)

  it("keeps an unreferenced event alive while a coroutine waits on it", function()
    local got
    core.spawn(function() got = { core.event():wait(40) } end)
    for _ = 1, 3 do collectgarbage() end
    core.sleep(80)
    assert.same({ nil, "timeout" }, got)
  end)

  it("runs spawned coroutines until they wait, and survives their errors", function()
    local order = {}
    core.spawn(function() order[#order + 1] = "a"; core.sleep(1); order[#order + 1] = "c" end)
    order[#order + 1] = "b"
    core.spawn(function() error("boom (expected in this spec)") end)
    core.sleep(10)
    assert.same({ "a", "b", "c" }, order)
  end)

  -- A coroutine that works in steps and sleeps between them (the
  -- cache-aware eviction does) must let the loop serve I/O between steps.
  local function busy(ms)
    local t = core.now()
    while core.now() - t < ms do end
  end

  local function served_during(chain)
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "ok") end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    assert(core.request(pool, { path = "/warm" }))   -- connection open, nothing pending
    local steps_done, finished_at = 0, nil
    local done = core.event()
    core.spawn(function()
      local res = core.request(pool, { path = "/during" })
      finished_at = res and steps_done
      done:set(true)
    end)
    chain(function() steps_done = steps_done + 1 end)
    done:wait(5000)
    srv:close()
    return finished_at
  end

  -- A prefill and a decode worker answering with respond(name, x), and a
  -- pool for each -> prefill, decode, prefill pool, decode pool
  local function pd_legs(respond)
    local function leg(name)
      return assert(core.listen("127.0.0.1", 0, {}, function(x) respond(name, x) end))
    end
    local prefill, decode = leg("prefill"), leg("decode")
    return prefill, decode, assert(core.upstream("http://127.0.0.1:" .. prefill:port())),
      assert(core.upstream("http://127.0.0.1:" .. decode:port()))
  end

  it("lets I/O in between the steps of a work loop that sleeps 0 ms", function()
    local at = served_during(function(step)
      for _ = 1, 40 do busy(2); step(); core.sleep(0) end
    end)
    assert.is_not_nil(at)
    assert.is_true(at < 20, "request answered only after " .. tostring(at) .. " of 40 steps")
  end)

  it("lets I/O in between two work loops that sleep 1 ms in turn", function()
    local ev = core.event()
    local at = served_during(function(step)
      core.spawn(function() for _ = 1, 40 do busy(2); step(); core.sleep(1) end; ev:set(true) end)
      for _ = 1, 40 do busy(2); step(); core.sleep(1) end
      ev:wait(5000)
    end)
    assert.is_not_nil(at)
    assert.is_true(at < 40, "request answered only after " .. tostring(at) .. " of 80 steps")
  end)

  it("lets I/O in between two coroutines that wake each other with events", function()
    local at = served_during(function(step)
      local ping, pong = core.event(), core.event()
      local n = 40
      core.spawn(function()
        for i = 1, n do
          local ok = ping:wait(5000)
          if not ok then return end
          ping = core.event()
          busy(2); step()
          if i < n then pong:set(true) end
        end
      end)
      for i = 1, n do
        busy(2); step()
        local p = pong
        ping:set(true)
        if i < n then p:wait(5000); pong = core.event() end
      end
    end)
    assert.is_not_nil(at)
    assert.is_true(at < 40, "request answered only after " .. tostring(at) .. " of 80 steps")
  end)

  it("does not fire a timer early after a stretch of work", function()
    busy(50)
    local t = core.now()
    core.sleep(5)
    assert.is_true(core.now() - t >= 4.5, "slept " .. (core.now() - t) .. " ms")
    busy(50)
    t = core.now()
    assert.is_nil((core.event():wait(5)))
    assert.is_true(core.now() - t >= 4.5, "waited " .. (core.now() - t) .. " ms")
  end)

  it("gives a worker request its whole timeout after a stretch of work", function()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      core.sleep(20)
      x:respond(200, {}, "ok")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    core.sleep(1)       -- a fresh loop iteration, then 60 ms of work in it
    busy(60)
    local res, err = core.request(pool, { path = "/", timeout_ms = 50 })
    srv:close()
    assert.is_not_nil(res, err)
    assert.equal(200, res.status)
  end)

  it("refuses to wait where the coroutine cannot yield, and stays consistent", function()
    local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b) core.sleep(1); return a < b end)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("cannot from here", 1, true), tostring(err))
    -- nothing armed by the refused call may wake this coroutine later
    local t = core.now()
    local got = { core.event():wait(50) }
    assert.same({ nil, "timeout" }, got)
    assert.is_true(core.now() - t >= 49)
  end)

  it("makes request ids with a prefix and 24 alphanumerics", function()
    local seen = {}
    for _ = 1, 200 do
      local id = core.random_id("gnt-")
      assert.truthy(id:match("^gnt%-%w+$"))
      assert.equal(28, #id)
      assert.is_nil(seen[id])
      seen[id] = true
    end
    -- every one of the 62 characters, about equally often (48,000 drawn:
    -- 774 each expected; a character outside 600..950 is a biased draw)
    -- and at every place of the 24 (each character about 32 times there:
    -- one missing is a stuck or biased place)
    local counts, kinds, at = {}, 0, {}
    for i = 1, 24 do at[i] = {} end
    for _ = 1, 2000 do
      local i = 0
      for ch in core.random_id(""):gmatch(".") do
        if not counts[ch] then kinds = kinds + 1 end
        counts[ch] = (counts[ch] or 0) + 1
        i = i + 1
        at[i][ch] = true
      end
    end
    assert.equal(62, kinds)
    for i = 1, 24 do
      local n = 0
      for _ in pairs(at[i]) do n = n + 1 end
      assert.equal(62, n, "characters at place " .. i)
    end
    for ch, v in pairs(counts) do
      assert.is_true(v > 600 and v < 950, ch .. " drawn " .. v .. " times")
    end
  end)

  it("times a client's request from its own start, not from the start of its callback", function()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "ok") end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    assert(core.request(pool, { path = "/" }))          -- connected and warm
    -- 60 ms of work in this callback before the request starts (as sglr
    -- bench starting many requests in one)
    busy(60)
    local res = assert(core.request(pool, { path = "/" }))
    assert.is_true(res.total_ms < 40, "total_ms " .. res.total_ms)
    assert.is_true(res.ttfb_ms <= res.total_ms)
    srv:close()
  end)

  it("serves and fetches over loopback with keep-alive", function()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local path, query = x:path()
      x:respond(200, { ["content-type"] = "text/plain", ["x-q"] = query or "" },
        x:method() .. " " .. path .. " " .. #x:body())
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    for i = 1, 3 do
      local res = assert(core.request(pool, { method = "POST", path = "/p?i=" .. i, body = "abc" }))
      assert.equal(200, res.status)
      assert.equal("POST /p 3", res.body)
      assert.equal("i=" .. i, res.headers["x-q"])
    end
    assert.equal(1, pool:stats().conns)
    srv:close()
  end)

  it("proxies 204 and HEAD responses without a body, keeping the connection usable", function()
    local uv = require "luv"
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      if x:path() == "/204" then
        x:start(204, {})
        x:finish()
      else
        x:start(200, { ["content-type"] = "text/plain" })
        x:write("hello")
        x:finish()
      end
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local resp = assert(x:forward(pool, {}))
      resp:pipe()
      resp:close()
    end))
    local function raw(req)
      local c, got = uv.new_tcp(), ""
      c:connect("127.0.0.1", router:port(), function()
        c:write(req)
        c:read_start(function(_, d) if d then got = got .. d end end)
      end)
      local t = core.now()
      while not got:find("0\r\n\r\n$") and core.now() - t < 2000 do core.sleep(5) end
      c:close()
      return got
    end
    local two = "GET /x HTTP/1.1\r\nhost: a\r\n\r\n"
    local out = raw("GET /204 HTTP/1.1\r\nhost: a\r\n\r\n" .. two)
    local want = "HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK"
    assert.equal(want, out:sub(1, #want))
    assert.truthy(out:find("5\r\nhello\r\n0\r\n\r\n$"))
    out = raw("HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n" .. two)
    local first, second = out:match("^(.-\r\n\r\n)(HTTP/1.1 .*)$")
    assert.truthy(first and first:find("^HTTP/1.1 200 OK"))
    assert.is_nil(first:find("hello", 1, true))
    assert.truthy(second:find("hello", 1, true))
    router:close()
    worker:close()
  end)

  it("takes the request id from the first configured name with a value, whatever the header order", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int sglr_lua_x_set_request_id(void *x, const char *names, const char *prefix);")
    local got, lens = {}, {}
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      assert.is_nil(x:request_id())                   -- none until the flow chose it
      lens[#lens + 1] = ffi.C.sglr_lua_x_set_request_id(x, "x-request-id\0x-trace-id\0\0", "gnt-")
      got[#got + 1] = x:request_id() or false
      -- a prefix too long for the exchange's room: the caller makes the id
      assert.equal(-1, ffi.C.sglr_lua_x_set_request_id(x, "\0", ("p"):rep(25)))
      x:respond(200, {}, "")
    end))
    local uv = require "luv"
    local function send(hdrs)
      local c, out = uv.new_tcp(), ""
      c:connect("127.0.0.1", srv:port(), function()
        c:write("GET / HTTP/1.1\r\nhost: a\r\n" .. hdrs .. "connection: close\r\n\r\n")
        c:read_start(function(_, d) if d then out = out .. d end end)
      end)
      local t = core.now()
      while not out:find("\r\n\r\n") and core.now() - t < 2000 do core.sleep(5) end
      c:close()
    end
    send("X-Trace-Id: t-1\r\nX-Request-Id: r-1\r\n")                     -- the name order wins
    send("x-request-id: \r\nx-trace-id: t-2\r\nx-request-id: r-2\r\n")   -- the first of a name counts
    send("x-other: o\r\n")
    local long = ("i"):rep(800)
    send("x-request-id: " .. long .. "\r\n")                            -- whole, however long
    assert.equal(4, #got)
    assert.equal("r-1", got[1])
    assert.equal("t-2", got[2])
    assert.truthy(got[3]:match("^gnt%-%w+$") and #got[3] == 28, got[3])
    assert.equal(long, got[4])
    assert.same({ 3, 3, 28, 800 }, lens)
    srv:close()
  end)

  it("sends the id the exchange keeps when x:relay_pipe is given none", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int sglr_lua_x_set_request_id(void *x, const char *names, const char *prefix);")
    local seen
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      seen = x:header("x-request-id")
      x:respond(200, { ["content-type"] = "text/plain" }, "ok")
    end))
    local wpool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      assert(ffi.C.sglr_lua_x_set_request_id(x, "x-request-id\0\0", "gnt-") >= 0)
      x:relay_pipe(wpool, nil, 2000, 2000, nil, nil, nil, nil)
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local res = assert(core.request(rpool, { path = "/g", headers = { ["x-request-id"] = "abc-1" } }))
    assert.equal(200, res.status)
    assert.equal("abc-1", seen)                       -- to the worker
    assert.equal("abc-1", res.headers["x-request-id"]) -- and back to the client
    res = assert(core.request(rpool, { path = "/g" }))
    assert.truthy(seen:match("^gnt%-%w+$") and #seen == 28, seen)
    assert.equal(seen, res.headers["x-request-id"])
    router:close()
    worker:close()
  end)

  it("answers 500 for a handler that yields with nothing to resume it, and serves on", function()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      if x:path() == "/y" then coroutine.yield() end   -- a bare yield: nobody resumes it
      x:respond(200, {}, "ok")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    -- the abandoned handler thread and its exchange are collected, and the
    -- exchange's finalizer answers (collections run while the client waits)
    local done = false
    core.spawn(function()
      while not done do
        collectgarbage()
        core.sleep(5)
      end
    end)
    local res = core.request(pool, { path = "/y", timeout_ms = 3000 })
    done = true
    assert.truthy(res, "no answer")
    assert.equal(500, res.status)
    assert.equal(200, assert(core.request(pool, { path = "/ok" })).status)
    srv:close()
  end)

  it("names the inference route of a POST through the FFI, and no other request's", function()
    local ffi = require "ffi"
    pcall(ffi.cdef, "int sglr_lua_x_inference(void *x);")
    local got = {}
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      got[#got + 1] = ffi.C.sglr_lua_x_inference(x)
      x:respond(200, {}, "")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    local cases = {
      { "POST", "/generate", 1 }, { "POST", "/generate?stream=1", 1 }, { "POST", "/v1/chat/completions", 2 },
      { "POST", "/v1/completions", 3 }, { "GET", "/generate", 0 }, { "PUT", "/v1/completions", 0 },
      { "POST", "/generatex", 0 }, { "POST", "/v1/completions/", 0 }, { "POST", "/v1/chat", 0 },
      { "POST", "/", 0 },
    }
    for _, c in ipairs(cases) do
      assert(core.request(pool, { method = c[1], path = c[2], body = c[1] ~= "GET" and "{}" or nil }))
    end
    for i, c in ipairs(cases) do assert.equal(c[3], got[i], c[1] .. " " .. c[2]) end
    assert.equal(-1, ffi.C.sglr_lua_x_inference(nil))
    srv:close()
  end)

  it("relay_pipe passes a response on at its head, or holds the statuses asked for", function()
    local retry = require "sglr.retry"
    for s = 100, 599 do assert.equal(retry.retryable_status(s), core.relay_held(s), s) end
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local st = tonumber(x:header("x-status")) or 200
      x:respond(st, { ["x-w"] = "1", ["x-request-id"] = "from-worker" }, "body " .. st)
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local dead = assert(core.upstream("http://127.0.0.1:1"))
    local seen = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local mode = x:header("x-mode")
      local hold = tonumber(x:header("x-hold"))
      if mode == "dead" then
        seen.dead = { x:relay_pipe(dead, nil, 1000, 1000, "rid", nil, nil, nil) }
        return x:respond(502, {}, "dead")
      elseif mode == "badextra" then
        seen.bad = { pcall(x.relay_pipe, x, pool, nil, 1000, 1000, "rid", nil, { ["x-a"] = "1\r\nx-b: 2" }) }
        seen.badhold = { pcall(x.relay_pipe, x, pool, nil, 1000, 1000, "rid", nil, nil, 4) }
        return x:respond(400, {}, "bad")
      end
      local extra = mode == "extra" and { ["x-extra"] = "e" } or nil
      local t0 = core.now()
      local status, resp, perr, t_head = x:relay_pipe(pool, nil, 1000, 1000, "rid-1", nil, extra, hold)
      seen.last = { status = status, kind = type(resp), perr = perr, waited = t_head >= t0 and t_head <= core.now() }
      if type(resp) == "userdata" then
        seen.last.body = resp:read()
        resp:close()
        x:respond(299, {}, "held " .. status)
      end
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local active0 = core.active()
    local function ask(h) return assert(core.request(rpool, { path = "/", headers = h })) end
    -- piped: the worker's answer with x-request-id (and the extra headers)
    local res = ask({ ["x-mode"] = "extra" })
    assert.equal(200, res.status)
    assert.equal("body 200", res.body)
    assert.equal("rid-1", res.headers["x-request-id"])
    assert.equal("e", res.headers["x-extra"])
    assert.equal("1", res.headers["x-w"])
    assert.same({ status = 200, kind = "boolean", waited = true }, seen.last)
    -- hold 1: a retryable status is held, another is passed on
    res = ask({ ["x-hold"] = "1", ["x-status"] = "503" })
    assert.equal(299, res.status)
    assert.equal("held 503", res.body)
    assert.same({ status = 503, kind = "userdata", waited = true, body = "body 503" }, seen.last)
    res = ask({ ["x-hold"] = "1", ["x-status"] = "404" })
    assert.equal(404, res.status)
    assert.equal("body 404", res.body)
    -- hold 2: any error status; hold 3: any status
    assert.equal(299, ask({ ["x-hold"] = "2", ["x-status"] = "404" }).status)
    assert.equal(200, ask({ ["x-hold"] = "2" }).status)
    res = ask({ ["x-hold"] = "3" })
    assert.equal("held 200", res.body)
    -- no hold: even a retryable status goes to the client
    assert.equal(503, ask({ ["x-status"] = "503" }).status)
    -- a worker that cannot be reached: nil, err
    assert.equal(502, ask({ ["x-mode"] = "dead" }).status)
    assert.same({ nil, "connect" }, seen.dead)
    -- bad arguments raise before anything is sent
    assert.equal(400, ask({ ["x-mode"] = "badextra" }).status)
    assert.is_false(seen.bad[1])
    assert.truthy(tostring(seen.bad[2]):find("forbidden", 1, true), tostring(seen.bad[2]))
    assert.is_false(seen.badhold[1])
    -- every exchange went back: the legs without a box were freed
    collectgarbage()
    collectgarbage()
    assert.equal(active0, core.active())
    router:close()
    worker:close()
  end)

  it("relays the client's request with its request id and authorization as told", function()
    local seen = {}
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local h = x:headers()
      seen[#seen + 1] = { method = x:method(), url = x:url(), body = x:body(), id = h["x-request-id"],
        auth = h["authorization"], keep = h["x-keep"], hop = h["x-hop"], te = h["te"] }
      x:respond(200, {}, "ok")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local errs = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local mode = x:header("x-mode")
      local auth
      if mode == "set" then auth = "Bearer worker" elseif mode == "drop" then auth = false end
      if mode == "bad" then
        for _, a in ipairs({ { "id\r\nx-b: 1" }, { "id", "t\nx" }, { "id", 5 } }) do
          local ok, err = pcall(x.relay, x, pool, nil, 1000, 1000, a[1], a[2])
          errs[#errs + 1] = not ok and tostring(err) or "accepted"
        end
        return x:respond(204, {}, "")
      end
      local resp = assert(x:relay(pool, nil, 1000, 1000, "rid-" .. mode, auth))
      resp:pipe()
      resp:close()
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    for _, mode in ipairs({ "set", "drop", "pass" }) do
      local res = assert(core.request(rpool, { method = "POST", path = "/v1/x?q=1", body = "{}",
        headers = { ["x-mode"] = mode, authorization = "Bearer client", ["x-request-id"] = "client-id",
          ["x-keep"] = "1", ["x-hop"] = "2", connection = "x-hop", te = "trailers" } }))
      assert.equal(200, res.status)
    end
    assert.equal(204, assert(core.request(rpool, { headers = { ["x-mode"] = "bad" } })).status)
    assert.equal(3, #seen)
    for i, want in ipairs({ "Bearer worker", false, "Bearer client" }) do
      local s = seen[i]
      assert.equal("POST", s.method)
      assert.equal("/v1/x?q=1", s.url)
      assert.equal("{}", s.body)
      assert.equal("1", s.keep)
      assert.is_nil(s.hop)                     -- named in Connection: hop-by-hop
      assert.is_nil(s.te)
      assert.equal(want or nil, s.auth)
    end
    assert.equal("rid-set", seen[1].id)
    assert.equal("rid-pass", seen[3].id)
    assert.truthy(errs[1]:find("forbidden character", 1, true), errs[1])
    assert.truthy(errs[2]:find("forbidden character", 1, true), errs[2])
    assert.truthy(errs[3]:find("a string, false or nil expected", 1, true), errs[3])
    router:close()
    worker:close()
  end)

  it("refuses header names and values that would split or corrupt a head", function()
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      x:respond(200, {}, x:header("x-ok") or "none")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local long = string.rep("a", 21)
    local bad = {
      { ["x-a"] = long .. "\r\nx-b: 1" }, { ["x-a"] = "v\n" }, { ["x-a"] = long .. "\0" .. long },
      { ["x:a"] = "v" }, { ["x a"] = "v" }, { [""] = "v" }, { [long .. "\r" .. long] = "v" },
      { ["x-a"] = {} },
    }
    local errs = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      for i, h in ipairs(bad) do
        local ok, err = pcall(x.forward, x, pool, { headers = h })
        errs[i] = not ok and tostring(err) or "accepted"
      end
      -- a tab inside a value and a number are fine
      local resp = assert(x:forward(pool, { headers = { ["x-ok"] = long .. "\t" .. long, ["x-n"] = 5 } }))
      resp:pipe()
      resp:close()
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local res = assert(core.request(rpool, { path = "/" }))
    assert.equal(long .. "\t" .. long, res.body)
    assert.equal(#bad, #errs)
    for i = 1, #bad - 1 do assert.truthy(errs[i]:find("forbidden character", 1, true), errs[i]) end
    assert.truthy(errs[#bad]:find("must be strings", 1, true), errs[#bad])
    router:close()
    worker:close()
  end)

  it("frees a PD exchange at close: from then on it reads as closed", function()
    local prefill = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "{}") end))
    local decode = assert(core.listen("127.0.0.1", 0, {}, function(x)
      x:respond(200, { ["x-w"] = "d" }, x:body())
    end))
    local ppool = assert(core.upstream("http://127.0.0.1:" .. prefill:port()))
    local dpool = assert(core.upstream("http://127.0.0.1:" .. decode:port()))
    local seen = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local pdx, pst, dst = assert(x:forward_pd(ppool, dpool, { route = "generate", host = "h", port = 7 }))
      seen.pst, seen.dst, seen.header = pst, dst, pdx:header("x-w")
      seen.pipe = { pdx:pipe() }
      seen.outcome = { pdx:outcome() }
      pdx:close()
      pdx:close()                       -- a second close is a no-op
      seen.after = { pdx:status(), pdx:prefill_status(), pdx:header("x-w"), pdx:outcome() }
      seen.pipe_ok, seen.pipe_err = pcall(pdx.pipe, pdx)
      seen.read_ok = pcall(pdx.read, pdx)
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    for _ = 1, 2 do
      local res = assert(core.request(rpool, { method = "POST", path = "/generate", body = '{"text":"hi"}' }))
      assert.equal(200, res.status)
      assert.truthy(res.body:find('"bootstrap_room":', 1, true))   -- the spliced body, sent by reference
      assert.truthy(res.body:find('"bootstrap_host":"h","bootstrap_port":7', 1, true))
      assert.equal(200, seen.pst)
      assert.equal(200, seen.dst)
      assert.equal("d", seen.header)
      assert.same({ true, nil, nil, "ok", "ok" }, seen.pipe)
      assert.same({ "ok", "ok" }, seen.outcome)
      assert.same({ 0, 0 }, seen.after)
      assert.is_false(seen.pipe_ok)
      assert.truthy(tostring(seen.pipe_err):find("not waiting", 1, true))
      assert.is_false(seen.read_ok)
    end
    router:close()
    prefill:close()
    decode:close()
  end)

  it("relay_pd with a hold commits at the heads, or returns the heads the hold keeps", function()
    local prefill, decode, ppool, dpool = pd_legs(function(name, x)
      local st = tonumber(x:header("x-" .. name)) or 200
      x:respond(st, { ["x-leg"] = name, ["x-request-id"] = "from-" .. name }, name .. " " .. st)
    end)
    local seen = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local batch, flags = assert(x:pd_check("generate"))
      local hold = tonumber(x:header("x-hold"))
      local extra = x:header("x-extra") and { ["x-extra"] = "e" } or nil
      if x:header("x-bad") then
        seen.bad = { pcall(x.relay_pd, x, ppool, dpool, nil, nil, 1000, 1000, "rid", nil, "generate", "h",
          7, batch, flags, nil, 9) }
        return x:respond(400, {}, "bad")
      end
      local t0 = core.now()
      local function pack(...) return { n = select("#", ...), ... } end
      local r = pack(x:relay_pd(ppool, dpool, nil, nil, 1000, 1000, "rid-2", nil, "generate", "h", 7, batch,
        flags, extra, hold))
      seen.n, seen.pst, seen.dst = r.n, r[2], r[3]
      seen.piped = r[4] ~= nil and r[4] >= t0 and r[4] <= core.now()
      seen.ok, seen.perr, seen.pres, seen.dres = r[5], r[6], r[8], r[9]
      local pdx = r[1]
      if not seen.piped then
        seen.body = pdx:read()
        x:respond(299, {}, "held")
      end
      pdx:close()
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local function ask(h)
      return assert(core.request(rpool, { method = "POST", path = "/generate", body = '{"text":"hi"}', headers = h }))
    end
    -- committed at the heads: the decode's answer with the request id and the extra headers
    local res = ask({ ["x-hold"] = "0", ["x-extra"] = "1" })
    assert.equal(200, res.status)
    assert.equal("decode 200", res.body)
    assert.equal("rid-2", res.headers["x-request-id"])
    assert.equal("e", res.headers["x-extra"])
    assert.equal("decode", res.headers["x-leg"])
    assert.same({ n = 9, pst = 200, dst = 200, piped = true, ok = true, pres = "ok", dres = "ok" }, seen)
    -- hold 1: a retryable decode status is the caller's; another is passed on
    res = ask({ ["x-hold"] = "1", ["x-decode"] = "503" })
    assert.equal(299, res.status)
    assert.same({ n = 3, pst = 200, dst = 503, piped = false, body = "decode 503" }, seen)
    res = ask({ ["x-hold"] = "1", ["x-decode"] = "404" })
    assert.equal(404, res.status)
    assert.equal("decode 404", res.body)
    -- a prefill that refused is always the caller's; hold 3 keeps any status
    assert.equal(299, ask({ ["x-hold"] = "0", ["x-prefill"] = "500" }).status)
    assert.equal(500, seen.pst)
    assert.equal(299, ask({ ["x-hold"] = "3" }).status)
    -- without a hold, relay_pd returns at the heads as before
    assert.equal(299, ask({}).status)
    assert.equal(3, seen.n)
    assert.equal(400, ask({ ["x-bad"] = "1" }).status)
    assert.is_false(seen.bad[1])
    router:close()
    prefill:close()
    decode:close()
  end)

  it("relays a PD request to both legs with the request id, authorization and bootstrap fields", function()
    local legs = {}
    local prefill, decode, ppool, dpool = pd_legs(function(name, x)
      local h = x:headers()
      legs[#legs + 1] = { name = name, id = h["x-request-id"], auth = h.authorization, body = x:body() }
      x:respond(200, {}, name == "decode" and '{"text":"d"}' or "{}")
    end)
    local errs = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local batch, flags = assert(x:pd_check("generate"))
      local mode = x:header("x-mode")
      if mode == "bad" then
        for _, a in ipairs({ { "id\n" }, { "id", 5 }, { "id", nil, "nope" } }) do
          local ok, err = pcall(x.relay_pd, x, ppool, dpool, nil, nil, 1000, 1000, a[1], a[2],
            a[3] or "generate", "h", 7, batch, flags)
          errs[#errs + 1] = not ok and tostring(err) or "accepted"
        end
        return x:respond(204, {}, "")
      end
      local auth = mode == "set" and "Bearer w" or nil
      if mode == "drop" then auth = false end
      local pdx = assert(x:relay_pd(ppool, dpool, nil, nil, 1000, 1000, "rid-" .. mode, auth, "generate",
        "h", mode == "set" and 7 or nil, batch, flags))
      pdx:pipe()
      pdx:close()
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    for _, mode in ipairs({ "set", "drop", "pass" }) do
      legs = {}
      local res = assert(core.request(rpool, { method = "POST", path = "/generate", body = '{"text":"hi"}',
        headers = { ["x-mode"] = mode, authorization = "Bearer c" } }))
      assert.equal(200, res.status)
      assert.equal('{"text":"d"}', res.body)
      assert.equal(2, #legs)
      for _, l in ipairs(legs) do
        assert.equal("rid-" .. mode, l.id)
        assert.equal(({ set = "Bearer w", pass = "Bearer c" })[mode], l.auth)
        assert.truthy(l.body:find('"bootstrap_host":"h","bootstrap_port":' .. (mode == "set" and "7" or "null"), 1, true),
          l.body)
      end
    end
    assert.equal(204, assert(core.request(rpool, { method = "POST", path = "/generate", body = '{"text":"hi"}',
      headers = { ["x-mode"] = "bad" } })).status)
    assert.truthy(errs[1]:find("forbidden character", 1, true), errs[1])
    assert.truthy(errs[2]:find("a string, false or nil expected", 1, true), errs[2])
    assert.truthy(errs[3]:find("unknown route", 1, true), errs[3])
    router:close()
    prefill:close()
    decode:close()
  end)

  it("frees a response at close: its status reads 0 and a pipe or read after it raises", function()
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, { ["x-w"] = "1" }, "hi") end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local seen = {}
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local resp = assert(x:forward(pool, {}))
      seen.status, seen.header = resp:status(), resp:header("x-w")
      resp:close()
      resp:close()                      -- a second close is a no-op
      seen.after_status, seen.after_header = resp:status(), resp:header("x-w")
      seen.pipe_ok, seen.pipe_err = pcall(resp.pipe, resp)
      seen.read_ok = pcall(resp.read, resp)
      x:respond(200, {}, "closed")
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    for _ = 1, 2 do                     -- the second on the same, reused connection
      local res = assert(core.request(rpool, { path = "/" }))
      assert.equal("closed", res.body)
      assert.equal(200, seen.status)
      assert.equal("1", seen.header)
      assert.equal(0, seen.after_status)
      assert.is_nil(seen.after_header)
      assert.is_false(seen.pipe_ok)
      assert.truthy(tostring(seen.pipe_err):find("not waiting", 1, true))
      assert.is_false(seen.read_ok)
    end
    assert.equal(1, rpool:stats().conns)
    router:close()
    worker:close()
  end)

  it("pipes a response with x-request-id from a request id string, unless the headers name it", function()
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x)
      x:respond(200, { ["x-request-id"] = "from-worker", ["x-w"] = "1" }, "hi")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local resp = assert(x:forward(pool, {}))
      local mode = x:path()
      if mode == "/id" then
        assert(resp:pipe(nil, "rid-1"))
      elseif mode == "/both" then
        assert(resp:pipe({ ["x-request-id"] = "from-table", ["x-t"] = "2" }, "rid-2"))
      else
        local ok, err = pcall(resp.pipe, resp, nil, 42)
        resp:close()
        x:respond(500, {}, ok and "piped" or tostring(err))
      end
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local res = assert(core.request(rpool, { path = "/id" }))
    assert.equal("hi", res.body)
    assert.equal("rid-1", res.headers["x-request-id"])
    assert.equal("1", res.headers["x-w"])
    res = assert(core.request(rpool, { path = "/both" }))
    assert.equal("from-table", res.headers["x-request-id"])
    assert.equal("2", res.headers["x-t"])
    res = assert(core.request(rpool, { path = "/bad" }))
    assert.truthy(res.body:find("request id must be a string", 1, true))
    router:close()
    worker:close()
  end)

  it("leaves no finalizer on a closed response or an ended request's exchange", function()
    local worker = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "hi") end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. worker:port()))
    local seen, kept = {}, nil
    local router = assert(core.listen("127.0.0.1", 0, {}, function(x)
      kept = x
      seen.x_gc_live = getmetatable(x).__gc ~= nil
      local resp = assert(x:forward(pool, {}))
      seen.resp_gc_live = getmetatable(resp).__gc ~= nil
      resp:close()
      seen.resp_gc_closed = getmetatable(resp).__gc ~= nil
      seen.resp_status = resp:status()         -- methods still answer as a closed response's
      x:respond(200, {}, "ok")
    end))
    local rpool = assert(core.upstream("http://127.0.0.1:" .. router:port()))
    local res = assert(core.request(rpool, { path = "/" }))
    assert.equal("ok", res.body)
    assert.is_true(seen.x_gc_live)
    assert.is_true(seen.resp_gc_live)
    assert.is_false(seen.resp_gc_closed)
    assert.equal(0, seen.resp_status)
    assert.is_nil(getmetatable(kept).__gc)   -- the handler has returned
    local ok, err = pcall(kept.path, kept)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("closed", 1, true))
    router:close()
    worker:close()
  end)

  it("serves an Upgrade request as plain HTTP and keeps the connection", function()
    local uv = require "luv"
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "ok " .. x:path()) end))
    local c, got = uv.new_tcp(), ""
    c:connect("127.0.0.1", srv:port(), function()
      c:write("GET /a HTTP/1.1\r\nhost: a\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
        .. "http2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\n\r\n")
      c:read_start(function(_, d) if d then got = got .. d end end)
    end)
    local t = core.now()
    while not got:find("ok /b", 1, true) and core.now() - t < 2000 do core.sleep(5) end
    c:close()
    srv:close()
    assert.truthy(got:find("ok /a", 1, true))
    assert.truthy(got:find("ok /b", 1, true))
  end)

  it("reports connection failures as errors, not raises", function()
    local pool = assert(core.upstream("http://127.0.0.1:1"))
    local res, err = core.request(pool, { path = "/" })
    assert.is_nil(res)
    assert.equal("connect", err)
    assert.is_nil(core.upstream("ftp://x"))
  end)

  it("resolves a worker's host name in the background", function()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x) x:respond(200, {}, "ok " .. x:path()) end))
    local pool = assert(core.upstream("http://localhost:" .. srv:port()))
    assert.is_nil(pool:stats().address)          -- not known yet: nothing blocked
    local res = assert(core.request(pool, { path = "/named" }))
    assert.equal("ok /named", res.body)
    assert.equal("127.0.0.1:" .. srv:port(), pool:stats().address)
    assert.equal(1, pool:stats().resolves)
    srv:close()
    -- a name that does not resolve fails the request, not the pool's making
    local bad = assert(core.upstream("http://no-such-worker.invalid:8000"))
    local r2, err = core.request(bad, { path = "/", connect_timeout_ms = 5000 })
    assert.is_nil(r2)
    assert.equal("connect", err)
    assert.truthy(bad:stats().resolve_error)
  end)
end)
