-- Text log lines: a value a client chose cannot forge fields or lines.
local log = require "sglr.log"

describe("text log values", function()
  local v = log.text_value

  it("stay as they are when plain", function()
    assert.equal("gnt-abc123", v("gnt-abc123"))
    assert.equal("200", v(200))
    assert.equal("http://127.0.0.1:8000", v("http://127.0.0.1:8000"))
  end)

  it("are quoted and escaped when they hold spaces, quotes, '=' or control bytes", function()
    assert.equal('"a b"', v("a b"))
    assert.equal('"x\\nlevel=error worker=evil"', v("x\nlevel=error worker=evil"))
    assert.equal('"q\\"\\\\"', v('q"\\'))
    assert.equal('"bell\\x07"', v("bell\a"))
    assert.equal('""', v(""))
  end)

  it("keep a forged request id inside its own field on one line", function()
    local out = {}
    local real = io.stderr
    io.stderr = { write = function(_, s) out[#out + 1] = s end } -- luacheck: ignore 122
    log.configure({ log_level = "info" })
    local ok, err = pcall(log.info, "request", { request_id = "id\nFAKE level=error", status = 200 })
    io.stderr = real -- luacheck: ignore 122
    assert(ok, err)
    local line = table.concat(out)
    assert.equal(1, select(2, line:gsub("\n", "")))
    assert.truthy(line:find('request_id="id\\nFAKE level=error" status=200', 1, true))
  end)
end)

-- The request path's lines are formatted in C (core.log_line): each must be
-- the line log.log prints for the same fields, byte for byte after the
-- timestamp.
describe("native log lines", function()
  local core = require "sglr.core"

  local function lua_line(lvl, msg, fields)
    local out = {}
    local real = io.stderr
    io.stderr = { write = function(_, s) out[#out + 1] = s end } -- luacheck: ignore 122
    log.configure({ log_level = "debug" })
    local ok, err = pcall(log.log, lvl, msg, fields)
    io.stderr = real -- luacheck: ignore 122
    log.configure({ log_level = "info" })
    assert(ok, err)
    return table.concat(out)
  end

  -- fields as sorted key/value pairs (nil values kept in place)
  local function c_line(lvl, msg, keys, fields)
    local args = {}
    for i, k in ipairs(keys) do args[2 * i - 1], args[2 * i] = k, fields[k] end
    return core.log_line(lvl, msg, 2, unpack(args, 1, 2 * #keys))
  end

  local KEYS = { "duration_ms", "error", "prefill", "request_id", "retries", "route", "status",
    "stream", "worker" }
  local cases = {
    { request_id = "gnt-0123456789abcdef", route = "generate", worker = "http://127.0.0.1:8000",
      status = 200, duration_ms = 1.3, retries = 0, stream = false },
    { request_id = "id\nFAKE level=error", route = "chat", worker = "-", status = 503,
      duration_ms = 0, retries = 2, stream = true, error = "no_workers" },
    { request_id = 'q"\\ \t\r\a\127end', route = "completions", worker = "http://w:1",
      prefill = "http://p:2", status = 502, duration_ms = 12345.6, retries = 1, stream = false,
      error = "retries_exhausted" },
    { request_id = "", route = "generate", worker = "x=y", status = 200, duration_ms = 0.1,
      retries = 0, stream = false },
    { request_id = "caf\195\169", route = "generate", worker = "w", status = 200,
      duration_ms = 1e15, retries = 0, stream = false },
  }

  it("match log.log's text line for the access line's fields", function()
    for _, f in ipairs(cases) do
      local want = lua_line("info", "request", f)
      local got = c_line("info", "request", KEYS, f)
      assert.equal(want:sub(25), got:sub(25))
    end
    local nums = { 0, 1, 9, 10, 0.1, 0.5, 1.3, 99.9, 100.1, 12345.6, 0.05, 1 / 3, -2, -0.5, 1e13,
      123456789012.3, 1e15, 2 ^ 53, 1e300, 2.5e-7 }
    for _, v in ipairs(nums) do
      local got = c_line("warn", "worker request failed", { "a" }, { a = v })
      assert.equal(lua_line("warn", "worker request failed", { a = v }):sub(25), got:sub(25))
    end
  end)

  it("quote a value for each special byte at any place in a long value, as log.log does", function()
    -- the native check looks at eight bytes a step: every position of the
    -- first two words and the tail, each special byte, and UTF-8 around them
    local specials = { " ", "\t", "\n", "\0", "\127", "=", '"', "\\", "\31" }
    for len = 1, 19 do
      for at = 1, len do
        for _, sp in ipairs(specials) do
          local val = ("\195\169abcdefghijklmnopqrstuvwxyz"):sub(1, len)
          val = val:sub(1, at - 1) .. sp .. val:sub(at + 1)
          local got = c_line("info", "m", { "k" }, { k = val })
          assert.equal(lua_line("info", "m", { k = val }):sub(25), got:sub(25))
        end
        local plain = ("\226\130\172-abcdefghijklmnopqrstuvwxyz"):sub(1, len)
        assert.equal(lua_line("info", "m", { k = plain }):sub(25), c_line("info", "m", { "k" }, { k = plain }):sub(25))
      end
    end
  end)

  it("write the access line of log.access in one native call as log.log writes it", function()
    -- what log.access queues goes to fd 2: caught in a file for the test
    local ffi = require "ffi"
    pcall(ffi.cdef, "int dup(int); int dup2(int, int); int close(int);")
    pcall(ffi.cdef, "int fileno(void *);")
    pcall(ffi.cdef, "int sglr_lua_x_set_request_id(void *x, const char *names, const char *prefix);")
    -- last, a request whose id its exchange keeps (the flow's case): no
    -- id given, the line has the exchange's
    local kept = { request_id = "kept-7", route = "generate", worker = "http://127.0.0.1:8000",
      status = 200, duration_ms = 2.5, retries = 0, stream = false }
    local path = os.tmpname()
    local saved = ffi.C.dup(2)
    core.log_flush()
    local tmp = assert(io.open(path, "w"))
    ffi.C.dup2(ffi.C.fileno(tmp), 2)
    local n = 0
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      n = n + 1
      local c, rid = cases[n], nil
      if c then
        rid = c.request_id
      else
        c = kept
        assert(ffi.C.sglr_lua_x_set_request_id(x, "x-request-id\0\0", "gnt-") == 6)
      end
      x:respond(c.status, {}, "")
      log.access(x, c.duration_ms, c.error, c.prefill, rid, c.retries, c.route, c.stream, c.worker)
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    for _ = 1, #cases do assert(core.request(pool, { path = "/" })) end
    assert(core.request(pool, { path = "/", headers = { ["x-request-id"] = "kept-7" } }))
    core.log_flush()
    ffi.C.dup2(saved, 2)
    ffi.C.close(saved)
    tmp:close()
    srv:close()
    local lines = {}
    for line in io.lines(path) do lines[#lines + 1] = line .. "\n" end
    os.remove(path)
    assert.equal(#cases + 1, #lines)
    for i, c in ipairs(cases) do
      assert.equal(lua_line("info", "request", c):sub(25), lines[i]:sub(25))
    end
    assert.equal(lua_line("info", "request", kept):sub(25), lines[#cases + 1]:sub(25))
  end)

  it("refuse a key or value of another type, and keep nothing of that line", function()
    local ok, err = pcall(core.log_line, "info", "m", 2, "a", "1", {}, "x")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("string expected", 1, true), err)
    ok, err = pcall(core.log_line, "info", "m", 2, "a", "1", "b", {})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("string, number or boolean expected", 1, true), err)
    -- the next line starts clean: no piece of a refused one before it
    local got = c_line("info", "after", { "k" }, { k = "v" })
    assert.truthy(got:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ info  after k=v\n$"), got)
  end)

  it("pad every level name as log.log does", function()
    for _, lvl in ipairs({ "debug", "info", "warn", "error" }) do
      local got = c_line(lvl, "msg", { "k" }, { k = "v" })
      assert.equal(lua_line(lvl, "msg", { k = "v" }):sub(25), got:sub(25))
    end
  end)

  it("carry the same timestamp format", function()
    local got = c_line("info", "request", { "status" }, { status = 200 })
    assert.truthy(got:match("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ info  request status=200\n$"))
  end)

  it("are one line each, whatever a value holds", function()
    local got = c_line("info", "request", { "request_id" }, { request_id = "a\nb\r\nc" })
    assert.equal(1, select(2, got:gsub("\n", "")))
  end)
end)
