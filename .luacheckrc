-- luacheck configuration (make test runs luacheck over the Lua sources)
std = "luajit"
max_line_length = false
unused_args = false           -- policy and callback signatures are fixed
read_globals = { table = { fields = { "unpack" } } }
globals = { package = { fields = { "sglr_path" }, other_fields = true } }

files["spec/**/*.lua"] = {
  std = "+busted",
}
