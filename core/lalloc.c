/*
 * lalloc.c: the Lua state's allocator (lua_newstate's lua_Alloc).
 *
 *   spare[c].v = { block, block, ... }      c = (size - 1) / 16, size <= 1024
 */
#include "lalloc.h"

#include <stdlib.h>
#include <string.h>

/* Lua allocations go through malloc: LuaJIT's own allocator maps and unmaps
 * every block over 128 KB (a long prompt string), and on a VM each fresh
 * page costs a fault; glibc reuses freed memory instead. Small blocks (the
 * tables, strings and closures each request makes and drops) are kept by
 * size class, 16 bytes apart: LuaJIT frees a block with its exact size, so
 * the class of osize is the class it came from, and a class hands one back
 * in a few instructions where malloc and free took over a hundred. Up to
 * 1 KB: a request's table of 17 to 32 fields has a hash part of 768 bytes.
 * Each class holds at most SMALL_KEEP bytes and all of them SMALL_KEEP_ALL;
 * the rest is freed. The collector frees a cycle's garbage at once (about
 * a megabyte at the default pause), so a class must hold a cycle's worth
 * or the next cycle's requests go to malloc again (at 512 KB a class, one
 * malloc and half a free a request did).
 *
 * A class is an array of the kept blocks' addresses, not a list linked
 * through them: a block comes back a collector cycle after it was freed,
 * out of the caches by then, and a list's next pointer is read from it
 * (a load that stalls on memory: the allocator was a tenth of the router's
 * user time by perf); from an array the block is only written, by LuaJIT
 * making the new object, and a store does not wait for the line. */
#define SMALL_MAX 1024
#define SMALL_CLASSES (SMALL_MAX / 16)
#define SMALL_KEEP (1u << 22)
#define SMALL_KEEP_ALL SGLR_LALLOC_KEEP_ALL

typedef struct {
    void **v;
    size_t n, cap;
} spare_t;

static spare_t spare[SMALL_CLASSES];
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
    spare_t *s = &spare[c];
    if (s->n) {
        small_kept_all -= (c + 1) * 16;
        return s->v[--s->n];
    }
    return malloc((c + 1) * 16);
}

static void small_release(void *p, size_t n)
{
    size_t c = small_class(n), size = (c + 1) * 16;
    spare_t *s = &spare[c];
    if ((s->n + 1) * size > SMALL_KEEP || small_kept_all + size > SMALL_KEEP_ALL) {
        free(p);
        return;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        void **v = realloc(s->v, cap * sizeof *v);
        if (!v) {
            free(p);
            return;
        }
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = p;
    small_kept_all += size;
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

