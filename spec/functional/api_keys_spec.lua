-- API keys: --api-key is what the router sends to workers (on every request
-- it makes to them, in place of the client's Authorization);
-- --admin-api-key and --inference-api-key are what clients must send to
-- the router. The sims show the Authorization header of the last request
-- they got on each path.
local H = require "spec.helpers"
local core = require "sglr.core"

local function auth_seen(w, path)
  return H.sim_stats(w).auth[path]
end

local function bearer(key) return { authorization = "Bearer " .. key } end

describe("API keys", function()
  teardown(H.stop_all)

  describe("--api-key", function()
    local w, r
    setup(function()
      w = H.sim({ "--id", "w" })
      r = H.router({ "--worker-urls", w.url, "--api-key", "worker-secret", "--policy", "power_of_two",
        "--health-check-interval-secs", "0.2" })
    end)

    it("replaces the client's Authorization on proxied requests, streamed or not", function()
      local res = assert(H.post(r.url, "/generate", H.gen_body("hi"), bearer("client-token")))
      assert.equal(200, res.status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/generate"))
      res = assert(H.post(r.url, "/v1/chat/completions",
        '{"messages":[{"role":"user","content":"hi"}],"stream":true}'))
      assert.equal(200, res.status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/v1/chat/completions"))
      res = assert(H.get(r.url, "/v1/models", bearer("client-token")))
      assert.equal(200, res.status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/v1/models"))
    end)

    it("is sent on health checks, startup checks, load polls and fan-outs", function()
      -- the startup wait and the periodic checks
      H.wait_for(function() return auth_seen(w, "/health") == "Bearer worker-secret" end, 3000,
        "a health check with the key")
      -- power_of_two polls /get_load every --worker-startup-check-interval
      H.wait_for(function() return auth_seen(w, "/get_load") == "Bearer worker-secret" end, 3000,
        "a load poll with the key")
      assert.equal(200, assert(H.post(r.url, "/flush_cache")).status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/flush_cache"))
      assert.equal(200, assert(H.get(r.url, "/get_loads")).status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/get_load"))
      assert.equal(200, assert(H.get(r.url, "/get_server_info")).status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/get_server_info"))
      assert.equal(200, assert(H.get(r.url, "/health_generate")).status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/health_generate"))
    end)

    it("is sent on both PD legs and on a dp-aware worker's server info", function()
      local p = H.prefill_sim("p")
      local d = H.sim({ "--id", "d", "--role", "decode" })
      local pr = H.router({ "--pd-disaggregation", "--dp-aware", "--api-key", "pd-secret",
        "--prefill", p.url, tostring(p.bootstrap_port), "--decode", d.url })
      assert.equal("Bearer pd-secret", auth_seen(p, "/get_server_info"))
      assert.equal("Bearer pd-secret", auth_seen(d, "/get_server_info"))
      local res = assert(H.post(pr.url, "/generate", H.gen_body("pd"), bearer("client-token")))
      assert.equal(200, res.status)
      assert.equal("Bearer pd-secret", auth_seen(p, "/generate"))
      assert.equal("Bearer pd-secret", auth_seen(d, "/generate"))
      H.stop(pr.proc)
    end)
  end)

  it("without --api-key passes the client's Authorization through and sends none itself", function()
    local w = H.sim({ "--id", "plain" })
    local r = H.router({ "--worker-urls", w.url })
    assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("hi"), bearer("client-token"))).status)
    assert.equal("Bearer client-token", auth_seen(w, "/generate"))
    assert.equal("", auth_seen(w, "/health"))
    assert.equal(200, assert(H.post(r.url, "/flush_cache")).status)
    assert.equal("", auth_seen(w, "/flush_cache"))
    H.stop(r.proc)
  end)

  describe("--admin-api-key", function()
    local w1, w2, r
    setup(function()
      w1 = H.sim({ "--id", "w1" })
      w2 = H.sim({ "--id", "w2" })
      -- from the environment, so it stays out of ps
      r = H.router({ "--worker-urls", w1.url }, { env = { "SGLR_ADMIN_API_KEY=admin-secret" } })
    end)

    it("answers 401 on the admin routes without the key or with another", function()
      for _, h in ipairs({ {}, bearer("wrong"), bearer("admin-secre"), bearer("admin-secret!"),
                           { authorization = "Basic admin-secret" }, { authorization = "admin-secret" } }) do
        for _, path in ipairs({ "/add_worker?url=" .. w2.url, "/remove_worker?url=" .. w1.url, "/flush_cache" }) do
          local res = assert(H.post(r.url, path, "", h))
          assert.equal(401, res.status, path)
          assert.equal("unauthorized", res.json.error.type)
          assert.equal("Bearer", res.headers["www-authenticate"])
        end
      end
      -- nothing changed
      assert.same({ w1.url }, H.list_workers(r).urls)
    end)

    it("lets the key through (any case of Bearer)", function()
      local res = assert(H.post(r.url, "/add_worker?url=" .. w2.url, "", bearer("admin-secret")))
      assert.equal(200, res.status)
      res = assert(H.post(r.url, "/flush_cache", "", { authorization = "bearer admin-secret" }))
      assert.equal(200, res.status)
      res = assert(H.post(r.url, "/remove_worker?url=" .. w2.url, "", bearer("admin-secret")))
      assert.equal(200, res.status)
      assert.same({ w1.url }, H.list_workers(r).urls)
    end)

    it("leaves inference, health and read-only routes open", function()
      assert.equal(200, assert(H.post(r.url, "/generate", H.gen_body("x"))).status)
      assert.equal(200, assert(H.get(r.url, "/health")).status)
      assert.equal(200, assert(H.get(r.url, "/list_workers")).status)
    end)
  end)

  describe("--inference-api-key", function()
    local w, r, both
    setup(function()
      w = H.sim({ "--id", "w" })
      r = H.router({ "--worker-urls", w.url, "--inference-api-key", "client-secret",
        "--cors-allowed-origins", "https://app.example" })
      both = H.router({ "--worker-urls", w.url, "--inference-api-key", "client-secret",
        "--api-key", "worker-secret" })
    end)

    it("answers 401 on the inference routes without the key, and no worker hears of it", function()
      local before = H.sim_stats(w).requests
      for _, h in ipairs({ {}, bearer("wrong"), bearer("") }) do
        local res = assert(H.post(r.url, "/generate", H.gen_body("x"), h))
        assert.equal(401, res.status)
        assert.equal("unauthorized", res.json.error.type)
        assert.equal(401, assert(H.post(r.url, "/v1/chat/completions",
          '{"messages":[{"role":"user","content":"x"}]}', h)).status)
        assert.equal(401, assert(H.post(r.url, "/v1/completions", '{"prompt":"x"}', h)).status)
        assert.equal(401, assert(H.get(r.url, "/v1/models", h)).status)
      end
      assert.equal(before, H.sim_stats(w).requests)
      assert.equal(3, H.metric(H.scrape(r), 'sgl_router_request_errors_total{route="generate",error_type="unauthorized"}'))
    end)

    it("serves with the key and never forwards it", function()
      local res = assert(H.post(r.url, "/generate", H.gen_body("x"), bearer("client-secret")))
      assert.equal(200, res.status)
      assert.equal("", auth_seen(w, "/generate"))
      res = assert(H.get(r.url, "/v1/models", bearer("client-secret")))
      assert.equal(200, res.status)
      assert.equal("", auth_seen(w, "/v1/models"))
      -- with --api-key too, the worker gets that one instead
      res = assert(H.post(both.url, "/generate", H.gen_body("x"), bearer("client-secret")))
      assert.equal(200, res.status)
      assert.equal("Bearer worker-secret", auth_seen(w, "/generate"))
    end)

    it("leaves health, admin and CORS preflight open", function()
      assert.equal(200, assert(H.get(r.url, "/health")).status)
      assert.equal(200, assert(H.get(r.url, "/readiness")).status)
      assert.equal(200, assert(H.get(r.url, "/list_workers")).status)
      local res = assert(H.request(r.url, "OPTIONS", "/generate", nil,
        { origin = "https://app.example", ["access-control-request-method"] = "POST" }))
      assert.equal(204, res.status)
      core.sleep(0)
    end)
  end)
end)
