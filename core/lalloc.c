/*
 * lalloc.c: the Lua state's allocator (lua_newstate's lua_Alloc).
 *
 *   small_free[c] -> block -> block -> NULL     c = (size - 1) / 16, size <= 1024
 */
#include "lalloc.h"

#include <stdlib.h>
#include <string.h>

/* Lua allocations go through malloc: LuaJIT's own allocator maps and unmaps
 * every block over 128 KB (a long prompt string), and on a VM each fresh
 * page costs a fault; glibc reuses freed memory instead. Small blocks (the
 * tables, strings and closures each request makes and drops) are kept on
 * free lists by size class, 16 bytes apart: LuaJIT frees a block with its
 * exact size, so the class of osize is the class it came from, and a list
 * hands one back in a few instructions where malloc and free took over a
 * hundred. Up to 1 KB: a request's table of 17 to 32 fields has a hash
 * part of 768 bytes. Each list holds at most SMALL_KEEP bytes and all of
 * them SMALL_KEEP_ALL; the rest is freed. The collector frees a cycle's
 * garbage at once (about a megabyte of request tables at the default
 * pause), so a list must hold a cycle's worth of its class or the next
 * cycle's requests go to malloc again (at 512 KB a list, one malloc and
 * half a free a request did). */
#define SMALL_MAX 1024
#define SMALL_CLASSES (SMALL_MAX / 16)
#define SMALL_KEEP (1u << 22)
#define SMALL_KEEP_ALL SGLR_LALLOC_KEEP_ALL

static void *small_free[SMALL_CLASSES];
static size_t small_kept[SMALL_CLASSES];
static size_t small_kept_all;

size_t sglr_lalloc_kept(void)
{
    return small_kept_all;
}

static inline size_t small_class(size_t n)
{
    return (n - 1) / 16;    /* n in 1..SMALL_MAX */
}

static void *small_alloc(size_t n)
{
    size_t c = small_class(n);
    void *p = small_free[c];
    if (p) {
        small_free[c] = *(void **)p;
        small_kept[c] -= (c + 1) * 16;
        small_kept_all -= (c + 1) * 16;
        return p;
    }
    return malloc((c + 1) * 16);
}

static void small_release(void *p, size_t n)
{
    size_t c = small_class(n);
    if (small_kept[c] + (c + 1) * 16 > SMALL_KEEP || small_kept_all + (c + 1) * 16 > SMALL_KEEP_ALL) {
        free(p);
        return;
    }
    *(void **)p = small_free[c];
    small_free[c] = p;
    small_kept[c] += (c + 1) * 16;
    small_kept_all += (c + 1) * 16;
}

void *sglr_lalloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    (void)ud;
    int osmall = ptr && osize && osize <= SMALL_MAX;
    if (nsize == 0) {
        if (osmall)
            small_release(ptr, osize);
        else
            free(ptr);
        return NULL;
    }
    if (!ptr) {
        if (nsize <= SMALL_MAX)
            return small_alloc(nsize);
        return malloc(nsize);
    }
    if (osmall && nsize <= SMALL_MAX && small_class(osize) == small_class(nsize))
        return ptr;
    if (!osmall && nsize > SMALL_MAX)
        return realloc(ptr, nsize);
    /* across the small/large line or between classes: move */
    void *np = nsize <= SMALL_MAX ? small_alloc(nsize) : malloc(nsize);
    if (!np)
        return NULL;
    memcpy(np, ptr, osize < nsize ? osize : nsize);
    if (osmall)
        small_release(ptr, osize);
    else
        free(ptr);
    return np;
}

