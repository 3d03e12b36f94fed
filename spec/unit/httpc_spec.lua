-- The control-plane client for what a Kubernetes watch needs: a body
-- handed over as it arrives and split into lines, cancelling one request
-- in flight, a bearer token and TLS with a CA (file or PEM in memory) and
-- a client certificate. The servers here run on the spec's own loop
-- (luv TCP, 127.0.0.1), or are an `openssl s_server` for TLS.
local core = require "sglr.core"
local uv = require "luv"
local cjson = require "cjson.safe"
local http = require "sglr.http"

local function wait_for(pred, ms, what)
  local deadline = core.now() + (ms or 5000)
  while not pred() do
    if core.now() > deadline then error("timed out waiting for " .. (what or "condition"), 2) end
    core.sleep(5)
  end
end

-- A server that answers every request with a chunked body written piece by
-- piece, gap_ms apart (pieces: a list, or a function(i) -> piece | nil for
-- the end). It records what it saw: connections, requests (head text),
-- pieces written, and connections the client closed.
local function stream_server(pieces, gap_ms)
  local srv = { conns = 0, closed = 0, written = 0, heads = {}, clients = {} }
  local tcp = uv.new_tcp()
  assert(tcp:bind("127.0.0.1", 0))
  srv.port = tcp:getsockname().port
  local function piece(i)
    if type(pieces) == "function" then return pieces(i) end
    return pieces[i]
  end
  assert(tcp:listen(16, function()
    local c = uv.new_tcp()
    tcp:accept(c)
    srv.conns = srv.conns + 1
    srv.clients[#srv.clients + 1] = c
    local buf, answered = "", false
    c:read_start(function(err, data)
      if not data then
        srv.closed = srv.closed + 1
        if not c:is_closing() then c:close() end
        return
      end
      buf = buf .. data
      if answered or not buf:find("\r\n\r\n", 1, true) then return end
      answered = true
      srv.heads[#srv.heads + 1] = buf
      c:write("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n")
      core.spawn(function()
        local i = 1
        while not c:is_closing() do
          local p = piece(i)
          if not p then
            c:write("0\r\n\r\n")
            return
          end
          c:write(string.format("%x\r\n%s\r\n", #p, p))
          srv.written = i
          i = i + 1
          core.sleep(gap_ms)
        end
      end)
    end)
  end))
  srv.url = "http://127.0.0.1:" .. srv.port
  function srv.close()
    for _, c in ipairs(srv.clients) do if not c:is_closing() then c:close() end end
    tcp:close()
  end
  return srv
end

describe("http.lines", function()
  local function split(pieces, max)
    local out = {}
    local feed = http.lines(function(line) out[#out + 1] = line end, max)
    for _, p in ipairs(pieces) do feed(p) end
    return out, feed
  end

  it("joins a line split across pieces and ends lines at LF or CRLF", function()
    local out, feed = split({ '{"a":1}\n{"b"', ':2}\r', "\n\n", "x", "y", "z\n", "tail" })
    assert.same({ '{"a":1}', '{"b":2}', "", "xyz" }, out)
    feed(nil)                         -- the end: the last line without its newline
    assert.same({ '{"a":1}', '{"b":2}', "", "xyz", "tail" }, out)
    feed(nil)
    assert.equal(5, #out)
  end)

  it("refuses a line that grows past its limit", function()
    local feed = http.lines(function() end, 8)
    feed("12345")
    assert.has_error(function() feed("6789") end, "line longer than 8 bytes")
    local feed2 = http.lines(function() end, 8)
    assert.has_error(function() feed2("123456789\n") end, "line longer than 8 bytes")
    assert.has_no_error(function() http.lines(function() end, 8)("12345678\n") end)
  end)
end)

describe("sglr.httpc streaming and cancel", function()
  local srv
  after_each(function()
    if srv then srv.close() end
    srv = nil
  end)

  it("hands over lines of a slow stream as they arrive", function()
    srv = stream_server({ '{"n":1}\n{"n"', ':2}\n', '{"n":3}\n' }, 60)
    local got, written_at = {}, {}
    local status, body, headers = http.request{ url = srv.url .. "/watch", timeout_ms = 5000,
      on_chunk = http.lines(function(line)
        got[#got + 1] = cjson.decode(line).n
        written_at[#written_at + 1] = srv.written
      end) }
    assert.equal(200, status)
    assert.equal("", body)           -- it all went to on_chunk
    assert.equal("application/json", headers["content-type"])
    assert.same({ 1, 2, 3 }, got)
    -- each line came while the server had not written the next piece yet
    assert.same({ 1, 2, 3 }, written_at)
  end)

  it("gives on_chunk the status of the response", function()
    srv = stream_server({ "a", "b" }, 5)
    local statuses = {}
    assert.equal(200, (http.request{ url = srv.url, on_chunk = function(_, st) statuses[#statuses + 1] = st end }))
    assert.equal(200, statuses[1])
  end)

  it("cancels a stream in flight: wait() says cancelled and the connection closes", function()
    srv = stream_server(function(i) return '{"n":' .. i .. '}\n' end, 10)
    local lines = 0
    local req = assert(http.start{ url = srv.url .. "/forever", timeout_ms = 0,
      on_chunk = http.lines(function() lines = lines + 1 end) })
    assert.is_false(req:done())
    wait_for(function() return lines >= 3 end, 5000, "three lines")
    assert.is_true(req:cancel())
    local seen = lines
    local st, err = req:wait()
    assert.is_nil(st)
    assert.equal("cancelled", err)
    assert.is_true(req:done())
    assert.is_false(req:cancel())      -- over already
    wait_for(function() return srv.closed == 1 end, 5000, "the server to see the close")
    core.sleep(30)
    assert.equal(seen, lines)          -- nothing after the cancel
    -- wait() again gives the same answer
    assert.same({ nil, "cancelled" }, { req:wait() })
  end)

  it("cancels from inside on_chunk, and from another coroutine while one waits", function()
    srv = stream_server(function(i) return '{"n":' .. i .. '}\n' end, 10)
    local req, n
    n = 0
    req = assert(http.start{ url = srv.url, timeout_ms = 0, on_chunk = function()
      n = n + 1
      if n == 2 then req:cancel() end
    end })
    assert.same({ nil, "cancelled" }, { req:wait() })
    assert.equal(2, n)

    local other = assert(http.start{ url = srv.url, timeout_ms = 0, on_chunk = function() end })
    core.spawn(function() core.sleep(30); other:cancel() end)
    local t0 = core.now()
    assert.same({ nil, "cancelled" }, { other:wait() })
    assert.is_true(core.now() - t0 < 2000)
    wait_for(function() return srv.closed == 2 end, 5000, "both connections closed")
  end)

  it("cancels before the request connected", function()
    srv = stream_server({ "x" }, 5)
    local req = assert(http.start{ url = srv.url })
    assert.is_true(req:cancel())
    assert.same({ nil, "cancelled" }, { req:wait() })
    core.sleep(30)
    assert.equal(0, srv.conns)
  end)

  it("ends the request with the error of an on_chunk that raises", function()
    srv = stream_server(function(i) return "line " .. i .. "\n" end, 10)
    local st, err = http.request{ url = srv.url, timeout_ms = 0,
      on_chunk = http.lines(function(line) if line == "line 2" then error("bad event (expected in this spec)") end end) }
    assert.is_nil(st)
    assert.matches("^on_chunk failed: .*bad event %(expected in this spec%)", err)
    wait_for(function() return srv.closed == 1 end, 5000, "the connection closed")
  end)

  it("cancels the request of a handle that is collected", function()
    srv = stream_server(function(i) return i .. "\n" end, 10)
    local lines = 0
    local held = { assert(http.start{ url = srv.url, timeout_ms = 0,
      on_chunk = function() lines = lines + 1 end }) }
    wait_for(function() return lines >= 1 and held[1] end, 5000, "a line")
    held[1] = nil
    collectgarbage()
    collectgarbage()
    wait_for(function() return srv.closed == 1 end, 5000, "the connection closed")
  end)

  it("sends a bearer token and refuses one that would inject a header", function()
    srv = stream_server({ "ok" }, 5)
    assert.equal(200, (http.request{ url = srv.url, bearer_token = "tok-123" }))
    assert.matches("\r\nauthorization: Bearer tok%-123\r\n", srv.heads[1]:lower():gsub("bearer", "Bearer"))
    assert.has_error(function() http.request{ url = srv.url, bearer_token = "a\r\nx: y" } end,
      "httpc.request: invalid bearer_token (empty, or CR/LF/NUL in it)")
    assert.has_error(function() http.start{ url = srv.url, on_chunk = 5 } end,
      "httpc.request: 'on_chunk' must be a function, got number")
  end)
end)

-- TLS against `openssl s_server -www` (it answers GET / with a status page):
-- a CA made here signs the server's certificate (for IP 127.0.0.1) and a
-- client certificate; the second server requires a client certificate.
describe("sglr.httpc TLS", function()
  local dir, servers = nil, {}
  local has_openssl = os.execute("openssl version >/dev/null 2>&1") == 0

  local function sh(cmd)
    local ok = os.execute(cmd .. " >/dev/null 2>&1")
    assert(ok == 0 or ok == true, "failed: " .. cmd)
  end

  local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
  end

  local function free_port()
    local t = uv.new_tcp()
    t:bind("127.0.0.1", 0)
    local p = t:getsockname().port
    t:close()
    return p
  end

  local function s_server(extra)
    local port = free_port()
    local pipes = { uv.new_pipe(false), uv.new_pipe(false) }
    local args = { "s_server", "-accept", "127.0.0.1:" .. port, "-www", "-quiet",
      "-cert", dir .. "/server.pem", "-key", dir .. "/server.key" }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    local handle, err = uv.spawn("openssl", { args = args, stdio = { nil, pipes[1], pipes[2] } }, function() end)
    assert(handle, "cannot start openssl s_server: " .. tostring(err))
    for _, p in ipairs(pipes) do p:read_start(function() end) end
    servers[#servers + 1] = { handle = handle, pipes = pipes }
    -- ready once it accepts a TCP connection
    wait_for(function()
      local t, ok = uv.new_tcp(), nil
      t:connect("127.0.0.1", port, function(cerr) ok = not cerr; t:close() end)
      while ok == nil do core.sleep(5) end
      return ok
    end, 10000, "openssl s_server on " .. port)
    return "https://127.0.0.1:" .. port .. "/"
  end

  setup(function()
    assert(has_openssl, "openssl is missing (make deps installs it)")
    dir = os.tmpname()
    os.remove(dir)
    sh("mkdir -p " .. dir)
    local o = "openssl "
    sh(o .. "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=sglr-test-ca"
      .. " -keyout " .. dir .. "/ca.key -out " .. dir .. "/ca.pem")
    -- a CA that signed nothing here: trusting it alone must not do
    sh(o .. "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=sglr-other-ca"
      .. " -keyout " .. dir .. "/other.key -out " .. dir .. "/other.pem")
    for _, who in ipairs({ "server", "client" }) do
      sh(o .. "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=" .. who
        .. " -keyout " .. dir .. "/" .. who .. ".key -out " .. dir .. "/" .. who .. ".csr")
      local ext = dir .. "/" .. who .. ".ext"
      local f = assert(io.open(ext, "w"))
      f:write(who == "server" and "subjectAltName=IP:127.0.0.1\n" or "extendedKeyUsage=clientAuth\n")
      f:close()
      sh(o .. "x509 -req -days 2 -in " .. dir .. "/" .. who .. ".csr -CA " .. dir .. "/ca.pem -CAkey "
        .. dir .. "/ca.key -CAcreateserial -extfile " .. ext .. " -out " .. dir .. "/" .. who .. ".pem")
    end
  end)

  teardown(function()
    for _, s in ipairs(servers) do
      uv.process_kill(s.handle, "sigterm")
      s.handle:close()
      for _, p in ipairs(s.pipes) do p:close() end
    end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  it("verifies the server with a CA given as a file or as PEM in memory", function()
    assert(has_openssl, "openssl is missing (make deps installs it)")
    local url = s_server()
    local st, err = http.request{ url = url, timeout_ms = 5000 }
    assert.is_nil(st)                 -- not signed by a CA the system trusts
    assert.matches("certificate", err)
    st, err = http.request{ url = url, timeout_ms = 5000, ca_file = dir .. "/ca.pem" }
    assert.equal(200, st, err)
    st, err = http.request{ url = url, timeout_ms = 5000, ca_data = read(dir .. "/ca.pem") }
    assert.equal(200, st, err)
    st, err = http.request{ url = url, timeout_ms = 5000, ca_data = read(dir .. "/other.pem") }
    assert.is_nil(st)                 -- the wrong CA
    assert.truthy(err)
    st, err = http.request{ url = url, timeout_ms = 5000, insecure = true }
    assert.equal(200, st, err)
  end)

  it("presents a client certificate, from files or from memory", function()
    assert(has_openssl, "openssl is missing (make deps installs it)")
    local url = s_server({ "-Verify", "1", "-CAfile", dir .. "/ca.pem" })
    local ca = read(dir .. "/ca.pem")
    local st, err = http.request{ url = url, timeout_ms = 5000, ca_data = ca }
    assert.is_nil(st)                 -- no client certificate: refused
    assert.truthy(err)
    st, err = http.request{ url = url, timeout_ms = 5000, ca_data = ca,
      cert_data = read(dir .. "/client.pem"), key_data = read(dir .. "/client.key") }
    assert.equal(200, st, err)
    st, err = http.request{ url = url, timeout_ms = 5000, ca_file = dir .. "/ca.pem",
      cert_file = dir .. "/client.pem", key_file = dir .. "/client.key", bearer_token = "t" }
    assert.equal(200, st, err)
  end)
end)
