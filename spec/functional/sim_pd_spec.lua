-- Sim workers in prefill/decode (PD) roles fail visibly when a router gets
-- PD wrong. Each test acts as a PD router does: the same body, with
-- bootstrap_host, bootstrap_port and bootstrap_room spliced in, sent to a
-- prefill and a decode worker at once.
local H = require "spec.helpers"
local cjson = require "cjson.safe"

local SHORT_MS = 400   -- --bootstrap-timeout-ms of the impatient decode worker

-- The request `req` with the three fields appended as JSON text (rooms above
-- 2^53 cannot go through a Lua number), spaced out as a body may be.
local function splice(req, host, port, room)
  return cjson.encode(req):sub(1, -2)
    .. (', "bootstrap_host" : %s,\n  "bootstrap_port":%s, "bootstrap_room":\n\t%s }'):format(host, port, room)
end

local function gen(text, extra)
  local t = { text = text, sampling_params = { max_new_tokens = 3 } }
  for k, v in pairs(extra or {}) do t[k] = v end
  return t
end

local function stats(w)
  return assert(H.get(w.url, "/sim/stats")).json
end

local function has_room(st, room)
  for _, r in ipairs(st.rooms) do
    if r == room then return true end
  end
  return false
end

local events = H.sse_events

local function expect_error(res, status, pattern)
  assert.equal(status, res.status, res.body)
  assert.equal("application/json", res.headers["content-type"])
  assert.is_table(res.json, "body is not JSON: " .. res.body)
  if pattern then assert.truthy(res.json.error.message:find(pattern), res.json.error.message) end
end

describe("sim workers in PD roles", function()
  local p, bport, d, dq
  -- prefill and decode at once; returns both answers
  local function both(path, body, decode)
    local r = H.parallel({
      function() return H.post(p.url, path, body) end,
      function() return H.post((decode or d).url, path, body) end,
    })
    assert.is_nil(r[1].error, r[1].error)
    assert.is_nil(r[2].error, r[2].error)
    return r[1], r[2]
  end

  setup(function()
    p = H.sim({ "--id", "p1", "--role", "prefill", "--bootstrap-port", "0" })
    bport = tonumber(H.wait_output(p.proc, "p1 bootstrap on http://127%.0%.0%.1:(%d+)"))
    d = H.sim({ "--id", "d1", "--role", "decode" })
    dq = H.sim({ "--id", "dq", "--role", "decode", "--bootstrap-timeout-ms", tostring(SHORT_MS) })
  end)
  teardown(H.stop_all)

  it("report their role and bootstrap port on /sim/stats", function()
    local ps, ds = stats(p), stats(d)
    assert.equal("prefill", ps.role)
    assert.equal(bport, ps.bootstrap_port)
    assert.equal("decode", ds.role)
    assert.equal(cjson.null, ds.bootstrap_port)
    assert.equal("[]", assert(H.get(d.url, "/sim/stats")).body:match('"rooms":(%b[])'))
  end)

  it("decode refuses a request without the bootstrap fields; prefill serves it", function()
    expect_error(assert(H.post(d.url, "/generate", cjson.encode(gen("hi")))), 400, "bootstrap_room")
    expect_error(assert(H.post(d.url, "/v1/chat/completions",
      cjson.encode({ messages = { { role = "user", content = "hi" } } }))), 400, "bootstrap")
    -- two of the three
    local partial = cjson.encode(gen("hi")):sub(1, -2) .. ',"bootstrap_host":"127.0.0.1","bootstrap_port":1}'
    expect_error(assert(H.post(d.url, "/generate", partial)), 400, "together")
    expect_error(assert(H.post(p.url, "/generate", partial)), 400, "together")
    -- malformed: a negative room, a fraction, an IPv6 host without brackets
    expect_error(assert(H.post(d.url, "/generate", splice(gen("hi"), '"127.0.0.1"', "null", "-5"))), 400)
    expect_error(assert(H.post(d.url, "/generate", splice(gen("hi"), '"127.0.0.1"', "null", "5.0"))), 400)
    expect_error(assert(H.post(d.url, "/generate", splice(gen("hi"), '"::1"', "null", "5"))), 400, "IPv6")
    expect_error(assert(H.post(d.url, "/generate",
      splice(gen("hi"), '"127.0.0.1"', "null", "9223372036854775808"))), 400, "2%^63")
    assert.equal(200, assert(H.post(p.url, "/generate", cjson.encode(gen("hi")))).status)
  end)

  it("decode serves a room the prefill was sent; both record its exact digits", function()
    local room = "9223372036854775807"
    local pres, dres = both("/generate", splice(gen("matched room"), '"127.0.0.1"', bport, room))
    assert.equal(200, pres.status, pres.body)
    assert.equal(200, dres.status, dres.body)
    assert.equal("tok1 tok2 tok3", dres.json.text)
    for _, w in ipairs({ p, d }) do
      local st = stats(w)
      assert.is_true(has_room(st, room), cjson.encode(st.rooms))
      assert.equal("127.0.0.1", st.last_bootstrap_host)
      assert.equal(bport, st.last_bootstrap_port)
    end
  end)

  it("decode fails the transfer after its timeout when sent another room", function()
    -- 2^53 + 1 and 2^53 are one double: only digit strings tell them apart
    local body = gen("wrong room")
    local r = H.parallel({
      function() return H.post(p.url, "/generate", splice(body, '"127.0.0.1"', bport, "9007199254740993")) end,
      function() return H.post(dq.url, "/generate", splice(body, '"127.0.0.1"', bport, "9007199254740992")) end,
    })
    local pres, dres = r[1], r[2]
    assert.equal(200, pres.status, pres.body)
    expect_error(dres, 500, "9007199254740992")
    assert.equal("9007199254740992", dres.json.error.bootstrap_room)
    assert.truthy(dres.total_ms >= SHORT_MS - 1, "answered after " .. dres.total_ms .. " ms")
    assert.is_false(has_room(stats(p), "9007199254740992"))
  end)

  it("decode sent before the prefill succeeds once the prefill arrives", function()
    local body = splice(gen("decode first"), '"127.0.0.1"', bport, "8000000000000000001")
    local r = H.parallel({
      function() return H.post(d.url, "/generate", body) end,
      function()
        -- the decode is waiting on the bootstrap port before the prefill is sent
        H.wait_for(function() return stats(p).room_waiters >= 1 end, 4000, "a bootstrap wait")
        return H.post(p.url, "/generate", body)
      end,
    })
    assert.equal(200, r[1].status, r[1].body)
    assert.equal(200, r[2].status, r[2].body)
    assert.equal(0, stats(p).room_waiters)
  end)

  describe("with batches", function()
    local hosts3 = '["127.0.0.1", "127.0.0.1", "127.0.0.1"]'

    it("checks one room per element", function()
      local rooms = { "9223372036854775806", "9007199254740993", "42" }
      local ports = ("[%d, %d, %d]"):format(bport, bport, bport)
      local body = splice({ text = { "a", "b", "c" } }, hosts3, ports, "[" .. table.concat(rooms, " ,") .. "]")
      local pres, dres = both("/generate", body)
      assert.equal(200, pres.status, pres.body)
      assert.equal(200, dres.status, dres.body)
      local st = stats(p)
      for _, room in ipairs(rooms) do assert.is_true(has_room(st, room), room) end
      assert.same({ "127.0.0.1", "127.0.0.1", "127.0.0.1" }, st.last_bootstrap_host)
      assert.same({ bport, bport, bport }, st.last_bootstrap_port)

      -- completions prompt list and chat n > 1 count as batches too
      local c = splice({ prompt = { "x", "y" } }, '["127.0.0.1", "127.0.0.1"]',
        ("[%d, %d]"):format(bport, bport), "[7001, 7002]")
      local cp, cd = both("/v1/completions", c)
      assert.equal(200, cp.status, cp.body)
      assert.equal(200, cd.status, cd.body)
      local chat = splice({ n = 2, messages = { { role = "user", content = "x" } } },
        '["127.0.0.1", "127.0.0.1"]', ("[%d, %d]"):format(bport, bport), "[7003, 7004]")
      local hp, hd = both("/v1/chat/completions", chat)
      assert.equal(200, hp.status, hp.body)
      assert.equal(200, hd.status, hd.body)
    end)

    it("refuses bootstrap fields that do not match the batch", function()
      local req = { text = { "a", "b", "c" } }
      local ports = "[null, null, null]"
      -- scalars for a batch
      expect_error(assert(H.post(d.url, "/generate", splice(req, '"127.0.0.1"', "null", "1"))), 400, "batch size %(3%)")
      -- arrays of the wrong length
      expect_error(assert(H.post(d.url, "/generate", splice(req, hosts3, ports, "[1, 2]"))), 400, "batch")
      expect_error(assert(H.post(d.url, "/generate", splice(req, '["127.0.0.1"]', ports, "[1, 2, 3]"))), 400)
      -- one room for all
      expect_error(assert(H.post(d.url, "/generate", splice(req, hosts3, ports, "[5, 5, 5]"))), 400, "twice")
      -- arrays for a single request
      expect_error(assert(H.post(d.url, "/generate", splice(gen("one"), hosts3, ports, "[1, 2, 3]"))), 400)
      -- chat with n = 2 is a batch of two
      local chat = { n = 2, messages = { { role = "user", content = "x" } } }
      expect_error(assert(H.post(d.url, "/v1/chat/completions", splice(chat, '"127.0.0.1"', "null", "3"))), 400)
    end)

    it("fails the transfer on the one room the prefill was not sent", function()
      local req = { text = { "a", "b" } }
      local ports = ("[%d, %d]"):format(bport, bport)
      assert.equal(200, assert(H.post(p.url, "/generate",
        splice(req, '["127.0.0.1", "127.0.0.1"]', ports, "[9100000000000000001, 9100000000000000002]"))).status)
      local dres = assert(H.post(dq.url, "/generate",
        splice(req, '["127.0.0.1", "127.0.0.1"]', ports, "[9100000000000000001, 9100000000000000003]")))
      expect_error(dres, 500, "9100000000000000003")
      assert.equal("9100000000000000003", dres.json.error.bootstrap_room)
    end)
  end)

  it("decode skips the check when bootstrap_port is null", function()
    local room = "9111111111111111111"
    local res = assert(H.post(dq.url, "/generate", splice(gen("fake transfer"), '"[::1]"', "null", room)))
    assert.equal(200, res.status, res.body)
    local st = stats(dq)
    assert.is_true(has_room(st, room))
    assert.equal("[::1]", st.last_bootstrap_host)
    assert.equal(cjson.null, st.last_bootstrap_port)
    assert.is_false(has_room(stats(p), room))
  end)

  describe("with logprobs asked for", function()
    local text = "The quick brown fox jumps"   -- 25 bytes: 7 tokens
    local seq = 0

    local function next_body(req)
      seq = seq + 1
      return splice(req, '"127.0.0.1"', bport, ("8100000000000000%03d"):format(seq))
    end

    local function expect_prefill_logprobs(meta)
      local lp = meta.input_token_logprobs
      assert.is_table(lp)
      assert.equal(7, #lp)
      for _, e in ipairs(lp) do
        assert.equal(3, #e)
        assert.is_number(e[1])
        assert.truthy(e[1] <= 0)
        assert.equal(math.floor(e[2]), e[2])
        assert.equal(cjson.null, e[3])
      end
    end

    it("on /generate the prefill reports one entry per prompt token, the decode none", function()
      local pres, dres = both("/generate", next_body(gen(text, { return_logprob = true })))
      assert.equal(200, pres.status, pres.body)
      assert.equal(200, dres.status, dres.body)
      expect_prefill_logprobs(pres.json.meta_info)
      assert.truthy(dres.body:find('"input_token_logprobs":[]', 1, true), dres.body)
      -- not asked for: not reported
      local pplain = both("/generate", next_body(gen(text)))
      assert.is_nil(pplain.json.meta_info.input_token_logprobs)
    end)

    it("on a streamed /generate every event carries them", function()
      local pres, dres = both("/generate", next_body(gen(text, { return_logprob = true, stream = true })))
      assert.equal(200, pres.status)
      assert.equal(200, dres.status)
      local pev, dev = events(pres.body), events(dres.body)
      assert.equal(3, #pev)
      assert.equal(3, #dev)
      for _, ev in ipairs(pev) do expect_prefill_logprobs(ev.meta_info) end
      local _, n = dres.body:gsub('"input_token_logprobs":%[%]', "")
      assert.equal(3, n)
    end)

    it("on /v1/completions, streamed or not", function()
      local req = { prompt = text, max_tokens = 2, logprobs = 0 }
      local pres, dres = both("/v1/completions", next_body(req))
      assert.equal(200, pres.status, pres.body)
      assert.equal(200, dres.status, dres.body)
      expect_prefill_logprobs(pres.json.meta_info)
      assert.truthy(dres.body:find('"input_token_logprobs":[]', 1, true), dres.body)

      req.stream = true
      pres, dres = both("/v1/completions", next_body(req))
      assert.equal(200, pres.status)
      assert.equal(200, dres.status)
      local pev = events(pres.body)
      assert.equal(3, #pev)   -- two tokens and the usage chunk
      for _, ev in ipairs(pev) do expect_prefill_logprobs(ev.meta_info) end
      local _, n = dres.body:gsub('"input_token_logprobs":%[%]', "")
      assert.equal(3, n)
    end)
  end)

  it("decode fails the transfer at once when the prefill is unreachable", function()
    local gone = H.sim({ "--id", "gone", "--role", "prefill", "--bootstrap-port", "0" })
    local gport = tonumber(H.wait_output(gone.proc, "gone bootstrap on http://127%.0%.0%.1:(%d+)"))
    H.stop(gone.proc)
    local room = "9222222222222222222"
    local res = assert(H.post(d.url, "/generate", splice(gen("nobody"), '"127.0.0.1"', gport, room)))
    expect_error(res, 500, "unreachable")
    assert.equal(room, res.json.error.bootstrap_room)
    assert.truthy(res.total_ms < 3000, "took " .. res.total_ms .. " ms")   -- not the 5 s timeout
    -- the prefill's HTTP port is no bootstrap port
    res = assert(H.post(d.url, "/generate", splice(gen("wrong port"), '"127.0.0.1"', p.port, room)))
    expect_error(res, 500, "not a prefill bootstrap server")
  end)

  it("decode fails the transfer when the prefill fails the request", function()
    local pf = H.sim({ "--id", "pf", "--role", "prefill", "--bootstrap-port", "0", "--fail-first", "1" })
    local fport = tonumber(H.wait_output(pf.proc, "pf bootstrap on http://127%.0%.0%.1:(%d+)"))
    local function pair(room)
      local body = splice(gen("flaky prefill"), '"127.0.0.1"', fport, room)
      local r = H.parallel({
        function() return H.post(pf.url, "/generate", body) end,
        function() return H.post(d.url, "/generate", body) end,
      })
      return r[1], r[2]
    end
    local pres, dres = pair("9000000000000000001")
    assert.equal(500, pres.status)
    expect_error(dres, 500, "failed the request")
    assert.truthy(dres.total_ms < 3000, "took " .. dres.total_ms .. " ms")
    pres, dres = pair("9000000000000000002")
    assert.equal(200, pres.status)
    assert.equal(200, dres.status, dres.body)
  end)
end)
