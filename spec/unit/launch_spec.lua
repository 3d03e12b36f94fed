-- sglr launch's command line: which words are the launcher's, the
-- router's and the workers', and the command each worker gets.
local launch = require "sglr.launch"

describe("launch.split_words", function()
  it("splits as a shell would, without expansions", function()
    assert.same({ "a", "b c", "d\"e", "f'g", "h i", "$x", "{port}" },
      launch.split_words([[a 'b c' "d\"e" f\'g h\ i "$x" {port}]]))
    assert.same({ "x", "" }, launch.split_words("x ''"))
    assert.same({ "ab" }, launch.split_words("a'b'"))
  end)

  it("rejects what it cannot split", function()
    assert.same({ nil, "unterminated ' quote" }, { launch.split_words("a 'b") })
    assert.same({ nil, 'unterminated " quote' }, { launch.split_words('a "b') })
    assert.same({ nil, "trailing backslash" }, { launch.split_words("a \\") })
    assert.same({ nil, "empty command" }, { launch.split_words("  ") })
  end)
end)

describe("launch.parse", function()
  it("sorts launch flags, router flags and worker flags", function()
    local o = assert(launch.parse({ "--dp-size", "4", "--model-path", "m", "--policy", "round_robin",
      "--worker-base-port=31000", "--port", "8080", "--", "--tp-size", "2", "--policy", "x" }))
    assert.equal(4, o.dp_size)
    assert.equal("m", o.model_path)
    assert.equal(31000, o.worker_base_port)
    assert.same({ "--policy", "round_robin", "--port", "8080" }, o.router_args)
    assert.same({ "--tp-size", "2", "--policy", "x" }, o.worker_args)
    assert.equal("round_robin", o.conf.policy)
    assert.equal(8080, o.conf.port)
    assert.equal(2, o.tp)
  end)

  it("has the SGLang router's defaults", function()
    local o = assert(launch.parse({ "--model-path", "m" }))
    assert.equal(1, o.dp_size)
    assert.equal("127.0.0.1", o.worker_host)
    assert.is_nil(o.worker_base_port)
    assert.equal(10, o.worker_stop_grace_secs)
    assert.equal(30000, o.conf.port)
    assert.equal(300, o.conf.worker_startup_timeout_secs)
  end)

  it("answers --help with the launch flags", function()
    local _, text, kind = launch.parse({ "--dp-size", "2", "--help" })
    assert.equal("help", kind)
    assert.truthy(text:find("--worker-cmd", 1, true))
    assert.truthy(text:find(launch.DEFAULT_WORKER_CMD, 1, true))
    -- after --, --help is the workers'
    assert.truthy(launch.parse({ "--model-path", "m", "--", "--help" }))
  end)

  it("names the flag that is wrong", function()
    local function err(args) return select(2, launch.parse(args)) end
    assert.equal("--dp-size: must be at least 1, got '0'", err({ "--dp-size", "0", "--model-path", "m" }))
    assert.equal("--dp-size: expected an integer, got 'two'", err({ "--dp-size", "two", "--model-path", "m" }))
    assert.equal("--worker-base-port: expected a port number between 1 and 65535, got '0'",
      err({ "--worker-base-port", "0", "--model-path", "m" }))
    assert.equal("--worker-base-port: 4 workers from port 65534 go past 65535",
      err({ "--worker-base-port", "65534", "--dp-size", "4", "--model-path", "m" }))
    assert.equal("--worker-cmd: expected a value", err({ "--worker-cmd" }))
    assert.truthy(err({}):find("--model-path is required", 1, true))
    assert.truthy(err({ "--model-path", "m", "--cache-threshold", "2" }):match("^%-%-cache%-threshold: "))
    assert.truthy(err({ "--model-path", "m", "--pd-disaggregation", "--prefill", "http://p:1",
      "--decode", "http://d:2" }):find("cannot be used with sglr launch", 1, true))
  end)
end)

describe("launch.worker_argv", function()
  it("runs SGLang by default, with each rank's port and first GPU", function()
    local o = assert(launch.parse({ "--model-path", "/models/llama 8b", "--dp-size", "2", "--",
      "--tp", "2", "--mem-fraction-static", "0.8" }))
    assert.same({ "python3", "-m", "sglang.launch_server", "--model-path", "/models/llama 8b",
      "--host", "127.0.0.1", "--port", "31001", "--base-gpu-id", "2",
      "--tp", "2", "--mem-fraction-static", "0.8" }, launch.worker_argv(o, 1, 31001))
  end)

  it("fills a template's placeholders word by word", function()
    local o = assert(launch.parse({ "--worker-cmd", "sim --port {port} --id 'r{rank} at {host}' {x} {}",
      "--worker-host", "0.0.0.0", "--", "--tensor-parallel-size=4" }))
    assert.same({ "sim", "--port", "9000", "--id", "r3 at 0.0.0.0", "{x}", "{}", "--tensor-parallel-size=4" },
      launch.worker_argv(o, 3, 9000))
    assert.equal(4, o.tp)
  end)
end)
