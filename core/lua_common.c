/*
 * lua_common.c: helpers shared by the bindings of sglr.core (see
 * lua_common.h).
 */
#include "lua_common.h"
#include "server.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

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

void **sglr_lua_gc_box(lua_State *L, const char *mt)
{
    sglr_box_t *b = lua_touserdata(L, 1);
    if (!b || lua_objlen(L, 1) != sizeof *b || b->type != mt)
        return NULL;
    return &b->p;
}

/* Metatables by type tag, so a new box does not look its metatable up by
 * name (hashing the name) on every request: open addressing on the tag's
 * address, so the lookup is a probe or two, whatever the number of types. */
#define MT_SLOTS 32
static struct {
    const char *mt;
    int ref;
    int done_ref;       /* its twin without __gc (sglr_lua_box_done), or 0 */
} mt_refs[MT_SLOTS];

/* The entry of mt, made on first use; -1 when the table is full or mt has
 * no metatable. */
static int mt_slot(lua_State *L, const char *mt)
{
    unsigned h = (unsigned)((uintptr_t)mt >> 3);
    int i = -1;
    for (int k = 0; k < MT_SLOTS; k++) {
        i = (int)((h + (unsigned)k) & (MT_SLOTS - 1));
        if (mt_refs[i].mt == mt)
            return i;
        if (!mt_refs[i].mt)
            break;
        i = -1;
    }
    if (i < 0)
        return -1;
    luaL_getmetatable(L, mt);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return -1;
    }
    mt_refs[i].ref = luaL_ref(L, LUA_REGISTRYINDEX);
    mt_refs[i].mt = mt;
    return i;
}

static void push_mt(lua_State *L, const char *mt)
{
    int i = mt_slot(L, mt);
    if (i >= 0)
        lua_rawgeti(L, LUA_REGISTRYINDEX, mt_refs[i].ref);
    else
        luaL_getmetatable(L, mt);
}

void sglr_lua_box_done(lua_State *L, int idx, const char *mt)
{
    int i = mt_slot(L, mt);
    if (i < 0)
        return;
    if (!mt_refs[i].done_ref) {
        /* every field of the type's metatable but __gc (the same __index) */
        lua_newtable(L);
        lua_rawgeti(L, LUA_REGISTRYINDEX, mt_refs[i].ref);
        lua_pushnil(L);
        while (lua_next(L, -2)) {
            if (lua_type(L, -2) == LUA_TSTRING && strcmp(lua_tostring(L, -2), "__gc") == 0) {
                lua_pop(L, 1);
                continue;
            }
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, -5);
        }
        lua_pop(L, 1);
        mt_refs[i].done_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    lua_rawgeti(L, LUA_REGISTRYINDEX, mt_refs[i].done_ref);
    lua_setmetatable(L, idx);
}

void **sglr_lua_new_box(lua_State *L, const char *mt, void *p)
{
    sglr_box_t *b = lua_newuserdata(L, sizeof *b);
    b->p = p;
    b->type = mt;
    push_mt(L, mt);
    lua_setmetatable(L, -2);
    return &b->p;
}

void sglr_lua_box_revive(lua_State *L, int idx, const char *mt, void *p)
{
    if (idx < 0 && idx > LUA_REGISTRYINDEX)
        idx = lua_gettop(L) + idx + 1;
    sglr_box_t *b = lua_touserdata(L, idx);
    b->p = p;
    b->type = mt;
    push_mt(L, mt);
    lua_setmetatable(L, idx);
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

/* The pair on top of the stack (name at -2, value at -1): its bytes, or an
 * error message. */
static const char *header_pair(lua_State *L, const char **k, size_t *kl, const char **v,
                               size_t *vl)
{
    if (lua_type(L, -2) != LUA_TSTRING || !(lua_type(L, -1) == LUA_TSTRING ||
                                             lua_type(L, -1) == LUA_TNUMBER))
        return "header names and values must be strings";
    *k = lua_tolstring(L, -2, kl);
    *v = lua_tolstring(L, -1, vl);
    /* Lua ends a string with a zero byte (the manual promises it), so
     * strcspn stops short of the length at a forbidden byte or at a zero
     * inside the string */
    int bad = *kl == 0 || strcspn(*k, "\r\n: ") != *kl || strcspn(*v, "\r\n") != *vl;
    return bad ? "header contains a forbidden character" : NULL;
}

const char *sglr_lua_table_headers(lua_State *L, int idx, sglr_buf_t *b)
{
    if (lua_isnoneornil(L, idx))
        return NULL;
    if (!lua_istable(L, idx))
        return "headers must be a table";
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        const char *k, *v;
        size_t kl, vl;
        const char *err = header_pair(L, &k, &kl, &v, &vl);
        if (!err && sglr_buf_append_header(b, k, kl, v, vl))
            err = "out of memory";
        if (err) {
            lua_pop(L, 2);
            return err;
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
    /* by length first: most headers are none of these */
    switch (len) {
    case 2: return memcmp(n, "te", 2) == 0;
    case 4: return memcmp(n, "host", 4) == 0;
    case 6: return memcmp(n, "expect", 6) == 0;
    case 7: return memcmp(n, "trailer", 7) == 0 || memcmp(n, "upgrade", 7) == 0;
    case 10: return memcmp(n, "connection", 10) == 0 || memcmp(n, "keep-alive", 10) == 0;
    case 14: return memcmp(n, "content-length", 14) == 0;
    case 16: return memcmp(n, "proxy-connection", 16) == 0;
    case 17: return memcmp(n, "transfer-encoding", 17) == 0;
    default: return 0;
    }
}

/* name (lowercase) is one of the comma-separated tokens of list, compared
 * without case. */
static int in_token_list(const char *list, size_t len, const char *name, size_t nl)
{
    size_t i = 0;
    while (i < len) {
        while (i < len && (list[i] == ' ' || list[i] == '\t' || list[i] == ','))
            i++;
        size_t start = i;
        while (i < len && list[i] != ',' && list[i] != ' ' && list[i] != '\t')
            i++;
        if (i - start == nl && strncasecmp(list + start, name, nl) == 0)
            return 1;
    }
    return 0;
}

const char *sglr_head_merge(const sglr_head_t *h, const sglr_hpair_t *add, int nadd, sglr_buf_t *b)
{
    /* headers the sender named in Connection are hop-by-hop too (RFC 9110
     * 7.6.1): they end here */
    size_t cl = 0;
    const char *conn = h ? sglr_head_get(h, "connection", &cl) : NULL;
    for (int i = 0; h && i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        const char *n = h->buf.data + hd->name_off;
        if (is_hop_header(n, hd->name_len) || (conn && in_token_list(conn, cl, n, hd->name_len)))
            continue;
        int overridden = 0;
        for (int k = 0; k < nadd && !overridden; k++)
            overridden = add[k].kl == hd->name_len && memcmp(add[k].k, n, hd->name_len) == 0;
        if (!overridden && sglr_buf_append_header(b, n, hd->name_len,
                                                  h->buf.data + hd->value_off, hd->value_len))
            return "out of memory";
    }
    for (int k = 0; k < nadd; k++)
        if (add[k].v && sglr_buf_append_header(b, add[k].k, add[k].kl, add[k].v, add[k].vl))
            return "out of memory";
    return NULL;
}

int sglr_lua_relay_headers(lua_State *L, int idx, sglr_hpair_t add[2],
                           const struct sglr_exchange_s *x)
{
    add[0] = (sglr_hpair_t){ "x-request-id", NULL, 12, 0 };
    add[1] = (sglr_hpair_t){ "authorization", NULL, 13, 0 };
    int it = lua_type(L, idx);
    if ((it == LUA_TNIL || (it == LUA_TBOOLEAN && !lua_toboolean(L, idx))) && x && x->rid) {
        /* x's own: a header value or generated, no CR or LF in either */
        add[0].v = x->rid;
        add[0].vl = x->rid_len;
    } else {
        add[0].v = luaL_checklstring(L, idx, &add[0].vl);
        if (strcspn(add[0].v, "\r\n") != add[0].vl)
            return luaL_argerror(L, idx, "header contains a forbidden character");
    }
    int at = lua_type(L, idx + 1);
    if (at == LUA_TSTRING) {
        add[1].v = lua_tolstring(L, idx + 1, &add[1].vl);
        if (strcspn(add[1].v, "\r\n") != add[1].vl)
            return luaL_argerror(L, idx + 1, "header contains a forbidden character");
        return 2;
    }
    if (at == LUA_TBOOLEAN && !lua_toboolean(L, idx + 1))
        return 2;                       /* NULL value: the client's is dropped */
    if (at != LUA_TNONE && at != LUA_TNIL)
        return luaL_argerror(L, idx + 1, "a string, false or nil expected");
    return 1;
}

const char *sglr_lua_headers(lua_State *L, const sglr_head_t *h, int idx, sglr_buf_t *b)
{
    return sglr_lua_headers_id(L, h, idx, 0, b);
}

const char *sglr_lua_headers_id(lua_State *L, const sglr_head_t *h, int idx, int rid, sglr_buf_t *b)
{
    /* the table's pairs, checked once; a string stays referenced by the
     * table (or the stack) while it is used */
    sglr_hpair_t add[33];
    int nadd = 0;
    if (idx && !lua_isnil(L, idx)) {
        if (!lua_istable(L, idx))
            return "headers must be a table";
        lua_pushnil(L);
        while (lua_next(L, idx)) {
            const char *err = NULL;
            if (nadd == 32) {
                err = "at most 32 extra headers";
            } else if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1) &&
                       lua_type(L, -2) == LUA_TSTRING) {
                /* name = false: h's header of that name is dropped */
                add[nadd].k = lua_tolstring(L, -2, &add[nadd].kl);
                add[nadd].v = NULL;
                add[nadd].vl = 0;
            } else {
                err = header_pair(L, &add[nadd].k, &add[nadd].kl, &add[nadd].v, &add[nadd].vl);
            }
            if (err) {
                lua_pop(L, 2);
                return err;
            }
            nadd++;
            lua_pop(L, 1);
        }
    }
    if (rid && !lua_isnoneornil(L, rid)) {
        if (lua_type(L, rid) != LUA_TSTRING)
            return "the request id must be a string";
        int named = 0;
        for (int k = 0; k < nadd && !named; k++)
            named = add[k].kl == 12 && memcmp(add[k].k, "x-request-id", 12) == 0;
        if (!named) {
            add[nadd] = (sglr_hpair_t){ "x-request-id", NULL, 12, 0 };
            add[nadd].v = lua_tolstring(L, rid, &add[nadd].vl);
            if (strcspn(add[nadd].v, "\r\n") != add[nadd].vl)
                return "header contains a forbidden character";
            nadd++;
        }
    }
    return sglr_head_merge(h, add, nadd, b);
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

/* --- interned option keys ------------------------------------------------- */

static const char *const key_names[SGLR_KEY_COUNT] = {
    "method", "path", "body", "connect_timeout_ms", "timeout_ms", "max_body", "headers",
    "route", "host", "port", "batch", "logprobs",
};
static int key_refs[SGLR_KEY_COUNT];
static int keys_ready;

static void keys_init(lua_State *L)
{
    for (int i = 0; i < SGLR_KEY_COUNT; i++) {
        lua_pushstring(L, key_names[i]);
        key_refs[i] = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    keys_ready = 1;
}

void sglr_lua_getopt(lua_State *L, int idx, int key)
{
    if (!keys_ready)
        keys_init(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, key_refs[key]);
    lua_rawget(L, idx);
}


int sglr_relay_held(int status)
{
    return status == 408 || status == 429 || status == 500 || status == 502 || status == 503 ||
           status == 504;
}

int sglr_relay_holds(int hold, int status)
{
    return hold == SGLR_HOLD_ALL || (hold == SGLR_HOLD_RETRYABLE && sglr_relay_held(status)) ||
           (hold == SGLR_HOLD_ERRORS && status >= 400);
}

int sglr_commit_hdrs_keep(lua_State *L, sglr_commit_hdrs_t *c, const char *rid, size_t ridl,
                          int extra)
{
    c->rid = ridl <= sizeof c->rid_in ? c->rid_in : malloc(ridl);
    if (!c->rid)
        return -ENOMEM;
    memcpy(c->rid, rid, ridl);
    c->ridl = ridl;
    if (extra) {
        lua_pushvalue(L, extra);
        c->extra_ref = sglr_ref(L);
    }
    return 0;
}

void sglr_commit_hdrs_drop(sglr_commit_hdrs_t *c)
{
    if (c->rid && c->rid != c->rid_in)
        free(c->rid);
    c->rid = NULL;
    if (c->extra_ref != LUA_NOREF) {
        sglr_unref(c->extra_ref);
        c->extra_ref = LUA_NOREF;
    }
}

const char *sglr_commit_hdrs_merge(lua_State *co, const sglr_commit_hdrs_t *c,
                                   const sglr_head_t *h, sglr_buf_t *b)
{
    if (c->extra_ref == LUA_NOREF) {
        sglr_hpair_t add = { "x-request-id", c->rid, 12, c->ridl };
        return sglr_head_merge(h, &add, 1, b);
    }
    lua_rawgeti(co, LUA_REGISTRYINDEX, c->extra_ref);
    lua_pushlstring(co, c->rid, c->ridl);
    int top = lua_gettop(co);
    const char *err = sglr_lua_headers_id(co, h, top - 1, top, b);
    lua_pop(co, 2);
    return err;
}

int sglr_lua_check_extra(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return 0;
    sglr_buf_t tmp = sglr_lua_scratch_take();
    const char *err = sglr_lua_headers(L, NULL, idx, &tmp);
    sglr_lua_scratch_give(&tmp);
    if (err)
        luaL_error(L, "%s", err);
    return idx;
}
