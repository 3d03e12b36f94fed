/*
 * splice.c: PD disaggregation by splicing JSON text (see splice.h).
 *
 * Each rewrite walks its input once with the lexer of core/json.c,
 * remembering only where things are, and copies the input to the output in
 * spans around the points it changes. Bootstrap injection keeps every
 * top-level member but the client's bootstrap_* ones, then adds its own
 * before the closing brace, where the commas are easy to get right:
 *
 *     { "a":1 , "bootstrap_room":5 , "b":2 }
 *     { "a":1                      , "b":2  ,"bootstrap_host":..,... }
 *     ^--copied--^                 ^--copied ^--added--------------^ ^tail
 *
 * The logprob merge finds the '[' of meta_info.input_token_logprobs in the
 * decode response and inserts the prefill's items right after it:
 *
 *     decode  {"meta_info":{"input_token_logprobs":[ D1,D2]}}
 *     out     {"meta_info":{"input_token_logprobs":[P1,P2, D1,D2]}}
 *                                                  ^ inserted "P1,P2,"
 *
 * The data-parallel rank is the same rewrite with one member:
 *
 *     {"text":"hi","data_parallel_rank":7}  ->  {"text":"hi","data_parallel_rank":2}
 *
 * On any failure the output buffer is cut back to where it was, so a
 * caller can still forward the original bytes.
 */
#include "splice.h"

#include "extract.h"
#include "json.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define TRY(e) do { int _r = (e); if (_r < 0) return _r; } while (0)

/* Hostnames are at most 253 bytes; an IPv6 literal with a zone is less. */
#define HOST_MAX 255
/* A stream event longer than this is passed through rather than held. */
#define SSE_HOLD_MAX (64u << 20)

static int append(sglr_buf_t *out, const void *p, size_t n)
{
    return sglr_buf_append(out, (const char *)p, n);
}

/* Undo a partial write. */
static int rollback(sglr_buf_t *out, size_t mark, int r)
{
    out->len = mark;
    if (mark < out->cap)
        out->data[mark] = 0;
    return r;
}

/* A JSON integer's text as a value, saturating at +-2^62. */
static long long int_value(const uint8_t *p, const uint8_t *end)
{
    const long long cap = 1LL << 62;
    int neg = p < end && *p == '-';
    long long v = 0;
    for (p += neg; p < end && *p >= '0' && *p <= '9'; p++)
        v = v < cap / 10 ? v * 10 + (*p - '0') : cap;
    return neg ? -v : v;
}

/* ---- batch detection ------------------------------------------------------ */

enum {
    ONE_STRING = 1,     /* "x": single */
    STRINGS = 2,        /* ["x", "y"]: a batch */
    IDS = 4,            /* [1, 2]: single */
    ID_ARRAYS = 8,      /* [[1, 2], [3]]: a batch */
};

/* The batch a prompt field at the cursor makes, given the shapes it may
 * take: *n = -1 for null (absent), 0 for single, N for a batch. */
static int prompt_shape(sglr_json_t *j, int allowed, long *n)
{
    int c = sglr_json_peek(j), more, is_int;
    if (c == 'n') {
        *n = -1;
        return sglr_json_literal(j);
    }
    if (c == '"') {
        *n = 0;
        return allowed & ONE_STRING ? sglr_json_string(j, NULL) : -EINVAL;
    }
    if (c != '[')
        return -EINVAL;
    TRY(more = sglr_json_open(j, ']'));
    if (!more)
        return -EINVAL;         /* an empty batch: no room to give it */
    int shape = 0;
    long count = 0;
    while (more) {
        int e;
        c = sglr_json_peek(j);
        if (c == '"') {
            e = STRINGS;
            TRY(sglr_json_string(j, NULL));
        } else if (sglr_json_is_number_start(c)) {
            e = IDS;
            TRY(sglr_json_number(j, &is_int));
            if (!is_int)
                return -EINVAL;
        } else if (c == '[') {
            e = ID_ARRAYS;
            int inner;
            TRY(inner = sglr_json_open(j, ']'));
            while (inner) {
                if (!sglr_json_is_number_start(sglr_json_peek(j)))
                    return -EINVAL;
                TRY(sglr_json_number(j, &is_int));
                if (!is_int)
                    return -EINVAL;
                TRY(inner = sglr_json_next(j, ']'));
            }
        } else {
            return -EINVAL;
        }
        if (!(allowed & e) || (shape && e != shape))
            return -EINVAL;
        shape = e;
        if (++count > SGLR_SPLICE_MAX_BATCH && e != IDS)
            return -E2BIG;
        TRY(more = sglr_json_next(j, ']'));
    }
    *n = shape == IDS ? 0 : count;
    return 0;
}

/* chat "n": *n = -1 for null, else the number of choices. */
static int choices(sglr_json_t *j, long *n)
{
    int c = sglr_json_peek(j), is_int;
    if (c == 'n') {
        *n = -1;
        return sglr_json_literal(j);
    }
    if (!sglr_json_is_number_start(c))
        return -EINVAL;
    const uint8_t *start = j->p;
    TRY(sglr_json_number(j, &is_int));
    if (!is_int)
        return -EINVAL;
    long long v = int_value(start, j->p);
    if (v > SGLR_SPLICE_MAX_BATCH)
        return -E2BIG;
    *n = v > 1 ? (long)v : 0;
    return 0;
}

/* A truthy logprobs request value: true, or a number (completions' count;
 * 0 still asks for the sampled tokens' logprobs). The value is skipped. */
static int logprob_value(sglr_json_t *j, int *on)
{
    int c = sglr_json_peek(j);
    *on = c == 't' || c == '-' || (c >= '0' && c <= '9');
    return sglr_json_skip(j);
}

static int is_bootstrap_key(const sglr_json_key_t *k);

int sglr_splice_request(int route, const char *body, size_t len, int *logprobs)
{
    return sglr_splice_request_ex(route, body, len, logprobs, NULL);
}

int sglr_splice_request_ex(int route, const char *body, size_t len, int *logprobs,
                           int *bootstrap_keys)
{
    int lp = 0, bk = 0;
    if ((!body && len) ||
        (route != SGLR_ROUTE_GENERATE && route != SGLR_ROUTE_CHAT &&
         route != SGLR_ROUTE_COMPLETIONS))
        return -EINVAL;
    sglr_json_t j;
    sglr_json_init(&j, body, len, NULL, 0);
    /* -1: absent; the last duplicate counts */
    long text = -1, ids = -1, prompt = -1, n = -1;
    int more;
    if (sglr_json_peek(&j) != '{')
        return -EINVAL;
    TRY(more = sglr_json_open(&j, '}'));
    while (more) {
        sglr_json_key_t k;
        TRY(sglr_json_key(&j, &k));
        if (route == SGLR_ROUTE_GENERATE && SGLR_JSON_KEY_IS(&k, "text"))
            TRY(prompt_shape(&j, ONE_STRING | STRINGS, &text));
        else if (route == SGLR_ROUTE_GENERATE && SGLR_JSON_KEY_IS(&k, "input_ids"))
            TRY(prompt_shape(&j, IDS | ID_ARRAYS, &ids));
        else if (route == SGLR_ROUTE_COMPLETIONS && SGLR_JSON_KEY_IS(&k, "prompt"))
            TRY(prompt_shape(&j, ONE_STRING | STRINGS | IDS | ID_ARRAYS, &prompt));
        else if (route == SGLR_ROUTE_CHAT && SGLR_JSON_KEY_IS(&k, "n"))
            TRY(choices(&j, &n));
        else if (SGLR_JSON_KEY_IS(&k, "return_logprob") || SGLR_JSON_KEY_IS(&k, "logprobs"))
            TRY(logprob_value(&j, &lp));
        else {
            bk |= is_bootstrap_key(&k);
            TRY(sglr_json_skip(&j));
        }
        TRY(more = sglr_json_next(&j, '}'));
    }
    if (sglr_json_peek(&j) >= 0)
        return -EINVAL;
    long batch;
    switch (route) {
    case SGLR_ROUTE_GENERATE: batch = text >= 0 ? text : ids; break;  /* text wins */
    case SGLR_ROUTE_COMPLETIONS: batch = prompt; break;
    default: batch = n; break;
    }
    if (logprobs)
        *logprobs = lp;
    if (bootstrap_keys)
        *bootstrap_keys = bk;
    return batch > 0 ? (int)batch : 0;
}

int sglr_splice_batch(int route, const char *body, size_t len)
{
    return sglr_splice_request(route, body, len, NULL);
}

int sglr_splice_sse_last(const char *p, size_t n, size_t *off, size_t *len)
{
    int found = 0;
    size_t i = 0;
    while (i < n) {
        size_t e = i;
        while (e < n && p[e] != '\n')
            e++;
        size_t le = e > i && p[e - 1] == '\r' ? e - 1 : e;
        if (le - i > 5 && memcmp(p + i, "data:", 5) == 0) {
            size_t v = i + 5;
            while (v < le && p[v] == ' ')
                v++;
            if (v < le && p[v] == '{') {
                *off = v;
                *len = le - v;
                found = 1;
            }
        }
        i = e + 1;
    }
    return found ? 0 : -ENOENT;
}

/* ---- bootstrap injection ---------------------------------------------------- */

static int is_bootstrap_key(const sglr_json_key_t *k)
{
    return SGLR_JSON_KEY_IS(k, "bootstrap_host") || SGLR_JSON_KEY_IS(k, "bootstrap_port") ||
           SGLR_JSON_KEY_IS(k, "bootstrap_room");
}


/* One field: "name":v or, for a batch, "name":[v,v,...]; each v is the
 * same text or, when rooms is given, rooms[i] in decimal. */
static int add_field(sglr_buf_t *out, const char *name, const char *v, size_t vn,
                     const uint64_t *rooms, int batch)
{
    char num[20];
    TRY(append(out, name, strlen(name)));
    if (batch)
        TRY(append(out, "[", 1));
    for (int i = 0; i < (batch ? batch : 1); i++) {
        if (i)
            TRY(append(out, ",", 1));
        if (rooms)
            TRY(append(out, num, sglr_u64_dec(num, rooms[i])));
        else
            TRY(append(out, v, vn));
    }
    return batch ? append(out, "]", 1) : 0;
}

static int add_bootstrap(sglr_buf_t *out, const char *qhost, size_t qn, int port,
                         const uint64_t *rooms, int batch)
{
    char ptxt[8];
    size_t pn = port < 0 ? 4 : sglr_u64_dec(ptxt, (uint64_t)port);
    TRY(add_field(out, "\"bootstrap_host\":", qhost, qn, NULL, batch));
    TRY(add_field(out, ",\"bootstrap_port\":", port < 0 ? "null" : ptxt, pn, NULL, batch));
    return add_field(out, ",\"bootstrap_room\":", NULL, 0, rooms, batch);
}

/* Rewrite the top-level members of the object body[0..len): keep every
 * member drop() refuses, then add(ctx) writes its own ones before the
 * closing brace (after a comma when a member was kept). */
typedef int (*drop_fn)(const sglr_json_key_t *k);
typedef int (*add_fn)(sglr_buf_t *out, const void *ctx);

/* inlined into each caller, so drop() and add() are direct calls there */
static inline __attribute__((always_inline)) int
rewrite_members(sglr_buf_t *out, const char *body, size_t len, drop_fn drop, add_fn add,
                const void *ctx)
{
    sglr_json_t j;
    sglr_json_init(&j, body, len, NULL, 0);
    if (sglr_json_peek(&j) != '{')
        return -EINVAL;
    size_t mark = out->len;
    const uint8_t *tail = j.p + 1;      /* the bytes after the last member */
    const uint8_t *lead = tail;         /* where the current member starts */
    int r, more, kept = 0;
    if ((r = append(out, j.s, (size_t)(tail - j.s))) < 0 ||
        (r = more = sglr_json_open(&j, '}')) < 0)
        return rollback(out, mark, r);
    while (more) {
        sglr_json_key_t k;
        if ((r = sglr_json_key(&j, &k)) < 0 || (r = sglr_json_skip(&j)) < 0)
            return rollback(out, mark, r);
        if (!drop(&k)) {
            if ((kept++ && (r = append(out, ",", 1)) < 0) ||
                (r = append(out, lead, (size_t)(j.p - lead))) < 0)
                return rollback(out, mark, r);
        }
        tail = j.p;
        if ((r = more = sglr_json_next(&j, '}')) < 0)
            return rollback(out, mark, r);
        lead = j.p;
    }
    if (sglr_json_peek(&j) >= 0)
        return rollback(out, mark, -EINVAL);
    if ((kept && (r = append(out, ",", 1)) < 0) || (r = add(out, ctx)) < 0 ||
        (r = append(out, tail, (size_t)(j.end - tail))) < 0)
        return rollback(out, mark, r);
    return 0;
}

typedef struct {
    const char *qhost;
    size_t qn;
    int port;
    const uint64_t *rooms;
    int batch;
} bootstrap_t;

static int add_bootstrap_cb(sglr_buf_t *out, const void *ctx)
{
    const bootstrap_t *b = ctx;
    return add_bootstrap(out, b->qhost, b->qn, b->port, b->rooms, b->batch);
}

int sglr_splice_bootstrap(sglr_buf_t *out, const char *body, size_t len,
                          const char *host, size_t hlen, int port,
                          const uint64_t *rooms, size_t nrooms, int batch)
{
    char qhost[HOST_MAX * 6 + 2];
    if (!out || (!body && len) || (!host && hlen) || !rooms || hlen > HOST_MAX ||
        batch < 0 || batch > SGLR_SPLICE_MAX_BATCH ||
        nrooms != (batch ? (size_t)batch : 1) || port > 65535)
        return -EINVAL;
    int qn = sglr_json_quote(qhost, sizeof qhost, host ? host : "", hlen);
    if (qn < 0)
        return -EINVAL;
    bootstrap_t b = { qhost, (size_t)qn, port, rooms, batch };
    return rewrite_members(out, body, len, is_bootstrap_key, add_bootstrap_cb, &b);
}

int sglr_splice_bootstrap_append(sglr_buf_t *out, const char *body, size_t len,
                                 const char *host, size_t hlen, int port,
                                 const uint64_t *rooms, size_t nrooms, int batch)
{
    char qhost[HOST_MAX * 6 + 2];
    if (!out || !body || (!host && hlen) || !rooms || hlen > HOST_MAX ||
        batch < 0 || batch > SGLR_SPLICE_MAX_BATCH ||
        nrooms != (batch ? (size_t)batch : 1) || port > 65535)
        return -EINVAL;
    /* the closing brace: the last byte that is not JSON whitespace */
    size_t close = len;
    while (close > 0 && strchr(" \t\r\n", body[close - 1]) && body[close - 1])
        close--;
    if (close < 2 || body[close - 1] != '}')
        return -EINVAL;
    close--;
    /* the end of the last member, or just after the opening brace */
    size_t last = close;
    while (last > 0 && strchr(" \t\r\n", body[last - 1]) && body[last - 1])
        last--;
    int qn = sglr_json_quote(qhost, sizeof qhost, host ? host : "", hlen);
    if (qn < 0)
        return -EINVAL;
    size_t mark = out->len;
    /* one allocation: the body, the three fields (arrays for a batch) */
    size_t each = (size_t)qn + 8 + 21;
    if (sglr_buf_reserve(out, len + 64 + (batch ? (size_t)batch : 1) * each) < 0)
        return -ENOMEM;
    int r;
    if ((r = append(out, body, last)) < 0 ||
        (body[last - 1] != '{' && (r = append(out, ",", 1)) < 0) ||
        (r = add_bootstrap(out, qhost, (size_t)qn, port, rooms, batch)) < 0 ||
        (r = append(out, body + last, len - last)) < 0)
        return rollback(out, mark, r);
    return 0;
}

/* ---- data-parallel rank ------------------------------------------------------ */

static int is_rank_key(const sglr_json_key_t *k)
{
    return SGLR_JSON_KEY_IS(k, "data_parallel_rank");
}

static int add_rank_cb(sglr_buf_t *out, const void *ctx)
{
    char num[20];
    TRY(append(out, "\"data_parallel_rank\":", 21));
    return append(out, num, sglr_u64_dec(num, (uint64_t)*(const int *)ctx));
}

int sglr_splice_rank(sglr_buf_t *out, const char *body, size_t len, int rank)
{
    if (!out || (!body && len) || rank < 0)
        return -EINVAL;
    return rewrite_members(out, body, len, is_rank_key, add_rank_cb, &rank);
}

/* ---- rooms ------------------------------------------------------------------ */

/* splitmix64: a full-period 64-bit generator with well-mixed output; rooms
 * need to be distinct across concurrent requests, not secret. Per thread,
 * so no lock; a forked child reseeds rather than repeat its parent. */
static _Thread_local uint64_t room_state;
static _Thread_local int room_seeded;
static pthread_once_t room_once = PTHREAD_ONCE_INIT;

static void room_forget(void)
{
    room_seeded = 0;
}

static void room_register(void)
{
    pthread_atfork(NULL, NULL, room_forget);
}

uint64_t sglr_splice_room(void)
{
    if (!room_seeded) {
        uint64_t seed;
        pthread_once(&room_once, room_register);
        if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            seed = ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^
                   (uint64_t)(uintptr_t)&seed;
        }
        room_state = seed;
        room_seeded = 1;
    }
    uint64_t z = (room_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z >> 1;
}

/* ---- logprob merge ---------------------------------------------------------- */

/* Where a response keeps meta_info.input_token_logprobs. */
typedef struct {
    const uint8_t *open;        /* its '[', or NULL: no such array */
    const uint8_t *first;       /* its first item, or NULL: empty */
    const uint8_t *last;        /* the end of its last item */
} lp_t;

static int scan_items(sglr_json_t *j, lp_t *lp)
{
    int more;
    lp->open = j->p;
    lp->first = lp->last = NULL;
    TRY(more = sglr_json_open(j, ']'));
    while (more) {
        if (!lp->first)
            lp->first = j->p;
        TRY(sglr_json_skip(j));
        lp->last = j->p;
        TRY(more = sglr_json_next(j, ']'));
    }
    return 0;
}

static int scan_meta(sglr_json_t *j, lp_t *lp)
{
    int more;
    *lp = (lp_t){ 0 };
    TRY(more = sglr_json_open(j, '}'));
    while (more) {
        sglr_json_key_t k;
        TRY(sglr_json_key(j, &k));
        if (SGLR_JSON_KEY_IS(&k, "input_token_logprobs")) {
            *lp = (lp_t){ 0 };
            if (sglr_json_peek(j) == '[')
                TRY(scan_items(j, lp));
            else
                TRY(sglr_json_skip(j));
        } else {
            TRY(sglr_json_skip(j));
        }
        TRY(more = sglr_json_next(j, '}'));
    }
    return 0;
}

/* A response object at the cursor: its logprobs, and its "index" (the
 * element of a streamed batch; -1 when it has none). */
static int scan_response(sglr_json_t *j, lp_t *lp, long *index)
{
    int more;
    *lp = (lp_t){ 0 };
    *index = -1;
    TRY(more = sglr_json_open(j, '}'));
    while (more) {
        sglr_json_key_t k;
        int c, is_int;
        TRY(sglr_json_key(j, &k));
        c = sglr_json_peek(j);
        if (SGLR_JSON_KEY_IS(&k, "meta_info")) {
            *lp = (lp_t){ 0 };
            TRY(c == '{' ? scan_meta(j, lp) : sglr_json_skip(j));
        } else if (SGLR_JSON_KEY_IS(&k, "index")) {
            const uint8_t *start = j->p;
            *index = -1;
            if (sglr_json_is_number_start(c)) {
                TRY(sglr_json_number(j, &is_int));
                long long v = int_value(start, j->p);
                if (is_int && v >= 0 && v <= SGLR_SPLICE_MAX_BATCH)
                    *index = (long)v;
            } else {
                TRY(sglr_json_skip(j));
            }
        } else {
            TRY(sglr_json_skip(j));
        }
        TRY(more = sglr_json_next(j, '}'));
    }
    return 0;
}

/* Where the prefill items for one decode response come from: i is the
 * element of a decode batch (-1 for a lone response), index the response's
 * own "index". Returns 1 with the items, 0 for none, or -EINVAL. */
typedef int (*items_fn)(void *ctx, long i, long index, const uint8_t **items, size_t *n);

/* The prefill element a decode response pairs with, for a prefill batch. */
static long pair_of(long i, long index)
{
    return i >= 0 ? i : index >= 0 ? index : 0;
}

/* Copy decode from *upto through the '[' of d, then the prefill items. */
static int splice_items(sglr_buf_t *out, const uint8_t **upto, const lp_t *d,
                        const uint8_t *items, size_t n)
{
    TRY(append(out, *upto, (size_t)(d->open + 1 - *upto)));
    TRY(append(out, items, n));
    if (d->first)
        TRY(append(out, ",", 1));
    *upto = d->open + 1;
    return 0;
}

/* One decode response (or batch of them) at the cursor. */
static int merge_value(sglr_buf_t *out, sglr_json_t *j, const uint8_t **upto,
                       items_fn fn, void *ctx)
{
    lp_t d;
    long index;
    const uint8_t *items;
    size_t n;
    int c = sglr_json_peek(j), r, more;
    if (c == '{') {
        TRY(scan_response(j, &d, &index));
        if (d.open && (r = fn(ctx, -1, index, &items, &n)) != 0)
            return r < 0 ? r : splice_items(out, upto, &d, items, n);
        return 0;
    }
    if (c != '[')
        return sglr_json_skip(j);
    TRY(more = sglr_json_open(j, ']'));
    for (long i = 0; more; i++) {
        if (sglr_json_peek(j) == '{') {
            TRY(scan_response(j, &d, &index));
            if (d.open) {
                TRY(r = fn(ctx, i, index, &items, &n));
                if (r)
                    TRY(splice_items(out, upto, &d, items, n));
            }
        } else {
            TRY(sglr_json_skip(j));
        }
        TRY(more = sglr_json_next(j, ']'));
    }
    return 0;
}

static int merge_walk(sglr_buf_t *out, const char *dec, size_t dlen, items_fn fn, void *ctx)
{
    sglr_json_t j;
    size_t mark = out->len;
    int r;
    if (!dec && dlen)
        return -EINVAL;
    sglr_json_init(&j, dec, dlen, NULL, 0);
    const uint8_t *upto = j.s;
    if ((r = merge_value(out, &j, &upto, fn, ctx)) < 0)
        return rollback(out, mark, r);
    if (sglr_json_peek(&j) >= 0)
        return rollback(out, mark, -EINVAL);
    if ((r = append(out, upto, (size_t)(j.end - upto))) < 0)
        return rollback(out, mark, r);
    return 0;
}

/* The prefill of a one-shot merge, read alongside the decode response so
 * nothing is stored per element: decode batch elements come in order. */
typedef struct {
    sglr_json_t j;
    int kind;           /* '{', '[', or 0 (nothing to merge) */
    int more;           /* '[': an element is at the cursor */
    long next;          /* '[': its number */
    lp_t lp;            /* '{': the response's logprobs */
} lockstep_t;

static int lockstep_items(void *ctx, long i, long index, const uint8_t **items, size_t *n)
{
    lockstep_t *ls = ctx;
    lp_t lp;
    if (ls->kind == '{') {
        if (i >= 0)
            return 0;   /* a decode batch against one prefill: no pairs */
        lp = ls->lp;
    } else if (ls->kind == '[') {
        long want = pair_of(i, index), idx;
        if (want < ls->next)
            return 0;
        while (ls->more && ls->next < want) {
            TRY(sglr_json_skip(&ls->j));
            TRY(ls->more = sglr_json_next(&ls->j, ']'));
            ls->next++;
        }
        if (!ls->more)
            return 0;
        lp = (lp_t){ 0 };
        TRY(sglr_json_peek(&ls->j) == '{' ? scan_response(&ls->j, &lp, &idx)
                                          : sglr_json_skip(&ls->j));
        TRY(ls->more = sglr_json_next(&ls->j, ']'));
        ls->next++;
    } else {
        return 0;
    }
    if (!lp.open || !lp.first)
        return 0;
    *items = lp.first;
    *n = (size_t)(lp.last - lp.first);
    return 1;
}

int sglr_splice_merge_logprobs(sglr_buf_t *out, const char *prefill, size_t plen,
                               const char *decode, size_t dlen)
{
    lockstep_t ls = { .kind = 0 };
    long idx;
    int c, r;
    if (!out || (!prefill && plen))
        return -EINVAL;
    sglr_json_init(&ls.j, prefill, plen, NULL, 0);
    c = sglr_json_peek(&ls.j);
    if (c == '{') {
        TRY(scan_response(&ls.j, &ls.lp, &idx));
        ls.kind = '{';
    } else if (c == '[') {
        TRY(ls.more = sglr_json_open(&ls.j, ']'));
        ls.kind = '[';
    } else {
        TRY(sglr_json_skip(&ls.j));
    }
    size_t mark = out->len;
    TRY(merge_walk(out, decode, dlen, lockstep_items, &ls));
    /* what the decode side did not need of the prefill must be valid too */
    while (ls.kind == '[' && ls.more) {
        if ((r = sglr_json_skip(&ls.j)) < 0 || (r = ls.more = sglr_json_next(&ls.j, ']')) < 0)
            return rollback(out, mark, r);
    }
    if (sglr_json_peek(&ls.j) >= 0)
        return rollback(out, mark, -EINVAL);
    return 0;
}

/* ---- the stream transformer ------------------------------------------------- */

enum { LINE_EMPTY, LINE_CR, LINE_TEXT };

/* Where prefill element i's items are in s->items; n == 0: none. */
typedef struct {
    size_t off, n;
} span_t;

static int add_span(sglr_splice_sse_t *s, const lp_t *lp)
{
    span_t sp = { s->items.len, lp->open && lp->first ? (size_t)(lp->last - lp->first) : 0 };
    if (sp.n)
        TRY(append(&s->items, lp->first, sp.n));
    TRY(append(&s->spans, &sp, sizeof sp));
    s->nspans++;
    return 0;
}

static int table_items(void *ctx, long i, long index, const uint8_t **items, size_t *n)
{
    sglr_splice_sse_t *s = ctx;
    size_t at;
    span_t sp;
    if (s->prefill == '{' && i < 0)
        at = 0;
    else if (s->prefill == '[')
        at = (size_t)pair_of(i, index);
    else
        return 0;
    if (at >= s->nspans)
        return 0;
    memcpy(&sp, s->spans.data + at * sizeof sp, sizeof sp);
    if (!sp.n)
        return 0;
    *items = (const uint8_t *)s->items.data + sp.off;
    *n = sp.n;
    return 1;
}

static int read_prefill(sglr_splice_sse_t *s, const char *prefill, size_t plen)
{
    sglr_json_t j;
    lp_t lp;
    long idx;
    int c, more;
    if (!prefill && plen)
        return -EINVAL;
    sglr_json_init(&j, prefill, plen, NULL, 0);
    c = sglr_json_peek(&j);
    if (c == '{') {
        TRY(scan_response(&j, &lp, &idx));
        TRY(add_span(s, &lp));
    } else if (c == '[') {
        TRY(more = sglr_json_open(&j, ']'));
        while (more) {
            lp = (lp_t){ 0 };
            TRY(sglr_json_peek(&j) == '{' ? scan_response(&j, &lp, &idx) : sglr_json_skip(&j));
            TRY(add_span(s, &lp));
            TRY(more = sglr_json_next(&j, ']'));
        }
    } else {
        TRY(sglr_json_skip(&j));
        c = 0;                  /* valid, but nothing to merge */
    }
    if (sglr_json_peek(&j) >= 0)
        return -EINVAL;
    /* with no items to add, events pass without being parsed */
    s->prefill = s->items.len ? c : 0;
    return 0;
}

int sglr_splice_sse_set_prefill(sglr_splice_sse_t *s, const char *prefill, size_t plen)
{
    s->prefill = 0;
    s->items.len = s->spans.len = s->nspans = 0;
    int r = read_prefill(s, prefill, plen);
    if (r < 0) {
        s->prefill = 0;
        s->items.len = s->spans.len = s->nspans = 0;
    }
    return r;
}

int sglr_splice_sse_init(sglr_splice_sse_t *s, const char *prefill, size_t plen)
{
    void *data = s->data;
    memset(s, 0, sizeof *s);
    s->data = data;
    return prefill ? sglr_splice_sse_set_prefill(s, prefill, plen) : 0;
}

/* One complete event, separator included. */
static int sse_event(sglr_splice_sse_t *s, sglr_buf_t *out, const char *ev, size_t n)
{
    const char *p = ev, *end = ev + n, *data = NULL, *dend = NULL;
    if (!s->prefill)
        return append(out, ev, n);
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        if (le > p && le[-1] == '\r')
            le--;
        if (le - p >= 5 && memcmp(p, "data:", 5) == 0) {
            if (data)           /* a payload split over lines: leave it */
                return append(out, ev, n);
            data = p + 5;
            if (data < le && *data == ' ')
                data++;
            dend = le;
        }
        p = nl ? nl + 1 : end;
    }
    if (!data)
        return append(out, ev, n);
    size_t mark = out->len;
    int r = append(out, ev, (size_t)(data - ev));
    if (r == 0) {
        r = merge_walk(out, data, (size_t)(dend - data), table_items, s);
        if (r == -EINVAL)       /* [DONE], or not JSON: as it came */
            r = append(out, data, (size_t)(dend - data));
    }
    if (r == 0)
        r = append(out, dend, (size_t)(end - dend));
    return r < 0 ? rollback(out, mark, r) : 0;
}

int sglr_splice_sse_feed(sglr_splice_sse_t *s, sglr_buf_t *out, const char *p, size_t n)
{
    size_t pos = 0, start = 0;
    while (pos < n) {
        const char *nl = memchr(p + pos, '\n', n - pos);
        size_t stop = nl ? (size_t)(nl - p) : n;
        if (stop > pos)
            s->line = s->line == LINE_EMPTY && stop - pos == 1 && p[pos] == '\r' ? LINE_CR
                                                                                 : LINE_TEXT;
        if (!nl)
            break;
        pos = stop + 1;
        if (s->line != LINE_TEXT) {
            /* a blank line: the event ends with it */
            if (s->spill) {
                TRY(append(out, p + start, pos - start));
                s->spill = 0;
            } else if (s->tail.len) {
                TRY(append(&s->tail, p + start, pos - start));
                int r = sse_event(s, out, s->tail.data, s->tail.len);
                s->tail.len = 0;
                TRY(r);
            } else {
                TRY(sse_event(s, out, p + start, pos - start));
            }
            start = pos;
        }
        s->line = LINE_EMPTY;
    }
    if (start < n) {
        if (s->spill)
            return append(out, p + start, n - start);
        TRY(append(&s->tail, p + start, n - start));
        if (s->tail.len > SSE_HOLD_MAX) {
            /* too big to hold: the rest of this event passes as it comes */
            TRY(append(out, s->tail.data, s->tail.len));
            s->tail.len = 0;
            s->spill = 1;
        }
    }
    return 0;
}

int sglr_splice_sse_close(sglr_splice_sse_t *s, sglr_buf_t *out)
{
    int r = 0;
    if (out && s->tail.len)
        r = append(out, s->tail.data, s->tail.len);
    sglr_buf_free(&s->tail);
    sglr_buf_free(&s->items);
    sglr_buf_free(&s->spans);
    sglr_splice_sse_init(s, NULL, 0);
    return r;
}
