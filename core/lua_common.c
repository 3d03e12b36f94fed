/*
 * lua_common.c: helpers shared by the bindings of sglr.core (see
 * lua_common.h).
 */
#include "lua_common.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

const char sglr_lua_exchange_mt[] = "sglr.exchange";

void *sglr_lua_check_box(lua_State *L, int idx, const char *mt)
{
    sglr_box_t *b = lua_touserdata(L, idx);
    if (!b || lua_objlen(L, idx) != sizeof *b || b->type != mt)
        luaL_typerror(L, idx, mt);
    if (!b->p)
        luaL_error(L, "%s is closed", mt);
    return b->p;
}

void **sglr_lua_new_box(lua_State *L, const char *mt, void *p)
{
    sglr_box_t *b = lua_newuserdata(L, sizeof *b);
    b->p = p;
    b->type = mt;
    luaL_getmetatable(L, mt);
    lua_setmetatable(L, -2);
    return &b->p;
}

static sglr_buf_t scratch;

sglr_buf_t sglr_lua_scratch_take(void)
{
    sglr_buf_t b = scratch;
    scratch = (sglr_buf_t){ 0 };
    b.len = 0;
    return b;
}

void sglr_lua_scratch_give(sglr_buf_t *b)
{
    if (!scratch.data && b->cap <= (64u << 10)) {
        scratch = *b;
        scratch.len = 0;
    } else {
        sglr_buf_free(b);
    }
    *b = (sglr_buf_t){ 0 };
}

const char *sglr_lua_table_headers(lua_State *L, int idx, sglr_buf_t *b)
{
    if (lua_isnoneornil(L, idx))
        return NULL;
    if (!lua_istable(L, idx))
        return "headers must be a table";
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        size_t kl, vl;
        const char *k = lua_tolstring(L, -2, &kl);
        if (lua_type(L, -2) != LUA_TSTRING || !(lua_type(L, -1) == LUA_TSTRING ||
                                                 lua_type(L, -1) == LUA_TNUMBER)) {
            lua_pop(L, 2);
            return "header names and values must be strings";
        }
        const char *v = lua_tolstring(L, -1, &vl);
        int bad = kl == 0;
        for (size_t i = 0; i < kl && !bad; i++)
            bad = k[i] == '\r' || k[i] == '\n' || k[i] == ':' || k[i] == 0 || k[i] == ' ';
        for (size_t i = 0; i < vl && !bad; i++)
            bad = v[i] == '\r' || v[i] == '\n' || v[i] == 0;
        if (bad) {
            lua_pop(L, 2);
            return "header contains a forbidden character";
        }
        if (sglr_buf_append(b, k, kl) || sglr_buf_append(b, ": ", 2) ||
            sglr_buf_append(b, v, vl) || sglr_buf_append(b, "\r\n", 2)) {
            lua_pop(L, 2);
            return "out of memory";
        }
        lua_pop(L, 1);
    }
    return NULL;
}

void sglr_lua_push_head(lua_State *L, const sglr_head_t *h)
{
    lua_createtable(L, 0, h->nhdrs);
    for (int i = 0; i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        lua_pushlstring(L, h->buf.data + hd->name_off, hd->name_len);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, h->buf.data + hd->value_off, hd->value_len);
        } else {
            /* repeated header: join as the HTTP list form */
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, h->buf.data + hd->value_off, hd->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
}

static int is_hop_header(const char *n, size_t len)
{
    static const struct { const char *name; size_t len; } hop[] = {
        { "connection", 10 }, { "keep-alive", 10 }, { "proxy-connection", 16 },
        { "transfer-encoding", 17 }, { "te", 2 }, { "trailer", 7 }, { "upgrade", 7 },
        { "host", 4 }, { "content-length", 14 }, { "expect", 6 },
    };
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (hop[i].len == len && n[0] == hop[i].name[0] && memcmp(hop[i].name, n, len) == 0)
            return 1;
    return 0;
}

/* The override names are collected once, so no Lua string is made per
 * header. */
int sglr_lua_copy_headers(lua_State *L, const sglr_head_t *h, int idx, sglr_buf_t *b)
{
    const char *skip[32];
    size_t skiplen[32];
    int nskip = 0;
    if (idx && lua_istable(L, idx)) {
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            if (lua_type(L, -2) == LUA_TSTRING && nskip < 32) {
                skip[nskip] = lua_tolstring(L, -2, &skiplen[nskip]);
                nskip++;
            }
            lua_pop(L, 1);
        }
    }
    for (int i = 0; i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        const char *n = h->buf.data + hd->name_off;
        if (is_hop_header(n, hd->name_len))
            continue;
        int overridden = 0;
        for (int k = 0; k < nskip && !overridden; k++)
            overridden = skiplen[k] == hd->name_len && memcmp(skip[k], n, skiplen[k]) == 0;
        if (overridden)
            continue;
        if (sglr_buf_append(b, n, hd->name_len) || sglr_buf_append(b, ": ", 2) ||
            sglr_buf_append(b, h->buf.data + hd->value_off, hd->value_len) ||
            sglr_buf_append(b, "\r\n", 2))
            return -ENOMEM;
    }
    return 0;
}
void sglr_lua_free_data_close_cb(uv_handle_t *h)
{
    free(h->data);
}


void sglr_lua_new_mt(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc)
{
    luaL_newmetatable(L, name);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    if (gc) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
}
