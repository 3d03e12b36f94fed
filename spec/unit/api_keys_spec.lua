-- The key comparison behind --admin-api-key and --inference-api-key
-- (constant time: it reads every byte the client sent, wherever the first
-- difference is).
local router = require "sglr.router"

describe("API key comparison", function()
  local same = router.same_secret

  it("accepts only the exact key", function()
    assert.is_true(same("s3cret-key", "s3cret-key"))
    for _, given in ipairs({ "", "s", "s3cret-ke", "s3cret-key ", "s3cret-kez", "S3cret-key",
                             "s3cret-keys3cret-key", "x3cret-key", "s3cret-key\0" }) do
      assert.is_false(same(given, "s3cret-key"), given)
    end
  end)
end)
