/*
 * lua_extract.c: the request-body extractor (core/extract.c) for Lua.
 *
 *     local extract = require "sglr.extract"
 *     local info, err = extract.inspect("chat", body)  -- {stream=, model=} | nil, msg
 *     local text, err = extract.route_text("chat", body) -- string ("" when none)
 *
 * route_text returns "" and the message when the body is refused, so a
 * caller that only wants text for matching can use the first value as is.
 * Both functions share one extractor whose buffers live as long as the
 * module (a userdata upvalue, freed by __gc), so a call allocates nothing
 * but the result it hands to Lua.
 */
#include "extract.h"

#include "sglr.h"
#include "server.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <lua.h>
#include <lauxlib.h>

#define EXTRACT_MT "sglr.extract.state"

static sglr_route_t check_route(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    int route = sglr_extract_route(s, n);
    if (route < 0)
        luaL_argerror(L, 1, "route must be \"generate\", \"chat\" or \"completions\"");
    return (sglr_route_t)route;
}

static sglr_extract_t *state(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* Runs the extractor; on a refusal pushes the message and returns -1. */
static int run(lua_State *L, int flags)
{
    sglr_route_t route = check_route(L);
    size_t n;
    const char *body = sglr_lua_body(L, 2, &n);
    sglr_extract_t *x = state(L);
    int r = sglr_extract_run(x, route, body, n, flags);
    if (r == -ENOMEM)
        return luaL_error(L, "extract: out of memory");
    if (r < 0) {
        lua_pushstring(L, x->err);
        return -1;
    }
    return 0;
}

/* extract.inspect(route, body) -> { stream = bool, model = string|nil } | nil, err */
static int l_inspect(lua_State *L)
{
    if (run(L, 0) < 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    sglr_extract_t *x = state(L);
    lua_createtable(L, 0, 2);
    lua_pushboolean(L, x->stream);
    lua_setfield(L, -2, "stream");
    if (x->has_model) {
        lua_pushlstring(L, x->model, x->model_len);
        lua_setfield(L, -2, "model");
    }
    return 1;
}

/* extract.check(route, body) -> true, stream, model | nil, err: inspect
 * without a result table (the router calls it per request). */
/* At most max bytes of text (0: all), cut at a UTF-8 character boundary. */
static size_t text_cap(const char *t, size_t len, lua_Number max)
{
    if (!(max > 0) || (lua_Number)len <= max)
        return len;
    size_t n = (size_t)max;
    while (n > 0 && ((unsigned char)t[n] & 0xC0) == 0x80)
        n--;
    return n;
}

/* The routing text of the last run (at most max bytes) kept in exchange ex
 * for the radix tree -> 0 and *n its length | -ENOMEM */
static int keep_text(struct sglr_exchange_s *ex, sglr_extract_t *x, lua_Number max, size_t *n)
{
    *n = text_cap(x->text, x->text_len, max);
    /* the extractor's buffer that holds it goes to the exchange, which
     * gives its own (emptied) for the next run: a prompt is not copied.
     * Up to the size an exchange keeps between requests (16 KB): a larger
     * one would be freed with the exchange, and the extractor would grow
     * a small one again for each long prompt. */
    if (!(*n && sglr_extract_take_text(x, &ex->text, *n, 16u << 10) == 0)) {
        ex->text.len = 0;
        if (sglr_buf_append(&ex->text, x->text, *n))
            return -ENOMEM;
    }
    ex->has_text = 1;
    static uint64_t serial;
    ex->text_serial = ++serial;
    return 0;
}

/* extract.check(route, body_or_exchange [, max_text [, keep]]) -> true,
 * stream, model [, text] | nil, message. With max_text (a number; 0: no
 * cap) the routing text comes from the same pass, for a policy that reads
 * it. With keep, and an exchange, the text is kept in the exchange instead
 * (x:route_text(), and the radix tree reads it there) and its length in
 * bytes is the fourth result: no Lua string is made for it. */
static int l_check(lua_State *L)
{
    int want_text = lua_isnumber(L, 3);
    lua_Number max = want_text ? lua_tonumber(L, 3) : 0;
    if (run(L, want_text ? SGLR_EXTRACT_TEXT : 0) < 0) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    sglr_extract_t *x = state(L);
    lua_pushboolean(L, 1);
    lua_pushboolean(L, x->stream);
    if (x->has_model)
        lua_pushlstring(L, x->model, x->model_len);
    else
        lua_pushnil(L);
    if (!want_text)
        return 3;
    size_t n = text_cap(x->text, x->text_len, max);
    struct sglr_exchange_s *ex = lua_toboolean(L, 4) ? sglr_lua_to_exchange(L, 2) : NULL;
    if (ex) {
        if (keep_text(ex, x, max, &n) < 0)
            return luaL_error(L, "extract: out of memory");
        lua_pushinteger(L, (lua_Integer)n);
        return 4;
    }
    lua_pushlstring(L, x->text, n);
    return 4;
}

/* The module's extractor for the FFI entry below (NULL once collected). */
static sglr_extract_t *ffi_state;

/* extract.check(route, x [, max_text, true]) through LuaJIT's FFI, for
 * the flow: one call compiled into its trace, where the classic call ended
 * the trace and read its arguments through the Lua C API. x is the box of
 * a request's exchange, route a sglr_route_t; with keep the routing text
 * (at most max bytes, 0: all) is kept in the exchange and *text_len is its
 * length. Returns
 *   -1  x is no live exchange, or route none: the caller asks extract.check
 *   -2  the body is refused: sglr_extract_ffi_error() says why
 *   -3  out of memory
 *   else bit 0 the stream flag, bit 1 a model given (sglr_extract_ffi_model)
 * The model and the message are the shared extractor's: read them before
 * the next extraction. */
int sglr_extract_ffi_check(void *b, int route, double max, int keep, double *text_len)
{
    sglr_extract_t *x = ffi_state;
    struct sglr_exchange_s *ex = sglr_lua_ffi_exchange(b);
    if (!x || !ex || route < SGLR_ROUTE_GENERATE || route > SGLR_ROUTE_COMPLETIONS)
        return -1;
    int r = sglr_extract_run(x, (sglr_route_t)route, ex->body.data ? ex->body.data : "",
                             ex->body.len, keep ? SGLR_EXTRACT_TEXT : 0);
    if (r == -ENOMEM)
        return -3;
    if (r < 0)
        return -2;
    if (keep) {
        size_t n;
        if (keep_text(ex, x, max, &n) < 0)
            return -3;
        *text_len = (double)n;
    }
    return (x->stream ? 1 : 0) | (x->has_model ? 2 : 0);
}

const char *sglr_extract_ffi_model(int *len)
{
    if (!ffi_state || !ffi_state->has_model || ffi_state->model_len > INT_MAX) {
        *len = 0;
        return "";
    }
    *len = (int)ffi_state->model_len;
    return ffi_state->model;
}

const char *sglr_extract_ffi_error(void)
{
    return ffi_state ? ffi_state->err : "extract: no extractor";
}

/* extract.route_text(route, body) -> text | "", err */

/* extract.route_text(route, body_or_exchange [, max_bytes]) -> text */
static int l_route_text(lua_State *L)
{
    lua_Number max = luaL_optnumber(L, 3, 0);
    if (run(L, SGLR_EXTRACT_TEXT) < 0) {
        lua_pushliteral(L, "");
        lua_insert(L, -2);
        return 2;
    }
    sglr_extract_t *x = state(L);
    lua_pushlstring(L, x->text, text_cap(x->text, x->text_len, max));
    return 1;
}

/* A large body is read on libuv's thread pool, so the loop is not held for
 * the time a pass over hundreds of megabytes takes; the request's coroutine
 * waits. One pass validates it and decodes the routing text. */
typedef struct {
    uv_work_t work;
    sglr_extract_t x;           /* its own: the shared one is the loop's */
    sglr_route_t route;
    const char *body;
    size_t n;
    lua_Number max;
    int r;
    lua_State *co;
    int co_ref, body_ref;       /* the waiting coroutine; what holds the body */
} job_t;

static void job_work(uv_work_t *w)
{
    job_t *j = w->data;
    j->r = sglr_extract_run(&j->x, j->route, j->body, j->n, SGLR_EXTRACT_TEXT);
}

static void job_done(uv_work_t *w, int status)
{
    job_t *j = w->data;
    lua_State *co = j->co;
    int n;
    luaL_unref(sglr_L, LUA_REGISTRYINDEX, j->body_ref);
    if (status < 0 || j->r < 0) {
        lua_pushnil(co);
        lua_pushstring(co, status < 0 ? "extraction was cancelled"
                           : j->r == -ENOMEM ? "out of memory" : j->x.err);
        n = 2;
    } else {
        lua_pushboolean(co, 1);
        lua_pushboolean(co, j->x.stream);
        if (j->x.has_model)
            lua_pushlstring(co, j->x.model, j->x.model_len);
        else
            lua_pushnil(co);
        lua_pushlstring(co, j->x.text, text_cap(j->x.text, j->x.text_len, j->max));
        n = 4;
    }
    sglr_extract_close(&j->x);
    int ref = j->co_ref;
    free(j);
    sglr_co_resume(co, ref, n);
}

/* extract.check_text(route, body_or_exchange [, max_text]) -> true, stream,
 * model, text | nil, message: check and route_text in one pass, on the
 * thread pool (the coroutine yields). */
static int l_check_text(lua_State *L)
{
    sglr_route_t route = check_route(L);
    size_t n;
    const char *body = sglr_lua_body(L, 2, &n);
    lua_Number max = luaL_optnumber(L, 3, 0);
    int co_ref = sglr_co_pin(L);        /* raises outside a coroutine */
    job_t *j = calloc(1, sizeof *j);
    if (!j) {
        sglr_co_unpin(co_ref);
        return luaL_error(L, "out of memory");
    }
    sglr_extract_init(&j->x);
    j->work.data = j;
    j->route = route;
    j->body = body;
    j->n = n;
    j->max = max;
    j->co = L;
    j->co_ref = co_ref;
    lua_pushvalue(L, 2);
    j->body_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (uv_queue_work(sglr_loop, &j->work, job_work, job_done) < 0) {
        luaL_unref(L, LUA_REGISTRYINDEX, j->body_ref);
        sglr_co_unpin(co_ref);
        free(j);
        return luaL_error(L, "extract: cannot queue the work");
    }
    return lua_yield(L, 0);
}

static int l_gc(lua_State *L)
{
    sglr_extract_t *x = luaL_checkudata(L, 1, EXTRACT_MT);
    if (ffi_state == x)
        ffi_state = NULL;
    sglr_extract_close(x);      /* leaves it zeroed: safe twice */
    return 0;
}

int luaopen_sglr_extract(lua_State *L)
{
    lua_createtable(L, 0, 2);
    sglr_extract_t *x = lua_newuserdata(L, sizeof *x);
    sglr_extract_init(x);
    ffi_state = x;
    if (luaL_newmetatable(L, EXTRACT_MT)) {
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_inspect, 1);
    lua_setfield(L, -3, "inspect");
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, l_check, 1);
    lua_setfield(L, -3, "check");
    lua_pushcclosure(L, l_route_text, 1);
    lua_setfield(L, -2, "route_text");
    lua_pushcfunction(L, l_check_text);
    lua_setfield(L, -2, "check_text");
    return 1;
}
