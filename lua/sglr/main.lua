-- sglr entry point: dispatches the subcommand. Runs inside a coroutine
-- started by core/main.c, so every subcommand may wait on the loop.
local core = require "sglr.core"

-- LuaJIT's trace limits. A request's path from the flow through a policy
-- (cache_aware's select, its radix and metric calls through the FFI) holds
-- more IR constants than the default 500, and a trace over a limit is
-- abandoned each time it is tried, so that code runs in the interpreter
-- (4 KB chat, cache_aware: 35.4k instructions a request at the defaults,
-- 27.9k here). Room for longer policies too.
if jit and jit.opt then jit.opt.start("maxirconst=2000", "maxrecord=8000") end

local USAGE = [[
usage: sglr <command> [options]

commands:
  run          run the router (sglr run --help for its flags)
  reload       reload a running router's policies (sglr reload --help)
  launch       start N workers and the router in front of them (sglr launch --help)
  sim-worker   run a simulated SGLang worker (sglr sim-worker --help)
  sim          compare routing policies offline on a virtual clock (sglr sim --help)
  bench        replay a workload against a URL (sglr bench --help)
  test         run busted specs inside the runtime (sglr test spec/unit)
  lua FILE     run a Lua script with the native primitives available
  version      print the version
]]

local VERSION = require "sglr.version"

local function run_busted(args)
  -- busted reads the global arg; it raises (not exits) on failures when
  -- not standalone, which the pcall below turns into exit status 1
  _G.arg = { [0] = "sglr test" }
  for i = 1, #args do _G.arg[i] = args[i] end
  local ok, err = pcall(function()
    require "busted.runner" ({ standalone = false })
  end)
  if not ok and err ~= nil then io.stderr:write(tostring(err), "\n") end
  io.stdout:flush()
  core.exit(ok and 0 or 1)
end

local function run_lua(args)
  local file = args[1]
  if not file then
    io.stderr:write("usage: sglr lua FILE [args...]\n")
    return core.exit(2)
  end
  _G.arg = { [0] = file }
  for i = 2, #args do _G.arg[i - 1] = args[i] end
  local chunk, err = loadfile(file)
  if not chunk then
    io.stderr:write("sglr: ", err, "\n")
    return core.exit(2)
  end
  chunk(unpack(_G.arg))
end

local commands = {
  run = function(args) return require("sglr.router").main(args) end,
  reload = function(args) return require("sglr.router").reload_main(args) end,
  launch = function(args) return require("sglr.launch").main(args) end,
  ["sim-worker"] = function(args) return require("sglr.sim").main(args) end,
  sim = function(args) return require("sglr.simulate").main(args) end,
  bench = function(args) return require("sglr.bench").main(args) end,
  test = run_busted,
  lua = run_lua,
  version = function() print("sglr " .. VERSION) end,
}

return function(...)
  local args = { ... }
  local name = table.remove(args, 1)
  if name == nil or name == "help" or name == "--help" or name == "-h" then
    io.stdout:write(USAGE)
    return core.exit(name and 0 or 2)
  end
  if name == "--version" then name = "version" end
  local cmd = commands[name]
  if not cmd then
    io.stderr:write("sglr: unknown command '", name, "'\n", USAGE)
    return core.exit(2)
  end
  local ok, err = xpcall(cmd, debug.traceback, args)
  if not ok then
    io.stderr:write("sglr: ", tostring(err), "\n")
    io.stderr:flush()
    core.exit(1)
  end
end
