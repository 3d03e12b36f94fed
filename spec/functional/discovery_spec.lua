-- Kubernetes service discovery against a fake API server (spec/kube_fake.lua)
-- that serves list and watch as the real one does. Worker pods are sim
-- workers on 127.0.0.2, .3, ... sharing one port (--service-discovery-port),
-- as pods share a container port. Every change is awaited by polling
-- /list_workers (bounded), never by sleeping.
local core = require "sglr.core"
local H = require "spec.helpers"
local K = require "spec.kube_fake"

local TOKEN = "sa-token-123"

describe("kubernetes discovery", function()
  local api, port

  -- a free port number for the pods (bound on other loopback addresses)
  local function free_port()
    local srv = assert(core.listen("127.0.0.1", 0, {}, function() end))
    local p = srv:port()
    srv:close()
    return p
  end

  local function sim_at(ip, id, extra)
    local args = { "sim-worker", "--host", ip, "--port", tostring(port), "--id", id }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    local proc = H.spawn(args)
    H.wait_output(proc, "listening on http://" .. ip:gsub("%.", "%%.") .. ":")
    return { url = "http://" .. ip .. ":" .. port, id = id, proc = proc }
  end

  local function kubeconfig(server)
    return H.tmpfile(table.concat({
      "apiVersion: v1", "kind: Config", "current-context: test",
      "contexts:", "- name: test", "  context: {cluster: fake, user: router}",
      "clusters:", "- name: fake", "  cluster:", "    server: " .. server,
      "users:", "- name: router", "  user:", "    token: " .. TOKEN, "" }, "\n"), ".yaml")
  end

  local function router(extra, relist)
    local args = { "--service-discovery", "--kubeconfig", kubeconfig(api:url()),
      "--service-discovery-port", tostring(port), "--service-discovery-relist-secs", tostring(relist or 60),
      "--health-check-interval-secs", "1", "--policy", "round_robin" }
    local pd = false
    for _, a in ipairs(extra or {}) do
      args[#args + 1] = a
      if a == "--pd-disaggregation" then pd = true end
    end
    if not pd then
      args[#args + 1] = "--selector"
      args[#args + 1] = "app=sglang"
    end
    return H.router(args)
  end

  local function workers(r)
    local out = {}
    for _, w in ipairs(H.list_workers(r).workers) do out[w.url] = w end
    return out
  end

  local function wait_workers(r, want, what)
    return H.wait_for(function()
      local ws = workers(r)
      for _, u in ipairs(want.present or {}) do if not ws[u] then return false end end
      for _, u in ipairs(want.absent or {}) do if ws[u] then return false end end
      return ws
    end, want.timeout or 8000, what)
  end

  -- the sim workers that answered n generate requests
  local function served(r, n)
    local seen = {}
    for i = 1, n do
      local res = assert(H.post(r.url, "/generate", H.gen_body("hello " .. i)))
      assert.equal(200, res.status)
      local id = H.worker_of(res)
      seen[id] = (seen[id] or 0) + 1
    end
    return seen
  end

  local function metric(r, series) return H.metric(H.scrape(r), series) end

  before_each(function()
    port = free_port()
    api = K.new({ token = TOKEN })
    assert(api:listen(0))
  end)

  after_each(function()
    H.stop_all()
    api:close()
  end)

  it("waits at start-up for Ready pods, skips the others, and routes to what it found", function()
    local a, b = sim_at("127.0.0.2", "a"), sim_at("127.0.0.3", "b")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    api:put(K.pod({ name = "b", ip = "127.0.0.3", ready = false }))
    api:put(K.pod({ name = "c" }))                                          -- no IP yet
    api:put(K.pod({ name = "d", ip = "127.0.0.4", labels = { app = "other" } }))
    api:put(K.pod({ name = "e", ip = "127.0.0.5", phase = "Pending" }))
    api:put(K.pod({ name = "f", ip = "127.0.0.6", deleting = true }))
    local r = router()
    -- no waiting: the pods found at start-up were admitted before serving
    local ws = workers(r)
    assert.same({ [a.url] = true }, (function() local s = {} for u in pairs(ws) do s[u] = true end return s end)())
    assert.equal("discovery", ws[a.url].source)
    assert.same({ namespace = "default", name = "a", uid = "a-uid" }, ws[a.url].pod)
    assert.equal(200, assert(H.get(r.url, "/readiness")).status)
    assert.same({ a = 5 }, served(r, 5))
    -- the token from the kubeconfig went with every request; the selector server-side
    for _, q in ipairs(api.requests) do
      assert.equal("Bearer " .. TOKEN, q.auth)
      assert.truthy(q.query:find("labelSelector=app=sglang", 1, true) or q.query:find("labelSelector=app%3Dsglang", 1, true))
    end

    -- b turns Ready: added; both serve
    api:put(K.pod({ name = "b", ip = "127.0.0.3" }))
    wait_workers(r, { present = { a.url, b.url } }, "b added")
    H.wait_for(function() return workers(r)[b.url].healthy end, 5000, "b healthy")
    local seen = served(r, 6)
    assert.equal(3, seen.a)
    assert.equal(3, seen.b)

    -- a stops being Ready: removed, traffic to b only
    api:put(K.pod({ name = "a", ip = "127.0.0.2", ready = false }))
    wait_workers(r, { absent = { a.url }, present = { b.url } }, "a removed")
    assert.same({ b = 4 }, served(r, 4))
    local text = H.scrape(r)
    assert.equal(2, H.metric(text, 'sgl_router_discovery_workers_added_total{role="regular"}'))
    assert.equal(1, H.metric(text, 'sgl_router_discovery_workers_removed_total{reason="not_ready"}'))
    assert.equal(1, H.metric(text, 'sgl_router_discovery_pods{role="regular"}'))
    assert.truthy(r.proc.out:find("default/a", 1, true))
  end)

  it("removes a pod that loses its label, is deleted, or changes IP; a new uid at the same IP is a new worker", function()
    local a, b, c = sim_at("127.0.0.2", "a"), sim_at("127.0.0.3", "b"), sim_at("127.0.0.4", "c")
    local c2 = sim_at("127.0.0.5", "c2")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    api:put(K.pod({ name = "b", ip = "127.0.0.3" }))
    api:put(K.pod({ name = "c", ip = "127.0.0.4" }))
    local r = router()
    wait_workers(r, { present = { a.url, b.url, c.url } }, "start")

    api:put(K.pod({ name = "a", ip = "127.0.0.2", labels = { app = "sglang-old" } }))
    wait_workers(r, { absent = { a.url }, present = { b.url, c.url } }, "label change")

    api:delete("b-uid")
    wait_workers(r, { absent = { b.url } }, "delete")

    api:put(K.pod({ name = "c", ip = "127.0.0.5" }))
    local ws = wait_workers(r, { absent = { c.url }, present = { c2.url } }, "IP change")
    assert.equal("c-uid", ws[c2.url].pod.uid)

    -- a pod recreated at a's address with a new uid (its label back)
    api:put(K.pod({ name = "a2", uid = "a2-uid", ip = "127.0.0.2" }))
    ws = wait_workers(r, { present = { a.url } }, "new pod at the old IP")
    assert.equal("a2-uid", ws[a.url].pod.uid)
    local seen = served(r, 4)
    assert.equal(2, seen.a)
    assert.equal(2, seen.c2)

    local text = H.scrape(r)
    assert.equal(1, H.metric(text, 'sgl_router_discovery_workers_removed_total{reason="label_changed"}'))
    assert.equal(1, H.metric(text, 'sgl_router_discovery_workers_removed_total{reason="deleted"}'))
    assert.equal(1, H.metric(text, 'sgl_router_discovery_workers_removed_total{reason="ip_changed"}'))
    assert.truthy(r.proc.out:find("default/b", 1, true))
  end)

  it("lists again after a dropped watch, a 410 event and a 410 status, and watches from bookmarks", function()
    local a, b, c = sim_at("127.0.0.2", "a"), sim_at("127.0.0.3", "b"), sim_at("127.0.0.4", "c")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    api:put(K.pod({ name = "b", ip = "127.0.0.3" }))
    local r = router()
    wait_workers(r, { present = { a.url, b.url } }, "start")
    H.wait_for(function() return api:open_watches() == 1 end, 5000, "a watch")

    -- dropped: while nobody watches, b goes; the relist finds it gone
    api.stall = true
    api:delete("b-uid")
    api:drop()
    api.stall = false
    wait_workers(r, { absent = { b.url }, present = { a.url } }, "b gone after the drop")
    H.wait_for(function() return api:open_watches() == 1 end, 5000, "watching again")
    assert.is_true(metric(r, 'sgl_router_discovery_watch_restarts_total{reason="error"}') >= 1)
    assert.is_true(metric(r, 'sgl_router_discovery_relists_total{reason="watch_failed"}') >= 1)

    -- 410 as an ERROR event: relist, then c (added meanwhile) is found
    local lists = api.lists
    api:expire()
    api:put(K.pod({ name = "c", ip = "127.0.0.4" }))
    wait_workers(r, { present = { a.url, c.url } }, "c after 410")
    assert.is_true(api.lists > lists)
    assert.equal(1, metric(r, 'sgl_router_discovery_watch_restarts_total{reason="gone"}'))
    assert.equal(1, metric(r, 'sgl_router_discovery_relists_total{reason="gone"}'))

    -- a bookmark moves the watch's resourceVersion past changes it did not see
    H.wait_for(function() return api:open_watches() == 1 end, 5000, "watching again")
    api:put(K.pod({ name = "x", ip = "127.0.0.9", labels = { app = "unrelated" } }))
    api:bookmark()
    local rv = tostring(api.rv)
    H.wait_for(function() return metric(r, 'sgl_router_discovery_events_total{type="BOOKMARK"}') == 1 end,
      5000, "bookmark seen")
    local watches = api.watch_count
    api:finish_watches()
    H.wait_for(function() return api.watch_count > watches end, 5000, "watch again")
    local last = api.requests[#api.requests]
    assert.truthy(last.query:find("resourceVersion=" .. rv, 1, true))
    assert.truthy(last.query:find("allowWatchBookmarks=true", 1, true))

    -- 410 as the status of a watch from a compacted resourceVersion
    H.wait_for(function() return api:open_watches() == 1 end, 5000, "watching again")
    api.stall = true
    api:put(K.pod({ name = "y", ip = "127.0.0.9", labels = { app = "unrelated" } }))
    api:compact()
    api.gone_as = "status"
    api:delete("c-uid")
    api.stall = false
    api:finish_watches()
    wait_workers(r, { absent = { c.url }, present = { a.url } }, "c gone after the 410 status")
    assert.equal(2, metric(r, 'sgl_router_discovery_relists_total{reason="gone"}'))
    assert.same({ a = 3 }, served(r, 3))
  end)

  it("catches a watch that stalls without closing with the periodic relist", function()
    local a, b = sim_at("127.0.0.2", "a"), sim_at("127.0.0.3", "b")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    api:put(K.pod({ name = "b", ip = "127.0.0.3" }))
    local r = router({}, 1)
    wait_workers(r, { present = { a.url, b.url } }, "start")
    api.stall = true
    api:delete("a-uid")
    wait_workers(r, { absent = { a.url }, present = { b.url } }, "a gone by the relist")
    assert.is_true(metric(r, 'sgl_router_discovery_relists_total{reason="periodic"}') >= 1)
    assert.is_true(metric(r, "sgl_router_discovery_last_sync_age_seconds") < 3)
    assert.same({ b = 3 }, served(r, 3))
  end)

  it("keeps serving its static workers while the API server is down, and finds the pods once it is up", function()
    local s = H.sim({ "--id", "static" })
    local a = sim_at("127.0.0.2", "a")
    local api_port = api.port
    api:close()
    -- The kubeconfig names this port; until the API server is up it stays
    -- bound without a listener (connections refused), so no other socket
    -- (or the router's own connect to it) can take it in the meantime.
    local hold = require("luv").new_tcp()
    assert(hold:bind("127.0.0.1", api_port))
    api = K.new({ token = TOKEN })
    api.port = api_port
    local r = router({ "--worker-urls", s.url }, 1)
    assert.same({ static = 2 }, served(r, 2))
    assert.equal(200, assert(H.get(r.url, "/readiness")).status)
    H.wait_for(function() return metric(r, 'sgl_router_discovery_errors_total{op="list"}') >= 2 end, 8000,
      "retries")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    hold:close()
    assert(api:listen(api_port))
    wait_workers(r, { present = { s.url, a.url } }, "a found")
    local seen = served(r, 4)
    assert.equal(2, seen.static)
    assert.equal(2, seen.a)
  end)

  it("logs and skips malformed events, unknown types and pods without an IP", function()
    local a, b = sim_at("127.0.0.2", "a"), sim_at("127.0.0.3", "b")
    api:put(K.pod({ name = "a", ip = "127.0.0.2" }))
    local r = router()
    H.wait_for(function() return api:open_watches() == 1 end, 5000, "a watch")
    api:raw("this is not json")
    api:raw('{"type":"ADDED"}')
    api:raw('{"type":"ADDED","object":{"metadata":{"name":"nouid"}}}')
    api:raw('{"type":"TELEPORTED","object":{"metadata":{}}}')
    api:raw('[1,2,3]')
    api:put(K.pod({ name = "noip" }))
    api:put(K.pod({ name = "b", ip = "127.0.0.3" }))
    local ws = wait_workers(r, { present = { a.url, b.url } }, "b after the bad lines")
    local n = 0
    for _ in pairs(ws) do n = n + 1 end
    assert.equal(2, n)
    local text = H.scrape(r)
    assert.equal(4, H.metric(text, 'sgl_router_discovery_events_total{type="malformed"}'))
    assert.equal(1, H.metric(text, 'sgl_router_discovery_events_total{type="unknown"}'))
    assert.equal(0, H.metric(text, 'sgl_router_discovery_watch_restarts_total{reason="error"}'))
    assert.truthy(r.proc.out:find("malformed watch event", 1, true))
    assert.truthy(r.proc.out:find("TELEPORTED", 1, true))
    assert.same({ a = 1, b = 1 }, served(r, 2))
  end)

  describe("in PD mode", function()
    it("classifies pods by selector, reads bootstrap ports from the annotation, and needs no static URLs", function()
      local p1 = sim_at("127.0.0.2", "p1", { "--role", "prefill", "--bootstrap-port", "0" })
      local bp = tonumber(H.wait_output(p1.proc, "bootstrap on http://127%.0%.0%.2:(%d+)"))
      local p2 = sim_at("127.0.0.3", "p2", { "--role", "prefill" })
      local d1 = sim_at("127.0.0.4", "d1", { "--role", "decode" })
      api:put(K.pod({ name = "p1", ip = "127.0.0.2", labels = { role = "prefill" },
        annotations = { ["sglang.ai/bootstrap-port"] = tostring(bp) } }))
      api:put(K.pod({ name = "p2", ip = "127.0.0.3", labels = { role = "prefill" } }))
      api:put(K.pod({ name = "d1", ip = "127.0.0.4", labels = { role = "decode" } }))
      api:put(K.pod({ name = "o", ip = "127.0.0.5", labels = { role = "other" } }))
      local r = router({ "--pd-disaggregation", "--prefill-selector", "role=prefill",
        "--decode-selector", "role=decode", "--prefill-policy", "round_robin" })
      local ws = workers(r)
      assert.equal("prefill", ws[p1.url].role)
      assert.equal(bp, ws[p1.url].bootstrap_port)
      assert.equal("prefill", ws[p2.url].role)
      assert.equal(require("cjson").null, ws[p2.url].bootstrap_port)
      assert.equal("decode", ws[d1.url].role)
      assert.is_nil(ws["http://127.0.0.5:" .. port])
      assert.equal(200, assert(H.get(r.url, "/readiness")).status)
      -- the decode checks every room with its prefill's bootstrap port (a
      -- wrong port would fail the request)
      for i = 1, 4 do
        local res = assert(H.post(r.url, "/generate", H.gen_body("pd " .. i)))
        assert.equal(200, res.status, res.body)
      end
      assert.equal(2, H.sim_stats(p1).rooms_total)
      assert.equal(2, H.sim_stats(p2).rooms_total)
      assert.equal(4, H.sim_stats(d1).rooms_total)

      -- the decode goes: not ready any more
      api:delete("d1-uid")
      wait_workers(r, { absent = { d1.url } }, "decode removed")
      assert.equal(503, assert(H.get(r.url, "/readiness")).status)
    end)

    it("combines static prefill URLs with discovered decode pods", function()
      local p = H.prefill_sim("sp")
      local d1 = sim_at("127.0.0.2", "d1", { "--role", "decode" })
      api:put(K.pod({ name = "d1", ip = "127.0.0.2", labels = { role = "decode" } }))
      local r = router({ "--pd-disaggregation", "--prefill", p.url, tostring(p.bootstrap_port),
        "--decode-selector", "role=decode" })
      local ws = workers(r)
      assert.equal("static", ws[p.url].source)
      assert.equal("discovery", ws[d1.url].source)
      local res = assert(H.post(r.url, "/generate", H.gen_body("mixed")))
      assert.equal(200, res.status, res.body)
      assert.equal(1, H.sim_stats(d1).rooms_total)
    end)
  end)

  -- TLS: `openssl s_server -WWW` serves files named after the request
  -- path and query, so the list and the watch are files; the router must
  -- trust the server through the kubeconfig's certificate-authority-data.
  describe("over TLS", function()
    local has_openssl = os.execute("openssl version >/dev/null 2>&1") == 0
    local dir

    local function sh(cmd)
      local f = assert(io.popen(cmd .. " 2>/dev/null"))
      local out = f:read("*a")
      f:close()
      return out
    end

    local function tls_server()
      dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. dir .. "/api/v1") == 0)
      for _, name in ipairs({ "server", "other" }) do
        assert(os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s/%s.key -out %s/%s.pem " ..
          "-days 1 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1")
          :format(dir, name, dir, name)) == 0)
      end
      local list = { kind = "PodList", apiVersion = "v1", metadata = { resourceVersion = "5" },
        items = { K.pod({ name = "a", ip = "127.0.0.2" }) } }
      local base = dir .. "/api/v1/pods?labelSelector=app%3Dsglang"
      local f = assert(io.open(base, "w"))
      f:write(require("cjson").encode(list))
      f:close()
      f = assert(io.open(base .. "&watch=1&allowWatchBookmarks=true&timeoutSeconds=290&resourceVersion=5", "w"))
      f:write('{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"5"}}}\n')
      f:close()
      local p = free_port()
      H.spawn({ "s_server", "-accept", "127.0.0.1:" .. p, "-WWW", "-quiet",
        "-cert", dir .. "/server.pem", "-key", dir .. "/server.key" }, { bin = "openssl", cwd = dir })
      H.wait_for(function()
        local t, ok = require("luv").new_tcp(), nil
        t:connect("127.0.0.1", p, function(cerr) ok = not cerr; t:close() end)
        while ok == nil do core.sleep(5) end
        return ok
      end, 10000, "openssl s_server")
      return "https://127.0.0.1:" .. p
    end

    local function tls_router(server, ca)
      local cfg = H.tmpfile(table.concat({
        "current-context: tls", "contexts: [{name: tls, context: {cluster: k, user: u}}]",
        "clusters:", "- name: k", "  cluster:", "    server: " .. server,
        "    certificate-authority-data: " .. sh("base64 -w0 " .. dir .. "/" .. ca .. ".pem"),
        "users: [{name: u, user: {token: " .. TOKEN .. "}}]", "" }, "\n"), ".yaml")
      return H.router({ "--service-discovery", "--selector", "app=sglang", "--kubeconfig", cfg,
        "--service-discovery-port", tostring(port), "--service-discovery-relist-secs", "1" })
    end

    it("lists and watches through the kubeconfig's CA data, and refuses a server it does not trust", function()
      assert(has_openssl, "openssl is missing (make deps installs it)")
      local a = sim_at("127.0.0.2", "a")
      local server = tls_server()
      local r = tls_router(server, "server")
      assert.truthy(workers(r)[a.url])
      H.wait_for(function() return metric(r, 'sgl_router_discovery_events_total{type="BOOKMARK"}') >= 1 end,
        5000, "the watch's bookmark")
      assert.equal(0, metric(r, 'sgl_router_discovery_errors_total{op="list"}'))
      H.stop(r.proc)

      local r2 = tls_router(server, "other")
      H.wait_for(function() return metric(r2, 'sgl_router_discovery_errors_total{op="list"}') >= 1 end,
        5000, "a refused list")
      assert.is_nil(workers(r2)[a.url])
    end)
  end)
end)
