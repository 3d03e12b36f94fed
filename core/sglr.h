/*
 * sglr.h: what every core file shares: the one libuv loop, the main Lua
 * state, the coroutine bridge and logging.
 *
 * Coroutine bridge. Every request runs in its own Lua coroutine. A native
 * primitive that has to wait (forward to a worker, sleep, an HTTP call):
 *
 *     int ref = sglr_co_pin(L);          -- raises if L cannot yield
 *     ... start the work, remember (L, ref) ...
 *     return lua_yield(L, 0);
 *
 * and when the loop reports completion:
 *
 *     lua_pushxxx(co, ...);              -- n results onto the coroutine
 *     sglr_co_resume(co, ref, n);        -- unpins and resumes it
 *
 * A primitive never resumes synchronously from inside its own call: when the
 * answer is known at once it returns it without yielding.
 */
#ifndef SGLR_H
#define SGLR_H

#include <stdarg.h>
#include <stdint.h>
#include <uv.h>
#include <lua.h>
#include <lauxlib.h>

extern uv_loop_t *sglr_loop;
extern lua_State *sglr_L;

enum { SGLR_LOG_DEBUG = 0, SGLR_LOG_INFO, SGLR_LOG_WARN, SGLR_LOG_ERROR };
extern int sglr_log_level;
void sglr_log(int level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Pin the running coroutine L so it survives while C waits for the loop.
 * Raises a Lua error when L is the main thread (it cannot yield). */
int sglr_co_pin(lua_State *L);

/* Unpin and resume co with the nargs values already pushed on its stack.
 * Script errors are logged with a traceback; never raises. Returns the
 * lua_resume status (0 finished, LUA_YIELD waiting again, other = error). */
int sglr_co_resume(lua_State *co, int ref, int nargs);

/* Reusable handler threads (see bridge.c): take one at rest (returns its
 * ref and sets *co), or LUA_NOREF when none is pooled. */
extern char sglr_co_idle_token;
int sglr_co_pool_take(lua_State **co);

/* Drop a pinned coroutine without resuming it (its wait was abandoned). */
void sglr_co_unpin(int ref);

/* A handler thread referenced for its whole life (ref, from luaL_ref or
 * sglr_ref): its pins then cost no registry write. Returns the ref to
 * resume it with from now on (the same ref when no room is left). */
int sglr_co_keep(lua_State *co, int ref);

/* Registry references for the hot path: sglr_ref pops the value on top of
 * L's stack and returns its ref (LUA_REFNIL for nil), sglr_unref releases
 * it; read it back with lua_rawgeti(L, LUA_REGISTRYINDEX, ref). The same
 * contract as luaL_ref/luaL_unref at a fraction of the cost: a released
 * slot keeps false (not nil, so luaL_ref never hands it out) and goes back
 * to a free list kept in C. Either release works on either kind of ref. */
int sglr_ref(lua_State *L);
void sglr_unref(int ref);

/* The gateway for calls from C into Lua outside coroutines: pcall with a
 * traceback; errors are logged, never fatal. Returns the pcall status. */
int sglr_pcall(lua_State *L, int nargs, int nresults);
/* The same, and the error message (without the traceback) copied into
 * err, cap bytes at most, when it fails. */
int sglr_pcall_error(lua_State *L, int nargs, int nresults, char *err, size_t cap);

/* Milliseconds from a monotonic clock (uv_hrtime), with fractions. */
double sglr_now_ms(void);
/* The callback clock: sglr_now_ms() as of the callback running now. It
 * reads the clock at its first call after a tick and answers that reading
 * until the next tick; the loop ticks it before it polls and after, and
 * the read callbacks tick it where a client's or a worker's bytes arrive.
 * A request's timestamps (start, attempt, head, first body byte, end) are
 * taken with it: the times one callback records are one reading, about two
 * clock reads a request instead of a dozen. Not for timing work done
 * within one callback (use sglr_now_ms). */
double sglr_clock_ms(void);
void sglr_clock_tick(void);
/* Starts the loop's ticks (once the loop exists); stop closes their
 * handles (before uv_loop_close). */
void sglr_clock_start(void);
void sglr_clock_stop(void);
/* 24 random base-62 characters into out (request ids; not secret) */
void sglr_random_alnum24(char *out);
/* Now on the scale of uv_now() by the callback clock, for a request's
 * deadlines (seconds away: behind the real time by what this callback did
 * so far). */
uint64_t sglr_loop_now(void);
/* The uv_timer_start timeout for "ms from now in real time": at least 1, so
 * the timer never falls due within the timer pass that armed it. */
uint64_t sglr_timer_ms(double ms);

/* The bytes of argument idx: a string, or the request body of an exchange
 * (sglr.exchange userdata) without copying it into Lua. Raises otherwise. */
const char *sglr_lua_body(lua_State *L, int idx, size_t *len);
/* The live exchange (struct sglr_exchange_s) argument idx is, or NULL
 * (another value, or one whose exchange is gone). Never raises. */
struct sglr_exchange_s *sglr_lua_to_exchange(lua_State *L, int idx);
/* For C called through LuaJIT's FFI with an exchange's userdata (the box
 * FFI passes as void *): the live exchange, or NULL; its status (-1: no
 * live exchange); its request id (NULL when none, see
 * sglr_lua_x_set_request_id), *len its length. */
struct sglr_exchange_s *sglr_lua_ffi_exchange(void *b);
int sglr_lua_x_status(void *b);
const char *sglr_lua_x_rid(void *b, size_t *len);
/* The running request's box is held by nothing but the router (see
 * lua_server.c): kept for a later request once it is done. */
int sglr_lua_x_reuse(void *b);

/* One slot of the decision log. Its fields are written once, here:
 * lua/sglr/decisions.lua declares the struct to the FFI from
 * sglr_decision_cdef(), the same text. */
#define SGLR_DECISION_FIELDS \
    double t, matched, total, dmatched, dtotal; \
    int32_t attempt; \
    uint16_t route, pname, pversion, worker, reason, dpname, dpversion, dworker, dreason; \
    uint8_t has_shadow, idlen; \
    char id[63];
typedef struct { SGLR_DECISION_FIELDS } sglr_decision_t;

/* "typedef struct { ... } sglr_decision_t;" for the FFI */
const char *sglr_decision_cdef(void);

/* Write the first leg of a decision into a[i] in one call (the FFI's field
 * stores, where the JIT leaves them to the interpreter, cost thousands of
 * instructions). */
void sglr_decision_put(sglr_decision_t *a, int i, double t, int attempt, int route, int pname,
                       int pversion, int worker, int reason, double matched, double total);

/* The request id of a[i]: the one kept in x's exchange (x: its box, or
 * NULL), else id (idlen bytes), cut to 63 bytes. -> 0, or -1 when neither
 * gives one (the slot's id is then empty). */
int sglr_decision_put_id(sglr_decision_t *a, int i, void *x, const char *id, int idlen);
/* The routing text kept in exchange x (sglr.extract's check with keep):
 * its bytes, "" with *len 0 when none was kept. */
const char *sglr_exchange_text(const struct sglr_exchange_s *x, size_t *len);
/* A number naming that text (0 when none was kept): no other text, in
 * this exchange or another, gets the same. */
uint64_t sglr_exchange_text_serial(const struct sglr_exchange_s *x);

/* Register a module opener under package.preload[name]. */
void sglr_preload(lua_State *L, const char *name, lua_CFunction open);

#endif
