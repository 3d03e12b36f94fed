/* lalloc.h: the Lua state's allocator (lalloc.c). */
#ifndef SGLR_LALLOC_H
#define SGLR_LALLOC_H

#include <stddef.h>

/* A lua_Alloc: blocks up to 1 KB from free lists by size class, the
 * rest from malloc. Single-threaded (one Lua state). */
void *sglr_lalloc(void *ud, void *ptr, size_t osize, size_t nsize);
/* Bytes the free lists hold now, and at most (over all lists). */
size_t sglr_lalloc_kept(void);
#define SGLR_LALLOC_KEEP_ALL (16u << 20)

#endif
