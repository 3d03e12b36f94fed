local cjson = require "cjson"
local d = require "sglr.discovery"

local function b64(s)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, byte = "", x:byte()
    for i = 8, 1, -1 do r = r .. (byte % 2 ^ i - byte % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

describe("discovery", function()
  describe("kubeconfig", function()
    local function config(text)
      local dir = os.tmpname()
      os.remove(dir)
      assert(os.execute("mkdir -p " .. dir) == 0)
      local path = dir .. "/config"
      local f = assert(io.open(path, "w"))
      f:write(text)
      f:close()
      return path, dir
    end

    it("decodes base64", function()
      for _, s in ipairs({ "", "a", "ab", "abc", "-----BEGIN CERTIFICATE-----\nMIIB\n" }) do
        assert.equal(s, d.base64_decode(b64(s)))
      end
      assert.is_nil(d.base64_decode("!!!"))
    end)

    it("takes the current context's cluster and user", function()
      local path = config(table.concat({
        "apiVersion: v1", "kind: Config", "current-context: prod",
        "contexts:",
        "- name: dev", "  context: {cluster: dev, user: dev}",
        "- name: prod", "  context:", "    cluster: prod", "    user: admin", "    namespace: ml",
        "clusters:",
        "- name: dev", "  cluster: {server: 'https://dev:6443'}",
        "- name: prod", "  cluster:", "    server: https://10.0.0.1:6443/",
        "    certificate-authority-data: " .. b64("CA PEM"),
        "users:",
        "- name: dev", "  user: {token: devtoken}",
        "- name: admin", "  user:", "    token: s3cret",
        "    client-certificate-data: " .. b64("CERT"), "    client-key-data: " .. b64("KEY"), "" }, "\n"))
      local c = assert(d.load_kubeconfig(path))
      assert.equal("https://10.0.0.1:6443", c.server)
      assert.equal("CA PEM", c.ca_data)
      assert.equal("s3cret", c.bearer_token)
      assert.equal("CERT", c.cert_data)
      assert.equal("KEY", c.key_data)
      assert.is_nil(c.ca_file)
    end)

    it("reads file references relative to the kubeconfig", function()
      local path, dir = config(table.concat({
        "current-context: c", "contexts: [{name: c, context: {cluster: k, user: u}}]",
        "clusters: [{name: k, cluster: {server: 'https://k:443', certificate-authority: ca.crt}}]",
        "users: [{name: u, user: {tokenFile: /var/tok, client-certificate: c.pem, client-key: /abs/k.pem}}]", "" }, "\n"))
      local c = assert(d.load_kubeconfig(path))
      assert.equal(dir .. "/ca.crt", c.ca_file)
      assert.equal("/var/tok", c.token_file)
      assert.equal(dir .. "/c.pem", c.cert_file)
      assert.equal("/abs/k.pem", c.key_file)
    end)

    it("says what is wrong with a kubeconfig it cannot use", function()
      local function err(text)
        local c, e = d.load_kubeconfig(config(text))
        assert.is_nil(c)
        return e
      end
      assert.truthy(err("clusters: []\n"):find("current-context", 1, true))
      assert.truthy(err("current-context: x\ncontexts: []\n"):find("context 'x' not found", 1, true))
      assert.truthy(err("{{{ not yaml"):find("not valid YAML", 1, true))
      assert.truthy(err(table.concat({ "current-context: c", "contexts: [{name: c, context: {cluster: k, user: u}}]",
        "clusters: [{name: k, cluster: {server: 'https://k'}}]",
        "users: [{name: u, user: {exec: {command: aws}}}]" }, "\n")):find("exec", 1, true))
      local _, e = d.load_kubeconfig("/nonexistent/kubeconfig")
      assert.truthy(e:find("cannot read", 1, true))
    end)

    it("prefers --kubeconfig, then KUBECONFIG, then the in-cluster service account", function()
      local path = config("current-context: c\ncontexts: [{name: c, context: {cluster: k}}]\n" ..
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n")
      local env = {}
      local function getenv(k) return env[k] end
      assert.equal("http://127.0.0.1:1", assert(d.resolve({ kubeconfig = path }, getenv)).server)
      env.KUBECONFIG = path .. ":/other"
      assert.equal("http://127.0.0.1:1", assert(d.resolve({}, getenv)).server)
      env.KUBECONFIG = nil
      local sa = os.tmpname()
      os.remove(sa)
      assert(os.execute("mkdir -p " .. sa) == 0)
      local f = assert(io.open(sa .. "/ca.crt", "w")) f:write("CA") f:close()
      env.KUBERNETES_SERVICE_HOST, env.KUBERNETES_SERVICE_PORT = "10.96.0.1", "443"
      local c = assert(d.resolve({}, getenv, sa))
      assert.equal("https://10.96.0.1:443", c.server)
      assert.equal(sa .. "/ca.crt", c.ca_file)
      assert.equal(sa .. "/token", c.token_file)
      env.KUBERNETES_SERVICE_HOST = "fd00::1"
      assert.equal("https://[fd00::1]:443", assert(d.resolve({}, getenv, sa)).server)
      env.KUBERNETES_SERVICE_HOST = nil
      local none, e = d.resolve({}, getenv, sa)
      assert.is_nil(none)
      assert.truthy(e:find("--kubeconfig", 1, true))
    end)
  end)

  describe("a pod", function()
    local SEL = { app = "sglang" }
    local function pod(over)
      local p = { metadata = { name = "p", namespace = "ns", uid = "u", labels = { app = "sglang" },
        annotations = { ["sglang.ai/bootstrap-port"] = "8998" } },
        status = { phase = "Running", podIP = "10.1.2.3", conditions = { { type = "PodScheduled", status = "True" },
          { type = "Ready", status = "True" } } } }
      if over then over(p) end
      return p
    end

    it("is a worker at http://IP:PORT while it matches, runs, is Ready and has an IP", function()
      local w = assert(d.classify(pod(), SEL, 8000))
      assert.equal("http://10.1.2.3:8000", w.url)
      assert.is_nil(w.bootstrap_port)       -- no annotation asked for: not a prefill
      w = assert(d.classify(pod(function(p) p.status.podIP = "fd00::7" end), SEL, 80))
      assert.equal("http://[fd00::7]:80", w.url)
    end)

    it("has the bootstrap port of its annotation (none when absent or not a port)", function()
      local A = "sglang.ai/bootstrap-port"
      assert.equal(8998, d.classify(pod(), SEL, 80, A).bootstrap_port)
      assert.is_nil(d.classify(pod(function(p) p.metadata.annotations = nil end), SEL, 80, A).bootstrap_port)
      assert.is_nil(d.classify(pod(function(p) p.metadata.annotations[A] = "70000" end), SEL, 80, A).bootstrap_port)
    end)

    it("is not a worker, and says why, otherwise", function()
      local function why(over, sel)
        local w, reason = d.classify(pod(over), sel or SEL, 80)
        assert.is_nil(w)
        return reason
      end
      assert.equal("label_changed", why(nil, { app = "other" }))
      assert.equal("label_changed", why(nil, {}))            -- an empty selector matches nothing
      assert.equal("terminating", why(function(p) p.metadata.deletionTimestamp = "2026-01-01T00:00:00Z" end))
      assert.equal("not_ready", why(function(p) p.status.phase = "Pending" end))
      assert.equal("not_ready", why(function(p) p.status.conditions[2].status = "False" end))
      assert.equal("not_ready", why(function(p) p.status.conditions = nil end))
      assert.equal("no_ip", why(function(p) p.status.podIP = nil end))
      assert.equal("no_ip", why(function(p) p.status.podIP = cjson.null end))
      assert.equal("malformed", why(function(p) p.metadata = nil end))
      assert.equal("not_ready", why(function(p) p.status = "bogus" end))
    end)

    it("has a selector string the API server takes", function()
      assert.equal("app=sglang,tier=gpu", d.selector_string({ tier = "gpu", app = "sglang" }))
    end)
  end)
end)
