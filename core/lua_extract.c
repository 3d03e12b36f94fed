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

#include <errno.h>
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
static int l_check(lua_State *L)
{
    if (run(L, 0) < 0) {
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
    return 3;
}

/* extract.route_text(route, body) -> text | "", err */
static int l_route_text(lua_State *L)
{
    if (run(L, SGLR_EXTRACT_TEXT) < 0) {
        lua_pushliteral(L, "");
        lua_insert(L, -2);
        return 2;
    }
    sglr_extract_t *x = state(L);
    lua_pushlstring(L, x->text, x->text_len);
    return 1;
}

static int l_gc(lua_State *L)
{
    sglr_extract_t *x = luaL_checkudata(L, 1, EXTRACT_MT);
    sglr_extract_close(x);      /* leaves it zeroed: safe twice */
    return 0;
}

int luaopen_sglr_extract(lua_State *L)
{
    lua_createtable(L, 0, 2);
    sglr_extract_t *x = lua_newuserdata(L, sizeof *x);
    sglr_extract_init(x);
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
    return 1;
}
