-- sglr sim --plot FILE.svg: one row per policy, TTFT over time on the left
-- (mean and maximum per time bin) and each worker's load over time on the
-- right (requests in flight, averaged per bin). Plain SVG, no libraries.
local fmt, concat = string.format, table.concat
local floor, max, min = math.floor, math.max, math.min

local M = {}

local BINS = 120
local W, H = 460, 200          -- one chart
local PAD = 50
local COLORS = { "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf" }

local function esc(s)
  return (tostring(s):gsub("&", "&amp;"):gsub("<", "&lt;"):gsub(">", "&gt;"))
end

-- Per-bin series of one policy's timeline: ttft mean/max, load per worker.
local function series(s)
  local tl = s.timeline or {}
  local t_end = 0
  for _, r in ipairs(tl) do t_end = max(t_end, r.t or 0) end
  if t_end <= 0 then t_end = 1 end
  local width = t_end / BINS
  local sum, cnt, hi = {}, {}, {}
  for b = 1, BINS do sum[b], cnt[b], hi[b] = 0, 0, 0 end
  local load, workers = {}, {}
  for _, r in ipairs(tl) do
    if r.ok then
      local b = min(BINS, floor(r.t / width) + 1)
      sum[b], cnt[b] = sum[b] + r.ttft_ms, cnt[b] + 1
      hi[b] = max(hi[b], r.ttft_ms)
      local l = load[r.worker]
      if not l then
        l = {}
        for k = 1, BINS do l[k] = 0 end
        load[r.worker] = l
        workers[#workers + 1] = r.worker
      end
      -- the request was in flight over [t - latency, t]: its share of each bin
      local a, z = r.t - r.latency_ms, r.t
      local b0, b1 = max(1, floor(a / width) + 1), min(BINS, floor(z / width) + 1)
      for k = b0, b1 do
        local lo, up = (k - 1) * width, k * width
        local over = min(up, z) - max(lo, a)
        if over > 0 then l[k] = l[k] + over / width end
      end
    end
  end
  table.sort(workers)
  local mean = {}
  for b = 1, BINS do mean[b] = cnt[b] > 0 and sum[b] / cnt[b] or false end
  return { t_end = t_end, mean = mean, max = hi, load = load, workers = workers }
end

local function polyline(out, x0, y0, vals, vmax, color, width)
  local pts = {}
  for b = 1, BINS do
    local v = vals[b]
    if v then
      local x = x0 + (b - 0.5) / BINS * W
      local y = y0 + H - (v / vmax) * H
      pts[#pts + 1] = fmt("%.1f,%.1f", x, y)
    end
  end
  if #pts > 0 then
    out[#out + 1] = fmt('<polyline fill="none" stroke="%s" stroke-width="%s" points="%s"/>', color,
      width or 1.5, concat(pts, " "))
  end
end

local function axes(out, x0, y0, title, vmax, t_end, unit)
  out[#out + 1] = fmt('<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>', x0, y0, W, H)
  out[#out + 1] = fmt('<text x="%d" y="%d" font-size="13">%s</text>', x0, y0 - 6, esc(title))
  out[#out + 1] = fmt('<text x="%d" y="%d" font-size="10" text-anchor="end">%s</text>', x0 - 4, y0 + 10,
    esc(fmt("%.4g%s", vmax, unit)))
  out[#out + 1] = fmt('<text x="%d" y="%d" font-size="10" text-anchor="end">0</text>', x0 - 4, y0 + H)
  out[#out + 1] = fmt('<text x="%d" y="%d" font-size="10" text-anchor="end">%.1f s</text>', x0 + W,
    y0 + H + 14, t_end / 1000)
end

-- cols: { {name, summary with timeline}, ... } -> SVG text
function M.render(cols)
  local rows = #cols
  local width, height = 2 * (W + PAD) + PAD, rows * (H + 2 * PAD) + PAD
  local out = { fmt('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
    .. 'font-family="sans-serif">', width, height),
    fmt('<rect width="%d" height="%d" fill="white"/>', width, height) }
  for i, col in ipairs(cols) do
    local name, s = col[1], col[2]
    local sr = series(s)
    local y0 = PAD + (i - 1) * (H + 2 * PAD)
    local tmax = 0
    for b = 1, BINS do tmax = max(tmax, sr.max[b]) end
    if tmax <= 0 then tmax = 1 end
    axes(out, PAD, y0, fmt("%s: TTFT per %.2g s (mean, max)", name, sr.t_end / BINS / 1000), tmax,
      sr.t_end, " ms")
    local maxes = {}
    for b = 1, BINS do maxes[b] = sr.max[b] > 0 and sr.max[b] or false end
    polyline(out, PAD, y0, maxes, tmax, "#d62728", 1)
    polyline(out, PAD, y0, sr.mean, tmax, "#1f77b4", 2)
    local lmax = 0
    for _, l in pairs(sr.load) do for b = 1, BINS do lmax = max(lmax, l[b]) end end
    if lmax <= 0 then lmax = 1 end
    local x1 = 2 * PAD + W
    axes(out, x1, y0, fmt("%s: load per worker (in flight)", name), lmax, sr.t_end, "")
    for k, url in ipairs(sr.workers) do
      polyline(out, x1, y0, sr.load[url], lmax, COLORS[(k - 1) % #COLORS + 1], 1.2)
    end
  end
  out[#out + 1] = "</svg>"
  return concat(out, "\n") .. "\n"
end

function M.write(path, cols)
  local f, err = io.open(path, "wb")
  if not f then return nil, err end
  f:write(M.render(cols))
  f:close()
  return true
end

return M
