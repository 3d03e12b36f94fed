-- sglr.policy: loading policies by name and by path, option schema checks
-- and defaults, and the errors an operator sees.

local policy = require "sglr.policy"

local function has(s, sub)
  assert.is_string(s)
  assert(s:find(sub, 1, true), ("expected %q to contain %q"):format(s, sub))
end

-- Writes src to a fresh temporary .lua file; returns its path.
local tmpfiles = {}
local function tmp_policy(src)
  local base = os.tmpname()
  tmpfiles[#tmpfiles + 1] = base
  local path = base .. ".lua"
  tmpfiles[#tmpfiles + 1] = path
  local fh = assert(io.open(path, "w"))
  fh:write(src)
  fh:close()
  return path
end

local SCHEMA_POLICY = [[
local P = { name = "schema_test", version = "0.1.0" }
P.options = {
  cache_threshold = { type = "number", default = 0.5, min = 0, max = 1,
                      description = "Prefix match ratio" },
  max_tree_size = { type = "number", default = 100, integer = true, min = 1,
                    description = "Characters per worker" },
  mode = { type = "string", default = "fast", choices = { "fast", "slow" },
           description = "Mode" },
  verbose = { type = "boolean", default = false, description = "Log decisions" },
}
function P.new(conf, rt)
  return setmetatable({ conf = conf, rt = rt }, { __index = P })
end
function P:select(req, workers) return workers[1] end
return P
]]

describe("sglr.policy", function()
  teardown(function()
    for _, f in ipairs(tmpfiles) do os.remove(f) end
  end)

  describe("load", function()
    it("loads the built-in policies by name", function()
      for _, name in ipairs({ "random", "round_robin" }) do
        local P, err = policy.load(name)
        assert(P, err)
        assert.equal(name, P.name)
        assert.is_function(P.new)
        assert.is_function(P.select)
      end
    end)

    it("loads a policy file by path", function()
      local path = tmp_policy(SCHEMA_POLICY)
      local P, err = policy.load(path)
      assert(P, err)
      assert.equal("schema_test", P.name)
    end)

    it("names an unnamed file policy after its file", function()
      local path = tmp_policy("return { new = function() end, select = function() end }")
      local P = assert(policy.load(path))
      assert.equal(path:match("([^/]+)%.lua$"), P.name)
    end)

    it("reports an unknown name with the choices", function()
      local P, err = policy.load("no_such_policy")
      assert.is_nil(P)
      has(err, "unknown policy 'no_such_policy'")
      has(err, "round_robin")
    end)

    it("rejects names that are not identifiers", function()
      local P, err = policy.load("../etc/passwd")
      assert.is_nil(P)
      has(err, "../etc/passwd")
    end)

    it("reports a missing file", function()
      local P, err = policy.load("/nonexistent/dir/mine.lua")
      assert.is_nil(P)
      has(err, "/nonexistent/dir/mine.lua")
    end)

    it("reports a syntax error with the file name", function()
      local path = tmp_policy("return {")
      local P, err = policy.load(path)
      assert.is_nil(P)
      has(err, path)
    end)

    it("reports a file that raises while loading", function()
      local path = tmp_policy("error('boom')")
      local P, err = policy.load(path)
      assert.is_nil(P)
      has(err, "boom")
    end)

    it("rejects a file that does not return a table", function()
      local P, err = policy.load(tmp_policy("return 42"))
      assert.is_nil(P)
      has(err, "must return a table")
    end)

    it("rejects a table without select or new", function()
      local P, err = policy.load(tmp_policy("return { new = function() end }"))
      assert.is_nil(P)
      has(err, "select")
      P, err = policy.load(tmp_policy("return { select = function() end }"))
      assert.is_nil(P)
      has(err, "new")
    end)

    it("rejects a malformed option schema", function()
      local P, err = policy.load(tmp_policy([[
        return { new = function() end, select = function() end,
                 options = { x = { type = "float", default = 1 } } }]]))
      assert.is_nil(P)
      has(err, "'x'")
      P, err = policy.load(tmp_policy([[
        return { new = function() end, select = function() end,
                 options = { x = { type = "number", default = "1" } } }]]))
      assert.is_nil(P)
      has(err, "'x'")
    end)

    it("raises on misuse", function()
      assert.has_error(function() policy.load(nil) end)
      assert.has_error(function() policy.load("") end)
    end)
  end)

  describe("instantiate", function()
    local P
    before_each(function() P = assert(policy.load(tmp_policy(SCHEMA_POLICY))) end)

    it("fills defaults and passes rt to new", function()
      local rt = {}
      local inst = assert(policy.instantiate(P, {}, rt))
      assert.same({ cache_threshold = 0.5, max_tree_size = 100, mode = "fast", verbose = false },
                  inst.conf)
      assert.equal(rt, inst.rt)
    end)

    it("uses given values and ignores keys the policy does not declare", function()
      local inst = assert(policy.instantiate(P, {
        cache_threshold = 0.8, verbose = true, balance_abs_threshold = 32,
      }))
      assert.equal(0.8, inst.conf.cache_threshold)
      assert.is_true(inst.conf.verbose)
      assert.is_nil(inst.conf.balance_abs_threshold)
    end)

    it("accepts conf.policy_options from the CLI: the flags given, the policy's defaults else", function()
      local conf = assert(require("sglr.cli").parse_run({ "--cache-threshold", "0.9" }))
      local inst = assert(policy.instantiate(P, conf.policy_options))
      assert.equal(0.9, inst.conf.cache_threshold)
      assert.equal(100, inst.conf.max_tree_size)
    end)

    it("coerces numbers and booleans written as text", function()
      local inst = assert(policy.instantiate(P, { cache_threshold = "0.25", verbose = "true" }))
      assert.equal(0.25, inst.conf.cache_threshold)
      assert.is_true(inst.conf.verbose)
    end)

    it("rejects wrong types, naming policy and option", function()
      local inst, err = policy.instantiate(P, { cache_threshold = "high" })
      assert.is_nil(inst)
      has(err, "schema_test")
      has(err, "cache_threshold")
      has(err, "number")
      inst, err = policy.instantiate(P, { mode = 3 })
      assert.is_nil(inst)
      has(err, "mode")
      inst, err = policy.instantiate(P, { verbose = "maybe" })
      assert.is_nil(inst)
      has(err, "verbose")
    end)

    it("rejects values out of range, non-integers and unknown choices", function()
      local inst, err = policy.instantiate(P, { cache_threshold = 1.5 })
      assert.is_nil(inst)
      has(err, "cache_threshold")
      inst, err = policy.instantiate(P, { max_tree_size = 2.5 })
      assert.is_nil(inst)
      has(err, "integer")
      inst, err = policy.instantiate(P, { mode = "medium" })
      assert.is_nil(inst)
      has(err, "fast, slow")
    end)

    it("requires options marked required", function()
      local R = assert(policy.load(tmp_policy([[
        return { name = "req", new = function(c) return { select = function() end } end,
                 select = function() end,
                 options = { url = { type = "string", required = true } } }]])))
      local inst, err = policy.instantiate(R, {})
      assert.is_nil(inst)
      has(err, "'url' is required")
      assert(policy.instantiate(R, { url = "x" }))
    end)

    it("reports errors raised or returned by new", function()
      local E = assert(policy.load(tmp_policy([[
        return { name = "bad", new = function() error("cannot start") end,
                 select = function() end }]])))
      local inst, err = policy.instantiate(E, {})
      assert.is_nil(inst)
      has(err, "cannot start")
      local N = assert(policy.load(tmp_policy([[
        return { name = "nil", new = function() return nil, "no radix" end,
                 select = function() end }]])))
      inst, err = policy.instantiate(N, {})
      assert.is_nil(inst)
      has(err, "no radix")
    end)

    it("rejects an instance without select", function()
      local B = assert(policy.load(tmp_policy([[
        return { name = "b", new = function() return {} end, select = function() end }]])))
      local inst, err = policy.instantiate(B, {})
      assert.is_nil(inst)
      has(err, "select")
    end)
  end)

  describe("describe", function()
    it("lists each option with type, default and description", function()
      local text = policy.describe(assert(policy.load(tmp_policy(SCHEMA_POLICY))))
      has(text, "schema_test 0.1.0")
      has(text, "cache_threshold")
      has(text, "Prefix match ratio")
      has(text, "default: 0.5")
      has(text, "one of: fast, slow")
      has(text, "boolean")
    end)

    it("says when a policy has no options", function()
      has(policy.describe(assert(policy.load("round_robin"))), "(no options)")
    end)
  end)

  it("create loads and instantiates in one call", function()
    local inst = assert(policy.create("round_robin", {}, {}))
    assert.equal("http://a", inst:select({}, { { url = "http://a" } }).url)
    local none, err = policy.create("nope", {}, {})
    assert.is_nil(none)
    has(err, "unknown policy")
  end)
end)
