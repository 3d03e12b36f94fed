-- sglr.bench: the pure parts of `sglr bench` (workloads, request bodies,
-- response parsing, statistics, output and flags). Running a workload
-- against a server is exercised by the benchmarks themselves.

local bench = require "sglr.bench"
local cjson = require "cjson.safe"

local function opts(t)
  local o, err = bench.options(t)
  assert(o, err)
  return o
end

local function has(s, sub)
  assert(s:find(sub, 1, true), ("expected %q to contain %q"):format(s, sub))
end

-- Prompt text a request of a shared-prefix or multi-turn session sends on
-- the generate route.
local function text_of(session, i, history, o)
  return bench.body("generate", session[i], history, o).text
end

describe("sglr.bench", function()
  describe("random numbers", function()
    it("repeat the same sequence for the same seed", function()
      local a, b = bench.rng(42), bench.rng(42)
      for _ = 1, 100 do assert.equal(a:float(), b:float()) end
    end)

    it("give different sequences for different seeds", function()
      local a, b = bench.rng(1), bench.rng(2)
      local same = 0
      for _ = 1, 100 do if a:float() == b:float() then same = same + 1 end end
      assert.is_true(same < 5)
    end)

    it("stay in range", function()
      local r = bench.rng(7)
      for _ = 1, 1000 do
        local f, n = r:float(), r:int(3, 5)
        assert.is_true(f > 0 and f < 1)
        assert.is_true(n >= 3 and n <= 5 and n == math.floor(n))
      end
    end)
  end)

  describe("words", function()
    it("are 4 bytes per token: three letters and a space", function()
      local w = bench.words(bench.rng(1), 50)
      assert.equal(200, #w)
      local rest, n = w:gsub("%l%l%l ", "")
      assert.equal("", rest)
      assert.equal(50, n)
    end)
  end)

  describe("shared-prefix workload", function()
    local o = opts({ groups = 4, prompts_per_group = 5, system_tokens = 16, question_tokens = 4,
      output_tokens = 7 })

    it("has groups x prompts-per-group requests of system + question tokens", function()
      local wl = assert(bench.workload(o))
      assert.equal(20, wl.total)
      assert.equal(20, #wl.sessions)
      for _, s in ipairs(wl.sessions) do
        assert.equal(1, #s)
        assert.equal(4 * (16 + 4), #text_of(s, 1, {}, o))
        assert.equal(7, s[1].output_tokens)
      end
    end)

    it("gives every request of a group the same system prompt as its prefix", function()
      local wl = assert(bench.workload(o))
      local prefix = {}
      for _, s in ipairs(wl.sessions) do
        local g, text = s[1].group, text_of(s, 1, {}, o)
        prefix[g] = prefix[g] or text:sub(1, 64)
        assert.equal(prefix[g], text:sub(1, 64))
      end
      local seen = {}
      for g = 1, 4 do
        assert.is_nil(seen[prefix[g]], "groups must not share a system prompt")
        seen[prefix[g]] = true
      end
    end)

    it("is reproducible with the seed and shuffled across groups", function()
      local function order(seed)
        local wl = assert(bench.workload(opts({ groups = 8, prompts_per_group = 8,
          system_tokens = 4, question_tokens = 2, seed = seed })))
        local t = {}
        for i, s in ipairs(wl.sessions) do t[i] = text_of(s, 1, {}, o) end
        return t, wl
      end
      local a, wl = order(5)
      assert.same(a, (order(5)))
      assert.are_not.same(a, (order(6)))
      -- shuffled: a group's requests do not all arrive in a row
      local runs = 0
      for i = 2, #wl.sessions do
        if wl.sessions[i][1].group ~= wl.sessions[i - 1][1].group then runs = runs + 1 end
      end
      assert.is_true(runs > 16)
    end)

    it("is capped by --num-requests", function()
      local wl = assert(bench.workload(opts({ groups = 4, prompts_per_group = 5,
        system_tokens = 1, question_tokens = 1, num_requests = 3 })))
      assert.equal(3, wl.total)
    end)

    it("sends system and question as two messages on the chat route", function()
      local wl = assert(bench.workload(o))
      local b = bench.body("chat", wl.sessions[1][1], {}, o)
      assert.equal(2, #b.messages)
      assert.equal("system", b.messages[1].role)
      assert.equal(64, #b.messages[1].content)
      assert.equal("user", b.messages[2].role)
      assert.equal(7, b.max_tokens)
    end)
  end)

  describe("multi-turn workload", function()
    local o = opts({ workload = "multi-turn", users = 3, turns = 4, turn_tokens = 8 })

    it("has users x turns requests, the turns of a user in order", function()
      local wl = assert(bench.workload(o))
      assert.equal(12, wl.total)
      assert.equal(3, #wl.sessions)
      for u, s in ipairs(wl.sessions) do
        assert.equal(4, #s)
        for i, t in ipairs(s) do
          assert.equal(u, t.user)
          assert.equal(i, t.turn)
          assert.equal(32, #t.question)
        end
      end
    end)

    it("resends the conversation so far: each prompt extends the previous one", function()
      local s = assert(bench.workload(o)).sessions[1]
      local history = {}
      local prev = text_of(s, 1, history, o)
      for i = 2, 4 do
        history[#history + 1] = { s[i - 1].question, "answer " .. i }
        local text = text_of(s, i, history, o)
        assert.equal(prev, text:sub(1, #prev))
        has(text, "answer " .. i)
        assert.is_true(#text > #prev + #s[i].question)
        prev = text
      end
    end)

    it("sends the history as user and assistant messages on the chat route", function()
      local s = assert(bench.workload(o)).sessions[1]
      local b = bench.body("chat", s[2], { { s[1].question, "the answer" } }, o)
      assert.same({ "user", "assistant", "user" },
        { b.messages[1].role, b.messages[2].role, b.messages[3].role })
      assert.equal("the answer", b.messages[2].content)
      assert.equal(s[2].question, b.messages[3].content)
    end)
  end)

  describe("trace workload", function()
    it("reads text and messages lines, skipping blank ones", function()
      local s = assert(bench.parse_trace(
        '{"text": "hello", "output_tokens": 3}\n\n'
        .. '{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "p"}', 9))
      assert.equal(3, #s)
      assert.equal("hello", s[1][1].text)
      assert.equal(3, s[1][1].output_tokens)
      assert.equal("hi", s[2][1].messages[1].content)
      assert.equal(9, s[2][1].output_tokens)
      assert.equal("p", s[3][1].text)
    end)

    it("names the line of a bad record", function()
      local s, err = bench.parse_trace('{"text": "a"}\nnot json\n', 1)
      assert.is_nil(s)
      has(err, "line 2")
      s, err = bench.parse_trace('{"text": 5}\n', 1)
      assert.is_nil(s)
      has(err, "line 1")
      assert.is_nil((bench.parse_trace("\n\n", 1)))
    end)

    it("joins messages for the text routes and wraps text for chat", function()
      local o = opts({})
      local b = bench.body("completions", { messages = { { role = "system", content = "a" },
        { role = "user", content = "b" } }, output_tokens = 2 }, nil, o)
      assert.equal("a\nb", b.prompt)
      b = bench.body("chat", { text = "x", output_tokens = 2 }, nil, o)
      assert.same({ { role = "user", content = "x" } }, b.messages)
    end)
  end)

  describe("request bodies", function()
    local spec = { system = "sys ", question = "qqq ", output_tokens = 5 }

    it("use the SGLang generate shape", function()
      local b = bench.body("generate", spec, {}, opts({}))
      assert.equal("sys qqq ", b.text)
      assert.equal(5, b.sampling_params.max_new_tokens)
      assert.is_true(b.sampling_params.ignore_eos)
      assert.is_nil(b.stream)
    end)

    it("ask OpenAI routes for usage in streams", function()
      local b = bench.body("completions", spec, {}, opts({ stream = true }))
      assert.equal("sys qqq ", b.prompt)
      assert.is_true(b.stream)
      assert.is_true(b.stream_options.include_usage)
      assert.equal("default", b.model)
      b = bench.body("generate", spec, {}, opts({ stream = true }))
      assert.is_true(b.stream)
      assert.is_nil(b.stream_options)
    end)
  end)

  describe("responses", function()
    it("read token counts from /generate meta_info", function()
      local info = assert(bench.parse_response("generate", false, cjson.encode({ text = "out",
        meta_info = { prompt_tokens = 100, cached_tokens = 60, completion_tokens = 8 } })))
      assert.same({ text = "out", prompt_tokens = 100, cached_tokens = 60, output_tokens = 8 }, info)
    end)

    it("read token counts from OpenAI usage", function()
      local info = assert(bench.parse_response("chat", false, cjson.encode({
        choices = { { message = { role = "assistant", content = "hey" } } },
        usage = { prompt_tokens = 10, completion_tokens = 2,
          prompt_tokens_details = { cached_tokens = 4 } } })))
      assert.same({ text = "hey", prompt_tokens = 10, cached_tokens = 4, output_tokens = 2 }, info)
      info = assert(bench.parse_response("completions", false, cjson.encode({
        choices = { { text = "t" } }, usage = { prompt_tokens = 3, completion_tokens = 1 } })))
      assert.equal("t", info.text)
      assert.is_nil(info.cached_tokens)
    end)

    it("take the last event of a /generate stream (meta_info is cumulative)", function()
      local body = table.concat({
        'data: {"text":"a","meta_info":{"prompt_tokens":50,"cached_tokens":30,"completion_tokens":1}}',
        '',
        'data: {"text":"a b","meta_info":{"prompt_tokens":50,"cached_tokens":30,"completion_tokens":2}}',
        '', 'data: [DONE]', '', '' }, "\n")
      assert.same({ text = "a b", prompt_tokens = 50, cached_tokens = 30, output_tokens = 2 },
        bench.parse_response("generate", true, body))
    end)

    it("take usage from the final chunk of an OpenAI stream and join the deltas", function()
      local body = table.concat({
        'data: {"choices":[{"index":0,"delta":{"content":"tok1"},"finish_reason":null}]}',
        'data: {"choices":[{"index":0,"delta":{"content":" tok2"},"finish_reason":null}]}',
        'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
          .. '"usage":{"prompt_tokens":20,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":16}}}',
        'data: [DONE]', '' }, "\r\n\r\n")
      assert.same({ text = "tok1 tok2", prompt_tokens = 20, cached_tokens = 16, output_tokens = 2 },
        bench.parse_response("chat", true, body))
    end)

    it("treat error events and bodies that are not responses as errors", function()
      local info, err = bench.parse_response("generate", true,
        'data: {"text":"a"}\n\ndata: {"error":{"message":"worker died"}}\n\n')
      assert.is_nil(info)
      has(err, "worker died")
      assert.is_nil((bench.parse_response("generate", false, "<html>")))
      assert.is_nil((bench.parse_response("chat", true, "")))
    end)
  end)

  describe("statistics", function()
    it("interpolate percentiles between closest ranks", function()
      local xs = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }
      assert.near(5.5, bench.percentile(xs, 50), 1e-9)
      assert.near(9.1, bench.percentile(xs, 90), 1e-9)
      assert.near(9.91, bench.percentile(xs, 99), 1e-9)
      assert.equal(1, bench.percentile(xs, 0))
      assert.equal(10, bench.percentile(xs, 100))
      assert.equal(7, bench.percentile({ 7 }, 99))
      assert.is_nil(bench.percentile({}, 50))
    end)

    it("summarize ok requests, errors by kind and the cache hit rate", function()
      local s = bench.summarize({
        { ok = true, latency_ms = 30, ttft_ms = 10, prompt_tokens = 100, cached_tokens = 75,
          output_tokens = 10 },
        { ok = true, latency_ms = 10, ttft_ms = 5, prompt_tokens = 100, cached_tokens = 25,
          output_tokens = 10 },
        { ok = false, err = "http 503", latency_ms = 1 },
        { ok = false, err = "timeout" },
      }, 2, opts({ workload = "shared-prefix" }))
      assert.equal(4, s.requests)
      assert.equal(2, s.ok)
      assert.equal(2, s.errors)
      assert.same({ ["http 503"] = 1, timeout = 1 }, s.error_kinds)
      assert.equal(1, s.throughput_rps)
      assert.equal(10, s.output_tps)
      assert.equal(50, s.cache_hit_rate)
      assert.equal(20, s.latency_ms.p50)
      assert.equal(20, s.latency_ms.mean)
      assert.equal(7.5, s.ttft_ms.mean)
    end)

    it("report no hit rate when the server reports no prompt tokens", function()
      local s = bench.summarize({ { ok = true, latency_ms = 1, ttft_ms = 1 } }, 1, {})
      assert.is_nil(s.cache_hit_rate)
    end)
  end)

  describe("output", function()
    local s = bench.summarize({
      { ok = true, latency_ms = 120, ttft_ms = 40, prompt_tokens = 200, cached_tokens = 150,
        output_tokens = 32 },
      { ok = false, err = "connect" },
    }, 0.5, opts({ url = "http://127.0.0.1:9" }))

    it("formats the summary table", function()
      local text = bench.format(s)
      has(text, "shared-prefix workload on http://127.0.0.1:9/generate (concurrency 32)")
      has(text, "1 ok, 1 errors (connect: 1)")
      has(text, "2.0 req/s, 64 output tok/s")
      has(text, "p50 120.0")
      has(text, "p50 40.0")
      has(text, "75.0% (150 of 200 prompt tokens cached)")
    end)

    it("shows dashes when nothing succeeded", function()
      local text = bench.format(bench.summarize({ { ok = false, err = "timeout" } }, 1, opts({})))
      has(text, "p50 -  p90 -")
      has(text, "cache hit rate     -")
    end)

    it("puts named summaries side by side", function()
      local other = bench.summarize({ { ok = true, latency_ms = 80, ttft_ms = 20,
        prompt_tokens = 200, cached_tokens = 20, output_tokens = 32 } }, 0.25, opts({}))
      local text = bench.compare({ round_robin = s, cache_aware = other })
      local lines = {}
      for l in text:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.truthy(lines[1]:match("cache_aware%s+round_robin$"))
      local hit
      for _, l in ipairs(lines) do if l:match("^cache hit rate") then hit = l end end
      assert.truthy(hit:match("10%.0%%%s+75%.0%%$"), hit)
      -- an array keeps the given column order
      text = bench.compare({ { "rr", s }, { "ca", other } })
      assert.truthy(text:match("^%s+rr%s+ca\n"))
    end)
  end)

  describe("flags", function()
    local function fails(args, sub)
      local o, err, usage = bench.parse_args(args)
      assert.is_nil(o)
      has(err, sub)
      has(usage, "sglr bench")
    end

    it("default to the shared-prefix benchmark at concurrency 32", function()
      local o = assert(bench.parse_args({}))
      assert.equal("http://127.0.0.1:30000", o.url)
      assert.equal("shared-prefix", o.workload)
      assert.equal("generate", o.route)
      assert.same({ 64, 16, 2048, 128, 256 },
        { o.groups, o.prompts_per_group, o.system_tokens, o.question_tokens, o.output_tokens })
      assert.same({ 16, 4, 128 }, { o.users, o.turns, o.turn_tokens })
      assert.equal(32, o.concurrency)
      assert.is_nil(o.rate)
      assert.equal(1, o.seed)
      assert.equal(600, o.timeout_secs)
      assert.is_false(o.stream)
    end)

    it("leave in-flight requests uncapped with --rate unless --concurrency is given", function()
      local o = assert(bench.parse_args({ "--rate", "2.5" }))
      assert.equal(2.5, o.rate)
      assert.is_nil(o.concurrency)
      o = assert(bench.parse_args({ "--rate", "2.5", "--concurrency", "4", "--stream" }))
      assert.equal(4, o.concurrency)
      assert.is_true(o.stream)
    end)

    it("reject bad values with the usage", function()
      fails({ "--workload", "random" }, "must be one of")
      fails({ "--route", "embeddings" }, "must be one of")
      fails({ "--groups", "many" }, "malformed")
      fails({ "--groups", "0" }, "--groups must be a positive integer")
      fails({ "--concurrency", "1.5" }, "--concurrency must be a positive integer")
      fails({ "--rate", "0" }, "--rate must be a positive number")
      fails({ "--url", "localhost:30000" }, "--url must be an http:// URL")
      fails({ "--workload", "trace" }, "needs --trace")
      fails({ "--trace", "x.jsonl" }, "needs --workload trace")
      fails({ "--bogus" }, "unknown option")
    end)

    it("answer --help with the help text", function()
      local o = assert(bench.parse_args({ "--help" }))
      assert.is_true(o.help)
      has(o.help_text, "--prompts-per-group")
      has(o.help_text, "output_tokens")
    end)
  end)
end)
