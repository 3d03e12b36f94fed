/*
 * lua_metrics.c: the "sglr.metrics" module over the default registry.
 *
 *   local metrics = require "sglr.metrics"
 *   local reqs = metrics.counter("sgl_router_requests_total", "Requests", { "route" })
 *   reqs:inc(1, "generate")          -- value optional: reqs:inc("generate")
 *
 * A metric is a userdata boxing its sglr_metric_t (metrics live as long as
 * the registry, so the box needs no __gc). Label values are looked up on
 * every call through the metric's hash in C, hashing the argument strings
 * where they lie: an update allocates nothing once its series exists.
 * Whether the leading value is given is decided by the argument count, so
 * a numeric label value is never mistaken for it.
 */
#include "metrics.h"

#include <errno.h>

#include <lua.h>
#include <lauxlib.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define METRIC_MT "sglr.metric"
#define TEXTGUARD_MT "sglr.metrics.text"
#define SERIES_MT "sglr.series"
#define ACC_MT "sglr.metrics.accumulator"

typedef struct {
    sglr_series_t *s;
    sglr_metric_type_t type;
    const char *tag;          /* SERIES_MT's address: a cheap type check */
} lseries_t;

static const char series_tag[] = SERIES_MT;

static sglr_metric_t *check_metric(lua_State *L)
{
    sglr_metric_t **box = luaL_checkudata(L, 1, METRIC_MT);
    if (!*box)
        luaL_argerror(L, 1, "metric is closed");
    return *box;
}

/* Collect label values from stack slots first..top; raises on misuse. */
static void check_values(lua_State *L, sglr_metric_t *m, int first, const char *what,
                         const char **values, size_t *lens)
{
    int n = lua_gettop(L) - first + 1;
    int want = sglr_metrics_nlabels(m);
    if (n < 0)
        n = 0;
    if (n != want)
        luaL_error(L, "%s: metric '%s' has %d label(s), got %d label value(s)", what,
                   sglr_metrics_name(m), want, n);
    for (int i = 0; i < n; i++) {
        int t = lua_type(L, first + i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "%s: metric '%s': value for label '%s' must be a string, got %s",
                       what, sglr_metrics_name(m), sglr_metrics_label(m, i),
                       lua_typename(L, t));
        values[i] = lua_tolstring(L, first + i, &lens[i]);
    }
}

static sglr_series_t *series_for(lua_State *L, sglr_metric_t *m, int first, const char *what,
                                 int create)
{
    const char *values[SGLR_METRICS_MAX_LABELS];
    size_t lens[SGLR_METRICS_MAX_LABELS];
    check_values(L, m, first, what, values, lens);
    sglr_series_t *s = sglr_metrics_find(m, values, lens, sglr_metrics_nlabels(m), create);
    if (!s && create)
        luaL_error(L, "%s: out of memory", what);
    return s;
}

static void check_type(lua_State *L, sglr_metric_t *m, const char *what, int ok)
{
    if (!ok)
        luaL_error(L, "%s: metric '%s' is a %s", what, sglr_metrics_name(m),
                   sglr_metrics_type_name(sglr_metrics_type(m)));
}

/* m:inc([v=1], labelvalues...) */
static int l_inc(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    sglr_metric_type_t t = sglr_metrics_type(m);
    check_type(L, m, "inc", t != SGLR_METRIC_HISTOGRAM);
    double v = 1;
    int first = 2;
    int nargs = lua_gettop(L) - 1, nlabels = sglr_metrics_nlabels(m);
    if (nargs == nlabels + 1) {
        v = luaL_optnumber(L, 2, 1);
        first = 3;
    } else if (nargs != nlabels) {
        luaL_error(L, "inc: metric '%s' has %d label(s): expected [value,] and %d label "
                   "value(s), got %d argument(s)", sglr_metrics_name(m), nlabels, nlabels, nargs);
    }
    if (t == SGLR_METRIC_COUNTER && !(v >= 0))
        luaL_error(L, "inc: counter '%s' cannot decrease (got %f)", sglr_metrics_name(m), v);
    sglr_metrics_inc(series_for(L, m, first, "inc", 1), v);
    return 0;
}

/* m:set(v, labelvalues...) */
static int l_set(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    check_type(L, m, "set", sglr_metrics_type(m) == SGLR_METRIC_GAUGE);
    double v = luaL_checknumber(L, 2);
    sglr_metrics_set(series_for(L, m, 3, "set", 1), v);
    return 0;
}

/* m:observe(v, labelvalues...) */
static int l_observe(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    check_type(L, m, "observe", sglr_metrics_type(m) == SGLR_METRIC_HISTOGRAM);
    double v = luaL_checknumber(L, 2);
    sglr_metrics_observe(series_for(L, m, 3, "observe", 1), v);
    return 0;
}

/* m:get(labelvalues...) -> value | count, sum; a missing series reads 0. */
static int l_get(lua_State *L)
{
    sglr_metrics_flush(sglr_metrics_default());     /* what accumulators hold */
    sglr_metric_t *m = check_metric(L);
    sglr_series_t *s = series_for(L, m, 2, "get", 0);
    if (sglr_metrics_type(m) == SGLR_METRIC_HISTOGRAM) {
        uint64_t count = 0;
        double sum = 0;
        if (s)
            sglr_metrics_hist_get(s, &count, &sum);
        lua_pushnumber(L, (lua_Number)count);
        lua_pushnumber(L, sum);
        return 2;
    }
    lua_pushnumber(L, s ? sglr_metrics_get(s) : 0);
    return 1;
}

/* m:remove(labelvalues...) -> true if a series went */
static int l_remove(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    const char *values[SGLR_METRICS_MAX_LABELS];
    size_t lens[SGLR_METRICS_MAX_LABELS];
    check_values(L, m, 2, "remove", values, lens);
    lua_pushboolean(L, sglr_metrics_remove(m, values, lens, sglr_metrics_nlabels(m)) == 0);
    return 1;
}

/* m:series(labelvalues...) -> handle: one series looked up once, then
 * updated with no hashing (s:inc([v]), s:set(v), s:observe(v), s:get()).
 * A handle keeps working after its series is removed; its updates are then
 * simply not exported. */
static int l_series(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    const char *values[SGLR_METRICS_MAX_LABELS];
    size_t lens[SGLR_METRICS_MAX_LABELS];
    check_values(L, m, 2, "series", values, lens);
    lseries_t *h = lua_newuserdata(L, sizeof *h);
    h->s = NULL;
    h->type = sglr_metrics_type(m);
    h->tag = series_tag;
    luaL_getmetatable(L, SERIES_MT);
    lua_setmetatable(L, -2);
    h->s = sglr_metrics_series(m, values, sglr_metrics_nlabels(m));
    if (!h->s)
        luaL_error(L, "series: out of memory");
    return 1;
}

static lseries_t *check_series(lua_State *L)
{
    lseries_t *h = lua_touserdata(L, 1);
    if (!h || lua_objlen(L, 1) != sizeof *h || h->tag != series_tag)
        luaL_typerror(L, 1, SERIES_MT);
    if (!h->s)
        luaL_argerror(L, 1, "series is released");
    return h;
}

static int s_inc(lua_State *L)
{
    lseries_t *h = check_series(L);
    double v = luaL_optnumber(L, 2, 1);
    if (h->type == SGLR_METRIC_HISTOGRAM || (h->type == SGLR_METRIC_COUNTER && !(v >= 0)))
        return luaL_error(L, "inc: not allowed on this series");
    sglr_metrics_inc(h->s, v);
    return 0;
}

static int s_set(lua_State *L)
{
    lseries_t *h = check_series(L);
    if (h->type != SGLR_METRIC_GAUGE)
        return luaL_error(L, "set: only gauges can be set");
    sglr_metrics_set(h->s, luaL_checknumber(L, 2));
    return 0;
}

static int s_observe(lua_State *L)
{
    lseries_t *h = check_series(L);
    if (h->type != SGLR_METRIC_HISTOGRAM)
        return luaL_error(L, "observe: only histograms observe");
    sglr_metrics_observe(h->s, luaL_checknumber(L, 2));
    return 0;
}

/* metrics.apply(s1, v1, s2, v2, ...): each series' own update with its
 * value, in one call: a counter is increased by v (v >= 0), a gauge set to
 * v, a histogram observes v. For a policy that updates several series per
 * decision: one C call ends one JIT trace, where a call a series would
 * end one each. Every pair is checked before any is applied. */
static int l_apply(lua_State *L)
{
    int top = lua_gettop(L);
    if (top % 2)
        return luaL_error(L, "apply: series and values come in pairs");
    for (int i = 1; i <= top; i += 2) {
        lseries_t *h = lua_touserdata(L, i);
        if (!h || lua_objlen(L, i) != sizeof *h || h->tag != series_tag)
            return luaL_typerror(L, i, SERIES_MT);
        if (!h->s)
            return luaL_argerror(L, i, "series is released");
        double v = luaL_checknumber(L, i + 1);
        if (h->type == SGLR_METRIC_COUNTER && !(v >= 0))
            return luaL_argerror(L, i + 1, "a counter only goes up");
    }
    for (int i = 1; i <= top; i += 2) {
        lseries_t *h = lua_touserdata(L, i);
        double v = lua_tonumber(L, i + 1);
        if (h->type == SGLR_METRIC_HISTOGRAM)
            sglr_metrics_observe(h->s, v);
        else if (h->type == SGLR_METRIC_GAUGE)
            sglr_metrics_set(h->s, v);
        else
            sglr_metrics_inc(h->s, v);
    }
    return 0;
}

static int s_get(lua_State *L)
{
    sglr_metrics_flush(sglr_metrics_default());     /* what accumulators hold */
    lseries_t *h = check_series(L);
    if (h->type == SGLR_METRIC_HISTOGRAM) {
        uint64_t count = 0;
        double sum = 0;
        sglr_metrics_hist_get(h->s, &count, &sum);
        lua_pushnumber(L, (lua_Number)count);
        lua_pushnumber(L, sum);
        return 2;
    }
    lua_pushnumber(L, sglr_metrics_get(h->s));
    return 1;
}

/* The request path's updates through LuaJIT's FFI (stats.lua): a call the
 * JIT compiles into its trace, where a lua_CFunction ends the trace and
 * costs a stitch. p is a series handle as FFI passes a userdata to void *
 * (its payload); the Lua object keeps the handle, and so its reference,
 * alive across the call. -> 0 | -EINVAL (not a live handle that takes
 * this update; nothing changes). */
int sglr_lua_series_inc(void *p, double v)
{
    lseries_t *h = p;
    if (!h || h->tag != series_tag || !h->s || h->type == SGLR_METRIC_HISTOGRAM ||
        (h->type == SGLR_METRIC_COUNTER && !(v >= 0)))
        return -EINVAL;
    sglr_metrics_inc(h->s, v);
    return 0;
}

int sglr_lua_series_observe(void *p, double v)
{
    lseries_t *h = p;
    if (!h || h->tag != series_tag || !h->s || h->type != SGLR_METRIC_HISTOGRAM)
        return -EINVAL;
    sglr_metrics_observe(h->s, v);
    return 0;
}

/* metrics.apply's pairs through the FFI (stats.lua), up to six in one
 * call: every handle that is not NULL is checked first (a live series,
 * a counter not going down), then each takes its update (a histogram
 * observes, a gauge is set, a counter adds). The first NULL handle ends
 * the list. -> 0 | -EINVAL (nothing changes; the caller asks the classic
 * apply, which says what is wrong). */
int sglr_lua_series_apply6(void *p1, double v1, void *p2, double v2, void *p3, double v3,
                           void *p4, double v4, void *p5, double v5, void *p6, double v6)
{
    lseries_t *h[6] = { p1, p2, p3, p4, p5, p6 };
    double v[6] = { v1, v2, v3, v4, v5, v6 };
    int n = 0;
    while (n < 6 && h[n])
        n++;
    for (int i = 0; i < n; i++)
        if (h[i]->tag != series_tag || !h[i]->s || (h[i]->type == SGLR_METRIC_COUNTER && !(v[i] >= 0)))
            return -EINVAL;
    for (int i = 0; i < n; i++) {
        if (h[i]->type == SGLR_METRIC_HISTOGRAM)
            sglr_metrics_observe(h[i]->s, v[i]);
        else if (h[i]->type == SGLR_METRIC_GAUGE)
            sglr_metrics_set(h[i]->s, v[i]);
        else
            sglr_metrics_inc(h[i]->s, v[i]);
    }
    return 0;
}

/* ---- accumulators (metrics.h) ---------------------------------------------- */

typedef struct {
    const char *tag;          /* ACC_MT's address */
    sglr_metrics_acc_t *a;
    int n;                    /* its series */
} lacc_t;

static const char acc_tag[] = ACC_MT;

/* metrics.accumulator(h1, ..., hn) -> an accumulator over up to eight
 * series handles (at most one of a histogram): metrics.acc_add(acc, mask,
 * v1, ..., vn) updates series i by v_i for each bit i - 1 of mask, and the
 * updates reach the series when the registry is read (render, get) or the
 * accumulator is collected. */
static int l_accumulator(lua_State *L)
{
    int n = lua_gettop(L);
    sglr_series_t *s[SGLR_METRICS_ACC_MAX];
    if (n < 1 || n > SGLR_METRICS_ACC_MAX)
        return luaL_error(L, "accumulator: 1 to %d series handles", SGLR_METRICS_ACC_MAX);
    for (int i = 0; i < n; i++) {
        lseries_t *h = lua_touserdata(L, i + 1);
        if (!h || lua_objlen(L, i + 1) != sizeof *h || h->tag != series_tag)
            luaL_typerror(L, i + 1, SERIES_MT);
        if (!h->s)
            luaL_argerror(L, i + 1, "series is released");
        s[i] = h->s;
    }
    lacc_t *u = lua_newuserdata(L, sizeof *u);
    u->tag = acc_tag;
    u->a = NULL;
    u->n = n;
    luaL_getmetatable(L, ACC_MT);
    lua_setmetatable(L, -2);
    u->a = sglr_metrics_acc_new(sglr_metrics_default(), s, n);
    if (!u->a)
        return luaL_error(L, "accumulator: out of memory, a removed series, or two histograms");
    return 1;
}

static int acc_add_checked(lua_State *L, lacc_t *u)
{
    lua_Integer m = luaL_checkinteger(L, 2);
    if (m < 0 || m >= (lua_Integer)1 << u->n)
        return luaL_argerror(L, 2, lua_pushfstring(L, "mask of %d series expected", u->n));
    unsigned mask = (unsigned)m;
    double v[SGLR_METRICS_ACC_MAX] = { 0 };
    for (int i = 0; i < u->n; i++)
        if ((mask >> i) & 1)
            v[i] = luaL_checknumber(L, i + 3);      /* a set bit takes a number */
    if (sglr_metrics_acc_add(u->a, mask, v) < 0)
        return luaL_error(L, "accumulator: a counter cannot go down");
    return 0;
}

/* metrics.acc_add(acc, mask, v1, ...) */
static int l_acc_add(lua_State *L)
{
    lacc_t *u = luaL_checkudata(L, 1, ACC_MT);
    if (!u->a)
        return luaL_argerror(L, 1, "accumulator is closed");
    return acc_add_checked(L, u);
}

static int acc_gc(lua_State *L)
{
    lacc_t *u = luaL_checkudata(L, 1, ACC_MT);
    sglr_metrics_acc_free(u->a);
    u->a = NULL;
    return 0;
}

/* metrics.acc_add through LuaJIT's FFI (stats.lua): p an accumulator as
 * FFI passes a userdata to void *. -> 0 | -EINVAL (not a live
 * accumulator, or a counter going down: nothing changes; the caller asks
 * the classic acc_add, which says why) */
int sglr_lua_acc_add8(void *p, unsigned mask, double v1, double v2, double v3, double v4,
                      double v5, double v6, double v7, double v8)
{
    lacc_t *u = p;
    if (!u || u->tag != acc_tag || !u->a)
        return -EINVAL;
    double v[SGLR_METRICS_ACC_MAX] = { v1, v2, v3, v4, v5, v6, v7, v8 };
    return sglr_metrics_acc_add(u->a, mask, v);
}

static int s_gc(lua_State *L)
{
    lseries_t *h = luaL_checkudata(L, 1, SERIES_MT);
    if (h->s) {
        sglr_metrics_release(h->s);
        h->s = NULL;
    }
    return 0;
}

static int l_tostring(lua_State *L)
{
    sglr_metric_t *m = check_metric(L);
    lua_pushfstring(L, "sglr.metric %s (%s)", sglr_metrics_name(m),
                    sglr_metrics_type_name(sglr_metrics_type(m)));
    return 1;
}

static int l_name(lua_State *L)
{
    lua_pushstring(L, sglr_metrics_name(check_metric(L)));
    return 1;
}

static void push_metric(lua_State *L, sglr_metric_t *m)
{
    sglr_metric_t **box = lua_newuserdata(L, sizeof *box);
    *box = m;
    luaL_getmetatable(L, METRIC_MT);
    lua_setmetatable(L, -2);
}

/* metrics.counter|gauge|histogram(name, help, {labelnames...}[, {buckets...}]) */
static int do_register(lua_State *L, sglr_metric_type_t type)
{
    const char *labels[SGLR_METRICS_MAX_LABELS];
    double buckets[SGLR_METRICS_MAX_BUCKETS];
    sglr_metric_spec_t spec = { .type = type };
    spec.name = luaL_checkstring(L, 1);
    spec.help = luaL_optstring(L, 2, "");
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        int n = (int)lua_objlen(L, 3);
        if (n > SGLR_METRICS_MAX_LABELS)
            return luaL_error(L, "metric '%s': at most %d labels", spec.name,
                              SGLR_METRICS_MAX_LABELS);
        /* The names stay referenced by the table at slot 3 while we use them. */
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 3, i + 1);
            if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "metric '%s': label name #%d must be a string",
                                  spec.name, i + 1);
            labels[i] = lua_tostring(L, -1);
            lua_pop(L, 1);
        }
        spec.labels = labels;
        spec.nlabels = n;
    }
    if (type == SGLR_METRIC_HISTOGRAM && !lua_isnoneornil(L, 4)) {
        luaL_checktype(L, 4, LUA_TTABLE);
        int n = (int)lua_objlen(L, 4);
        if (n > SGLR_METRICS_MAX_BUCKETS)
            return luaL_error(L, "metric '%s': at most %d buckets", spec.name,
                              SGLR_METRICS_MAX_BUCKETS);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 4, i + 1);
            if (lua_type(L, -1) != LUA_TNUMBER)
                return luaL_error(L, "metric '%s': bucket #%d must be a number",
                                  spec.name, i + 1);
            buckets[i] = lua_tonumber(L, -1);
            lua_pop(L, 1);
        }
        spec.buckets = buckets;
        spec.nbuckets = n;
    }
    char err[256];
    sglr_metric_t *m;
    if (sglr_metrics_register(sglr_metrics_default(), &spec, &m, err, sizeof err) != 0)
        return luaL_error(L, "%s", err);
    push_metric(L, m);
    return 1;
}

static int l_counter(lua_State *L) { return do_register(L, SGLR_METRIC_COUNTER); }
static int l_gauge(lua_State *L) { return do_register(L, SGLR_METRIC_GAUGE); }
static int l_histogram(lua_State *L) { return do_register(L, SGLR_METRIC_HISTOGRAM); }

/* Frees a render buffer if pushing it raises (out of memory). */
static int textguard_gc(lua_State *L)
{
    char **box = lua_touserdata(L, 1);
    free(*box);
    *box = NULL;
    return 0;
}

/* metrics.render() -> the default registry in text format 0.0.4 */
static int l_render(lua_State *L)
{
    /* The guard exists before the text does, so no raise leaks it. */
    char **box = lua_newuserdata(L, sizeof *box);
    *box = NULL;
    luaL_getmetatable(L, TEXTGUARD_MT);
    lua_setmetatable(L, -2);
    size_t len;
    *box = sglr_metrics_render(sglr_metrics_default(), &len);
    if (!*box)
        return luaL_error(L, "render: out of memory");
    lua_pushlstring(L, *box, len);
    free(*box);
    *box = NULL;
    return 1;
}

/* metrics.remove_label(label, value) -> count of series removed everywhere */
static int l_remove_label(lua_State *L)
{
    size_t len;
    const char *label = luaL_checkstring(L, 1);
    const char *value = luaL_checklstring(L, 2, &len);
    lua_pushinteger(L, sglr_metrics_remove_label(sglr_metrics_default(), label, value, len));
    return 1;
}

int luaopen_sglr_metrics(lua_State *L)
{
    static const luaL_Reg methods[] = {
        { "inc", l_inc }, { "set", l_set }, { "observe", l_observe },
        { "get", l_get }, { "remove", l_remove }, { "name", l_name }, { "series", l_series },
        { NULL, NULL },
    };
    static const luaL_Reg funcs[] = {
        { "counter", l_counter }, { "gauge", l_gauge }, { "histogram", l_histogram },
        { "render", l_render }, { "remove_label", l_remove_label }, { "apply", l_apply },
        { "accumulator", l_accumulator }, { "acc_add", l_acc_add },
        { NULL, NULL },
    };
    if (luaL_newmetatable(L, METRIC_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, "sglr.metric");
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, SERIES_MT)) {
        static const luaL_Reg series_m[] = {
            { "inc", s_inc }, { "set", s_set }, { "observe", s_observe }, { "get", s_get },
            { NULL, NULL },
        };
        lua_newtable(L);
        luaL_register(L, NULL, series_m);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, s_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, ACC_MT)) {
        lua_pushcfunction(L, acc_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    if (luaL_newmetatable(L, TEXTGUARD_MT)) {
        lua_pushcfunction(L, textguard_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_newtable(L);
    for (int i = 0; i < sglr_metrics_default_nbuckets; i++) {
        lua_pushnumber(L, sglr_metrics_default_buckets[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "default_buckets");
    return 1;
}
