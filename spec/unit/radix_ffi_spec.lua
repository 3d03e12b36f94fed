-- sglr.radix_ffi: t:match and t:insert through the FFI answer and raise
-- as the C methods they replace.
local radix = require "sglr.radix_ffi"
local core = require "sglr.core"
local extract = require "sglr.extract"

describe("radix tree methods through the FFI", function()
  local probe = radix.new()
  local native = debug.getmetatable(probe).__index.ffi_patched
  probe:close()

  it("replace the C methods", function()
    assert.is_table(native)
    assert.is_function(native.match)
    assert.is_function(native.insert)
    assert.is_function(native.size)
  end)

  -- the same inserts into two trees, one through each side
  local texts = {
    { "the shared system prompt, then question one", "http://a:1" },
    { "the shared system prompt, then question two", "http://b:1" },
    { "another prompt entirely", "http://c:1" },
    { "the shared system prompt, then question one again", "http://b:1" },
    { "", "http://a:1" },
  }

  local function pair()
    local fast, slow = radix.new(), radix.new()
    for _, t in ipairs(texts) do
      fast:insert(t[1], t[2])
      native.insert(slow, t[1], t[2])
    end
    return fast, slow
  end

  it("match as the C method does, with or without candidates", function()
    local fast, slow = pair()
    local asks = {
      "the shared system prompt, then question one",
      "the shared system prompt, then question two and more",
      "the shared",
      "another prompt entirely, longer",
      "nothing alike",
      "",
    }
    local lists = {
      false,
      { "http://a:1", "http://b:1", "http://c:1" },
      { "http://b:1" },
      { { url = "http://a:1" }, { url = "http://c:1" } },
      { "http://unknown:1" },
      {},
    }
    for _, q in ipairs(asks) do
      for _, l in ipairs(lists) do
        local allowed = l or nil
        local fm, fw = fast:match(q, allowed)
        local sm, sw = native.match(slow, q, allowed)
        assert.equal(sm, fm, q)
        assert.equal(sw, fw, q)
      end
    end
    -- a hit answers with the worker's URL and the matched length
    local m, w = fast:match("the shared system prompt, then question two", { "http://b:1" })
    assert.equal(#"the shared system prompt, then question two", m)
    assert.equal("http://b:1", w)
    assert.equal(native.match(slow, "x"), fast:match("x"))
    -- sizes per worker, known or not
    for _, url in ipairs({ "http://a:1", "http://b:1", "http://c:1", "http://unknown:1" }) do
      assert.equal(native.size(slow, url), fast:size(url), url)
    end
    assert.is_true(fast:size("http://b:1") > 0)
    fast:close()
    slow:close()
  end)

  it("raise as the C methods do", function()
    local t = radix.new()
    t:insert("abc", "http://a:1")
    assert.has_error(function() t:match({}) end)
    assert.has_error(function() t:match("abc", "not a table") end)
    assert.has_error(function() t:insert("abc", 7) end)
    local ok, err = pcall(t.match, t, newproxy(true))
    assert.is_false(ok)
    assert.truthy(tostring(err):find("only during select", 1, true), tostring(err))
    t:close()
    ok, err = pcall(t.match, t, "abc")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
    ok, err = pcall(t.insert, t, "abc", "http://a:1")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
    ok, err = pcall(t.size, t, "http://a:1")
    assert.is_false(ok)
    assert.truthy(tostring(err):find("closed", 1, true), tostring(err))
  end)

  it("read a request's kept routing text in place, and refuse it once the request ended", function()
    local t = radix.new()
    local seen = {}
    local kept
    local srv = assert(core.listen("127.0.0.1", 0, {}, function(x)
      local ok, _, _, n = extract.check("generate", x, 1048576, true)
      assert(ok and type(n) == "number")
      kept = x
      t:insert(x, "http://a:1")
      seen.m, seen.w = t:match(x, { "http://a:1" })
      seen.sm, seen.sw = native.match(t, x, { "http://a:1" })
      x:respond(200, {}, "ok")
    end))
    local pool = assert(core.upstream("http://127.0.0.1:" .. srv:port()))
    assert.equal(200, assert(core.request(pool, { method = "POST", path = "/generate",
      body = '{"text":"routing text here"}', headers = { ["content-type"] = "application/json" } })).status)
    assert.equal(#"routing text here", seen.m)
    assert.equal("http://a:1", seen.w)
    assert.equal(seen.sm, seen.m)
    assert.equal(seen.sw, seen.w)
    assert.equal(#"routing text here", (t:match("routing text here")))
    local ok, err = pcall(t.match, t, kept)
    assert.is_false(ok)
    assert.truthy(tostring(err):find("only during select", 1, true), tostring(err))
    srv:close()
    t:close()
  end)
end)
