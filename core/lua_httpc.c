/*
 * lua_httpc.c: the "sglr.httpc" module over the default control-plane
 * client.
 *
 *   local httpc = require "sglr.httpc"
 *   local status, body, headers = httpc.request{
 *     method = "POST", url = "http://127.0.0.1:8000/flush_cache",
 *     headers = { ["content-type"] = "application/json" }, body = "{}",
 *     timeout_ms = 5000, connect_timeout_ms = 2000,
 *   }
 *   -- failure: nil, "timeout" | "Couldn't connect to server: ..."
 *
 * request() waits, so it runs inside a coroutine: it checks every argument
 * (raising on misuse before anything is allocated), pins the coroutine,
 * starts the transfer and yields. The completion callback pushes the
 * results onto the coroutine and resumes it through sglr_co_resume. If the
 * request cannot start it returns nil, err at once, without yielding.
 */
#include "httpc.h"
#include "sglr.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADERS 64
#define DEFAULT_TIMEOUT_MS 30000

typedef struct {
    lua_State *co;
    int ref;
} waiter_t;

static void done_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    waiter_t w = *(waiter_t *)data;
    free(data);
    lua_State *co = w.co;
    if (!lua_checkstack(co, 8)) {
        sglr_log(SGLR_LOG_ERROR, "httpc: coroutine stack overflow; request abandoned");
        sglr_co_unpin(w.ref);
        return;
    }
    if (res->error) {
        lua_pushnil(co);
        lua_pushstring(co, res->error);
        sglr_co_resume(co, w.ref, 2);
        return;
    }
    lua_pushinteger(co, res->status);
    lua_pushlstring(co, res->body, res->body_len);
    lua_createtable(co, 0, (int)res->nheaders);
    for (size_t i = 0; i < res->nheaders; i++) {
        const sglr_httpc_header_t *h = &res->headers[i];
        lua_pushlstring(co, h->name, h->name_len);
        lua_pushvalue(co, -1);
        lua_rawget(co, -3);
        if (lua_isnil(co, -1)) {
            lua_pop(co, 1);
            lua_pushlstring(co, h->value, h->value_len);
        } else {
            /* Repeated header: join as RFC 9110 allows (set-cookie aside). */
            lua_pushliteral(co, ", ");
            lua_pushlstring(co, h->value, h->value_len);
            lua_concat(co, 3);
        }
        lua_rawset(co, -3);
    }
    sglr_co_resume(co, w.ref, 3);
}

/* Field `key` of the options table (slot 1), left on the stack. */
static const char *opt_string(lua_State *L, const char *key, size_t *len, int required)
{
    lua_getfield(L, 1, key);
    int t = lua_type(L, -1);
    if (t == LUA_TNIL && !required)
        return NULL;
    if (t != LUA_TSTRING)
        luaL_error(L, "httpc.request: '%s' must be a string, got %s", key, lua_typename(L, t));
    return lua_tolstring(L, -1, len);
}

static long opt_ms(lua_State *L, const char *key, long dflt)
{
    lua_getfield(L, 1, key);
    int t = lua_type(L, -1);
    long v = dflt;
    if (t == LUA_TNUMBER) {
        lua_Number n = lua_tonumber(L, -1);
        if (!(n >= 0 && n <= 1e12))
            luaL_error(L, "httpc.request: '%s' must be >= 0", key);
        v = (long)n;
    } else if (t != LUA_TNIL) {
        luaL_error(L, "httpc.request: '%s' must be a number, got %s", key, lua_typename(L, t));
    }
    lua_pop(L, 1);
    return v;
}

static int has_crlf(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return 1;
    return 0;
}

/* httpc.request{ method, url, headers, body, timeout_ms, connect_timeout_ms,
 *                ca_file, insecure } -> status, body, headers | nil, err */
static int l_request(lua_State *L)
{
    sglr_httpc_header_t headers[MAX_HEADERS];
    sglr_httpc_opts_t o = { 0 };
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    /* The strings stay on the stack (anchored) until the request has
     * copied them. */
    o.url = opt_string(L, "url", NULL, 1);
    o.method = opt_string(L, "method", NULL, 0);
    o.body = opt_string(L, "body", &o.body_len, 0);
    o.ca_file = opt_string(L, "ca_file", NULL, 0);
    o.timeout_ms = opt_ms(L, "timeout_ms", DEFAULT_TIMEOUT_MS);
    o.connect_timeout_ms = opt_ms(L, "connect_timeout_ms", 0);
    lua_getfield(L, 1, "insecure");
    o.insecure = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (o.method) {
        for (const char *p = o.method; *p; p++)
            if (*p <= ' ' || *p == ':' || *p >= 127)
                return luaL_error(L, "httpc.request: invalid method '%s'", o.method);
        if (!*o.method)
            return luaL_error(L, "httpc.request: empty method");
    }

    lua_getfield(L, 1, "headers");
    int ht = lua_gettop(L);
    if (!lua_isnil(L, ht)) {
        if (!lua_istable(L, ht))
            return luaL_error(L, "httpc.request: 'headers' must be a table, got %s",
                              luaL_typename(L, ht));
        lua_pushnil(L);
        while (lua_next(L, ht)) {
            /* Strings only: converting a number in place would leave the
             * converted string unanchored once lua_next pops it. */
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                return luaL_error(L, "httpc.request: headers must map strings to strings "
                                     "(got %s = %s)", luaL_typename(L, -2), luaL_typename(L, -1));
            if (o.nheaders == MAX_HEADERS)
                return luaL_error(L, "httpc.request: at most %d headers", MAX_HEADERS);
            sglr_httpc_header_t *h = &headers[o.nheaders++];
            h->name = lua_tolstring(L, -2, &h->name_len);
            h->value = lua_tolstring(L, -1, &h->value_len);
            if (has_crlf(h->name, h->name_len) || has_crlf(h->value, h->value_len) ||
                !h->name_len || memchr(h->name, ':', h->name_len) || memchr(h->name, ' ', h->name_len))
                return luaL_error(L, "httpc.request: invalid header '%s'", h->name);
            lua_pop(L, 1);
        }
        o.headers = headers;
    }

    sglr_httpc_t *c = sglr_httpc_default();
    if (!c) {
        lua_pushnil(L);
        lua_pushstring(L, "http client is not available (shut down or out of memory)");
        return 2;
    }
    int ref = sglr_co_pin(L);       /* raises outside a coroutine: nothing held yet */
    waiter_t *w = malloc(sizeof *w);
    int rc = w ? 0 : -ENOMEM;
    if (w) {
        w->co = L;
        w->ref = ref;
        rc = sglr_httpc_request(c, &o, done_cb, w, NULL);
    }
    if (rc != 0) {
        free(w);
        sglr_co_unpin(ref);
        lua_pushnil(L);
        lua_pushstring(L, rc == -ENOMEM ? "out of memory"
                        : rc == -ECANCELED ? "http client is closed"
                        : "invalid request");
        return 2;
    }
    return lua_yield(L, 0);
}

int luaopen_sglr_httpc(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "request", l_request },
        { NULL, NULL },
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
