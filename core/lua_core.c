/*
 * lua_core.c: the `sglr.core` module: clock, sleep, coroutines, signals, the
 * HTTP server (exchanges) and the proxy (forward / pipe / read), bound to Lua.
 *
 * Userdata types, each a box around a C pointer:
 *   sglr.server    -> sglr_server_t      (core.listen)
 *   sglr.exchange  -> sglr_exchange_t    (one per request, handler argument)
 *   sglr.pool      -> sglr_pool_t        (core.upstream(url), one per worker)
 *   sglr.response  -> fwd_t              (x:forward / core.request in flight)
 *
 * A forward is a small state machine around an upstream request:
 *
 *   forward() --yield--> WAIT_HEAD --on_head--> resume(resp)
 *   resp:pipe()  --yield--> streams body to the client --on_done--> resume(true|nil,err)
 *   resp:read()  --yield--> buffers the body          --on_done--> resume(body|nil,err)
 *
 * While C waits, the coroutine is pinned (sglr_co_pin) and the response
 * userdata is referenced from the registry, so neither is collected.
 */
#include "sglr.h"
#include "server.h"
#include "upstream.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

/* Type names double as type tags: each box records the address of its
 * name, so a type check is a pointer compare instead of a registry lookup
 * (luaL_checkudata) on every method call. */
static const char SERVER_MT[] = "sglr.server";
static const char EXCHANGE_MT[] = "sglr.exchange";
static const char POOL_MT[] = "sglr.pool";
static const char RESPONSE_MT[] = "sglr.response";
static const char EVENT_MT[] = "sglr.event";

typedef struct {
    void *p;                  /* first: __gc functions read it as void ** */
    const char *type;
} box_t;

int sglr_exit_code;

/* --- small helpers --------------------------------------------------------- */

static void *check_box(lua_State *L, int idx, const char *mt)
{
    box_t *b = lua_touserdata(L, idx);
    if (!b || lua_objlen(L, idx) != sizeof *b || b->type != mt)
        luaL_typerror(L, idx, mt);
    if (!b->p)
        luaL_error(L, "%s is closed", mt);
    return b->p;
}

static void **new_box(lua_State *L, const char *mt, void *p)
{
    box_t *b = lua_newuserdata(L, sizeof *b);
    b->p = p;
    b->type = mt;
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2);
    return &b->p;
}

/* One reusable buffer for header blocks built during a call: everything
 * that uses it copies the bytes before returning, and the loop runs one
 * call at a time. Taken and given back so a nested use cannot clobber it. */
static sglr_buf_t scratch;

static sglr_buf_t scratch_take(void)
{
    sglr_buf_t b = scratch;
    scratch = (sglr_buf_t){ 0 };
    b.len = 0;
    return b;
}

static void scratch_give(sglr_buf_t *b)
{
    if (!scratch.data && b->cap <= (64u << 10)) {
        scratch = *b;
        scratch.len = 0;
    } else {
        sglr_buf_free(b);
    }
    *b = (sglr_buf_t){ 0 };
}

/* Append a Lua table of headers {name = value} as "name: value\r\n" lines.
 * Names or values with CR/LF are refused (header injection). */
static const char *table_headers(lua_State *L, int idx, sglr_buf_t *b)
{
    if (lua_isnoneornil(L, idx))
        return NULL;
    if (!lua_istable(L, idx))
        return "headers must be a table";
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t kl, vl;
        const char *k = lua_tolstring(L, -2, &kl);
        if (lua_type(L, -2) != LUA_TSTRING || !(lua_type(L, -1) == LUA_TSTRING ||
                                                 lua_type(L, -1) == LUA_TNUMBER)) {
            lua_pop(L, 2);
            return "header names and values must be strings";
        }
        const char *v = lua_tolstring(L, -1, &vl);
        int bad = kl == 0;
        for (size_t i = 0; i < kl && !bad; i++)
            bad = k[i] == '\r' || k[i] == '\n' || k[i] == ':' || k[i] == 0 || k[i] == ' ';
        for (size_t i = 0; i < vl && !bad; i++)
            bad = v[i] == '\r' || v[i] == '\n' || v[i] == 0;
        if (bad) {
            lua_pop(L, 2);
            return "header contains a forbidden character";
        }
        if (sglr_buf_append(b, k, kl) || sglr_buf_append(b, ": ", 2) ||
            sglr_buf_append(b, v, vl) || sglr_buf_append(b, "\r\n", 2)) {
            lua_pop(L, 2);
            return "out of memory";
        }
        lua_pop(L, 1);
    }
    return NULL;
}

static void push_head_table(lua_State *L, const sglr_head_t *h)
{
    lua_createtable(L, 0, h->nhdrs);
    for (int i = 0; i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        lua_pushlstring(L, h->buf.data + hd->name_off, hd->name_len);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h->buf.data + hd->value_off, hd->value_len);
        } else {
            /* repeated header: join as the HTTP list form */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->buf.data + hd->value_off, hd->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
}

static int is_hop_header(const char *n, size_t len)
{
    static const struct { const char *name; size_t len; } hop[] = {
        { "connection", 10 }, { "keep-alive", 10 }, { "proxy-connection", 16 },
        { "transfer-encoding", 17 }, { "te", 2 }, { "trailer", 7 }, { "upgrade", 7 },
        { "host", 4 }, { "content-length", 14 }, { "expect", 6 },
    };
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (hop[i].len == len && n[0] == hop[i].name[0] && memcmp(hop[i].name, n, len) == 0)
            return 1;
    return 0;
}

/* Copy the headers of h that are not hop-by-hop and not overridden by the
 * Lua table at idx (keys must be lowercase there). The override names are
 * collected once, so no Lua string is made per header. */
static int copy_headers(lua_State *L, const sglr_head_t *h, int idx, sglr_buf_t *b)
{
    const char *skip[32];
    size_t skiplen[32];
    int nskip = 0;
    if (idx && lua_istable(L, idx)) {
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (lua_type(L, -2) == LUA_TSTRING && nskip < 32) {
                skip[nskip] = lua_tolstring(L, -2, &skiplen[nskip]);
                nskip++;
            }
            lua_pop(L, 1);
        }
    }
    for (int i = 0; i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        const char *n = h->buf.data + hd->name_off;
        if (is_hop_header(n, hd->name_len))
            continue;
        int overridden = 0;
        for (int k = 0; k < nskip && !overridden; k++)
            overridden = skiplen[k] == hd->name_len && memcmp(skip[k], n, skiplen[k]) == 0;
        if (overridden)
            continue;
        if (sglr_buf_append(b, n, hd->name_len) || sglr_buf_append(b, ": ", 2) ||
            sglr_buf_append(b, h->buf.data + hd->value_off, hd->value_len) ||
            sglr_buf_append(b, "\r\n", 2))
            return -ENOMEM;
    }
    return 0;
}

/* --- clock, sleep, spawn, exit ------------------------------------------------ */

static int l_now(lua_State *L)
{
    lua_pushnumber(L, sglr_now_ms());
    return 1;
}

static int l_wall(lua_State *L)
{
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    lua_pushnumber(L, (double)tv.tv_sec + tv.tv_usec / 1e6);
    return 1;
}

typedef struct {
    uv_timer_t timer;
    lua_State *co;
    int ref;
} sleeper_t;

/* Close callback of handles whose data is their malloc'd owner. */
static void free_data_close_cb(uv_handle_t *h)
{
    free(h->data);
}

static void sleep_cb(uv_timer_t *t)
{
    sleeper_t *s = t->data;
    uv_close((uv_handle_t *)&s->timer, free_data_close_cb);
    sglr_co_resume(s->co, s->ref, 0);
}

/* "Soon": work queued to run after the loop's next poll for I/O. A check
 * handle runs the batch right after the poll, and an idle handle, active
 * meanwhile, keeps that poll from blocking. Used by core.sleep(0) and to
 * wake event waiters. (A 0 ms timer would not do: libuv runs a timer that
 * is already due within the same timer pass, so a chain of "work, sleep(0)"
 * or of events set back and forth would never let I/O in.) */
typedef struct soon {
    void (*fn)(struct soon *);
    struct soon *next;
} soon_t;

static soon_t *soon_head;
static soon_t **soon_tail = &soon_head;
static uv_check_t soon_check;
static uv_idle_t soon_idle;
static int soon_ready;

static void soon_idle_cb(uv_idle_t *h)
{
    (void)h;            /* active only so that the poll does not block */
}

static void soon_run(uv_check_t *h)
{
    /* this iteration's batch; work queued meanwhile waits for the next */
    soon_t *q = soon_head;
    soon_head = NULL;
    soon_tail = &soon_head;
    uv_check_stop(h);
    uv_idle_stop(&soon_idle);
    while (q) {
        soon_t *next = q->next;
        q->fn(q);       /* may free q */
        q = next;
    }
}

/* Queue q, owned by the caller, to run fn(q) after the next poll. -1 when
 * the process is exiting (its handles are closed): nothing will run. */
static int soon_add(soon_t *q, void (*fn)(soon_t *))
{
    if (!soon_ready) {
        uv_check_init(sglr_loop, &soon_check);
        uv_idle_init(sglr_loop, &soon_idle);
        soon_ready = 1;
    } else if (uv_is_closing((uv_handle_t *)&soon_check)) {
        return -1;
    }
    q->fn = fn;
    q->next = NULL;
    *soon_tail = q;
    soon_tail = &q->next;
    uv_check_start(&soon_check, soon_run);
    uv_idle_start(&soon_idle, soon_idle_cb);
    return 0;
}

typedef struct {
    soon_t q;           /* first: the queue hands back &q */
    lua_State *co;
    int ref;
} yielder_t;

static void yield_resume(soon_t *q)
{
    yielder_t *y = (yielder_t *)q;
    lua_State *co = y->co;
    int ref = y->ref;
    free(y);
    sglr_co_resume(co, ref, 0);
}

static int yield_now(lua_State *L)
{
    int ref = sglr_co_pin(L);       /* raises outside a coroutine: before any allocation */
    yielder_t *y = malloc(sizeof *y);
    const char *err = !y ? "out of memory"
                    : soon_add(&y->q, yield_resume) < 0 ? "the loop is shutting down" : NULL;
    if (err) {
        free(y);
        sglr_co_unpin(ref);
        return luaL_error(L, "%s", err);
    }
    y->co = L;
    y->ref = ref;
    return lua_yield(L, 0);
}

static int l_sleep(lua_State *L)
{
    double ms = luaL_checknumber(L, 1);
    if (!(ms > 0))
        return yield_now(L);
    uint64_t t = sglr_timer_ms(ms);
    int ref = sglr_co_pin(L);
    sleeper_t *s = malloc(sizeof *s);
    if (!s) {
        sglr_co_unpin(ref);
        return luaL_error(L, "out of memory");
    }
    s->co = L;
    s->ref = ref;
    uv_timer_init(sglr_loop, &s->timer);
    s->timer.data = s;
    uv_timer_start(&s->timer, sleep_cb, t, 0);
    return lua_yield(L, 0);
}

/* core.spawn(fn, ...): run fn in a new coroutine now, until it first waits. */
static int l_spawn(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int n = lua_gettop(L);
    lua_State *co = lua_newthread(L);
    lua_insert(L, 1);
    lua_xmove(L, co, n);                  /* fn and args onto the thread */
    int ref = luaL_ref(L, LUA_REGISTRYINDEX);   /* pops the thread */
    sglr_co_resume(co, ref, n - 1);
    return 0;
}

/* core.random_id(prefix) -> prefix .. 24 alphanumerics (request ids) */
static int l_random_id(lua_State *L)
{
    static const char alnum[] =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static uint64_t state;
    size_t plen;
    const char *prefix = luaL_optlstring(L, 1, "", &plen);
    if (plen > 64)
        return luaL_argerror(L, 1, "prefix too long");
    if (!state)
        state = uv_hrtime() ^ 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&state;
    char out[64 + 24];
    memcpy(out, prefix, plen);
    for (int i = 0; i < 24; i++) {
        /* xorshift64*: ids need to be unlikely to collide, not secret */
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        uint64_t v = state * 0x2545F4914F6CDD1Dull;
        out[plen + i] = alnum[(v >> 32) % 62];
    }
    lua_pushlstring(L, out, plen + 24);
    return 1;
}

static int l_exit(lua_State *L)
{
    sglr_exit_code = (int)luaL_optinteger(L, 1, 0);
    uv_stop(sglr_loop);
    return 0;
}

static int l_active(lua_State *L)
{
    lua_pushinteger(L, sglr_exchanges_active);
    return 1;
}

static int l_log(lua_State *L)
{
    int level = (int)luaL_checkinteger(L, 1);
    const char *msg = luaL_checkstring(L, 2);
    sglr_log(level, "%s", msg);
    return 0;
}

static int l_set_log_level(lua_State *L)
{
    sglr_log_level = (int)luaL_checkinteger(L, 1);
    return 0;
}

/* --- signals -------------------------------------------------------------------- */

static int signal_ref = LUA_NOREF;
static uv_signal_t sig_int, sig_term;
static int signals_ready;

static void signal_cb(uv_signal_t *h, int signum)
{
    lua_State *L = sglr_L;
    if (signal_ref == LUA_NOREF)
        return;
    lua_State *co = lua_newthread(L);
    int ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_rawgeti(co, LUA_REGISTRYINDEX, signal_ref);
    lua_pushstring(co, signum == SIGINT ? "SIGINT" : "SIGTERM");
    sglr_co_resume(co, ref, 1);
}

static int l_on_signal(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (signal_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, signal_ref);
    lua_pushvalue(L, 1);
    signal_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (!signals_ready) {
        uv_signal_init(sglr_loop, &sig_int);
        uv_signal_init(sglr_loop, &sig_term);
        uv_signal_start(&sig_int, signal_cb, SIGINT);
        uv_signal_start(&sig_term, signal_cb, SIGTERM);
        /* signal watchers must not keep the loop alive on their own */
        uv_unref((uv_handle_t *)&sig_int);
        uv_unref((uv_handle_t *)&sig_term);
        signals_ready = 1;
    }
    return 0;
}

/* --- server ------------------------------------------------------------------- */

typedef struct {
    sglr_server_t srv;
    int handler_ref;
    int stopped;
    int lua_owned;          /* the userdata still points here */
    int closed;             /* the listener handle is closed */
} lserver_t;

static void push_exchange(lua_State *L, sglr_exchange_t *x)
{
    sglr_exchange_hold(x);
    new_box(L, EXCHANGE_MT, x);
}

/* Each request runs in a thread from the pool (bridge.c): the runner loop
 * below takes (handler, exchange) pairs and yields the idle token between
 * them, so a thread and its stack are reused instead of made per request. */
static const char runner_src[] =
    "local token, traceback, failed = ...\n"
    "local yield, xpcall = coroutine.yield, xpcall\n"
    "while true do\n"
    "  local handler, x = yield(token)\n"
    "  local ok, err = xpcall(handler, traceback, x)\n"
    "  if not ok then failed(x, err) end\n"
    "  handler, x, err = nil, nil, nil\n"
    "end\n";

/* A handler raised: log it, and answer the client now rather than when the
 * exchange happens to be collected. */
static int handler_failed(lua_State *L)
{
    box_t *b = lua_touserdata(L, 1);
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
    if (lua_resume(co, 3) != LUA_YIELD) {    /* runs up to its first yield */
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        return LUA_NOREF;
    }
    lua_settop(co, 0);
    *out = co;
    return ref;
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

/* core.listen(host, port, {max_body=, max_header=}, handler(x)) -> server */
static int l_listen(lua_State *L)
{
    const char *host = luaL_checkstring(L, 1);
    int port = (int)luaL_checkinteger(L, 2);
    luaL_checktype(L, 3, LUA_TTABLE);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    sglr_server_opts_t opts = { 256u << 20, 64u << 10 };
    lua_getfield(L, 3, "max_body");
    if (lua_isnumber(L, -1))
        opts.max_body = (size_t)lua_tonumber(L, -1);
    lua_getfield(L, 3, "max_header");
    if (lua_isnumber(L, -1))
        opts.max_header = (size_t)lua_tonumber(L, -1);
    lua_pop(L, 2);
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
    new_box(L, SERVER_MT, ls);
    return 1;
}

static int server_port(lua_State *L)
{
    lserver_t *ls = check_box(L, 1, SERVER_MT);
    lua_pushinteger(L, sglr_server_port(&ls->srv));
    return 1;
}

static int server_close(lua_State *L)
{
    lserver_t *ls = check_box(L, 1, SERVER_MT);
    if (!ls->stopped) {
        ls->stopped = 1;
        sglr_server_stop(&ls->srv, server_closed);
    }
    return 0;
}

static int server_conns(lua_State *L)
{
    lserver_t *ls = check_box(L, 1, SERVER_MT);
    lua_pushinteger(L, ls->srv.nconns);
    return 1;
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

static sglr_exchange_t *check_x(lua_State *L)
{
    return check_box(L, 1, EXCHANGE_MT);
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

static int x_headers(lua_State *L)
{
    push_head_table(L, &check_x(L)->head);
    return 1;
}

static int x_body(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    lua_pushlstring(L, x->body.data ? x->body.data : "", x->body.len);
    return 1;
}

const char *sglr_lua_body(lua_State *L, int idx, size_t *len)
{
    if (lua_type(L, idx) == LUA_TUSERDATA) {
        box_t *b = lua_touserdata(L, idx);
        if (lua_objlen(L, idx) == sizeof *b && b->type == EXCHANGE_MT && b->p) {
            sglr_exchange_t *x = b->p;
            *len = x->body.len;
            return x->body.data ? x->body.data : "";
        }
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
    sglr_buf_t hb = scratch_take();
    const char *err = table_headers(L, 3, &hb);
    if (err) {
        scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    int r = sglr_exchange_respond(x, status, hb.data ? hb.data : "", hb.len, body, blen);
    scratch_give(&hb);
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
    sglr_buf_t hb = scratch_take();
    const char *err = table_headers(L, 3, &hb);
    if (err) {
        scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    int r = sglr_exchange_start(x, status, hb.data ? hb.data : "", hb.len, clen);
    scratch_give(&hb);
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
    luaL_unref(sglr_L, LUA_REGISTRYINDEX, w->xref);
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
        w->xref = luaL_ref(L, LUA_REGISTRYINDEX);
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
    void **box = luaL_checkudata(L, 1, EXCHANGE_MT);
    sglr_exchange_t *x = *box;
    if (!x)
        return 0;
    *box = NULL;
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

/* --- pools ------------------------------------------------------------------------- */

static int l_upstream(lua_State *L)
{
    const char *url = luaL_checkstring(L, 1);
    const char *err = NULL;
    sglr_pool_t *p = sglr_pool_new(url, &err);
    if (!p) {
        lua_pushnil(L);
        lua_pushfstring(L, "invalid worker URL '%s': %s", url, err);
        return 2;
    }
    new_box(L, POOL_MT, p);
    return 1;
}

static int pool_gc(lua_State *L)
{
    void **box = luaL_checkudata(L, 1, POOL_MT);
    if (*box) {
        sglr_pool_unref(*box);
        *box = NULL;
    }
    return 0;
}

static int pool_url(lua_State *L)
{
    sglr_pool_t *p = check_box(L, 1, POOL_MT);
    lua_pushstring(L, p->url);
    return 1;
}

static int pool_stats(lua_State *L)
{
    sglr_pool_t *p = check_box(L, 1, POOL_MT);
    lua_createtable(L, 0, 3);
    lua_pushinteger(L, p->nidle);
    lua_setfield(L, -2, "idle");
    lua_pushinteger(L, p->nconns);
    lua_setfield(L, -2, "conns");
    lua_pushnumber(L, (lua_Number)p->replays);
    lua_setfield(L, -2, "replays");
    return 1;
}

/* --- forwarding ------------------------------------------------------------------ */

enum { FWD_HEAD, FWD_READY, FWD_PIPE, FWD_READ, FWD_REQUEST, FWD_DONE };

typedef struct {
    sglr_upreq_t *req;
    sglr_exchange_t *x;       /* NULL for core.request */
    int mode;
    int ud_ref;               /* registry ref of the response userdata */
    lua_State *co;            /* waiting coroutine, or NULL */
    int co_ref;
    int in_call;              /* inside the Lua call that would yield */
    int done, err;            /* outcome */
    int sync_done;            /* finished during in_call */
    int busy;                 /* inside a callback that may run Lua */
    int zombie;               /* collected while busy: free when not */
    sglr_buf_t body;          /* read / request modes */
    double t_body;            /* first body byte (ms) */
    int x_ref;                /* the exchange userdata, pinned while attached */
    long long max_body;
} fwd_t;

static void fwd_detach_x(fwd_t *f)
{
    if (f->x_ref != LUA_NOREF) {
        luaL_unref(sglr_L, LUA_REGISTRYINDEX, f->x_ref);
        f->x_ref = LUA_NOREF;
    }
    if (f->x) {
        if (f->x->data == f) {
            f->x->on_close = NULL;
            f->x->on_drain = NULL;
            f->x->data = NULL;
        }
        sglr_exchange_release(f->x);
        f->x = NULL;
    }
}

/* The registry ref keeps the response userdata alive while C waits for the
 * head; once it is handed to the coroutine, the coroutine's stack does. */
static void fwd_unref(fwd_t *f)
{
    if (f->ud_ref != LUA_NOREF) {
        luaL_unref(sglr_L, LUA_REGISTRYINDEX, f->ud_ref);
        f->ud_ref = LUA_NOREF;
    }
}

/* Resume the waiting coroutine with what its pending call returns. */
static void fwd_wake(fwd_t *f, int (*push)(lua_State *, fwd_t *))
{
    lua_State *co = f->co;
    if (!co)
        return;
    int ref = f->co_ref;
    f->co = NULL;
    f->co_ref = LUA_NOREF;
    int n = push(co, f);
    fwd_unref(f);
    sglr_co_resume(co, ref, n);
}

static int push_err(lua_State *L, fwd_t *f)
{
    lua_pushnil(L);
    lua_pushstring(L, f->err < 0 ? "client_closed" : sglr_up_errname(f->err));
    return 2;
}

static int push_response(lua_State *L, fwd_t *f)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->ud_ref);
    return 1;
}

static int push_pipe_result(lua_State *L, fwd_t *f)
{
    if (f->err)
        return push_err(L, f);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_read_result(lua_State *L, fwd_t *f)
{
    if (f->err)
        return push_err(L, f);
    lua_pushlstring(L, f->body.data ? f->body.data : "", f->body.len);
    return 1;
}

static int push_request_result(lua_State *L, fwd_t *f)
{
    if (f->err)
        return push_err(L, f);
    sglr_upreq_t *r = f->req;
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, r->status);
    lua_setfield(L, -2, "status");
    push_head_table(L, &r->head);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, f->body.data ? f->body.data : "", f->body.len);
    lua_setfield(L, -2, "body");
    lua_pushnumber(L, r->t_head - r->t_start);
    lua_setfield(L, -2, "ttfb_ms");
    lua_pushnumber(L, f->t_body ? f->t_body - r->t_start : -1);
    lua_setfield(L, -2, "first_body_ms");
    lua_pushnumber(L, sglr_now_ms() - r->t_start);
    lua_setfield(L, -2, "total_ms");
    return 1;
}

static void fwd_on_client_close(sglr_exchange_t *x)
{
    fwd_t *f = x->data;
    fwd_detach_x(f);
    if (f->done)
        return;
    f->done = 1;
    f->err = -1;
    if (f->req)
        sglr_upreq_abort(f->req);
    if (f->in_call) {
        f->sync_done = 1;
        return;
    }
    if (f->mode == FWD_HEAD)
        fwd_wake(f, push_err);
    else if (f->mode == FWD_PIPE)
        fwd_wake(f, push_pipe_result);
    else if (f->mode == FWD_READ)
        fwd_wake(f, push_read_result);
}

static void fwd_on_drain(sglr_exchange_t *x)
{
    fwd_t *f = x->data;
    if (f->req)
        sglr_upreq_throttle(f->req, 0);
}

static void fwd_on_head(sglr_upreq_t *r)
{
    fwd_t *f = r->data;
    if (f->mode == FWD_REQUEST) {
        sglr_upreq_continue(r);
        return;
    }
    f->mode = FWD_READY;
    fwd_wake(f, push_response);
}

static void fwd_on_body(sglr_upreq_t *r, const char *d, size_t n)
{
    fwd_t *f = r->data;
    if (f->t_body == 0)
        f->t_body = sglr_now_ms();
    if (f->mode == FWD_PIPE) {
        if (!f->x)
            return;
        /* a failed write closes the client, which wakes Lua, which may
         * drop (and collect) this response: keep f alive meanwhile */
        f->busy++;
        sglr_exchange_write(f->x, d, n);
        f->busy--;
        if (f->zombie) {
            if (!f->busy) {
                sglr_buf_free(&f->body);
                free(f);
            }
            return;
        }
        if (f->x && sglr_exchange_write_queue(f->x) > SGLR_WRITE_HIGH)
            sglr_upreq_throttle(r, 1);
        return;
    }
    if (f->max_body >= 0 && (long long)(f->body.len + n) > f->max_body) {
        sglr_upreq_fail(r, SGLR_UP_EPROTO);    /* on_done follows, with the error */
        return;
    }
    if (sglr_buf_append(&f->body, d, n))
        sglr_upreq_fail(r, SGLR_UP_ENOMEM);
}

static void fwd_on_done(sglr_upreq_t *r, int err)
{
    fwd_t *f = r->data;
    if (f->done)
        return;
    f->done = 1;
    f->err = err;
    int mode = f->mode;
    if (mode == FWD_PIPE && f->x) {
        if (err == 0)
            sglr_exchange_finish(f->x);
        /* on error the stream stays open: the caller may add an error event
         * (x:write) and then end it (x:finish or x:abort) */
    }
    fwd_detach_x(f);
    if (f->in_call) {
        f->sync_done = 1;
        return;
    }
    switch (mode) {
    case FWD_HEAD: fwd_wake(f, push_err); break;
    case FWD_PIPE: fwd_wake(f, push_pipe_result); break;
    case FWD_READ: fwd_wake(f, push_read_result); break;
    case FWD_REQUEST: fwd_wake(f, push_request_result); break;
    default: break;
    }
}

/* A timeout in ms from Lua: 0 means none, so a positive fraction of a
 * millisecond rounds up to 1 rather than down to "no timeout". */
static unsigned timeout_arg(double v)
{
    if (!(v > 0))
        return 0;
    if (v > 4e9)
        return 4000000000u;
    unsigned u = (unsigned)v;
    return u < v ? u + 1 : u;
}

/* The request line must not carry CR, LF, spaces or control bytes. */
static int bad_token(const char *p, size_t n)
{
    if (n == 0)
        return 1;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] <= ' ' || p[i] == 0x7f)
            return 1;
    return 0;
}

/* Build and start the upstream request for f; the response userdata (with
 * ud_ref) must already exist. Returns an error message or NULL. */
static const char *fwd_start(lua_State *L, fwd_t *f, sglr_pool_t *pool, int opts,
                             sglr_exchange_t *x)
{
    const char *method = x ? sglr_exchange_method(x) : "GET";
    const char *path = x ? x->head.buf.data + x->head.url_off : "/";
    size_t plen = x ? x->head.url_len : 1;
    const char *body = x ? x->body.data : NULL;
    size_t blen = x ? x->body.len : 0;
    unsigned connect_ms = 5000, timeout_ms = 600000;
    int hidx = 0;
    if (opts) {
        lua_getfield(L, opts, "method");
        if (lua_isstring(L, -1))
            method = lua_tostring(L, -1);
        lua_getfield(L, opts, "path");
        if (lua_isstring(L, -1))
            path = lua_tolstring(L, -1, &plen);
        lua_getfield(L, opts, "body");
        if (lua_isstring(L, -1))
            body = lua_tolstring(L, -1, &blen);
        lua_getfield(L, opts, "connect_timeout_ms");
        if (lua_isnumber(L, -1))
            connect_ms = timeout_arg(lua_tonumber(L, -1));
        lua_getfield(L, opts, "timeout_ms");
        if (lua_isnumber(L, -1))
            timeout_ms = timeout_arg(lua_tonumber(L, -1));
        lua_getfield(L, opts, "max_body");
        if (lua_isnumber(L, -1))
            f->max_body = (long long)lua_tonumber(L, -1);
        lua_getfield(L, opts, "headers");
        hidx = lua_gettop(L);
        /* strings above stay on the stack (anchored) until we return */
    }
    if (bad_token(method, strlen(method)) || bad_token(path, plen))
        return "invalid method or path for the upstream request";
    sglr_upreq_t *r = sglr_upreq_new(pool);
    if (!r)
        return "out of memory";
    r->data = f;
    r->on_head = fwd_on_head;
    r->on_body = fwd_on_body;
    r->on_done = fwd_on_done;
    f->req = r;
    sglr_buf_t hb = scratch_take();
    const char *err = NULL;
    if (x && copy_headers(L, &x->head, hidx, &hb))
        err = "out of memory";
    if (!err && hidx)
        err = table_headers(L, hidx, &hb);
    if (!err && sglr_upreq_build(r, method, path, plen, hb.data ? hb.data : "", hb.len,
                                 body, blen))
        err = "out of memory";
    scratch_give(&hb);
    if (err)
        return err;
    sglr_upreq_start(r, connect_ms, timeout_ms);
    return NULL;
}

static fwd_t *new_response(lua_State *L)
{
    fwd_t *f = calloc(1, sizeof *f);
    if (!f)
        return NULL;
    f->co_ref = LUA_NOREF;
    f->x_ref = LUA_NOREF;
    f->max_body = -1;
    new_box(L, RESPONSE_MT, f);
    lua_pushvalue(L, -1);
    f->ud_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return f;
}

/* Wait for f's outcome: return at once if it came during the call. */
static int fwd_wait(lua_State *L, fwd_t *f, int (*push)(lua_State *, fwd_t *))
{
    f->in_call = 0;
    if (f->sync_done) {
        f->sync_done = 0;
        int n = f->mode == FWD_HEAD ? push_err(L, f) : push(L, f);
        fwd_unref(f);
        return n;
    }
    f->co = L;
    f->co_ref = sglr_co_pin(L);
    if (f->ud_ref == LUA_NOREF) {
        /* pipe/read: keep the response alive while its coroutine waits */
        lua_pushvalue(L, 1);
        f->ud_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return lua_yield(L, 0);
}

/* x:forward(pool, opts) -> response | nil, err */
static int x_forward(lua_State *L)
{
    sglr_exchange_t *x = check_x(L);
    sglr_pool_t *pool = check_box(L, 2, POOL_MT);
    int opts = lua_istable(L, 3) ? 3 : 0;
    if (x->state != SGLR_X_HANDLING)
        return luaL_error(L, "forward after the response started");
    if (x->on_close)
        return luaL_error(L, "another forward is in flight on this exchange");
    if (!lua_pushthread(L)) {
        lua_pop(L, 1);
    } else {
        return luaL_error(L, "forward must run inside a coroutine");
    }
    if (sglr_exchange_closed(x)) {
        lua_pushnil(L);
        lua_pushliteral(L, "client_closed");
        return 2;
    }
    fwd_t *f = new_response(L);
    if (!f)
        return luaL_error(L, "out of memory");
    f->mode = FWD_HEAD;
    f->x = x;
    sglr_exchange_hold(x);
    /* while a forward is attached the exchange userdata must not be
     * collected (its finalizer would answer 500 under the forward) */
    lua_pushvalue(L, 1);
    f->x_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    x->data = f;
    x->on_close = fwd_on_client_close;
    x->on_drain = fwd_on_drain;
    f->in_call = 1;
    const char *err = fwd_start(L, f, pool, opts, x);
    if (err) {
        f->in_call = 0;
        f->done = 1;
        fwd_detach_x(f);
        fwd_unref(f);
        return luaL_error(L, "%s", err);
    }
    return fwd_wait(L, f, push_response);
}

/* core.request(pool, opts) -> {status, headers, body, ttfb_ms, total_ms} | nil, err */
static int l_request(lua_State *L)
{
    sglr_pool_t *pool = check_box(L, 1, POOL_MT);
    int opts = lua_istable(L, 2) ? 2 : 0;
    if (lua_pushthread(L))
        return luaL_error(L, "core.request must run inside a coroutine");
    lua_pop(L, 1);
    fwd_t *f = new_response(L);
    if (!f)
        return luaL_error(L, "out of memory");
    f->mode = FWD_REQUEST;
    f->in_call = 1;
    const char *err = fwd_start(L, f, pool, opts, NULL);
    if (err) {
        f->in_call = 0;
        f->done = 1;
        fwd_unref(f);
        return luaL_error(L, "%s", err);
    }
    return fwd_wait(L, f, push_request_result);
}

static fwd_t *check_resp(lua_State *L)
{
    return check_box(L, 1, RESPONSE_MT);
}

static int resp_status(lua_State *L)
{
    fwd_t *f = check_resp(L);
    lua_pushinteger(L, f->req ? f->req->status : 0);
    return 1;
}

static int resp_headers(lua_State *L)
{
    fwd_t *f = check_resp(L);
    if (!f->req)
        return 0;
    push_head_table(L, &f->req->head);
    return 1;
}

static int resp_header(lua_State *L)
{
    fwd_t *f = check_resp(L);
    size_t n;
    const char *v = f->req ? sglr_head_get(&f->req->head, luaL_checkstring(L, 2), &n) : NULL;
    if (v)
        lua_pushlstring(L, v, n);
    else
        lua_pushnil(L);
    return 1;
}

static int resp_ttfb(lua_State *L)
{
    fwd_t *f = check_resp(L);
    lua_pushnumber(L, f->req ? f->req->t_head - f->req->t_start : 0);
    return 1;
}

/* resp:pipe([extra_headers]) -> true | nil, err: stream the response to the
 * client; returns when it ended. */
static int resp_pipe(lua_State *L)
{
    fwd_t *f = check_resp(L);
    if (f->mode != FWD_READY)
        return luaL_error(L, "pipe: response is not waiting to be consumed");
    if (f->done || !f->x || sglr_exchange_closed(f->x)) {
        lua_pushnil(L);
        lua_pushliteral(L, "client_closed");
        return 2;
    }
    sglr_upreq_t *r = f->req;
    sglr_buf_t hb = scratch_take();
    const char *err = NULL;
    /* the worker's headers, minus framing, plus the caller's */
    if (copy_headers(L, &r->head, lua_istable(L, 2) ? 2 : 0, &hb))
        err = "out of memory";
    if (!err)
        err = table_headers(L, 2, &hb);
    if (err) {
        scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    f->mode = FWD_PIPE;
    f->in_call = 1;
    /* the head waits for what of the body is already here: one write */
    sglr_exchange_t *x = f->x;
    sglr_exchange_hold(x);
    sglr_exchange_cork(x);
    sglr_exchange_start(x, r->status, hb.data ? hb.data : "", hb.len, r->content_length);
    scratch_give(&hb);
    sglr_upreq_continue(r);
    sglr_exchange_uncork(x);
    sglr_exchange_release(x);
    return fwd_wait(L, f, push_pipe_result);
}

/* resp:read() -> body | nil, err: buffer the rest of the response. */
static int resp_read(lua_State *L)
{
    fwd_t *f = check_resp(L);
    if (f->mode != FWD_READY)
        return luaL_error(L, "read: response is not waiting to be consumed");
    if (f->done)
        return push_read_result(L, f);
    f->mode = FWD_READ;
    f->in_call = 1;
    sglr_upreq_continue(f->req);
    return fwd_wait(L, f, push_read_result);
}

static void fwd_close(fwd_t *f)
{
    fwd_detach_x(f);
    if (f->req) {
        sglr_upreq_free(f->req);
        f->req = NULL;
    }
}

/* resp:close(): drop the response (the worker connection is closed unless the
 * response was complete). */
static int resp_close(lua_State *L)
{
    fwd_t *f = check_resp(L);
    if (f->co)
        return luaL_error(L, "close: a coroutine is waiting on this response");
    f->done = 1;
    fwd_close(f);
    return 0;
}

static int resp_gc(lua_State *L)
{
    void **box = luaL_checkudata(L, 1, RESPONSE_MT);
    fwd_t *f = *box;
    if (!f)
        return 0;
    *box = NULL;
    fwd_close(f);
    if (f->busy) {
        f->zombie = 1;
        return 0;
    }
    sglr_buf_free(&f->body);
    free(f);
    return 0;
}


/* --- events: one coroutine waits, anyone sets ---------------------------------- */


typedef struct {
    soon_t wake;              /* first: the wake after set(), see soon_add */
    uv_timer_t timer;         /* timeout */
    lua_State *co;
    int co_ref;
    int val_ref;              /* value given to set() */
    int self_ref;             /* the userdata, pinned while a coroutine waits */
    int is_set;
    int waking;
    int closed;
} event_t;

static void event_resume(event_t *e)
{
    lua_State *co = e->co;
    if (!co)
        return;
    int ref = e->co_ref;
    e->co = NULL;
    e->co_ref = LUA_NOREF;
    e->waking = 0;
    /* the waiter's own stack holds the event from here on */
    int self_ref = e->self_ref;
    e->self_ref = LUA_NOREF;
    int n;
    if (e->is_set) {
        lua_pushboolean(co, 1);
        lua_rawgeti(co, LUA_REGISTRYINDEX, e->val_ref);
        n = 2;
    } else {
        lua_pushnil(co);
        lua_pushliteral(co, "timeout");
        n = 2;
    }
    if (self_ref != LUA_NOREF)
        luaL_unref(sglr_L, LUA_REGISTRYINDEX, self_ref);
    sglr_co_resume(co, ref, n);
}

/* the wait timed out */
static void event_fire(uv_timer_t *t)
{
    event_resume(t->data);
}

/* a set: the waiter pins the event (self_ref) until it is resumed */
static void event_wake(soon_t *q)
{
    event_resume((event_t *)q);
}

static int l_event(lua_State *L)
{
    event_t *e = calloc(1, sizeof *e);
    if (!e)
        return luaL_error(L, "out of memory");
    e->co_ref = LUA_NOREF;
    e->val_ref = LUA_NOREF;
    e->self_ref = LUA_NOREF;
    uv_timer_init(sglr_loop, &e->timer);
    e->timer.data = e;
    new_box(L, EVENT_MT, e);
    return 1;
}

/* ev:wait([timeout_ms]) -> true, value | nil, "timeout" */
static int event_wait(lua_State *L)
{
    event_t *e = check_box(L, 1, EVENT_MT);
    double ms = luaL_optnumber(L, 2, -1);
    if (e->co)
        return luaL_error(L, "another coroutine is waiting on this event");
    if (e->is_set) {
        lua_pushboolean(L, 1);
        lua_rawgeti(L, LUA_REGISTRYINDEX, e->val_ref);
        return 2;
    }
    e->co_ref = sglr_co_pin(L);
    e->co = L;
    /* a yielded call does not keep its arguments alive: pin the event so
     * that `core.event():wait()` cannot lose it to the collector */
    lua_pushvalue(L, 1);
    e->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (ms >= 0)
        uv_timer_start(&e->timer, event_fire, sglr_timer_ms(ms), 0);
    return lua_yield(L, 0);
}

/* ev:set([value]): wake the waiter (from the loop, never inside this call) */
static int event_set(lua_State *L)
{
    event_t *e = check_box(L, 1, EVENT_MT);
    if (e->is_set)
        return 0;
    e->is_set = 1;
    lua_settop(L, 2);
    e->val_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (e->co && !e->waking) {
        e->waking = 1;
        uv_timer_stop(&e->timer);
        soon_add(&e->wake, event_wake);     /* fails only while exiting */
    }
    return 0;
}

static int event_is_set(lua_State *L)
{
    event_t *e = check_box(L, 1, EVENT_MT);
    lua_pushboolean(L, e->is_set);
    return 1;
}

static int event_gc(lua_State *L)
{
    void **box = luaL_checkudata(L, 1, EVENT_MT);
    event_t *e = *box;
    if (!e)
        return 0;
    *box = NULL;
    /* a waiter pins the userdata (self_ref), so here nobody waits */
    if (e->val_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, e->val_ref);
    uv_close((uv_handle_t *)&e->timer, free_data_close_cb);
    return 0;
}

/* --- module ------------------------------------------------------------------------- */

static void new_mt(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc)
{
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    if (gc) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}

int luaopen_sglr_core(lua_State *L)
{
    static const luaL_Reg server_m[] = {
        { "port", server_port }, { "close", server_close }, { "connections", server_conns },
        { NULL, NULL } };
    static const luaL_Reg x_m[] = {
        { "method", x_method }, { "url", x_url }, { "path", x_path }, { "header", x_header },
        { "headers", x_headers }, { "body", x_body }, { "body_size", x_body_size },
        { "respond", x_respond }, { "start", x_start }, { "write", x_write },
        { "finish", x_finish }, { "abort", x_abort }, { "closed", x_closed },
        { "state", x_state }, { "status", x_status }, { "started", x_started },
        { "bytes_out", x_bytes_out }, { "forward", x_forward }, { NULL, NULL } };
    static const luaL_Reg pool_m[] = {
        { "url", pool_url }, { "stats", pool_stats }, { "close", pool_gc }, { NULL, NULL } };
    static const luaL_Reg resp_m[] = {
        { "status", resp_status }, { "headers", resp_headers }, { "header", resp_header },
        { "ttfb_ms", resp_ttfb }, { "pipe", resp_pipe }, { "read", resp_read },
        { "close", resp_close }, { NULL, NULL } };
    static const luaL_Reg fns[] = {
        { "now", l_now }, { "wall", l_wall }, { "sleep", l_sleep }, { "spawn", l_spawn },
        { "exit", l_exit }, { "active", l_active }, { "log", l_log },
        { "set_log_level", l_set_log_level }, { "on_signal", l_on_signal },
        { "listen", l_listen }, { "upstream", l_upstream }, { "request", l_request },
        { "event", l_event }, { "random_id", l_random_id },
        { NULL, NULL } };
    new_mt(L, SERVER_MT, server_m, server_gc);
    new_mt(L, EXCHANGE_MT, x_m, x_gc);
    new_mt(L, POOL_MT, pool_m, pool_gc);
    new_mt(L, RESPONSE_MT, resp_m, resp_gc);
    static const luaL_Reg event_m[] = {
        { "wait", event_wait }, { "set", event_set }, { "is_set", event_is_set },
        { NULL, NULL } };
    new_mt(L, EVENT_MT, event_m, event_gc);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    return 1;
}
