-- Kubernetes service discovery: worker pods found through the API server's
-- list and watch protocol, kept in the worker registry as source
-- "discovery".
--
--        LIST pods?labelSelector=S  ──> reconcile (add wanted, remove the rest)
--          │ resourceVersion RV
--          v
--        WATCH ...&watch=1&resourceVersion=RV&allowWatchBookmarks=true
--          │ one JSON event per line: ADDED MODIFIED DELETED BOOKMARK ERROR
--          v
--        the watch ends ──> clean end: watch again from the last RV
--                           410 Gone (status or ERROR event), dropped,
--                           or the periodic relist timer: LIST again
--
-- One watcher per role: regular mode watches --selector; PD mode watches
-- --prefill-selector (role prefill) and --decode-selector (role decode).
-- A pod is a worker while it matches the selector, is Running, Ready=True,
-- has a pod IP and no deletionTimestamp. Its identity is its uid: a pod
-- recreated at the same IP is another worker, and a pod whose IP changes
-- is removed and added again. The periodic relist exists because a watch
-- can stop delivering without closing (the SGLang router kept dead workers
-- for that reason); nothing here trusts one watch forever.
--
-- Events are handled as they arrive (on the loop, from the watch's
-- on_chunk); only admission, which waits for the worker's health, runs in
-- a coroutine of its own.
local core = require "sglr.core"
local cjson = require "cjson.safe"
local log = require "sglr.log"
local stats = require "sglr.stats"
local http = require "sglr.http"

local floor, min, random = math.floor, math.min, math.random
local concat, sort = table.concat, table.sort
local fmt = string.format

local M = {}

local SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
local BACKOFF_MIN_MS, BACKOFF_MAX_MS = 500, 30000
-- the API server ends a watch after timeoutSeconds; we watch again from the
-- last resourceVersion (no relist needed for that)
local WATCH_TIMEOUT_SECS = 290

-- --- configuration -------------------------------------------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_VAL = {}
for i = 1, 64 do B64_VAL[B64:byte(i)] = i - 1 end

-- base64 (the *-data fields of a kubeconfig) -> bytes | nil, err
function M.base64_decode(s)
  s = s:gsub("[%s=]", "")
  local out, acc, bits = {}, 0, 0
  for i = 1, #s do
    local v = B64_VAL[s:byte(i)]
    if not v then return nil, "invalid base64" end
    acc = acc * 64 + v
    bits = bits + 6
    if bits >= 8 then
      bits = bits - 8
      local byte = floor(acc / 2 ^ bits)
      out[#out + 1] = string.char(byte)
      acc = acc - byte * 2 ^ bits
    end
  end
  return concat(out)
end

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

local function named(list, name, what)
  if type(list) ~= "table" then return nil, "no " .. what .. "s" end
  for _, e in ipairs(list) do
    if type(e) == "table" and e.name == name then return e end
  end
  return nil, what .. " '" .. tostring(name) .. "' not found"
end

-- A standard kubeconfig file -> { server =, ca_file | ca_data, bearer_token
-- | token_file, cert_*, key_*, insecure } | nil, err. The current context
-- chooses the cluster and the user; relative paths are relative to the file.
function M.load_kubeconfig(path)
  local text, err = read_file(path)
  if not text then return nil, "cannot read kubeconfig " .. path .. ": " .. tostring(err) end
  local lyaml = require "lyaml"
  local ok, doc = pcall(lyaml.load, text)
  if not ok or type(doc) ~= "table" then
    return nil, "kubeconfig " .. path .. " is not valid YAML: " .. tostring(doc)
  end
  local dir = path:match("^(.*)/[^/]*$") or "."
  local function rel(p)
    if type(p) ~= "string" then return nil end
    return p:sub(1, 1) == "/" and p or dir .. "/" .. p
  end
  local cname = doc["current-context"]
  if type(cname) ~= "string" or cname == "" then
    return nil, "kubeconfig " .. path .. " has no current-context"
  end
  local ctx, cerr = named(doc.contexts, cname, "context")
  if not ctx then return nil, "kubeconfig " .. path .. ": " .. cerr end
  ctx = ctx.context or {}
  local cluster, clerr = named(doc.clusters, ctx.cluster, "cluster")
  if not cluster then return nil, "kubeconfig " .. path .. ": " .. clerr end
  cluster = cluster.cluster or {}
  local user = (ctx.user and named(doc.users, ctx.user, "user")) or {}
  user = user.user or {}
  if type(cluster.server) ~= "string" or not cluster.server:match("^https?://") then
    return nil, "kubeconfig " .. path .. ": cluster '" .. tostring(ctx.cluster) .. "' has no http(s) server"
  end
  if user.exec or user["auth-provider"] then
    return nil, "kubeconfig " .. path .. ": user '" .. tostring(ctx.user) ..
      "' authenticates with exec or auth-provider, which sglr does not run; use a token or a client certificate"
  end
  local c = { server = cluster.server:gsub("/+$", ""), insecure = cluster["insecure-skip-tls-verify"] == true }
  local function data(field)
    local v = cluster[field] or user[field]
    if v == nil then return true end
    local bytes = type(v) == "string" and M.base64_decode(v)
    if not bytes then return nil, "kubeconfig " .. path .. ": " .. field .. " is not base64" end
    return bytes
  end
  local d
  d, err = data("certificate-authority-data"); if not d then return nil, err end
  c.ca_data = d ~= true and d or nil
  c.ca_file = not c.ca_data and rel(cluster["certificate-authority"]) or nil
  d, err = data("client-certificate-data"); if not d then return nil, err end
  c.cert_data = d ~= true and d or nil
  c.cert_file = not c.cert_data and rel(user["client-certificate"]) or nil
  d, err = data("client-key-data"); if not d then return nil, err end
  c.key_data = d ~= true and d or nil
  c.key_file = not c.key_data and rel(user["client-key"]) or nil
  if type(user.token) == "string" then c.bearer_token = user.token end
  c.token_file = not c.bearer_token and rel(user.tokenFile) or nil
  c.origin = "kubeconfig " .. path
  return c
end

-- Where the API server is and how to talk to it: --kubeconfig, then
-- $KUBECONFIG (its first file), then the in-cluster service account, then
-- ~/.kube/config. getenv and sa_dir are for tests.
function M.resolve(conf, getenv, sa_dir)
  getenv = getenv or os.getenv
  sa_dir = sa_dir or SA_DIR
  local path = conf.kubeconfig
  if not path then
    local env = getenv("KUBECONFIG")
    if env and env ~= "" then path = env:match("^[^:]+") end
  end
  if path then return M.load_kubeconfig(path) end
  local host, port = getenv("KUBERNETES_SERVICE_HOST"), getenv("KUBERNETES_SERVICE_PORT")
  if host and host ~= "" then
    if host:find(":", 1, true) then host = "[" .. host .. "]" end
    local c = { server = "https://" .. host .. ":" .. (port and port ~= "" and port or "443"),
      token_file = sa_dir .. "/token", origin = "in-cluster service account" }
    if io.open(sa_dir .. "/ca.crt", "rb") then c.ca_file = sa_dir .. "/ca.crt" end
    return c
  end
  local home = getenv("HOME")
  if home and io.open(home .. "/.kube/config", "rb") then return M.load_kubeconfig(home .. "/.kube/config") end
  return nil, "no Kubernetes API server: give --kubeconfig (or KUBECONFIG), or run inside a cluster " ..
    "(KUBERNETES_SERVICE_HOST and the service account in " .. sa_dir .. ")"
end

-- --- pods ----------------------------------------------------------------------------

-- k=v,k2=v2 in a stable order, as labelSelector wants it
function M.selector_string(sel)
  local keys = {}
  for k in pairs(sel) do keys[#keys + 1] = k end
  sort(keys)
  for i, k in ipairs(keys) do keys[i] = k .. "=" .. sel[k] end
  return concat(keys, ",")
end

local function matches(labels, sel)
  if type(labels) ~= "table" then labels = {} end
  local any = false
  for k, v in pairs(sel) do
    any = true
    if labels[k] ~= v then return false end
  end
  return any    -- an empty selector matches nothing
end
M.matches = matches

local function is_ready(status)
  if type(status.conditions) ~= "table" then return false end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == "Ready" then return c.status == "True" end
  end
  return false
end

-- What a pod object means for a watcher with selector sel:
-- { url =, bootstrap_port = } when it should be a worker, else nil, reason
-- ("label_changed", "terminating", "not_ready", "no_ip").
function M.classify(pod, sel, port, annotation)
  local md, st = pod.metadata, pod.status
  if type(md) ~= "table" then return nil, "malformed" end
  if not matches(md.labels, sel) then return nil, "label_changed" end
  if md.deletionTimestamp ~= nil and md.deletionTimestamp ~= cjson.null then return nil, "terminating" end
  if type(st) ~= "table" or st.phase ~= "Running" or not is_ready(st) then return nil, "not_ready" end
  local ip = st.podIP
  if type(ip) ~= "string" or ip == "" then return nil, "no_ip" end
  if ip:find(":", 1, true) then ip = "[" .. ip .. "]" end
  local want = { url = "http://" .. ip .. ":" .. port }
  if annotation and type(md.annotations) == "table" then
    local p = tonumber(md.annotations[annotation])
    if p and p == floor(p) and p >= 1 and p <= 65535 then want.bootstrap_port = p end
  end
  return want
end

local function pod_id(pod)
  local md = type(pod) == "table" and pod.metadata
  if type(md) ~= "table" then return nil end
  if type(md.uid) ~= "string" or md.uid == "" or type(md.name) ~= "string" or type(md.namespace) ~= "string" then
    return nil
  end
  return md.uid, md.namespace, md.name
end

-- --- a watcher: one selector, one role ---------------------------------------------------

local W = {}
W.__index = W

local function new_watcher(d, role, sel)
  local conf = d.conf
  local base = conf.service_discovery_namespace
    and "/api/v1/namespaces/" .. conf.service_discovery_namespace .. "/pods" or "/api/v1/pods"
  local self = setmetatable({
    d = d, role = role, sel = sel,
    path = base .. "?labelSelector=" .. M.selector_string(sel):gsub("[^%w%-%._~,]", function(ch)
      return fmt("%%%02X", ch:byte())
    end),
    tracked = {},       -- uid -> entry { url, uid, pod = {namespace,name,uid}, bootstrap_port, state }
    rv = nil,
    annotation = role == "prefill" and conf.bootstrap_port_annotation or nil,
    m_pods = stats.discovery_pods:series(role),
  }, W)
  return self
end

function W:log_fields(e, extra)
  local f = { role = self.role, pod = e.pod.namespace .. "/" .. e.pod.name, uid = e.pod.uid, worker = e.url }
  if extra then for k, v in pairs(extra) do f[k] = v end end
  return f
end

function W:drop(uid, reason)
  local e = self.tracked[uid]
  if not e then return end
  self.tracked[uid] = nil
  if e.state ~= "added" then return end      -- still being admitted: admission sees it went
  local w = self.d.router.workers:remove(e.url, { source = "discovery", uid = uid })
  if w then
    stats.discovery_removed:inc(1, reason)
    log.info("discovery: worker removed", self:log_fields(e, { reason = reason }))
  end
end

-- A worker registered at url by discovery for another pod (one that went
-- while its DELETED event is still on the way): the new pod takes the address.
function W:evict_other(url, uid)
  local w = self.d.router.workers:get(url)
  if not w or w.source ~= "discovery" or not w.pod or w.pod.uid == uid then return end
  for _, watcher in ipairs(self.d.watchers) do
    if watcher.tracked[w.pod.uid] then watcher:drop(w.pod.uid, "replaced") return end
  end
  self.d.router.workers:remove(url, { source = "discovery", uid = w.pod.uid })
  stats.discovery_removed:inc(1, "replaced")
end

function W:admit(e)
  local d = self.d
  d.admitting = d.admitting + 1
  core.spawn(function()
    local w, err, why = d.router:admit(e.url, { source = "discovery", pod = e.pod, role = self.role,
      bootstrap_port = e.bootstrap_port, labels = e.labels })
    d.admitting = d.admitting - 1
    if d.admitting == 0 and d.admitted_ev then d.admitted_ev:set(true) end
    if self.tracked[e.pod.uid] ~= e or d.stopped then
      -- the pod changed or went while its health was awaited
      if w then d.router.workers:remove(w.url, { source = "discovery", uid = e.pod.uid }) end
      return
    end
    if not w then
      -- kept (as refused) so the next relist does not try again at once;
      -- a change of the pod tries again
      e.state = "refused"
      log.warn("discovery: pod not added", self:log_fields(e, { error = err, why = why }))
      return
    end
    e.state = "added"
    stats.discovery_added:inc(1, self.role)
    log.info("discovery: worker added", self:log_fields(e, { bootstrap_port = e.bootstrap_port }))
  end)
end

-- An ADDED or MODIFIED pod (or one seen in a list).
function W:apply(pod)
  local uid, ns, name = pod_id(pod)
  if not uid then
    stats.discovery_events:inc(1, "malformed")
    log.warn("discovery: pod without metadata.uid/name/namespace skipped", { role = self.role })
    return
  end
  local want, why = M.classify(pod, self.sel, self.d.conf.service_discovery_port or 80, self.annotation)
  local e = self.tracked[uid]
  if e and e.state == "refused" and not (want and want.url == e.url) then
    self.tracked[uid] = nil
    e = nil
  end
  if e and (not want or want.url ~= e.url or want.bootstrap_port ~= e.bootstrap_port) then
    self:drop(uid, want and (want.url ~= e.url and "ip_changed" or "annotation_changed") or why)
    e = nil
  end
  if not want then
    if why == "no_ip" and pod.status and pod.status.phase == "Running" then
      log.debug("discovery: running pod has no IP yet", { pod = ns .. "/" .. name })
    end
    return
  end
  if e then return end
  self:evict_other(want.url, uid)
  -- the pod's labels as they were when it joined: policies see them (w.labels)
  local labels = {}
  if type(pod.metadata.labels) == "table" then
    for k, v in pairs(pod.metadata.labels) do
      if type(k) == "string" and type(v) == "string" then labels[k] = v end
    end
  end
  e = { url = want.url, bootstrap_port = want.bootstrap_port, pod = { namespace = ns, name = name, uid = uid },
    labels = labels, state = "admitting" }
  self.tracked[uid] = e
  self:admit(e)
end

function W:count_pods()
  local n = 0
  for _ in pairs(self.tracked) do n = n + 1 end
  return n
end

function W:note_rv(obj)
  local md = type(obj) == "table" and obj.metadata
  local rv = type(md) == "table" and md.resourceVersion
  if type(rv) == "string" and rv ~= "" then self.rv = rv end
end

-- One line of a watch stream.
function W:event(line)
  if line == "" then return end
  local ev = cjson.decode(line)
  if type(ev) ~= "table" or type(ev.type) ~= "string" or type(ev.object) ~= "table" then
    stats.discovery_events:inc(1, "malformed")
    log.warn("discovery: malformed watch event skipped", { role = self.role, line = line:sub(1, 200) })
    return
  end
  local t, obj = ev.type, ev.object
  self.d:synced()
  if t == "ADDED" or t == "MODIFIED" then
    stats.discovery_events:inc(1, t)
    self:note_rv(obj)
    self:apply(obj)
  elseif t == "DELETED" then
    stats.discovery_events:inc(1, t)
    self:note_rv(obj)
    local uid = pod_id(obj)
    if uid then
      -- a pod that stops matching the selector is DELETED from a
      -- selector's watch, with its new labels
      local md = obj.metadata
      self:drop(uid, matches(md.labels, self.sel) and "deleted" or "label_changed")
    end
  elseif t == "BOOKMARK" then
    stats.discovery_events:inc(1, t)
    self:note_rv(obj)
  elseif t == "ERROR" then
    stats.discovery_events:inc(1, t)
    if obj.code == 410 then
      self.gone = true
      error("watch expired (410 Gone)", 0)    -- ends the watch: relist
    end
    log.warn("discovery: watch error event", { role = self.role, code = obj.code, message = obj.message })
  else
    stats.discovery_events:inc(1, "unknown")
    log.warn("discovery: unknown watch event type skipped", { role = self.role, type = t })
  end
  self.m_pods:set(self:count_pods())
end

function W:request_opts(extra)
  local c = self.d.kube
  local o = { method = "GET", url = c.server .. extra, headers = { accept = "application/json" },
    ca_file = c.ca_file, ca_data = c.ca_data, cert_file = c.cert_file, key_file = c.key_file,
    cert_data = c.cert_data, key_data = c.key_data, insecure = c.insecure or nil,
    bearer_token = c.bearer_token, connect_timeout_ms = 5000 }
  if c.token_file then
    -- read each time: projected service-account tokens are rotated
    local tok = read_file(c.token_file)
    if tok then o.bearer_token = tok:gsub("%s+$", "") end
  end
  return o
end

-- LIST and reconcile -> true | nil, err
function W:list()
  local o = self:request_opts(self.path)
  o.timeout_ms = 30000
  local status, body = http.request(o)
  if not status then return nil, tostring(body) end
  if status ~= 200 then return nil, "HTTP " .. status .. ": " .. tostring(body):sub(1, 200) end
  local doc = cjson.decode(body)
  if type(doc) ~= "table" or type(doc.items) ~= "table" or type(doc.metadata) ~= "table" then
    return nil, "the pod list is not a Kubernetes list"
  end
  local seen = {}
  for _, pod in ipairs(doc.items) do
    local uid = pod_id(pod)
    if uid then seen[uid] = true end
    self:apply(pod)
  end
  for uid in pairs(self.tracked) do
    if not seen[uid] then self:drop(uid, "deleted") end
  end
  self.rv = type(doc.metadata.resourceVersion) == "string" and doc.metadata.resourceVersion or nil
  self.m_pods:set(self:count_pods())
  self.d:synced()
  return true
end

-- One watch from self.rv, until it ends -> "again" (clean end: watch again),
-- "gone" (410), "relist" (the relist timer), or nil, err (dropped)
function W:watch()
  self.gone = false
  local o = self:request_opts(self.path .. "&watch=1&allowWatchBookmarks=true&timeoutSeconds=" ..
    WATCH_TIMEOUT_SECS .. (self.rv and "&resourceVersion=" .. self.rv or ""))
  o.timeout_ms = (WATCH_TIMEOUT_SECS + 30) * 1000
  local errbody = {}
  local lines = http.lines(function(line) self:event(line) end)
  o.on_chunk = function(chunk, status)
    if status ~= 200 then
      errbody[#errbody + 1] = chunk
      return
    end
    if chunk == "" then return lines(nil) end
    lines(chunk)
  end
  local req, err = http.start(o)
  if not req then return nil, err end
  self.req = req
  local status
  status, err = req:wait()
  self.req = nil
  if self.relist_due then return "relist" end
  if self.gone or status == 410 then return "gone" end
  if not status then return nil, tostring(err) end
  if status ~= 200 then return nil, "HTTP " .. status .. ": " .. concat(errbody):sub(1, 200) end
  return "again"
end

-- The watcher's life: list, watch, relist on 410/drop/timer, backoff on errors.
function W:run()
  local d = self.d
  local backoff = BACKOFF_MIN_MS
  local need_list, reason = true, "start"
  while not d.stopped do
    if need_list then
      self.relist_due = false
      stats.discovery_relists:inc(1, reason)
      local ok, err = self:list()
      if self.first_list_ev then self.first_list_ev:set(ok or false); self.first_list_ev = nil end
      if not ok then
        stats.discovery_errors:inc(1, "list")
        local wait = min(backoff, (d.conf.service_discovery_relist_secs or 60) * 1000)
        wait = floor(wait * (0.8 + 0.4 * random()))
        log.warn("discovery: listing pods failed; retrying", { role = self.role, error = err, retry_ms = wait })
        d:sleep(wait)
        backoff = min(backoff * 2, BACKOFF_MAX_MS)
        reason = "retry"
        goto continue
      end
      backoff = BACKOFF_MIN_MS
      need_list = false
      self.next_relist = core.now() + (d.conf.service_discovery_relist_secs or 60) * 1000
    end
    do
      local started = core.now()
      local res, err = self:watch()
      if d.stopped then break end
      if res == "again" then
        -- a watch the server ends at once, again and again, must not spin
        if core.now() - started < 1000 then
          d:sleep(floor(backoff * (0.8 + 0.4 * random())))
          backoff = min(backoff * 2, BACKOFF_MAX_MS)
        else
          backoff = BACKOFF_MIN_MS
        end
      elseif res == "relist" then
        need_list, reason = true, "periodic"
      elseif res == "gone" then
        stats.discovery_watch_restarts:inc(1, "gone")
        log.info("discovery: watch expired (410 Gone); listing again", { role = self.role })
        need_list, reason = true, "gone"
      else
        stats.discovery_watch_restarts:inc(1, "error")
        stats.discovery_errors:inc(1, "watch")
        local wait = floor(backoff * (0.8 + 0.4 * random()))
        log.warn("discovery: watch failed; listing again", { role = self.role, error = err, retry_ms = wait })
        d:sleep(wait)
        backoff = min(backoff * 2, BACKOFF_MAX_MS)
        need_list, reason = true, "watch_failed"
      end
    end
    ::continue::
  end
end

-- --- the discovery service ---------------------------------------------------------------

local D = {}
D.__index = D

-- new(router) -> discovery | nil, err (nothing to discover, no API server)
function M.new(router, opts)
  local conf = router.conf
  local kube, err = M.resolve(conf, opts and opts.getenv, opts and opts.sa_dir)
  if not kube then return nil, err end
  local self = setmetatable({ router = router, conf = conf, kube = kube, watchers = {}, admitting = 0,
    sleepers = {}, last_sync = nil }, D)
  if conf.pd_disaggregation then
    if next(conf.prefill_selector or {}) then self.watchers[#self.watchers + 1] = new_watcher(self, "prefill", conf.prefill_selector) end
    if next(conf.decode_selector or {}) then self.watchers[#self.watchers + 1] = new_watcher(self, "decode", conf.decode_selector) end
  else
    self.watchers[1] = new_watcher(self, "regular", conf.selector)
  end
  return self
end

function D:synced() self.last_sync = core.now() end

-- Seconds since the view of the pods was last confirmed (a list or any watch
-- event, bookmarks included), or nil before the first.
function D:sync_age()
  return self.last_sync and (core.now() - self.last_sync) / 1000 or nil
end

-- A sleep that stop() cuts short.
function D:sleep(ms)
  local ev = core.event()
  self.sleepers[ev] = true
  ev:wait(ms)
  self.sleepers[ev] = nil
end

-- Start every watcher; wait (up to the startup timeout) for their first
-- lists and the health of the pods those found, so that workers present at
-- start-up are served from the first request, like --worker-urls. An API
-- server that cannot be reached is logged; the watchers keep retrying.
function D:start()
  local conf = self.conf
  log.info("discovery: watching pods", { server = self.kube.server, via = self.kube.origin,
    namespace = conf.service_discovery_namespace or "(all)",
    selectors = (function()
      local s = {}
      for _, w in ipairs(self.watchers) do s[#s + 1] = w.role .. ":" .. M.selector_string(w.sel) end
      return concat(s, " ")
    end)() })
  local firsts = {}
  for i, w in ipairs(self.watchers) do
    w.first_list_ev = core.event()
    firsts[i] = w.first_list_ev
    core.spawn(function()
      local ok, err = xpcall(w.run, debug.traceback, w)
      if not ok and not self.stopped then log.error("discovery: watcher failed", { role = w.role, error = err }) end
    end)
  end
  -- the relist timer: cut the watches short every --service-discovery-relist-secs
  local uv = require "luv"
  local ms = floor((conf.service_discovery_relist_secs or 60) * 1000)
  -- checked at least once a second, so a relist is at most 1 s late
  local tick = math.min(1000, floor(ms / 4) + 1)
  self.timer = uv.new_timer()
  self.timer:start(tick, tick, function()
    local now = core.now()
    for _, w in ipairs(self.watchers) do
      if w.req and w.next_relist and now >= w.next_relist then
        w.relist_due = true
        w.req:cancel()
      end
    end
  end)
  self.timer:unref()

  local deadline = core.now() + 10000
  for _, ev in ipairs(firsts) do
    local _, listed = ev:wait(math.max(1, deadline - core.now()))
    if not listed then log.warn("discovery: the first pod list failed; serving without discovered workers for now") end
  end
  if self.admitting > 0 then
    log.info("discovery: waiting for " .. self.admitting .. " discovered worker(s) to become healthy")
    self.admitted_ev = core.event()
    self.admitted_ev:wait((conf.worker_startup_timeout_secs or 300) * 1000 + 1000)
    self.admitted_ev = nil
  end
end

function D:stop()
  self.stopped = true
  if self.timer then self.timer:stop(); self.timer:close(); self.timer = nil end
  for _, w in ipairs(self.watchers) do if w.req then w.req:cancel() end end
  for ev in pairs(self.sleepers) do ev:set(true) end
end

M.new_watcher = new_watcher
return M
