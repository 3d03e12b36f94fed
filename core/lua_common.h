/*
 * lua_common.h: what the bindings of sglr.core share (lua_core.c for the
 * scheduler, lua_server.c for the HTTP server, lua_proxy.c for the proxy).
 *
 * A C object in Lua is a box: a userdata holding the object's pointer and
 * its type tag. The tag is the address of the type's metatable name, so a
 * type check is a pointer compare instead of a registry lookup on every
 * method call. __gc clears the pointer, so a closed box raises "is closed".
 */
#ifndef SGLR_LUA_COMMON_H
#define SGLR_LUA_COMMON_H

#include "sglr.h"
#include "msg.h"

typedef struct {
    void *p;                  /* first: __gc functions read it as void ** */
    const char *type;
} sglr_box_t;

/* The box at idx, of type mt (the caller has checked), is spent (its
 * pointer cleared or pointing at a closed stand-in) and owns nothing: it
 * gets its type's metatable without __gc, so the collector frees it as
 * plain memory instead of running a finalizer that would find nothing to
 * do (and keeping it a cycle longer). Its methods still answer as a closed
 * box's. */
void sglr_lua_box_done(lua_State *L, int idx, const char *mt);

/* What x:relay_pipe and x:relay_pd keep for the caller instead of passing
 * on at the head (their hold argument): nothing, the statuses a retry
 * takes (sglr_relay_held: those of sglr.retry's retryable_status, which the
 * flow checks), every status >= 400, or every status. */
enum { SGLR_HOLD_NONE, SGLR_HOLD_RETRYABLE, SGLR_HOLD_ERRORS, SGLR_HOLD_ALL };
int sglr_relay_held(int status);
int sglr_relay_holds(int hold, int status);

/* What x:relay_pipe and x:relay_pd keep for a commit made at a response
 * head, when no Lua call is running: the request id for x-request-id and
 * the caller's extra headers table (a registry ref). Zeroed memory with
 * extra_ref set to LUA_NOREF is an empty one. */
typedef struct {
    int extra_ref;
    char *rid;                /* rid_in, or malloc'd when longer */
    size_t ridl;
    char rid_in[64];
} sglr_commit_hdrs_t;
/* Keep the request id (ridl bytes, checked) and the table at extra (0:
 * none; checked, see sglr_lua_check_extra). -> 0 | -ENOMEM (nothing kept) */
int sglr_commit_hdrs_keep(lua_State *L, sglr_commit_hdrs_t *c, const char *rid, size_t ridl,
                          int extra);
void sglr_commit_hdrs_drop(sglr_commit_hdrs_t *c);
/* h's headers (see sglr_lua_headers) with the kept ones, into b; co is the
 * waiting coroutine, whose stack lends the table for the merge (and is
 * left as it was). Returns an error message (out of memory) or NULL. */
const char *sglr_commit_hdrs_merge(lua_State *co, const sglr_commit_hdrs_t *c,
                                   const sglr_head_t *h, sglr_buf_t *b);
/* The extra headers argument at idx: 0 when nil or absent, else idx once
 * its pairs are checked (raises for a bad one, before anything is sent). */
int sglr_lua_check_extra(lua_State *L, int idx);

/* metatable names, shared because they are type tags */
extern const char sglr_lua_exchange_mt[];

/* Option keys read on every request, interned once: sglr_lua_getopt(L,
 * idx, SGLR_KEY_ROUTE) pushes t.route for the table at idx (an absolute
 * index), as lua_rawget does with the key pushed, without hashing and looking up the key's
 * string again each call. */
enum {
    SGLR_KEY_METHOD, SGLR_KEY_PATH, SGLR_KEY_BODY, SGLR_KEY_CONNECT_TIMEOUT_MS,
    SGLR_KEY_TIMEOUT_MS, SGLR_KEY_MAX_BODY, SGLR_KEY_HEADERS, SGLR_KEY_ROUTE,
    SGLR_KEY_HOST, SGLR_KEY_PORT, SGLR_KEY_BATCH, SGLR_KEY_LOGPROBS, SGLR_KEY_COUNT
};
void sglr_lua_getopt(lua_State *L, int idx, int key);

/* The object in box idx of type mt; raises on another type or a closed box. */
void *sglr_lua_check_box(lua_State *L, int idx, const char *mt);
/* Push a new box of type mt around p; returns where the pointer lives. */
void **sglr_lua_new_box(lua_State *L, const char *mt, void *p);
/* The spent box at idx (sglr_lua_box_done) around p again, with its
 * type's metatable: for a box nothing but its owner can hold any more. */
void sglr_lua_box_revive(lua_State *L, int idx, const char *mt, void *p);
/* In a __gc function: the box at 1 when it is of type mt (a script could
 * call the function on anything), else NULL. */
void **sglr_lua_gc_box(lua_State *L, const char *mt);
/* The client exchange in box idx (sglr.exchange); raises otherwise. */
struct sglr_exchange_s *sglr_lua_check_exchange(lua_State *L, int idx);

/* Register metatable name with methods as __index and gc as __gc. */
void sglr_lua_new_mt(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction gc);

/* One reusable buffer for header blocks built during a call: whatever uses
 * it copies the bytes before returning. Taken and given back so a nested
 * use cannot clobber it. */
sglr_buf_t sglr_lua_scratch_take(void);
void sglr_lua_scratch_give(sglr_buf_t *b);

/* Append the Lua table of headers {name = value} at idx as "name: value\r\n"
 * lines. Returns an error message (names or values with CR/LF are refused:
 * header injection), or NULL. */
const char *sglr_lua_table_headers(lua_State *L, int idx, sglr_buf_t *b);
/* Append h's headers (h may be NULL) that are not hop-by-hop and not
 * overridden by the Lua table at idx (0 or nil: none; keys lowercase
 * there), then the table's; a name mapped to false drops h's header of
 * that name (a client's credentials that must not reach a worker). One
 * pass over the table. Returns an error message, or NULL. */
const char *sglr_lua_headers(lua_State *L, const sglr_head_t *h, int idx, sglr_buf_t *b);
/* The same, and when the stack slot rid (0: none) holds a string, an
 * x-request-id header of it after the table's, unless the table names
 * x-request-id itself. */
const char *sglr_lua_headers_id(lua_State *L, const sglr_head_t *h, int idx, int rid, sglr_buf_t *b);
/* The same from C: add[] are the extra headers (lowercase names; a NULL
 * value drops h's header of that name), already checked. */
typedef struct {
    const char *k, *v;
    size_t kl, vl;
} sglr_hpair_t;
const char *sglr_head_merge(const sglr_head_t *h, const sglr_hpair_t *add, int nadd, sglr_buf_t *b);
/* x:relay's and x:relay_pd's header arguments at idx (the request id:
 * nil or false for the one x keeps, see sglr_lua_x_set_request_id) and
 * idx + 1 (authorization: a string to set, false to drop the client's,
 * nil to pass it) into add[]; returns how many of add[] apply. Raises on
 * anything else, a CR or LF in either, or no id at all. */
struct sglr_exchange_s;
int sglr_lua_relay_headers(lua_State *L, int idx, sglr_hpair_t add[2],
                           const struct sglr_exchange_s *x);
/* Push h's headers as a table {name = value}, repeated names joined. */
void sglr_lua_push_head(lua_State *L, const sglr_head_t *h);

/* Close callback of handles whose data is their malloc'd owner. */
void sglr_lua_free_data_close_cb(uv_handle_t *h);

/* Openers of the parts of sglr.core: each registers its metatables and adds
 * its functions to the module table on top of the stack. */
void sglr_lua_open_server(lua_State *L);
void sglr_lua_open_proxy(lua_State *L);
void sglr_lua_open_pd(lua_State *L);
void sglr_lua_open_log(lua_State *L);

/* The worker pool in box idx (sglr.pool, lua_proxy.c); raises otherwise. */
struct sglr_pool_s *sglr_lua_check_pool(lua_State *L, int idx);

#endif
