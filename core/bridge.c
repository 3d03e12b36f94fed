/*
 * bridge.c: the C/Lua boundary every binding shares: the loop and state
 * globals, the coroutine pin/resume pair, the pcall gateway and logging.
 */
#include "sglr.h"
#include "logbuf.h"

#include <math.h>
#include <stdlib.h>

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>

uv_loop_t *sglr_loop;
lua_State *sglr_L;
int sglr_log_level = SGLR_LOG_INFO;

static const char *level_names[] = { "debug", "info", "warn", "error" };

void sglr_log(int level, const char *fmt, ...)
{
    if (level < sglr_log_level)
        return;
    sglr_logbuf_flush();        /* lines queued before this one go first */
    char ts[32];
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s.%03dZ %-5s %s\n", ts, (int)(tv.tv_usec / 1000),
            level_names[level & 3], msg);
}

double sglr_now_ms(void)
{
    return (double)uv_hrtime() / 1e6;
}

static double clock_ms;
static int clock_fresh;
static uv_prepare_t clock_prepare;
static uv_check_t clock_check;

double sglr_clock_ms(void)
{
    if (!clock_fresh) {
        clock_ms = (double)uv_hrtime() / 1e6;
        clock_fresh = 1;
    }
    return clock_ms;
}

void sglr_clock_tick(void)
{
    clock_fresh = 0;
}

static void clock_prepare_cb(uv_prepare_t *h)
{
    (void)h;
    clock_fresh = 0;
}

static void clock_check_cb(uv_check_t *h)
{
    (void)h;
    clock_fresh = 0;
}

void sglr_clock_start(void)
{
    /* before the poll (it may block) and after it (timers run next) */
    uv_prepare_init(sglr_loop, &clock_prepare);
    uv_prepare_start(&clock_prepare, clock_prepare_cb);
    uv_unref((uv_handle_t *)&clock_prepare);
    uv_check_init(sglr_loop, &clock_check);
    uv_check_start(&clock_check, clock_check_cb);
    uv_unref((uv_handle_t *)&clock_check);
}

void sglr_clock_stop(void)
{
    if (!uv_is_closing((uv_handle_t *)&clock_prepare))
        uv_close((uv_handle_t *)&clock_prepare, NULL);
    if (!uv_is_closing((uv_handle_t *)&clock_check))
        uv_close((uv_handle_t *)&clock_check, NULL);
}

/* libuv's cached clock falls behind real time during a stretch of work in
 * a callback. Deadlines are set from the real time (on libuv's scale), and
 * the cached clock is never updated in a callback: that would make timers
 * due within the timer pass running now, and a chain of timers that re-arm
 * could then run on without the loop ever polling for I/O. */
static uint64_t loop_now(double real_ms)
{
    uint64_t cached = uv_now(sglr_loop);
    /* libuv's clock is whole milliseconds, rounded down: round up here,
     * so that a deadline is never earlier than asked */
    uint64_t real = (uint64_t)ceil(real_ms);
    return real > cached ? real : cached;
}

/* A request's deadlines (seconds away) take the callback clock: behind
 * the real time by what this callback did so far, microseconds. */
uint64_t sglr_loop_now(void)
{
    return loop_now(sglr_clock_ms());
}

uint64_t sglr_timer_ms(double ms)
{
    if (!(ms < 1e12))
        ms = 1e12;      /* about 30 years: "never", without overflowing */
    /* the real clock: a sleep or a timer is never shorter than asked */
    uint64_t due = loop_now(sglr_now_ms()) + (ms > 0 ? (uint64_t)ceil(ms) : 0);
    uint64_t now = uv_now(sglr_loop);
    return due > now ? due - now : 1;
}

/* Kept threads (sglr_co_keep): a pooled handler thread holds one registry
 * ref for its whole life, in a slot of this direct-mapped table found from
 * its lua_State. A pin of a kept thread returns its slot, encoded below
 * LUA_NOREF and LUA_REFNIL (so no caller mistakes it for either), and
 * neither the pin nor the resume touches the registry: two registry
 * writes a wait fewer. A thread whose slot is taken is pinned as any.
 * A kept thread that yields with no wait pending (a bare coroutine.yield
 * in a handler), or whose wait is abandoned (sglr_co_unpin while it is
 * suspended), is released: nothing would resume it, and it is collected
 * as any unpinned thread is (its exchange's finalizer answers 500). An
 * unpin of a running kept thread only undoes its pin (the wait did not
 * start). */
#define KEPT_SLOTS 4096
#define KEPT_ENC(slot) (-16 - (int)(slot))
#define KEPT_SLOT(ref) ((unsigned)(-16 - (ref)))
#define IS_KEPT(ref) ((ref) <= -16)
static struct {
    lua_State *co;
    int ref;
    int waiting;               /* pinned: a wait will resume it */
} kept[KEPT_SLOTS];

static unsigned kept_slot(const lua_State *co)
{
    uint64_t p = (uint64_t)(uintptr_t)co;
    return (unsigned)(((p >> 4) * 0x9E3779B97F4A7C15ull) >> 52);    /* 12 bits */
}

int sglr_co_keep(lua_State *co, int ref)
{
    unsigned s = kept_slot(co);
    if (kept[s].co)
        return ref;
    kept[s].co = co;
    kept[s].ref = ref;
    return KEPT_ENC(s);
}

/* A kept thread ended (or is dropped): its ref is released. */
static void kept_release(int enc)
{
    unsigned s = KEPT_SLOT(enc);
    int ref = kept[s].ref;
    kept[s].co = NULL;
    kept[s].ref = LUA_NOREF;
    kept[s].waiting = 0;
    sglr_unref(ref);
}

int sglr_co_pin(lua_State *L)
{
    if (lua_pushthread(L)) {
        lua_pop(L, 1);
        return luaL_error(L, "this call waits, so it must run inside a coroutine "
                             "(a request handler or core.spawn)");
    }
    /* Checked before the caller arms its wake-up: a yield that then failed
     * would leave a timer or queue entry to resume this coroutine later,
     * in the middle of some other wait. */
    if (!lua_isyieldable(L)) {
        lua_pop(L, 1);
        return luaL_error(L, "this call waits, and cannot from here: a C function "
                             "(such as table.sort's comparator or a gsub callback) is on the stack");
    }
    unsigned s = kept_slot(L);
    if (kept[s].co == L) {
        lua_pop(L, 1);
        kept[s].waiting = 1;
        return KEPT_ENC(s);
    }
    return sglr_ref(L);
}

void sglr_co_unpin(int ref)
{
    if (!IS_KEPT(ref)) {
        sglr_unref(ref);
        return;
    }
    unsigned s = KEPT_SLOT(ref);
    if (kept[s].co && lua_status(kept[s].co) == LUA_YIELD)
        kept_release(ref);              /* suspended, and now nothing resumes it */
    else
        kept[s].waiting = 0;            /* running on: the pin is undone */
}

/* Released registry slots, for sglr_ref to reuse. luaL_ref/luaL_unref cost
 * about 300 instructions each (several API calls on the registry's own
 * free list); a few pins a request made them a tenth of the proxy's
 * instructions outside Lua. */
static int *ref_free;
static int ref_nfree, ref_cap;

int sglr_ref(lua_State *L)
{
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return LUA_REFNIL;
    }
    if (ref_nfree == 0)
        return luaL_ref(L, LUA_REGISTRYINDEX);
    int ref = ref_free[--ref_nfree];
    lua_rawseti(L, LUA_REGISTRYINDEX, ref);
    return ref;
}

void sglr_unref(int ref)
{
    lua_State *L = sglr_L;
    if (!L || ref == LUA_NOREF || ref == LUA_REFNIL)
        return;
    if (ref_nfree == ref_cap) {
        int cap = ref_cap ? ref_cap * 2 : 256;
        int *p = realloc(ref_free, (size_t)cap * sizeof *p);
        if (!p) {
            luaL_unref(L, LUA_REGISTRYINDEX, ref);
            return;
        }
        ref_free = p;
        ref_cap = cap;
    }
    lua_pushboolean(L, 0);
    lua_rawseti(L, LUA_REGISTRYINDEX, ref);
    ref_free[ref_nfree++] = ref;
}

/* Handler threads at rest. A pooled thread runs a small Lua loop that
 * yields sglr_co_idle_token between requests; a primitive that waits yields
 * nothing. So a yield of exactly the token means "done, reuse me". */
char sglr_co_idle_token;
#define CO_POOL_MAX 1024
static struct { lua_State *co; int ref; } co_pool[CO_POOL_MAX];
static int co_npool;

int sglr_co_pool_take(lua_State **co)
{
    if (co_npool == 0)
        return LUA_NOREF;
    co_npool--;
    *co = co_pool[co_npool].co;
    return co_pool[co_npool].ref;
}

int sglr_co_resume(lua_State *co, int ref, int nargs)
{
    lua_State *L = sglr_L;
    if (IS_KEPT(ref)) {
        /* referenced all along: nothing to pin or unpin */
        kept[KEPT_SLOT(ref)].waiting = 0;
        int st = lua_resume(co, nargs);
        if (st == LUA_YIELD && lua_gettop(co) == 1 && lua_touserdata(co, 1) == &sglr_co_idle_token) {
            lua_settop(co, 0);
            if (co_npool < CO_POOL_MAX) {
                co_pool[co_npool].co = co;
                co_pool[co_npool].ref = ref;
                co_npool++;
                return st;
            }
            kept_release(ref);          /* no room at rest: collected */
        } else if (st == LUA_YIELD) {
            if (!kept[KEPT_SLOT(ref)].waiting)
                kept_release(ref);      /* yielded with no wait: nothing resumes it */
        } else {
            if (st != 0) {
                const char *msg = lua_tostring(co, -1);
                luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
                sglr_log(SGLR_LOG_ERROR, "script error: %s", lua_tostring(L, -1));
                lua_pop(L, 1);
            }
            kept_release(ref);          /* it ended */
        }
        return st;
    }
    /* Keep the thread referenced from the main stack while it runs: the
     * ref is released first so that a coroutine which finishes is freed. */
    lua_rawgeti(L, LUA_REGISTRYINDEX, ref);
    sglr_unref(ref);
    int st = lua_resume(co, nargs);
    if (st == LUA_YIELD && lua_gettop(co) == 1 && lua_touserdata(co, 1) == &sglr_co_idle_token) {
        lua_settop(co, 0);
        if (co_npool < CO_POOL_MAX) {
            co_pool[co_npool].co = co;
            co_pool[co_npool].ref = sglr_ref(L);   /* pops the thread */
            co_npool++;
            return st;
        }
    } else if (st != 0 && st != LUA_YIELD) {
        const char *msg = lua_tostring(co, -1);
        luaL_traceback(L, co, msg ? msg : "(error object is not a string)", 0);
        sglr_log(SGLR_LOG_ERROR, "script error: %s", lua_tostring(L, -1));
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return st;
}

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
    return 1;
}

int sglr_pcall_error(lua_State *L, int nargs, int nresults, char *err, size_t cap)
{
    int base = lua_gettop(L) - nargs;
    lua_pushcfunction(L, traceback);
    lua_insert(L, base);
    int st = lua_pcall(L, nargs, nresults, base);
    lua_remove(L, base);
    if (st != 0) {
        const char *msg = lua_tostring(L, -1);
        sglr_log(SGLR_LOG_ERROR, "script error: %s", msg);
        if (cap) {
            /* the message without the traceback the handler appended */
            const char *tb = msg ? strstr(msg, "\nstack traceback:") : NULL;
            size_t n = !msg ? 0 : tb ? (size_t)(tb - msg) : strlen(msg);
            if (n >= cap)
                n = cap - 1;
            if (n)
                memcpy(err, msg, n);
            err[n] = '\0';
        }
        lua_pop(L, 1);
    }
    return st;
}

int sglr_pcall(lua_State *L, int nargs, int nresults)
{
    return sglr_pcall_error(L, nargs, nresults, NULL, 0);
}

void sglr_preload(lua_State *L, const char *name, lua_CFunction open)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}
