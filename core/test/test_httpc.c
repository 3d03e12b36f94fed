/*
 * test_httpc.c: the libcurl/libuv client against a tiny loopback HTTP/1.1
 * server that runs on the same loop:
 *
 *   /ok        200 "hello" with a padded X-Test header and two Set-Cookie
 *   /echo      200 "<METHOD> <body>", X-Method and X-Content-Type echoed
 *   /status/N  N "status N"
 *   /hang      reads the request, never answers
 *   /close     closes the connection without answering
 *   /stream    200 chunked: three pieces of newline-delimited JSON 30 ms
 *              apart, a line split across the first two, then the end
 *   /forever   200 chunked: a line every 10 ms, never ending
 *
 * The server keeps connections alive, so connection reuse shows up as a
 * steady accept count. Its handles are unref'd: the loop stays alive only
 * for the client's own work.
 */
#include "test.h"
#include "httpc.h"
#include "sglr.h"

#include <errno.h>
#include <lualib.h>
#include <strings.h>

int luaopen_sglr_httpc(lua_State *L);

static uv_loop_t loop;

/* ------------------------------------------------------------ the server */

typedef struct stream stream_t;

typedef struct conn {
    uv_tcp_t tcp;
    char *buf;
    size_t len, cap;
    stream_t *st;                    /* a streamed answer in progress */
    struct conn *prev, *next;
} conn_t;

struct stream {
    uv_timer_t timer;
    conn_t *k;                       /* NULL once the connection closed */
    int step;
    int forever;
};

static uv_tcp_t server;
static int server_port;
static conn_t *conns;
static int accepts;
static int requests_seen;
static int peer_closes;              /* connections the client ended */
static int stream_pieces;            /* pieces /stream and /forever wrote so far */

static void conn_closed_cb(uv_handle_t *h)
{
    conn_t *k = h->data;
    free(k->buf);
    free(k);
}

static void stream_closed_cb(uv_handle_t *h)
{
    free(h->data);
}

static void conn_close(conn_t *k)
{
    if (uv_is_closing((uv_handle_t *)&k->tcp))
        return;
    if (k->st) {
        k->st->k = NULL;
        uv_close((uv_handle_t *)&k->st->timer, stream_closed_cb);
        k->st = NULL;
    }
    if (k->prev)
        k->prev->next = k->next;
    else
        conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    uv_close((uv_handle_t *)&k->tcp, conn_closed_cb);
}

static void write_cb(uv_write_t *w, int status)
{
    free(w->data);
    free(w);
}

static void respond(conn_t *k, int status, const char *extra, const char *body, size_t blen)
{
    char head[512];
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d X\r\nContent-Length: %zu\r\n%s\r\n", status, blen, extra);
    char *out = malloc((size_t)hl + blen);
    memcpy(out, head, (size_t)hl);
    memcpy(out + hl, body, blen);
    uv_write_t *w = malloc(sizeof *w);
    w->data = out;
    uv_buf_t b = uv_buf_init(out, (unsigned)((size_t)hl + blen));
    uv_write(w, (uv_stream_t *)&k->tcp, &b, 1, write_cb);
}

static void write_raw(conn_t *k, const char *data, size_t len)
{
    char *out = malloc(len);
    memcpy(out, data, len);
    uv_write_t *w = malloc(sizeof *w);
    w->data = out;
    uv_buf_t b = uv_buf_init(out, (unsigned)len);
    uv_write(w, (uv_stream_t *)&k->tcp, &b, 1, write_cb);
}

static void write_chunk(conn_t *k, const char *piece)
{
    char out[512];
    int n = snprintf(out, sizeof out, "%zx\r\n%s\r\n", strlen(piece), piece);
    write_raw(k, out, (size_t)n);
}

/* The pieces of /stream: the second line is split between the first two. */
static const char *const stream_body[] = {
    "{\"type\":\"ADDED\",\"n\":1}\n{\"type\":\"MOD",
    "IFIED\",\"n\":2}\n",
    "{\"type\":\"DELETED\",\"n\":3}\n",
};

static void stream_cb(uv_timer_t *t)
{
    stream_t *st = t->data;
    conn_t *k = st->k;
    if (st->forever) {
        char line[64];
        snprintf(line, sizeof line, "{\"n\":%d}\n", st->step++);
        write_chunk(k, line);
        stream_pieces++;
        return;
    }
    if (st->step < 3) {
        write_chunk(k, stream_body[st->step++]);
        stream_pieces++;
        return;
    }
    write_raw(k, "0\r\n\r\n", 5);
    uv_timer_stop(t);
}

static void stream_start(conn_t *k, int forever)
{
    static const char head[] = "HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n"
                               "Content-Type: application/json\r\n\r\n";
    write_raw(k, head, sizeof head - 1);
    stream_t *st = calloc(1, sizeof *st);
    st->k = k;
    st->forever = forever;
    k->st = st;
    uv_timer_init(&loop, &st->timer);
    uv_unref((uv_handle_t *)&st->timer);
    st->timer.data = st;
    stream_pieces = 0;
    stream_cb(&st->timer);           /* the first piece at once, then one per period */
    uv_timer_start(&st->timer, stream_cb, forever ? 10 : 30, forever ? 10 : 30);
}

static const char *find_header(const char *head, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p && p[2] != '\r'; p = strstr(p + 2, "\r\n")) {
        if (strncasecmp(p + 2, name, nl) == 0 && p[2 + nl] == ':') {
            const char *v = p + 3 + nl;
            while (*v == ' ')
                v++;
            *len = (size_t)(strstr(v, "\r\n") - v);
            return v;
        }
    }
    return NULL;
}

/* Handle every complete request in the buffer; 0 = keep the connection. */
static int serve(conn_t *k)
{
    for (;;) {
        k->buf[k->len] = '\0';
        char *end = strstr(k->buf, "\r\n\r\n");
        if (!end)
            return 0;
        size_t hlen = (size_t)(end - k->buf) + 4, vlen = 0;
        const char *cl = find_header(k->buf, "content-length", &vlen);
        size_t blen = cl ? strtoul(cl, NULL, 10) : 0;
        if (k->len < hlen + blen)
            return 0;
        requests_seen++;
        uv_stop(&loop);
        char method[16] = "", path[256] = "";
        sscanf(k->buf, "%15s %255s", method, path);
        if (strcmp(path, "/close") == 0)
            return -1;
        if (strcmp(path, "/ok") == 0) {
            respond(k, 200, "X-Test:   Yes  \r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n", "hello", 5);
        } else if (strcmp(path, "/echo") == 0) {
            size_t ctl = 0, al = 0;
            const char *ct = find_header(k->buf, "content-type", &ctl);
            const char *auth = find_header(k->buf, "authorization", &al);
            size_t ml = strlen(method);
            char *body = malloc(ml + 1 + blen);
            memcpy(body, method, ml);
            body[ml] = ' ';
            memcpy(body + ml + 1, k->buf + hlen, blen);
            char extra[400];
            snprintf(extra, sizeof extra, "X-Method: %s\r\nX-Content-Type: %.*s\r\n"
                     "X-Authorization: %.*s\r\n", method, (int)ctl, ct ? ct : "",
                     (int)al, auth ? auth : "");
            respond(k, 200, extra, body, ml + 1 + blen);
            free(body);
        } else if (strncmp(path, "/status/", 8) == 0) {
            char b[32];
            int n = snprintf(b, sizeof b, "status %s", path + 8);
            respond(k, atoi(path + 8), "", b, (size_t)n);
        } else if (strcmp(path, "/stream") == 0 || strcmp(path, "/forever") == 0) {
            stream_start(k, path[1] == 'f');
        } else if (strcmp(path, "/hang") != 0) {
            respond(k, 404, "", "not found", 9);
        }
        memmove(k->buf, k->buf + hlen + blen, k->len - hlen - blen);
        k->len -= hlen + blen;
    }
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    conn_t *k = h->data;
    if (k->cap - k->len < 65536 + 1) {
        k->cap = k->cap * 2 + 65536 + 1;
        k->buf = realloc(k->buf, k->cap);
    }
    *buf = uv_buf_init(k->buf + k->len, (unsigned)(k->cap - k->len - 1));
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    conn_t *k = s->data;
    if (nread < 0) {
        peer_closes++;
        uv_stop(&loop);
        conn_close(k);
        return;
    }
    k->len += (size_t)nread;
    if (serve(k) != 0)
        conn_close(k);
}

static void on_connection(uv_stream_t *srv, int status)
{
    conn_t *k = calloc(1, sizeof *k);
    uv_tcp_init(&loop, &k->tcp);
    k->tcp.data = k;
    if (uv_accept(srv, (uv_stream_t *)&k->tcp) != 0) {
        uv_close((uv_handle_t *)&k->tcp, conn_closed_cb);
        return;
    }
    uv_unref((uv_handle_t *)&k->tcp);
    accepts++;
    k->next = conns;
    if (conns)
        conns->prev = k;
    conns = k;
    uv_read_start((uv_stream_t *)&k->tcp, alloc_cb, read_cb);
}

static int server_start(void)
{
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    uv_tcp_init(&loop, &server);
    if (uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0) ||
        uv_listen((uv_stream_t *)&server, 128, on_connection))
        return -1;
    struct sockaddr_in bound;
    int len = sizeof bound;
    uv_tcp_getsockname(&server, (struct sockaddr *)&bound, &len);
    server_port = ntohs(bound.sin_port);
    uv_unref((uv_handle_t *)&server);
    return 0;
}

static void server_stop(void)
{
    while (conns)
        conn_close(conns);
    uv_close((uv_handle_t *)&server, NULL);
}

/* ------------------------------------------------------------ helpers */

static char url_buf[256];

static const char *url(const char *path)
{
    snprintf(url_buf, sizeof url_buf, "http://127.0.0.1:%d%s", server_port, path);
    return url_buf;
}

typedef struct {
    int done;
    int status;
    char error[512];
    char *body;
    size_t body_len;
    char headers[1024];              /* "name=value\n"... */
    int tag;
} result_t;

static int completed;

static void result_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    result_t *r = data;
    r->done++;
    completed++;
    uv_stop(&loop);                  /* let run_until look at its counter now */
    r->status = res->status;
    snprintf(r->error, sizeof r->error, "%s", res->error ? res->error : "");
    if (!res->error) {
        r->body = malloc(res->body_len + 1);
        memcpy(r->body, res->body, res->body_len + 1);
        r->body_len = res->body_len;
        size_t off = 0;
        for (size_t i = 0; i < res->nheaders && off < sizeof r->headers; i++)
            off += (size_t)snprintf(r->headers + off, sizeof r->headers - off, "%s=%s\n",
                                    res->headers[i].name, res->headers[i].value);
    }
}

static int timed_out;

static void watchdog_cb(uv_timer_t *t)
{
    timed_out = 1;
}

/* Run the loop until *counter reaches target or ms pass. */
static int run_until(int *counter, int target, int ms)
{
    uv_timer_t dog;
    uv_timer_init(&loop, &dog);
    uv_timer_start(&dog, watchdog_cb, (uint64_t)ms, 0);
    timed_out = 0;
    while (*counter < target && !timed_out)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&dog, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return *counter >= target;
}

static int get(sglr_httpc_t *c, const char *path, result_t *r, long timeout_ms)
{
    sglr_httpc_opts_t o = { .url = url(path), .timeout_ms = timeout_ms };
    return sglr_httpc_request(c, &o, result_cb, r, NULL);
}

static void close_client(sglr_httpc_t *c)
{
    sglr_httpc_close(c);
    uv_run(&loop, UV_RUN_NOWAIT);    /* close callbacks free it */
}

/* -------------------------------------------------------------- tests */

TEST(get_status_body_headers)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t r = { 0 };
    CHECK_EQ_INT(get(c, "/ok", &r, 5000), 0);
    CHECK_EQ_INT(r.done, 0);                      /* never completes synchronously */
    CHECK_EQ_INT(sglr_httpc_active(c), 1);
    CHECK(run_until(&r.done, 1, 5000));
    CHECK_EQ_STR(r.error, "");
    CHECK_EQ_INT(r.status, 200);
    CHECK_EQ_STR(r.body, "hello");
    CHECK_EQ_STR(r.headers,
                 "content-length=5\nx-test=Yes\nset-cookie=a=1\nset-cookie=b=2\n");
    CHECK_EQ_INT(sglr_httpc_active(c), 0);
    free(r.body);

    result_t n = { 0 };
    CHECK_EQ_INT(get(c, "/status/404", &n, 5000), 0);
    CHECK(run_until(&n.done, 1, 5000));
    CHECK_EQ_INT(n.status, 404);
    CHECK_EQ_STR(n.body, "status 404");
    free(n.body);
    close_client(c);
}

TEST(methods_headers_and_bodies)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    sglr_httpc_header_t h[] = { { "Content-Type", 12, "application/json", 16 } };
    result_t a = { 0 }, b = { 0 }, d = { 0 }, g = { 0 };
    sglr_httpc_opts_t o = { .url = url("/echo"), .body = "{\"x\":1}", .body_len = 7,
                            .headers = h, .nheaders = 1, .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &a, NULL), 0);   /* POST by default */
    o.method = "PUT";
    o.body = "a\0b";
    o.body_len = 3;
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &b, NULL), 0);
    sglr_httpc_opts_t od = { .method = "DELETE", .url = url("/echo"), .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(c, &od, result_cb, &d, NULL), 0);
    sglr_httpc_opts_t og = { .url = url("/echo") };
    CHECK_EQ_INT(sglr_httpc_request(c, &og, result_cb, &g, NULL), 0);
    completed = 0;
    CHECK(run_until(&completed, 4, 5000));
    CHECK_EQ_STR(a.body, "POST {\"x\":1}");
    CHECK(strstr(a.headers, "x-content-type=application/json\n"));
    CHECK_EQ_INT(b.body_len, 7);
    CHECK(memcmp(b.body, "PUT a\0b", 7) == 0);
    CHECK_EQ_STR(d.body, "DELETE ");
    CHECK_EQ_STR(g.body, "GET ");
    free(a.body);
    free(b.body);
    free(d.body);
    free(g.body);

    /* A 2 MB body goes out without waiting for 100-continue and comes back. */
    size_t big = 2u << 20;
    char *payload = malloc(big);
    for (size_t i = 0; i < big; i++)
        payload[i] = (char)('a' + i % 26);
    result_t l = { 0 };
    sglr_httpc_opts_t ol = { .url = url("/echo"), .body = payload, .body_len = big,
                             .timeout_ms = 10000 };
    double t0 = sglr_now_ms();
    CHECK_EQ_INT(sglr_httpc_request(c, &ol, result_cb, &l, NULL), 0);
    CHECK(run_until(&l.done, 1, 10000));
    CHECK(sglr_now_ms() - t0 < 900);
    CHECK_EQ_INT(l.body_len, big + 5);
    CHECK(memcmp(l.body, "POST ", 5) == 0 && memcmp(l.body + 5, payload, big) == 0);
    free(payload);
    free(l.body);
    close_client(c);
}

TEST(invalid_requests_are_refused_up_front)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t r = { 0 };
    sglr_httpc_opts_t o = { .url = NULL };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), -EINVAL);
    sglr_httpc_header_t bad[] = { { "X-A", 3, "v\r\nX-Injected: 1", 17 } };
    o = (sglr_httpc_opts_t){ .url = url("/ok"), .headers = bad, .nheaders = 1 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), -EINVAL);
    o = (sglr_httpc_opts_t){ .url = url("/ok"), .method = "GET /x" };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), -EINVAL);
    CHECK_EQ_INT(sglr_httpc_active(c), 0);
    /* Unsupported schemes fail as a transfer error, not a crash. */
    o = (sglr_httpc_opts_t){ .url = "file:///etc/passwd" };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), 0);
    CHECK(run_until(&r.done, 1, 5000));
    CHECK_EQ_INT(r.status, 0);
    CHECK(strstr(r.error, "not supported"));
    CHECK_EQ_INT(r.done, 1);
    close_client(c);
}

TEST(timeout)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t r = { 0 };
    double t0 = sglr_now_ms();
    CHECK_EQ_INT(get(c, "/hang", &r, 200), 0);
    CHECK(run_until(&r.done, 1, 5000));
    double took = sglr_now_ms() - t0;
    CHECK_EQ_STR(r.error, "timeout");
    CHECK_EQ_INT(r.status, 0);
    CHECK(took >= 190 && took < 2000);
    close_client(c);
}

TEST(connection_refused_and_closed)
{
    /* A port that was just free: bind, read it, close. */
    uv_tcp_t tmp;
    struct sockaddr_in addr, bound;
    int len = sizeof bound;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    uv_tcp_init(&loop, &tmp);
    uv_tcp_bind(&tmp, (const struct sockaddr *)&addr, 0);
    uv_tcp_getsockname(&tmp, (struct sockaddr *)&bound, &len);
    uv_close((uv_handle_t *)&tmp, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);

    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    char u[64];
    snprintf(u, sizeof u, "http://127.0.0.1:%d/", ntohs(bound.sin_port));
    char us[64];
    snprintf(us, sizeof us, "https://127.0.0.1:%d/", ntohs(bound.sin_port));
    result_t r = { 0 }, k = { 0 }, t = { 0 };
    sglr_httpc_opts_t o = { .url = u, .timeout_ms = 5000, .connect_timeout_ms = 2000 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), 0);
    CHECK_EQ_INT(get(c, "/close", &k, 5000), 0);
    o.url = us;                      /* https is enabled: it fails at connect */
    o.insecure = 1;
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &t, NULL), 0);
    completed = 0;
    CHECK(run_until(&completed, 3, 5000));
    CHECK(strstr(t.error, "onnect"));
    CHECK_EQ_INT(r.status, 0);
    CHECK(strstr(r.error, "onnect"));                  /* "Failed to connect to ..." */
    CHECK_EQ_INT(k.status, 0);
    CHECK(strstr(k.error, "Empty reply") || strstr(k.error, "returned nothing"));
    fprintf(stderr, "     refused: %s\n     closed:  %s\n", r.error, k.error);
    close_client(c);
}

TEST(concurrent_and_connection_reuse)
{
    enum { N = 50 };
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    static result_t rs[N];
    char bodies[N][16];
    memset(rs, 0, sizeof rs);
    for (int i = 0; i < N; i++) {
        snprintf(bodies[i], sizeof bodies[i], "req-%d", i);
        sglr_httpc_opts_t o = { .url = url("/echo"), .body = bodies[i],
                                .body_len = strlen(bodies[i]), .timeout_ms = 10000 };
        CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &rs[i], NULL), 0);
    }
    CHECK_EQ_INT(sglr_httpc_active(c), N);
    completed = 0;
    CHECK(run_until(&completed, N, 10000));
    int ok = 1;
    for (int i = 0; i < N; i++) {
        char want[32];
        snprintf(want, sizeof want, "POST %s", bodies[i]);
        if (rs[i].done != 1 || rs[i].status != 200 || !rs[i].body || strcmp(rs[i].body, want))
            ok = 0;
        free(rs[i].body);
    }
    CHECK(ok);

    /* Sequential requests ride one kept-alive connection. */
    int before = accepts;
    for (int i = 0; i < 5; i++) {
        result_t r = { 0 };
        CHECK_EQ_INT(get(c, "/ok", &r, 5000), 0);
        CHECK(run_until(&r.done, 1, 5000));
        CHECK_EQ_INT(r.status, 200);
        free(r.body);
    }
    CHECK(accepts - before <= 0);
    close_client(c);
}

TEST(idle_client_does_not_hold_the_loop)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t r = { 0 };
    CHECK_EQ_INT(get(c, "/ok", &r, 5000), 0);
    CHECK(uv_loop_alive(&loop));
    CHECK(run_until(&r.done, 1, 5000));
    CHECK_EQ_INT(r.status, 200);
    free(r.body);
    /* Everything else on the loop is unref'd: with the request done and its
     * connection idle in curl's cache, nothing keeps uv_run going. */
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(!uv_loop_alive(&loop));
    close_client(c);
}

static int seen_target;

TEST(close_with_requests_in_flight)
{
    enum { N = 10 };
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t rs[N];
    memset(rs, 0, sizeof rs);
    seen_target = requests_seen + N;
    for (int i = 0; i < N; i++)
        CHECK_EQ_INT(get(c, "/hang", &rs[i], 60000), 0);
    CHECK(run_until(&requests_seen, seen_target, 5000));   /* all on the wire */
    completed = 0;
    sglr_httpc_close(c);
    CHECK_EQ_INT(completed, N);
    for (int i = 0; i < N; i++) {
        CHECK_EQ_INT(rs[i].done, 1);
        CHECK_EQ_STR(rs[i].error, "cancelled");
    }
    uv_run(&loop, UV_RUN_NOWAIT);

    /* Closed before the loop ever ran: nothing connected yet. */
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t q = { 0 };
    CHECK_EQ_INT(get(c, "/ok", &q, 5000), 0);
    close_client(c);
    CHECK_EQ_INT(q.done, 1);
    CHECK_EQ_STR(q.error, "cancelled");
}

/* A completion callback that closes its own client, with others pending. */
static sglr_httpc_t *closer_client;
static result_t closer_results[4];

static void closing_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    result_cb(req, res, data);
    sglr_httpc_opts_t o = { .url = url("/ok") };
    result_t dummy = { 0 };
    sglr_httpc_close(closer_client);
    sglr_httpc_close(closer_client);               /* twice is harmless */
    /* A request on a closed client is refused, and no callback follows. */
    if (sglr_httpc_request(closer_client, &o, result_cb, &dummy, NULL) != -ECANCELED)
        closer_results[3].tag = 2;
}

TEST(close_from_a_callback)
{
    CHECK_EQ_INT(sglr_httpc_init(&loop, &closer_client), 0);
    memset(closer_results, 0, sizeof closer_results);
    sglr_httpc_opts_t o = { .url = url("/ok"), .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(closer_client, &o, closing_cb, &closer_results[0], NULL), 0);
    CHECK_EQ_INT(get(closer_client, "/hang", &closer_results[1], 5000), 0);
    CHECK_EQ_INT(get(closer_client, "/hang", &closer_results[2], 5000), 0);
    completed = 0;
    CHECK(run_until(&completed, 3, 5000));
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK_EQ_INT(closer_results[0].status, 200);
    CHECK_EQ_STR(closer_results[1].error, "cancelled");
    CHECK_EQ_STR(closer_results[2].error, "cancelled");
    CHECK_EQ_INT(closer_results[3].tag, 0);
    CHECK_EQ_INT(closer_results[0].done + closer_results[1].done + closer_results[2].done, 3);
    free(closer_results[0].body);
}

/* A callback that starts the next request: chains run without recursion. */
static sglr_httpc_t *chain_client;
static int chain_left, chain_ok;

static void chain_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    if (res->status == 200)
        chain_ok++;
    uv_stop(&loop);
    if (--chain_left > 0) {
        sglr_httpc_opts_t o = { .url = url("/ok"), .timeout_ms = 5000 };
        sglr_httpc_request(chain_client, &o, chain_cb, NULL, NULL);
    }
}

TEST(request_from_a_callback)
{
    CHECK_EQ_INT(sglr_httpc_init(&loop, &chain_client), 0);
    chain_left = 20;
    chain_ok = 0;
    sglr_httpc_opts_t o = { .url = url("/ok"), .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(chain_client, &o, chain_cb, NULL, NULL), 0);
    CHECK(run_until(&chain_ok, 20, 10000));
    CHECK_EQ_INT(chain_left, 0);
    close_client(chain_client);
}

/* ------------------------------------------------------- streamed bodies */

typedef struct {
    result_t res;                    /* the final callback */
    char body[4096];                 /* the pieces, joined */
    size_t len;
    int calls;
    int status;                      /* as on_data saw it */
    int pieces_seen[16];             /* server pieces written at each call */
    int cancel_on;                   /* cancel itself on this call (1-based) */
    int calls_after_cancel;
    int cancelled;
    sglr_httpc_req_t *req;
    sglr_httpc_t *c;
    int start_on;                    /* start a request on this call */
    result_t started;
} stream_rec_t;

static void rec_data_cb(sglr_httpc_req_t *req, int status, const char *data, size_t len, void *ud)
{
    stream_rec_t *s = ud;
    if (s->cancelled)
        s->calls_after_cancel++;
    if (s->calls < 16)
        s->pieces_seen[s->calls] = stream_pieces;
    s->calls++;
    s->status = status;
    if (s->len + len < sizeof s->body) {
        memcpy(s->body + s->len, data, len);
        s->len += len;
        s->body[s->len] = '\0';
    }
    uv_stop(&loop);
    if (s->start_on && s->calls == s->start_on) {
        /* curl refuses curl_multi_add_handle from inside its callbacks:
         * this works only because on_data runs outside them */
        sglr_httpc_opts_t o = { .url = url("/ok"), .timeout_ms = 5000 };
        CHECK_EQ_INT(sglr_httpc_request(s->c, &o, result_cb, &s->started, NULL), 0);
    }
    if (s->cancel_on && s->calls == s->cancel_on) {
        sglr_httpc_cancel(req);
        sglr_httpc_cancel(req);                    /* twice is harmless */
        s->cancelled = 1;
    }
}

static void rec_done_cb(sglr_httpc_req_t *req, const sglr_httpc_response_t *res, void *data)
{
    stream_rec_t *s = data;
    /* cancelling from its own final callback is a no-op */
    sglr_httpc_cancel(req);
    result_cb(req, res, &s->res);
}

static int stream_get(sglr_httpc_t *c, const char *path, stream_rec_t *s)
{
    sglr_httpc_opts_t o = { .url = url(path), .timeout_ms = 10000, .on_data = rec_data_cb };
    s->c = c;
    return sglr_httpc_request(c, &o, rec_done_cb, s, &s->req);
}

TEST(body_streamed_as_it_arrives)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    static stream_rec_t s;
    memset(&s, 0, sizeof s);
    s.start_on = 1;
    CHECK_EQ_INT(stream_get(c, "/stream", &s), 0);
    CHECK(run_until(&s.res.done, 1, 5000));
    CHECK_EQ_STR(s.res.error, "");
    CHECK_EQ_INT(s.res.status, 200);
    CHECK_EQ_INT(s.res.body_len, 0);                /* it all went to on_data */
    CHECK(strstr(s.res.headers, "content-type=application/json\n"));
    CHECK_EQ_INT(s.status, 200);
    CHECK_EQ_STR(s.body, "{\"type\":\"ADDED\",\"n\":1}\n{\"type\":\"MODIFIED\",\"n\":2}\n"
                         "{\"type\":\"DELETED\",\"n\":3}\n");
    /* Each piece was handed over before the server wrote the next one:
     * nothing waited for the end of the response. */
    CHECK(s.calls >= 3);
    CHECK_EQ_INT(s.pieces_seen[0], 1);
    CHECK_EQ_INT(s.pieces_seen[1], 2);
    CHECK_EQ_INT(s.pieces_seen[2], 3);
    /* the request started from on_data ran */
    CHECK(run_until(&s.started.done, 1, 5000));
    CHECK_EQ_INT(s.started.status, 200);
    free(s.started.body);
    free(s.res.body);
    CHECK_EQ_INT(sglr_httpc_active(c), 0);
    close_client(c);
}

TEST(cancel_mid_stream)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    static stream_rec_t a, b;
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.cancel_on = 3;                 /* from its own on_data */
    int closes = peer_closes;
    CHECK_EQ_INT(stream_get(c, "/forever", &a), 0);
    CHECK(run_until(&a.res.done, 1, 5000));
    CHECK_EQ_STR(a.res.error, "cancelled");
    CHECK_EQ_INT(a.res.status, 0);
    CHECK_EQ_INT(a.res.done, 1);
    CHECK_EQ_INT(a.calls, 3);
    CHECK_EQ_INT(a.calls_after_cancel, 0);
    CHECK_EQ_INT(sglr_httpc_active(c), 0);
    /* the server sees its connection end: nothing is kept for reuse */
    CHECK(run_until(&peer_closes, closes + 1, 5000));

    /* from outside: after two pieces, cancelled from the test; its callback
     * comes from the loop, not from inside sglr_httpc_cancel */
    closes = peer_closes;
    CHECK_EQ_INT(stream_get(c, "/forever", &b), 0);
    CHECK(run_until(&b.calls, 2, 5000));
    sglr_httpc_cancel(b.req);
    CHECK_EQ_INT(b.res.done, 0);
    int calls = b.calls;
    CHECK(run_until(&b.res.done, 1, 5000));
    CHECK_EQ_STR(b.res.error, "cancelled");
    CHECK_EQ_INT(b.calls, calls);
    CHECK(run_until(&peer_closes, closes + 1, 5000));
    /* and the client works on */
    result_t r = { 0 };
    CHECK_EQ_INT(get(c, "/ok", &r, 5000), 0);
    CHECK(run_until(&r.done, 1, 5000));
    CHECK_EQ_INT(r.status, 200);
    free(r.body);
    close_client(c);
}

TEST(cancel_before_connect)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    int before = accepts, seen = requests_seen;
    result_t r = { 0 };
    sglr_httpc_req_t *req;
    sglr_httpc_opts_t o = { .url = url("/ok"), .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, &req), 0);
    sglr_httpc_cancel(req);
    CHECK_EQ_INT(r.done, 0);
    CHECK_EQ_INT(sglr_httpc_active(c), 1);            /* until its callback has run */
    CHECK(run_until(&r.done, 1, 5000));
    CHECK_EQ_STR(r.error, "cancelled");
    CHECK_EQ_INT(sglr_httpc_active(c), 0);
    /* a few more turns of the loop: nothing was dialled */
    for (int i = 0; i < 5; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    CHECK_EQ_INT(accepts, before);
    CHECK_EQ_INT(requests_seen, seen);
    CHECK_EQ_INT(r.done, 1);

    /* cancelled, then the client closed before the loop ran: one callback */
    result_t q = { 0 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &q, &req), 0);
    sglr_httpc_cancel(req);
    close_client(c);
    CHECK_EQ_INT(q.done, 1);
    CHECK_EQ_STR(q.error, "cancelled");
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK_EQ_INT(q.done, 1);
}

TEST(bearer_token_and_tls_options)
{
    sglr_httpc_t *c;
    CHECK_EQ_INT(sglr_httpc_init(&loop, &c), 0);
    result_t r = { 0 };
    sglr_httpc_opts_t o = { .url = url("/echo"), .bearer_token = "abc.def-123", .timeout_ms = 5000 };
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), 0);
    CHECK(run_until(&r.done, 1, 5000));
    CHECK(strstr(r.headers, "x-authorization=Bearer abc.def-123\n"));
    free(r.body);
    o.bearer_token = "a\r\nx-injected: 1";
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), -EINVAL);
    o.bearer_token = "";
    CHECK_EQ_INT(sglr_httpc_request(c, &o, result_cb, &r, NULL), -EINVAL);
    /* TLS material is taken (copied) even where the URL is plain http */
    static const char pem[] = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    result_t t = { 0 };
    char buf[sizeof pem];
    memcpy(buf, pem, sizeof pem);
    sglr_httpc_opts_t ot = { .url = url("/ok"), .timeout_ms = 5000, .ca_data = buf,
                             .ca_data_len = sizeof pem - 1, .cert_data = buf,
                             .cert_data_len = sizeof pem - 1, .key_data = buf,
                             .key_data_len = sizeof pem - 1 };
    CHECK_EQ_INT(sglr_httpc_request(c, &ot, result_cb, &t, NULL), 0);
    memset(buf, 0, sizeof buf);
    CHECK(run_until(&t.done, 1, 5000));
    CHECK_EQ_INT(t.status, 200);
    free(t.body);
    close_client(c);
}

/* ------------------------------------------------------------ Lua module */

static const char *lua_script =
    "local httpc = require 'sglr.httpc'\n"
    "local base = ...\n"
    "results = {}\n"
    "local ok, err = pcall(httpc.request, { url = base .. '/ok' })\n"
    "assert(not ok and err:find('inside a coroutine', 1, true), err)\n"
    "ok, err = pcall(httpc.request, { url = 5 })\n"
    "assert(not ok and err:find(\"'url' must be a string, got number\", 1, true), err)\n"
    "ok, err = pcall(httpc.request, { url = base, headers = { ['x-a'] = 'b\\r\\nc: d' } })\n"
    "assert(not ok and err:find('invalid header', 1, true), err)\n"
    "ok, err = pcall(httpc.request, { url = base, headers = { ['x-a'] = 1 } })\n"
    "assert(not ok and err:find('strings to strings', 1, true), err)\n"
    "local function spawn(f) local co = coroutine.create(f); assert(coroutine.resume(co)) end\n"
    "spawn(function()\n"
    "  local status, body, headers = httpc.request{ url = base .. '/ok', timeout_ms = 5000 }\n"
    "  results.ok = { status, body, headers['x-test'], headers['set-cookie'] }\n"
    "  status, body, headers = httpc.request{ method = 'POST', url = base .. '/echo',\n"
    "    headers = { ['content-type'] = 'application/json' }, body = '{}' }\n"
    "  results.echo = { status, body, headers['x-content-type'] }\n"
    "end)\n"
    "spawn(function()\n"
    "  results.timeout = { httpc.request{ url = base .. '/hang', timeout_ms = 100 } }\n"
    "end)\n";

static const char *lua_check =
    "assert(results.ok[1] == 200 and results.ok[2] == 'hello' and results.ok[3] == 'Yes')\n"
    "assert(results.ok[4] == 'a=1, b=2', results.ok[4])\n"
    "assert(results.echo[1] == 200 and results.echo[2] == 'POST {}', results.echo[2])\n"
    "assert(results.echo[3] == 'application/json')\n"
    "assert(results.timeout[1] == nil and results.timeout[2] == 'timeout')\n"
    "local co = coroutine.create(function()\n"
    "  local r, e = require('sglr.httpc').request{ url = 'http://127.0.0.1:1/' }\n"
    "  results.after_close = { r, e }\n"
    "end)\n"
    "assert(coroutine.resume(co))\n";

static void idle_cb(uv_idle_t *h)
{
}

TEST(lua_module)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    sglr_L = L;
    sglr_preload(L, "sglr.httpc", luaopen_sglr_httpc);
    int rc = luaL_loadstring(L, lua_script);
    lua_pushfstring(L, "http://127.0.0.1:%d", server_port);
    if (rc == 0)
        rc = lua_pcall(L, 1, 0, 0);
    if (rc)
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
    CHECK_EQ_INT(rc, 0);
    completed = 0;
    sglr_httpc_t *c = sglr_httpc_default();
    CHECK(c && sglr_httpc_active(c) == 2);
    /* Run until both coroutines finished: the default client goes idle. */
    uv_timer_t dog;
    uv_timer_init(&loop, &dog);
    uv_timer_start(&dog, watchdog_cb, 5000, 0);
    uv_idle_t spin;                  /* coroutines give no signal: poll without sleeping */
    uv_idle_init(&loop, &spin);
    uv_idle_start(&spin, idle_cb);
    timed_out = 0;
    while (!timed_out) {
        uv_run(&loop, UV_RUN_ONCE);
        lua_getglobal(L, "results");
        lua_getfield(L, -1, "echo");
        lua_getfield(L, -2, "timeout");
        int done = !lua_isnil(L, -1) && !lua_isnil(L, -2);
        lua_pop(L, 3);
        if (done)
            break;
    }
    uv_close((uv_handle_t *)&dog, NULL);
    uv_close((uv_handle_t *)&spin, NULL);
    CHECK(!timed_out);
    sglr_httpc_shutdown();
    CHECK(sglr_httpc_default() == NULL);
    rc = luaL_dostring(L, lua_check);
    if (rc)
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
    CHECK_EQ_INT(rc, 0);
    /* After shutdown a request answers at once, without yielding. */
    rc = luaL_dostring(L, "assert(results.after_close[1] == nil and "
                          "results.after_close[2]:find('not available', 1, true))");
    if (rc)
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
    CHECK_EQ_INT(rc, 0);
    uv_run(&loop, UV_RUN_NOWAIT);
    lua_close(L);
    sglr_L = NULL;
}

int main(void)
{
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    if (server_start() != 0) {
        fprintf(stderr, "cannot start the test server\n");
        return 1;
    }
    RUN(get_status_body_headers);
    RUN(methods_headers_and_bodies);
    RUN(invalid_requests_are_refused_up_front);
    RUN(timeout);
    RUN(connection_refused_and_closed);
    RUN(concurrent_and_connection_reuse);
    RUN(idle_client_does_not_hold_the_loop);
    RUN(close_with_requests_in_flight);
    RUN(close_from_a_callback);
    RUN(request_from_a_callback);
    RUN(body_streamed_as_it_arrives);
    RUN(cancel_mid_stream);
    RUN(cancel_before_connect);
    RUN(bearer_token_and_tls_options);
    RUN(lua_module);
    sglr_clock_stop();
    server_stop();
    uv_run(&loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&loop);
    if (rc != 0) {
        fprintf(stderr, "uv_loop_close: %s (handles left open)\n", uv_strerror(rc));
        uv_print_all_handles(&loop, stderr);
        test_failures++;
    }
    sglr_httpc_global_cleanup();
    TEST_EXIT();
}
