-- Graceful shutdown: stop accepting, let requests in flight finish, exit 0.
local H = require "spec.helpers"
local core = require "sglr.core"
local cjson = require "cjson.safe"

describe("graceful shutdown", function()
  teardown(H.stop_all)

  it("finishes streams in flight on SIGTERM and exits 0", function()
    local w = H.sim({ "--id", "w1", "--decode-ms-per-token", "40" })
    local r = H.router({ "--worker-urls", w.url, "--policy", "round_robin" })
    local body = cjson.encode({ text = "long", stream = true, sampling_params = { max_new_tokens = 15 } })
    local plain = cjson.encode({ text = "plain", sampling_params = { max_new_tokens = 10 } })
    local results = H.parallel({
      function() return H.post(r.url, "/generate", body) end,
      function() return H.post(r.url, "/generate", plain) end,
      function()
        core.sleep(150)
        H.kill(r.proc, "sigterm")
        core.sleep(100)
        -- no longer accepting
        return { refused = H.get(r.url, "/liveness") == nil }
      end,
    })
    assert.equal(200, results[1].status)
    assert.truthy(results[1].body:find("data: [DONE]", 1, true))
    local n = 0
    for _ in results[1].body:gmatch("data: {") do n = n + 1 end
    assert.equal(15, n)
    assert.equal(200, results[2].status)
    assert.equal(10, results[2].json.meta_info.completion_tokens)
    assert.is_true(results[3].refused)
    local code = H.wait_stopped(r.proc, 10000)
    assert.equal(0, code)
  end)
end)
