-- The version of sglr, printed by `sglr --version` and `sglr run --version`.
return "0.1.0"
