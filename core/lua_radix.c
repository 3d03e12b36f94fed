/*
 * lua_radix.c: the radix tree (core/radix.c) as a Lua object.
 *
 *     local radix = require "sglr.radix"
 *     local t = radix.new()
 *     t:insert(text, url)
 *     local n, url = t:match(text [, allowed])
 *
 * The engine knows workers as small ints; Lua knows them by URL. The
 * mapping lives in the userdata's environment table, both ways
 * (env[url] = id, env[id] = url), so a lookup is one rawget on an already
 * interned string and returning a worker pushes a string Lua already has.
 * Ids of removed workers are reused, keeping the engine's arrays dense.
 *
 * match() builds the allowed bitset in a buffer owned by the object, so a
 * routing decision allocates nothing.
 */
#include "radix.h"
#include "sglr.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <lua.h>
#include <lauxlib.h>

#define RADIX_MT "sglr.radix"

/* The first member of every tree userdata: with its size, it tells a tree
 * from any other userdata without a metatable lookup by name (which
 * interns the name on every call). */
static const char radix_tag;

typedef struct {
    const char *tag;        /* &radix_tag */
    sglr_radix_t *t;        /* NULL once closed */
    uint8_t *bits;          /* allowed-set scratch for match() */
    size_t nbytes;
    int *free_ids;          /* ids of removed workers, reused first */
    int nfree, capfree;
    int next_id;            /* ids below this have been handed out */
    int nworkers;           /* ids in use */
} lradix_t;

static lradix_t *radix_arg(lua_State *L)
{
    lradix_t *r = lua_touserdata(L, 1);
    if (!r || lua_objlen(L, 1) != sizeof *r || r->tag != &radix_tag)
        luaL_typerror(L, 1, RADIX_MT);
    return r;
}

static lradix_t *check_radix(lua_State *L)
{
    lradix_t *r = radix_arg(L);
    if (!r->t)
        luaL_error(L, "radix tree is closed");
    return r;
}

/* The key "url", interned once (a worker table's URL field, read for each
 * worker of match's allowed list) */
static int url_key_ref = LUA_NOREF;

/* The worker id of the URL at idx, or -1 when the tree never saw it.
 * Leaves the stack as it was. */
static int lookup_id(lua_State *L, int env, int idx)
{
    lua_pushvalue(L, idx);
    lua_rawget(L, env);
    int id = lua_type(L, -1) == LUA_TNUMBER ? (int)lua_tointeger(L, -1) : -1;
    lua_pop(L, 1);
    return id;
}

static int intern_id(lua_State *L, lradix_t *r, int env, int idx)
{
    int id = lookup_id(L, env, idx);
    if (id >= 0)
        return id;
    if (r->nfree)
        id = r->free_ids[--r->nfree];
    else if (r->next_id <= SGLR_RADIX_MAX_WORKER)
        id = r->next_id++;
    else
        return luaL_error(L, "radix: more than %d workers", SGLR_RADIX_MAX_WORKER + 1);
    lua_pushvalue(L, idx);
    lua_pushinteger(L, id);
    lua_rawset(L, env);
    lua_pushvalue(L, idx);
    lua_rawseti(L, env, id);
    r->nworkers++;
    return id;
}

static void release_id(lua_State *L, lradix_t *r, int env, int idx, int id)
{
    lua_pushvalue(L, idx);
    lua_pushnil(L);
    lua_rawset(L, env);
    lua_pushnil(L);
    lua_rawseti(L, env, id);
    r->nworkers--;
    if (r->nfree == r->capfree) {
        int cap = r->capfree ? r->capfree * 2 : 16;
        int *f = realloc(r->free_ids, (size_t)cap * sizeof *f);
        if (!f)
            return;     /* the id is just not reused */
        r->free_ids = f;
        r->capfree = cap;
    }
    r->free_ids[r->nfree++] = id;
}

/* radix.new() -> tree */
static int l_new(lua_State *L)
{
    lradix_t *r = lua_newuserdata(L, sizeof *r);
    memset(r, 0, sizeof *r);
    r->tag = &radix_tag;
    luaL_getmetatable(L, RADIX_MT);
    lua_setmetatable(L, -2);
    lua_newtable(L);
    lua_setfenv(L, -2);
    r->t = sglr_radix_new();
    if (!r->t)
        return luaL_error(L, "radix: out of memory");
    return 1;
}

/* The text argument: a string, or an exchange whose routing text was kept
 * (extract.check with keep): read where it is, no Lua string made. */
static const char *text_arg(lua_State *L, int idx, size_t *n)
{
    struct sglr_exchange_s *x = sglr_lua_to_exchange(L, idx);
    if (x)
        return sglr_exchange_text(x, n);
    if (lua_type(L, idx) == LUA_TUSERDATA)
        luaL_argerror(L, idx, "a string, or the exchange of a request still running "
                              "(req.text_source holds only during select)");
    return luaL_checklstring(L, idx, n);
}

/* t:insert(text, worker) (text: a string or an exchange) */
static int l_insert(lua_State *L)
{
    lradix_t *r = check_radix(L);
    size_t n;
    const char *s = text_arg(L, 2, &n);
    luaL_checktype(L, 3, LUA_TSTRING);
    if (n == 0)
        return 0;
    lua_settop(L, 3);
    lua_getfenv(L, 1);
    int id = intern_id(L, r, lua_gettop(L), 3);
    if (sglr_radix_insert(r->t, s, n, id) == -ENOMEM)
        return luaL_error(L, "radix: out of memory");
    return 0;
}

/* t:match(text [, allowed]) -> matched_bytes, worker|nil
 * text: a string or an exchange; allowed: array of worker URLs (or of
 * tables with a url field). */
static int l_match(lua_State *L)
{
    lradix_t *r = check_radix(L);
    size_t n;
    const char *s = text_arg(L, 2, &n);
    const uint8_t *bits = NULL;
    size_t nbits = 0;
    lua_settop(L, 3);
    lua_getfenv(L, 1);
    int env = lua_gettop(L);
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        size_t need = ((size_t)r->next_id + 7) / 8;
        if (need > r->nbytes) {
            uint8_t *b = realloc(r->bits, need);
            if (!b)
                return luaL_error(L, "radix: out of memory");
            r->bits = b;
            r->nbytes = need;
        }
        if (need == 0) {        /* no worker known yet: nothing can match */
            lua_pushinteger(L, 0);
            lua_pushnil(L);
            return 2;
        }
        memset(r->bits, 0, need);
        int len = (int)lua_objlen(L, 3);
        for (int i = 1; i <= len; i++) {
            lua_rawgeti(L, 3, i);
            if (lua_type(L, -1) == LUA_TTABLE) {
                lua_rawgeti(L, LUA_REGISTRYINDEX, url_key_ref);
                lua_gettable(L, -2);
                lua_remove(L, -2);
            }
            if (lua_type(L, -1) == LUA_TSTRING) {
                int id = lookup_id(L, env, lua_gettop(L));
                if (id >= 0)
                    r->bits[id >> 3] |= (uint8_t)(1u << (id & 7));
            }
            lua_pop(L, 1);
        }
        bits = r->bits;
        nbits = need * 8;
    }
    int w;
    size_t m = sglr_radix_match(r->t, s, n, bits, nbits, &w);
    lua_pushinteger(L, (lua_Integer)m);
    if (w >= 0)
        lua_rawgeti(L, env, w);
    else
        lua_pushnil(L);
    return 2;
}

/* t:remove_worker(worker) */
static int l_remove_worker(lua_State *L)
{
    lradix_t *r = check_radix(L);
    luaL_checktype(L, 2, LUA_TSTRING);
    lua_settop(L, 2);
    lua_getfenv(L, 1);
    int env = lua_gettop(L);
    int id = lookup_id(L, env, 2);
    if (id >= 0) {
        sglr_radix_remove_worker(r->t, id);
        release_id(L, r, env, 2, id);
    }
    return 0;
}

/* t:size(worker) -> bytes held for worker */
static int l_size(lua_State *L)
{
    lradix_t *r = check_radix(L);
    luaL_checktype(L, 2, LUA_TSTRING);
    lua_settop(L, 2);
    lua_getfenv(L, 1);
    int id = lookup_id(L, lua_gettop(L), 2);
    lua_pushinteger(L, id >= 0 ? (lua_Integer)sglr_radix_size(r->t, id) : 0);
    return 1;
}

/* t:evict(max_chars) -> bytes removed */
static int l_evict(lua_State *L)
{
    lradix_t *r = check_radix(L);
    lua_Number max = luaL_checknumber(L, 2);
    size_t m = max <= 0 ? 0 : max >= 1e18 ? (size_t)1e18 : (size_t)max;
    lua_pushinteger(L, (lua_Integer)sglr_radix_evict(r->t, m));
    return 1;
}

/* t:stats() -> { nodes, chars, tenancies, workers, resumed } (resumed:
 * inserts that went on from their text's match, sglr_radix_insert_keyed) */
static int l_stats(lua_State *L)
{
    lradix_t *r = check_radix(L);
    sglr_radix_stats_t st;
    sglr_radix_stats(r->t, &st);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)st.nodes);
    lua_setfield(L, -2, "nodes");
    lua_pushinteger(L, (lua_Integer)st.chars);
    lua_setfield(L, -2, "chars");
    lua_pushinteger(L, (lua_Integer)st.tenancies);
    lua_setfield(L, -2, "tenancies");
    lua_pushinteger(L, r->nworkers);
    lua_setfield(L, -2, "workers");
    lua_pushnumber(L, (lua_Number)st.resumed);
    lua_setfield(L, -2, "resumed");
    return 1;
}

/* t:close(), also __gc: safe to run any number of times. */
static int l_close(lua_State *L)
{
    lradix_t *r = radix_arg(L);
    sglr_radix_free(r->t);
    r->t = NULL;
    free(r->bits);
    r->bits = NULL;
    r->nbytes = 0;
    free(r->free_ids);
    r->free_ids = NULL;
    r->nfree = r->capfree = 0;
    return 0;
}

/* --- through LuaJIT's FFI ------------------------------------------------------------
 * The bodies of t:match and t:insert for sglr.radix_ffi, which installs
 * them as those methods: an FFI call the JIT compiles into its trace,
 * where a method call would end the trace and cost its argument handling.
 * tb is a tree and xb an exchange as FFI passes a userdata to void * (its
 * payload); the text is the exchange's kept routing text when xb is given,
 * else s[0..n). -2: not a live tree or exchange, or an unknown id (the
 * caller then asks the method, which says why). */

/* key: what names the text to the tree (sglr_radix_match_keyed), 0 for
 * a string */
static const char *ffi_text(void *xb, const char *s, size_t *n, uint64_t *key)
{
    *key = 0;
    if (!xb)
        return s;
    struct sglr_exchange_s *x = sglr_lua_ffi_exchange(xb);
    if (!x)
        return NULL;
    *key = sglr_exchange_text_serial(x);
    return sglr_exchange_text(x, n);
}

/* -> the worker id whose path matched longest (-1: none), *matched its
 * bytes; allowed: a bitset of worker ids over nbytes bytes, or NULL */
int sglr_radix_ffi_match(void *tb, void *xb, const char *s, size_t n, const uint8_t *allowed,
                         size_t nbytes, double *matched)
{
    lradix_t *r = tb;
    if (!r || r->tag != &radix_tag || !r->t)
        return -2;
    uint64_t key;
    const char *text = ffi_text(xb, s, &n, &key);
    if (!text)
        return -2;
    int w;
    *matched = (double)sglr_radix_match_keyed(r->t, text, n, allowed, nbytes * 8, &w, key);
    return w;
}

/* -> 0, -1 out of memory, -2 as above; id: a worker id the tree handed out */
int sglr_radix_ffi_insert(void *tb, void *xb, const char *s, size_t n, int id)
{
    lradix_t *r = tb;
    if (!r || r->tag != &radix_tag || !r->t || id < 0 || id >= r->next_id)
        return -2;
    uint64_t key;
    const char *text = ffi_text(xb, s, &n, &key);
    if (!text)
        return -2;
    if (n == 0)
        return 0;
    return sglr_radix_insert_keyed(r->t, text, n, id, key) == -ENOMEM ? -1 : 0;
}

/* -> the bytes held for worker id (0 for an id not in use), -2 as above */
double sglr_radix_ffi_size(void *tb, int id)
{
    lradix_t *r = tb;
    if (!r || r->tag != &radix_tag || !r->t || id < 0 || id >= r->next_id)
        return -2;
    return (double)sglr_radix_size(r->t, id);
}

static int l_tostring(lua_State *L)
{
    lradix_t *r = radix_arg(L);
    if (!r->t) {
        lua_pushliteral(L, "sglr.radix (closed)");
    } else {
        sglr_radix_stats_t st;
        sglr_radix_stats(r->t, &st);
        lua_pushfstring(L, "sglr.radix (%d nodes, %d chars, %d workers)",
                        (int)st.nodes, (int)st.chars, r->nworkers);
    }
    return 1;
}

static const luaL_Reg methods[] = {
    { "insert", l_insert },
    { "match", l_match },
    { "remove_worker", l_remove_worker },
    { "size", l_size },
    { "evict", l_evict },
    { "stats", l_stats },
    { "close", l_close },
    { NULL, NULL }
};

int luaopen_sglr_radix(lua_State *L)
{
    if (luaL_newmetatable(L, RADIX_MT)) {
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, l_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_pushliteral(L, RADIX_MT);
        lua_setfield(L, -2, "__metatable");
    }
    lua_pop(L, 1);
    if (url_key_ref == LUA_NOREF) {
        lua_pushliteral(L, "url");
        url_key_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    lua_createtable(L, 0, 1);
    lua_pushcfunction(L, l_new);
    lua_setfield(L, -2, "new");
    return 1;
}
