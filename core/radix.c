/*
 * radix.c: the approximate prefix tree (see radix.h for the picture and
 * the invariants).
 *
 * A node's children are keyed by the first byte of their edge. They live in
 * one block: capkids child pointers followed by capkids key bytes, unsorted;
 * memchr over at most 256 keys beats keeping them sorted. Tenants are a
 * small array of (worker, stamp, nkids), where nkids counts the children
 * that worker also holds: a tenancy with nkids == 0 is one of the worker's
 * leaves, which is what eviction needs to know in O(1).
 *
 * Walks over the whole tree (remove, evict, free) are post-order and use
 * the parent pointers instead of a stack, so a tree of any depth (a long
 * conversation inserted turn by turn) needs no allocation to be freed.
 */
#include "radix.h"

#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#if !defined(__SANITIZE_ADDRESS__) && defined(__has_feature)
#if __has_feature(address_sanitizer)
#define __SANITIZE_ADDRESS__ 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define SLOT_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define SLOT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define SLOT_POISON(p, n) ((void)(p), (void)(n))
#define SLOT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

typedef struct {
    int32_t worker;
    uint32_t nkids;     /* children also held by this worker */
    uint64_t stamp;     /* logical time of the last insert/match through here */
} tenant_t;

typedef struct node node_t;
/* 64 bytes, one cache line in the slabs (each a line apart): a walk down
 * the tree reads one line a node, where a 72-byte node was two lines for
 * most slots. */
struct node {
    node_t *parent;
    uint8_t *edge;
    node_t **kids;      /* capkids pointers, then capkids first bytes (room for 16 at least) */
    union {
        tenant_t one;   /* while capten is 1 */
        tenant_t *many; /* else, malloc'd */
    } u;
    uint32_t len;
    uint16_t nkids, capkids;
    uint32_t nten, capten;
    uint32_t ecap;      /* bytes of the edge's block (edge_alloc) */
    uint16_t eoff;      /* where edge starts in its block (a split leaves */
                        /* the rest in place): the block is edge - eoff */
    uint8_t key;        /* edge[0], kept here so walks need not read the edge */
};

/* A node's tenants. */
#define TEN(n) ((n)->capten == 1 ? &(n)->u.one : (n)->u.many)

/* Nodes come from slabs owned by the tree: most nodes (one tenant) need no
 * second allocation, and eviction reads the slabs front to back instead of
 * walking the tree (a live node has len > 0; a free slot has len 0). Freed
 * nodes are kept for reuse. */
#define SLAB_NODES 1024

/* Edges come in blocks of whole EDGE_GRAIN bytes up to EDGE_CLASSES grains,
 * and a released block waits in its class for the next edge of that class.
 * A cache_aware tree under unique prompts inserts a leaf of a few KB per
 * request and eviction frees as many: through malloc that was about half
 * of what the tree cost a request (bins, coalescing, the neighbouring
 * chunks' headers), a pop or push here.
 *
 * The spare edge blocks and node slots are kept as arrays of addresses,
 * not as lists linked through them: an evicted block is long out of the
 * caches when the next insertion takes it, and a list's link is a load
 * from it (a stall on memory, the largest part of an insertion's cost by
 * perf), where from an array the block is only written, by the copy of
 * the new text, and a store does not wait for the line. Releasing no
 * longer writes into the dead block either. */
#define EDGE_GRAIN 32
#define EDGE_CLASSES 512    /* blocks up to 16 KB; longer edges are malloc'd */

/* The addresses of spare blocks of one size (edge blocks of a class, child
 * arrays of a capacity), taken from the top. */
typedef struct {
    void **v;
    uint32_t n, cap;
} spare_t;

typedef struct slab {
    node_t nodes[SLAB_NODES];   /* first: the slab is 64-byte aligned */
    struct slab *next;
} slab_t;

_Static_assert(sizeof(node_t) == 64, "a node is one cache line");

/* A free slot keeps len readable (see node_free). */
_Static_assert(offsetof(node_t, len) + sizeof(uint32_t) == offsetof(node_t, nkids),
               "len, nkids, capkids together");
_Static_assert(offsetof(node_t, capkids) + sizeof(uint16_t) == offsetof(node_t, nten),
               "nten follows capkids");

struct sglr_radix {
    node_t root;        /* empty edge, never has tenants */
    slab_t *slabs;
    node_t **spare;     /* freed node slots, nspare of them; room for */
    size_t nspare;      /* every slot handed out (grown with the slabs) */
    size_t capspare;
    size_t fresh;       /* nodes of the newest slab not handed out yet */
    uint64_t clock;
    size_t *sizes;      /* bytes attributed to each worker id */
    size_t nsizes;
    size_t nodes, chars, tenancies;
    spare_t edge_free[EDGE_CLASSES];    /* released edge blocks by class */
    size_t edge_kept;               /* bytes in them */
    /* Bumped by every call that changes the tree's shape (insert, evict,
     * remove): a hint from before is stale. */
    uint64_t gen;
    /* What the last keyed match walked: the nodes it passed whole, root
     * side first, and the text position after them (see insert_keyed). */
    struct {
        uint64_t key, gen;
        const uint8_t *s;
        size_t n, pos, depth, cap;
        node_t **path;
    } hint;
    uint64_t resumed;
    spare_t kids_free[8];   /* released child arrays by capacity (2, 4, ... 256: kids_alloc) */
};

/* An edge is at most this long; longer text is chained over several nodes
 * so that lengths fit the node's 32-bit field. */
#define MAX_EDGE (1u << 30)

#define KEYS(n) ((uint8_t *)((n)->kids + (n)->capkids))

/* ---- small helpers ------------------------------------------------------ */

/* Allocation failures, for tests: test_radix.c defines a strong
 * sglr_radix_alloc_fails() that fails some of them; this weak one, which
 * the router links, never does. */
__attribute__((weak)) int sglr_radix_alloc_fails(void)
{
    return 0;
}

#define R_MALLOC(n) (sglr_radix_alloc_fails() ? NULL : malloc(n))
#define R_REALLOC(p, n) (sglr_radix_alloc_fails() ? NULL : realloc((p), (n)))

/* Keep p on s. -> 0, -ENOMEM (p is not kept). */
static inline int spare_push(spare_t *s, void *p)
{
    if (s->n == s->cap) {
        uint32_t cap = s->cap ? s->cap * 2 : 16;
        void **v = R_REALLOC(s->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n++] = p;
    return 0;
}

static void spare_free(spare_t *s)
{
    for (uint32_t i = 0; i < s->n; i++)
        free(s->v[i]);
    free(s->v);
}

/* Length of the common prefix of a and b, both at least n bytes. */
static size_t lcp(const uint8_t *a, const uint8_t *b, size_t n)
{
    if (memcmp(a, b, n) == 0)
        return n;
    size_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    while (i + 8 <= n) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        if (x != y)
            return i + ((size_t)__builtin_ctzll(x ^ y) >> 3);
        i += 8;
    }
#endif
    while (i < n && a[i] == b[i])
        i++;
    return i;
}

/* Length of the common prefix of child c's edge and s (room bytes, at
 * least 1), c found by s's first byte: that byte is c->key, so the edge
 * is read only past it, and a one-byte edge (a common shape, one level
 * of a tree of numbered prompts) is not read at all. */
static inline size_t kid_lcp(const node_t *c, const uint8_t *s, size_t room)
{
    return room == 1 ? 1 : 1 + lcp(c->edge + 1, s + 1, room - 1);
}

static inline int kid_index(const node_t *n, uint8_t b)
{
    if (n->nkids == 0)
        return -1;
    const uint8_t *k = KEYS(n);
#ifdef __SSE2__
    /* up to 16 keys in one compare: a child array of capacity 16 or less
     * has room for 16 key bytes (kids_alloc), the ones past nkids masked */
    if (n->capkids <= 16) {
        unsigned m = (unsigned)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)k), _mm_set1_epi8((char)b)));
        m &= (1u << n->nkids) - 1;
        return m ? __builtin_ctz(m) : -1;
    }
#endif
    const uint8_t *hit = memchr(k, b, n->nkids);
    return hit ? (int)(hit - k) : -1;
}

static inline node_t *find_kid(const node_t *n, uint8_t b)
{
    int i = kid_index(n, b);
    return i < 0 ? NULL : n->kids[i];
}

/* Child arrays (cap pointers, then cap first bytes; cap a power of two
 * from 2 to 256) come back by capacity, as edge blocks do: a new leaf or
 * a split takes one a request under unique prompts, and through malloc
 * that was a cold bin each time. At most KIDS_KEEP / cap kept a class. */
#define KIDS_KEEP 16384

static node_t **kids_alloc(sglr_radix_t *t, unsigned cap)
{
#ifndef SGLR_NO_FREELIST
    int c = __builtin_ctz(cap) - 1;
    if (t->kids_free[c].n)
        return t->kids_free[c].v[--t->kids_free[c].n];
#else
    (void)t;
#endif
    /* (room for 16 key bytes however small: kid_index reads 16) */
    return R_MALLOC(cap * sizeof(node_t *) + (cap < 16 ? 16 : cap));
}

static void kids_release(sglr_radix_t *t, node_t **k, unsigned cap)
{
    if (!k)
        return;
#ifndef SGLR_NO_FREELIST
    int c = __builtin_ctz(cap) - 1;
    if (t->kids_free[c].n < KIDS_KEEP / cap && spare_push(&t->kids_free[c], k) == 0)
        return;
#else
    (void)t; (void)cap;
#endif
    free(k);
}

static int add_kid(sglr_radix_t *t, node_t *n, node_t *c)
{
    if (n->nkids == n->capkids) {
        unsigned cap = n->capkids ? n->capkids * 2u : 2u;
        if (cap > 256)
            cap = 256;
        node_t **k = kids_alloc(t, cap);
        if (!k)
            return -ENOMEM;
        if (n->nkids) {
            memcpy(k, n->kids, n->nkids * sizeof(node_t *));
            memcpy((uint8_t *)(k + cap), KEYS(n), n->nkids);
        }
        kids_release(t, n->kids, n->capkids);
        n->kids = k;
        n->capkids = (uint16_t)cap;
    }
    n->kids[n->nkids] = c;
    KEYS(n)[n->nkids] = c->key;
    n->nkids++;
    return 0;
}

/* Swap-remove: the order of children carries no meaning. */
static void del_kid(sglr_radix_t *t, node_t *n, int i)
{
    int last = n->nkids - 1;
    n->kids[i] = n->kids[last];
    KEYS(n)[i] = KEYS(n)[last];
    n->nkids--;
    if (n->nkids == 0) {
        kids_release(t, n->kids, n->capkids);
        n->kids = NULL;
        n->capkids = 0;
    }
}

static inline tenant_t *find_tenant(node_t *n, int w)
{
    tenant_t *ten = TEN(n);
    for (uint32_t i = 0; i < n->nten; i++)
        if (ten[i].worker == w)
            return &ten[i];
    return NULL;
}

static inline int is_allowed(int w, const uint8_t *allowed, size_t nbits)
{
    return !allowed || ((size_t)w < nbits && (allowed[w >> 3] >> (w & 7)) & 1);
}

static node_t *node_alloc(sglr_radix_t *t)
{
#ifdef SGLR_NO_FREELIST
    /* sanitizer builds: a freed slot stays poisoned for good, so that any
     * use after free is reported rather than hidden by a reuse */
    node_t *n = NULL;
#else
    node_t *n = t->nspare ? t->spare[--t->nspare] : NULL;
#endif
    if (!n) {
        if (!t->slabs || t->fresh == 0) {
            /* room to keep every slot as a spare, so that node_free
             * never fails to */
            size_t need = t->capspare + SLAB_NODES;
            node_t **v = R_REALLOC(t->spare, need * sizeof *v);
            if (!v)
                return NULL;
            t->spare = v;
            t->capspare = need;
            slab_t *sl = sglr_radix_alloc_fails()
                             ? NULL : aligned_alloc(64, (sizeof *sl + 63) & ~(size_t)63);
            if (!sl)
                return NULL;
            SLOT_POISON(sl->nodes, sizeof sl->nodes);   /* not handed out yet */
            sl->next = t->slabs;
            t->slabs = sl;
            t->fresh = SLAB_NODES;
        }
        n = &t->slabs->nodes[--t->fresh];
    }
    SLOT_UNPOISON(n, sizeof *n);
    memset(n, 0, sizeof *n);
    return n;
}

/* An edge block of at least n (> 0) bytes; *cap gets its size. */
static uint8_t *edge_alloc(sglr_radix_t *t, size_t n, uint32_t *cap)
{
    if (n > (size_t)EDGE_GRAIN * EDGE_CLASSES) {
        *cap = (uint32_t)n;
        return R_MALLOC(n);
    }
    size_t c = (n - 1) / EDGE_GRAIN;
    *cap = (uint32_t)((c + 1) * EDGE_GRAIN);
#ifndef SGLR_NO_FREELIST
    if (t->edge_free[c].n) {
        t->edge_kept -= *cap;
        return t->edge_free[c].v[--t->edge_free[c].n];
    }
#else
    (void)t;
#endif
    return R_MALLOC(*cap);
}

/* Give back an edge block of cap bytes. Kept for reuse while the blocks
 * kept stay within the characters the tree holds (at least 1 MB): what an
 * eviction frees waits for the insertions that follow it, and the tree
 * never keeps more than it held at its peak. */
static void edge_release(sglr_radix_t *t, uint8_t *e, uint32_t cap)
{
    if (!e)
        return;
#ifndef SGLR_NO_FREELIST
    size_t limit = t->chars > (1u << 20) ? t->chars : (1u << 20);
    if (cap <= (size_t)EDGE_GRAIN * EDGE_CLASSES && t->edge_kept + cap <= limit) {
        size_t c = cap / EDGE_GRAIN - 1;
        if (spare_push(&t->edge_free[c], e) == 0) {
            t->edge_kept += cap;
            return;
        }
    }
#else
    (void)t; (void)cap;
#endif
    free(e);
}

/* Release what n owns; the node itself goes back to the tree's spares. */
static void node_release(sglr_radix_t *t, node_t *n)
{
    edge_release(t, n->edge ? n->edge - n->eoff : NULL, n->ecap);
    kids_release(t, n->kids, n->capkids);
    if (n->capten > 1)
        free(n->u.many);
}

static void node_free(sglr_radix_t *t, node_t *n)
{
    node_release(t, n);
    n->len = 0;         /* marks the slot free for scans over the slabs */
    n->nten = 0;
    t->spare[t->nspare++] = n;     /* room for it: node_alloc */
    /* Under ASan a free slot is poisoned but for len/nkids/capkids, so a
     * node used after it was freed is reported. */
    SLOT_POISON((char *)n, offsetof(node_t, len));
    SLOT_POISON((char *)n + offsetof(node_t, nten), sizeof *n - offsetof(node_t, nten));
}

static node_t *node_new(sglr_radix_t *t, const uint8_t *s, size_t len, uint32_t capten)
{
    node_t *n = node_alloc(t);
    if (!n)
        return NULL;
    n->edge = edge_alloc(t, len, &n->ecap);
    if (capten > 1)
        n->u.many = R_MALLOC(capten * sizeof(tenant_t));
    else
        capten = 1;
    if (!n->edge || (capten > 1 && !n->u.many)) {
        edge_release(t, n->edge, n->ecap);
        if (capten > 1)
            free(n->u.many);
        n->edge = NULL;
        n->kids = NULL;
        n->capten = 1;
        node_free(t, n);
        return NULL;
    }
    memcpy(n->edge, s, len);
    n->len = (uint32_t)len;
    n->key = s[0];
    n->capten = capten;
    return n;
}

static int ensure_sizes(sglr_radix_t *t, int w)
{
    if ((size_t)w < t->nsizes)
        return 0;
    size_t cap = t->nsizes ? t->nsizes : 16;
    while (cap <= (size_t)w)
        cap *= 2;
    size_t *s = R_REALLOC(t->sizes, cap * sizeof *s);
    if (!s)
        return -ENOMEM;
    memset(s + t->nsizes, 0, (cap - t->nsizes) * sizeof *s);
    t->sizes = s;
    t->nsizes = cap;
    return 0;
}

/* Make w a tenant of n (whose parent w already holds). */
static int add_tenant(sglr_radix_t *t, node_t *n, int w, uint64_t stamp)
{
    if (n->nten == n->capten) {
        uint32_t cap = n->capten * 2;
        tenant_t *x;
        if (n->capten == 1) {
            x = R_MALLOC(cap * sizeof *x);
            if (x)
                x[0] = n->u.one;
        } else {
            x = R_REALLOC(n->u.many, cap * sizeof *x);
        }
        if (!x)
            return -ENOMEM;
        n->u.many = x;
        n->capten = cap;
    }
    TEN(n)[n->nten++] = (tenant_t){ .worker = w, .nkids = 0, .stamp = stamp };
    t->sizes[w] += n->len;
    t->tenancies++;
    if (n->parent != &t->root) {
        tenant_t *pt = find_tenant(n->parent, w);
        if (pt)
            pt->nkids++;
    }
    return 0;
}

static void remove_tenant(sglr_radix_t *t, node_t *n, tenant_t *x)
{
    int w = x->worker;
    t->sizes[w] -= n->len;
    t->tenancies--;
    *x = TEN(n)[--n->nten];
    if (n->parent != &t->root) {
        tenant_t *pt = find_tenant(n->parent, w);
        if (pt && pt->nkids)
            pt->nkids--;
    }
}

/* Unlink and free n, which nobody holds and which has no children left. */
static void prune(sglr_radix_t *t, node_t *n)
{
    node_t *p = n->parent;
    del_kid(t, p, kid_index(p, n->key));
    t->nodes--;
    t->chars -= n->len;
    node_free(t, n);
}

/* Split c after its first k bytes: the new node m takes c's place under
 * c's parent, holds the first k bytes and the same tenants, and c hangs
 * below it with the rest. Returns m, or NULL when out of memory (nothing
 * changed). */
static node_t *split(sglr_radix_t *t, node_t *c, size_t k)
{
    node_t *m = node_new(t, c->edge, k, c->nten);
    if (!m)
        return NULL;
    if (add_kid(t, m, c) < 0) {
        node_free(t, m);
        return NULL;
    }
    /* add_kid read c->key, which is also m's first byte: fix the key
     * once c's edge has moved. */
    tenant_t *mt = TEN(m), *ct = TEN(c);
    for (uint32_t i = 0; i < c->nten; i++) {
        mt[i] = ct[i];
        mt[i].nkids = 1;
    }
    m->nten = c->nten;
    t->tenancies += c->nten;
    node_t *p = c->parent;
    p->kids[kid_index(p, c->key)] = m;
    m->parent = p;

    c->len -= (uint32_t)k;
    /* The rest stays where it is, its block now starting k + eoff bytes
     * before it: under unique prompts each insertion splits the leaf of
     * the one before a few bytes in, and moving the rest to the front was
     * a second copy of a prompt a request. It moves to a block of its own
     * size when it would fill less than half of this one, and to the
     * front when the offset would not fit (blocks over 64 KB). */
    uint32_t cap;
    uint8_t *e = c->len <= c->ecap / 2 ? edge_alloc(t, c->len, &cap) : NULL;
    if (e) {
        memcpy(e, c->edge + k, c->len);
        edge_release(t, c->edge - c->eoff, c->ecap);
        c->edge = e;
        c->ecap = cap;
        c->eoff = 0;
    } else if ((size_t)c->eoff + k <= UINT16_MAX) {
        c->edge += k;
        c->eoff = (uint16_t)(c->eoff + k);
    } else {
        memmove(c->edge - c->eoff, c->edge + k, c->len);
        c->edge -= c->eoff;
        c->eoff = 0;
    }
    c->parent = m;
    c->key = c->edge[0];
    KEYS(m)[0] = c->key;
    t->nodes++;
    return m;
}

/* Merge n with its only child c when both have the same tenants (c's are
 * always a subset of n's, so equal counts mean equal sets). Keeps n's
 * stamps, which are the more recent. */
static int try_merge(sglr_radix_t *t, node_t *n)
{
    if (n->nkids != 1)
        return 0;
    node_t *c = n->kids[0];
    if (c->nten != n->nten || (size_t)n->len + c->len > MAX_EDGE)
        return 0;
    size_t len = (size_t)n->len + c->len;
    if (len > (size_t)n->ecap - n->eoff) {
        uint32_t cap;
        uint8_t *e = edge_alloc(t, len, &cap);
        if (!e)
            return 0;
        memcpy(e, n->edge, n->len);
        edge_release(t, n->edge - n->eoff, n->ecap);
        n->edge = e;
        n->ecap = cap;
        n->eoff = 0;
    }
    memcpy(n->edge + n->len, c->edge, c->len);
    n->len = (uint32_t)len;
    tenant_t *nt = TEN(n);
    for (uint32_t i = 0; i < n->nten; i++) {
        tenant_t *ct = find_tenant(c, nt[i].worker);
        nt[i].nkids = ct ? ct->nkids : 0;
    }
    kids_release(t, n->kids, n->capkids);
    n->kids = c->kids;
    n->nkids = c->nkids;
    n->capkids = c->capkids;
    for (int i = 0; i < n->nkids; i++)
        n->kids[i]->parent = n;
    c->kids = NULL;
    t->tenancies -= c->nten;
    t->nodes--;
    node_free(t, c);
    return 1;
}

/* Post-order walk over every node but the root, without a stack. visit may
 * free its node (after unlinking it) or merge it with its child: the
 * sibling still to visit is at a lower index, which swap-removal keeps. */
typedef void (*visit_fn)(sglr_radix_t *t, node_t *n, void *ud);

static node_t *deepest_last(node_t *n)
{
    while (n->nkids)
        n = n->kids[n->nkids - 1];
    return n;
}

static void walk_post(sglr_radix_t *t, visit_fn visit, void *ud)
{
    node_t *n = deepest_last(&t->root);
    while (n != &t->root) {
        node_t *p = n->parent;
        int i = kid_index(p, n->key);
        visit(t, n, ud);
        n = i > 0 ? deepest_last(p->kids[i - 1]) : p;
    }
}

/* ---- public API --------------------------------------------------------- */

sglr_radix_t *sglr_radix_new(void)
{
    return calloc(1, sizeof(sglr_radix_t));
}

static void free_visit(sglr_radix_t *t, node_t *n, void *ud)
{
    (void)ud;
    node_release(t, n);   /* the walk reads the parent's child array again, not n */
}

void sglr_radix_free(sglr_radix_t *t)
{
    if (!t)
        return;
    walk_post(t, free_visit, NULL);
    for (size_t c = 0; c < EDGE_CLASSES; c++)
        spare_free(&t->edge_free[c]);
    free(t->spare);
    free(t->hint.path);
    for (size_t c = 0; c < sizeof t->kids_free / sizeof t->kids_free[0]; c++)
        spare_free(&t->kids_free[c]);
    while (t->slabs) {
        slab_t *next = t->slabs->next;
        free(t->slabs);
        t->slabs = next;
    }
    free(t->root.kids);
    free(t->sizes);
    free(t);
}

int sglr_radix_insert(sglr_radix_t *t, const char *s, size_t n, int w)
{
    return sglr_radix_insert_keyed(t, s, n, w, 0);
}

/* Make w a tenant of c with this stamp, or refresh its stamp there. */
static int hold(sglr_radix_t *t, node_t *c, int w, uint64_t stamp)
{
    tenant_t *x = find_tenant(c, w);
    if (x) {
        x->stamp = stamp;
        return 0;
    }
    return add_tenant(t, c, w, stamp);
}

int sglr_radix_insert_keyed(sglr_radix_t *t, const char *s, size_t n, int w, uint64_t key)
{
    if (w < 0 || w > SGLR_RADIX_MAX_WORKER)
        return -EINVAL;
    if (n == 0)
        return 0;
    if (ensure_sizes(t, w) < 0)
        return -ENOMEM;
    const uint8_t *p = (const uint8_t *)s;
    uint64_t stamp = ++t->clock;
    node_t *node = &t->root;
    size_t pos = 0;
    /* The match of this text walked these nodes whole, and the tree has
     * not changed since: the same walk again would compare the same bytes
     * to the same end. Top down, as the walk would (a new tenancy counts
     * itself in its parent's). */
    if (key && t->hint.key == key && t->hint.gen == t->gen && t->hint.s == p && t->hint.n == n) {
        for (size_t i = 0; i < t->hint.depth; i++) {
            node = t->hint.path[i];
            if (hold(t, node, w, stamp) < 0) {
                t->hint.key = 0;
                t->gen++;
                return -ENOMEM;
            }
        }
        pos = t->hint.pos;
        t->resumed++;
    }
    t->hint.key = 0;
    t->gen++;
    while (pos < n) {
        node_t *c = find_kid(node, p[pos]);
        if (!c) {
            size_t len = n - pos < MAX_EDGE ? n - pos : MAX_EDGE;
            c = node_new(t, p + pos, len, 1);
            if (!c)
                return -ENOMEM;
            c->parent = node;
            if (add_kid(t, node, c) < 0) {
                node_free(t, c);
                return -ENOMEM;
            }
            t->nodes++;
            t->chars += len;
            add_tenant(t, c, w, stamp);     /* capacity 1 is free: cannot fail */
            pos += len;
            node = c;
            continue;
        }
        size_t room = n - pos < c->len ? n - pos : c->len;
        size_t k = kid_lcp(c, p + pos, room);
        if (k < c->len && !(c = split(t, c, k)))
            return -ENOMEM;
        if (hold(t, c, w, stamp) < 0)
            return -ENOMEM;
        pos += k;
        node = c;
    }
    return 0;
}

size_t sglr_radix_match(sglr_radix_t *t, const char *s, size_t n,
                        const uint8_t *allowed, size_t nbits, int *worker_out)
{
    return sglr_radix_match_keyed(t, s, n, allowed, nbits, worker_out, 0);
}

size_t sglr_radix_match_keyed(sglr_radix_t *t, const char *s, size_t n, const uint8_t *allowed,
                              size_t nbits, int *worker_out, uint64_t key)
{
    const uint8_t *p = (const uint8_t *)s;
    node_t *node = &t->root, *deep = NULL;
    size_t pos = 0;
    *worker_out = -1;
    if (key) {
        t->hint.key = key;
        t->hint.gen = t->gen;
        t->hint.s = p;
        t->hint.n = n;
        t->hint.depth = 0;
        t->hint.pos = 0;
    }
    while (pos < n) {
        node_t *c = find_kid(node, p[pos]);
        if (!c)
            break;
        uint32_t i = 0;
        const tenant_t *cten = TEN(c);
        while (i < c->nten && !is_allowed(cten[i].worker, allowed, nbits))
            i++;
        if (i == c->nten)
            break;      /* only workers that may not take traffic hold it */
        size_t room = n - pos < c->len ? n - pos : c->len;
        size_t k = kid_lcp(c, p + pos, room);
        pos += k;
        deep = c;
        if (k < c->len)
            break;
        node = c;
        if (key) {
            if (t->hint.depth == t->hint.cap) {
                size_t cap = t->hint.cap ? t->hint.cap * 2 : 16;
                node_t **v = R_REALLOC(t->hint.path, cap * sizeof *v);
                if (!v) {
                    key = 0;        /* no hint: the insert walks it all */
                    t->hint.key = 0;
                    continue;
                }
                t->hint.path = v;
                t->hint.cap = cap;
            }
            t->hint.path[t->hint.depth++] = c;
            t->hint.pos = pos;
        }
    }
    /* Never cut a character in two: back up over continuation bytes (at
     * most three; more means the text is not UTF-8, so leave it). */
    if (pos < n) {
        size_t q = pos;
        while (q > 0 && pos - q < 3 && (p[q] & 0xC0) == 0x80)
            q--;
        if ((p[q] & 0xC0) != 0x80)
            pos = q;
    }
    if (!deep || pos == 0)
        return 0;

    tenant_t *best = NULL;
    for (uint32_t i = 0; i < deep->nten; i++) {
        tenant_t *x = &TEN(deep)[i];
        if (is_allowed(x->worker, allowed, nbits) && (!best || x->stamp > best->stamp))
            best = x;
    }
    int w = best->worker;
    uint64_t stamp = ++t->clock;
    for (node_t *x = deep; x != &t->root; x = x->parent) {
        tenant_t *y = find_tenant(x, w);
        if (y)
            y->stamp = stamp;
    }
    *worker_out = w;
    return pos;
}

static void remove_visit(sglr_radix_t *t, node_t *n, void *ud)
{
    tenant_t *x = find_tenant(n, *(int *)ud);
    if (x)
        remove_tenant(t, n, x);
    if (n->nten == 0)
        prune(t, n);
    else
        try_merge(t, n);
}

void sglr_radix_remove_worker(sglr_radix_t *t, int w)
{
    if (w < 0 || (size_t)w >= t->nsizes || t->sizes[w] == 0)
        return;
    t->gen++;
    walk_post(t, remove_visit, &w);
}

size_t sglr_radix_size(const sglr_radix_t *t, int w)
{
    return w >= 0 && (size_t)w < t->nsizes ? t->sizes[w] : 0;
}

void sglr_radix_stats(const sglr_radix_t *t, sglr_radix_stats_t *out)
{
    out->nodes = t->nodes;
    out->chars = t->chars;
    out->tenancies = t->tenancies;
    out->kept = t->edge_kept;
    out->resumed = t->resumed;
}

/* ---- eviction ----------------------------------------------------------- */

/* A worker's leaf tenancy, ordered by stamp in a min-heap. Stamps along a
 * path only grow towards the root, so when a leaf goes its parent (which
 * may become a leaf) sorts after it: one heap over all the workers that
 * are over budget yields each one's entries in LRU order. No two live
 * entries share a stamp (an insert or match stamps one path of one
 * worker), so the order is the same whatever the heap's shape.
 *
 * The heap is 4-ary over 16-byte entries, the four children of an entry
 * in one cache line (half the levels of a binary heap, and one line read
 * a level); the node of entry idx waits in a side array, so that entries
 * move as 16 bytes. By perf the binary heap of 24-byte entries was half
 * of what an eviction cost a request under unique prompts. */
typedef struct {
    uint64_t stamp;
    uint32_t idx;       /* the node: heap_t.node[idx] */
    int32_t worker;
} victim_t;

_Static_assert(sizeof(victim_t) == 16, "four victims to a cache line");

typedef struct {
    victim_t *v;        /* v[0] is the top; v[4i+1..4i+4] the children of i */
    void *mem;          /* v's allocation: v[1] starts a cache line */
    node_t **node;
    size_t n, cap;
    size_t max;
} heap_t;

static void sift_down(victim_t *v, size_t n, size_t i)
{
    victim_t x = v[i];
    for (;;) {
        size_t c = 4 * i + 1;
        if (c >= n)
            break;
        size_t best = c;
        if (c + 4 <= n) {
            /* selects, not branches: which child is least is a coin toss */
            size_t a = c + (v[c + 1].stamp < v[c].stamp);
            size_t b = c + 2 + (v[c + 3].stamp < v[c + 2].stamp);
            best = a + (b - a) * (v[b].stamp < v[a].stamp);
        } else {
            for (size_t j = c + 1; j < n; j++)
                if (v[j].stamp < v[best].stamp)
                    best = j;
        }
        if (v[best].stamp >= x.stamp)
            break;
        v[i] = v[best];
        i = best;
    }
    v[i] = x;
}

static void heap_push(heap_t *h, victim_t x)
{
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 4;
        if (h->v[p].stamp <= x.stamp)
            break;
        h->v[i] = h->v[p];
        i = p;
    }
    h->v[i] = x;
}

static victim_t heap_pop(heap_t *h)
{
    victim_t top = h->v[0];
    h->v[0] = h->v[--h->n];
    if (h->n)
        sift_down(h->v, h->n, 0);
    return top;
}

static int grow(void **v, size_t *cap, size_t size)
{
    size_t c = *cap ? *cap * 2 : 1024;
    void *x = R_REALLOC(*v, c * size);
    if (!x)
        return -ENOMEM;
    *v = x;
    *cap = c;
    return 0;
}

/* Room for twice the entries (the side array too). */
static int heap_grow(heap_t *h)
{
    size_t c = h->cap ? h->cap * 2 : 1024;
    /* 3 entries before v[0] so that v[1] is 64-byte aligned, and the
     * size a multiple of the alignment as aligned_alloc wants */
    void *mem = sglr_radix_alloc_fails() ? NULL : aligned_alloc(64, (c + 4) * sizeof(victim_t));
    if (!mem)
        return -ENOMEM;
    node_t **node = R_REALLOC(h->node, c * sizeof *node);
    if (!node) {
        free(mem);
        return -ENOMEM;
    }
    victim_t *v = (victim_t *)mem + 3;
    if (h->n)
        memcpy(v, h->v, h->n * sizeof *v);
    free(h->mem);
    h->mem = mem;
    h->v = v;
    h->node = node;
    h->cap = c;
    return 0;
}

/* The leaf tenancies of the workers over budget, read off the slabs in
 * memory order: no pointer chasing, so a tree of a million nodes is read
 * in milliseconds. The newest slab hands out slots from the top down;
 * below t->fresh its slots were never used. */
static void collect(sglr_radix_t *t, heap_t *h)
{
    for (slab_t *sl = t->slabs; sl; sl = sl->next) {
        size_t first = sl == t->slabs ? t->fresh : 0;
        for (size_t i = first; i < SLAB_NODES; i++) {
            node_t *n = &sl->nodes[i];
            if (n->len == 0)
                continue;
            for (uint32_t j = 0; j < n->nten; j++) {
                tenant_t *x = &TEN(n)[j];
                if (x->nkids != 0 || t->sizes[x->worker] <= h->max)
                    continue;
                if (h->n == h->cap && (h->n > UINT32_MAX - 1 || heap_grow(h) < 0))
                    return;     /* out of memory: evict from what was collected */
                h->node[h->n] = n;
                h->v[h->n] = (victim_t){ x->stamp, (uint32_t)h->n, x->worker };
                h->n++;
            }
        }
    }
}

size_t sglr_radix_evict(sglr_radix_t *t, size_t max)
{
    size_t over = 0;
    for (size_t w = 0; w < t->nsizes; w++)
        over += t->sizes[w] > max;
    if (over == 0)
        return 0;
    t->gen++;

    /* Each (node, worker) enters the heap at most once and a push always
     * follows a pop, so the heap never outgrows what was collected. Out of
     * memory, it evicts from what it collected so far. */
    heap_t h = { .max = max };
    collect(t, &h);
    for (size_t i = h.n / 4 + 1; i-- > 0;)
        if (i < h.n)
            sift_down(h.v, h.n, i);

    /* Nodes that lost a tenant, or a child, may now fold into a chain
     * with their only child: remembered here, folded once nothing points
     * into the heap any more. */
    node_t **fold = NULL;
    size_t nfold = 0, capfold = 0;
    int fold_ok = 1;

    size_t removed = 0;
    while (h.n && over) {
        victim_t e = heap_pop(&h);
        int w = e.worker;
        if (h.n)
            __builtin_prefetch(h.node[h.v[0].idx]);     /* the next one, while this one goes */
        if (t->sizes[w] <= max)
            continue;
        node_t *n = h.node[e.idx], *p = n->parent;
        removed += n->len;
        remove_tenant(t, n, find_tenant(n, w));
        if (t->sizes[w] <= max)
            over--;
        node_t *changed = n;
        if (n->nten == 0) {
            prune(t, n);
            changed = p;
        }
        if (changed != &t->root && fold_ok) {
            if (nfold == capfold && grow((void **)&fold, &capfold, sizeof *fold) < 0)
                fold_ok = 0;
            else
                fold[nfold++] = changed;
        }
        if (p != &t->root && t->sizes[w] > max) {
            tenant_t *pt = find_tenant(p, w);
            if (pt && pt->nkids == 0) {
                h.node[e.idx] = p;      /* e's slot is free: it was popped */
                heap_push(&h, (victim_t){ pt->stamp, e.idx, w });
            }
        }
    }
    free(h.mem);
    free(h.node);
    /* A node pruned after it was remembered is a free slot now (len 0);
     * nothing was allocated since, so its slot is still there to read. */
    for (size_t i = 0; i < nfold; i++)
        if (fold[i]->len > 0)
            while (try_merge(t, fold[i]))
                ;
    free(fold);
    return removed;
}

/* ---- self-check (tests) ------------------------------------------------- */

typedef struct {
    int err;
    size_t nodes, chars, tenancies;
    size_t *sizes;
} check_t;

#define VERIFY(c) do { if (!(c) && !k->err) k->err = -__LINE__; } while (0)

static void check_visit(sglr_radix_t *t, node_t *n, void *ud)
{
    check_t *k = ud;
    node_t *p = n->parent;
    k->nodes++;
    k->chars += n->len;
    k->tenancies += n->nten;
    VERIFY(n->len > 0);
    VERIFY((size_t)n->eoff + n->len <= n->ecap);
    VERIFY(n->nten > 0);
    VERIFY(n->key == n->edge[0]);
    VERIFY(p && kid_index(p, n->key) >= 0 && p->kids[kid_index(p, n->key)] == n);
    for (int i = 0; i < n->nkids; i++) {
        VERIFY(n->kids[i]->parent == n);
        VERIFY(KEYS(n)[i] == n->kids[i]->edge[0]);
        for (int j = 0; j < i; j++)
            VERIFY(KEYS(n)[j] != KEYS(n)[i]);
    }
    for (uint32_t i = 0; i < n->nten; i++) {
        tenant_t *x = &TEN(n)[i];
        VERIFY(x->worker >= 0 && (size_t)x->worker < t->nsizes);
        if (k->err)
            return;
        k->sizes[x->worker] += n->len;
        for (uint32_t j = 0; j < i; j++)
            VERIFY(TEN(n)[j].worker != x->worker);
        uint32_t held = 0;
        for (int j = 0; j < n->nkids; j++) {
            tenant_t *y = find_tenant(n->kids[j], x->worker);
            if (y) {
                held++;
                VERIFY(y->stamp <= x->stamp);
            }
        }
        VERIFY(held == x->nkids);
        if (p != &t->root)
            VERIFY(find_tenant(p, x->worker) != NULL);
    }
}

int sglr_radix_check(const sglr_radix_t *ct)
{
    sglr_radix_t *t = (sglr_radix_t *)ct;     /* the visit only reads */
    check_t k = { 0 };
    k.sizes = calloc(t->nsizes ? t->nsizes : 1, sizeof(size_t));
    if (!k.sizes)
        return -ENOMEM;
    if (t->root.nten != 0 || t->root.len != 0)
        k.err = -__LINE__;
    walk_post(t, check_visit, &k);
    if (!k.err && (k.nodes != t->nodes || k.chars != t->chars || k.tenancies != t->tenancies))
        k.err = -__LINE__;
    for (size_t w = 0; !k.err && w < t->nsizes; w++)
        if (k.sizes[w] != t->sizes[w])
            k.err = -__LINE__;
    free(k.sizes);
    if (k.err)
        return k.err;
    /* The slabs: the slots eviction scans as live are exactly the tree's
     * nodes, and every spare slot reads as free. */
    size_t live = 0, handed = 0, spare = 0;
    for (slab_t *sl = t->slabs; sl; sl = sl->next) {
        size_t first = sl == t->slabs ? t->fresh : 0;
        handed += SLAB_NODES - first;
        for (size_t i = first; i < SLAB_NODES; i++)
            live += sl->nodes[i].len > 0;
    }
    for (size_t i = 0; i < t->nspare; i++, spare++)
        if (t->spare[i]->len != 0)
            return -__LINE__;
    if (live != t->nodes || live + spare != handed)
        return -__LINE__;
    /* The edge blocks kept for reuse add up to edge_kept. */
    size_t kept = 0;
    for (size_t c = 0; c < EDGE_CLASSES; c++)
        kept += (size_t)t->edge_free[c].n * (c + 1) * EDGE_GRAIN;
    if (kept != t->edge_kept)
        return -__LINE__;
    return 0;
}
