/*
 * test_lalloc.c: the Lua allocator keeps contents across every kind of
 * resize, hands a freed small block back to the next request of its class,
 * and runs a real Lua state.
 */
#include "test.h"
#include "lalloc.h"

#include <stdlib.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = (unsigned char)(seed + i * 7);
}

static int same(const unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != (unsigned char)(seed + i * 7))
            return 0;
    return 1;
}

TEST(resizes_keep_contents)
{
    /* small -> same class -> other class -> large -> larger -> small -> freed */
    size_t sizes[] = { 24, 30, 200, 4000, 100000, 64, 1 };
    unsigned char *p = sglr_lalloc(NULL, NULL, 0, 10);
    CHECK(p);
    fill(p, 10, 3);
    size_t had = 10;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        p = sglr_lalloc(NULL, p, had, sizes[i]);
        CHECK(p);
        CHECK(same(p, had < sizes[i] ? had : sizes[i], 3));
        fill(p, sizes[i], 3);
        had = sizes[i];
    }
    CHECK(sglr_lalloc(NULL, p, had, 0) == NULL);
}

/* The lists hold a collector cycle's garbage of one class (a few MB of
 * request tables), and never more than SGLR_LALLOC_KEEP_ALL in all: past
 * it, freed blocks go back to malloc. */
TEST(free_lists_are_bounded)
{
    size_t base = sglr_lalloc_kept();
    enum { N = 40000 };
    static void *p[N];
    for (int i = 0; i < N; i++)
        p[i] = sglr_lalloc(NULL, NULL, 0, 384);   /* a 16-slot hash part */
    for (int i = 0; i < N; i++)
        sglr_lalloc(NULL, p[i], 384, 0);
    /* 15 MB freed: a cycle's worth is kept (at least 2 MB of it) */
    CHECK(sglr_lalloc_kept() >= base + (2u << 20));
    size_t one = sglr_lalloc_kept();
    for (int c = 1; c <= 32; c++) {                /* every other class */
        for (int i = 0; i < N / 8; i++)
            p[i] = sglr_lalloc(NULL, NULL, 0, (size_t)c * 32);
        for (int i = 0; i < N / 8; i++)
            sglr_lalloc(NULL, p[i], (size_t)c * 32, 0);
    }
    CHECK(sglr_lalloc_kept() > one);
    CHECK(sglr_lalloc_kept() <= SGLR_LALLOC_KEEP_ALL);
}

TEST(small_blocks_are_reused_by_class)
{
    void *a = sglr_lalloc(NULL, NULL, 0, 40);
    CHECK(a);
    CHECK(sglr_lalloc(NULL, a, 40, 0) == NULL);
    void *b = sglr_lalloc(NULL, NULL, 0, 48);     /* same class: 33..48 */
    CHECK(b == a);
    void *c = sglr_lalloc(NULL, b, 48, 33);       /* shrinks within its class: stays */
    CHECK(c == b);
    sglr_lalloc(NULL, c, 33, 0);
    /* a request table's 768-byte hash part is small too */
    void *h = sglr_lalloc(NULL, NULL, 0, 768);
    CHECK(h);
    sglr_lalloc(NULL, h, 768, 0);
    void *volatile m = malloc(768);               /* would take h back, were h malloc's */
    CHECK(sglr_lalloc(NULL, NULL, 0, 768) == h);
    free(m);
    sglr_lalloc(NULL, h, 768, 0);
    void *big = sglr_lalloc(NULL, NULL, 0, 1100); /* large: from malloc */
    CHECK(big);
    sglr_lalloc(NULL, big, 1100, 0);
}

TEST(runs_a_lua_state)
{
    lua_State *L = lua_newstate(sglr_lalloc, NULL);
    CHECK(L);
    luaL_openlibs(L);
    const char *chunk =
        "local t = {} "
        "for i = 1, 20000 do t[i] = { i, tostring(i) .. string.rep('x', i % 700) } end "
        "for i = 1, 20000, 2 do t[i] = nil end collectgarbage() "
        "local n = 0 for i = 2, 20000, 2 do "
        "  if t[i][1] == i and #t[i][2] == #tostring(i) + i % 700 then n = n + 1 end end "
        "return n";
    CHECK_EQ_INT(luaL_dostring(L, chunk), 0);
    CHECK_EQ_INT(lua_tointeger(L, -1), 10000);
    lua_close(L);
}

int main(void)
{
    RUN(resizes_keep_contents);
    RUN(small_blocks_are_reused_by_class);
    RUN(free_lists_are_bounded);
    RUN(runs_a_lua_state);
    TEST_EXIT();
}
