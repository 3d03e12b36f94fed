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
