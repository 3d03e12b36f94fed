-- Worker management at runtime: /add_worker, /remove_worker, /list_workers.
local H = require "spec.helpers"

describe("worker admin", function()
  local w1, w2, r
  setup(function()
    w1 = H.sim({ "--id", "w1" })
    w2 = H.sim({ "--id", "w2" })
    r = H.router({ "--worker-urls", w1.url, "--policy", "round_robin" })
  end)
  teardown(H.stop_all)

  local function served_by(n)
    local seen = {}
    for i = 1, n do
      local res = assert(H.post(r.url, "/generate", H.gen_body("p" .. i)))
      assert.equal(200, res.status)
      seen[H.worker_of(res)] = (seen[H.worker_of(res)] or 0) + 1
    end
    return seen
  end

  it("adds a worker that then receives traffic", function()
    local res = assert(H.post(r.url, "/add_worker?url=" .. w2.url))
    assert.equal(200, res.status)
    assert.same({ w1.url, w2.url }, H.list_workers(r).urls)
    local seen = served_by(4)
    assert.equal(2, seen.w1)
    assert.equal(2, seen.w2)
  end)

  it("refuses a duplicate worker with 400", function()
    local res = assert(H.post(r.url, "/add_worker?url=" .. w2.url))
    assert.equal(400, res.status)
    assert.truthy(res.json.error.message:find("already registered", 1, true))
  end)

  it("refuses a malformed URL with 400", function()
    for _, bad in ipairs({ "ftp://x:1", "not-a-url", "http://", "http://h:99999" }) do
      local res = assert(H.post(r.url, "/add_worker?url=" .. bad))
      assert.equal(400, res.status, bad)
      assert.is_string(res.json.error.message)
    end
    assert.equal(400, assert(H.post(r.url, "/add_worker")).status)
  end)

  it("answers 404 when removing an unknown worker", function()
    local res = assert(H.post(r.url, "/remove_worker?url=http://127.0.0.1:1"))
    assert.equal(404, res.status)
  end)

  it("removes a worker, which then gets no traffic", function()
    local res = assert(H.post(r.url, "/remove_worker?url=" .. w1.url))
    assert.equal(200, res.status)
    assert.same({ w2.url }, H.list_workers(r).urls)
    local seen = served_by(3)
    assert.is_nil(seen.w1)
    assert.equal(3, seen.w2)
  end)

  it("refuses to add a worker that never becomes healthy", function()
    local r2 = H.router({ "--policy", "round_robin", "--worker-startup-timeout-secs", "0.5" })
    local res = assert(H.post(r2.url, "/add_worker?url=http://127.0.0.1:1"))
    assert.equal(400, res.status)
    assert.truthy(res.json.error.message:find("healthy", 1, true))
  end)
end)
