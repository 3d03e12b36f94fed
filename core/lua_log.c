/*
 * lua_log.c: log lines formatted and queued natively (logbuf.c), bound into
 * `sglr.core`:
 *
 *   core.log_line(level, msg, mode, k1, v1, k2, v2, ...)
 *       the text line "<ts> <level> <msg> k1=v1 ...", keys in the order
 *       given, a nil value left out; mode 0 queues it for stderr, 1 queues
 *       it and returns it, 2 only returns it
 *   core.log_write(s)   queue s for stderr as it is
 *   core.log_flush()    write what is queued now
 *
 * The request path's access line goes through here in one call, with no
 * table, no string.format and no write(2) of its own.
 */
#include "lua_common.h"
#include "logbuf.h"

static int l_log_line(lua_State *L)
{
    size_t lvl_len, ml;
    const char *lvl = luaL_checklstring(L, 1, &lvl_len);
    const char *msg = luaL_checklstring(L, 2, &ml);
    int mode = (int)luaL_checkinteger(L, 3);
    int top = lua_gettop(L);
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    size_t start = sglr_logline_begin((double)tv.tv_sec + tv.tv_usec / 1e6, lvl, msg, ml);
    /* arguments are checked as they are written: a bad one drops the line
     * begun (nothing of it is kept) before raising */
    for (int i = 4; i <= top; i += 2) {
        size_t kl, vl;
        int kt = lua_type(L, i);
        const char *k = kt == LUA_TSTRING || kt == LUA_TNUMBER ? lua_tolstring(L, i, &kl) : NULL;
        int t = i + 1 <= top ? lua_type(L, i + 1) : LUA_TNIL;
        if (!k || (t != LUA_TNIL && t != LUA_TSTRING && t != LUA_TNUMBER && t != LUA_TBOOLEAN)) {
            sglr_logline_commit(start, 0);
            if (!k)
                return luaL_argerror(L, i, "string expected");
            return luaL_argerror(L, i + 1, "string, number or boolean expected");
        }
        switch (t) {
        case LUA_TSTRING: {
            const char *v = lua_tolstring(L, i + 1, &vl);
            sglr_logline_str(k, kl, v, vl);
            break;
        }
        case LUA_TNUMBER:
            sglr_logline_num(k, kl, lua_tonumber(L, i + 1));
            break;
        case LUA_TBOOLEAN:
            if (lua_toboolean(L, i + 1))
                sglr_logline_str(k, kl, "true", 4);
            else
                sglr_logline_str(k, kl, "false", 5);
            break;
        default:
            break;
        }
    }
    size_t n = 0;
    const char *line = sglr_logline_end(start, &n);
    if (!line)
        return 0;
    if (mode != 0)
        lua_pushlstring(L, line, n);
    sglr_logline_commit(start, mode != 2);
    return mode != 0;
}


/* The access line of one inference request, called through the FFI from
 * log.lua (M.access): the line core.log_line("info", "request", 0,
 * "duration_ms", dur, "error", err, "prefill", prefill, "request_id", rid,
 * "retries", retries, "route", route, "status", <x's status>, "stream",
 * stream, "worker", worker) queues, byte for byte, without a Lua C call
 * per argument. err and prefill may be NULL (left out); rid NULL is x's
 * own (x:request_id(), empty when it has none). -> 1; 0 when
 * the line could not be queued (out of memory); -1 when x is no live
 * exchange (nothing written: the caller logs the line its own way) */
int sglr_log_access(void *x, double dur, const char *err, size_t errl, const char *prefill,
                    size_t pl, const char *rid, size_t ridl, double retries, const char *route,
                    size_t routel, int stream, const char *worker, size_t wl)
{
    int status = sglr_lua_x_status(x);
    if (status < 0)
        return -1;
    if (!rid) {
        rid = sglr_lua_x_rid(x, &ridl);
        if (!rid) {
            rid = "";
            ridl = 0;
        }
    }
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    size_t start = sglr_logline_begin((double)tv.tv_sec + tv.tv_usec / 1e6, "info", "request", 7);
#define KEY(s) s, sizeof s - 1
    sglr_logline_num(KEY("duration_ms"), dur);
    if (err)
        sglr_logline_str(KEY("error"), err, errl);
    if (prefill)
        sglr_logline_str(KEY("prefill"), prefill, pl);
    sglr_logline_str(KEY("request_id"), rid, ridl);
    sglr_logline_num(KEY("retries"), retries);
    sglr_logline_str(KEY("route"), route, routel);
    sglr_logline_num(KEY("status"), status);
    if (stream)
        sglr_logline_str(KEY("stream"), "true", 4);
    else
        sglr_logline_str(KEY("stream"), "false", 5);
    sglr_logline_str(KEY("worker"), worker, wl);
#undef KEY
    size_t n = 0;
    if (!sglr_logline_end(start, &n))
        return 0;
    sglr_logline_commit(start, 1);
    return 1;
}

static int l_log_write(lua_State *L)
{
    size_t n;
    const char *s = luaL_checklstring(L, 1, &n);
    sglr_logbuf_write(s, n);
    return 0;
}

static int l_log_flush(lua_State *L)
{
    (void)L;
    sglr_logbuf_flush();
    return 0;
}

void sglr_lua_open_log(lua_State *L)
{
    static const luaL_Reg fns[] = {
        { "log_line", l_log_line }, { "log_write", l_log_write }, { "log_flush", l_log_flush },
        { NULL, NULL } };
    luaL_register(L, NULL, fns);
}
