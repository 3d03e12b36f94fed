/*
 * main.c: the sglr binary. Owns the one libuv loop and the Lua state, wires
 * luv to that loop, makes the embedded scripts loadable, and runs
 * `require("sglr.main")(args)` in a coroutine before running the loop.
 *
 * Script lookup order for require(name):
 *   1. package.preload (native modules: sglr.core, sglr.radix, ...)
 *   2. SGLR_LUA_PATH / --lua-path (package.sglr_path): operator overrides
 *   3. the scripts embedded from lua/ and policies/ at build time
 *   4. the usual package.path / cpath (Debian's busted, cjson, argparse ...)
 */
#include "sglr.h"
#include "lalloc.h"
#include "logbuf.h"
#include "httpc.h"
#include "upstream.h"
#include "server.h"
#include "child.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <malloc.h>
#include <sys/resource.h>
#include <lualib.h>
#include <luv/luv.h>

struct sglr_embedded {
    const char *name, *path, *src;
    size_t len;
};
extern const struct sglr_embedded sglr_embedded[];
extern int sglr_exit_code;

int luaopen_sglr_core(lua_State *L);
/* Bindings that may be absent from a given build. */
int luaopen_sglr_radix(lua_State *L) __attribute__((weak));
int luaopen_sglr_extract(lua_State *L) __attribute__((weak));
int luaopen_sglr_metrics(lua_State *L) __attribute__((weak));
int luaopen_sglr_httpc(lua_State *L) __attribute__((weak));

static int embedded_searcher(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    for (const struct sglr_embedded *e = sglr_embedded; e->name; e++) {
        if (strcmp(e->name, name) == 0) {
            char chunk[512];
            snprintf(chunk, sizeof chunk, "@%s", e->path);
            if (luaL_loadbuffer(L, e->src, e->len, chunk) != 0)
                return lua_error(L);
            return 1;
        }
    }
    lua_pushfstring(L, "\n\tno embedded script '%s'", name);
    return 1;
}

static int embedded_source(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    for (const struct sglr_embedded *e = sglr_embedded; e->name; e++) {
        if (strcmp(e->name, name) == 0) {
            lua_pushlstring(L, e->src, e->len);
            lua_pushstring(L, e->path);
            return 2;
        }
    }
    return 0;
}

static int embedded_list(lua_State *L)
{
    lua_newtable(L);
    int i = 1;
    for (const struct sglr_embedded *e = sglr_embedded; e->name; e++) {
        lua_pushstring(L, e->name);
        lua_rawseti(L, -2, i++);
    }
    return 1;
}

/* Searches package.sglr_path (set from SGLR_LUA_PATH or --lua-path). */
static const char override_searcher_src[] =
    "local name = ...\n"
    "local p = package.sglr_path\n"
    "if not p or p == '' then return nil end\n"
    "local file, err = package.searchpath(name, p)\n"
    "if not file then return '\\n\\t' .. err end\n"
    "local f, lerr = loadfile(file)\n"
    "if not f then error(lerr, 0) end\n"
    "return f\n";

static void install_searchers(lua_State *L)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaders");
    int n = (int)lua_objlen(L, -1);
    /* shift entries 2..n up by two, then put ours at 2 and 3 */
    for (int i = n; i >= 2; i--) {
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -2, i + 2);
    }
    if (luaL_loadbuffer(L, override_searcher_src, sizeof override_searcher_src - 1,
                        "=sglr_path_searcher"))
        lua_error(L);
    lua_rawseti(L, -2, 2);
    lua_pushcfunction(L, embedded_searcher);
    lua_rawseti(L, -2, 3);
    lua_pop(L, 1);
    const char *env = getenv("SGLR_LUA_PATH");
    if (env) {
        lua_pushstring(L, env);
        lua_setfield(L, -2, "sglr_path");
    }
    lua_pop(L, 1);
}

static int luv_pcall_cb(lua_State *L, int nargs, int nresults, int flags)
{
    int top = lua_gettop(L) - nargs - 1;
    int st = sglr_pcall(L, nargs, nresults);
    if (st != 0)
        return -st;
    return lua_gettop(L) - top;
}

static int open_luv(lua_State *L)
{
    luv_set_loop(L, sglr_loop);
    luv_set_callback(L, luv_pcall_cb);
    return luaopen_luv(L);
}

static int open_embedded(lua_State *L)
{
    lua_newtable(L);
    lua_pushcfunction(L, embedded_source);
    lua_setfield(L, -2, "source");
    lua_pushcfunction(L, embedded_list);
    lua_setfield(L, -2, "list");
    return 1;
}

static int lua_panic(lua_State *L)
{
    fprintf(stderr, "sglr: unprotected Lua error: %s\n", lua_tostring(L, -1));
    return 0;
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int main(int argc, char **argv)
{
    /* the trampoline of sglr.proc: before any state of ours is set up, so
     * the command it execs inherits none of it (an ignored SIGPIPE would
     * survive the exec) */
    if (argc > 1 && strcmp(argv[1], SGLR_CHILD_EXEC_ARG) == 0)
        return sglr_child_exec(argc - 2, argv + 2);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    /* Keep freed memory mapped and serve large blocks from the heap, so the
     * steady state (request bodies, prompt strings, radix nodes recycled by
     * eviction) does not fault pages in again and again. */
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
    sglr_loop = uv_default_loop();
    sglr_clock_start();
    lua_State *L = lua_newstate(sglr_lalloc, NULL);
    if (L)
        lua_atpanic(L, lua_panic);
    if (!L) {
        fprintf(stderr, "sglr: cannot create the Lua state\n");
        return 1;
    }
    sglr_L = L;
    luaL_openlibs(L);

    /* luv must see our loop before it is opened */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaded");
    lua_pushcfunction(L, open_luv);
    lua_call(L, 0, 1);
    lua_setfield(L, -2, "luv");
    lua_pop(L, 2);

    sglr_preload(L, "sglr.core", luaopen_sglr_core);
    sglr_preload(L, "sglr.embedded", open_embedded);
    if (luaopen_sglr_radix)
        sglr_preload(L, "sglr.radix", luaopen_sglr_radix);
    if (luaopen_sglr_extract)
        sglr_preload(L, "sglr.extract", luaopen_sglr_extract);
    if (luaopen_sglr_metrics)
        sglr_preload(L, "sglr.metrics", luaopen_sglr_metrics);
    if (luaopen_sglr_httpc)
        sglr_preload(L, "sglr.httpc", luaopen_sglr_httpc);
    install_searchers(L);

    /* global arg, as the standalone interpreter sets it */
    lua_createtable(L, argc, 1);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    lua_setglobal(L, "arg");

    /* run sglr.main in a coroutine so that it may wait on the loop */
    lua_State *co = lua_newthread(L);
    int ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_getglobal(co, "require");
    lua_pushliteral(co, "sglr.main");
    if (lua_pcall(co, 1, 1, 0) != 0) {
        fprintf(stderr, "sglr: %s\n", lua_tostring(co, -1));
        return 1;
    }
    for (int i = 1; i < argc; i++)
        lua_pushstring(co, argv[i]);
    int st = sglr_co_resume(co, ref, argc - 1);
    if (st != 0 && st != LUA_YIELD)
        return 1;

    uv_run(sglr_loop, UV_RUN_DEFAULT);
    sglr_logbuf_flush();
    fflush(stdout);
    fflush(stderr);
    /* Close what is left so pending close callbacks run, then leave without
     * lua_close: finalizers of live objects would touch closed handles. */
    sglr_httpc_shutdown();
    sglr_upstream_release_spares();
    sglr_server_shutdown();
    uv_walk(sglr_loop, close_walk_cb, NULL);
    uv_run(sglr_loop, UV_RUN_NOWAIT);
    sglr_httpc_global_cleanup();
    return sglr_exit_code;
}
