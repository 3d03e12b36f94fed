/*
 * metrics.c: the metric registry (see metrics.h for the shape).
 *
 * Each metric keeps its series twice: in a chained hash table keyed by the
 * label values (lookups from Lua hash the argument strings in place, with
 * no joined key and no allocation), and in a doubly linked list in creation
 * order, which render walks so the output is stable. A series is one
 * allocation: the struct, its histogram bucket counts, its raw label values
 * (for lookups) and its label pairs pre-rendered as `a="x",b="y"` with
 * escaping done once, so render is mostly memcpy.
 */
#include "metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double sglr_metrics_default_buckets[] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
    10, 15, 30, 45, 60, 90, 120, 180, 240,
};
const int sglr_metrics_default_nbuckets =
    (int)(sizeof sglr_metrics_default_buckets / sizeof sglr_metrics_default_buckets[0]);

struct sglr_series {
    struct sglr_series_head h;       /* value (counter/gauge) or sum: first */
    uint64_t count;                  /* histogram observations */
    uint64_t *buckets;               /* per-bucket (not cumulative), nbuckets + 1 */
    const double *bounds;            /* the metric's upper bounds */
    int nbounds;
    sglr_metric_t *metric;           /* NULL once removed */
    sglr_series_t *hnext;            /* hash chain */
    sglr_series_t *prev, *next;      /* creation order */
    uint32_t hash;
    int refs;                        /* C handles; freed at 0 once removed */
    int nvalues;
    const char **values;             /* raw label values, NUL-terminated */
    size_t *lens;
    const char *pairs;               /* `a="x",b="y"` escaped, "" if no labels */
    size_t pairs_len;
};

struct sglr_metric {
    sglr_metrics_t *registry;
    sglr_metric_t *next;             /* registration order */
    sglr_metric_type_t type;
    char *name;
    char *help;
    int nlabels;
    char **labels;
    double *bounds;                  /* histogram only */
    int nbounds;
    sglr_series_t **table;           /* hash buckets, power of two */
    uint32_t tsize;
    uint32_t nseries;
    sglr_series_t *first, *last;
};

struct sglr_metrics {
    sglr_metric_t *first, *last;
    sglr_metrics_acc_t *accs;        /* accumulators, newest first */
    uint64_t acc_clock;              /* orders their gauge values */
};

struct sglr_metrics_acc {
    sglr_metrics_t *r;               /* NULL once the registry is gone */
    sglr_metrics_acc_t *prev, *next;
    int n, hist;                     /* hist: the histogram's index, or -1 */
    unsigned dirty;                  /* series with something waiting */
    uint8_t type[SGLR_METRICS_ACC_MAX];
    double pend[SGLR_METRICS_ACC_MAX];   /* to add; a gauge's value; histogram sum */
    uint64_t stamp[SGLR_METRICS_ACC_MAX];/* a gauge's: when it was set */
    sglr_series_t *s[SGLR_METRICS_ACC_MAX];
    uint64_t hcount;
    int nbounds;
    double *bounds;                  /* nbounds, then the counts: */
    uint64_t *hb;                    /* nbounds + 1 */
};

static sglr_metrics_t *default_registry;

/* ---------------------------------------------------------------- helpers */

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int valid_metric_name(const char *s)
{
    if (!s || !*s)
        return 0;
    for (const char *p = s; *p; p++) {
        char c = *p;
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        if (!alpha && !(p != s && c >= '0' && c <= '9'))
            return 0;
    }
    return 1;
}

static int valid_label_name(const char *s)
{
    if (!s || !*s || (s[0] == '_' && s[1] == '_'))
        return 0;
    for (const char *p = s; *p; p++) {
        char c = *p;
        int alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
        if (!alpha && !(p != s && c >= '0' && c <= '9'))
            return 0;
    }
    return 1;
}

static uint32_t hash_values(const char *const *values, const size_t *lens, int n)
{
    uint32_t h = 2166136261u;        /* FNV-1a; the length keeps ("ab","") apart from ("a","b") */
    for (int i = 0; i < n; i++) {
        const unsigned char *p = (const unsigned char *)values[i];
        size_t len = lens[i];
        for (size_t j = 0; j < len; j++)
            h = (h ^ p[j]) * 16777619u;
        h = (h ^ (uint32_t)len ^ 0xffu) * 16777619u;
    }
    return h;
}

const char *sglr_metrics_type_name(sglr_metric_type_t t)
{
    switch (t) {
    case SGLR_METRIC_COUNTER: return "counter";
    case SGLR_METRIC_GAUGE: return "gauge";
    case SGLR_METRIC_HISTOGRAM: return "histogram";
    }
    return "untyped";
}

int sglr_metrics_fmt_double(char *buf, double v)
{
    if (isnan(v))
        return (int)strlen(strcpy(buf, "NaN"));
    if (isinf(v))
        return (int)strlen(strcpy(buf, v > 0 ? "+Inf" : "-Inf"));
    int n = 0;
    for (int prec = 15; prec <= 17; prec++) {
        n = snprintf(buf, 32, "%.*g", prec, v);
        if (strtod(buf, NULL) == v)
            break;
    }
    return n;
}

/* --------------------------------------------------------------- registry */

sglr_metrics_t *sglr_metrics_new(void)
{
    return calloc(1, sizeof(sglr_metrics_t));
}

sglr_metrics_t *sglr_metrics_default(void)
{
    if (!default_registry)
        default_registry = sglr_metrics_new();
    return default_registry;
}

static void metric_free(sglr_metric_t *m)
{
    for (sglr_series_t *s = m->first, *next; s; s = next) {
        next = s->next;
        free(s);
    }
    for (int i = 0; i < m->nlabels; i++)
        free(m->labels[i]);
    free(m->labels);
    free(m->bounds);
    free(m->table);
    free(m->help);
    free(m->name);
    free(m);
}

void sglr_metrics_free(sglr_metrics_t *r)
{
    if (!r)
        return;
    /* the series go with the registry: an accumulator left holds nothing
     * (a removed series it held is no metric's: its reference goes here) */
    for (sglr_metrics_acc_t *a = r->accs; a; a = a->next) {
        for (int i = 0; i < a->n; i++)
            if (!a->s[i]->metric)
                sglr_metrics_release(a->s[i]);
        a->r = NULL;
        a->n = 0;
        a->dirty = 0;
    }
    for (sglr_metric_t *m = r->first, *next; m; m = next) {
        next = m->next;
        metric_free(m);
    }
    if (r == default_registry)
        default_registry = NULL;
    free(r);
}

sglr_metric_t *sglr_metrics_lookup(sglr_metrics_t *r, const char *name)
{
    for (sglr_metric_t *m = r->first; m; m = m->next)
        if (strcmp(m->name, name) == 0)
            return m;
    return NULL;
}

static int same_labels(const sglr_metric_t *m, const sglr_metric_spec_t *spec)
{
    if (m->nlabels != spec->nlabels)
        return 0;
    for (int i = 0; i < m->nlabels; i++)
        if (strcmp(m->labels[i], spec->labels[i]) != 0)
            return 0;
    return 1;
}

static char *describe(const sglr_metric_t *m, char *buf, size_t len)
{
    size_t off = (size_t)snprintf(buf, len, "%s{", sglr_metrics_type_name(m->type));
    for (int i = 0; i < m->nlabels && off < len; i++)
        off += (size_t)snprintf(buf + off, len - off, "%s%s", i ? "," : "", m->labels[i]);
    if (off < len)
        snprintf(buf + off, len - off, "}");
    return buf;
}

int sglr_metrics_register(sglr_metrics_t *r, const sglr_metric_spec_t *spec,
                          sglr_metric_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!valid_metric_name(spec->name)) {
        seterr(err, errlen, "invalid metric name '%s'", spec->name ? spec->name : "");
        return -EINVAL;
    }
    if ((unsigned)spec->type > SGLR_METRIC_HISTOGRAM) {
        seterr(err, errlen, "metric '%s': invalid type", spec->name);
        return -EINVAL;
    }
    if (spec->nlabels < 0 || spec->nlabels > SGLR_METRICS_MAX_LABELS) {
        seterr(err, errlen, "metric '%s': at most %d labels", spec->name, SGLR_METRICS_MAX_LABELS);
        return -EINVAL;
    }
    for (int i = 0; i < spec->nlabels; i++) {
        const char *l = spec->labels[i];
        if (!valid_label_name(l)) {
            seterr(err, errlen, "metric '%s': invalid label name '%s'", spec->name, l ? l : "");
            return -EINVAL;
        }
        if (spec->type == SGLR_METRIC_HISTOGRAM && strcmp(l, "le") == 0) {
            seterr(err, errlen, "metric '%s': label 'le' is reserved for histograms", spec->name);
            return -EINVAL;
        }
        for (int j = 0; j < i; j++)
            if (strcmp(spec->labels[j], l) == 0) {
                seterr(err, errlen, "metric '%s': duplicate label '%s'", spec->name, l);
                return -EINVAL;
            }
    }
    const double *bounds = NULL;
    int nbounds = 0;
    if (spec->type == SGLR_METRIC_HISTOGRAM) {
        bounds = spec->buckets ? spec->buckets : sglr_metrics_default_buckets;
        nbounds = spec->buckets ? spec->nbuckets : sglr_metrics_default_nbuckets;
        /* A trailing +Inf is implicit in the format; accept and drop it. */
        if (nbounds > 0 && isinf(bounds[nbounds - 1]) && bounds[nbounds - 1] > 0)
            nbounds--;
        if (nbounds < 0 || nbounds > SGLR_METRICS_MAX_BUCKETS) {
            seterr(err, errlen, "metric '%s': at most %d buckets", spec->name,
                   SGLR_METRICS_MAX_BUCKETS);
            return -EINVAL;
        }
        for (int i = 0; i < nbounds; i++)
            if (isnan(bounds[i]) || isinf(bounds[i]) || (i && !(bounds[i] > bounds[i - 1]))) {
                seterr(err, errlen, "metric '%s': buckets must be finite and increasing",
                       spec->name);
                return -EINVAL;
            }
    }

    sglr_metric_t *m = sglr_metrics_lookup(r, spec->name);
    if (m) {
        char buf[256];
        int same = m->type == spec->type && same_labels(m, spec);
        if (same && spec->type == SGLR_METRIC_HISTOGRAM && spec->buckets)
            same = m->nbounds == nbounds &&
                   (nbounds == 0 || memcmp(m->bounds, bounds, sizeof(double) * (size_t)nbounds) == 0);
        if (!same) {
            seterr(err, errlen, "metric '%s' is already registered as %s", spec->name,
                   describe(m, buf, sizeof buf));
            return -EEXIST;
        }
        *out = m;
        return 0;
    }

    m = calloc(1, sizeof *m);
    if (!m)
        goto nomem;
    m->registry = r;
    m->type = spec->type;
    m->tsize = 8;
    m->table = calloc(m->tsize, sizeof *m->table);
    m->name = strdup(spec->name);
    m->help = strdup(spec->help ? spec->help : "");
    m->labels = calloc((size_t)spec->nlabels + 1, sizeof(char *));
    if (!m->table || !m->name || !m->help || !m->labels)
        goto nomem;
    for (int i = 0; i < spec->nlabels; i++) {
        if (!(m->labels[i] = strdup(spec->labels[i])))
            goto nomem;
        m->nlabels = i + 1;
    }
    if (spec->type == SGLR_METRIC_HISTOGRAM) {
        m->bounds = malloc(sizeof(double) * ((size_t)nbounds + 1));
        if (!m->bounds)
            goto nomem;
        if (nbounds)
            memcpy(m->bounds, bounds, sizeof(double) * (size_t)nbounds);
        m->nbounds = nbounds;
    }
    if (r->last)
        r->last->next = m;
    else
        r->first = m;
    r->last = m;
    *out = m;
    /* A metric without labels has exactly one series: show it from the
     * start (a counter at 0), as Prometheus clients do. */
    if (m->nlabels == 0)
        sglr_metrics_find(m, NULL, NULL, 0, 1);
    return 0;

nomem:
    if (m)
        metric_free(m);
    seterr(err, errlen, "out of memory");
    return -ENOMEM;
}

static sglr_metric_t *register_simple(sglr_metrics_t *r, sglr_metric_type_t type,
                                      const char *name, const char *help,
                                      const char *const *labels, int nlabels,
                                      const double *buckets, int nbuckets)
{
    sglr_metric_spec_t spec = {
        .type = type, .name = name, .help = help, .labels = labels, .nlabels = nlabels,
        .buckets = buckets, .nbuckets = nbuckets,
    };
    sglr_metric_t *m;
    return sglr_metrics_register(r, &spec, &m, NULL, 0) == 0 ? m : NULL;
}

sglr_metric_t *sglr_metrics_counter(sglr_metrics_t *r, const char *name, const char *help,
                                    const char *const *labels, int nlabels)
{
    return register_simple(r, SGLR_METRIC_COUNTER, name, help, labels, nlabels, NULL, 0);
}

sglr_metric_t *sglr_metrics_gauge(sglr_metrics_t *r, const char *name, const char *help,
                                  const char *const *labels, int nlabels)
{
    return register_simple(r, SGLR_METRIC_GAUGE, name, help, labels, nlabels, NULL, 0);
}

sglr_metric_t *sglr_metrics_histogram(sglr_metrics_t *r, const char *name, const char *help,
                                      const char *const *labels, int nlabels,
                                      const double *buckets, int nbuckets)
{
    return register_simple(r, SGLR_METRIC_HISTOGRAM, name, help, labels, nlabels,
                           buckets, nbuckets);
}

sglr_metric_type_t sglr_metrics_type(const sglr_metric_t *m) { return m->type; }
const char *sglr_metrics_name(const sglr_metric_t *m) { return m->name; }
int sglr_metrics_nlabels(const sglr_metric_t *m) { return m->nlabels; }

const char *sglr_metrics_label(const sglr_metric_t *m, int i)
{
    return i >= 0 && i < m->nlabels ? m->labels[i] : NULL;
}

/* ----------------------------------------------------------------- series */

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

/* Escaped length of a label value: \ " and newline take two bytes. */
static size_t escaped_len(const char *s, size_t len)
{
    size_t n = len;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\\' || s[i] == '"' || s[i] == '\n')
            n++;
    return n;
}

static char *escape_into(char *dst, const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c == '\\' || c == '"') {
            *dst++ = '\\';
            *dst++ = c;
        } else if (c == '\n') {
            *dst++ = '\\';
            *dst++ = 'n';
        } else {
            *dst++ = c;
        }
    }
    return dst;
}

static sglr_series_t *series_new(sglr_metric_t *m, const char *const *values,
                                 const size_t *lens, uint32_t hash)
{
    int n = m->nlabels;
    size_t nb = m->type == SGLR_METRIC_HISTOGRAM ? (size_t)m->nbounds + 1 : 0;
    size_t pairs_len = 0, raw_len = 0;
    for (int i = 0; i < n; i++) {
        /* name="value" plus a comma between pairs */
        pairs_len += strlen(m->labels[i]) + 3 + escaped_len(values[i], lens[i]) + (i ? 1 : 0);
        raw_len += lens[i] + 1;
    }
    size_t off_buckets = align8(sizeof(sglr_series_t));
    size_t off_values = align8(off_buckets + nb * sizeof(uint64_t));
    size_t off_lens = align8(off_values + (size_t)n * sizeof(char *));
    size_t off_raw = off_lens + (size_t)n * sizeof(size_t);
    size_t off_pairs = off_raw + raw_len;
    size_t total = off_pairs + pairs_len + 1;

    char *mem = calloc(1, total);
    if (!mem)
        return NULL;
    sglr_series_t *s = (sglr_series_t *)mem;
    s->buckets = nb ? (uint64_t *)(mem + off_buckets) : NULL;
    s->bounds = m->bounds;
    s->nbounds = m->nbounds;
    s->metric = m;
    s->hash = hash;
    s->nvalues = n;
    s->values = (const char **)(mem + off_values);
    s->lens = (size_t *)(mem + off_lens);
    char *raw = mem + off_raw;
    for (int i = 0; i < n; i++) {
        memcpy(raw, values[i], lens[i]);
        raw[lens[i]] = '\0';
        s->values[i] = raw;
        s->lens[i] = lens[i];
        raw += lens[i] + 1;
    }
    char *p = mem + off_pairs;
    s->pairs = p;
    for (int i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        size_t ln = strlen(m->labels[i]);
        memcpy(p, m->labels[i], ln);
        p += ln;
        *p++ = '=';
        *p++ = '"';
        p = escape_into(p, values[i], lens[i]);
        *p++ = '"';
    }
    *p = '\0';
    s->pairs_len = (size_t)(p - s->pairs);
    return s;
}

static void table_grow(sglr_metric_t *m)
{
    uint32_t nsize = m->tsize * 2;
    sglr_series_t **nt = calloc(nsize, sizeof *nt);
    if (!nt)
        return;                      /* keep the old table: longer chains, still correct */
    for (uint32_t i = 0; i < m->tsize; i++) {
        for (sglr_series_t *s = m->table[i], *next; s; s = next) {
            next = s->hnext;
            s->hnext = nt[s->hash & (nsize - 1)];
            nt[s->hash & (nsize - 1)] = s;
        }
    }
    free(m->table);
    m->table = nt;
    m->tsize = nsize;
}

static int series_matches(const sglr_series_t *s, uint32_t hash, const char *const *values,
                          const size_t *lens, int n)
{
    if (s->hash != hash)
        return 0;
    for (int i = 0; i < n; i++)
        if (s->lens[i] != lens[i] || memcmp(s->values[i], values[i], lens[i]) != 0)
            return 0;
    return 1;
}

sglr_series_t *sglr_metrics_find(sglr_metric_t *m, const char *const *values,
                                 const size_t *lens, int n, int create)
{
    if (n != m->nlabels)
        return NULL;
    size_t lbuf[SGLR_METRICS_MAX_LABELS];
    if (!lens) {
        for (int i = 0; i < n; i++)
            lbuf[i] = strlen(values[i]);
        lens = lbuf;
    }
    uint32_t h = hash_values(values, lens, n);
    for (sglr_series_t *s = m->table[h & (m->tsize - 1)]; s; s = s->hnext)
        if (series_matches(s, h, values, lens, n))
            return s;
    if (!create)
        return NULL;
    sglr_series_t *s = series_new(m, values, lens, h);
    if (!s)
        return NULL;
    if (m->nseries >= m->tsize)
        table_grow(m);
    uint32_t b = h & (m->tsize - 1);
    s->hnext = m->table[b];
    m->table[b] = s;
    s->prev = m->last;
    if (m->last)
        m->last->next = s;
    else
        m->first = s;
    m->last = s;
    m->nseries++;
    return s;
}

sglr_series_t *sglr_metrics_series(sglr_metric_t *m, const char *const *values, int n)
{
    sglr_series_t *s = sglr_metrics_find(m, values, NULL, n, 1);
    if (s)
        s->refs++;
    return s;
}

/* Unlink from the hash and the list; free unless a C handle still holds it. */
static void series_detach(sglr_series_t *s)
{
    sglr_metric_t *m = s->metric;
    sglr_series_t **pp = &m->table[s->hash & (m->tsize - 1)];
    while (*pp != s)
        pp = &(*pp)->hnext;
    *pp = s->hnext;
    if (s->prev)
        s->prev->next = s->next;
    else
        m->first = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        m->last = s->prev;
    m->nseries--;
    s->metric = NULL;
    s->hnext = s->prev = s->next = NULL;
    if (s->refs == 0)
        free(s);
}

void sglr_metrics_release(sglr_series_t *s)
{
    if (!s)
        return;
    if (--s->refs <= 0) {
        s->refs = 0;
        if (!s->metric)
            free(s);
    }
}

int sglr_metrics_remove(sglr_metric_t *m, const char *const *values, const size_t *lens, int n)
{
    sglr_series_t *s = sglr_metrics_find(m, values, lens, n, 0);
    if (!s)
        return -ENOENT;
    series_detach(s);
    return 0;
}

int sglr_metrics_remove_label(sglr_metrics_t *r, const char *label, const char *value,
                              size_t len)
{
    int removed = 0;
    for (sglr_metric_t *m = r->first; m; m = m->next) {
        int idx = -1;
        for (int i = 0; i < m->nlabels; i++)
            if (strcmp(m->labels[i], label) == 0)
                idx = i;
        if (idx < 0)
            continue;
        for (sglr_series_t *s = m->first, *next; s; s = next) {
            next = s->next;
            if (s->lens[idx] == len && memcmp(s->values[idx], value, len) == 0) {
                series_detach(s);
                removed++;
            }
        }
    }
    return removed;
}

void sglr_metrics_observe(sglr_series_t *s, double v)
{
    /* First bucket whose bound is >= v; NaN and values past the last bound
     * land in the +Inf bucket. */
    int lo = 0, hi = s->nbounds;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (v <= s->bounds[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    if (isnan(v))
        lo = s->nbounds;
    s->buckets[lo]++;
    s->count++;
    s->h.value += v;
}

void sglr_metrics_hist_get(const sglr_series_t *s, uint64_t *count, double *sum)
{
    *count = s->count;
    *sum = s->h.value;
}

/* ----------------------------------------------------------------- render */

typedef struct {
    char *data;
    size_t len, cap;
    int oom;
} buf_t;

static int buf_reserve(buf_t *b, size_t more)
{
    if (b->oom)
        return -1;
    if (b->len + more + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more + 1)
        cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) {
        b->oom = 1;
        return -1;
    }
    b->data = d;
    b->cap = cap;
    return 0;
}

static void buf_add(buf_t *b, const char *s, size_t len)
{
    if (buf_reserve(b, len) == 0) {
        memcpy(b->data + b->len, s, len);
        b->len += len;
    }
}

static void buf_str(buf_t *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_double(buf_t *b, double v)
{
    char tmp[32];
    buf_add(b, tmp, (size_t)sglr_metrics_fmt_double(tmp, v));
}

static void buf_u64(buf_t *b, uint64_t v)
{
    char tmp[24];
    buf_add(b, tmp, (size_t)snprintf(tmp, sizeof tmp, "%" PRIu64, v));
}

/* HELP text escapes only backslash and newline. */
static void buf_help(buf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_add(b, "\\\\", 2);
        else if (*s == '\n')
            buf_add(b, "\\n", 2);
        else
            buf_add(b, s, 1);
    }
}

/* name suffix {pairs[,le="x"]} */
static void buf_sample_name(buf_t *b, const sglr_metric_t *m, const char *suffix,
                            const sglr_series_t *s, const char *le)
{
    buf_str(b, m->name);
    buf_str(b, suffix);
    if (s->pairs_len || le) {
        buf_add(b, "{", 1);
        buf_add(b, s->pairs, s->pairs_len);
        if (le) {
            if (s->pairs_len)
                buf_add(b, ",", 1);
            buf_add(b, "le=\"", 4);
            buf_str(b, le);
            buf_add(b, "\"", 1);
        }
        buf_add(b, "}", 1);
    }
    buf_add(b, " ", 1);
}

static void render_metric(buf_t *b, const sglr_metric_t *m)
{
    if (m->help[0]) {
        buf_str(b, "# HELP ");
        buf_str(b, m->name);
        buf_add(b, " ", 1);
        buf_help(b, m->help);
        buf_add(b, "\n", 1);
    }
    buf_str(b, "# TYPE ");
    buf_str(b, m->name);
    buf_add(b, " ", 1);
    buf_str(b, sglr_metrics_type_name(m->type));
    buf_add(b, "\n", 1);

    /* Bound labels are the same for every series: format them once. */
    char les[SGLR_METRICS_MAX_BUCKETS][32];
    for (int i = 0; i < m->nbounds; i++)
        sglr_metrics_fmt_double(les[i], m->bounds[i]);

    for (const sglr_series_t *s = m->first; s; s = s->next) {
        if (m->type != SGLR_METRIC_HISTOGRAM) {
            buf_sample_name(b, m, "", s, NULL);
            buf_double(b, s->h.value);
            buf_add(b, "\n", 1);
            continue;
        }
        uint64_t cum = 0;
        for (int i = 0; i < m->nbounds; i++) {
            cum += s->buckets[i];
            buf_sample_name(b, m, "_bucket", s, les[i]);
            buf_u64(b, cum);
            buf_add(b, "\n", 1);
        }
        buf_sample_name(b, m, "_bucket", s, "+Inf");
        buf_u64(b, s->count);
        buf_add(b, "\n", 1);
        buf_sample_name(b, m, "_sum", s, NULL);
        buf_double(b, s->h.value);
        buf_add(b, "\n", 1);
        buf_sample_name(b, m, "_count", s, NULL);
        buf_u64(b, s->count);
        buf_add(b, "\n", 1);
    }
}

/* ----------------------------------------------------------- accumulators */

sglr_metrics_acc_t *sglr_metrics_acc_new(sglr_metrics_t *r, sglr_series_t *const *s, int n)
{
    if (!r || n < 1 || n > SGLR_METRICS_ACC_MAX)
        return NULL;
    int hist = -1;
    for (int i = 0; i < n; i++) {
        if (!s[i] || !s[i]->metric)
            return NULL;    /* (a removed series) */
        if (s[i]->buckets) {
            if (hist >= 0)
                return NULL;
            hist = i;
        }
    }
    sglr_metrics_acc_t *a = calloc(1, sizeof *a);
    if (!a)
        return NULL;
    if (hist >= 0) {
        int nb = s[hist]->nbounds;
        /* the bounds copied beside the counts: one block, no series read */
        a->bounds = calloc((size_t)nb + (size_t)nb + 1, sizeof(double));
        if (!a->bounds) {
            free(a);
            return NULL;
        }
        if (nb)
            memcpy(a->bounds, s[hist]->bounds, (size_t)nb * sizeof(double));
        a->hb = (uint64_t *)(a->bounds + nb);
        a->nbounds = nb;
    }
    a->r = r;
    a->n = n;
    a->hist = hist;
    for (int i = 0; i < n; i++) {
        a->s[i] = s[i];
        s[i]->refs++;
        a->type[i] = (uint8_t)s[i]->metric->type;
    }
    a->next = r->accs;
    if (r->accs)
        r->accs->prev = a;
    r->accs = a;
    return a;
}

int sglr_metrics_acc_add(sglr_metrics_acc_t *a, unsigned mask, const double *v)
{
    if (mask >> a->n)
        return -EINVAL;     /* a bit past the series */
    for (unsigned m = mask; m; m &= m - 1) {
        int i = __builtin_ctz(m);
        if (a->type[i] == SGLR_METRIC_COUNTER && !(v[i] >= 0))
            return -EINVAL;
    }
    for (unsigned m = mask; m; m &= m - 1) {
        int i = __builtin_ctz(m);
        switch (a->type[i]) {
        case SGLR_METRIC_COUNTER:
            a->pend[i] += v[i];
            break;
        case SGLR_METRIC_GAUGE:
            a->pend[i] = v[i];
            a->stamp[i] = a->r ? ++a->r->acc_clock : 0;
            break;
        default: {
            /* as sglr_metrics_observe: the first bound >= v, NaN and past
             * the last bound in +Inf. The bounds below v counted without
             * branches: a binary search's turns are coin tosses. */
            int lo = 0;
            if (a->nbounds <= 16) {
                for (int b = 0; b < a->nbounds; b++)
                    lo += a->bounds[b] < v[i];
            } else {
                int hi = a->nbounds;
                while (lo < hi) {
                    int mid = (lo + hi) / 2;
                    if (v[i] <= a->bounds[mid])
                        hi = mid;
                    else
                        lo = mid + 1;
                }
            }
            if (isnan(v[i]))
                lo = a->nbounds;
            a->hb[lo]++;
            a->hcount++;
            a->pend[i] += v[i];
        }
        }
    }
    a->dirty |= mask;
    return 0;
}

/* Apply a's counters and histogram (its gauges wait: sglr_metrics_flush). */
static void acc_apply(sglr_metrics_acc_t *a)
{
    for (unsigned m = a->dirty; m; m &= m - 1) {
        int i = __builtin_ctz(m);
        sglr_series_t *s = a->s[i];
        if (a->type[i] == SGLR_METRIC_GAUGE) {
            continue;
        } else if (a->type[i] == SGLR_METRIC_COUNTER) {
            sglr_metrics_inc(s, a->pend[i]);
        } else {
            for (int b = 0; b <= a->nbounds; b++)
                s->buckets[b] += a->hb[b];
            memset(a->hb, 0, ((size_t)a->nbounds + 1) * sizeof *a->hb);
            s->count += a->hcount;
            a->hcount = 0;
            s->h.value += a->pend[i];
        }
        a->pend[i] = 0;
        a->dirty &= ~(1u << i);
    }
}

void sglr_metrics_flush(sglr_metrics_t *r)
{
    if (!r)
        return;
    for (sglr_metrics_acc_t *a = r->accs; a; a = a->next)
        acc_apply(a);
    /* gauges last, oldest value first: the most recent add wins, whichever
     * accumulator it went through */
    for (;;) {
        sglr_metrics_acc_t *oldest = NULL;
        int at = -1;
        for (sglr_metrics_acc_t *a = r->accs; a; a = a->next)
            for (unsigned m = a->dirty; m; m &= m - 1) {
                int i = __builtin_ctz(m);
                if (!oldest || a->stamp[i] < oldest->stamp[at])
                    oldest = a, at = i;
            }
        if (!oldest)
            break;
        sglr_metrics_set(oldest->s[at], oldest->pend[at]);
        oldest->pend[at] = 0;
        oldest->dirty &= ~(1u << at);
    }
}

void sglr_metrics_acc_free(sglr_metrics_acc_t *a)
{
    if (!a)
        return;
    if (a->r) {
        sglr_metrics_flush(a->r);   /* its gauges in their order among the others' */
        if (a->prev)
            a->prev->next = a->next;
        else
            a->r->accs = a->next;
        if (a->next)
            a->next->prev = a->prev;
        for (int i = 0; i < a->n; i++)
            sglr_metrics_release(a->s[i]);
    }
    free(a->bounds);
    free(a);
}

char *sglr_metrics_render(sglr_metrics_t *r, size_t *len)
{
    sglr_metrics_flush(r);
    buf_t b = { 0 };
    buf_reserve(&b, 0);
    for (const sglr_metric_t *m = r->first; m; m = m->next) {
        /* A family with no series has nothing to say; the Go client omits
         * it too. */
        if (m->first)
            render_metric(&b, m);
    }
    if (b.oom) {
        free(b.data);
        return NULL;
    }
    b.data[b.len] = '\0';
    if (len)
        *len = b.len;
    return b.data;
}
