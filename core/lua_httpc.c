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
 *   -- failure: nil, "timeout" | "cancelled" | "Couldn't connect to server: ..."
 *
 *   -- a request that runs while its starter goes on (a Kubernetes watch):
 *   local req = httpc.start{ url = ..., timeout_ms = 0, bearer_token = tok,
 *     ca_data = pem, on_chunk = function(chunk, status) ... end }
 *   req:cancel()                         -- from anywhere; true if it was running
 *   local status, body, headers = req:wait()   -- nil, "cancelled" after a cancel
 *
 * request() waits, so it runs inside a coroutine: it checks every argument
 * (raising on misuse before anything is allocated), pins the coroutine,
 * starts the transfer and yields. The completion callback pushes the
 * results onto the coroutine and resumes it through sglr_co_resume. If the
 * request cannot start it returns nil, err at once, without yielding.
 *
 * start() returns a handle (sglr.httpc.req) at once. The results wait in
 * the handle until wait() takes them (again on every call); a handle that
 * is collected while its request runs cancels it. on_chunk(chunk, status)
 * is a plain call (through the pcall gateway, it cannot yield) for every
 * piece of the body as it arrives; the final body is then "". An error in
 * it cancels the request, which ends with "on_chunk failed: <message>".
 *
 * The C side of one request (lreq_t) lives until both the request has
 * ended and no handle points to it any more.
 */
#include "httpc.h"
#include "sglr.h"
#include "lua_common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEADERS 64
#define DEFAULT_TIMEOUT_MS 30000

static const char REQ_MT[] = "sglr.httpc.req";

typedef struct {
    sglr_httpc_req_t *req;   /* NULL once it has ended */
    lua_State *co;           /* the coroutine waiting for the end, or NULL */
    int co_ref;
    int chunk_ref;           /* on_chunk, or LUA_NOREF */
    int result_ref;          /* {n =, ...}: the results, kept for wait() */
    int has_handle;          /* a sglr.httpc.req userdata points here */
    int done;
    char *chunk_err;         /* on_chunk raised: the request's error */
} lreq_t;

static void lreq_free(lreq_t *q)
{
    luaL_unref(sglr_L, LUA_REGISTRYINDEX, q->chunk_ref);
    luaL_unref(sglr_L, LUA_REGISTRYINDEX, q->result_ref);
    free(q->chunk_err);
    free(q);
}

/* status, body, headers | nil, err onto L; returns the count. */
static int push_results(lua_State *L, const sglr_httpc_response_t *res, const char *err)
{
    if (err) {
        lua_pushnil(L);
        lua_pushstring(L, err);
        return 2;
    }
    lua_pushinteger(L, res->status);
    lua_pushlstring(L, res->body, res->body_len);
    lua_createtable(L, 0, (int)res->nheaders);
    for (size_t i = 0; i < res->nheaders; i++) {
        const sglr_httpc_header_t *h = &res->headers[i];
        lua_pushlstring(L, h->name, h->name_len);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h->value, h->value_len);
        } else {
            /* Repeated header: join as RFC 9110 allows (set-cookie aside). */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->value, h->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    return 3;
}

static void data_cb(sglr_httpc_req_t *req, int status, const char *data, size_t len, void *ud)
{
    lreq_t *q = ud;
    lua_State *L = sglr_L;
    if (q->chunk_ref == LUA_NOREF || q->chunk_err)
        return;
    lua_rawgeti(L, LUA_REGISTRYINDEX, q->chunk_ref);
    lua_pushlstring(L, data, len);
    lua_pushinteger(L, status);
    /* The gateway logs an error with its traceback; the request then ends
     * with the message. q outlives this call: it goes only once the
     * request has ended. */
    char msg[400];
    if (sglr_pcall_error(L, 2, 0, msg, sizeof msg) != 0) {
        size_t n = strlen(msg) + sizeof "on_chunk failed: ";
        if ((q->chunk_err = malloc(n)))
            snprintf(q->chunk_err, n, "on_chunk failed: %s", msg);
        sglr_httpc_cancel(req);
    }
}

/* Keep the results in q for wait(): {n =, ...} */
static void keep_results(lreq_t *q, const sglr_httpc_response_t *res, const char *err)
{
    lua_State *L = sglr_L;
    int top = lua_gettop(L);
    int n = push_results(L, res, err);
    lua_createtable(L, n, 1);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, top + i);
        lua_rawseti(L, -2, i);
    }
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "n");
    q->result_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_settop(L, top);
}

static void done_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    lreq_t *q = data;
    const char *err = q->chunk_err ? q->chunk_err : res->error;
    q->req = NULL;
    q->done = 1;
    luaL_unref(sglr_L, LUA_REGISTRYINDEX, q->chunk_ref);
    q->chunk_ref = LUA_NOREF;
    if (q->has_handle)
        keep_results(q, res, err);
    lua_State *co = q->co;
    int ref = q->co_ref, n = 0;
    q->co = NULL;
    if (co && !lua_checkstack(co, 8)) {
        sglr_log(SGLR_LOG_ERROR, "httpc: coroutine stack overflow; request abandoned");
        sglr_co_unpin(ref);
        co = NULL;
    }
    if (co)
        n = push_results(co, res, err);   /* before q (and err with it) may go */
    if (!q->has_handle)              /* request(), or its handle was collected */
        lreq_free(q);
    /* Nothing of q is touched from here: the coroutine may drop the
     * handle, and a collection free q. */
    if (co)
        sglr_co_resume(co, ref, n);
}

/* --- options ------------------------------------------------------------------ */

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

/* Read the options table at slot 1 into o (strings stay anchored on the
 * stack until the request has copied them); raises on misuse, allocating
 * nothing. Leaves on_chunk (a function or nil) on top of the stack. */
static void check_opts(lua_State *L, sglr_httpc_opts_t *o, sglr_httpc_header_t *headers)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    o->url = opt_string(L, "url", NULL, 1);
    o->method = opt_string(L, "method", NULL, 0);
    o->body = opt_string(L, "body", &o->body_len, 0);
    o->ca_file = opt_string(L, "ca_file", NULL, 0);
    o->ca_data = opt_string(L, "ca_data", &o->ca_data_len, 0);
    o->cert_file = opt_string(L, "cert_file", NULL, 0);
    o->key_file = opt_string(L, "key_file", NULL, 0);
    o->cert_data = opt_string(L, "cert_data", &o->cert_data_len, 0);
    o->key_data = opt_string(L, "key_data", &o->key_data_len, 0);
    size_t tlen = 0;
    o->bearer_token = opt_string(L, "bearer_token", &tlen, 0);
    if (o->bearer_token && (!tlen || has_crlf(o->bearer_token, tlen)))
        luaL_error(L, "httpc.request: invalid bearer_token (empty, or CR/LF/NUL in it)");
    o->timeout_ms = opt_ms(L, "timeout_ms", DEFAULT_TIMEOUT_MS);
    o->connect_timeout_ms = opt_ms(L, "connect_timeout_ms", 0);
    lua_getfield(L, 1, "insecure");
    o->insecure = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (o->method) {
        for (const char *p = o->method; *p; p++)
            if (*p <= ' ' || *p == ':' || *p >= 127)
                luaL_error(L, "httpc.request: invalid method '%s'", o->method);
        if (!*o->method)
            luaL_error(L, "httpc.request: empty method");
    }

    lua_getfield(L, 1, "headers");
    int ht = lua_gettop(L);
    if (!lua_isnil(L, ht)) {
        if (!lua_istable(L, ht))
            luaL_error(L, "httpc.request: 'headers' must be a table, got %s", luaL_typename(L, ht));
        lua_pushnil(L);
        while (lua_next(L, ht)) {
            /* Strings only: converting a number in place would leave the
             * converted string unanchored once lua_next pops it. */
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "httpc.request: headers must map strings to strings "
                              "(got %s = %s)", luaL_typename(L, -2), luaL_typename(L, -1));
            if (o->nheaders == MAX_HEADERS)
                luaL_error(L, "httpc.request: at most %d headers", MAX_HEADERS);
            sglr_httpc_header_t *h = &headers[o->nheaders++];
            h->name = lua_tolstring(L, -2, &h->name_len);
            h->value = lua_tolstring(L, -1, &h->value_len);
            if (has_crlf(h->name, h->name_len) || has_crlf(h->value, h->value_len) ||
                !h->name_len || memchr(h->name, ':', h->name_len) || memchr(h->name, ' ', h->name_len))
                luaL_error(L, "httpc.request: invalid header '%s'", h->name);
            lua_pop(L, 1);
        }
        o->headers = headers;
    }
    lua_getfield(L, 1, "on_chunk");
    if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
        luaL_error(L, "httpc.request: 'on_chunk' must be a function, got %s", luaL_typename(L, -1));
}

static const char *start_error(int rc)
{
    return rc == -ENOMEM ? "out of memory"
         : rc == -ECANCELED ? "http client is closed"
         : rc == -ENOTSUP ? "TLS data in memory needs libcurl 7.77 or later"
         : "invalid request";
}

/* Start the request of q with the options checked; 0 or an error for
 * start_error. on_chunk is on top of the stack (or nil). */
static int lreq_start(lua_State *L, lreq_t *q, sglr_httpc_opts_t *o)
{
    sglr_httpc_t *c = sglr_httpc_default();
    if (!c)
        return -ECANCELED;
    if (lua_isfunction(L, -1)) {
        o->on_data = data_cb;
        lua_pushvalue(L, -1);
        q->chunk_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return sglr_httpc_request(c, o, done_cb, q, &q->req);
}

static lreq_t *lreq_new(void)
{
    lreq_t *q = calloc(1, sizeof *q);
    if (q) {
        q->co_ref = q->chunk_ref = q->result_ref = LUA_NOREF;
    }
    return q;
}

/* httpc.request{ method, url, headers, body, timeout_ms, connect_timeout_ms,
 *                ca_file, ca_data, cert_file, key_file, cert_data, key_data,
 *                bearer_token, insecure, on_chunk }
 *   -> status, body, headers | nil, err */
static int l_request(lua_State *L)
{
    sglr_httpc_header_t headers[MAX_HEADERS];
    sglr_httpc_opts_t o = { 0 };
    check_opts(L, &o, headers);
    if (!sglr_httpc_default()) {
        lua_pushnil(L);
        lua_pushstring(L, "http client is not available (shut down or out of memory)");
        return 2;
    }
    int ref = sglr_co_pin(L);       /* raises outside a coroutine: nothing held yet */
    lreq_t *q = lreq_new();
    int rc = q ? 0 : -ENOMEM;
    if (q) {
        q->co = L;
        q->co_ref = ref;
        rc = lreq_start(L, q, &o);
    }
    if (rc != 0) {
        if (q)
            lreq_free(q);
        sglr_co_unpin(ref);
        lua_pushnil(L);
        lua_pushstring(L, start_error(rc));
        return 2;
    }
    return lua_yield(L, 0);
}

/* httpc.start{ same options } -> handle | nil, err */
static int l_start(lua_State *L)
{
    sglr_httpc_header_t headers[MAX_HEADERS];
    sglr_httpc_opts_t o = { 0 };
    check_opts(L, &o, headers);
    if (!sglr_httpc_default()) {
        lua_pushnil(L);
        lua_pushstring(L, "http client is not available (shut down or out of memory)");
        return 2;
    }
    /* The box first (it may raise on memory), then the request. */
    void **box = sglr_lua_new_box(L, REQ_MT, NULL);
    lua_insert(L, -2);               /* keep on_chunk on top */
    lreq_t *q = lreq_new();
    int rc = q ? lreq_start(L, q, &o) : -ENOMEM;
    if (rc != 0) {
        if (q)
            lreq_free(q);
        lua_pushnil(L);
        lua_pushstring(L, start_error(rc));
        return 2;
    }
    q->has_handle = 1;
    *box = q;
    lua_pop(L, 1);                   /* on_chunk: the box is on top */
    return 1;
}

/* req:wait() -> status, body, headers | nil, err (waits inside a coroutine
 * unless the request has ended) */
static int req_wait(lua_State *L)
{
    lreq_t *q = sglr_lua_check_box(L, 1, REQ_MT);
    if (q->done) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, q->result_ref);
        lua_getfield(L, -1, "n");
        int n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n, "httpc: results");
        for (int i = 1; i <= n; i++)
            lua_rawgeti(L, -i, i);
        return n;
    }
    if (q->co)
        return luaL_error(L, "httpc: another coroutine already waits for this request");
    q->co_ref = sglr_co_pin(L);
    q->co = L;
    return lua_yield(L, 0);
}

/* req:cancel() -> true if it was running (its wait() then gives nil, "cancelled") */
static int req_cancel(lua_State *L)
{
    lreq_t *q = sglr_lua_check_box(L, 1, REQ_MT);
    int running = q->req != NULL;
    if (running)
        sglr_httpc_cancel(q->req);
    lua_pushboolean(L, running);
    return 1;
}

/* req:done() -> true once the request has ended (wait() would not wait) */
static int req_done(lua_State *L)
{
    lreq_t *q = sglr_lua_check_box(L, 1, REQ_MT);
    lua_pushboolean(L, q->done);
    return 1;
}

static int req_gc(lua_State *L)
{
    void **box = luaL_checkudata(L, 1, REQ_MT);
    lreq_t *q = *box;
    if (!q)
        return 0;
    *box = NULL;
    q->has_handle = 0;
    if (q->done)
        lreq_free(q);
    else if (q->req)
        sglr_httpc_cancel(q->req);   /* done_cb frees q */
    return 0;
}

int luaopen_sglr_httpc(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        { "request", l_request },
        { "start", l_start },
        { NULL, NULL },
    };
    static const luaL_Reg methods[] = {
        { "wait", req_wait },
        { "cancel", req_cancel },
        { "done", req_done },
        { NULL, NULL },
    };
    sglr_lua_new_mt(L, REQ_MT, methods, req_gc);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
