/*
 * test_radix.c: the approximate prefix tree (core/radix.c).
 */
#include "test.h"
#include "radix.h"

#include <errno.h>
#include <limits.h>
#include <time.h>

/* Allocation failures on demand: every fault_every-th allocation the tree
 * makes fails (0: none). Overrides the library's weak hook. */
static unsigned fault_every, fault_count;

int sglr_radix_alloc_fails(void)
{
    return fault_every && ++fault_count % fault_every == 0;
}

static size_t ins(sglr_radix_t *t, const char *s, int w)
{
    return (size_t)sglr_radix_insert(t, s, strlen(s), w);
}

static size_t match(sglr_radix_t *t, const char *s, int *w)
{
    return sglr_radix_match(t, s, strlen(s), NULL, 0, w);
}

static size_t match_only(sglr_radix_t *t, const char *s, const int *allowed, int n, int *w)
{
    uint8_t bits[8] = { 0 };
    for (int i = 0; i < n; i++)
        bits[allowed[i] >> 3] |= (uint8_t)(1u << (allowed[i] & 7));
    return sglr_radix_match(t, s, strlen(s), bits, 64, w);
}

static sglr_radix_stats_t stats(sglr_radix_t *t)
{
    sglr_radix_stats_t st;
    sglr_radix_stats(t, &st);
    return st;
}

TEST(split_edges)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    CHECK_EQ_INT(ins(t, "hello world", 0), 0);
    CHECK_EQ_INT(stats(t).nodes, 1);
    CHECK_EQ_INT(ins(t, "hello there", 1), 0);
    /* "hello " {0,1} -> "world" {0}, "there" {1} */
    CHECK_EQ_INT(stats(t).nodes, 3);
    CHECK_EQ_INT(stats(t).chars, 16);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 11);
    CHECK_EQ_INT(sglr_radix_size(t, 1), 11);
    CHECK_EQ_INT(match(t, "hello world, again", &w), 11);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(match(t, "hello th", &w), 8);
    CHECK_EQ_INT(w, 1);
    CHECK_EQ_INT(match(t, "help", &w), 3);
    CHECK_EQ_INT(match(t, "xyz", &w), 0);
    CHECK_EQ_INT(w, -1);
    CHECK_EQ_INT(match(t, "", &w), 0);
    /* A text ending inside an edge splits it too. */
    CHECK_EQ_INT(ins(t, "hel", 2), 0);
    CHECK_EQ_INT(stats(t).nodes, 4);
    CHECK_EQ_INT(sglr_radix_size(t, 2), 3);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 11);
    CHECK_EQ_INT(stats(t).chars, 16);
    /* Re-inserting changes nothing but stamps. */
    CHECK_EQ_INT(ins(t, "hello world", 0), 0);
    CHECK_EQ_INT(stats(t).nodes, 4);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 11);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK(sglr_radix_insert(t, "x", 1, -1) < 0);
    CHECK(sglr_radix_insert(t, "x", 1, SGLR_RADIX_MAX_WORKER + 1) < 0);
    sglr_radix_free(t);
}

TEST(many_workers_overlap)
{
    sglr_radix_t *t = sglr_radix_new();
    char buf[64];
    for (int w = 0; w < 40; w++) {
        snprintf(buf, sizeof buf, "system prompt: be brief. user %d asks", w);
        CHECK_EQ_INT(ins(t, buf, w), 0);
        CHECK_EQ_INT(ins(t, "system prompt: be brief.", w), 0);
    }
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    int w;
    CHECK_EQ_INT(match(t, "system prompt: be brief. user 17 asks more", &w), 37);
    CHECK_EQ_INT(w, 17);
    CHECK_EQ_INT(match(t, "system prompt: be brief. user 3 asks", &w), 36);
    CHECK_EQ_INT(w, 3);
    /* Every worker holds the shared part; the last one to touch it wins. */
    CHECK_EQ_INT(match(t, "system prompt: be brief. other", &w), 25);
    CHECK_EQ_INT(w, 3);
    for (int i = 0; i < 40; i++) {
        snprintf(buf, sizeof buf, "system prompt: be brief. user %d asks", i);
        CHECK_EQ_INT(sglr_radix_size(t, i), strlen(buf));
    }
    sglr_radix_free(t);
}

TEST(allowed_filter)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "abcdef", 0);
    ins(t, "abc", 1);
    ins(t, "abcdxy", 2);
    int only1[] = { 1 }, only12[] = { 1, 2 }, only0[] = { 0 }, none[] = { 9 };
    CHECK_EQ_INT(match_only(t, "abcdefg", only1, 1, &w), 3);
    CHECK_EQ_INT(w, 1);
    CHECK_EQ_INT(match_only(t, "abcdefg", only12, 2, &w), 4);
    CHECK_EQ_INT(w, 2);
    CHECK_EQ_INT(match_only(t, "abcdefg", only0, 1, &w), 6);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(match_only(t, "abcdefg", none, 1, &w), 0);
    CHECK_EQ_INT(w, -1);
    /* Worker ids past the bitset are not allowed. */
    ins(t, "zzz", 63);
    CHECK_EQ_INT(sglr_radix_match(t, "zzz", 3, (const uint8_t *)"\xff", 8, &w), 0);
    CHECK_EQ_INT(match(t, "zzz", &w), 3);
    CHECK_EQ_INT(w, 63);
    sglr_radix_free(t);
}

TEST(ties_go_to_most_recent)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "same text", 0);
    ins(t, "same text", 1);
    CHECK_EQ_INT(match(t, "same text", &w), 9);
    CHECK_EQ_INT(w, 1);
    ins(t, "same text", 0);
    CHECK_EQ_INT(match(t, "same text", &w), 9);
    CHECK_EQ_INT(w, 0);
    /* A match refreshes the worker it returns. */
    int only1[] = { 1 };
    CHECK_EQ_INT(match_only(t, "same", only1, 1, &w), 4);
    CHECK_EQ_INT(w, 1);
    CHECK_EQ_INT(match(t, "same text", &w), 9);
    CHECK_EQ_INT(w, 1);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

TEST(remove_worker)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "hello world", 0);
    ins(t, "hello there", 1);
    ins(t, "goodbye", 1);
    CHECK_EQ_INT(stats(t).nodes, 4);
    sglr_radix_remove_worker(t, 1);
    CHECK_EQ_INT(sglr_radix_size(t, 1), 0);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 11);
    /* "hello " and "world" fold back into one node. */
    CHECK_EQ_INT(stats(t).nodes, 1);
    CHECK_EQ_INT(stats(t).chars, 11);
    CHECK_EQ_INT(match(t, "hello there", &w), 6);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(match(t, "goodbye", &w), 0);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_remove_worker(t, 0);
    sglr_radix_remove_worker(t, 7);     /* unknown: no-op */
    CHECK_EQ_INT(stats(t).nodes, 0);
    CHECK_EQ_INT(stats(t).chars, 0);
    CHECK_EQ_INT(stats(t).tenancies, 0);
    CHECK_EQ_INT(match(t, "hello", &w), 0);
    ins(t, "again", 1);
    CHECK_EQ_INT(match(t, "again", &w), 5);
    CHECK_EQ_INT(w, 1);
    sglr_radix_free(t);
}

TEST(evict_lru_leaves_first)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "shared/aaaa", 0);   /* stamp 1 */
    ins(t, "shared/bbbb", 0);   /* 2 */
    ins(t, "shared/cccc", 0);   /* 3 */
    ins(t, "other", 1);         /* 4: worker 1 is under budget throughout */
    CHECK_EQ_INT(match(t, "shared/aaaa", &w), 11);   /* 5: aaaa is now recent */
    CHECK_EQ_INT(sglr_radix_size(t, 0), 7 + 12);
    CHECK_EQ_INT(sglr_radix_evict(t, 100), 0);
    /* Over by one: the least recently used leaf (bbbb) goes. */
    CHECK_EQ_INT(sglr_radix_evict(t, 18), 4);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 15);
    CHECK_EQ_INT(match(t, "shared/bbbb", &w), 7);
    CHECK_EQ_INT(match(t, "shared/cccc", &w), 11);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    /* Leaves go before the prefix they hang from, even a fresher prefix:
     * down to 7 leaves only "shared/". */
    CHECK_EQ_INT(sglr_radix_evict(t, 7), 8);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 7);
    CHECK_EQ_INT(match(t, "shared/cccc", &w), 7);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(sglr_radix_size(t, 1), 5);
    CHECK_EQ_INT(sglr_radix_evict(t, 0), 12);
    CHECK_EQ_INT(stats(t).nodes, 0);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

/* A pruned sibling would leave a chain of single children behind: the
 * eviction folds it, and the text still matches whole. */
TEST(evict_folds_the_chains_it_leaves)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "abcX", 0);
    ins(t, "abcY", 0);
    CHECK_EQ_INT(match(t, "abcX", &w), 4);     /* abcY is now the LRU leaf */
    CHECK_EQ_INT(stats(t).nodes, 3);
    CHECK_EQ_INT(sglr_radix_evict(t, 4), 1);
    CHECK_EQ_INT(stats(t).nodes, 1);           /* "abc" + "X" folded */
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(match(t, "abcX", &w), 4);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 4);
    /* a longer chain: a/b/c each with a dropped sibling */
    ins(t, "aaaa", 1);
    ins(t, "aaaab", 1);
    ins(t, "aaaabc", 1);
    ins(t, "aaaz", 1);
    CHECK_EQ_INT(match(t, "aaaabc", &w), 6);
    CHECK_EQ_INT(sglr_radix_evict(t, 6), 1);   /* "z" goes */
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(match(t, "aaaabc", &w), 6);
    CHECK_EQ_INT(w, 1);
    /* "a" {0,1} over "bcX" {0} and "aaabc" {1}: "aa", "a", "b", "c" folded */
    CHECK_EQ_INT(stats(t).nodes, 3);
    sglr_radix_free(t);
}

/* A node that loses one of its tenants may now fold with its only child. */
TEST(evict_folds_a_node_that_lost_a_tenant)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "ab", 1);        /* stamp 1: worker 1's oldest leaf */
    ins(t, "abcd", 0);      /* "ab" {0,1} -> "cd" {0} */
    ins(t, "zzzzz", 1);
    CHECK_EQ_INT(stats(t).nodes, 3);
    CHECK_EQ_INT(sglr_radix_evict(t, 5), 2);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(stats(t).nodes, 2);           /* "abcd" {0}, "zzzzz" {1} */
    CHECK_EQ_INT(match(t, "abcd", &w), 4);
    CHECK_EQ_INT(w, 0);
    sglr_radix_free(t);
}

/* A node remembered for folding (it lost one tenant) and pruned later in
 * the same eviction (it lost the other) is skipped, not folded. */
TEST(evict_skips_nodes_pruned_after_they_were_remembered)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "xy", 0);
    ins(t, "xy", 1);
    ins(t, "pppp", 0);
    ins(t, "qqqq", 1);
    CHECK_EQ_INT(sglr_radix_evict(t, 4), 4);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(stats(t).nodes, 2);
    CHECK_EQ_INT(match(t, "xy", &w), 0);
    CHECK_EQ_INT(match(t, "qqqq", &w), 4);
    CHECK_EQ_INT(w, 1);
    sglr_radix_free(t);
}

TEST(evict_keeps_nodes_other_workers_hold)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "prefix one", 0);
    ins(t, "prefix one", 1);
    ins(t, "prefix two", 0);
    /* Worker 0's oldest leaf is "one", which worker 1 keeps. */
    CHECK_EQ_INT(sglr_radix_evict(t, 10), 3);
    CHECK_EQ_INT(sglr_radix_size(t, 0), 10);
    CHECK_EQ_INT(sglr_radix_size(t, 1), 10);
    int only0[] = { 0 }, only1[] = { 1 };
    CHECK_EQ_INT(match_only(t, "prefix one", only0, 1, &w), 7);
    CHECK_EQ_INT(match_only(t, "prefix one", only1, 1, &w), 10);
    CHECK_EQ_INT(match_only(t, "prefix two", only0, 1, &w), 10);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

TEST(utf8_boundaries)
{
    sglr_radix_t *t = sglr_radix_new();
    int w;
    ins(t, "h\xc3\xa9llo", 0);                                  /* héllo */
    CHECK_EQ_INT(match(t, "h\xc3\xa8llo", &w), 1);              /* hèllo */
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(match(t, "h\xc3\xa9", &w), 3);
    ins(t, "\xc3\xa9t\xc3\xa9", 1);                             /* été */
    CHECK_EQ_INT(match(t, "\xc3\xa8", &w), 0);                  /* è */
    CHECK_EQ_INT(w, -1);
    ins(t, "x\xf0\x9f\x98\x80y", 2);                            /* x😀y */
    CHECK_EQ_INT(match(t, "x\xf0\x9f\x98\x81y", &w), 1);        /* x😁y */
    CHECK_EQ_INT(match(t, "x\xf0\x9f\x98\x80z", &w), 5);
    /* Not UTF-8 at all: bytes are matched as they are. */
    ins(t, "\x80\x80\x80\x80\x80\x80", 3);
    CHECK_EQ_INT(match(t, "\x80\x80\x80\x80\x80\x81", &w), 5);
    sglr_radix_free(t);
}

TEST(deep_chains)
{
    /* A conversation inserted turn by turn nests one node per turn; walks
     * over the tree must not recurse. */
    static char text[20000];
    memset(text, 'q', sizeof text);
    sglr_radix_t *t = sglr_radix_new();
    int w;
    for (size_t n = 4; n <= sizeof text; n += 4)
        CHECK_EQ_INT(sglr_radix_insert(t, text, n, 0), 0);
    CHECK_EQ_INT(stats(t).nodes, sizeof text / 4);
    CHECK_EQ_INT(match(t, "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq", &w), 61);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    /* Another worker sharing the first half, then an eviction and a
     * removal that fold the chain back together. */
    CHECK_EQ_INT(sglr_radix_insert(t, text, sizeof text / 2, 1), 0);
    CHECK_EQ_INT(sglr_radix_evict(t, sizeof text / 2), sizeof text / 2);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_remove_worker(t, 1);
    CHECK_EQ_INT(stats(t).nodes, 1);
    CHECK_EQ_INT(sglr_radix_size(t, 0), sizeof text / 2);
    sglr_radix_free(t);
}

TEST(memory_bounded_under_unique_prompts)
{
    sglr_radix_t *t = sglr_radix_new();
    char buf[256];
    unsigned x = 12345;
    size_t peak = 0;
    for (int i = 0; i < 20000; i++) {
        int n = snprintf(buf, sizeof buf, "You are a helpful assistant. Request %d:", i);
        for (int j = 0; j < 60; j++) {
            x = x * 1103515245u + 12345u;
            buf[n++] = (char)('a' + (x >> 16) % 26);
        }
        CHECK_EQ_INT(sglr_radix_insert(t, buf, (size_t)n, i % 4), 0);
        if (i % 500 == 499)
            sglr_radix_evict(t, 10000);
        if (stats(t).chars > peak)
            peak = stats(t).chars;
        CHECK(stats(t).kept <= (1u << 20));   /* the floor: this tree is small */
    }
    CHECK(peak < 4 * (10000 + 500 * 110));
    sglr_radix_evict(t, 10000);
    for (int w = 0; w < 4; w++)
        CHECK(sglr_radix_size(t, w) <= 10000);
    CHECK(stats(t).chars <= 4 * 10000);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

/* What an eviction frees is used again by the insertions that follow (a
 * cache_aware tree under unique prompts frees and makes a leaf of a few KB
 * per request), the blocks kept never pass the characters the tree holds
 * (or 1 MB), and the tree reads the same as ever. */
TEST(evicted_edges_are_reused)
{
    sglr_radix_t *t = sglr_radix_new();
    static char buf[4096];
    memset(buf, 'q', sizeof buf);
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 2000; i++) {
            int n = snprintf(buf, 32, "%05d-%d", i, round);
            buf[n] = ':';
            CHECK_EQ_INT(sglr_radix_insert(t, buf, 1000 + (size_t)(i % 7) * 400, i % 2), 0);
        }
        size_t held = stats(t).chars;
        (void)held;      /* (sanitizer builds keep nothing to compare) */
        CHECK(sglr_radix_evict(t, 100000) > 0);
        CHECK_EQ_INT(sglr_radix_check(t), 0);
        size_t kept = stats(t).kept;
#ifdef SGLR_NO_FREELIST
        CHECK_EQ_INT(kept, 0);     /* sanitizer builds: every block is freed */
#else
        CHECK(kept > (1u << 20) / 2);
        CHECK(kept <= held);
#endif
        /* the next unique prompt takes a kept block of its class */
        int n = snprintf(buf, 32, "next-%d", round);
        buf[n] = ':';
        CHECK_EQ_INT(sglr_radix_insert(t, buf, 2200, 0), 0);
#ifndef SGLR_NO_FREELIST
        CHECK_EQ_INT(stats(t).kept, kept - 2208);
#endif
        int w = -1;
        CHECK_EQ_INT(sglr_radix_match(t, buf, 2200, NULL, 0, &w), 2200);
        CHECK_EQ_INT(w, 0);
        CHECK_EQ_INT(sglr_radix_check(t), 0);
    }
    sglr_radix_free(t);
}

/* A split leaves the rest of a long edge where it is, its block starting
 * before it: the text stays whole through many splits, the merges that
 * fold the pieces back (one appends into the rest's own block), removal
 * and eviction. */
TEST(splits_keep_the_rest_in_place)
{
    sglr_radix_t *t = sglr_radix_new();
    static char a[3000], b[3100];
    for (size_t i = 0; i < sizeof a; i++)
        a[i] = (char)('a' + i % 23);
    CHECK_EQ_INT(sglr_radix_insert(t, a, sizeof a, 0), 0);
    /* worker 1 branches off every 10 bytes: each cuts the rest of a's leaf */
    for (size_t k = 10; k <= 200; k += 10) {
        memcpy(b, a, k);
        memcpy(b + k, "#tail", 5);
        CHECK_EQ_INT(sglr_radix_insert(t, b, k + 5, 1), 0);
        CHECK_EQ_INT(sglr_radix_check(t), 0);
    }
    int w = -1;
    CHECK_EQ_INT(sglr_radix_match(t, a, sizeof a, NULL, 0, &w), sizeof a);
    CHECK_EQ_INT(w, 0);
    CHECK_EQ_INT(sglr_radix_size(t, 0), sizeof a);
    /* worker 0 also holds a longer text: the rest gets a child of its own */
    memcpy(b, a, sizeof a);
    memcpy(b + sizeof a, "ZZZZ", 4);
    CHECK_EQ_INT(sglr_radix_insert(t, b, sizeof a + 4, 0), 0);
    /* worker 1 goes: every piece folds back, the last into the rest's block */
    sglr_radix_remove_worker(t, 1);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(stats(t).nodes, 1);
    CHECK_EQ_INT(sglr_radix_match(t, b, sizeof a + 4, NULL, 0, &w), sizeof a + 4);
    CHECK_EQ_INT(w, 0);
    /* the same cuts again, then eviction down to nothing */
    for (size_t k = 7; k <= 300; k += 31) {
        memcpy(b, a, k);
        memcpy(b + k, "#x", 2);
        CHECK_EQ_INT(sglr_radix_insert(t, b, k + 2, 1), 0);
    }
    CHECK_EQ_INT(sglr_radix_match(t, a, sizeof a, NULL, 0, &w), sizeof a);
    CHECK(sglr_radix_evict(t, 0) > 0);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    CHECK_EQ_INT(stats(t).nodes, 0);
    sglr_radix_free(t);
}

/* Two trees given the same calls are the same tree, as far as the API
 * sees: sizes, counts, and what every probe matches. */
static int same_trees(sglr_radix_t *a, sglr_radix_t *b)
{
    static const char *probes[] = { "You are a helpful assistant. Q1", "You are a helpful assistant. Q3 and more",
                                     "You are a helpful assistant. Q4 x", "You are a pirate. Arr", "You are",
                                     "Translate: hello", "Translate: howdy", "You are a helpful" };
    if (sglr_radix_check(a) || sglr_radix_check(b))
        return 0;
    sglr_radix_stats_t sa = stats(a), sb = stats(b);
    if (sa.nodes != sb.nodes || sa.chars != sb.chars || sa.tenancies != sb.tenancies)
        return 0;
    for (int w = 0; w < 2; w++)
        if (sglr_radix_size(a, w) != sglr_radix_size(b, w))
            return 0;
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        int wa, wb;
        if (match(a, probes[i], &wa) != match(b, probes[i], &wb) || wa != wb)
            return 0;
    }
    return 1;
}

/* A keyed insert goes on from where its text's keyed match stopped, only
 * while nothing changed the tree's shape in between, and only for the
 * same text: the tree it leaves is the one a plain insert leaves. */
TEST(keyed_insert_resumes_from_its_match)
{
    sglr_radix_t *a = sglr_radix_new(), *b = sglr_radix_new();
    static const char *seed[] = { "You are a helpful assistant. Q1", "You are a helpful assistant. Q2",
                                  "You are a pirate. Arr", "Translate: hi" };
    for (int i = 0; i < 4; i++) {
        CHECK_EQ_INT(ins(a, seed[i], i % 2), 0);
        CHECK_EQ_INT(ins(b, seed[i], i % 2), 0);
    }
    const char *q = "You are a helpful assistant. Q3 and more";
    int wa, wb;
    size_t ma = sglr_radix_match_keyed(a, q, strlen(q), NULL, 0, &wa, 11);
    CHECK_EQ_INT(ma, match(b, q, &wb));
    CHECK_EQ_INT(wa, wb);
    CHECK_EQ_INT(sglr_radix_insert_keyed(a, q, strlen(q), 1, 11), 0);
    CHECK_EQ_INT(ins(b, q, 1), 0);
    CHECK_EQ_INT(stats(a).resumed, 1);
    CHECK(same_trees(a, b));

    /* the shape changed after the match (a split on its path): walked again */
    const char *q2 = "You are a helpful assistant. Q4 x";
    sglr_radix_match_keyed(a, q2, strlen(q2), NULL, 0, &wa, 12);
    match(b, q2, &wb);
    CHECK_EQ_INT(ins(a, "You are a helpful", 0), 0);
    CHECK_EQ_INT(ins(b, "You are a helpful", 0), 0);
    CHECK_EQ_INT(sglr_radix_insert_keyed(a, q2, strlen(q2), 1, 12), 0);
    CHECK_EQ_INT(ins(b, q2, 1), 0);
    CHECK_EQ_INT(stats(a).resumed, 1);
    CHECK(same_trees(a, b));

    /* another key: another text, even in the same buffer */
    static char buf[32];
    strcpy(buf, "Translate: hello");
    sglr_radix_match_keyed(a, buf, strlen(buf), NULL, 0, &wa, 13);
    match(b, buf, &wb);
    strcpy(buf, "Translate: howdy");
    CHECK_EQ_INT(sglr_radix_insert_keyed(a, buf, strlen(buf), 0, 14), 0);
    CHECK_EQ_INT(ins(b, buf, 0), 0);
    CHECK_EQ_INT(stats(a).resumed, 1);
    CHECK(same_trees(a, b));

    /* and the same key again after its insert: used once */
    sglr_radix_match_keyed(a, q, strlen(q), NULL, 0, &wa, 15);
    match(b, q, &wb);
    CHECK_EQ_INT(sglr_radix_insert_keyed(a, q, strlen(q), 0, 15), 0);
    CHECK_EQ_INT(sglr_radix_insert_keyed(a, q, strlen(q), 1, 15), 0);
    CHECK_EQ_INT(ins(b, q, 0), 0);
    CHECK_EQ_INT(ins(b, q, 1), 0);
    CHECK_EQ_INT(stats(a).resumed, 2);
    CHECK(same_trees(a, b));
    sglr_radix_free(a);
    sglr_radix_free(b);
}

/* Under unique prompts with eviction, a tree in its steady state makes
 * next to no allocations: edge blocks, node slots and child arrays come
 * back from what the evictions released. */
TEST(steady_churn_allocates_little)
{
    sglr_radix_t *t = sglr_radix_new();
    static char buf[3000];
    memset(buf, 'p', sizeof buf);
    unsigned allocs[3];
    for (int round = 0; round < 3; round++) {
        fault_count = 0;
        fault_every = UINT_MAX;     /* counts every allocation, fails none */
        for (int i = 0; i < 2000; i++) {
            int n = snprintf(buf, 48, "a shared system prompt. Question %d-%d:", round, i);
            buf[n] = ' ';
            CHECK_EQ_INT(sglr_radix_insert(t, buf, 2000 + (size_t)(i % 64) * 9, 0), 0);
            if (i % 400 == 399)
                CHECK(sglr_radix_evict(t, 500000) > 0);
        }
        allocs[round] = fault_count;
        fault_every = 0;
        CHECK_EQ_INT(sglr_radix_check(t), 0);
    }
    printf("     allocations a round of 2000 insertions: %u, %u, %u\n", allocs[0], allocs[1], allocs[2]);
#ifndef SGLR_NO_FREELIST
    CHECK(allocs[2] < 2000 / 20);
#endif
    sglr_radix_free(t);
}

TEST(evict_is_fast)
{
    /* 4M chars over 16 workers, then drop 1M: must not be quadratic. */
    sglr_radix_t *t = sglr_radix_new();
    static char buf[1024];
    unsigned x = 7;
    for (int i = 0; i < 4096; i++) {
        for (int j = 0; j < 1024; j++) {
            x = x * 1103515245u + 12345u;
            buf[j] = (char)('a' + (x >> 16) % 26);
        }
        memcpy(buf, "shared system prompt number ", 28);
        buf[28] = (char)('A' + i % 8);
        sglr_radix_insert(t, buf, sizeof buf, i % 16);
    }
    size_t before = stats(t).chars;
    clock_t c0 = clock();
    size_t removed = sglr_radix_evict(t, (before - (1u << 20)) / 16);
    double ms = (double)(clock() - c0) * 1000.0 / CLOCKS_PER_SEC;
    fprintf(stderr, "     evicted %zu chars of %zu in %.2f ms\n", removed, before, ms);
    CHECK(removed >= (1u << 20) - 16 * 1024);
    CHECK(ms < 250);     /* well under 50 ms in a release build; ASan is slower */
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

/* Many leaves of two workers in one heap: each keeps exactly its most
 * recently used ones, as its inserts and matches ordered them. */
TEST(evict_takes_the_least_recent_of_many)
{
    enum { NS = 90, KEEP = 37 };
    sglr_radix_t *t = sglr_radix_new();
    char s[NS][8];
    uint64_t last[2][NS], now = 0;
    int order[NS], w;
    srand(7);
    for (int i = 0; i < NS; i++) {
        snprintf(s[i], sizeof s[i], "%c-%04d", 33 + i, i * 37 % 1000);   /* own first byte */
        order[i] = i;
    }
    for (int i = NS - 1; i > 0; i--) {
        int j = rand() % (i + 1), x = order[i];
        order[i] = order[j];
        order[j] = x;
    }
    for (int k = 0; k < 2 * NS; k++) {
        int wk = k & 1, i = wk ? order[NS - 1 - k / 2] : order[k / 2];
        ins(t, s[i], wk);
        last[wk][i] = ++now;
    }
    for (int k = 0; k < 300; k++) {
        int wk = rand() % 2, i = rand() % NS;
        CHECK_EQ_INT(match_only(t, s[i], &wk, 1, &w), 6);
        CHECK_EQ_INT(w, wk);
        last[wk][i] = ++now;
    }
    CHECK_EQ_INT(sglr_radix_evict(t, 6 * KEEP), 2 * 6 * (NS - KEEP));
    for (int wk = 0; wk < 2; wk++) {
        CHECK_EQ_INT(sglr_radix_size(t, wk), 6 * KEEP);
        for (int i = 0; i < NS; i++) {
            int newer = 0;
            for (int j = 0; j < NS; j++)
                newer += last[wk][j] > last[wk][i];
            CHECK_EQ_INT(match_only(t, s[i], &wk, 1, &w), newer < KEEP ? 6 : 0);
        }
    }
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
}

/* ---- randomized comparison with a brute-force model --------------------- */

#define NW 6
#define MAXS 400

typedef struct {
    char s[MAXS][40];
    int n;
} model_t;

static size_t raw_lcp(const char *a, const char *b)
{
    size_t i = 0;
    while (a[i] && a[i] == b[i])
        i++;
    return i;
}

static size_t utf8_floor(const char *s, size_t pos)
{
    size_t n = strlen(s);
    size_t q = pos;
    while (q > 0 && q < n && ((unsigned char)s[q] & 0xC0) == 0x80)
        q--;
    return q;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Distinct non-empty prefixes of a worker's strings = bytes it holds. */
static size_t model_size(model_t *m)
{
    static char sorted[MAXS][40];
    memcpy(sorted, m->s, sizeof(m->s[0]) * (size_t)m->n);
    qsort(sorted, (size_t)m->n, sizeof sorted[0], cmp_str);
    size_t total = 0;
    for (int i = 0; i < m->n; i++)
        total += strlen(sorted[i]) - (i ? raw_lcp(sorted[i], sorted[i - 1]) : 0);
    return total;
}

TEST(randomized_against_model)
{
    static const char *alpha[] = { "a", "b", "\xc3\xa9", "\xc3\xa8", "\xe2\x82\xac" };
    static model_t model[NW];
    memset(model, 0, sizeof model);
    sglr_radix_t *t = sglr_radix_new();
    unsigned x = 2024;
#define RND(n) ((x = x * 1103515245u + 12345u), (int)((x >> 8) % (unsigned)(n)))
    for (int op = 0; op < 20000; op++) {
        char s[40] = { 0 };
        int len = RND(10);
        for (int i = 0; i < len; i++)
            strcat(s, alpha[RND(5)]);
        int r = RND(100);
        if (r < 45) {
            int w = RND(NW);
            if (model[w].n < MAXS && *s) {
                if (RND(2)) {
                    /* as a policy does: a keyed match (some workers
                     * allowed), then the insert goes on from it */
                    uint8_t bits = (uint8_t)RND(64);
                    int got;
                    sglr_radix_match_keyed(t, s, strlen(s), &bits, 8, &got, (uint64_t)op + 1);
                    CHECK_EQ_INT(sglr_radix_insert_keyed(t, s, strlen(s), w, (uint64_t)op + 1), 0);
                } else {
                    CHECK_EQ_INT(sglr_radix_insert(t, s, strlen(s), w), 0);
                }
                strcpy(model[w].s[model[w].n++], s);
            }
        } else if (r < 97) {
            uint8_t bits = 0;
            int use_filter = RND(2);
            for (int w = 0; w < NW; w++)
                if (!use_filter || RND(2))
                    bits |= (uint8_t)(1u << w);
            size_t best = 0;
            for (int w = 0; w < NW; w++) {
                if (!(bits >> w & 1))
                    continue;
                for (int i = 0; i < model[w].n; i++) {
                    size_t l = raw_lcp(s, model[w].s[i]);
                    if (l > best)
                        best = l;
                }
            }
            int got;
            size_t n = sglr_radix_match(t, s, strlen(s), use_filter ? &bits : NULL,
                                        use_filter ? 8 : 0, &got);
            CHECK_EQ_INT(n, utf8_floor(s, best));
            if (n == 0) {
                CHECK_EQ_INT(got, -1);
            } else {
                /* The returned worker holds a string sharing the whole raw match. */
                CHECK(got >= 0 && got < NW && (bits >> got & 1));
                size_t mine = 0;
                for (int i = 0; i < model[got].n; i++) {
                    size_t l = raw_lcp(s, model[got].s[i]);
                    if (l > mine)
                        mine = l;
                }
                CHECK_EQ_INT(mine, best);
            }
        } else {
            int w = RND(NW);
            sglr_radix_remove_worker(t, w);
            model[w].n = 0;
        }
        if (op % 500 == 0) {
            CHECK_EQ_INT(sglr_radix_check(t), 0);
            for (int w = 0; w < NW; w++)
                CHECK_EQ_INT(sglr_radix_size(t, w), model_size(&model[w]));
        }
    }
    /* Eviction keeps the tree sound and every worker within budget, and
     * whatever a worker still holds is a prefix of something it was sent. */
    CHECK(sglr_radix_evict(t, 20) > 0);
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    for (int w = 0; w < NW; w++)
        CHECK(sglr_radix_size(t, w) <= 20);
    sglr_radix_free(t);
#undef RND
}

TEST(randomized_with_eviction_stays_sound)
{
    static const char *alpha[] = { "ab", "b", "\xc3\xa9", "c", "xyz" };
    sglr_radix_t *t = sglr_radix_new();
    unsigned x = 99;
#define RND(n) ((x = x * 1103515245u + 12345u), (int)((x >> 8) % (unsigned)(n)))
    for (int op = 0; op < 30000; op++) {
        char s[80] = { 0 };
        int len = RND(20);
        for (int i = 0; i < len; i++)
            strcat(s, alpha[RND(5)]);
        int r = RND(100), w = RND(12), got;
        if (r < 60)
            CHECK_EQ_INT(sglr_radix_insert(t, s, strlen(s), w), 0);
        else if (r < 90)
            sglr_radix_match(t, s, strlen(s), NULL, 0, &got);
        else if (r < 99) {
            size_t max = (size_t)RND(200);
            sglr_radix_evict(t, max);
            for (int i = 0; i < 12; i++)
                CHECK(sglr_radix_size(t, i) <= max);
        } else
            sglr_radix_remove_worker(t, w);
        if (op % 100 == 0)
            CHECK_EQ_INT(sglr_radix_check(t), 0);
    }
    sglr_radix_free(t);
#undef RND
}

/* Trees over many slabs, with frequent evictions reusing freed slots: the
 * tree stays sound, every worker within budget, and each worker's latest
 * prompt survives any eviction whose budget it fits in (it is the most
 * recently used path). */
TEST(randomized_eviction_over_many_slabs)
{
    enum { NWK = 6 };
    sglr_radix_t *t = sglr_radix_new();
    char last[NWK][64];
    int have[NWK] = { 0 };
    unsigned x = 7;
#define RND(n) ((x = x * 1103515245u + 12345u), (int)((x >> 8) % (unsigned)(n)))
    size_t peak = 0;
    for (int op = 0; op < 40000; op++) {
        int w = RND(NWK), r = RND(1000);
        if (r < 990) {
            /* shared stems with unique tails: many nodes, many splits */
            int a = RND(40), b = RND(300), c = RND(100000);
            snprintf(last[w], sizeof last[w], "stem%d/%d/tail%d", a, b, c);
            CHECK_EQ_INT(ins(t, last[w], w), 0);
            have[w] = 1;
        } else if (r < 998) {
            size_t max = 200 + (size_t)RND(60000);
            sglr_radix_evict(t, max);
            for (int i = 0; i < NWK; i++) {
                CHECK(sglr_radix_size(t, i) <= max);
                if (have[i] && strlen(last[i]) <= max) {
                    int only[1] = { i }, got;
                    CHECK_EQ_INT(match_only(t, last[i], only, 1, &got), strlen(last[i]));
                    CHECK_EQ_INT(got, i);
                }
            }
        } else {
            sglr_radix_remove_worker(t, w);
            have[w] = 0;
        }
        if (stats(t).nodes > peak)
            peak = stats(t).nodes;
        if (op % 1000 == 0)
            CHECK_EQ_INT(sglr_radix_check(t), 0);
    }
    fprintf(stderr, "     peak %zu nodes\n", peak);
    CHECK(peak > 3 * 1024);     /* several slabs' worth */
    CHECK_EQ_INT(sglr_radix_check(t), 0);
    sglr_radix_free(t);
#undef RND
}

/* Out of memory anywhere (slabs, edges, child and tenant arrays, the
 * eviction heap and fold list): every operation leaves a sound tree, and
 * once memory is back the tree empties cleanly (ASan checks for leaks). */
TEST(allocation_failures_leave_the_tree_sound)
{
    static const unsigned every[] = { 3, 7, 19, 101 };
    for (size_t e = 0; e < sizeof every / sizeof every[0]; e++) {
        sglr_radix_t *t = sglr_radix_new();
        unsigned x = 1234 + (unsigned)e;
#define RND(n) ((x = x * 1103515245u + 12345u), (int)((x >> 8) % (unsigned)(n)))
        int failed = 0;
        for (int op = 0; op < 4000; op++) {
            char s[64];
            int a = RND(30), b = RND(2000), w = RND(5), r = RND(100), got;
            snprintf(s, sizeof s, "p%d/%d-%s", a, b, r < 50 ? "x" : "yyyyyyyyyyyy");
            fault_every = every[e];
            if (r < 70) {
                int rc = sglr_radix_insert(t, s, strlen(s), w);
                CHECK(rc == 0 || rc == -ENOMEM);
                failed += rc != 0;
            } else if (r < 90) {
                sglr_radix_match(t, s, strlen(s), NULL, 0, &got);
            } else if (r < 99) {
                sglr_radix_evict(t, (size_t)RND(3000));
            } else {
                sglr_radix_remove_worker(t, w);
            }
            fault_every = 0;
            CHECK_EQ_INT(sglr_radix_check(t), 0);
        }
        CHECK(failed > 0);
        sglr_radix_evict(t, 0);
        CHECK_EQ_INT(stats(t).nodes, 0);
        CHECK_EQ_INT(sglr_radix_check(t), 0);
        sglr_radix_free(t);
#undef RND
    }
}

int main(void)
{
    RUN(split_edges);
    RUN(many_workers_overlap);
    RUN(allowed_filter);
    RUN(ties_go_to_most_recent);
    RUN(remove_worker);
    RUN(evict_lru_leaves_first);
    RUN(evict_folds_the_chains_it_leaves);
    RUN(evict_folds_a_node_that_lost_a_tenant);
    RUN(evict_skips_nodes_pruned_after_they_were_remembered);
    RUN(evict_keeps_nodes_other_workers_hold);
    RUN(evict_takes_the_least_recent_of_many);
    RUN(utf8_boundaries);
    RUN(deep_chains);
    RUN(memory_bounded_under_unique_prompts);
    RUN(evicted_edges_are_reused);
    RUN(steady_churn_allocates_little);
    RUN(evict_is_fast);
    RUN(splits_keep_the_rest_in_place);
    RUN(keyed_insert_resumes_from_its_match);
    RUN(randomized_against_model);
    RUN(randomized_with_eviction_stays_sound);
    RUN(randomized_eviction_over_many_slabs);
    RUN(allocation_failures_leave_the_tree_sound);
    TEST_EXIT();
}
