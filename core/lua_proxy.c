/*
 * lua_proxy.c: the proxy (proxy.c over upstream.c) bound to Lua, part of
 * sglr.core.
 *
 *   core.upstream(url) -> sglr.pool       keep-alive connections to a worker
 *   x:forward(pool, opts[, dp_rank]) -> response
 *                                         one leg for client exchange x (with
 *                                         data_parallel_rank spliced in)
 *   core.request(pool, opts) -> result    a request of the router's own
 *
 * A response is one proxy leg, waited on by the coroutine that made it:
 *
 *   forward() --yield--> HEAD --on_head--> resume(resp)          (READY)
 *   resp:pipe()  --yield--> streams the body to the client --on_end--> resume(true|nil,err)
 *   resp:read()  --yield--> buffers the body              --on_end--> resume(body|nil,err)
 *   resp:close()  frees the leg now (its exchange goes back to the spares
 *                 with the request); pipe and read raise after it
 *
 * While C waits, the coroutine is pinned (sglr_co_pin) and the response
 * userdata is referenced from the registry, so neither is collected. The
 * engine reports through plain C callbacks (lp_on_head, lp_on_end); only
 * this file turns them into coroutine resumes.
 */
#include "lua_common.h"
#include "proxy.h"
#include "splice.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char POOL_MT[] = "sglr.pool";
static const char RESPONSE_MT[] = "sglr.response";

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
    sglr_lua_new_box(L, POOL_MT, p);
    return 1;
}

struct sglr_pool_s *sglr_lua_check_pool(lua_State *L, int idx)
{
    return sglr_lua_check_box(L, idx, POOL_MT);
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
    sglr_pool_t *p = sglr_lua_check_box(L, 1, POOL_MT);
    lua_pushstring(L, p->url);
    return 1;
}

static int pool_stats(lua_State *L)
{
    sglr_pool_t *p = sglr_lua_check_box(L, 1, POOL_MT);
    char addr[64];
    lua_createtable(L, 0, 6);
    lua_pushinteger(L, p->nidle);
    lua_setfield(L, -2, "idle");
    lua_pushinteger(L, p->nconns);
    lua_setfield(L, -2, "conns");
    lua_pushnumber(L, (lua_Number)p->replays);
    lua_setfield(L, -2, "replays");
    /* the address dialled (absent until a host name has resolved), and
     * for a name its lookups and the last lookup's failure */
    if (*sglr_pool_address(p, addr)) {
        lua_pushstring(L, addr);
        lua_setfield(L, -2, "address");
    }
    if (p->host) {
        lua_pushnumber(L, (lua_Number)p->resolves);
        lua_setfield(L, -2, "resolves");
        if (p->resolve_err) {
            lua_pushstring(L, uv_strerror(p->resolve_err));
            lua_setfield(L, -2, "resolve_error");
        }
    }
    return 1;
}

/* --- responses: a leg and the coroutine waiting on it ------------------------------ */

enum { FWD_HEAD, FWD_READY, FWD_PIPE, FWD_READ, FWD_REQUEST, FWD_AUTOPIPE };

typedef struct {
    sglr_leg_t *leg;          /* the leg this is the data of */
    int closed;               /* resp:close() was called */
    int mode;
    int ud_ref;               /* registry ref of the response userdata */
    lua_State *co;            /* waiting coroutine, or NULL */
    int co_ref;
    int x_ref;                /* the exchange userdata, pinned while the leg runs */
    int in_call;              /* inside the Lua call that would yield */
    int sync_done;            /* the leg ended during in_call */
    /* x:relay_pipe: no response box unless the status is held for the
     * caller; the leg is piped at its head and freed when it ends */
    int autopipe;
    int hold;                 /* SGLR_HOLD_*: what is kept for the caller */
    sglr_commit_hdrs_t ch;    /* x-request-id and the extra headers for the commit */
    int status;               /* the head's, kept for the pipe's end */
    double t_head;
} lleg_t;

static void lleg_unpin_x(lleg_t *f)
{
    if (f->x_ref != LUA_NOREF) {
        sglr_unref(f->x_ref);
        f->x_ref = LUA_NOREF;
    }
}

/* The registry ref keeps the response userdata alive while C waits for the
 * head; once it is handed to the coroutine, the coroutine's stack does. */
static void lleg_unref(lleg_t *f)
{
    if (f->ud_ref != LUA_NOREF) {
        sglr_unref(f->ud_ref);
        f->ud_ref = LUA_NOREF;
    }
}

static int leg_done(const lleg_t *f)
{
    return f->leg->state == SGLR_LEG_DONE;
}

static const char *leg_errname(int err)
{
    if (err == SGLR_PROXY_ECLIENT)
        return "client_closed";
    if (err == SGLR_PROXY_ECANCEL)
        return "cancelled";
    return sglr_up_errname(err);
}

static int push_err(lua_State *L, lleg_t *f)
{
    lua_pushnil(L);
    lua_pushstring(L, leg_errname(f->leg->err));
    return 2;
}

static int push_response(lua_State *L, lleg_t *f)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->ud_ref);
    return 1;
}

static int push_pipe_result(lua_State *L, lleg_t *f)
{
    if (f->leg->err)
        return push_err(L, f);
    lua_pushboolean(L, 1);
    return 1;
}

static int push_read_result(lua_State *L, lleg_t *f)
{
    if (f->leg->err)
        return push_err(L, f);
    lua_pushlstring(L, f->leg->body.data ? f->leg->body.data : "", f->leg->body.len);
    return 1;
}

static int push_request_result(lua_State *L, lleg_t *f)
{
    if (f->leg->err)
        return push_err(L, f);
    sglr_leg_t *leg = f->leg;
    sglr_upreq_t *r = leg->req;
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, r->status);
    lua_setfield(L, -2, "status");
    sglr_lua_push_head(L, &r->head);
    lua_setfield(L, -2, "headers");
    lua_pushlstring(L, leg->body.data ? leg->body.data : "", leg->body.len);
    lua_setfield(L, -2, "body");
    lua_pushnumber(L, r->t_head - r->t_start);
    lua_setfield(L, -2, "ttfb_ms");
    lua_pushnumber(L, leg->t_body ? leg->t_body - r->t_start : -1);
    lua_setfield(L, -2, "first_body_ms");
    lua_pushnumber(L, sglr_clock_ms() - r->t_start);
    lua_setfield(L, -2, "total_ms");
    return 1;
}

static int (*const push_result[])(lua_State *, lleg_t *) = {
    [FWD_HEAD] = push_err, [FWD_READY] = NULL, [FWD_PIPE] = push_pipe_result,
    [FWD_READ] = push_read_result, [FWD_REQUEST] = push_request_result, [FWD_AUTOPIPE] = NULL,
};

/* Resume the waiting coroutine with what its pending call returns. */
static void lleg_wake(lleg_t *f, int (*push)(lua_State *, lleg_t *))
{
    lua_State *co = f->co;
    if (!co)
        return;
    int ref = f->co_ref;
    f->co = NULL;
    f->co_ref = LUA_NOREF;
    int n = push(co, f);
    lleg_unref(f);
    sglr_co_resume(co, ref, n);
}

static void autopipe_head(lleg_t *f);
static void autopipe_end(lleg_t *f);

static void lp_on_head(sglr_leg_t *leg)
{
    lleg_t *f = leg->data;
    f->mode = FWD_READY;
    if (f->autopipe)
        autopipe_head(f);
    else
        lleg_wake(f, push_response);
}

static void lp_on_end(sglr_leg_t *leg, int err)
{
    lleg_t *f = leg->data;
    lleg_unpin_x(f);
    if (f->in_call) {
        f->sync_done = 1;
        return;
    }
    if (f->autopipe)
        autopipe_end(f);
    else if (push_result[f->mode])
        lleg_wake(f, push_result[f->mode]);
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

/* A response userdata (pinned by ud_ref) with a leg to pool in a proxy of
 * its own for x (NULL: a request of the router's own). The leg carries f,
 * so a forward costs one allocation. Raises on OOM. */
static lleg_t *new_response(lua_State *L, sglr_exchange_t *x, sglr_pool_t *pool, int mode)
{
    sglr_proxy_t *px = sglr_proxy_new(x, sizeof(lleg_t));
    sglr_leg_t *leg = px ? sglr_proxy_leg_new(px, pool) : NULL;
    if (px)
        sglr_proxy_release(px);             /* the leg keeps it */
    if (!leg)
        luaL_error(L, "out of memory");
    px->on_head = lp_on_head;
    px->on_end = lp_on_end;
    leg->auto_read = mode == FWD_REQUEST;
    lleg_t *f = leg->data;
    f->leg = leg;
    f->co_ref = LUA_NOREF;
    f->x_ref = LUA_NOREF;
    f->ch.extra_ref = LUA_NOREF;
    f->mode = mode;
    if (mode == FWD_AUTOPIPE) {              /* x:relay_pipe: no box (yet) */
        f->mode = FWD_HEAD;
        f->autopipe = 1;
        f->ud_ref = LUA_NOREF;
        return f;
    }
    sglr_lua_new_box(L, RESPONSE_MT, f);     /* from here the box owns the leg */
    lua_pushvalue(L, -1);
    f->ud_ref = sglr_ref(L);
    return f;
}

/* Build and start f's upstream request from opts (a table index or 0) and
 * x's request, with data_parallel_rank spliced into the body when rank >= 0.
 * Returns an error message or NULL. */
static const char *leg_go(lua_State *L, lleg_t *f, sglr_exchange_t *x, const char *method,
                          const char *path, size_t plen, const char *body, size_t blen,
                          int borrowed, int rank, int hidx, const sglr_hpair_t *add, int nadd,
                          unsigned connect_ms, unsigned timeout_ms);

static const char *leg_start(lua_State *L, lleg_t *f, int opts, sglr_exchange_t *x, int rank)
{
    const char *method = x ? sglr_exchange_method(x) : "GET";
    const char *path = x ? x->head.buf.data + x->head.url_off : "/";
    size_t plen = x ? x->head.url_len : 1;
    const char *body = x ? x->body.data : NULL;
    size_t blen = x ? x->body.len : 0;
    /* the client's body is sent from where it is: the proxy holds the
     * exchange, so it outlives the leg's request */
    int borrowed = x != NULL;
    unsigned connect_ms = 5000, timeout_ms = 600000;
    int hidx = 0;
    if (opts) {
        sglr_lua_getopt(L, opts, SGLR_KEY_METHOD);
        if (lua_isstring(L, -1))
            method = lua_tostring(L, -1);
        sglr_lua_getopt(L, opts, SGLR_KEY_PATH);
        if (lua_isstring(L, -1))
            path = lua_tolstring(L, -1, &plen);
        sglr_lua_getopt(L, opts, SGLR_KEY_BODY);
        if (lua_isstring(L, -1)) {
            body = lua_tolstring(L, -1, &blen);
            borrowed = 0;               /* a Lua string: copied */
        }
        sglr_lua_getopt(L, opts, SGLR_KEY_CONNECT_TIMEOUT_MS);
        if (lua_isnumber(L, -1))
            connect_ms = timeout_arg(lua_tonumber(L, -1));
        sglr_lua_getopt(L, opts, SGLR_KEY_TIMEOUT_MS);
        if (lua_isnumber(L, -1))
            timeout_ms = timeout_arg(lua_tonumber(L, -1));
        sglr_lua_getopt(L, opts, SGLR_KEY_MAX_BODY);
        if (lua_isnumber(L, -1))
            f->leg->max_body = (long long)lua_tonumber(L, -1);
        sglr_lua_getopt(L, opts, SGLR_KEY_HEADERS);
        hidx = lua_gettop(L);
        /* strings above stay on the stack (anchored) until we return */
    }
    return leg_go(L, f, x, method, path, plen, body, blen, borrowed, rank, hidx, NULL, 0,
                  connect_ms, timeout_ms);
}

/* Build f's request (x's headers with the Lua table at hidx, or add[],
 * merged in) and start it. */
static const char *leg_go(lua_State *L, lleg_t *f, sglr_exchange_t *x, const char *method,
                          const char *path, size_t plen, const char *body, size_t blen,
                          int borrowed, int rank, int hidx, const sglr_hpair_t *add, int nadd,
                          unsigned connect_ms, unsigned timeout_ms)
{
    if (bad_token(method, strlen(method)) || bad_token(path, plen))
        return "invalid method or path for the upstream request";
    /* a data-parallel rank: the body with "data_parallel_rank" spliced in */
    sglr_buf_t ranked = { 0 };
    if (rank >= 0) {
        int r = sglr_splice_rank(&ranked, body ? body : "", blen, rank);
        if (r < 0) {
            sglr_buf_free(&ranked);
            return r == -ENOMEM ? "out of memory"
                                : "dp_rank: the request body is not a JSON object";
        }
        body = ranked.data ? ranked.data : "";
        blen = ranked.len;
        borrowed = 0;                   /* freed below: copied */
    }
    sglr_buf_t hb = sglr_lua_scratch_take();
    const char *err = add ? sglr_head_merge(x ? &x->head : NULL, add, nadd, &hb)
                          : sglr_lua_headers(L, x ? &x->head : NULL, hidx, &hb);
    if (!err && (borrowed ? sglr_upreq_build_ref : sglr_upreq_build)(f->leg->req, method, path,
                                 plen, hb.data ? hb.data : "", hb.len, body, blen))
        err = "out of memory";
    sglr_lua_scratch_give(&hb);
    sglr_buf_free(&ranked);
    if (err)
        return err;
    f->in_call = 1;
    sglr_proxy_leg_start(f->leg, connect_ms, timeout_ms);
    return NULL;
}

/* A start that failed before the leg ran: drop the leg, raise. */
static void autopipe_free(lleg_t *f);

static int start_failed(lua_State *L, lleg_t *f, const char *err)
{
    sglr_proxy_leg_cancel(f->leg);
    f->closed = 1;
    lleg_unpin_x(f);
    lleg_unref(f);
    if (f->autopipe)
        autopipe_free(f);               /* no box owns it */
    return luaL_error(L, "%s", err);
}

/* Wait for f's outcome: return at once if it came during the call. */
static int lleg_wait(lua_State *L, lleg_t *f, int (*push)(lua_State *, lleg_t *))
{
    f->in_call = 0;
    if (f->sync_done) {
        f->sync_done = 0;
        int n = f->mode == FWD_HEAD ? push_err(L, f) : push(L, f);
        lleg_unref(f);
        return n;
    }
    f->co = L;
    f->co_ref = sglr_co_pin(L);
    if (f->ud_ref == LUA_NOREF) {
        /* pipe/read: keep the response alive while its coroutine waits */
        lua_pushvalue(L, 1);
        f->ud_ref = sglr_ref(L);
    }
    return lua_yield(L, 0);
}

/* x:forward(pool, opts[, dp_rank]) -> response | nil, err. The rank is an
 * argument, not an opts field: a field lookup would cost every request. */
/* What x:forward and x:relay do before their request is built: the
 * checks, then a response box whose leg goes to pool, with the exchange
 * pinned (while the leg runs the exchange userdata must not be collected:
 * its finalizer would answer 500 under the forward) -> 0 and *out, or the
 * number of values pushed (nil, "client_closed": the client left) */
static int forward_begin(lua_State *L, sglr_exchange_t *x, sglr_pool_t *pool, const char *name,
                         int mode, lleg_t **out)
{
    if (x->state != SGLR_X_HANDLING)
        return luaL_error(L, "%s after the response started", name);
    if (x->on_close)
        return luaL_error(L, "another forward is in flight on this exchange");
    if (lua_pushthread(L))
        return luaL_error(L, "%s must run inside a coroutine", name);
    lua_pop(L, 1);
    if (sglr_exchange_closed(x)) {
        lua_pushnil(L);
        lua_pushliteral(L, "client_closed");
        return 2;
    }
    lleg_t *f = new_response(L, x, pool, mode);
    lua_pushvalue(L, 1);
    f->x_ref = sglr_ref(L);
    *out = f;
    return 0;
}

static int x_forward(lua_State *L)
{
    sglr_exchange_t *x = sglr_lua_check_exchange(L, 1);
    sglr_pool_t *pool = sglr_lua_check_box(L, 2, POOL_MT);
    int opts = lua_istable(L, 3) ? 3 : 0;
    int rank = lua_isnumber(L, 4) ? (int)lua_tointeger(L, 4) : -1;
    lleg_t *f;
    int n = forward_begin(L, x, pool, "forward", FWD_HEAD, &f);
    if (n)
        return n;
    const char *err = leg_start(L, f, opts, x, rank);
    if (err)
        return start_failed(L, f, err);
    return lleg_wait(L, f, push_response);
}

/* x:relay(pool, rank, timeout_ms, connect_timeout_ms, request_id [, authorization])
 * -> response | nil, err: x:forward of the client's method, path, headers
 * and body with x-request-id set (request_id nil or false: the id x keeps,
 * x:request_id()), and authorization set (a string),
 * dropped (false) or the client's (nil); rank nil or a dp rank. The
 * flow's forward: no options table read on every request. */
/* x:relay's and x:relay_pipe's first six arguments */
typedef struct {
    sglr_exchange_t *x;
    sglr_pool_t *pool;
    int rank;
    unsigned timeout_ms, connect_ms;
    sglr_hpair_t add[2];
    int nadd;
} relay_args_t;

static void relay_args(lua_State *L, relay_args_t *a)
{
    a->x = sglr_lua_check_exchange(L, 1);
    a->pool = sglr_lua_check_box(L, 2, POOL_MT);
    a->rank = lua_isnumber(L, 3) ? (int)lua_tointeger(L, 3) : -1;
    a->timeout_ms = timeout_arg(luaL_checknumber(L, 4));
    a->connect_ms = timeout_arg(luaL_checknumber(L, 5));
    a->nadd = sglr_lua_relay_headers(L, 6, a->add, a->x);
}

/* Build and start f's request: the client's method, path, headers and
 * body, as a says. */
static const char *relay_go(lua_State *L, lleg_t *f, relay_args_t *a)
{
    sglr_exchange_t *x = a->x;
    return leg_go(L, f, x, sglr_exchange_method(x), x->head.buf.data + x->head.url_off,
                  x->head.url_len, x->body.data, x->body.len, 1, a->rank, 0, a->add, a->nadd,
                  a->connect_ms, a->timeout_ms);
}

static int x_relay(lua_State *L)
{
    relay_args_t a;
    relay_args(L, &a);
    lleg_t *f;
    int n = forward_begin(L, a.x, a.pool, "relay", FWD_HEAD, &f);
    if (n)
        return n;
    const char *err = relay_go(L, f, &a);
    if (err)
        return start_failed(L, f, err);
    return lleg_wait(L, f, push_response);
}

/* --- x:relay_pipe ------------------------------------------------------------------ */

/* The leg of a relay_pipe that no box owns, with what it kept, freed. */
static void autopipe_free(lleg_t *f)
{
    sglr_commit_hdrs_drop(&f->ch);
    lleg_unpin_x(f);
    sglr_proxy_leg_free(f->leg);             /* f goes with it */
}

/* Resume relay_pipe's coroutine with the n values pushed on it, freeing
 * the leg first (unless a box was handed over: give_box). */
static void autopipe_resume(lleg_t *f, int n, int give_box)
{
    lua_State *co = f->co;
    int ref = f->co_ref;
    f->co = NULL;
    f->co_ref = LUA_NOREF;
    if (!give_box)
        autopipe_free(f);
    sglr_co_resume(co, ref, n);
}

/* The pipe ended: status, true | nil, err, and when the head came. */
static void autopipe_end(lleg_t *f)
{
    lua_State *co = f->co;
    if (!co)
        return;
    if (f->mode == FWD_HEAD) {               /* failed before its head */
        autopipe_resume(f, push_err(co, f), 0);
        return;
    }
    lua_pushinteger(co, f->status);
    if (push_pipe_result(co, f) == 1)
        lua_pushnil(co);
    lua_pushnumber(co, f->t_head);
    autopipe_resume(f, 4, 0);
}

/* The head came: hold it for the caller (status, a response box), or
 * pipe it to the client at once with the caller's headers. */
static void autopipe_head(lleg_t *f)
{
    lua_State *co = f->co;
    if (!co)
        return;
    sglr_leg_t *leg = f->leg;
    sglr_upreq_t *r = leg->req;
    f->status = r->status;
    f->t_head = r->t_head;
    if (sglr_relay_holds(f->hold, r->status)) {
        /* from here a box owns the leg, as x:relay's response */
        f->autopipe = 0;
        sglr_commit_hdrs_drop(&f->ch);
        lua_pushinteger(co, r->status);
        sglr_lua_new_box(co, RESPONSE_MT, f);
        lua_pushnil(co);
        lua_pushnumber(co, r->t_head);
        autopipe_resume(f, 4, 1);
        return;
    }
    if (leg_done(f) || !leg->px->x || sglr_exchange_closed(leg->px->x)) {
        f->mode = FWD_PIPE;
        lua_pushinteger(co, r->status);
        lua_pushnil(co);
        lua_pushliteral(co, "client_closed");
        lua_pushnumber(co, r->t_head);
        autopipe_resume(f, 4, 0);
        return;
    }
    /* the worker's headers, minus framing, plus the caller's (checked
     * when it called) */
    sglr_buf_t hb = sglr_lua_scratch_take();
    const char *err = sglr_commit_hdrs_merge(co, &f->ch, &r->head, &hb);
    if (err) {                                /* out of memory */
        sglr_lua_scratch_give(&hb);
        f->mode = FWD_PIPE;
        lua_pushinteger(co, r->status);
        lua_pushnil(co);
        lua_pushstring(co, err);
        lua_pushnumber(co, r->t_head);
        autopipe_resume(f, 4, 0);
        return;
    }
    f->mode = FWD_PIPE;
    f->in_call = 1;
    sglr_proxy_pipe(leg, hb.data ? hb.data : "", hb.len);
    sglr_lua_scratch_give(&hb);
    f->in_call = 0;
    if (f->sync_done) {
        f->sync_done = 0;
        autopipe_end(f);
    }
}

/* x:relay_pipe(pool, rank, timeout_ms, connect_timeout_ms, request_id,
 * authorization, extra_headers, hold) -> x:relay's request, whose response
 * is piped to the client as soon as its head is in, with x-request-id and
 * extra_headers (a table or nil) added, unless hold keeps its status for
 * the caller. No response box is made for a piped response. hold: nil or
 * false (pipe any status), 1 (keep 408, 429, 500, 502, 503 and 504: the
 * statuses retried), 2 (keep every status >= 400), 3 (keep any: the caller
 * hears of the head before it is passed on, as with x:relay). Returns
 *   nil, err                      the request failed before its head
 *   status, resp, nil, t_head     held: resp is a response (x:relay's)
 *   status, true, nil, t_head     piped to its end
 *   status, nil, err, t_head      piped, and the pipe failed (resp:pipe's err)
 * t_head: when the head came, in core.now()'s milliseconds. */
static int x_relay_pipe(lua_State *L)
{
    relay_args_t a;
    relay_args(L, &a);
    int extra = sglr_lua_check_extra(L, 8);
    int hold = lua_isnumber(L, 9) ? (int)lua_tointeger(L, 9) : SGLR_HOLD_NONE;
    if (hold < SGLR_HOLD_NONE || hold > SGLR_HOLD_ALL)
        return luaL_argerror(L, 9, "hold is nil, 1, 2 or 3");
    lleg_t *f;
    int n = forward_begin(L, a.x, a.pool, "relay_pipe", FWD_AUTOPIPE, &f);
    if (n)
        return n;
    f->hold = hold;
    /* add[0] is the request id, checked */
    if (sglr_commit_hdrs_keep(L, &f->ch, a.add[0].v, a.add[0].vl, extra) < 0)
        return start_failed(L, f, "out of memory");
    const char *err = relay_go(L, f, &a);
    if (err)
        return start_failed(L, f, err);
    /* wait for the head (no box to keep alive: nothing is referenced but
     * the coroutine) */
    f->in_call = 0;
    if (f->sync_done) {                       /* failed at its start */
        f->sync_done = 0;
        n = push_err(L, f);
        autopipe_free(f);
        return n;
    }
    f->co = L;
    f->co_ref = sglr_co_pin(L);
    return lua_yield(L, 0);
}

/* core.relay_held(status) -> whether x:relay_pipe's hold 1 keeps it */
static int l_relay_held(lua_State *L)
{
    lua_pushboolean(L, sglr_relay_held((int)luaL_checkinteger(L, 1)));
    return 1;
}

/* core.request(pool, opts) -> {status, headers, body, ttfb_ms, total_ms} | nil, err */
static int l_request(lua_State *L)
{
    sglr_pool_t *pool = sglr_lua_check_box(L, 1, POOL_MT);
    int opts = lua_istable(L, 2) ? 2 : 0;
    if (lua_pushthread(L))
        return luaL_error(L, "core.request must run inside a coroutine");
    lua_pop(L, 1);
    /* a client's request (sglr bench, health checks) times itself from
     * now, not from the start of a callback that may start many */
    sglr_clock_tick();
    lleg_t *f = new_response(L, NULL, pool, FWD_REQUEST);
    const char *err = leg_start(L, f, opts, NULL, -1);
    if (err)
        return start_failed(L, f, err);
    return lleg_wait(L, f, push_request_result);
}

static lleg_t *check_resp(lua_State *L)
{
    return sglr_lua_check_box(L, 1, RESPONSE_MT);
}

static sglr_upreq_t *resp_req(lua_State *L)
{
    lleg_t *f = check_resp(L);
    return f->closed ? NULL : f->leg->req;
}

static int resp_status(lua_State *L)
{
    sglr_upreq_t *r = resp_req(L);
    lua_pushinteger(L, r ? r->status : 0);
    return 1;
}

static int resp_headers(lua_State *L)
{
    sglr_upreq_t *r = resp_req(L);
    if (!r)
        return 0;
    sglr_lua_push_head(L, &r->head);
    return 1;
}

static int resp_header(lua_State *L)
{
    sglr_upreq_t *r = resp_req(L);
    size_t n;
    const char *v = r ? sglr_head_get(&r->head, luaL_checkstring(L, 2), &n) : NULL;
    if (v)
        lua_pushlstring(L, v, n);
    else
        lua_pushnil(L);
    return 1;
}

static int resp_ttfb(lua_State *L)
{
    sglr_upreq_t *r = resp_req(L);
    lua_pushnumber(L, r ? r->t_head - r->t_start : 0);
    return 1;
}

/* resp:pipe([extra_headers [, request_id]]) -> true | nil, err: stream the response to the
 * client; returns when it ended. A request_id string adds x-request-id
 * (unless extra_headers names it), so a request with nothing else to add
 * needs no table. */
static int resp_pipe(lua_State *L)
{
    lleg_t *f = check_resp(L);
    if (f->mode != FWD_READY)
        return luaL_error(L, "pipe: response is not waiting to be consumed");
    sglr_leg_t *leg = f->leg;
    if (leg_done(f) || !leg->px->x || sglr_exchange_closed(leg->px->x)) {
        lua_pushnil(L);
        lua_pushliteral(L, "client_closed");
        return 2;
    }
    sglr_buf_t hb = sglr_lua_scratch_take();
    /* the worker's headers, minus framing, plus the caller's */
    const char *err = sglr_lua_headers_id(L, &leg->req->head, lua_isnoneornil(L, 2) ? 0 : 2, 3, &hb);
    if (err) {
        sglr_lua_scratch_give(&hb);
        return luaL_error(L, "%s", err);
    }
    f->mode = FWD_PIPE;
    f->in_call = 1;
    sglr_proxy_pipe(leg, hb.data ? hb.data : "", hb.len);
    sglr_lua_scratch_give(&hb);
    return lleg_wait(L, f, push_pipe_result);
}

/* resp:read() -> body | nil, err: buffer the rest of the response. */
static int resp_read(lua_State *L)
{
    lleg_t *f = check_resp(L);
    if (f->mode != FWD_READY)
        return luaL_error(L, "read: response is not waiting to be consumed");
    if (leg_done(f))
        return push_read_result(L, f);
    f->mode = FWD_READ;
    f->in_call = 1;
    sglr_proxy_read(f->leg);
    return lleg_wait(L, f, push_read_result);
}

/* What a closed response's box points to: the leg is freed at close, not
 * when the collector gets to the box, so the exchange it holds goes back
 * to the server's spares with the request. Its methods answer as those
 * of a closed response did (status 0, no headers). */
static lleg_t closed_resp = { .closed = 1, .mode = FWD_HEAD, .ud_ref = LUA_NOREF,
                              .co_ref = LUA_NOREF, .x_ref = LUA_NOREF,
                              .ch = { .extra_ref = LUA_NOREF } };

/* resp:close(): drop the response (the worker connection is closed unless the
 * response was complete); pipe and read on it raise from then on. */
static int resp_close(lua_State *L)
{
    lleg_t *f = check_resp(L);
    if (f == &closed_resp)
        return 0;
    if (f->co)
        return luaL_error(L, "close: a coroutine is waiting on this response");
    f->closed = 1;
    lleg_unpin_x(f);
    lleg_unref(f);
    ((sglr_box_t *)lua_touserdata(L, 1))->p = &closed_resp;
    sglr_lua_box_done(L, 1, RESPONSE_MT);
    sglr_proxy_leg_free(f->leg);             /* f goes with it */
    return 0;
}

static int resp_gc(lua_State *L)
{
    void **box = sglr_lua_gc_box(L, RESPONSE_MT);
    if (!box)
        return 0;
    lleg_t *f = *box;
    *box = NULL;
    if (!f || f == &closed_resp)
        return 0;
    lleg_unpin_x(f);
    sglr_proxy_leg_free(f->leg);             /* f goes with it */
    return 0;
}

/* --- module part ------------------------------------------------------------------ */

void sglr_lua_open_proxy(lua_State *L)
{
    static const luaL_Reg pool_m[] = {
        { "url", pool_url }, { "stats", pool_stats }, { "close", pool_gc }, { NULL, NULL } };
    static const luaL_Reg resp_m[] = {
        { "status", resp_status }, { "headers", resp_headers }, { "header", resp_header },
        { "ttfb_ms", resp_ttfb }, { "pipe", resp_pipe }, { "read", resp_read },
        { "close", resp_close }, { NULL, NULL } };
    static const luaL_Reg fns[] = {
        { "upstream", l_upstream }, { "request", l_request }, { "relay_held", l_relay_held },
        { NULL, NULL } };
    sglr_lua_new_mt(L, POOL_MT, pool_m, pool_gc);
    sglr_lua_new_mt(L, RESPONSE_MT, resp_m, resp_gc);
    /* forward is an exchange method */
    luaL_getmetatable(L, sglr_lua_exchange_mt);
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, x_forward);
    lua_setfield(L, -2, "forward");
    lua_pushcfunction(L, x_relay);
    lua_setfield(L, -2, "relay");
    lua_pushcfunction(L, x_relay_pipe);
    lua_setfield(L, -2, "relay_pipe");
    lua_pop(L, 2);
    luaL_register(L, NULL, fns);
}
