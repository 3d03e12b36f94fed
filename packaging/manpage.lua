-- The sglr(1) man page, written from the binary's own --help texts, so it
-- says what the installed binary does. Plain groff (man macros); run by
-- `make install`:
--
--   build/sglr lua packaging/manpage.lua build/sglr > sglr.1
--
-- Help text shapes it understands (sglr's and argparse's): "Heading:" lines
-- start a subsection; an indented line starting with '-' is an option,
-- its description after two spaces or on the next, deeper lines; other
-- indented lines are kept as they are (examples); the rest is prose.
local bin = arg[1] or "build/sglr"

local COMMANDS = {
  { "run", "the router" },
  { "launch", "start workers and the router in front of them" },
  { "sim-worker", "a simulated SGLang worker" },
  { "bench", "replay a workload against a URL" },
}

local function capture(args)
  local f = assert(io.popen("'" .. bin .. "' " .. args .. " 2>&1", "r"))
  local text = f:read("*a")
  f:close()
  return text
end

-- groff escapes: backslashes, hyphens (so options copy as typed), and a
-- control character at the start of a line
local function esc(s)
  s = s:gsub("\\", "\\e"):gsub("%-", "\\-")
  if s:match("^[.']") then s = "\\&" .. s end
  return s
end

local out = {}
local function emit(s) out[#out + 1] = s end

-- One help text as man source.
local function convert(text)
  local mode, mode_indent    -- mode: "option", "pre", "prose"
  local function close()
    if mode == "pre" then emit(".fi") end
    mode = nil
  end
  for line in (text .. "\n"):gmatch("(.-)\n") do
    local indent = #line:match("^ *")
    local body = line:sub(indent + 1)
    if body == "" then
      close()
    elseif indent == 0 and body:match("^[%w][%w %-]*:$") then
      close()
      emit(".SS " .. esc(body:sub(1, -2)))
    elseif indent == 0 and body:match("^[Uu]sage:") then
      close()
      emit(".nf")
      emit(esc(line))
      mode = "pre"
    elseif indent > 0 and body:match("^%-") then
      close()
      local opt, desc = body:match("^(.-)  +(.*)$")
      emit(".TP")
      emit("\\fB" .. esc(opt or body) .. "\\fR")
      if desc then emit(esc(desc)) end
      mode, mode_indent = "option", indent
    elseif mode == "option" and indent > mode_indent then
      emit(esc(body))
    elseif mode == "pre" and indent > 0 then
      emit(esc(line))
    elseif indent > 0 then
      close()
      emit(".nf")
      emit(esc(line))
      mode = "pre"
    else
      if mode ~= "prose" then
        close()
        emit(".PP")
        mode = "prose"
      end
      emit(esc(body))
    end
  end
  close()
end

local version = capture("--version"):match("(%d[%w.%-+]*)") or "unknown"
local date = os.date("!%Y-%m-%d", tonumber(os.getenv("SOURCE_DATE_EPOCH")) or os.time())

emit(('.TH SGLR 1 "%s" "sglr %s" "User Commands"'):format(date, version))
emit(".SH NAME")
emit("sglr \\- a router for LLM inference fleets (SGLang\\-compatible)")
emit(".SH SYNOPSIS")
emit(".B sglr")
emit("\\fIcommand\\fR [\\fIoptions\\fR]")
emit(".SH DESCRIPTION")
emit("sglr spreads requests over data\\-parallel SGLang (or SGLang\\-compatible) workers and")
emit("keeps requests that share a prompt prefix on the worker that already holds it in")
emit("its KV cache. Its routing policies, retries and health checks are Lua scripts;")
emit("\\fB\\-\\-lua\\-path\\fR overrides the embedded ones.")
emit(".SH COMMANDS")
convert(capture("--help"))
for _, c in ipairs(COMMANDS) do
  emit(".SH " .. esc("SGLR " .. c[1]:upper()))
  emit(esc("sglr " .. c[1] .. ": " .. c[2] .. "."))
  emit(".PP")
  convert(capture(c[1] .. " --help"))
end
emit(".SH SEE ALSO")
emit("python3 \\-m sglang_router.launch_router \\-\\-help,")
emit("python3 \\-m sglang_router.launch_server \\-\\-help")
emit("(the SGLang router's command lines, installed with sglr).")
io.write(table.concat(out, "\n"), "\n")
