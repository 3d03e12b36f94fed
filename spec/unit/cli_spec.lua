-- sglr.cli: flags of `sglr run`, their defaults, and the errors an operator
-- sees for bad values.

local cli = require "sglr.cli"

local function parse(...)
  return cli.parse_run({ ... })
end

-- Parse that must succeed; fails the test with the parser's message.
local function ok(...)
  local conf, err = parse(...)
  assert(conf, err)
  return conf
end

-- Parse that must fail; returns the message.
local function fails(...)
  local conf, err = parse(...)
  assert.is_nil(conf)
  assert.is_string(err)
  return err
end

local function has(s, sub)
  assert(s:find(sub, 1, true), ("expected %q to contain %q"):format(s, sub))
end

describe("sglr.cli", function()
  describe("defaults", function()
    -- Names and defaults of python -m sglang_router.launch_router, plus sglr's own.
    local expected = {
      host = "127.0.0.1", port = 30000, worker_urls = {}, policy = "cache_aware",
      cache_threshold = 0.5, cache_routing_prob = 1.0, balance_abs_threshold = 32,
      balance_rel_threshold = 1.0001,
      eviction_interval = 60, max_tree_size = 16777216, max_payload_size = 268435456,
      max_concurrent_requests = 64, queue_size = 100, queue_timeout_secs = 60,
      request_timeout_secs = 600, worker_startup_timeout_secs = 300,
      worker_startup_check_interval = 10, health_check_interval_secs = 60,
      health_failure_threshold = 3, health_success_threshold = 2,
      health_check_timeout_secs = 5, health_check_endpoint = "/health",
      retry_max_retries = 3, retry_initial_backoff_ms = 100, retry_max_backoff_ms = 10000,
      retry_backoff_multiplier = 2.0, retry_jitter_factor = 0.1, disable_retries = false,
      cb_failure_threshold = 5, cb_success_threshold = 2, cb_timeout_duration_secs = 30,
      cb_window_duration_secs = 60, disable_circuit_breaker = false,
      pd_disaggregation = false, prefill = {}, decode = {},
      prefill_policy = "cache_aware", decode_policy = "cache_aware",
      service_discovery = false, selector = {}, prefill_selector = {}, decode_selector = {},
      service_discovery_port = 80, bootstrap_port_annotation = "sglang.ai/bootstrap-port",
      service_discovery_relist_secs = 60,
      prometheus_host = "127.0.0.1", prometheus_port = 29000, log_level = "info",
      log_json = false,
      request_id_headers = { "x-request-id", "x-correlation-id", "x-trace-id", "request-id" },
      cors_allowed_origins = {}, dp_aware = false,
      shutdown_grace_secs = 30, connect_timeout_ms = 5000,
      client_header_timeout_secs = 30, client_body_timeout_secs = 60, keepalive_timeout_secs = 75,
      client_write_timeout_secs = 60, trace_out_max_mb = 100,
      policy_opt = {}, prefill_policy_opt = {}, decode_policy_opt = {},
      policy_rollback_error_rate = 0.5, policy_rollback_window_secs = 10, policy_rollback_min_requests = 20,
      shadow_policy = {}, shadow_budget_us = 1000, explain = false, decision_log_size = 1000,
    }
    local unset = { "service_discovery_namespace", "kubeconfig", "log_dir", "api_key", "lua_path",
      "max_connections", "admin_api_key", "inference_api_key", "trace_out" }

    it("gives every flag its default with no arguments", function()
      local conf = ok()
      for key, v in pairs(expected) do
        assert.same(v, conf[key], key)
      end
      for _, key in ipairs(unset) do
        assert.is_nil(conf[key], key)
      end
    end)

    it("has a config key for every flag and nothing unexpected", function()
      local conf = ok()
      local known = {}
      for k in pairs(expected) do known[k] = true end
      for _, k in ipairs(unset) do known[k] = true end
      known.policy_options = true
      for _, f in ipairs(cli.FLAGS) do
        if f.key then assert.is_true(known[f.key], "untested flag " .. f.name) end
      end
      for k in pairs(conf) do assert.is_true(known[k], "unexpected key " .. k) end
    end)

    it("returns fresh default tables on each call", function()
      local a = ok()
      table.insert(a.request_id_headers, "x-mine")
      table.insert(a.worker_urls, "http://x")
      local b = ok()
      assert.same(4, #b.request_id_headers)
      assert.same({}, b.worker_urls)
    end)

    it("defaults() equals parse_run({})", function()
      assert.same(ok(), cli.defaults())
    end)
  end)

  describe("given values", function()
    local cases = {
      { { "--host", "0.0.0.0" }, "host", "0.0.0.0" },
      { { "--port", "8080" }, "port", 8080 },
      { { "--port", "0" }, "port", 0 },
      { { "--port=9000" }, "port", 9000 },
      { { "--policy", "random" }, "policy", "random" },
      { { "--policy", "round_robin" }, "policy", "round_robin" },
      { { "--policy", "power_of_two" }, "policy", "power_of_two" },
      { { "--cache-threshold", "0.3" }, "cache_threshold", 0.3 },
      { { "--cache-threshold", "1" }, "cache_threshold", 1 },
      { { "--balance-abs-threshold", "64" }, "balance_abs_threshold", 64 },
      { { "--balance-rel-threshold", "1.5" }, "balance_rel_threshold", 1.5 },
      { { "--eviction-interval", "120" }, "eviction_interval", 120 },
      { { "--max-tree-size", "67108864" }, "max_tree_size", 67108864 },
      { { "--max-payload-size", "1024" }, "max_payload_size", 1024 },
      { { "--max-payload-size", "256MB" }, "max_payload_size", 268435456 },
      { { "--max-payload-size", "1GiB" }, "max_payload_size", 1073741824 },
      { { "--max-payload-size", "512k" }, "max_payload_size", 524288 },
      { { "--max-concurrent-requests", "256" }, "max_concurrent_requests", 256 },
      { { "--queue-size", "0" }, "queue_size", 0 },
      { { "--queue-timeout-secs", "5" }, "queue_timeout_secs", 5 },
      { { "--request-timeout-secs", "30" }, "request_timeout_secs", 30 },
      { { "--worker-startup-timeout-secs", "600" }, "worker_startup_timeout_secs", 600 },
      { { "--worker-startup-check-interval", "30" }, "worker_startup_check_interval", 30 },
      { { "--health-check-interval-secs", "0.5" }, "health_check_interval_secs", 0.5 },
      { { "--health-failure-threshold", "1" }, "health_failure_threshold", 1 },
      { { "--health-success-threshold", "5" }, "health_success_threshold", 5 },
      { { "--health-check-timeout-secs", "2" }, "health_check_timeout_secs", 2 },
      { { "--health-check-endpoint", "/ready" }, "health_check_endpoint", "/ready" },
      { { "--retry-max-retries", "5" }, "retry_max_retries", 5 },
      { { "--retry-max-retries", "0" }, "retry_max_retries", 0 },
      { { "--retry-initial-backoff-ms", "50" }, "retry_initial_backoff_ms", 50 },
      { { "--retry-max-backoff-ms", "30000" }, "retry_max_backoff_ms", 30000 },
      { { "--retry-backoff-multiplier", "1.5" }, "retry_backoff_multiplier", 1.5 },
      { { "--retry-jitter-factor", "0.2" }, "retry_jitter_factor", 0.2 },
      { { "--disable-retries" }, "disable_retries", true },
      { { "--cb-failure-threshold", "10" }, "cb_failure_threshold", 10 },
      { { "--cb-success-threshold", "3" }, "cb_success_threshold", 3 },
      { { "--cb-timeout-duration-secs", "60" }, "cb_timeout_duration_secs", 60 },
      { { "--cb-window-duration-secs", "120" }, "cb_window_duration_secs", 120 },
      { { "--disable-circuit-breaker" }, "disable_circuit_breaker", true },
      { { "--service-discovery-port", "8000" }, "service_discovery_port", 8000 },
      { { "--service-discovery-namespace", "prod" }, "service_discovery_namespace", "prod" },
      { { "--bootstrap-port-annotation", "x/bp" }, "bootstrap_port_annotation", "x/bp" },
      { { "--prometheus-host", "0.0.0.0" }, "prometheus_host", "0.0.0.0" },
      { { "--prometheus-port", "9100" }, "prometheus_port", 9100 },
      { { "--log-dir", "/tmp/logs" }, "log_dir", "/tmp/logs" },
      { { "--log-level", "debug" }, "log_level", "debug" },
      { { "--log-level", "WARNING" }, "log_level", "warn" },
      { { "--log-level", "critical" }, "log_level", "error" },
      { { "--log-json" }, "log_json", true },
      { { "--trace-out", "traffic.jsonl" }, "trace_out", "traffic.jsonl" },
      { { "--trace-out-max-mb", "5" }, "trace_out_max_mb", 5 },
      { { "--request-id-headers", "X-Req", "x-trace" }, "request_id_headers", { "x-req", "x-trace" } },
      { { "--request-id-headers" }, "request_id_headers", {} },
      { { "--cors-allowed-origins", "https://a.com", "https://b.com" }, "cors_allowed_origins",
        { "https://a.com", "https://b.com" } },
      { { "--cors-allowed-origins", "https://a.com,https://b.com" }, "cors_allowed_origins",
        { "https://a.com", "https://b.com" } },
      { { "--dp-aware" }, "dp_aware", true },
      { { "--api-key", "secret" }, "api_key", "secret" },
      { { "--admin-api-key", "adm" }, "admin_api_key", "adm" },
      { { "--inference-api-key", "inf" }, "inference_api_key", "inf" },
      { { "--cache-routing-prob", "0.25" }, "cache_routing_prob", 0.25 },
      { { "--lua-path", "/opt/sglr" }, "lua_path", "/opt/sglr" },
      { { "--shutdown-grace-secs", "0" }, "shutdown_grace_secs", 0 },
      { { "--connect-timeout-ms", "250" }, "connect_timeout_ms", 250 },
      { { "--shadow-policy", "cache_aware", "--shadow-policy", "power_of_two" }, "shadow_policy",
        { "cache_aware", "power_of_two" } },
      { { "--shadow-budget-us", "50" }, "shadow_budget_us", 50 },
      { { "--explain" }, "explain", true },
      { { "--decision-log-size", "0" }, "decision_log_size", 0 },
    }
    for _, c in ipairs(cases) do
      it(table.concat(c[1], " ") .. " sets " .. c[2], function()
        local conf = ok(unpack(c[1]))
        assert.same(c[3], conf[c[2]])
      end)
    end

    it("takes the last value of a flag given twice", function()
      assert.equal(2, ok("--port", "1", "--port", "2").port)
    end)

    it("parses worker URLs space separated, comma separated and repeated", function()
      local conf = ok("--worker-urls", "http://w1:8000", "http://w2:8000,https://w3",
                      "--worker-urls", "http://10.0.0.4:8000/v1", "http://[::1]:9000")
      assert.same({ "http://w1:8000", "http://w2:8000", "https://w3",
                    "http://10.0.0.4:8000/v1", "http://[::1]:9000" }, conf.worker_urls)
    end)

    it("drops trailing slashes from worker URLs", function()
      assert.same({ "http://w1:8000" }, ok("--worker-urls", "http://w1:8000/").worker_urls)
    end)

    it("accepts a policy file path", function()
      local path = os.tmpname() .. ".lua"
      local fh = assert(io.open(path, "w"))
      fh:write("return {}\n")
      fh:close()
      local conf = ok("--policy", path)
      os.remove(path)
      assert.equal(path, conf.policy)
      assert.equal(path, conf.prefill_policy)
    end)

    it("accepts a policy name found under --lua-path", function()
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. dir .. "/policies"))
      local fh = assert(io.open(dir .. "/policies/mine.lua", "w"))
      fh:write("return {}\n")
      fh:close()
      local conf, err = parse("--lua-path", dir, "--policy", "mine")
      os.execute("rm -rf " .. dir)
      assert(conf, err)
      assert.equal("mine", conf.policy)
    end)

    it("fills policy_options with the cache-aware keys", function()
      local conf = ok("--cache-threshold", "0.7", "--balance-abs-threshold", "8",
                      "--balance-rel-threshold", "1.2", "--eviction-interval", "5",
                      "--max-tree-size", "1000", "--cache-routing-prob", "0.9")
      assert.same({ cache_threshold = 0.7, balance_abs_threshold = 8, balance_rel_threshold = 1.2,
                    eviction_interval = 5, max_tree_size = 1000, cache_routing_prob = 0.9 },
                  conf.policy_options)
    end)

    it("reads the keys from the environment when the flags are not given", function()
      local env = { SGLR_API_KEY = "w", SGLR_ADMIN_API_KEY = "a", SGLR_INFERENCE_API_KEY = "" }
      local saved = cli.getenv
      cli.getenv = function(name) return env[name] end
      local conf, conf2 = parse(), parse("--admin-api-key", "flag-wins")
      cli.getenv = saved
      assert(conf and conf2)
      assert.equal("w", conf.api_key)
      assert.equal("a", conf.admin_api_key)
      assert.is_nil(conf.inference_api_key)           -- empty: unset
      assert.equal("flag-wins", conf2.admin_api_key)
    end)

    it("prints the version for --version", function()
      local conf, text, kind = parse("--port", "1", "--version")
      assert.is_nil(conf)
      assert.equal("version", kind)
      assert.equal("sglr " .. require("sglr.version"), text)
      assert.matches("^sglr %d+%.%d+%.%d+", text)
    end)

    -- python -m sglang_router.launch_router --help, as the seeds' docs
    -- print it (the early router's and the later one's flags)
    it("accepts every flag of sglang_router.launch_router", function()
      local conf = ok("--host", "0.0.0.0", "--port", "8080", "--worker-urls", "http://w1:8000",
        "http://w2:8000", "--policy", "cache_aware", "--cache-threshold", "0.5",
        "--cache-routing-prob", "0.8", "--eviction-interval", "60", "--max-tree-size", "16777216",
        "--balance-abs-threshold", "32", "--balance-rel-threshold", "1.0001",
        "--max-concurrent-requests", "64", "--request-timeout-secs", "600",
        "--max-payload-size", "268435456", "--retry-max-retries", "3",
        "--retry-initial-backoff-ms", "100", "--retry-max-backoff-ms", "10000",
        "--retry-backoff-multiplier", "2.0", "--retry-jitter-factor", "0.1", "--disable-retries",
        "--cb-failure-threshold", "5", "--cb-success-threshold", "2",
        "--cb-timeout-duration-secs", "30", "--cb-window-duration-secs", "60",
        "--disable-circuit-breaker", "--worker-startup-timeout-secs", "300",
        "--worker-startup-check-interval", "10", "--service-discovery-port", "8000",
        "--service-discovery-namespace", "default", "--bootstrap-port-annotation", "x/port",
        "--prometheus-port", "29000", "--prometheus-host", "0.0.0.0", "--log-dir", "/tmp/logs",
        "--log-level", "info", "--request-id-headers", "x-request-id",
        "--cors-allowed-origins", "https://a.com", "--dp-aware", "--api-key", "k")
      assert.equal(0.8, conf.cache_routing_prob)
      assert.is_true(conf.dp_aware)
      assert(ok("--pd-disaggregation", "--prefill", "http://p:8000", "9000", "--decode", "http://d:8000",
        "--prefill-policy", "cache_aware", "--decode-policy", "round_robin"))
      assert(ok("--service-discovery", "--selector", "app=sglang", "--pd-disaggregation",
        "--prefill-selector", "c=p", "--decode-selector", "c=d"))
    end)
  end)

  describe("PD disaggregation", function()
    it("parses --prefill with a bootstrap port, 'none' and nothing", function()
      local conf = ok("--pd-disaggregation",
                      "--prefill", "http://p1:8000", "9000",
                      "--prefill", "http://p2:8001", "none",
                      "--prefill", "http://p3:8002",
                      "--decode", "http://d1:8003",
                      "--decode", "http://d2:8004")
      assert.is_true(conf.pd_disaggregation)
      assert.same({
        { url = "http://p1:8000", bootstrap_port = 9000 },
        { url = "http://p2:8001" },
        { url = "http://p3:8002" },
      }, conf.prefill)
      assert.is_nil(conf.prefill[2].bootstrap_port)
      assert.same({ "http://d1:8003", "http://d2:8004" }, conf.decode)
    end)

    it("accepts NONE in any case", function()
      local conf = ok("--pd-disaggregation", "--prefill", "http://p1", "NONE", "--decode", "http://d1")
      assert.is_nil(conf.prefill[1].bootstrap_port)
    end)

    it("inherits --policy for prefill and decode unless given", function()
      local conf = ok("--pd-disaggregation", "--prefill", "http://p1", "--decode", "http://d1",
                      "--policy", "round_robin", "--prefill-policy", "cache_aware")
      assert.equal("cache_aware", conf.prefill_policy)
      assert.equal("round_robin", conf.decode_policy)
      conf = ok("--pd-disaggregation", "--prefill", "http://p1", "--decode", "http://d1",
                "--policy", "random", "--decode-policy", "power_of_two")
      assert.equal("random", conf.prefill_policy)
      assert.equal("power_of_two", conf.decode_policy)
    end)

    it("rejects a bad bootstrap port, naming --prefill", function()
      for _, bp in ipairs({ "0", "70000", "abc", "http://p2:8000" }) do
        local err = fails("--pd-disaggregation", "--prefill", "http://p1:8000", bp,
                          "--decode", "http://d1")
        has(err, "--prefill")
        has(err, bp)
      end
    end)

    it("needs both prefill and decode workers without discovery", function()
      has(fails("--pd-disaggregation", "--prefill", "http://p1"), "--decode")
      has(fails("--pd-disaggregation", "--decode", "http://d1"), "--prefill")
    end)

    it("rejects --prefill and --decode without --pd-disaggregation", function()
      has(fails("--prefill", "http://p1"), "--pd-disaggregation")
      has(fails("--decode", "http://d1"), "--pd-disaggregation")
    end)

    it("rejects --worker-urls in PD mode", function()
      local err = fails("--pd-disaggregation", "--prefill", "http://p1", "--decode", "http://d1",
                        "--worker-urls", "http://w1")
      has(err, "--worker-urls")
    end)

    it("rejects one URL used as both prefill and decode", function()
      local err = fails("--pd-disaggregation", "--prefill", "http://x:1", "--decode", "http://x:1")
      has(err, "--decode")
      has(err, "http://x:1")
    end)

    it("validates prefill and decode URLs", function()
      has(fails("--pd-disaggregation", "--prefill", "p1:8000", "--decode", "http://d1"),
          "invalid worker URL 'p1:8000'")
      has(fails("--pd-disaggregation", "--prefill", "http://p1", "--decode", "ftp://d1"),
          "--decode")
    end)
  end)

  describe("service discovery", function()
    it("parses selectors into maps", function()
      local conf = ok("--service-discovery", "--selector", "app=sglang-worker", "env=prod",
                      "--service-discovery-namespace", "production")
      assert.is_true(conf.service_discovery)
      assert.same({ app = "sglang-worker", env = "prod" }, conf.selector)
    end)

    it("parses prefill and decode selectors in PD mode", function()
      local conf = ok("--pd-disaggregation", "--service-discovery",
                      "--prefill-selector", "app=prefill-server", "tier=gpu",
                      "--decode-selector", "app=decode-server", "tier=cpu")
      assert.same({ app = "prefill-server", tier = "gpu" }, conf.prefill_selector)
      assert.same({ app = "decode-server", tier = "cpu" }, conf.decode_selector)
    end)

    it("allows an empty value and '=' inside a value", function()
      local conf = ok("--service-discovery", "--selector", "a=", "b=x=y")
      assert.same({ a = "", b = "x=y" }, conf.selector)
    end)

    it("rejects a selector word that is not key=value", function()
      has(fails("--service-discovery", "--selector", "app"), "--selector")
      has(fails("--service-discovery", "--selector", "app"), "key=value")
      has(fails("--pd-disaggregation", "--service-discovery", "--prefill-selector", "=x",
                "--decode-selector", "a=b"), "--prefill-selector")
      has(fails("--pd-disaggregation", "--service-discovery", "--prefill-selector", "a=b",
                "--decode-selector", "oops"), "--decode-selector")
    end)

    it("rejects a label given twice with different values", function()
      has(fails("--service-discovery", "--selector", "app=a", "app=b"), "--selector")
    end)

    it("needs a selector to discover anything", function()
      has(fails("--service-discovery"), "--selector")
      has(fails("--pd-disaggregation", "--service-discovery", "--decode-selector", "a=b"),
          "--prefill-selector")
    end)

    it("rejects selectors without --service-discovery", function()
      has(fails("--selector", "app=x"), "--service-discovery")
    end)
  end)

  describe("validation errors", function()
    -- Each bad value must yield a message that names the flag.
    local bad = {
      { "--port", "-1" }, { "--port", "65536" }, { "--port", "abc" }, { "--port", "80.5" },
      { "--prometheus-port", "70000" }, { "--service-discovery-port", "0" },
      { "--cache-threshold", "1.5" }, { "--cache-threshold", "-0.1" },
      { "--cache-threshold", "half" },
      { "--retry-jitter-factor", "2" }, { "--retry-jitter-factor", "-1" },
      { "--balance-abs-threshold", "-1" }, { "--balance-abs-threshold", "1.5" },
      { "--balance-rel-threshold", "-1" },
      { "--eviction-interval", "0" }, { "--max-tree-size", "0" },
      { "--max-payload-size", "0" }, { "--max-payload-size", "lots" },
      { "--max-payload-size", "1TB" },
      { "--max-concurrent-requests", "-1" }, { "--queue-size", "-5" },
      { "--shadow-policy", "no_such_policy" }, { "--shadow-policy", "missing.lua" },
      { "--shadow-budget-us", "0" }, { "--decision-log-size", "-1" }, { "--decision-log-size", "100001" },
      { "--queue-timeout-secs", "0" }, { "--request-timeout-secs", "-3" },
      { "--worker-startup-timeout-secs", "0" }, { "--worker-startup-check-interval", "0" },
      { "--health-check-interval-secs", "0" }, { "--health-failure-threshold", "0" },
      { "--health-success-threshold", "0" }, { "--health-check-timeout-secs", "0" },
      { "--health-check-endpoint", "health" },
      { "--retry-max-retries", "-1" }, { "--retry-max-retries", "two" },
      { "--retry-initial-backoff-ms", "-1" }, { "--retry-max-backoff-ms", "-1" },
      { "--retry-backoff-multiplier", "0.5" },
      { "--cb-failure-threshold", "0" }, { "--cb-success-threshold", "0" },
      { "--cb-timeout-duration-secs", "0" }, { "--cb-window-duration-secs", "0" },
      { "--log-level", "verbose" }, { "--policy", "cache-aware" }, { "--policy", "/no/such.lua" },
      { "--prefill-policy", "nope" }, { "--decode-policy", "nope" },
      { "--shutdown-grace-secs", "-1" }, { "--connect-timeout-ms", "0" },
      { "--host", "" }, { "--port", "0x10" }, { "--cache-threshold", "nan" },
      { "--cache-routing-prob", "1.5" }, { "--cache-routing-prob", "-0.1" },
      { "--admin-api-key", "" }, { "--inference-api-key", "" },
      { "--request-timeout-secs", "inf" },
    }
    for _, c in ipairs(bad) do
      it(c[1] .. " " .. c[2] .. " is rejected with a message naming the flag", function()
        local err = fails(c[1], c[2])
        has(err, c[1])
        has(err, "sglr run:")
      end)
    end

    it("explains range errors", function()
      has(fails("--cache-threshold", "1.5"), "between 0 and 1")
      has(fails("--port", "70000"), "65535")
    end)

    it("requires --retry-max-backoff-ms >= --retry-initial-backoff-ms", function()
      local err = fails("--retry-initial-backoff-ms", "500", "--retry-max-backoff-ms", "100")
      has(err, "--retry-max-backoff-ms")
      has(err, "--retry-initial-backoff-ms")
    end)

    it("takes at most 32 --request-id-headers (the lookup reads no more)", function()
      local names = {}
      for i = 1, 33 do names[i] = "x-id-" .. i end
      has(fails("--request-id-headers", unpack(names)), "--request-id-headers")
      names[33] = nil
      assert.equal(32, #assert(parse("--request-id-headers", unpack(names))).request_id_headers)
    end)

    it("reports a missing value", function()
      has(fails("--port"), "--port")
      has(fails("--host"), "--host")
    end)

    it("reports an unknown option readably", function()
      has(fails("--foo"), "sglr run: unknown option '--foo'")
      has(fails("--worker-url", "http://a"), "--worker-urls")  -- "did you mean"
    end)

    it("reports a stray argument", function()
      has(fails("http://w1:8000"), "unexpected argument 'http://w1:8000'")
    end)

    it("reports a value given to a switch", function()
      has(fails("--disable-retries=yes"), "--disable-retries")
    end)
  end)

  describe("worker URLs", function()
    local bad = {
      { "w1:8000", "http://" },
      { "ftp://w1", "scheme" },
      { "http://", "missing host" },
      { "http://:8000", "missing host" },
      { "http://w1:0", "port" },
      { "http://w1:99999", "port" },
      { "http://w1:abc", "port" },
      { "http://w1:8000/x?y=1", "query" },
      { "http://w1#frag", "fragment" },
      { "http://user@w1", "user info" },
      { "http://w 1", "whitespace" },
      { "http://w$1", "host" },
    }
    for _, c in ipairs(bad) do
      it("rejects " .. c[1], function()
        local err = fails("--worker-urls", c[1])
        has(err, "--worker-urls")
        has(err, "invalid worker URL '" .. c[1] .. "'")
        has(err, c[2])
      end)
    end

    it("rejects duplicates, also across spellings", function()
      has(fails("--worker-urls", "http://w1:8000", "http://w1:8000"), "duplicate worker URL")
      has(fails("--worker-urls", "http://w1:8000", "HTTP://W1:8000/"), "duplicate worker URL")
    end)

    it("accepts https, IPs, IPv6 and paths", function()
      local urls = { "https://w1", "http://127.0.0.1:8000", "http://[::1]:8000", "http://w1/api" }
      assert.same(urls, ok("--worker-urls", unpack(urls)).worker_urls)
    end)
  end)

  describe("help", function()
    it("returns nil, the help text and 'help' for --help and -h", function()
      for _, flag in ipairs({ "--help", "-h" }) do
        local conf, text, what = parse("--port", "1", flag)
        assert.is_nil(conf)
        assert.equal("help", what)
        assert.equal(cli.run_help(), text)
      end
    end)

    it("wins over other errors", function()
      local _, _, what = parse("--port", "nope", "--bogus", "--help")
      assert.equal("help", what)
    end)

    it("lists every flag with its default", function()
      local text = cli.run_help():gsub("%s+", " ")  -- descriptions are wrapped
      for _, f in ipairs(cli.FLAGS) do
        if f.name then has(text, f.name) end
      end
      has(text, "--help")
      has(text, "(default: 30000)")
      has(text, "(default: cache_aware)")
      has(text, "(default: 0.5)")
      has(text, "(default: 1.0001)")
      has(text, "(default: 16777216)")
      has(text, "(default: 2.0)")
      has(text, "(default: sglang.ai/bootstrap-port)")
      has(text, "x-request-id x-correlation-id x-trace-id request-id")
    end)
  end)

  it("raises on misuse (args not a table)", function()
    assert.has_error(function() cli.parse_run("--port 1") end)
  end)
end)
