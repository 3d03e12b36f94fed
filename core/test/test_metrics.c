/*
 * test_metrics.c: the registry, the exposition format byte for byte, and the
 * "sglr.metrics" Lua module on a bare LuaJIT state.
 */
#include "test.h"
#include "metrics.h"

#include <errno.h>
#include <math.h>
#include <unistd.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

int luaopen_sglr_metrics(lua_State *L);

static char *render(sglr_metrics_t *r)
{
    return sglr_metrics_render(r, NULL);
}

TEST(exposition_counter_gauge)
{
    sglr_metrics_t *r = sglr_metrics_new();
    const char *labels[] = { "route", "code" };
    sglr_metric_t *c = sglr_metrics_counter(r, "http_requests_total", "Requests handled.",
                                            labels, 2);
    sglr_metric_t *g = sglr_metrics_gauge(r, "workers", "Healthy workers.", NULL, 0);
    CHECK(c && g);
    sglr_series_t *s1 = sglr_metrics_series(c, (const char *[]){ "generate", "200" }, 2);
    sglr_series_t *s2 = sglr_metrics_series(c, (const char *[]){ "chat", "502" }, 2);
    sglr_series_t *sg = sglr_metrics_series(g, NULL, 0);
    CHECK(s1 && s2 && sg);
    CHECK(sglr_metrics_series(c, (const char *[]){ "x" }, 1) == NULL);   /* wrong count */
    sglr_metrics_inc(s1, 1);
    sglr_metrics_inc(s1, 2);
    sglr_metrics_inc(s2, 1.5);
    sglr_metrics_set(sg, 2);
    CHECK(sglr_metrics_series(c, (const char *[]){ "generate", "200" }, 2) == s1);
    char *text = render(r);
    CHECK_EQ_STR(text,
        "# HELP http_requests_total Requests handled.\n"
        "# TYPE http_requests_total counter\n"
        "http_requests_total{route=\"generate\",code=\"200\"} 3\n"
        "http_requests_total{route=\"chat\",code=\"502\"} 1.5\n"
        "# HELP workers Healthy workers.\n"
        "# TYPE workers gauge\n"
        "workers 2\n");
    free(text);
    CHECK(sglr_metrics_get(s1) == 3);
    sglr_metrics_release(s1);
    sglr_metrics_release(s1);
    sglr_metrics_release(s2);
    sglr_metrics_release(sg);
    sglr_metrics_free(r);
}

TEST(unlabelled_metric_renders_zero_and_empty_family_is_omitted)
{
    sglr_metrics_t *r = sglr_metrics_new();
    CHECK(sglr_metrics_counter(r, "errors_total", "", NULL, 0));
    CHECK(sglr_metrics_gauge(r, "load", "Load.", (const char *[]){ "worker" }, 1));
    char *text = render(r);
    CHECK_EQ_STR(text, "# TYPE errors_total counter\nerrors_total 0\n");
    free(text);
    sglr_metrics_free(r);
}

TEST(escaping)
{
    sglr_metrics_t *r = sglr_metrics_new();
    sglr_metric_t *g = sglr_metrics_gauge(r, "esc", "line1\nback\\slash \"q\"",
                                          (const char *[]){ "v" }, 1);
    CHECK(g);
    sglr_series_t *s = sglr_metrics_find(g, (const char *[]){ "a\\b\"c\nd" }, NULL, 1, 1);
    CHECK(s);
    sglr_metrics_set(s, -0.5);
    char *text = render(r);
    CHECK_EQ_STR(text,
        "# HELP esc line1\\nback\\\\slash \"q\"\n"
        "# TYPE esc gauge\n"
        "esc{v=\"a\\\\b\\\"c\\nd\"} -0.5\n");
    free(text);
    sglr_metrics_free(r);
}

TEST(histogram_cumulative)
{
    sglr_metrics_t *r = sglr_metrics_new();
    const double b[] = { 0.1, 0.5, 1 };
    sglr_metric_t *h = sglr_metrics_histogram(r, "lat_seconds", "Latency.",
                                              (const char *[]){ "worker" }, 1, b, 3);
    CHECK(h);
    sglr_series_t *s = sglr_metrics_series(h, (const char *[]){ "w1" }, 1);
    sglr_metrics_observe(s, 0.0625);
    sglr_metrics_observe(s, 0.25);
    sglr_metrics_observe(s, 0.5);    /* le is inclusive */
    sglr_metrics_observe(s, 2);
    uint64_t count;
    double sum;
    sglr_metrics_hist_get(s, &count, &sum);
    CHECK_EQ_INT(count, 4);
    CHECK(sum == 2.8125);
    char *text = render(r);
    CHECK_EQ_STR(text,
        "# HELP lat_seconds Latency.\n"
        "# TYPE lat_seconds histogram\n"
        "lat_seconds_bucket{worker=\"w1\",le=\"0.1\"} 1\n"
        "lat_seconds_bucket{worker=\"w1\",le=\"0.5\"} 3\n"
        "lat_seconds_bucket{worker=\"w1\",le=\"1\"} 3\n"
        "lat_seconds_bucket{worker=\"w1\",le=\"+Inf\"} 4\n"
        "lat_seconds_sum{worker=\"w1\"} 2.8125\n"
        "lat_seconds_count{worker=\"w1\"} 4\n");
    free(text);
    sglr_metrics_release(s);
    sglr_metrics_free(r);
}

/* An accumulator's updates reach the series when the registry is read,
 * and read as if they had been made one by one (these sums are exact). */
TEST(accumulator_applies_on_read)
{
    sglr_metrics_t *r = sglr_metrics_new();
    const double b[] = { 0.1, 0.5, 1 };
    sglr_metric_t *c = sglr_metrics_counter(r, "hits_total", "Hits.", NULL, 0);
    sglr_metric_t *g = sglr_metrics_gauge(r, "load", "Load.", NULL, 0);
    sglr_metric_t *h = sglr_metrics_histogram(r, "ratio", "Ratio.", NULL, 0, b, 3);
    sglr_metric_t *h2 = sglr_metrics_histogram(r, "ratio_direct", "Ratio.", NULL, 0, b, 3);
    sglr_series_t *sc = sglr_metrics_series(c, NULL, 0), *sg = sglr_metrics_series(g, NULL, 0);
    sglr_series_t *sh = sglr_metrics_series(h, NULL, 0), *sd = sglr_metrics_series(h2, NULL, 0);
    CHECK(sc && sg && sh && sd);
    CHECK(sglr_metrics_acc_new(r, (sglr_series_t *[]){ sh, sd }, 2) == NULL);   /* two histograms */
    sglr_metrics_acc_t *a = sglr_metrics_acc_new(r, (sglr_series_t *[]){ sc, sg, sh }, 3);
    CHECK(a != NULL);
    const double vals[] = { 0.0625, 0.25, 0.5, 2, NAN };
    for (int i = 0; i < 5; i++) {
        CHECK_EQ_INT(sglr_metrics_acc_add(a, 7, (double[]){ 1, 10 + i, vals[i] }), 0);
        sglr_metrics_observe(sd, vals[i]);
    }
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 2, (double[]){ 0, 3, 0 }), 0);      /* the gauge alone */
    /* a counter never goes down: refused whole */
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 3, (double[]){ -1, 99, 0 }), -EINVAL);
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 1, (double[]){ NAN, 0, 0 }), -EINVAL);
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 9, (double[]){ 1, 0, 0 }), -EINVAL);   /* no series 4 */
    CHECK(sglr_metrics_get(sc) == 0);       /* waiting */
    sglr_metrics_flush(r);
    CHECK(sglr_metrics_get(sc) == 5);
    CHECK(sglr_metrics_get(sg) == 3);
    uint64_t n1, n2;
    double sum1, sum2;
    sglr_metrics_hist_get(sh, &n1, &sum1);
    sglr_metrics_hist_get(sd, &n2, &sum2);
    CHECK_EQ_INT(n1, 5);
    CHECK_EQ_INT(n1, n2);
    CHECK(isnan(sum1) && isnan(sum2));
    /* the buckets as observe fills them: the two families render alike */
    char *text = render(r);
    CHECK(strstr(text, "ratio_bucket{le=\"0.1\"} 1\nratio_bucket{le=\"0.5\"} 3\n"
                       "ratio_bucket{le=\"1\"} 3\nratio_bucket{le=\"+Inf\"} 5\n") != NULL);
    CHECK(strstr(text, "ratio_direct_bucket{le=\"0.1\"} 1\nratio_direct_bucket{le=\"0.5\"} 3\n"
                       "ratio_direct_bucket{le=\"1\"} 3\nratio_direct_bucket{le=\"+Inf\"} 5\n") != NULL);
    free(text);
    /* render applies what waits; nothing twice */
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 1, (double[]){ 2, 0, 0 }), 0);
    text = render(r);
    CHECK(strstr(text, "hits_total 7\n") != NULL);
    free(text);
    sglr_metrics_flush(r);
    CHECK(sglr_metrics_get(sc) == 7);
    /* two accumulators on one gauge: the later add wins, whichever order
     * they are applied in; freeing one applies what it holds */
    sglr_metrics_acc_t *b2 = sglr_metrics_acc_new(r, (sglr_series_t *[]){ sg, sc }, 2);
    CHECK(b2 != NULL);
    CHECK_EQ_INT(sglr_metrics_acc_add(b2, 1, (double[]){ 40 }), 0);
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 2, (double[]){ 0, 50, 0 }), 0);
    sglr_metrics_flush(r);
    CHECK(sglr_metrics_get(sg) == 50);
    CHECK_EQ_INT(sglr_metrics_acc_add(a, 2, (double[]){ 0, 60, 0 }), 0);
    CHECK_EQ_INT(sglr_metrics_acc_add(b2, 3, (double[]){ 70, 1 }), 0);
    sglr_metrics_acc_free(a);                /* applies the whole registry */
    CHECK(sglr_metrics_get(sg) == 70);
    CHECK(sglr_metrics_get(sc) == 8);
    CHECK_EQ_INT(sglr_metrics_acc_add(b2, 2, (double[]){ 0, 5 }), 0);
    sglr_metrics_release(sc);
    sglr_metrics_release(sg);
    sglr_metrics_release(sh);
    sglr_metrics_release(sd);
    /* the registry goes first: the accumulator left holds nothing, and a
     * series removed while it held it goes with the registry too (ASan's
     * leak check) */
    CHECK_EQ_INT(sglr_metrics_remove(g, NULL, NULL, 0), 0);
    sglr_metrics_free(r);
    sglr_metrics_acc_free(b2);
}

TEST(histogram_default_buckets)
{
    sglr_metrics_t *r = sglr_metrics_new();
    sglr_metric_t *h = sglr_metrics_histogram(r, "d_seconds", "D.", NULL, 0, NULL, 0);
    CHECK(h);
    CHECK_EQ_INT(sglr_metrics_default_nbuckets, 21);
    sglr_series_t *s = sglr_metrics_series(h, NULL, 0);
    sglr_metrics_observe(s, 0.003);
    sglr_metrics_observe(s, 1000);
    sglr_metrics_observe(s, NAN);
    char *text = render(r);
    int lines = 0;
    for (char *p = text; (p = strstr(p, "d_seconds_bucket{")); p++)
        lines++;
    CHECK_EQ_INT(lines, 22);
    CHECK(strstr(text, "d_seconds_bucket{le=\"0.0025\"} 0\n"));
    CHECK(strstr(text, "d_seconds_bucket{le=\"0.005\"} 1\n"));
    CHECK(strstr(text, "d_seconds_bucket{le=\"240\"} 1\n"));
    CHECK(strstr(text, "d_seconds_bucket{le=\"+Inf\"} 3\n"));
    CHECK(strstr(text, "d_seconds_sum NaN\n"));
    CHECK(strstr(text, "d_seconds_count 3\n"));
    free(text);
    sglr_metrics_release(s);
    sglr_metrics_free(r);
}

TEST(remove_series_and_label)
{
    sglr_metrics_t *r = sglr_metrics_new();
    sglr_metric_t *c = sglr_metrics_counter(r, "req_total", "R.", (const char *[]){ "worker" }, 1);
    sglr_metric_t *h = sglr_metrics_histogram(r, "lat_seconds", "L.",
                                              (const char *[]){ "route", "worker" }, 2,
                                              (const double[]){ 1 }, 1);
    sglr_series_t *w1 = sglr_metrics_series(c, (const char *[]){ "w1" }, 1);
    sglr_series_t *w2 = sglr_metrics_series(c, (const char *[]){ "w2" }, 1);
    sglr_metrics_observe(sglr_metrics_find(h, (const char *[]){ "chat", "w1" }, NULL, 2, 1), 0.5);
    sglr_metrics_observe(sglr_metrics_find(h, (const char *[]){ "chat", "w2" }, NULL, 2, 1), 0.5);
    sglr_metrics_inc(w1, 5);
    sglr_metrics_inc(w2, 7);

    CHECK_EQ_INT(sglr_metrics_remove(c, (const char *[]){ "w2" }, NULL, 1), 0);
    CHECK_EQ_INT(sglr_metrics_remove(c, (const char *[]){ "w2" }, NULL, 1), -ENOENT);
    sglr_metrics_inc(w2, 1);                          /* held handle stays valid */
    char *text = render(r);
    CHECK(strstr(text, "req_total{worker=\"w1\"} 5\n"));
    CHECK(!strstr(text, "w2\"} 7") && !strstr(text, "req_total{worker=\"w2\""));
    free(text);
    sglr_series_t *w2b = sglr_metrics_series(c, (const char *[]){ "w2" }, 1);
    CHECK(w2b != w2);
    CHECK(sglr_metrics_get(w2b) == 0);
    sglr_metrics_release(w2);                         /* frees the removed series */

    CHECK_EQ_INT(sglr_metrics_remove_label(r, "worker", "w1", 2), 2);
    CHECK_EQ_INT(sglr_metrics_remove_label(r, "worker", "w1", 2), 0);
    CHECK_EQ_INT(sglr_metrics_remove_label(r, "nosuch", "w1", 2), 0);
    sglr_metrics_inc(w1, 1);
    text = render(r);
    CHECK(!strstr(text, "w1"));
    CHECK(strstr(text, "req_total{worker=\"w2\"} 0\n"));
    CHECK(strstr(text, "lat_seconds_count{route=\"chat\",worker=\"w2\"} 1\n"));
    free(text);
    sglr_metrics_release(w1);
    sglr_metrics_release(w2b);
    sglr_metrics_free(r);
}

TEST(many_series_grow_table)
{
    sglr_metrics_t *r = sglr_metrics_new();
    sglr_metric_t *c = sglr_metrics_counter(r, "n_total", "N.", (const char *[]){ "i" }, 1);
    char v[16];
    for (int i = 0; i < 1000; i++) {
        snprintf(v, sizeof v, "%d", i);
        sglr_metrics_inc(sglr_metrics_find(c, (const char *[]){ v }, NULL, 1, 1), i);
    }
    for (int i = 0; i < 1000; i += 2) {
        snprintf(v, sizeof v, "%d", i);
        CHECK_EQ_INT(sglr_metrics_remove(c, (const char *[]){ v }, NULL, 1), 0);
    }
    for (int i = 1; i < 1000; i += 2) {
        snprintf(v, sizeof v, "%d", i);
        sglr_series_t *s = sglr_metrics_find(c, (const char *[]){ v }, NULL, 1, 0);
        CHECK(s && sglr_metrics_get(s) == i);
    }
    /* ("ab","") and ("a","b") are different series */
    sglr_metric_t *p = sglr_metrics_gauge(r, "p", "P.", (const char *[]){ "a", "b" }, 2);
    sglr_series_t *x = sglr_metrics_find(p, (const char *[]){ "ab", "" }, NULL, 2, 1);
    sglr_series_t *y = sglr_metrics_find(p, (const char *[]){ "a", "b" }, NULL, 2, 1);
    CHECK(x && y && x != y);
    sglr_metrics_free(r);
}

TEST(register_rules)
{
    sglr_metrics_t *r = sglr_metrics_new();
    const char *l2[] = { "route", "code" };
    sglr_metric_t *c = sglr_metrics_counter(r, "a_total", "A.", l2, 2);
    CHECK(c);
    CHECK(sglr_metrics_counter(r, "a_total", "other help", l2, 2) == c);
    CHECK(sglr_metrics_lookup(r, "a_total") == c);

    char err[256];
    sglr_metric_t *m;
    sglr_metric_spec_t spec = { .type = SGLR_METRIC_GAUGE, .name = "a_total", .labels = l2,
                                .nlabels = 2 };
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EEXIST);
    CHECK_EQ_STR(err, "metric 'a_total' is already registered as counter{route,code}");
    spec.type = SGLR_METRIC_COUNTER;
    spec.nlabels = 1;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EEXIST);

    spec = (sglr_metric_spec_t){ .type = SGLR_METRIC_COUNTER, .name = "1bad" };
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EINVAL);
    CHECK_EQ_STR(err, "invalid metric name '1bad'");
    spec.name = "ok:name_1";
    spec.labels = (const char *[]){ "__reserved" };
    spec.nlabels = 1;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EINVAL);
    spec.labels = (const char *[]){ "x", "x" };
    spec.nlabels = 2;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EINVAL);
    CHECK_EQ_STR(err, "metric 'ok:name_1': duplicate label 'x'");
    spec = (sglr_metric_spec_t){ .type = SGLR_METRIC_HISTOGRAM, .name = "h",
                                 .labels = (const char *[]){ "le" }, .nlabels = 1 };
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EINVAL);
    spec = (sglr_metric_spec_t){ .type = SGLR_METRIC_HISTOGRAM, .name = "h",
                                 .buckets = (const double[]){ 1, 1 }, .nbuckets = 2 };
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EINVAL);
    spec.buckets = (const double[]){ 1, 2, INFINITY };
    spec.nbuckets = 3;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), 0);
    sglr_metric_t *h = m;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), 0);
    CHECK(m == h);
    spec.nbuckets = 1;
    CHECK_EQ_INT(sglr_metrics_register(r, &spec, &m, err, sizeof err), -EEXIST);
    sglr_metrics_free(r);
}

TEST(fmt_double)
{
    char b[32];
    sglr_metrics_fmt_double(b, 0.1);       CHECK_EQ_STR(b, "0.1");
    sglr_metrics_fmt_double(b, 240);       CHECK_EQ_STR(b, "240");
    sglr_metrics_fmt_double(b, 0.0025);    CHECK_EQ_STR(b, "0.0025");
    sglr_metrics_fmt_double(b, 1e21);      CHECK_EQ_STR(b, "1e+21");
    sglr_metrics_fmt_double(b, 1.0 / 3);   CHECK_EQ_STR(b, "0.3333333333333333");
    sglr_metrics_fmt_double(b, 0.1 + 0.2); CHECK_EQ_STR(b, "0.30000000000000004");
    sglr_metrics_fmt_double(b, INFINITY);  CHECK_EQ_STR(b, "+Inf");
    sglr_metrics_fmt_double(b, -INFINITY); CHECK_EQ_STR(b, "-Inf");
    sglr_metrics_fmt_double(b, NAN);       CHECK_EQ_STR(b, "NaN");
    sglr_metrics_fmt_double(b, 9007199254740993.0); CHECK_EQ_STR(b, "9007199254740992");
}

TEST(promtool_accepts_render)
{
    if (access("/usr/bin/promtool", X_OK) != 0) {
        fprintf(stderr, "     promtool not installed: skipping `promtool check metrics`\n");
        return;
    }
    sglr_metrics_t *r = sglr_metrics_new();
    sglr_metric_t *c = sglr_metrics_counter(r, "sgl_router_requests_total", "Requests by route.",
                                            (const char *[]){ "route", "worker" }, 2);
    sglr_metric_t *g = sglr_metrics_gauge(r, "sgl_router_worker_load", "In-flight requests\nper worker \\.",
                                          (const char *[]){ "worker" }, 1);
    sglr_metric_t *h = sglr_metrics_histogram(r, "sgl_router_request_duration_seconds",
                                              "Request latency.", (const char *[]){ "route" }, 1,
                                              NULL, 0);
    sglr_metric_t *u = sglr_metrics_gauge(r, "sgl_router_up", "Up.", NULL, 0);
    CHECK(c && g && h && u);
    sglr_metrics_inc(sglr_metrics_find(c, (const char *[]){ "generate", "http://w1:8000" }, NULL, 2, 1), 12);
    sglr_metrics_inc(sglr_metrics_find(c, (const char *[]){ "chat", "we\"ird\\\nname" }, NULL, 2, 1), 1);
    sglr_metrics_set(sglr_metrics_find(g, (const char *[]){ "http://w1:8000" }, NULL, 1, 1), 1.0 / 3);
    sglr_metrics_set(sglr_metrics_find(g, (const char *[]){ "http://w2:8000" }, NULL, 1, 1), INFINITY);
    sglr_series_t *hs = sglr_metrics_find(h, (const char *[]){ "generate" }, NULL, 1, 1);
    for (int i = 0; i < 100; i++)
        sglr_metrics_observe(hs, i * 0.37);
    sglr_metrics_set(sglr_metrics_find(u, NULL, NULL, 0, 1), 1);

    size_t len;
    char *text = sglr_metrics_render(r, &len);
    char path[] = "/tmp/sglr_metrics_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    CHECK(write(fd, text, len) == (ssize_t)len);
    close(fd);
    free(text);
    sglr_metrics_free(r);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "/usr/bin/promtool check metrics < %s 1>&2", path);
    int rc = system(cmd);
    unlink(path);
    CHECK_EQ_INT(rc, 0);
}

static const char *lua_script =
    "local metrics = require 'sglr.metrics'\n"
    "local function fails(pat, f, ...)\n"
    "  local ok, err = pcall(f, ...)\n"
    "  assert(not ok, 'expected an error matching ' .. pat)\n"
    "  assert(tostring(err):find(pat, 1, true), 'error was: ' .. tostring(err))\n"
    "end\n"
    "local c = metrics.counter('lua_requests_total', 'Lua requests.', { 'route' })\n"
    "c:inc('generate'); c:inc(2, 'generate'); c:inc(nil, 'chat')\n"
    "assert(c:get('generate') == 3 and c:get('chat') == 1 and c:get('none') == 0)\n"
    "local again = metrics.counter('lua_requests_total', 'x', { 'route' })\n"
    "assert(again:get('generate') == 3)\n"
    "fails(\"metric 'lua_requests_total' is already registered as counter{route}\",\n"
    "      metrics.gauge, 'lua_requests_total', 'x', { 'route' })\n"
    "fails('already registered', metrics.counter, 'lua_requests_total', 'x', { 'other' })\n"
    "fails(\"invalid metric name 'bad name'\", metrics.counter, 'bad name', 'x')\n"
    "fails(\"inc: metric 'lua_requests_total' has 1 label(s): expected [value,] and 1 label value(s), got 3 argument(s)\",\n"
    "      c.inc, c, 1, 'a', 'b')\n"
    "fails(\"set: metric 'lua_inflight' has 1 label(s), got 2 label value(s)\",\n"
    "      function() local g = metrics.gauge('lua_inflight', 'In flight.', { 'worker' }); g:set(1, 'a', 'b') end)\n"
    "fails('has 1 label(s), got 0', c.get, c)\n"
    "fails('cannot decrease', c.inc, c, -1, 'a')\n"
    "fails(\"set: metric 'lua_requests_total' is a counter\", c.set, c, 1, 'a')\n"
    "fails(\"value for label 'route' must be a string, got table\", c.inc, c, {})\n"
    "fails('sglr.metric expected', c.inc, {}, 1)\n"
    "local g = metrics.gauge('lua_inflight', 'In flight.', { 'worker' })\n"
    "g:set(5, 'w1'); g:inc(-2, 'w1'); assert(g:get('w1') == 3)\n"
    "g:set(1, 0); assert(g:get(0) == 1 and g:get('0') == 1)\n"
    "local h = metrics.histogram('lua_latency_seconds', 'Latency.', { 'worker' }, { 0.1, 1 })\n"
    "h:observe(0.5, 'w1'); h:observe(0.25, 'w1')\n"
    "local n, s = h:get('w1'); assert(n == 2 and s == 0.75)\n"
    "fails('inc: metric \\'lua_latency_seconds\\' is a histogram', h.inc, h, 1, 'w1')\n"
    "fails('buckets must be finite and increasing', metrics.histogram, 'x_seconds', 'x', {}, { 2, 1 })\n"
    "local u = metrics.gauge('lua_up', 'Up.')\n"
    "u:set(1); u:inc(); assert(u:get() == 2)\n"
    "local text = metrics.render()\n"
    "assert(text:find('lua_requests_total{route=\"generate\"} 3\\n', 1, true), text)\n"
    "assert(text:find('lua_latency_seconds_bucket{worker=\"w1\",le=\"1\"} 2\\n', 1, true), text)\n"
    "assert(text:find('lua_up 2\\n', 1, true), text)\n"
    "assert(c:remove('generate') == true and c:remove('generate') == false)\n"
    "assert(c:get('generate') == 0)\n"
    "assert(metrics.remove_label('worker', 'w1') == 2)\n"
    "assert(select(1, h:get('w1')) == 0 and g:get('w1') == 0)\n"
    "text = metrics.render()\n"
    "assert(not text:find('generate', 1, true) and not text:find('w1', 1, true), text)\n"
    "assert(tostring(c):find('lua_requests_total', 1, true) and c:name() == 'lua_requests_total')\n"
    "assert(#metrics.default_buckets == 21 and metrics.default_buckets[21] == 240)\n"
    "for i = 1, 100000 do c:inc(1, 'chat') end\n"
    "assert(c:get('chat') == 100001)\n";

TEST(lua_module)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, luaopen_sglr_metrics);
    lua_setfield(L, -2, "sglr.metrics");
    lua_pop(L, 2);
    int rc = luaL_dostring(L, lua_script);
    if (rc)
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
    lua_close(L);
    sglr_metrics_free(sglr_metrics_default());
    CHECK_EQ_INT(rc, 0);
}

int main(void)
{
    RUN(exposition_counter_gauge);
    RUN(unlabelled_metric_renders_zero_and_empty_family_is_omitted);
    RUN(escaping);
    RUN(histogram_cumulative);
    RUN(accumulator_applies_on_read);
    RUN(histogram_default_buckets);
    RUN(remove_series_and_label);
    RUN(many_series_grow_table);
    RUN(register_rules);
    RUN(fmt_double);
    RUN(promtool_accepts_render);
    RUN(lua_module);
    TEST_EXIT();
}
