/*
 * lua_pd.c: prefill/decode (PD) dispatch, bound to Lua: one client request,
 * two proxy legs (proxy.c), part of sglr.core.
 *
 *   x:pd_check(route) -> batch, flags | nil, message      (before picking)
 *   x:forward_pd(prefill_pool, decode_pool, opts[, prefill_rank, decode_rank])
 *       -> pd, prefill_status, decode_status | nil, err, leg
 *
 * The client's body is spliced once (splice.c: bootstrap_host, _port and a
 * fresh _room per request, arrays for a batch; then, for dp-aware workers,
 * each leg's data_parallel_rank) and sent to both workers at once. The
 * call returns when the attempt can be judged:
 *
 *   both heads known                      -> pd, pst, dst (decode waits at its head)
 *   the prefill's head is not 2xx          -> pd, pst, dst (dst 0 if not in yet)
 *   a leg failed (the other is cancelled)  -> nil, err, "prefill" | "decode"
 *
 * and then the caller either commits the decode response to the client
 * with pd:pipe(extra) (streamed as it comes; when logprobs were asked, the
 * prefill's meta_info.input_token_logprobs is prepended: per SSE event in a
 * stream, or into the whole body of a plain response), or reads a failed
 * leg's body (pd:read_prefill(), pd:read()) to answer with it or retry.
 * The prefill's own response is read and dropped unless the merge needs it.
 * Lua is resumed once per call; nothing per chunk. pd:pipe() returns how
 * each leg ended, for the breakers and loads (as pd:outcome() does), and
 * pd:close() frees the PD exchange at once.
 */
#include "lua_common.h"
#include "proxy.h"
#include "splice.h"
#include "extract.h"

#include <stdlib.h>
#include <string.h>

static const char PD_MT[] = "sglr.pd";

enum { PREFILL = 0, DECODE = 1 };
enum { PD_HEADS, PD_READY, PD_PIPE, PD_READ_PREFILL, PD_READ_DECODE, PD_DONE };

#define PREFILL_MAX_BODY (64 << 20)

enum { PD_LOGPROBS = 1, PD_OWN_BOOTSTRAP = 2 };

typedef struct lpd lpd_t;
typedef int (*push_fn)(lua_State *, lpd_t *);

struct lpd {
    sglr_leg_t *leg[2];
    int head[2];              /* the leg's head was seen */
    int mode;
    int logprobs;             /* the client asked for logprobs: merge */
    int wait_prefill;         /* pipe waits for the prefill's body */
    int plain_merge;          /* the decode body is read whole, then merged */
    int fail_leg;             /* the first leg that failed, or -1 */
    lua_State *co;
    int co_ref, ud_ref, x_ref;
    int in_call, sync_done;   /* a Lua call that would yield; it ended meanwhile */
    push_fn sync_push;
    int in_cb;                /* inside an engine callback: wakes wait for its end */
    push_fn deferred;
    sglr_buf_t hdrs;          /* the client's response head, for a late pipe */
    sglr_buf_t body;          /* the spliced body both legs send (unless ranked) */
    sglr_splice_sse_t sse;
    int sse_on;
    /* x:relay_pd with a pipe argument: the decode's response is passed on
     * at the heads unless held (SGLR_HOLD_*), and the call returns once
     * both legs ended */
    int autopipe, hold;
    sglr_commit_hdrs_t ch;    /* x-request-id and the extra headers for the commit */
    double t_head;            /* when the decode's head came */
};

/* What a closed PD exchange's box points to (pd:close()). */
static lpd_t closed_pd = { .mode = PD_DONE, .fail_leg = -1, .co_ref = LUA_NOREF,
                           .ud_ref = LUA_NOREF, .x_ref = LUA_NOREF,
                           .ch = { .extra_ref = LUA_NOREF } };

/* Freed PD exchanges are kept on a free list with their buffers (the
 * client's response head, the spliced body), so a steady stream of PD
 * requests allocates neither. Big buffers are not kept; sanitizer builds
 * keep nothing, so that a use after free is still caught. */
#ifndef SGLR_NO_FREELIST
#define PD_SPARE_MAX 64
#define PD_SPARE_BUF_MAX (64u << 10)
static lpd_t *pd_spare[PD_SPARE_MAX];
static int pd_nspare;
#endif

static lpd_t *pd_new(void)
{
#ifndef SGLR_NO_FREELIST
    if (pd_nspare > 0) {
        lpd_t *pd = pd_spare[--pd_nspare];
        sglr_buf_t hdrs = pd->hdrs, body = pd->body;
        memset(pd, 0, sizeof *pd);
        hdrs.len = body.len = 0;
        pd->hdrs = hdrs;
        pd->body = body;
        return pd;
    }
#endif
    return calloc(1, sizeof(lpd_t));
}

static void pd_release(lpd_t *pd)
{
#ifndef SGLR_NO_FREELIST
    if (pd_nspare < PD_SPARE_MAX && pd->hdrs.cap <= PD_SPARE_BUF_MAX &&
        pd->body.cap <= PD_SPARE_BUF_MAX) {
        pd_spare[pd_nspare++] = pd;
        return;
    }
#endif
    sglr_buf_free(&pd->hdrs);
    sglr_buf_free(&pd->body);
    free(pd);
}

static const char *leg_name(int i)
{
    return i == PREFILL ? "prefill" : "decode";
}

static const char *errname(int err)
{
    if (err == SGLR_PROXY_ECLIENT)
        return "client_closed";
    if (err == SGLR_PROXY_ECANCEL)
        return "cancelled";
    return sglr_up_errname(err);
}

static int ended(const lpd_t *pd, int i)
{
    return pd->leg[i]->state == SGLR_LEG_DONE;
}

static int ok2xx(const sglr_leg_t *leg)
{
    return leg->req && leg->req->status >= 200 && leg->req->status < 300;
}

static void unpin_x(lpd_t *pd)
{
    if (pd->x_ref != LUA_NOREF) {
        sglr_unref(pd->x_ref);
        pd->x_ref = LUA_NOREF;
    }
}

static void unref_ud(lpd_t *pd)
{
    if (pd->ud_ref != LUA_NOREF) {
        sglr_unref(pd->ud_ref);
        pd->ud_ref = LUA_NOREF;
    }
}

/* --- results ------------------------------------------------------------------ */

/* nil, err, leg: the first leg that failed (or, when the client left, the
 * decode's view of it) */
static int push_fail(lua_State *L, lpd_t *pd)
{
    int i = pd->fail_leg >= 0 ? pd->fail_leg : DECODE;
    lua_pushnil(L);
    lua_pushstring(L, errname(pd->leg[i]->err));
    lua_pushstring(L, leg_name(i));
    return 3;
}

static int head_status(const lpd_t *pd, int i)
{
    const sglr_upreq_t *r = pd->leg[i]->req;
    return r && pd->head[i] ? r->status : 0;
}

/* pd, the prefill's status, the decode's (0 while its head is not in) */
static int push_pd(lua_State *L, lpd_t *pd)
{
    if (pd->fail_leg >= 0 && !(pd->head[PREFILL] && !ok2xx(pd->leg[PREFILL])))
        return push_fail(L, pd);
    lua_rawgeti(L, LUA_REGISTRYINDEX, pd->ud_ref);
    lua_pushinteger(L, head_status(pd, PREFILL));
    lua_pushinteger(L, head_status(pd, DECODE));
    return 3;
}

static int push_body(lua_State *L, lpd_t *pd, int i)
{
    sglr_leg_t *leg = pd->leg[i];
    if (leg->err) {
        lua_pushnil(L);
        lua_pushstring(L, errname(leg->err));
        lua_pushstring(L, leg_name(i));
        return 3;
    }
    lua_pushlstring(L, leg->body.data ? leg->body.data : "", leg->body.len);
    return 1;
}

static int push_prefill_body(lua_State *L, lpd_t *pd)
{
    return push_body(L, pd, PREFILL);
}

static int push_decode_body(lua_State *L, lpd_t *pd)
{
    return push_body(L, pd, DECODE);
}

static void pd_cancel(lpd_t *pd);

/* A leg's outcome: "ok", an error name, or nil while it runs. */
static void push_outcome(lua_State *L, const sglr_leg_t *leg)
{
    if (leg->state != SGLR_LEG_DONE)
        lua_pushnil(L);
    else if (leg->err == 0)
        lua_pushliteral(L, "ok");
    else
        lua_pushstring(L, errname(leg->err));
}

/* the commit's result: true once the decode's response went out whole (else
 * nil, err, "decode"), then both legs' outcomes */
static int push_pipe(lua_State *L, lpd_t *pd)
{
    if (pd->leg[DECODE]->err) {
        push_body(L, pd, DECODE);
    } else {
        lua_pushboolean(L, 1);
        lua_pushnil(L);
        lua_pushnil(L);
    }
    push_outcome(L, pd->leg[PREFILL]);
    push_outcome(L, pd->leg[DECODE]);
    pd_cancel(pd);              /* both ended: their upstream requests go back now */
    return 5;
}

/* relay_pd's commit came to its end: pd, both statuses, when the decode's
 * head came, then pd:pipe's results */
static int push_piped(lua_State *L, lpd_t *pd)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, pd->ud_ref);
    lua_pushinteger(L, head_status(pd, PREFILL));
    lua_pushinteger(L, head_status(pd, DECODE));
    lua_pushnumber(L, pd->t_head);
    return 4 + push_pipe(L, pd);
}

/* What relay_pd kept for its commit, let go. */
static void autopipe_drop(lpd_t *pd)
{
    pd->autopipe = 0;
    sglr_commit_hdrs_drop(&pd->ch);
}

/* Resume the waiting coroutine with push's results. Inside a Lua call the
 * call returns them itself; inside an engine callback the wake waits for
 * the callback's end (flush), so Lua never runs under a frame of ours that
 * still uses pd. */
static void wake(lpd_t *pd, push_fn push)
{
    if (pd->in_call) {
        pd->sync_done = 1;
        pd->sync_push = push;
        return;
    }
    if (pd->in_cb) {
        pd->deferred = push;
        return;
    }
    lua_State *co = pd->co;
    if (!co)
        return;
    int ref = pd->co_ref;
    pd->co = NULL;
    pd->co_ref = LUA_NOREF;
    int n = push(co, pd);
    unref_ud(pd);
    sglr_co_resume(co, ref, n);
}

/* The last statement of an engine callback: the wake it deferred. */
static void flush(lpd_t *pd)
{
    push_fn push = pd->deferred;
    if (pd->in_cb || !push)
        return;
    pd->deferred = NULL;
    wake(pd, push);
}

static int wait_for(lua_State *L, lpd_t *pd, push_fn push)
{
    pd->in_call = 0;
    if (pd->sync_done) {
        pd->sync_done = 0;
        if (pd->sync_push)
            push = pd->sync_push;
        pd->sync_push = NULL;
        int n = push(L, pd);
        unref_ud(pd);
        return n;
    }
    pd->co = L;
    pd->co_ref = sglr_co_pin(L);
    if (pd->ud_ref == LUA_NOREF) {
        lua_pushvalue(L, 1);
        pd->ud_ref = sglr_ref(L);
    }
    return lua_yield(L, 0);
}

/* --- the commit ----------------------------------------------------------------- */

static int sse_filter(sglr_leg_t *leg, const char *d, size_t n, sglr_buf_t *out)
{
    lpd_t *pd = leg->data;
    if (d)
        return sglr_splice_sse_feed(&pd->sse, out, d, n);
    return sglr_splice_sse_close(&pd->sse, out);
}

static int is_sse(const sglr_leg_t *leg)
{
    size_t n;
    const char *v = sglr_head_get(&leg->req->head, "content-type", &n);
    return v && n >= 17 && strncasecmp(v, "text/event-stream", 17) == 0;
}

/* The prefill's JSON for the merge: its body, or the last event of its
 * stream. */
static void prefill_json(lpd_t *pd, const char **p, size_t *n)
{
    sglr_leg_t *leg = pd->leg[PREFILL];
    *p = leg->body.data ? leg->body.data : "";
    *n = leg->body.len;
    size_t off, len;
    if (is_sse(leg) && sglr_splice_sse_last(*p, *n, &off, &len) == 0) {
        *p += off;
        *n = len;
    }
}

/* Send the decode response (the prefill's body is here, if it was needed). */
static void start_pipe(lpd_t *pd)
{
    sglr_leg_t *d = pd->leg[DECODE];
    pd->wait_prefill = 0;
    if (d->state != SGLR_LEG_HEAD)
        return;                          /* it failed meanwhile */
    if (pd->logprobs && !pd->leg[PREFILL]->err) {
        const char *p;
        size_t n;
        prefill_json(pd, &p, &n);
        if (is_sse(d)) {
            sglr_splice_sse_init(&pd->sse, p, n);
            pd->sse_on = 1;
            d->filter = sse_filter;
        } else {
            /* a plain response: read it whole, merge, then answer */
            pd->plain_merge = 1;
            sglr_proxy_read(d);
            return;
        }
    }
    sglr_proxy_pipe(d, pd->hdrs.data ? pd->hdrs.data : "", pd->hdrs.len);
}

/* A plain decode response read whole: answer with it merged. */
static void finish_plain(lpd_t *pd)
{
    sglr_leg_t *d = pd->leg[DECODE];
    sglr_exchange_t *x = d->px->x;
    pd->plain_merge = 0;
    if (d->err || !x || x->state != SGLR_X_HANDLING)
        return;
    const char *p;
    size_t n;
    prefill_json(pd, &p, &n);
    sglr_buf_t out = { 0 };
    const char *body = d->body.data ? d->body.data : "";
    size_t blen = d->body.len;
    if (sglr_splice_merge_logprobs(&out, p, n, body, blen) == 0) {
        body = out.data ? out.data : "";
        blen = out.len;
    }
    sglr_exchange_respond(x, d->req->status, pd->hdrs.data ? pd->hdrs.data : "", pd->hdrs.len,
                          body, blen);
    sglr_buf_free(&out);
}

/* --- engine callbacks ----------------------------------------------------------- */

static int leg_index(const lpd_t *pd, const sglr_leg_t *leg)
{
    return leg == pd->leg[PREFILL] ? PREFILL : DECODE;
}

static void autopipe_commit(lpd_t *pd);

static void heads_check(lpd_t *pd)
{
    if (pd->mode != PD_HEADS || !pd->head[PREFILL])
        return;
    if (pd->head[DECODE] || !ok2xx(pd->leg[PREFILL])) {
        pd->mode = PD_READY;
        if (pd->autopipe && pd->fail_leg < 0 && ok2xx(pd->leg[PREFILL]) &&
            pd->leg[DECODE]->state == SGLR_LEG_HEAD &&
            !sglr_relay_holds(pd->hold, pd->leg[DECODE]->req->status))
            autopipe_commit(pd);
        else {
            autopipe_drop(pd);          /* the caller decides, as with relay_pd's heads */
            wake(pd, push_pd);
        }
    }
}

static void lpd_on_head(sglr_leg_t *leg)
{
    lpd_t *pd = leg->data;
    int i = leg_index(pd, leg);
    pd->head[i] = 1;
    pd->in_cb++;
    if (i == PREFILL) {
        /* the prefill's body is kept for an error answer or the merge */
        leg->discard = ok2xx(leg) && !pd->logprobs;
        sglr_proxy_read(leg);
    }
    heads_check(pd);
    pd->in_cb--;
    flush(pd);
}

static void lpd_on_end(sglr_leg_t *leg, int err)
{
    lpd_t *pd = leg->data;
    int i = leg_index(pd, leg);
    if (err && err != SGLR_PROXY_ECANCEL && pd->fail_leg < 0)
        pd->fail_leg = i;
    int both = ended(pd, PREFILL) && ended(pd, DECODE);
    if (both)
        unpin_x(pd);
    pd->in_cb++;
    switch (pd->mode) {
    case PD_HEADS:
        if (both && err) {
            autopipe_drop(pd);
            wake(pd, push_fail);
        }
        else
            heads_check(pd);       /* a prefill head may have been waiting */
        break;
    case PD_PIPE:
        if (i == PREFILL && pd->wait_prefill)
            start_pipe(pd);
        if (i == DECODE && pd->plain_merge)
            finish_plain(pd);
        if (pd->mode == PD_PIPE && ended(pd, PREFILL) && ended(pd, DECODE)) {
            pd->mode = PD_DONE;
            wake(pd, pd->autopipe ? push_piped : push_pipe);
        }
        break;
    case PD_READ_PREFILL:
        if (i == PREFILL) {
            pd->mode = PD_READY;
            wake(pd, push_prefill_body);
        }
        break;
    case PD_READ_DECODE:
        if (i == DECODE) {
            pd->mode = PD_READY;
            wake(pd, push_decode_body);
        }
        break;
    default:
        break;
    }
    pd->in_cb--;
    flush(pd);
}

/* relay_pd's commit, at the heads (an engine callback, or the call itself):
 * the decode's response goes to the client with x-request-id and the
 * caller's headers, as pd:pipe would send it. */
static void autopipe_commit(lpd_t *pd)
{
    sglr_leg_t *d = pd->leg[DECODE];
    lua_State *co = pd->co;
    pd->t_head = d->req->t_head;
    sglr_buf_reset(&pd->hdrs);
    const char *err = co ? sglr_commit_hdrs_merge(co, &pd->ch, &d->req->head, &pd->hdrs) : NULL;
    if (err || !co) {                 /* out of memory: the caller has the heads */
        autopipe_drop(pd);
        wake(pd, push_pd);
        return;
    }
    d->px->cancel_on_fail = 0;
    pd->mode = PD_PIPE;
    if (pd->logprobs && !ended(pd, PREFILL))
        pd->wait_prefill = 1;
    else
        start_pipe(pd);
    if (ended(pd, PREFILL) && ended(pd, DECODE) && pd->mode == PD_PIPE) {
        pd->mode = PD_DONE;
        wake(pd, push_piped);
    }
}

/* --- Lua calls --------------------------------------------------------------------- */

static const char *pd_refusal(int err)
{
    return err == -E2BIG ? "batch too large for PD dispatch (at most 65536 elements)"
                         : "the request cannot be split for PD dispatch: an empty batch, or "
                           "a batch field of mixed or wrong types";
}

/* x:pd_check(route) -> batch, flags | nil, message: whether the body can go
 * to a prefill and a decode worker (its batch shape), before any worker is
 * picked; the results feed forward_pd's opts.batch / opts.logprobs. flags:
 * PD_LOGPROBS (the client asked for logprobs) | PD_OWN_BOOTSTRAP (it sent
 * bootstrap fields of its own, which the splice must remove); a number
 * rather than two fields, as one more key would grow the opts table. */
static int x_pd_check(lua_State *L)
{
    sglr_exchange_t *x = sglr_lua_check_exchange(L, 1);
    size_t rlen;
    const char *rname = luaL_checklstring(L, 2, &rlen);
    int route = sglr_extract_route(rname, rlen);
    if (route < 0)
        return luaL_error(L, "pd_check: unknown route '%s'", rname);
    int logprobs = 0, own = 0;
    int batch = sglr_splice_request_ex(route, x->body.data ? x->body.data : "", x->body.len,
                                       &logprobs, &own);
    if (batch < 0) {
        lua_pushnil(L);
        lua_pushstring(L, pd_refusal(batch));
        return 2;
    }
    lua_pushinteger(L, batch);
    lua_pushinteger(L, (logprobs ? PD_LOGPROBS : 0) | (own ? PD_OWN_BOOTSTRAP : 0));
    return 2;
}

static lpd_t *check_pd(lua_State *L)
{
    return sglr_lua_check_box(L, 1, PD_MT);
}

/* x:forward_pd(prefill_pool, decode_pool, {route=, host=, port=, timeout_ms=,
 * connect_timeout_ms=, headers=, batch=, logprobs=}[, prefill_rank, decode_rank])
 * -> pd, prefill_status, decode_status | nil, err, leg (logprobs: a boolean,
 * or pd_check's flags)
 * (a leg's rank, when given, is spliced into its body as data_parallel_rank;
 * arguments rather than opts fields, which would cost every request)
 * err "bad_request" (with a message as the third value) when the body cannot
 * be split for PD (an empty or oversized batch). */
/* What a PD forward was told, from x:forward_pd's options table or
 * x:relay_pd's arguments. */
typedef struct {
    int route;
    const char *host;
    size_t hlen;
    int port;
    double timeout, connect;
    int hidx;                      /* Lua headers table (forward_pd), or 0 */
    const sglr_hpair_t *add;       /* C headers (relay_pd), or NULL */
    int nadd;
    int batch;                     /* -1: not known, found in the body */
    int logprobs, own;
    int pipe;                      /* relay_pd's hold + 1 (0: no commit at the heads) */
    int extra;                     /* its extra headers table, or 0 */
} pd_opts_t;

static int pd_go(lua_State *L, sglr_exchange_t *x, sglr_pool_t *pools[2], const int ranks[2],
                 pd_opts_t *o);

/* The checks both forms make before anything is sent -> 0, or the number
 * of values pushed (the client left) */
static int pd_precheck(lua_State *L, sglr_exchange_t *x, const char *name)
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
        lua_pushliteral(L, "decode");
        return 3;
    }
    return 0;
}

static int x_forward_pd(lua_State *L)
{
    sglr_exchange_t *x = sglr_lua_check_exchange(L, 1);
    sglr_pool_t *pools[2] = { sglr_lua_check_pool(L, 2), sglr_lua_check_pool(L, 3) };
    luaL_checktype(L, 4, LUA_TTABLE);
    int ranks[2] = { lua_isnumber(L, 5) ? (int)lua_tointeger(L, 5) : -1,
                     lua_isnumber(L, 6) ? (int)lua_tointeger(L, 6) : -1 };
    int n = pd_precheck(L, x, "forward_pd");
    if (n)
        return n;
    pd_opts_t o = { 0 };
    sglr_lua_getopt(L, 4, SGLR_KEY_ROUTE);
    size_t rlen;
    const char *rname = luaL_optlstring(L, -1, "generate", &rlen);
    o.route = sglr_extract_route(rname, rlen);
    sglr_lua_getopt(L, 4, SGLR_KEY_HOST);
    o.host = luaL_optlstring(L, -1, "", &o.hlen);
    sglr_lua_getopt(L, 4, SGLR_KEY_PORT);
    o.port = lua_isnumber(L, -1) ? (int)lua_tointeger(L, -1) : -1;
    sglr_lua_getopt(L, 4, SGLR_KEY_TIMEOUT_MS);
    o.timeout = luaL_optnumber(L, -1, 600000);
    sglr_lua_getopt(L, 4, SGLR_KEY_CONNECT_TIMEOUT_MS);
    o.connect = luaL_optnumber(L, -1, 5000);
    sglr_lua_getopt(L, 4, SGLR_KEY_HEADERS);
    o.hidx = lua_istable(L, -1) ? lua_gettop(L) : 0;
    if (o.route < 0)
        return luaL_error(L, "forward_pd: unknown route '%s'", rname);

    /* the batch and the logprobs flag, as x:pd_check found them (else
     * found in the body, in one pass) */
    o.batch = -1;
    sglr_lua_getopt(L, 4, SGLR_KEY_BATCH);
    sglr_lua_getopt(L, 4, SGLR_KEY_LOGPROBS);
    if (lua_isnumber(L, -2)) {
        o.batch = (int)lua_tointeger(L, -2);
        o.own = 1;
        if (lua_type(L, -1) == LUA_TNUMBER) {          /* pd_check's flags */
            int flags = (int)lua_tointeger(L, -1);
            o.logprobs = (flags & PD_LOGPROBS) != 0;
            o.own = (flags & PD_OWN_BOOTSTRAP) != 0;
        } else {
            o.logprobs = lua_toboolean(L, -1);
        }
        if (o.batch < 0 || o.batch > SGLR_SPLICE_MAX_BATCH)
            return luaL_error(L, "forward_pd: batch out of range");
    }
    return pd_go(L, x, pools, ranks, &o);
}

/* x:relay_pd(prefill_pool, decode_pool, prefill_rank, decode_rank, timeout_ms,
 * connect_timeout_ms, request_id, authorization, route, host, port, batch,
 * flags[, extra_headers, hold]) -> as x:forward_pd: the flow's PD forward,
 * without an options table read on every request. Ranks nil for none;
 * request_id nil or false for the id x keeps (x:request_id());
 * authorization a string (set), false (the client's dropped) or nil (the
 * client's passed); port nil or false for none; batch and flags as
 * x:pd_check returned them.
 * With hold (0 to 3, as x:relay_pipe's: what is kept for the caller) the
 * commit is made at the heads when the prefill answered 2xx and the
 * decode's status is not held: the decode's response goes to the client
 * with x-request-id and extra_headers (a table or nil) as pd:pipe sends it,
 * and the call returns once both legs ended:
 *   pd, prefill status, decode status, t_head, then pd:pipe's results
 * (t_head: when the decode's head came, in core.now()'s milliseconds).
 * Otherwise it returns as without hold (pd, statuses: no t_head), and pd:pipe
 * commits as before. */
static int x_relay_pd(lua_State *L)
{
    sglr_exchange_t *x = sglr_lua_check_exchange(L, 1);
    sglr_pool_t *pools[2] = { sglr_lua_check_pool(L, 2), sglr_lua_check_pool(L, 3) };
    int ranks[2] = { lua_isnumber(L, 4) ? (int)lua_tointeger(L, 4) : -1,
                     lua_isnumber(L, 5) ? (int)lua_tointeger(L, 5) : -1 };
    pd_opts_t o = { 0 };
    o.timeout = luaL_checknumber(L, 6);
    o.connect = luaL_checknumber(L, 7);
    sglr_hpair_t add[2];
    o.add = add;
    o.nadd = sglr_lua_relay_headers(L, 8, add, x);
    size_t rlen;
    const char *rname = luaL_checklstring(L, 10, &rlen);
    o.route = sglr_extract_route(rname, rlen);
    if (o.route < 0)
        return luaL_error(L, "relay_pd: unknown route '%s'", rname);
    o.host = luaL_optlstring(L, 11, "", &o.hlen);
    o.port = lua_isnumber(L, 12) ? (int)lua_tointeger(L, 12) : -1;
    o.batch = (int)luaL_checkinteger(L, 13);
    int flags = (int)luaL_checkinteger(L, 14);
    if (o.batch < 0 || o.batch > SGLR_SPLICE_MAX_BATCH)
        return luaL_error(L, "relay_pd: batch out of range");
    o.logprobs = (flags & PD_LOGPROBS) != 0;
    o.own = (flags & PD_OWN_BOOTSTRAP) != 0;
    if (lua_isnumber(L, 16)) {
        int hold = (int)lua_tointeger(L, 16);
        if (hold < SGLR_HOLD_NONE || hold > SGLR_HOLD_ALL)
            return luaL_argerror(L, 16, "hold is 0, 1, 2 or 3");
        o.pipe = hold + 1;
        o.extra = sglr_lua_check_extra(L, 15);
    }
    int n = pd_precheck(L, x, "relay_pd");
    if (n)
        return n;
    return pd_go(L, x, pools, ranks, &o);
}

static int pd_go(lua_State *L, sglr_exchange_t *x, sglr_pool_t *pools[2], const int ranks[2],
                 pd_opts_t *o)
{
    const char *body = x->body.data ? x->body.data : "";
    int batch = o->batch, logprobs = o->logprobs, own = o->own;
    const char *host = o->host;
    size_t hlen = o->hlen;
    int port = o->port;
    double timeout = o->timeout, connect = o->connect;
    if (batch < 0) {
        own = 1;
        batch = sglr_splice_request_ex(o->route, body, x->body.len, &logprobs, &own);
    }
    if (batch < 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "bad_request");
        lua_pushstring(L, pd_refusal(batch));
        return 3;
    }
    size_t nrooms = batch ? (size_t)batch : 1;
    uint64_t room1, *rooms = nrooms == 1 ? &room1 : malloc(nrooms * sizeof *rooms);
    if (!rooms)
        return luaL_error(L, "out of memory");
    for (size_t i = 0; i < nrooms; i++)
        rooms[i] = sglr_splice_room();
    /* the body is spliced into the PD exchange's own buffer (kept from an
     * earlier request when one is spare) */
    lpd_t *pd = pd_new();
    if (!pd) {
        if (rooms != &room1)
            free(rooms);
        return luaL_error(L, "out of memory");
    }
    /* without bootstrap members of the client's own, the fields go before
     * the closing brace with no second pass over the body */
    int r = own ? -EINVAL
                : sglr_splice_bootstrap_append(&pd->body, body, x->body.len, host, hlen, port,
                                               rooms, nrooms, batch);
    if (r == -EINVAL)
        r = sglr_splice_bootstrap(&pd->body, body, x->body.len, host, hlen, port, rooms, nrooms,
                                  batch);
    if (rooms != &room1)
        free(rooms);
    if (r < 0) {
        pd_release(pd);
        if (r == -ENOMEM)
            return luaL_error(L, "out of memory");
        lua_pushnil(L);
        lua_pushliteral(L, "bad_request");
        lua_pushliteral(L, "the request cannot be split for PD dispatch");
        return 3;
    }

    sglr_proxy_t *px = sglr_proxy_new(x, 0);
    if (px) {
        pd->leg[PREFILL] = sglr_proxy_leg_new(px, pools[PREFILL]);
        pd->leg[DECODE] = pd->leg[PREFILL] ? sglr_proxy_leg_new(px, pools[DECODE]) : NULL;
        sglr_proxy_release(px);           /* the legs keep it */
    }
    if (!pd->leg[DECODE]) {
        if (pd->leg[PREFILL])
            sglr_proxy_leg_free(pd->leg[PREFILL]);
        pd_release(pd);
        return luaL_error(L, "out of memory");
    }
    pd->fail_leg = -1;
    pd->co_ref = pd->ud_ref = pd->x_ref = pd->ch.extra_ref = LUA_NOREF;
    pd->logprobs = logprobs;
    if (o->pipe) {
        pd->autopipe = 1;
        pd->hold = o->pipe - 1;
    }
    px->cancel_on_fail = 1;
    px->on_head = lpd_on_head;
    px->on_end = lpd_on_end;
    sglr_lua_new_box(L, PD_MT, pd);         /* from here the box owns pd */
    lua_pushvalue(L, -1);
    pd->ud_ref = sglr_ref(L);
    /* add[0] is the request id, checked */
    if (o->pipe && sglr_commit_hdrs_keep(L, &pd->ch, o->add[0].v, o->add[0].vl, o->extra) < 0) {
        unref_ud(pd);
        sglr_proxy_leg_cancel(pd->leg[PREFILL]);
        sglr_proxy_leg_cancel(pd->leg[DECODE]);
        return luaL_error(L, "out of memory");
    }
    /* both legs: x's method, path and headers (plus opts.headers), the
     * spliced body; with data-parallel ranks, each leg's own rank on top */
    sglr_buf_t hb = sglr_lua_scratch_take();
    sglr_buf_t ranked = { 0 };
    /* the body is sent by reference: pd outlives the legs' requests */
    const char *err = o->add ? sglr_head_merge(&x->head, o->add, o->nadd, &hb)
                             : sglr_lua_headers(L, &x->head, o->hidx, &hb);
    for (int i = 0; i < 2 && !err; i++) {
        const char *b = pd->body.data;
        size_t blen = pd->body.len;
        pd->leg[i]->data = pd;
        pd->leg[i]->max_body = PREFILL_MAX_BODY;
        if (ranks[i] >= 0) {
            sglr_buf_reset(&ranked);
            /* the bootstrap splice made a valid object: only memory can fail */
            if (sglr_splice_rank(&ranked, pd->body.data, pd->body.len, ranks[i]) < 0) {
                err = "out of memory";
                break;
            }
            b = ranked.data;
            blen = ranked.len;
        }
        /* without the logprob merge nothing reads a 2xx prefill's
         * header fields (a refusal's content-type is read) */
        pd->leg[i]->req->skip_ok_fields = i == PREFILL && !logprobs;
        if ((ranks[i] >= 0 ? sglr_upreq_build : sglr_upreq_build_ref)(
                pd->leg[i]->req, sglr_exchange_method(x), x->head.buf.data + x->head.url_off,
                x->head.url_len, hb.data ? hb.data : "", hb.len, b ? b : "", blen))
            err = "out of memory";
    }
    sglr_lua_scratch_give(&hb);
    sglr_buf_free(&ranked);
    if (err) {
        unref_ud(pd);
        sglr_proxy_leg_cancel(pd->leg[PREFILL]);
        sglr_proxy_leg_cancel(pd->leg[DECODE]);
        return luaL_error(L, "%s", err);
    }
    lua_pushvalue(L, 1);
    pd->x_ref = sglr_ref(L);
    unsigned t = timeout > 0 ? (unsigned)(timeout + 0.999) : 0;
    unsigned c = connect > 0 ? (unsigned)(connect + 0.999) : 0;
    pd->in_call = 1;
    sglr_proxy_leg_start(pd->leg[PREFILL], c, t);
    sglr_proxy_leg_start(pd->leg[DECODE], c, t);
    return wait_for(L, pd, push_pd);
}

static int pd_status_of(lua_State *L, int i)
{
    lpd_t *pd = check_pd(L);
    lua_pushinteger(L, pd == &closed_pd ? 0 : head_status(pd, i));
    return 1;
}

static int pd_status(lua_State *L) { return pd_status_of(L, DECODE); }
static int pd_prefill_status(lua_State *L) { return pd_status_of(L, PREFILL); }

static int pd_header_of(lua_State *L, int i)
{
    lpd_t *pd = check_pd(L);
    sglr_upreq_t *r = pd == &closed_pd ? NULL : pd->leg[i]->req;
    size_t n;
    const char *v = r && pd->head[i] ? sglr_head_get(&r->head, luaL_checkstring(L, 2), &n) : NULL;
    if (v)
        lua_pushlstring(L, v, n);
    else
        lua_pushnil(L);
    return 1;
}

static int pd_header(lua_State *L) { return pd_header_of(L, DECODE); }
static int pd_prefill_header(lua_State *L) { return pd_header_of(L, PREFILL); }

/* pd:read_prefill() -> body | nil, err, "prefill" */
static int pd_read_prefill(lua_State *L)
{
    lpd_t *pd = check_pd(L);
    if (pd->mode != PD_READY || pd->co)
        return luaL_error(L, "read_prefill: the PD exchange is not waiting");
    if (!pd->head[PREFILL] || ended(pd, PREFILL))
        return pd->head[PREFILL] ? push_prefill_body(L, pd) : push_fail(L, pd);
    pd->mode = PD_READ_PREFILL;
    pd->in_call = 1;
    return wait_for(L, pd, push_prefill_body);
}

/* pd:read() -> the decode's body | nil, err, "decode" (to retry or answer
 * with a decode error) */
static int pd_read(lua_State *L)
{
    lpd_t *pd = check_pd(L);
    sglr_leg_t *d = pd->leg[DECODE];
    if (pd->mode != PD_READY || pd->co)
        return luaL_error(L, "read: the PD exchange is not waiting");
    if (d->state != SGLR_LEG_HEAD)
        return push_body(L, pd, DECODE);
    pd->mode = PD_READ_DECODE;
    pd->in_call = 1;
    sglr_proxy_read(d);
    return wait_for(L, pd, push_decode_body);
}

/* pd:pipe([extra_headers [, request_id]]) -> true | nil, err, "decode"; then the prefill's
 * and the decode's outcomes (as pd:outcome()): send the decode's response
 * to the client (merged with the prefill's logprobs when asked); returns
 * once both legs have ended, their upstream requests released as
 * pd:close() does. */
static int pd_pipe(lua_State *L)
{
    lpd_t *pd = check_pd(L);
    sglr_leg_t *d = pd->leg[DECODE];
    if (pd->mode != PD_READY || pd->co)
        return luaL_error(L, "pipe: the PD exchange is not waiting");
    if (d->state != SGLR_LEG_HEAD)
        return push_body(L, pd, DECODE);
    sglr_buf_reset(&pd->hdrs);
    /* the decode's headers, minus framing, plus the caller's */
    const char *err = sglr_lua_headers_id(L, &d->req->head, lua_isnoneornil(L, 2) ? 0 : 2, 3, &pd->hdrs);
    if (err)
        return luaL_error(L, "%s", err);
    /* committed: a prefill that fails from here on no longer stops the
     * response the client is getting */
    d->px->cancel_on_fail = 0;
    pd->mode = PD_PIPE;
    pd->in_call = 1;
    if (pd->logprobs && !ended(pd, PREFILL))
        pd->wait_prefill = 1;            /* start_pipe runs at the prefill's end */
    else
        start_pipe(pd);
    if (ended(pd, PREFILL) && ended(pd, DECODE) && pd->mode == PD_PIPE) {
        pd->mode = PD_DONE;
        pd->sync_done = 1;
    }
    return wait_for(L, pd, push_pipe);
}

/* pd:outcome() -> prefill, decode: "ok", an error name, or nil while the
 * leg runs */
static int pd_outcome(lua_State *L)
{
    lpd_t *pd = check_pd(L);
    if (pd == &closed_pd) {
        lua_pushnil(L);
        lua_pushnil(L);
        return 2;
    }
    push_outcome(L, pd->leg[PREFILL]);
    push_outcome(L, pd->leg[DECODE]);
    return 2;
}

static void pd_cancel(lpd_t *pd)
{
    unpin_x(pd);
    sglr_proxy_leg_cancel(pd->leg[PREFILL]);
    sglr_proxy_leg_cancel(pd->leg[DECODE]);
}

static void pd_free(lpd_t *pd)
{
    unref_ud(pd);
    autopipe_drop(pd);
    pd_cancel(pd);
    sglr_proxy_leg_free(pd->leg[PREFILL]);
    sglr_proxy_leg_free(pd->leg[DECODE]);
    if (pd->sse_on)
        sglr_splice_sse_close(&pd->sse, NULL);
    pd_release(pd);                     /* the legs' requests, which sent its body, are gone */
}

/* pd:close(): what still runs is cancelled (connections closed) and the
 * PD exchange is freed now, not when the collector reaches its box, so its
 * legs' memory goes back with the request. From then on its statuses read
 * 0, its headers nil, outcome() nil, and read/pipe raise. */
static int pd_close(lua_State *L)
{
    lpd_t *pd = check_pd(L);
    if (pd == &closed_pd)
        return 0;
    if (pd->co)
        return luaL_error(L, "close: a coroutine is waiting on this PD exchange");
    ((sglr_box_t *)lua_touserdata(L, 1))->p = &closed_pd;
    sglr_lua_box_done(L, 1, PD_MT);
    pd_free(pd);
    return 0;
}

static int pd_gc(lua_State *L)
{
    void **box = sglr_lua_gc_box(L, PD_MT);
    if (!box)
        return 0;
    lpd_t *pd = *box;
    *box = NULL;
    if (pd && pd != &closed_pd)
        pd_free(pd);
    return 0;
}

/* --- module part ------------------------------------------------------------------ */

void sglr_lua_open_pd(lua_State *L)
{
    static const luaL_Reg pd_m[] = {
        { "status", pd_status }, { "prefill_status", pd_prefill_status },
        { "header", pd_header }, { "prefill_header", pd_prefill_header },
        { "read_prefill", pd_read_prefill }, { "read", pd_read }, { "pipe", pd_pipe },
        { "outcome", pd_outcome }, { "close", pd_close }, { NULL, NULL } };
    sglr_lua_new_mt(L, PD_MT, pd_m, pd_gc);
    luaL_getmetatable(L, sglr_lua_exchange_mt);
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, x_relay_pd);
    lua_setfield(L, -2, "relay_pd");
    lua_pushcfunction(L, x_forward_pd);
    lua_setfield(L, -2, "forward_pd");
    lua_pushcfunction(L, x_pd_check);
    lua_setfield(L, -2, "pd_check");
    lua_pop(L, 2);
}
