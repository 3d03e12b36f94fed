-- A fake Kubernetes API server for the discovery specs, on this spec's loop
-- (core.listen, 127.0.0.1): pods in memory, served as the API server does.
--   GET /api/v1/pods, /api/v1/namespaces/NS/pods ?labelSelector=k=v,...
--     -> a PodList with metadata.resourceVersion
--   ... &watch=1&resourceVersion=RV&allowWatchBookmarks=true
--     -> 200, chunked, one JSON event per line from RV on: ADDED, MODIFIED,
--        DELETED (also for a pod that stops matching the selector), BOOKMARK;
--        a watch from a compacted RV gets 410 (status or ERROR event)
-- Faults: stall (watches get nothing, their connection stays open), drop
-- (open watches cut), expire (open watches get ERROR 410 / new ones 410),
-- raw lines, a bearer token required.
local core = require "sglr.core"
local cjson = require "cjson.safe"

local K = {}
K.__index = K

function K.new(opts)
  opts = opts or {}
  local self = setmetatable({ pods = {}, rv = 100, log = {}, watches = {}, lists = 0, watch_count = 0,
    token = opts.token, stall = false, gone_as = "event", requests = {} }, K)
  return self
end

local function selector_of(q)
  local sel = {}
  local raw = q and q:match("labelSelector=([^&]*)")
  if raw then
    raw = raw:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end)
    for term in raw:gmatch("[^,]+") do
      local k, v = term:match("^([^=]+)=(.*)$")
      if k then sel[k] = v end
    end
  end
  return sel
end

local function matches(pod, sel)
  local labels = pod.metadata.labels or {}
  for k, v in pairs(sel) do if labels[k] ~= v then return false end end
  return true
end

local function copy(t) return cjson.decode(cjson.encode(t)) end

-- A pod object: { name, uid, ip, labels, ready (true), phase ("Running"),
-- ns ("default"), annotations, deleting }
function K.pod(p)
  return {
    kind = "Pod", apiVersion = "v1",
    metadata = { name = p.name, namespace = p.ns or "default", uid = p.uid or p.name .. "-uid",
      labels = p.labels or { app = "sglang" }, annotations = p.annotations,
      deletionTimestamp = p.deleting and "2026-01-01T00:00:00Z" or nil },
    status = { phase = p.phase or "Running", podIP = p.ip,
      conditions = { { type = "Ready", status = p.ready == false and "False" or "True" } } },
  }
end

function K:url() return "http://127.0.0.1:" .. self.port end

-- listen on port (0: any); true | nil, err
function K:listen(port)
  local srv, err = core.listen("127.0.0.1", port or 0, {}, function(x) self:handle(x) end)
  if not srv then return nil, err end
  self.srv, self.port = srv, srv:port()
  return true
end

function K:close()
  self:drop()
  if self.srv then self.srv:close() self.srv = nil end
end

-- the pod's new state (nil: deleted), recorded as an event for watches
function K:change(uid, new)
  local old = self.pods[uid]
  self.rv = self.rv + 1
  local obj = copy(new or old)
  obj.metadata.resourceVersion = tostring(self.rv)
  self.pods[uid] = new and obj or nil
  local ev = { rv = self.rv, old = old, new = new and obj or nil, obj = obj }
  self.log[#self.log + 1] = ev
  for w in pairs(self.watches) do w.queue[#w.queue + 1] = ev end
end

function K:put(pod) self:change(pod.metadata.uid, pod) end
function K:delete(uid) assert(self.pods[uid], "no pod " .. uid) self:change(uid, nil) end

-- what one watch sees of an event: type and object, or nil
local function view(ev, sel)
  local was = ev.old and matches(ev.old, sel)
  local is = ev.new and matches(ev.new, sel)
  if ev.new and is then return was and "MODIFIED" or "ADDED", ev.obj end
  if was then return "DELETED", ev.obj end
end

-- Changes from here on are forgotten by resourceVersion: a watch from an
-- older RV is answered 410.
function K:compact() self.compacted = self.rv end

function K:drop()
  for w in pairs(self.watches) do w.cut = true end
end
-- Open watches end cleanly (as at their timeoutSeconds).
function K:finish_watches()
  for w in pairs(self.watches) do w.finish = true end
end
-- Every open watch gets an ERROR 410 event and is closed.
function K:expire()
  self:compact()
  for w in pairs(self.watches) do w.queue[#w.queue + 1] = { raw = cjson.encode({ type = "ERROR",
    object = { kind = "Status", apiVersion = "v1", status = "Failure", reason = "Expired", code = 410,
      message = "too old resource version" } }), last = true } end
end
function K:bookmark()
  for w in pairs(self.watches) do w.queue[#w.queue + 1] = { raw = cjson.encode({ type = "BOOKMARK",
    object = { kind = "Pod", apiVersion = "v1", metadata = { resourceVersion = tostring(self.rv) } } }) } end
end
function K:raw(line)
  for w in pairs(self.watches) do w.queue[#w.queue + 1] = { raw = line } end
end

function K:open_watches()
  local n = 0
  for _ in pairs(self.watches) do n = n + 1 end
  return n
end

local JSON = { ["content-type"] = "application/json" }

local function status_body(code, reason, msg)
  return cjson.encode({ kind = "Status", apiVersion = "v1", status = "Failure", reason = reason, code = code,
    message = msg })
end

function K:handle(x)
  local path, q = x:path()
  self.requests[#self.requests + 1] = { path = path, query = q, auth = x:header("authorization") }
  if self.token and x:header("authorization") ~= "Bearer " .. self.token then
    return x:respond(401, JSON, status_body(401, "Unauthorized", "Unauthorized"))
  end
  local ns = path:match("^/api/v1/namespaces/([^/]+)/pods$")
  if not ns and path ~= "/api/v1/pods" then
    return x:respond(404, JSON, status_body(404, "NotFound", "no route " .. path))
  end
  local sel = selector_of(q)
  local function visible(pod)
    return matches(pod, sel) and (not ns or pod.metadata.namespace == ns)
  end
  if not (q and q:find("watch=1", 1, true)) then
    self.lists = self.lists + 1
    local items = {}
    for _, pod in pairs(self.pods) do
      if visible(pod) then items[#items + 1] = pod end
    end
    table.sort(items, function(a, b) return a.metadata.name < b.metadata.name end)
    return x:respond(200, JSON, cjson.encode({ kind = "PodList", apiVersion = "v1",
      metadata = { resourceVersion = tostring(self.rv) }, items = setmetatable(items, cjson.array_mt) }))
  end
  self.watch_count = self.watch_count + 1
  local from = tonumber(q:match("resourceVersion=(%d+)") or "") or self.rv
  if self.compacted and from < self.compacted then
    if self.gone_as == "status" then
      return x:respond(410, JSON, status_body(410, "Expired", "too old resource version"))
    end
    x:start(200, JSON)
    x:write(cjson.encode({ type = "ERROR", object = { kind = "Status", code = 410, reason = "Expired" } }) .. "\n")
    return x:finish()
  end
  local w = { queue = {} }
  for _, ev in ipairs(self.log) do
    if ev.rv > from then w.queue[#w.queue + 1] = ev end
  end
  self.watches[w] = true
  x:start(200, JSON)
  while not x:closed() and not w.cut and not w.finish do
    if #w.queue > 0 and not self.stall then
      local batch = w.queue
      w.queue = {}
      local out, last = {}, false
      for _, ev in ipairs(batch) do
        if ev.raw then
          out[#out + 1] = ev.raw .. "\n"
          last = last or ev.last
        else
          local t, obj = view(ev, sel)
          if t and (not ns or obj.metadata.namespace == ns) then
            out[#out + 1] = cjson.encode({ type = t, object = obj }) .. "\n"
          end
        end
      end
      if #out > 0 then x:write(table.concat(out)) end
      if last then break end
    elseif self.stall then
      w.queue = {}      -- a stalled watch never delivers
    end
    core.sleep(10)
  end
  self.watches[w] = nil
  if w.cut then return x:abort() end
  if not x:closed() then x:finish() end
end

return K
