/*
 * lua_core.c: the `sglr.core` module: clock, sleep, coroutines, signals and
 * events (the scheduler), bound to Lua. The module also carries the HTTP
 * server (lua_server.c) and the proxy (lua_proxy.c), each bound in a file
 * of its own; luaopen_sglr_core below assembles the three.
 *
 * Userdata types, each a box around a C pointer (lua_common.h):
 *   sglr.event     -> event_t            (core.event(), this file)
 *   sglr.server    -> sglr_server_t      (core.listen, lua_server.c)
 *   sglr.exchange  -> sglr_exchange_t    (one per request, lua_server.c)
 *   sglr.pool      -> sglr_pool_t        (core.upstream(url), lua_proxy.c)
 *   sglr.response  -> one proxy leg      (x:forward / core.request, lua_proxy.c)
 *   sglr.pd        -> a prefill and a decode leg (x:forward_pd, lua_pd.c)
 *
 * The native log lines (core.log_line, logbuf.c) are bound in lua_log.c.
 */
#include "lua_common.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

static const char EVENT_MT[] = "sglr.event";

int sglr_exit_code;

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

static void sleep_cb(uv_timer_t *t)
{
    sleeper_t *s = t->data;
    uv_close((uv_handle_t *)&s->timer, sglr_lua_free_data_close_cb);
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

void sglr_random_alnum24(char *out)
{
    static const char alnum[64] =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    static uint64_t state;
    if (!state)
        state = uv_hrtime() ^ 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&state;
    /* xorshift64*: ids need to be unlikely to collide, not secret. A draw
     * is a 64-bit fraction whose first eight base-62 digits are the next
     * eight characters: each digit is the high word of the fraction times
     * 62, the low word the fraction left (one multiply a character, no
     * branch). A character is uniform over the 62 within 62^8 / 2^64
     * (about 1e-5). */
#ifdef __SIZEOF_INT128__
    for (int i = 0; i < 24; i += 8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        uint64_t v = state * 0x2545F4914F6CDD1Dull;
        for (int k = 0; k < 8; k++) {
            unsigned __int128 m = (unsigned __int128)v * 62;
            out[i + k] = alnum[(unsigned)(m >> 64)];
            v = (uint64_t)m;
        }
    }
#else
    /* no 128-bit product: four 16-bit slices a draw, each times 62 */
    for (int i = 0; i < 24; i += 4) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        uint64_t v = state * 0x2545F4914F6CDD1Dull;
        for (int k = 0; k < 4; k++, v >>= 16)
            out[i + k] = alnum[((v & 0xffff) * 62) >> 16];
    }
#endif
}

/* core.random_id(prefix) -> prefix .. 24 alphanumerics (request ids) */
static int l_random_id(lua_State *L)
{
    size_t plen;
    const char *prefix = luaL_optlstring(L, 1, "", &plen);
    if (plen > 64)
        return luaL_argerror(L, 1, "prefix too long");
    char out[64 + 24];
    memcpy(out, prefix, plen);
    sglr_random_alnum24(out + plen);
    lua_pushlstring(L, out, plen + 24);
    return 1;
}

static int l_exit(lua_State *L)
{
    sglr_exit_code = (int)luaL_optinteger(L, 1, 0);
    uv_stop(sglr_loop);
    return 0;
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
    sglr_lua_new_box(L, EVENT_MT, e);
    return 1;
}

/* ev:wait([timeout_ms]) -> true, value | nil, "timeout" */
static int event_wait(lua_State *L)
{
    event_t *e = sglr_lua_check_box(L, 1, EVENT_MT);
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
    event_t *e = sglr_lua_check_box(L, 1, EVENT_MT);
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
    event_t *e = sglr_lua_check_box(L, 1, EVENT_MT);
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
    uv_close((uv_handle_t *)&e->timer, sglr_lua_free_data_close_cb);
    return 0;
}

/* core.set_via(token): this router's hop token (see msg.h); "" turns it off */
static int l_set_via(lua_State *L)
{
    size_t n;
    const char *t = luaL_checklstring(L, 1, &n);
    if (n >= sizeof sglr_via_token)
        return luaL_argerror(L, 1, "token too long");
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)t[i] <= ' ' && t[i] != ' ')
            return luaL_argerror(L, 1, "token has control bytes");
    memcpy(sglr_via_token, t, n);
    sglr_via_token[n] = 0;
    sglr_via_len = n;
    return 0;
}

/* --- module ------------------------------------------------------------------------- */

int luaopen_sglr_core(lua_State *L)
{
    static const luaL_Reg event_m[] = {
        { "wait", event_wait }, { "set", event_set }, { "is_set", event_is_set },
        { NULL, NULL } };
    static const luaL_Reg fns[] = {
        { "now", l_now }, { "wall", l_wall }, { "sleep", l_sleep }, { "spawn", l_spawn },
        { "exit", l_exit }, { "log", l_log }, { "set_log_level", l_set_log_level },
        { "on_signal", l_on_signal }, { "event", l_event }, { "random_id", l_random_id },
        { "set_via", l_set_via },
        { NULL, NULL } };
    sglr_lua_new_mt(L, EVENT_MT, event_m, event_gc);
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    sglr_lua_open_server(L);
    sglr_lua_open_proxy(L);
    sglr_lua_open_pd(L);
    sglr_lua_open_log(L);
    return 1;
}
