-- Slow clients: a client that stops reading a long stream must not make
-- the router buffer the stream (it stops reading the worker instead), and
-- must not slow anyone else down.
local H = require "spec.helpers"
local core = require "sglr.core"
local uv = require "luv"
local cjson = require "cjson.safe"

local function rss_kb(pid)
  local f = io.open("/proc/" .. pid .. "/status")
  if not f then return nil end
  local text = f:read("*a")
  f:close()
  return tonumber(text:match("VmRSS:%s*(%d+)"))
end

describe("a client that stops reading", function()
  teardown(H.stop_all)

  it("holds the router's memory flat and leaves other requests alone", function()
    local w = H.sim({ "--id", "w" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
    local base = rss_kb(r.proc.pid)
    -- about 150 bytes per event: 200k tokens is some 30 MB of SSE
    local body = cjson.encode({ messages = { { role = "user", content = "go" } }, stream = true,
      max_tokens = 200000 })
    local req = "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
      .. "content-length: " .. #body .. "\r\n\r\n" .. body
    local tcp = uv.new_tcp()
    local received, done = 0, false
    tcp:connect("127.0.0.1", r.port, function(err)
      assert(not err, err)
      tcp:write(req)
    end)
    -- read nothing for a while: the worker streams as fast as it can
    core.sleep(1500)
    local peak = rss_kb(r.proc.pid)
    -- meanwhile another client is served at once
    local t0 = core.now()
    local other = assert(H.post(r.url, "/generate", H.gen_body("x")))
    assert.equal(200, other.status)
    assert.is_true(core.now() - t0 < 500, "other request took " .. (core.now() - t0) .. " ms")
    -- the router holds at most a few MB for the stalled stream, not 30 MB
    assert.is_true(peak - base < 12 * 1024, ("router grew from %d to %d kB"):format(base, peak))
    -- now read it all: the stream completes
    local tail = ""
    tcp:read_start(function(err, chunk)
      if chunk then
        received = received + #chunk
        tail = (tail .. chunk):sub(-64)
        if tail:find("0\r\n\r\n", 1, true) then done = true end
      else
        done = true
      end
    end)
    H.wait_for(function() return done end, 30000, "the whole stream")
    tcp:close()
    assert.is_true(received > 20 * 1024 * 1024, "received " .. received)
    assert.truthy(tail:find("[DONE]", 1, true))
  end)
end)
