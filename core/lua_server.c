/*
 * lua_server.c: the HTTP server (server.c) bound to Lua, part of sglr.core.
 *
 *   core.listen(host, port, opts, handler) -> sglr.server
 *   handler(x) runs per request, x an sglr.exchange: the request (method,
 *   path, headers, body) and its response (respond, or start + write* +
 *   finish). x:forward, the proxy, is added by lua_proxy.c.
 *
 * Each request runs in a pooled runner thread (bridge.c), so a thread and
 * its stack are reused instead of made per request.
 */
#include "lua_common.h"
#include "server.h"

#include <limits.h>
#include <llhttp.h>

#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

static const char SERVER_MT[] = "sglr.server";
#define EXCHANGE_MT sglr_lua_exchange_mt

typedef struct {
    sglr_server_t srv;
    int handler_ref;
    int stopped;
    int lua_owned;          /* the userdata still points here */
    int closed;             /* the listener handle is closed */
} lserver_t;

/* Exchange boxes of finished requests, kept for the next ones (registry
 * references): a request whose handler said nothing else can hold its
 * box (sglr_lua_x_reuse) gives it back when it is done, so that a steady
 * stream of requests leaves no userdata to the collector, which walks
 * every userdata each cycle (lj_gc_separateudata was about a tenth of
 * what cache_aware added to a request by perf). Sanitizer builds keep
 * them too: a box is the collector's memory, not C's, and what it points
 * at is checked as in any box. */
#define BOX_POOL_MAX 256
static int box_pool[BOX_POOL_MAX];
static int nbox_pool;
/* The box the running handler gave back: x_gc pools it if it is the box
 * done next (it is: nothing runs between a handler's return and its
 * exchange's done), and any other box's done clears it. */
static void *box_given;

static void push_exchange(lua_State *L, sglr_exchange_t *x)
{
    sglr_exchange_hold(x);
    box_given = NULL;
    if (nbox_pool > 0) {
        int ref = box_pool[--nbox_pool];
        lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        sglr_lua_box_revive(L, -1, EXCHANGE_MT, x);
        return;
    }
    sglr_lua_new_box(L, EXCHANGE_MT, x);
}

/* Each request runs in a thread from the pool (bridge.c): the runner loop
 * below takes (handler, exchange) pairs and yields the idle token between
 * them, so a thread and its stack are reused instead of made per request. */
/* When the handler returns, the exchange is released at once (done = the
 * box's finalizer): its request body and buffers are freed now, not when
 * the collector gets to a userdata whose size it does not see. */
static const char runner_src[] =
    "local token, traceback, failed, done = ...\n"
    "local yield, xpcall = coroutine.yield, xpcall\n"
    "while true do\n"
    "  local handler, x = yield(token)\n"
    "  local ok, err = xpcall(handler, traceback, x)\n"
    "  if not ok then failed(x, err) end\n"
    "  done(x)\n"
    "  handler, x, err = nil, nil, nil\n"
    "end\n";

/* A handler raised: log it, and answer the client now rather than when the
 * exchange happens to be collected. */
static int handler_failed(lua_State *L)
{
    sglr_box_t *b = lua_touserdata(L, 1);
    const char *err = lua_tostring(L, 2);
    sglr_log(SGLR_LOG_ERROR, "request handler error: %s", err ? err : "(no message)");
    if (b && lua_objlen(L, 1) == sizeof *b && b->type == EXCHANGE_MT && b->p) {
        sglr_exchange_t *x = b->p;
        if (x->state == SGLR_X_HANDLING) {
            static const char body[] =
                "{\"error\":{\"message\":\"internal error in the request handler\","
                "\"type\":\"internal_error\"}}";
            static const char hdr[] = "content-type: application/json\r\n";
            sglr_exchange_respond(x, 500, hdr, sizeof hdr - 1, body, sizeof body - 1);
        } else if (x->state == SGLR_X_STREAMING) {
            sglr_exchange_abort(x);
        }
    }
    return 0;
}
static int runner_ref = LUA_NOREF;
static int x_gc(lua_State *L);

static int new_runner(lua_State *L, lua_State **out)
{
    if (runner_ref == LUA_NOREF) {
        if (luaL_loadbuffer(L, runner_src, sizeof runner_src - 1, "=request runner"))
            return LUA_NOREF;
        runner_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_State *co = lua_newthread(L);
    int ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(co, LUA_REGISTRYINDEX, runner_ref);
    lua_pushlightuserdata(co, &sglr_co_idle_token);
    lua_getglobal(co, "debug");
    lua_getfield(co, -1, "traceback");
    lua_remove(co, -2);
    lua_pushcfunction(co, handler_failed);
    lua_pushcfunction(co, x_gc);
    if (lua_resume(co, 4) != LUA_YIELD) {    /* runs up to its first yield */
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        return LUA_NOREF;
    }
    lua_settop(co, 0);
    *out = co;
    return sglr_co_keep(co, ref);     /* referenced for its whole life */
}

static void on_request(sglr_exchange_t *x)
{
    lserver_t *ls = x->server->data;
    lua_State *L = sglr_L;
    lua_State *co = NULL;
    int ref = sglr_co_pool_take(&co);
    if (ref == LUA_NOREF)
        ref = new_runner(L, &co);
    if (ref == LUA_NOREF) {
        static const char body[] =
            "{\"error\":{\"message\":\"cannot start a request handler\",\"type\":\"internal_error\"}}";
        sglr_exchange_respond(x, 500, "content-type: application/json\r\n", 32, body, sizeof body - 1);
        return;
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, ls->handler_ref);
    push_exchange(co, x);
    sglr_co_resume(co, ref, 2);
}

static void server_closed(sglr_server_t *s)
{
    lserver_t *ls = s->data;
    ls->closed = 1;
    if (!ls->lua_owned)
        free(ls);
}

/* A number field of the table at idx, or dflt. */
static double opt_number(lua_State *L, int idx, const char *name, double dflt)
{
    lua_getfield(L, idx, name);
    double v = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : dflt;
    lua_pop(L, 1);
    return v;
}

/* A timeout in ms from seconds, 0 for none. */
static unsigned opt_ms(lua_State *L, int idx, const char *name)
{
    double s = opt_number(L, idx, name, 0);
    return s > 0 ? (unsigned)(s * 1000 < 4e9 ? s * 1000 : 4e9) : 0;
}

/* core.listen(host, port, {max_body=, max_header=, header_timeout=,
 * body_timeout=, keepalive_timeout=, write_timeout= (seconds),
 * max_connections= (-1: from the open-file limit)}, handler(x)) -> server */
static int l_listen(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    int port = (int)luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    sglr_server_opts_t opts = {
        .max_body = (size_t)opt_number(L, 3, "max_body", 256u << 20),
        .max_header = (size_t)opt_number(L, 3, "max_header", 64u << 10),
        .header_timeout_ms = opt_ms(L, 3, "header_timeout"),
        .body_timeout_ms = opt_ms(L, 3, "body_timeout"),
        .keepalive_timeout_ms = opt_ms(L, 3, "keepalive_timeout"),
        .write_timeout_ms = opt_ms(L, 3, "write_timeout"),
        .max_conns = (int)opt_number(L, 3, "max_connections", 0),
    };
    if (opts.max_conns < 0) {
        /* "auto": half the open-file limit, the rest left for connections
         * to workers, health checks and files */
        struct rlimit rl;
        rlim_t n = getrlimit(RLIMIT_NOFILE, &rl) == 0 ? rl.rlim_cur : 1024;
        if (n == RLIM_INFINITY || n > (1u << 24))
            n = 1u << 24;
        opts.max_conns = n > 256 ? (int)(n - 128) / 2 : 64;
    }
    lserver_t *ls = calloc(1, sizeof *ls);
    if (!ls)
        return luaL_error(L, "out of memory");
    int r = sglr_server_init(&ls->srv, host, port, &opts, on_request, ls);
    if (r < 0) {
        ls->srv.on_closed = server_closed;   /* frees ls once the loop closed it */
        lua_pushnil(L);
        lua_pushfstring(L, "cannot listen on %s:%d: %s", host, port, uv_strerror(r));
        return 2;
    }
    lua_pushvalue(L, 4);
    ls->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    ls->lua_owned = 1;
    sglr_lua_new_box(L, SERVER_MT, ls);
    return 1;
}

static int server_port(lua_State *L)
{
    lserver_t *ls = sglr_lua_check_box(L, 1, SERVER_MT);
    lua_pushinteger(L, sglr_server_port(&ls->srv));
    return 1;
}

static int server_close(lua_State *L)
{
    lserver_t *ls = sglr_lua_check_box(L, 1, SERVER_MT);
    if (!ls->stopped) {
        ls->stopped = 1;
        sglr_server_stop(&ls->srv, server_closed);
    }
    return 0;
}

static int server_conns(lua_State *L)
{
    lserver_t *ls = sglr_lua_check_box(L, 1, SERVER_MT);
    lua_pushinteger(L, ls->srv.nconns);
    lua_pushnumber(L, (lua_Number)ls->srv.refused);
    return 2;
}

static int server_gc(lua_State *L)
{
    void **box = luaL_checkudata(L, 1, SERVER_MT);
    lserver_t *ls = *box;
    if (!ls)
        return 0;
    *box = NULL;
    /* A live server is kept by the Lua code that serves; a collected one
     * stops listening. */
    luaL_unref(L, LUA_REGISTRYINDEX, ls->handler_ref);
    ls->handler_ref = LUA_NOREF;
    ls->lua_owned = 0;
    if (!ls->stopped) {
        ls->stopped = 1;
        sglr_server_stop(&ls->srv, server_closed);
    } else if (ls->closed) {
        free(ls);
    }
    return 0;
}

/* --- exchanges ------------------------------------------------------------------- */

sglr_exchange_t *sglr_lua_check_exchange(lua_State *L, int idx)
{
    return sglr_lua_check_box(L, idx, EXCHANGE_MT);
}

/* The request flow's reads of an exchange through LuaJIT's FFI (flow.lua):
 * compiled into the JIT's trace, where a method call ends it. b is an
 * exchange userdata as FFI passes it to void * (its payload); -1 when it
 * is not a live exchange (the caller then asks the method, which says
 * why). */
static sglr_exchange_t *ffi_x(void *b)
{
    sglr_box_t *box = b;
    return box && box->type == EXCHANGE_MT ? box->p : NULL;
}

sglr_exchange_t *sglr_lua_ffi_exchange(void *b)
{
    return ffi_x(b);
}

/* The running request's handler says nothing but the router holds box b
 * (the request flow's recycle_req): when the request is done, the box is
 * kept for a later request instead of left to the collector. -> 0, -1
 * when b is no live exchange. */
int sglr_lua_x_reuse(void *b)
{
    if (!ffi_x(b))
        return -1;
    box_given = b;
    return 0;
}

int sglr_lua_x_status(void *b)
{
    sglr_exchange_t *x = ffi_x(b);
    return x ? x->status : -1;
}

/* The inference route of a POST: 1 /generate, 2 /v1/chat/completions, 3
 * /v1/completions (the path before any '?'); 0 for any other request, -1
 * when b is no live exchange. The router's first question of every
 * request, without making its path and method Lua strings. */
int sglr_lua_x_inference(void *b)
{
    sglr_exchange_t *x = ffi_x(b);
    if (!x)
        return -1;
    if (x->method != HTTP_POST)
        return 0;
    const char *u = x->head.buf.data + x->head.url_off;
    size_t n = x->head.url_len;
    const char *q = memchr(u, '?', n);
    if (q)
        n = (size_t)(q - u);
    if (n == 9 && memcmp(u, "/generate", 9) == 0)
        return 1;
    if (n == 20 && memcmp(u, "/v1/chat/completions", 20) == 0)
        return 2;
    if (n == 15 && memcmp(u, "/v1/completions", 15) == 0)
        return 3;
    return 0;
}

int sglr_lua_x_closed(void *b)
{
    sglr_exchange_t *x = ffi_x(b);
    return x ? sglr_exchange_closed(x) != 0 : -1;
}

double sglr_lua_x_body_size(void *b)
{
    sglr_exchange_t *x = ffi_x(b);
    return x ? (double)x->body.len : -1;
}

/* A request's id, chosen for the flow through the FFI (one call, compiled
 * into its trace) and kept in x, so that no Lua string of it is made unless
 * something reads it: the value of the first of names (each NUL-terminated,
 * an empty name ends the list) that x carries non-empty, else prefix and 24
 * random alphanumerics. x:request_id() reads it; x:relay_pipe and
 * x:relay_pd add it when their request_id is nil, and so does the access
 * line. Returns its length, or -1 when x is not a live exchange or prefix
 * is longer than 23 bytes (the caller then asks x:header and
 * core.random_id). */
int sglr_lua_x_set_request_id(void *b, const char *names, const char *prefix)
{
    sglr_exchange_t *x = ffi_x(b);
    if (!x)
        return -1;
    /* one pass over the headers: for each name (in order) its first
     * header counts, and the earliest name whose value is not empty wins
     * (names and stored header names are both lowercase) */
    const char *nm[32];
    size_t nlen[32];
    int nn = 0;
    for (const char *n = names; *n && nn < 32; nn++) {
        nlen[nn] = strlen(n);
        nm[nn] = n;
        n += nlen[nn] + 1;
    }
    const sglr_head_t *h = &x->head;
    const char *best = NULL;
    size_t best_len = 0;
    int best_k = nn;
    unsigned seen = 0;             /* names whose first header was met */
    for (int i = 0; i < h->nhdrs && best_k > 0; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        for (int k = 0; k < best_k; k++) {
            if (nlen[k] != hd->name_len || (seen & (1u << k)) ||
                memcmp(nm[k], h->buf.data + hd->name_off, nlen[k]) != 0)
                continue;
            seen |= 1u << k;
            if (hd->value_len) {
                best = h->buf.data + hd->value_off;
                best_len = hd->value_len;
                best_k = k;
            }
            break;
        }
    }
    if (best) {
        /* the head is x's until it is freed: no copy */
        x->rid = best;
        x->rid_len = best_len;
        return (int)(best_len < INT_MAX ? best_len : INT_MAX);
    }
    size_t plen = strlen(prefix);
    if (plen + 24 > sizeof x->rid_buf)
        return -1;
    memcpy(x->rid_buf, prefix, plen);
    sglr_random_alnum24(x->rid_buf + plen);
    x->rid = x->rid_buf;
    x->rid_len = plen + 24;
    return (int)x->rid_len;
}

/* x's request id (set above), or NULL when x is no live exchange or has
 * none; *len its length */
const char *sglr_lua_x_rid(void *b, size_t *len)
{
    sglr_exchange_t *x = ffi_x(b);
    if (!x || !x->rid)
        return NULL;
    *len = x->rid_len;
    return x->rid;
}

#define DECISION_STR_(...) #__VA_ARGS__
#define DECISION_STR(...) DECISION_STR_(__VA_ARGS__)

const char *sglr_decision_cdef(void)
{
    return "typedef struct { " DECISION_STR(SGLR_DECISION_FIELDS) " } sglr_decision_t;";
}

void sglr_decision_put(sglr_decision_t *a, int i, double t, int attempt, int route, int pname,
                       int pversion, int worker, int reason, double matched, double total)
{
    sglr_decision_t *d = &a[i];
    d->t = t;
    d->matched = matched;
    d->total = total;
    d->attempt = attempt;
    d->route = (uint16_t)route;
    d->pname = (uint16_t)pname;
    d->pversion = (uint16_t)pversion;
    d->worker = (uint16_t)worker;
    d->reason = (uint16_t)reason;
    d->dworker = 0;
    d->has_shadow = 0;
}

int sglr_decision_put_id(sglr_decision_t *a, int i, void *x, const char *id, int idlen)
{
    sglr_decision_t *d = &a[i];
    size_t n = 0;
    const char *s = x ? sglr_lua_x_rid(x, &n) : NULL;
    int r = 0;
    if (!s) {
        s = id;
        n = id && idlen > 0 ? (size_t)idlen : 0;
        r = id ? 0 : -1;
    }
    if (n > sizeof d->id)
        n = sizeof d->id;
    if (n)
        memcpy(d->id, s, n);
    d->idlen = (uint8_t)n;
    return r;
}

static sglr_exchange_t *check_x(lua_State *L)
{
    return sglr_lua_check_exchange(L, 1);
}

static int x_method(lua_State *L)
{
    lua_pushstring(L, sglr_exchange_method(check_x(L)));
    return 1;
}

static int x_url(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    lua_pushlstring(L, x->head.buf.data + x->head.url_off, x->head.url_len);
    return 1;
}

static int x_path(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    const char *u = x->head.buf.data + x->head.url_off;
    size_t n = x->head.url_len, i = 0;
    while (i < n && u[i] != '?')
        i++;
    lua_pushlstring(L, u, i);
    if (i < n)
        lua_pushlstring(L, u + i + 1, n - i - 1);
    else
        lua_pushnil(L);
    return 2;
}

/* x:peer() -> the client's IP address | nil, err */
static int x_peer(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    char buf[64];
    int rc = sglr_exchange_peer(x, buf, sizeof buf);
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, uv_err_name(rc));
        return 2;
    }
    lua_pushstring(L, buf);
    return 1;
}

/* x:header(name [, name2 ...]) -> the value of the first present (names
 * lowercase), or nil */
static int x_header(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    int top = lua_gettop(L);
    for (int i = 2; i <= top; i++) {
        size_t n;
        const char *v = sglr_head_get(&x->head, luaL_checkstring(L, i), &n);
        if (v && n) {
            lua_pushlstring(L, v, n);
            return 1;
        }
    }
    lua_pushnil(L);
    return 1;
}

/* x:request_id() -> the id the flow chose for the request, or nil */
static int x_request_id(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    if (x->rid)
        lua_pushlstring(L, x->rid, x->rid_len);
    else
        lua_pushnil(L);
    return 1;
}

static int x_headers(lua_State *L)
{
    sglr_lua_push_head(L, &check_x(L)->head);
    return 1;
}

static int x_body(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
    return 1;
}

sglr_exchange_t *sglr_lua_to_exchange(lua_State *L, int idx)
{
    if (lua_type(L, idx) != LUA_TUSERDATA)
        return NULL;
    sglr_box_t *b = lua_touserdata(L, idx);
    return lua_objlen(L, idx) == sizeof *b && b->type == EXCHANGE_MT ? b->p : NULL;
}

const char *sglr_exchange_text(const sglr_exchange_t *x, size_t *len)
{
    *len = x->has_text ? x->text.len : 0;
    return x->has_text && x->text.data ? x->text.data : "";
}

uint64_t sglr_exchange_text_serial(const sglr_exchange_t *x)
{
    return x->has_text ? x->text_serial : 0;
}

/* x:route_text() -> the routing text kept by extract.check(route, x, max,
 * true), or nil when none was */
static int x_route_text(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    if (!x->has_text)
        return 0;
    size_t n;
    const char *t = sglr_exchange_text(x, &n);
    lua_pushlstring(L, t, n);
    return 1;
}

const char *sglr_lua_body(lua_State *L, int idx, size_t *len)
{
    sglr_exchange_t *x = sglr_lua_to_exchange(L, idx);
    if (x) {
        *len = x->body.len;
        return x->body.data ? x->body.data : "";
    }
    return luaL_checklstring(L, idx, len);
}

static int x_body_size(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)check_x(L)->body.len);
    return 1;
}

static int x_respond(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    int status = (int)luaL_checkinteger(L, 2);
    size_t blen = 0;
    const char *body = luaL_optlstring(L, 4, "", &blen);
    if (x->state != SGLR_X_HANDLING) {
        if (!x->conn) {          /* the client left: nothing to answer */
            lua_pushboolean(L, 0);
            return 1;
        }
        return luaL_error(L, "response already started");
    }
    sglr_buf_t hb = sglr_lua_scratch_take();
    const char *err = sglr_lua_table_headers(L, 3, &hb);
    if (err) {
        sglr_lua_scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    int r = sglr_exchange_respond(x, status, hb.data ? hb.data : "", hb.len, body, blen);
    sglr_lua_scratch_give(&hb);
    lua_pushboolean(L, r == 0);
    return 1;
}

static int x_start(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    int status = (int)luaL_checkinteger(L, 2);
    long long clen = (long long)luaL_optnumber(L, 4, -1);
    if (x->state != SGLR_X_HANDLING) {
        if (!x->conn) {
            lua_pushboolean(L, 0);
            return 1;
        }
        return luaL_error(L, "response already started");
    }
    sglr_buf_t hb = sglr_lua_scratch_take();
    const char *err = sglr_lua_table_headers(L, 3, &hb);
    if (err) {
        sglr_lua_scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    int r = sglr_exchange_start(x, status, hb.data ? hb.data : "", hb.len, clen);
    sglr_lua_scratch_give(&hb);
    lua_pushboolean(L, r == 0);
    return 1;
}

/* A coroutine waiting for the client's write queue to drain. */
typedef struct {
    lua_State *co;
    int ref;
    int xref;                 /* the exchange userdata, pinned while waiting */
} drain_wait_t;

static void x_drain_wake(sglr_exchange_t *x)
{
    drain_wait_t *w = x->data;
    x->on_drain = NULL;
    x->on_close = NULL;
    x->data = NULL;
    if (!w)
        return;
    lua_State *co = w->co;
    int ref = w->ref;
    sglr_unref(w->xref);
    free(w);
    lua_pushboolean(co, x->conn != NULL);
    sglr_co_resume(co, ref, 1);
}

static int x_write(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    size_t n;
    const char *d = luaL_checklstring(L, 2, &n);
    if (x->state != SGLR_X_STREAMING)
        return luaL_error(L, "write before start or after finish");
    if (sglr_exchange_write(x, d, n) < 0) {
        lua_pushboolean(L, 0);
        return 1;
    }
    if (sglr_exchange_write_queue(x) > SGLR_WRITE_HIGH && !x->on_drain) {
        /* slow client: wait until it has taken most of what is queued */
        int ref = sglr_co_pin(L);        /* raises (before any allocation) */
        drain_wait_t *w = malloc(sizeof *w);
        if (!w) {
            sglr_co_unpin(ref);
            return luaL_error(L, "out of memory");
        }
        w->co = L;
        w->ref = ref;
        lua_pushvalue(L, 1);
        w->xref = sglr_ref(L);
        x->data = w;
        x->on_drain = x_drain_wake;
        x->on_close = x_drain_wake;
        return lua_yield(L, 0);
    }
    lua_pushboolean(L, x->conn != NULL);
    return 1;
}

static int x_finish(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    if (x->state == SGLR_X_STREAMING)
        sglr_exchange_finish(x);
    return 0;
}

static int x_abort(lua_State *L)
{
    sglr_exchange_abort(check_x(L));
    return 0;
}

static int x_closed(lua_State *L)
{
    lua_pushboolean(L, sglr_exchange_closed(check_x(L)));
    return 1;
}

static int x_state(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    static const char *const names[] = { "reading", "handling", "streaming", "done" };
    lua_pushstring(L, names[x->state & 3]);
    return 1;
}

static int x_status(lua_State *L)
{
    lua_pushinteger(L, check_x(L)->status);
    return 1;
}

static int x_started(lua_State *L)
{
    lua_pushnumber(L, check_x(L)->start_ms);
    return 1;
}

static int x_bytes_out(lua_State *L)
{
    lua_pushnumber(L, (double)check_x(L)->bytes_out);
    return 1;
}

static int x_gc(lua_State *L)
{
    void **box = sglr_lua_gc_box(L, EXCHANGE_MT);
    if (!box)
        return 0;
    sglr_exchange_t *x = *box;
    if (!x)
        return 0;
    *box = NULL;
    sglr_lua_box_done(L, 1, EXCHANGE_MT);        /* called by the request runner: no finalizer left to run */
    if (lua_touserdata(L, 1) == box_given && nbox_pool < BOX_POOL_MAX) {
        lua_pushvalue(L, 1);
        box_pool[nbox_pool++] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    box_given = NULL;
    /* Safety net: a handler that lost its exchange without answering. */
    if (x->state == SGLR_X_HANDLING) {
        static const char body[] =
            "{\"error\":{\"message\":\"request was not answered\",\"type\":\"internal_error\"}}";
        static const char hdr[] = "content-type: application/json\r\n";
        sglr_exchange_respond(x, 500, hdr, sizeof hdr - 1, body, sizeof body - 1);
    } else if (x->state == SGLR_X_STREAMING) {
        sglr_exchange_abort(x);
    }
    sglr_exchange_release(x);
    return 0;
}


/* core.body_bytes(): bytes of request bodies held by live exchanges */
static int l_body_bytes(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)sglr_exchange_body_bytes);
    return 1;
}

static int l_active(lua_State *L)
{
    lua_pushinteger(L, sglr_exchanges_active);
    return 1;
}

/* --- module part ------------------------------------------------------------------ */

void sglr_lua_open_server(lua_State *L)
{
    static const luaL_Reg server_m[] = {
        { "port", server_port }, { "close", server_close }, { "connections", server_conns },
        { NULL, NULL } };
    static const luaL_Reg x_m[] = {
        { "method", x_method }, { "url", x_url }, { "path", x_path }, { "header", x_header }, { "peer", x_peer },
        { "request_id", x_request_id },
        { "headers", x_headers }, { "body", x_body }, { "body_size", x_body_size },
        { "route_text", x_route_text },
        { "respond", x_respond }, { "start", x_start }, { "write", x_write },
        { "finish", x_finish }, { "abort", x_abort }, { "closed", x_closed },
        { "state", x_state }, { "status", x_status }, { "started", x_started },
        { "bytes_out", x_bytes_out }, { NULL, NULL } };
    static const luaL_Reg fns[] = {
        { "listen", l_listen }, { "active", l_active }, { "body_bytes", l_body_bytes },
        { NULL, NULL } };
    sglr_lua_new_mt(L, SERVER_MT, server_m, server_gc);
    sglr_lua_new_mt(L, EXCHANGE_MT, x_m, x_gc);
    luaL_register(L, NULL, fns);
}
