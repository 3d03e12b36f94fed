/*
 * metrics.h: counters, gauges and histograms with labels, rendered in the
 * Prometheus text exposition format 0.0.4.
 *
 *   registry ──> metric "sgl_router_requests_total" (counter, labels route,worker)
 *                  │  hash of label values ──> series {"generate","http://w1"}
 *                  │                           series {"chat","http://w2"}
 *                  └─ list in creation order (what render walks)
 *              ──> metric "sgl_router_request_duration_seconds" (histogram)
 *                  ...
 *
 * A metric (family) lives as long as its registry. A series is one set of
 * label values of a metric; the hot path holds a series handle and bumps it
 * with no lookup and no allocation:
 *
 *     sglr_series_t *s = sglr_metrics_series(m, (const char *[]){ url }, 1);
 *     ... per request: sglr_metrics_inc(s, 1);
 *     ... worker removed: sglr_metrics_release(s);
 *
 * sglr_metrics_series() takes a reference. Removing a series (one set of
 * label values, or every series carrying label=value) unlinks it from the
 * registry at once, so it is no longer rendered; its memory stays valid
 * until the last reference is released, so a C holder never dangles. Bumps
 * to a removed series are harmless and invisible. A later lookup of the same
 * label values creates a fresh series starting at zero.
 *
 * Not thread-safe: everything runs on the one loop thread.
 */
#ifndef SGLR_METRICS_H
#define SGLR_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define SGLR_METRICS_MAX_LABELS 16
#define SGLR_METRICS_MAX_BUCKETS 128

typedef enum {
    SGLR_METRIC_COUNTER = 0,
    SGLR_METRIC_GAUGE,
    SGLR_METRIC_HISTOGRAM,
} sglr_metric_type_t;

typedef struct sglr_metrics sglr_metrics_t;   /* a registry */
typedef struct sglr_metric sglr_metric_t;     /* a family: name, type, label names */
typedef struct sglr_series sglr_series_t;     /* one set of label values */

typedef struct {
    sglr_metric_type_t type;
    const char *name;
    const char *help;                /* may be NULL */
    const char *const *labels;       /* label names */
    int nlabels;
    const double *buckets;           /* histogram upper bounds, increasing;  */
    int nbuckets;                    /* NULL/0: sglr_metrics_default_buckets */
} sglr_metric_spec_t;

/* 0.001 ... 240 seconds, the buckets the SGLang router uses. */
extern const double sglr_metrics_default_buckets[];
extern const int sglr_metrics_default_nbuckets;

sglr_metrics_t *sglr_metrics_new(void);
/* Frees every metric and series, including removed series still referenced:
 * release or forget all handles first. */
void sglr_metrics_free(sglr_metrics_t *r);
/* The process-wide registry the runtime and the Lua module use. */
sglr_metrics_t *sglr_metrics_default(void);

/* Register a metric. Registering a name again with the same type, label
 * names (and buckets, when given) returns the existing metric. Returns 0,
 * -EINVAL (bad name, label name or buckets), -EEXIST (the name exists with
 * another type, label set or buckets) or -ENOMEM. When err is given, a
 * readable message is written there on failure. */
int sglr_metrics_register(sglr_metrics_t *r, const sglr_metric_spec_t *spec,
                          sglr_metric_t **out, char *err, size_t errlen);
/* Shorthands for C callers registering fixed names; NULL on error. */
sglr_metric_t *sglr_metrics_counter(sglr_metrics_t *r, const char *name, const char *help,
                                    const char *const *labels, int nlabels);
sglr_metric_t *sglr_metrics_gauge(sglr_metrics_t *r, const char *name, const char *help,
                                  const char *const *labels, int nlabels);
sglr_metric_t *sglr_metrics_histogram(sglr_metrics_t *r, const char *name, const char *help,
                                      const char *const *labels, int nlabels,
                                      const double *buckets, int nbuckets);
sglr_metric_t *sglr_metrics_lookup(sglr_metrics_t *r, const char *name);

sglr_metric_type_t sglr_metrics_type(const sglr_metric_t *m);
const char *sglr_metrics_name(const sglr_metric_t *m);
int sglr_metrics_nlabels(const sglr_metric_t *m);
const char *sglr_metrics_label(const sglr_metric_t *m, int i);
const char *sglr_metrics_type_name(sglr_metric_type_t t);

/* Get or create the series for n label values (n must equal the metric's
 * label count) and take a reference. NULL on a wrong count or -ENOMEM. */
sglr_series_t *sglr_metrics_series(sglr_metric_t *m, const char *const *values, int n);
void sglr_metrics_release(sglr_series_t *s);

/* Borrowed lookup for bindings: no reference is taken, the pointer is valid
 * until the series is removed. lens may be NULL (strlen). With create == 0 a
 * missing series returns NULL. */
sglr_series_t *sglr_metrics_find(sglr_metric_t *m, const char *const *values,
                                 const size_t *lens, int n, int create);

/* Remove one series: 0, or -ENOENT when there is none. */
int sglr_metrics_remove(sglr_metric_t *m, const char *const *values, const size_t *lens, int n);
/* Remove the series of every metric in r whose label `label` equals value
 * (e.g. label "worker" when a worker leaves). Returns how many went. */
int sglr_metrics_remove_label(sglr_metrics_t *r, const char *label,
                              const char *value, size_t len);

/* The hot path: plain arithmetic on the series, no checks. inc on a
 * counter must be given v >= 0 (the Lua binding enforces it). */
static inline void sglr_metrics_inc(sglr_series_t *s, double v);
static inline void sglr_metrics_set(sglr_series_t *s, double v);
void sglr_metrics_observe(sglr_series_t *s, double v);
/* Counter or gauge value. */
static inline double sglr_metrics_get(const sglr_series_t *s);
/* Histogram count and sum. */
void sglr_metrics_hist_get(const sglr_series_t *s, uint64_t *count, double *sum);

/* Render the whole registry; a malloc'd NUL-terminated string the caller
 * frees, its length in *len (may be NULL). NULL on -ENOMEM. Pending
 * accumulator updates are applied first. */
char *sglr_metrics_render(sglr_metrics_t *r, size_t *len);

/* --- accumulators ----------------------------------------------------------
 * Updates to a few series (up to SGLR_METRICS_ACC_MAX, at most one of them a
 * histogram) that wait in one small block and reach the series when the
 * registry is read (render, sglr_metrics_flush) or the accumulator is freed.
 * A per-request caller touching several series otherwise touched a dozen
 * cache lines a request (each series, a histogram's buckets and bounds),
 * most of them cold in a process that moves kilobytes of request data in
 * between; the accumulator is a few lines, warm. Counters add, a gauge
 * keeps its last value (of the most recent add across the registry's
 * accumulators that set it: a direct sglr_metrics_set of a gauge an
 * accumulator also sets may be overwritten by an older pending value), a
 * histogram counts into its buckets and sum. Pending sums are added up
 * before they reach the series, so a fractional sum can differ from one
 * made update by update in its last bits. sglr_metrics_get and _hist_get
 * do not apply pending updates: call sglr_metrics_flush first (the Lua
 * get does). */
#define SGLR_METRICS_ACC_MAX 8
typedef struct sglr_metrics_acc sglr_metrics_acc_t;

/* Takes a reference on each series (all of registry r, none removed).
 * NULL on -ENOMEM, n out of range, a removed series, or more than one
 * histogram. */
sglr_metrics_acc_t *sglr_metrics_acc_new(sglr_metrics_t *r, sglr_series_t *const *s, int n);
/* v[i] goes to series i for each bit i of mask. -> 0 | -EINVAL (a bit
 * past the n series, or a counter given a negative or NaN value; nothing
 * changes). */
int sglr_metrics_acc_add(sglr_metrics_acc_t *a, unsigned mask, const double *v);
/* Apply every accumulator of r. */
void sglr_metrics_flush(sglr_metrics_t *r);
/* Apply what waits, release the series, free. */
void sglr_metrics_acc_free(sglr_metrics_acc_t *a);

/* Shortest "%.*g" that reads back as the same double; "+Inf", "-Inf",
 * "NaN" as Prometheus spells them. buf needs 32 bytes. Returns length. */
int sglr_metrics_fmt_double(char *buf, double v);

/* --- inline hot path ------------------------------------------------------ */

/* The first fields of every series; the rest is private to metrics.c. */
struct sglr_series_head {
    double value;                    /* counter/gauge value; histogram sum */
};

static inline void sglr_metrics_inc(sglr_series_t *s, double v)
{
    ((struct sglr_series_head *)s)->value += v;
}

static inline void sglr_metrics_set(sglr_series_t *s, double v)
{
    ((struct sglr_series_head *)s)->value = v;
}

static inline double sglr_metrics_get(const sglr_series_t *s)
{
    return ((const struct sglr_series_head *)s)->value;
}

#endif
