-- The command line as an operator meets it: the version, error messages
-- for bad flags, and flags of sglang_router.launch_router that change
-- routing (--cache-routing-prob).
local H = require "spec.helpers"
local cjson = require "cjson.safe"

-- Run sglr to its exit: code, output (stdout and stderr together).
local function run(args)
  local p = H.spawn(args)
  local code = H.wait_stopped(p, 10000)
  return code, p.out
end

local function count(s, sub)
  local n, at = 0, 1
  while true do
    local i = s:find(sub, at, true)
    if not i then return n end
    n, at = n + 1, i + #sub
  end
end

describe("sglr command line", function()
  teardown(H.stop_all)

  it("prints its version for sglr --version, sglr version and sglr run --version", function()
    for _, args in ipairs({ { "--version" }, { "version" }, { "run", "--version" },
                            { "run", "--port", "1", "--version" } }) do
      local code, out = run(args)
      assert.equal(0, code, table.concat(args, " "))
      assert.matches("^sglr %d+%.%d+%.%d+\n$", out)
    end
  end)

  it("names an unknown flag once, with the program once", function()
    local code, out = run({ "run", "--no-such-flag" })
    assert.equal(2, code)
    assert.equal("sglr run: unknown option '--no-such-flag'\n", out)
    code, out = run({ "run", "--port", "99999" })
    assert.equal(2, code)
    assert.equal(1, count(out, "sglr run:"))
    assert.equal(1, count(out, "--port"))
  end)

  describe("--cache-routing-prob", function()
    local function route_same_prompt(extra)
      local w1, w2 = H.sim({ "--id", "w1" }), H.sim({ "--id", "w2" })
      local args = { "--worker-urls", w1.url, w2.url }
      for _, a in ipairs(extra) do args[#args + 1] = a end
      local r = H.router(args)
      local seen = {}
      for _ = 1, 6 do
        local res = assert(H.post(r.url, "/generate", H.gen_body("the same long prompt, every time")))
        assert.equal(200, res.status)
        seen[H.worker_of(res)] = (seen[H.worker_of(res)] or 0) + 1
      end
      local st = H.list_workers(r).policy_stats
      H.stop(r.proc)
      return seen, st
    end

    it("keeps a repeated prompt on its worker at 1 (the default)", function()
      local seen, st = route_same_prompt({})
      local n = 0
      for _, c in pairs(seen) do n = n + 1; assert.equal(6, c) end
      assert.equal(1, n)
      assert.equal(0, st.shortest_queue)
      assert.equal(5, st.hits)
    end)

    it("sends every request to the shortest queue at 0, spreading equal queues", function()
      local seen, st = route_same_prompt({ "--cache-routing-prob", "0" })
      assert.same({ w1 = 3, w2 = 3 }, seen)
      assert.equal(6, st.shortest_queue)
      assert.equal(0, st.hits)
    end)

    it("is refused outside 0..1", function()
      local code, out = run({ "run", "--cache-routing-prob", "1.5" })
      assert.equal(2, code)
      assert.truthy(out:find("--cache-routing-prob", 1, true))
      assert.is_nil(cjson.decode(out))
    end)
  end)
end)
