/*
 * radix.h: the approximate prefix tree that cache-aware routing matches on.
 *
 * One tree is shared by all workers. Each edge holds a run of routing-text
 * bytes; each node lists its tenants, the workers (small ints) that were
 * sent text passing through it, with a logical last-access stamp:
 *
 *     (root)
 *       +-- "You are a helpful " {w0:7, w1:9}
 *       |      +-- "assistant. Hi"   {w0:7}
 *       |      +-- "pirate. Arr"     {w1:9}
 *       +-- "Translate: " {w2:4}
 *
 * Invariants: a worker that holds a node holds every ancestor, with a stamp
 * at least as recent (stamps are refreshed along the whole path), so a
 * worker's entries always form a subtree hanging from the root and the
 * least recently used ones are its leaves. Stamps come from a counter
 * bumped by every insert and match, so the tree is deterministic.
 *
 * Sizes are in bytes of text: an edge counts once for each of its tenants.
 * The tree knows nothing of Lua; core/lua_radix.c binds it.
 */
#ifndef SGLR_RADIX_H
#define SGLR_RADIX_H

#include <stddef.h>
#include <stdint.h>

typedef struct sglr_radix sglr_radix_t;

/* Largest worker id accepted (ids are dense small ints, see lua_radix.c). */
#define SGLR_RADIX_MAX_WORKER 65535

/* NULL when out of memory. */
sglr_radix_t *sglr_radix_new(void);
void sglr_radix_free(sglr_radix_t *t);

/* Record that worker was sent s[0..n): splits edges as needed and marks
 * worker a tenant, with a fresh stamp, of every node on the path.
 * Returns 0, -EINVAL for a bad worker id, -ENOMEM (the tree stays valid,
 * the text is recorded partly or not at all). */
int sglr_radix_insert(sglr_radix_t *t, const char *s, size_t n, int worker);

/* Longest prefix of s[0..n) held by an allowed worker. allowed is a bitset
 * (bit w of byte w/8) over nbits worker ids, or NULL for every worker.
 * Returns the matched length rounded down to a UTF-8 character boundary;
 * *worker_out is the allowed tenant of the deepest matched node with the
 * most recent stamp (its stamps along the path are refreshed), or -1 when
 * nothing matched. */
size_t sglr_radix_match(sglr_radix_t *t, const char *s, size_t n,
                        const uint8_t *allowed, size_t nbits, int *worker_out);

/* The same two, for a text a caller can name with a key (nonzero, never
 * given to another text: the router numbers each request's routing text).
 * A keyed match remembers the nodes it walked; a keyed insert of the same
 * text (same key, pointer and length) with nothing else inserted,
 * evicted or removed since takes its tenancies along them and goes on
 * from where the match stopped instead of comparing the text again. Key
 * 0 is the plain call. */
size_t sglr_radix_match_keyed(sglr_radix_t *t, const char *s, size_t n, const uint8_t *allowed,
                              size_t nbits, int *worker_out, uint64_t key);
int sglr_radix_insert_keyed(sglr_radix_t *t, const char *s, size_t n, int worker, uint64_t key);

/* Drop every entry of worker; nodes nobody holds any more are freed. */
void sglr_radix_remove_worker(sglr_radix_t *t, int worker);

/* Bytes of text attributed to worker. */
size_t sglr_radix_size(const sglr_radix_t *t, int worker);

/* For every worker holding more than max_chars, drop its least recently
 * used leaf entries until it holds at most max_chars. Returns the bytes of
 * attribution removed (sum over workers). */
size_t sglr_radix_evict(sglr_radix_t *t, size_t max_chars);

typedef struct {
    size_t nodes;       /* nodes, root excluded */
    size_t chars;       /* bytes stored in edges (each edge once) */
    size_t tenancies;   /* (node, worker) pairs */
    size_t kept;        /* bytes of released edge blocks kept for reuse
                         * (at most max(chars, 1 MB) when released) */
    uint64_t resumed;   /* keyed inserts that went on from their match */
} sglr_radix_stats_t;

void sglr_radix_stats(const sglr_radix_t *t, sglr_radix_stats_t *out);

/* Test hook: nonzero makes the next allocation in the tree fail. The
 * library's own definition is weak and returns 0; a test may override it. */
int sglr_radix_alloc_fails(void);

/* Verify every invariant (for tests): 0 when sound, else the negated line
 * number in radix.c of the first check that failed. O(tree). */
int sglr_radix_check(const sglr_radix_t *t);

#endif
