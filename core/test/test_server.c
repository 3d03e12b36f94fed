/*
 * test_server.c: the HTTP/1.1 server engine (core/server.c), driven by raw
 * TCP clients that run on the same loop as the server:
 *
 *   client --raw bytes, whole or in timed pieces--> server --> on_request
 *      ^                                                          |
 *      +------------ response bytes, parsed by the test <---------+
 *
 * The handler answers from C:
 *
 *   /echo          200 "<METHOD> <url> <body length> <x-test>\n<body>"
 *   /later?ms=N    the same echo, answered N ms later from a uv_timer
 *   /stream        chunked: "hello", 300 x 'a', then the 0 chunk
 *   /stream-later  chunked: "first" now, "second" and the end N ms later
 *   /abort         chunked: "partial", then sglr_exchange_abort
 *   anything else  404
 *
 * Responses are parsed here, not with llhttp, so that the framing the
 * server puts on the wire (hex chunk sizes, the last chunk) is checked
 * byte by byte. Every wait runs under a guard timer: a bug fails a check
 * instead of hanging the run.
 */
#include "test.h"
#include "server.h"
#include "sglr.h"

#include <ctype.h>
#include <errno.h>
#include <signal.h>
#include <strings.h>

static uv_loop_t loop;

/* --- waiting -------------------------------------------------------------- */

static uv_timer_t guard;
static int guard_fired;

static void guard_cb(uv_timer_t *t)
{
    guard_fired = 1;
}

/* Run the loop until cond holds; fail the test after ms. */
#define WAIT(cond, ms) do { \
    guard_fired = 0; \
    uv_timer_start(&guard, guard_cb, (ms), 0); \
    while (!(cond) && !guard_fired) \
        uv_run(&loop, UV_RUN_ONCE); \
    uv_timer_stop(&guard); \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: timed out waiting for %s\n", __FILE__, __LINE__, #cond); \
        test_failures++; return; } } while (0)

/* --- the handler ------------------------------------------------------------ */

static int nrequests;           /* on_request calls */
static int nclose_cb;           /* exchange on_close calls */
static int nlater_fired;        /* /later and /stream-later timers that ran */
static int nlater_closed;       /* ... and found the client gone */
static int later_rc;            /* what the late respond/write returned */
static sglr_conn_t *last_conn;  /* connection of the last request */

typedef struct {
    uv_timer_t timer;
    sglr_exchange_t *x;
    int stream;
} later_t;

static void url_of(sglr_exchange_t *x, char *out, size_t cap)
{
    size_t n = x->head.url_len < cap - 1 ? x->head.url_len : cap - 1;
    memcpy(out, x->head.buf.data + x->head.url_off, n);
    out[n] = 0;
}

static int path_is(const char *url, const char *path)
{
    size_t n = strlen(path);
    return strncmp(url, path, n) == 0 && (url[n] == 0 || url[n] == '?');
}

static int echo(sglr_exchange_t *x)
{
    char url[512];
    url_of(x, url, sizeof url);
    size_t tlen = 0;
    const char *t = sglr_head_get(&x->head, "x-test", &tlen);
    sglr_buf_t b = { 0 };
    sglr_buf_printf(&b, "%s %s %zu %.*s\n", sglr_exchange_method(x), url, x->body.len,
                    t ? (int)tlen : 1, t ? t : "-");
    sglr_buf_append(&b, x->body.data, x->body.len);
    static const char hdrs[] = "x-echo: 1\r\n";
    int r = sglr_exchange_respond(x, 200, hdrs, sizeof hdrs - 1, b.data, b.len);
    sglr_buf_free(&b);
    return r;
}

static void later_closed_cb(uv_handle_t *h)
{
    free(h->data);
}

static void later_cb(uv_timer_t *t)
{
    later_t *l = t->data;
    sglr_exchange_t *x = l->x;
    nlater_fired++;
    if (sglr_exchange_closed(x))
        nlater_closed++;
    if (l->stream) {
        later_rc = sglr_exchange_write(x, "second", 6);
        int f = sglr_exchange_finish(x);
        if (later_rc == 0)
            later_rc = f;
    } else {
        later_rc = echo(x);
    }
    sglr_exchange_release(x);
    uv_close((uv_handle_t *)&l->timer, later_closed_cb);
}

static void on_close_cb(sglr_exchange_t *x)
{
    nclose_cb++;
}

static void answer_later(sglr_exchange_t *x, const char *url, int stream)
{
    const char *q = strstr(url, "ms=");
    unsigned ms = q ? (unsigned)atoi(q + 3) : 30;
    later_t *l = calloc(1, sizeof *l);
    l->x = x;
    l->stream = stream;
    sglr_exchange_hold(x);
    x->on_close = on_close_cb;
    uv_timer_init(&loop, &l->timer);
    l->timer.data = l;
    uv_timer_start(&l->timer, later_cb, ms, 0);
}

static void on_request(sglr_exchange_t *x)
{
    char url[512];
    url_of(x, url, sizeof url);
    nrequests++;
    last_conn = x->conn;
    if (path_is(url, "/echo")) {
        echo(x);
    } else if (path_is(url, "/later")) {
        answer_later(x, url, 0);
    } else if (path_is(url, "/stream")) {
        static const char hdrs[] = "content-type: text/plain\r\n";
        char a[300];
        memset(a, 'a', sizeof a);
        sglr_exchange_start(x, 200, hdrs, sizeof hdrs - 1, -1);
        sglr_exchange_write(x, "hello", 5);
        sglr_exchange_write(x, a, sizeof a);
        sglr_exchange_write(x, "", 0);          /* must not end the stream */
        sglr_exchange_finish(x);
    } else if (path_is(url, "/stream-later")) {
        sglr_exchange_start(x, 200, "", 0, -1);
        sglr_exchange_write(x, "first", 5);
        answer_later(x, url, 1);
    } else if (path_is(url, "/big")) {
        /* 512 KB answered at once: a client that does not read fills the
         * socket, then the server's write queue */
        static char big[512 << 10];
        if (!big[0])
            memset(big, 'b', sizeof big);
        sglr_exchange_respond(x, 200, "", 0, big, sizeof big);
    } else if (path_is(url, "/abort")) {
        sglr_exchange_start(x, 200, "", 0, -1);
        sglr_exchange_write(x, "partial", 7);
        sglr_exchange_abort(x);
    } else {
        sglr_exchange_respond(x, 404, "", 0, "not found", 9);
    }
}

/* --- the server ------------------------------------------------------------- */

static int nserver_closed;

static void server_closed_cb(sglr_server_t *s)
{
    nserver_closed++;
}

/* Options the next server_up starts with beyond the sizes (then reset). */
static sglr_server_opts_t next_opts;

static sglr_server_t *server_up(size_t max_body, size_t max_header)
{
    sglr_server_t *s = calloc(1, sizeof *s);
    sglr_server_opts_t o = next_opts;
    o.max_body = max_body;
    o.max_header = max_header;
    next_opts = (sglr_server_opts_t){ 0 };
    if (sglr_server_init(s, "127.0.0.1", 0, &o, on_request, NULL) < 0) {
        fprintf(stderr, "cannot listen on 127.0.0.1\n");
        exit(1);
    }
    nrequests = nclose_cb = nlater_fired = nlater_closed = 0;
    later_rc = 12345;
    last_conn = NULL;
    return s;
}

/* Stop s, wait until the listener and every connection are closed, free. */
#define SERVER_DOWN(s) do { \
    int _closed = nserver_closed; \
    sglr_server_stop((s), server_closed_cb); \
    WAIT(nserver_closed == _closed + 1 && (s)->nconns == 0, 2000); \
    free(s); } while (0)

/* --- raw clients -------------------------------------------------------------- */

typedef struct {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_timer_t timer;        /* sends the next piece of out */
    sglr_buf_t in;           /* every byte received */
    sglr_buf_t out;          /* bytes to send in pieces */
    size_t *cuts;            /* end offsets of the pieces */
    int ncuts, next_cut;
    int connected;           /* 1 connected, <0 error */
    int eof;                 /* 1 EOF, <0 read error */
    int nclosed;
} client_t;

static void client_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    client_t *cl = s->data;
    if (nread > 0)
        sglr_buf_append(&cl->in, buf->base, (size_t)nread);
    else if (nread < 0) {
        cl->eof = nread == UV_EOF ? 1 : (int)nread;
        uv_read_stop(s);
    }
    free(buf->base);
}

static void client_connect_cb(uv_connect_t *req, int status)
{
    client_t *cl = req->data;
    if (status < 0) {
        cl->connected = status;
        return;
    }
    cl->connected = 1;
    uv_tcp_nodelay(&cl->tcp, 1);
    uv_read_start((uv_stream_t *)&cl->tcp, client_alloc_cb, client_read_cb);
}

static client_t *client_new(int port)
{
    client_t *cl = calloc(1, sizeof *cl);
    uv_tcp_init(&loop, &cl->tcp);
    uv_timer_init(&loop, &cl->timer);
    cl->tcp.data = cl->timer.data = cl->creq.data = cl;
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    uv_tcp_connect(&cl->creq, &cl->tcp, (struct sockaddr *)&addr, client_connect_cb);
    return cl;
}

static void client_write_cb(uv_write_t *w, int status)
{
    free(w);
}

static void client_send(client_t *cl, const char *data, size_t len)
{
    uv_write_t *w = malloc(sizeof *w + len);
    memcpy(w + 1, data, len);
    uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)len);
    uv_write(w, (uv_stream_t *)&cl->tcp, &b, 1, client_write_cb);
}

static void client_piece_cb(uv_timer_t *t)
{
    client_t *cl = t->data;
    size_t from = cl->next_cut ? cl->cuts[cl->next_cut - 1] : 0;
    size_t to = cl->cuts[cl->next_cut++];
    client_send(cl, cl->out.data + from, to - from);
    if (cl->next_cut == cl->ncuts)
        uv_timer_stop(t);
}

/* Send data in pieces ending at cuts[] (the last piece ends at len), one
 * piece every delay_ms, so that the server reads them separately. */
static void client_send_cuts(client_t *cl, const char *data, size_t len,
                             const size_t *cuts, int ncuts, unsigned delay_ms)
{
    sglr_buf_reset(&cl->out);
    sglr_buf_append(&cl->out, data, len);
    free(cl->cuts);
    cl->cuts = calloc((size_t)ncuts + 1, sizeof *cl->cuts);
    int n = 0;
    for (int i = 0; i < ncuts; i++)
        if (cuts[i] > 0 && cuts[i] < len && (n == 0 || cuts[i] > cl->cuts[n - 1]))
            cl->cuts[n++] = cuts[i];
    cl->cuts[n++] = len;
    cl->ncuts = n;
    cl->next_cut = 0;
    uv_timer_start(&cl->timer, client_piece_cb, 0, delay_ms);
}

static void client_send_bytewise(client_t *cl, const char *data, size_t len, unsigned delay_ms)
{
    size_t *cuts = calloc(len, sizeof *cuts);
    for (size_t i = 0; i < len; i++)
        cuts[i] = i + 1;
    client_send_cuts(cl, data, len, cuts, (int)len, delay_ms);
    free(cuts);
}

static int client_sent_all(client_t *cl)
{
    return cl->ncuts && cl->next_cut == cl->ncuts;
}

static void client_closed_cb(uv_handle_t *h)
{
    client_t *cl = h->data;
    if (++cl->nclosed < 2)
        return;
    sglr_buf_free(&cl->in);
    sglr_buf_free(&cl->out);
    free(cl->cuts);
    free(cl);
}

static void client_close(client_t *cl)
{
    uv_close((uv_handle_t *)&cl->tcp, client_closed_cb);
    uv_close((uv_handle_t *)&cl->timer, client_closed_cb);
}

/* Close with a reset (SO_LINGER 0): what a killed client looks like. */
static void client_reset(client_t *cl)
{
    uv_tcp_close_reset(&cl->tcp, client_closed_cb);
    uv_close((uv_handle_t *)&cl->timer, client_closed_cb);
}

/* --- parsing responses ---------------------------------------------------------- */

typedef struct {
    int status;
    char head[4096];         /* header lines, NUL-terminated */
    sglr_buf_t body;         /* decoded body */
    size_t raw_off, raw_len; /* the body bytes as sent, in the input */
} resp_t;

static const char *find(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(p + i, needle, k) == 0)
            return p + i;
    return NULL;
}

/* Value of header name in r (names compared case-insensitively), copied
 * into out; NULL when absent. */
static const char *resp_header(const resp_t *r, const char *name, char *out, size_t cap)
{
    size_t nl = strlen(name);
    for (const char *line = r->head; *line; ) {
        const char *end = strstr(line, "\r\n");
        if (!end)
            break;
        if ((size_t)(end - line) > nl && strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ')
                v++;
            size_t vl = (size_t)(end - v) < cap - 1 ? (size_t)(end - v) : cap - 1;
            memcpy(out, v, vl);
            out[vl] = 0;
            return out;
        }
        line = end + 2;
    }
    return NULL;
}

/* Parse one response at p[0..n). Returns the bytes it takes, 0 when it is
 * incomplete, -1 when it is malformed. eof: the input ended at n (for a
 * close-delimited body); head_only: the answer to a HEAD request. */
static long parse_resp(const char *p, size_t n, int eof, int head_only, resp_t *r)
{
    memset(r, 0, sizeof *r);
    const char *he = find(p, n, "\r\n\r\n");
    if (!he)
        return 0;
    if (n < 13 || memcmp(p, "HTTP/1.1 ", 9) != 0 || p[12] != ' ')
        return -1;
    r->status = atoi(p + 9);
    const char *sl = find(p, n, "\r\n");
    size_t hl = (size_t)(he + 2 - (sl + 2));
    if (hl >= sizeof r->head)
        return -1;
    memcpy(r->head, sl + 2, hl);
    r->head[hl] = 0;
    size_t off = (size_t)(he + 4 - p);
    r->raw_off = off;
    char v[64];
    if (r->status < 200 || r->status == 204 || r->status == 304 || head_only)
        return (long)off;
    if (resp_header(r, "transfer-encoding", v, sizeof v)) {
        if (strcmp(v, "chunked") != 0)
            return -1;
        size_t at = off;
        for (;;) {
            const char *le = find(p + at, n - at, "\r\n");
            if (!le)
                goto incomplete;
            char *end;
            unsigned long size = strtoul(p + at, &end, 16);
            if (end == p + at || (*end != '\r' && *end != ';'))
                return -1;
            at = (size_t)(le + 2 - p);
            if (n - at < size + 2)
                goto incomplete;
            if (memcmp(p + at + size, "\r\n", 2) != 0)
                return -1;
            sglr_buf_append(&r->body, p + at, size);
            at += size + 2;
            if (size == 0)
                break;
        }
        r->raw_len = at - off;
        return (long)at;
    }
    if (resp_header(r, "content-length", v, sizeof v)) {
        size_t len = (size_t)strtoull(v, NULL, 10);
        if (n - off < len)
            goto incomplete;
        sglr_buf_append(&r->body, p + off, len);
        r->raw_len = len;
        return (long)(off + len);
    }
    if (!eof)
        goto incomplete;
    sglr_buf_append(&r->body, p + off, n - off);
    r->raw_len = n - off;
    return (long)n;
incomplete:
    sglr_buf_free(&r->body);
    return 0;
}

static void resp_free(resp_t *r, int n)
{
    for (int i = 0; i < n; i++)
        sglr_buf_free(&r[i].body);
}

/* Parse every complete response cl received into out[max]; returns how
 * many, or -1 when the bytes are malformed or run past the last response
 * once the connection has ended. */
static int client_responses(client_t *cl, resp_t *out, int max, int head_only)
{
    size_t at = 0;
    int n = 0;
    while (n < max && at < cl->in.len) {
        long used = parse_resp(cl->in.data + at, cl->in.len - at, cl->eof != 0, head_only,
                               &out[n]);
        if (used < 0) {
            resp_free(out, n);
            return -1;
        }
        if (used == 0)
            break;
        at += (size_t)used;
        n++;
    }
    if (cl->eof && at < cl->in.len) {
        resp_free(out, n);
        return -1;
    }
    return n;
}

/* How many complete responses cl has (for WAIT conditions). */
static int nresp_of(client_t *cl, int head_only)
{
    resp_t r[8];
    int n = client_responses(cl, r, 8, head_only);
    resp_free(r, n > 0 ? n : 0);
    return n;
}
#define NRESP(cl) nresp_of((cl), 0)

static int body_is(const resp_t *r, const char *s)
{
    return r->body.len == strlen(s) && memcmp(r->body.data, s, r->body.len) == 0;
}

/* --- cases ---------------------------------------------------------------------------- */

TEST(get_simple)
{
    sglr_server_t *s = server_up(1000, 4096);
    int port = sglr_server_port(s);
    CHECK(port > 0);
    client_t *cl = client_new(port);
    WAIT(cl->connected, 2000);
    CHECK_EQ_INT(cl->connected, 1);
    static const char req[] = "GET /echo?a=1 HTTP/1.1\r\nHost: x\r\nX-Test: hi\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 1, 2000);
    static const char want[] = "HTTP/1.1 200 OK\r\nx-echo: 1\r\ncontent-length: 19\r\n\r\n"
                               "GET /echo?a=1 0 hi\n";
    CHECK_EQ_STR(cl->in.data, want);
    CHECK_EQ_INT(nrequests, 1);
    CHECK_EQ_INT(cl->eof, 0);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    CHECK_EQ_INT(s->nconns, 1);
    client_close(cl);
    WAIT(s->nconns == 0, 2000);
    SERVER_DOWN(s);
}

TEST(post_content_length)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n"
                              "X-TEST: Mixed Case\r\n\r\nhello world";
    unsigned long fast0 = sglr_requests_fast;
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 1, 2000);
    CHECK_EQ_INT(sglr_requests_fast, fast0 + 1);   /* the common shape: read without llhttp */
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    int ok = r[0].status == 200 && body_is(&r[0], "POST /echo 11 Mixed Case\nhello world");
    char v[64];
    ok = ok && resp_header(&r[0], "connection", v, sizeof v) == NULL;
    resp_free(r, 1);
    CHECK(ok);

    /* the body limit is inclusive: exactly max_body bytes are accepted */
    sglr_buf_t big = { 0 };
    sglr_buf_printf(&big, "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n");
    for (int i = 0; i < 1000; i++)
        sglr_buf_append(&big, i % 10 == 9 ? "\n" : "x", 1);
    client_send(cl, big.data, big.len);
    sglr_buf_free(&big);
    WAIT(NRESP(cl) == 2, 2000);
    resp_t r2[2];
    CHECK_EQ_INT(client_responses(cl, r2, 2, 0), 2);
    ok = r2[1].status == 200 && r2[1].body.len == strlen("POST /echo 1000 -\n") + 1000 &&
         memcmp(r2[1].body.data, "POST /echo 1000 -\n", 18) == 0;
    resp_free(r2, 2);
    CHECK(ok);
    CHECK_EQ_INT(nrequests, 2);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(head_request_has_no_body)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "HEAD /echo HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    /* the HEAD answer announces the body length but carries no body, so the
     * GET answer follows right after the head */
    static const char want[] = "HTTP/1.1 200 OK\r\nx-echo: 1\r\ncontent-length: 15\r\n\r\n"
                               "HTTP/1.1 200 OK\r\nx-echo: 1\r\ncontent-length: 14\r\n\r\n"
                               "GET /echo 0 -\n";
    WAIT(cl->in.len >= sizeof want - 1, 2000);
    CHECK_EQ_STR(cl->in.data, want);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(keep_alive)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req1[] = "GET /echo?n=1 HTTP/1.1\r\nHost: t\r\n\r\n";
    static const char req2[] = "POST /echo?n=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc";
    client_send(cl, req1, sizeof req1 - 1);
    WAIT(NRESP(cl) == 1, 2000);
    sglr_conn_t *first = last_conn;
    client_send(cl, req2, sizeof req2 - 1);
    WAIT(NRESP(cl) == 2, 2000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = body_is(&r[0], "GET /echo?n=1 0 -\n") && body_is(&r[1], "POST /echo?n=2 3 -\nabc");
    resp_free(r, 2);
    CHECK(ok);
    CHECK(first != NULL && last_conn == first);
    CHECK_EQ_INT(s->nconns, 1);
    CHECK_EQ_INT(cl->eof, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(pipelined_in_order)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* the first answer comes late and the others at once: they still go
     * out in request order */
    static const char req[] = "GET /later?ms=40 HTTP/1.1\r\nHost: t\r\n\r\n"
                              "POST /echo?n=2 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody"
                              "GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"
                              "GET /echo?n=4 HTTP/1.1\r\nHost: t\r\nX-Test: last\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 4, 2000);
    resp_t r[4];
    CHECK_EQ_INT(client_responses(cl, r, 4, 0), 4);
    char a[301];
    memset(a, 'a', 300);
    a[300] = 0;
    char streamed[310];
    snprintf(streamed, sizeof streamed, "hello%s", a);
    int ok = body_is(&r[0], "GET /later?ms=40 0 -\n") && body_is(&r[1], "POST /echo?n=2 4 -\nbody") &&
             body_is(&r[2], streamed) && body_is(&r[3], "GET /echo?n=4 0 last\n");
    resp_free(r, 4);
    CHECK(ok);
    CHECK_EQ_INT(nrequests, 4);
    CHECK_EQ_INT(nlater_fired, 1);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    CHECK_EQ_INT(cl->eof, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(pipelined_while_handling)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* the second request arrives in its own read while the first is being
     * handled: it waits, and is handled once the first answer is out */
    static const char req1[] = "GET /later?ms=40 HTTP/1.1\r\nHost: t\r\n\r\n";
    static const char req2[] = "GET /echo?n=2 HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req1, sizeof req1 - 1);
    WAIT(nrequests == 1, 2000);
    client_send_cuts(cl, req2, sizeof req2 - 1, (size_t[]){ 7 }, 1, 5);
    WAIT(client_sent_all(cl) && NRESP(cl) == 2, 2000);
    CHECK_EQ_INT(nrequests, 2);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = body_is(&r[0], "GET /later?ms=40 0 -\n") && body_is(&r[1], "GET /echo?n=2 0 -\n");
    resp_free(r, 2);
    CHECK(ok);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(abort_truncates)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* the pipelined request behind the aborted one is never answered */
    static const char req[] = "GET /abort HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(cl->eof != 0, 2000);
    CHECK_EQ_INT(cl->eof, 1);
    const char *body = find(cl->in.data, cl->in.len, "\r\n\r\n");
    CHECK(body != NULL);
    CHECK_EQ_STR(body + 4, "7\r\npartial\r\n");
    CHECK_EQ_INT(nrequests, 1);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(split_reads)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "POST /echo?q=split HTTP/1.1\r\nHost: t\r\nX-Test: value\r\n"
                              "Content-Length: 10\r\n\r\n0123456789";

    /* one byte at a time */
    unsigned long fast0 = sglr_requests_fast;
    client_send_bytewise(cl, req, sizeof req - 1, 1);
    WAIT(client_sent_all(cl) && NRESP(cl) == 1, 5000);
    CHECK_EQ_INT(sglr_requests_fast, fast0);       /* in pieces: llhttp reads it */

    /* inside the method, the url, a header name, a header value, the
     * CRLF that ends the head, and the body */
    const char *r0 = req;
    size_t cuts[] = {
        2,                                                   /* "PO" | "ST" */
        (size_t)(strstr(r0, "?q=") - r0) + 2,                /* inside the url */
        (size_t)(strstr(r0, "X-Te") - r0) + 4,               /* inside a name */
        (size_t)(strstr(r0, "value") - r0) + 2,              /* inside a value */
        (size_t)(strstr(r0, "\r\n\r\n") - r0) + 1,           /* inside CRLFCRLF */
        (size_t)(strstr(r0, "0123") - r0) + 3,               /* inside the body */
    };
    client_send_cuts(cl, req, sizeof req - 1, cuts, 6, 5);
    WAIT(client_sent_all(cl) && NRESP(cl) == 2, 5000);

    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = r[0].status == 200 && body_is(&r[0], "POST /echo?q=split 10 value\n0123456789") &&
             r[1].status == 200 && body_is(&r[1], "POST /echo?q=split 10 value\n0123456789");
    resp_free(r, 2);
    CHECK(ok);
    CHECK_EQ_INT(nrequests, 2);
    client_close(cl);
    SERVER_DOWN(s);
}

/* Requests sglr_req_fast reads (method, target, fields, body, keep-alive)
 * and those it leaves to llhttp; fuzz_request checks its answers against
 * llhttp's. */
TEST(fast_request_shapes)
{
    static const struct {
        const char *in;
        int fast, method, keep_alive, nhdrs;
        size_t body;
        const char *url;
    } cases[] = {
        { "POST /generate?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}", 1, 3, 1, 2, 2, "/generate?x=1" },
        { "GET /health HTTP/1.1\r\nhost: a\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n", 1, 1, 0, 2, 0, "/health" },
        { "DELETE /w HTTP/1.1\r\nHost: a\r\n\r\n", 1, 0, 1, 1, 0, "/w" },
        { "PATCH /w HTTP/1.1\r\nHost: a\r\nX:\r\n\r\n", 1, 28, 1, 2, 0, "/w" },
        /* left to llhttp */
        { "POST /g HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n{}", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.1\r\n\r\n", 0, 0, 0, 0, 0, NULL },                          /* no Host */
        { "GET /g HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.0\r\nHost: a\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g\r\n", 0, 0, 0, 0, 0, NULL },                                           /* HTTP/0.9 */
        { "GET http://a/g HTTP/1.1\r\nHost: a\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "BREW /g HTTP/1.1\r\nHost: a\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.1\r\nHost: a\r\nVia: 1.1 x\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /g HTTP/1.1\r\nHost: a\r\n: v\r\n\r\n", 0, 0, 0, 0, 0, NULL },               /* empty name */
        { "GET /g HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", 0, 0, 0, 0, 0, NULL },
        { "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 0, 0, 0, 0, 0, NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char in[256];
        size_t n = strlen(cases[i].in);
        memcpy(in, cases[i].in, n + 1);
        sglr_head_t h = { 0 };
        sglr_fast_req_t fr = { 0 };
        size_t used = sglr_req_fast(in, n, 4096, 4096, &h, &fr);
        int ok;
        if (!cases[i].fast) {
            ok = used == 0 && h.nhdrs == 0;
        } else {
            const char *blank = strstr(cases[i].in, "\r\n\r\n");
            size_t hl = (size_t)(blank + 4 - cases[i].in);
            ok = used == hl + cases[i].body && fr.head_len == hl && fr.body_len == cases[i].body &&
                 fr.method == cases[i].method && fr.keep_alive == cases[i].keep_alive &&
                 h.nhdrs == cases[i].nhdrs && h.url_len == strlen(cases[i].url) &&
                 memcmp(h.buf.data + h.url_off, cases[i].url, h.url_len) == 0;
            size_t vl = 0;
            const char *v = sglr_head_get(&h, "host", &vl);
            ok = ok && v && vl == 1 && v[0] == 'a' && memcmp(SGLR_HDR_NAME(&h, 0), "host", 5) == 0;
        }
        if (!ok)
            fprintf(stderr, "case %zu: used %zu\n", i, used);
        sglr_head_free(&h);
        CHECK(ok);
    }
    /* over the head or body limit: llhttp's path answers (431, 413); the
     * head is counted as that path counts it (target 2, then "host" 4 + 4 +
     * 1 and "content-length" 14 + 4 + 1: 30), not by its raw 49 bytes */
    char in[] = "POST /g HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}";
    sglr_head_t h = { 0 };
    sglr_fast_req_t fr;
    CHECK_EQ_INT(sglr_req_fast(in, strlen(in), 29, 4096, &h, &fr), 0);
    CHECK_EQ_INT(sglr_req_fast(in, strlen(in), 30, 4096, &h, &fr), strlen(in));
    sglr_head_reset(&h);
    char tight[] = "GET /g HTTP/1.1\r\nhost:a\r\nx:y\r\n\r\n";    /* no blanks: counts over its bytes */
    CHECK_EQ_INT(sglr_req_fast(tight, strlen(tight), 2 + 9 + 6 - 1, 4096, &h, &fr), 0);
    CHECK_EQ_INT(sglr_req_fast(tight, strlen(tight), 2 + 9 + 6, 4096, &h, &fr), strlen(tight));
    sglr_head_reset(&h);
    CHECK_EQ_INT(sglr_req_fast(in, strlen(in), 4096, 1, &h, &fr), 0);
    CHECK_EQ_INT(sglr_req_fast(in, strlen(in), 4096, 2, &h, &fr), strlen(in));
    sglr_head_free(&h);
}

/* Names are lowercased eight bytes a step while they are letters, digits
 * and '-': every name shape (any length, other tchars anywhere, a ':' at
 * any offset in a step) comes out lowercased to its ':' and no further,
 * values keep their case, and a byte no name may hold leaves the request
 * to llhttp. */
TEST(fast_request_names)
{
    static const char *names[] = {
        "A", "Ab", "X-Y", "ABCDEFG", "ABCDEFGH", "ABCDEFGHI", "Content-Type", "CONTENT-LANGUAGE",
        "X-Request-Id-0123456789", "x_under_SCORE", "X-Custom_Name!~", "A#B$C%D&E'F*G+H.I^J`K|L~M",
        "Sixteen-Chars-Ab", "Fifteen-Chars-A", "X-0123456789-ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char in[512], want[128];
        int n = snprintf(in, sizeof in, "GET /g HTTP/1.1\r\nHost: a\r\n%s: VaLuE-ABCDEFGH\r\n\r\n", names[i]);
        size_t nl = strlen(names[i]);
        for (size_t k = 0; k <= nl; k++)
            want[k] = (char)tolower((unsigned char)names[i][k]);
        sglr_head_t h = { 0 };
        sglr_fast_req_t fr = { 0 };
        size_t used = sglr_req_fast(in, (size_t)n, 4096, 4096, &h, &fr);
        size_t vl = 0;
        const char *v = used ? sglr_head_get(&h, want, &vl) : NULL;
        int ok = used == (size_t)n && h.nhdrs == 2 && strcmp(SGLR_HDR_NAME(&h, 1), want) == 0 && v &&
                 vl == 14 && memcmp(v, "VaLuE-ABCDEFGH", 14) == 0;
        if (!ok)
            fprintf(stderr, "name %s: used %zu\n", names[i], used);
        sglr_head_free(&h);
        CHECK(ok);
    }
    static const char *bad[] = { "X-Na@me", "ABCDEFGH(", "Abcdefgh\x80", "X Y", "ABCDEFGHIJ/" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char in[256];
        int n = snprintf(in, sizeof in, "GET /g HTTP/1.1\r\nHost: a\r\n%s: v\r\n\r\n", bad[i]);
        sglr_head_t h = { 0 };
        sglr_fast_req_t fr = { 0 };
        CHECK_EQ_INT(sglr_req_fast(in, (size_t)n, 4096, 4096, &h, &fr), 0);
        sglr_head_free(&h);
    }
}

TEST(chunked_request_body)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* one extension per chunk: llhttp 8.1 refuses "size;a=b;c=d" */
    static const char req[] = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                              "5;name=val\r\nhello\r\n"
                              "6;ext=\"q v\"\r\n world\r\n"
                              "A\r\n, 10 bytes\r\n"
                              "0\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 1, 2000);

    /* the same, with the chunk framing cut at awkward points */
    const char *r0 = req;
    size_t cuts[] = {
        (size_t)(strstr(r0, "5;na") - r0) + 1,               /* after the size */
        (size_t)(strstr(r0, "name=") - r0) + 3,              /* inside an extension */
        (size_t)(strstr(r0, "hello") - r0) + 2,              /* inside the data */
        (size_t)(strstr(r0, " world\r\n") - r0) + 7,         /* between CR and LF */
        (size_t)(strstr(r0, "0\r\n\r\n") - r0) + 3,          /* inside the last chunk */
    };
    client_send_cuts(cl, req, sizeof req - 1, cuts, 5, 5);
    WAIT(client_sent_all(cl) && NRESP(cl) == 2, 5000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = body_is(&r[0], "POST /echo 21 -\nhello world, 10 bytes") &&
             body_is(&r[1], "POST /echo 21 -\nhello world, 10 bytes");
    resp_free(r, 2);
    CHECK(ok);
    client_close(cl);
    SERVER_DOWN(s);
}

/* The single response of cl is a rejection with this status, the
 * connection is closed after it, and no handler ran. */
#define CHECK_REJECTED(cl, code) do { \
    WAIT((cl)->eof != 0, 2000); \
    resp_t _r[2]; \
    CHECK_EQ_INT(client_responses((cl), _r, 2, 0), 1); \
    char _v[64]; \
    int _st = _r[0].status; \
    const char *_c = resp_header(&_r[0], "connection", _v, sizeof _v); \
    int _close = _c && strcmp(_c, "close") == 0; \
    int _json = find(_r[0].body.data, _r[0].body.len, "invalid_request_error") != NULL; \
    resp_free(_r, 1); \
    CHECK_EQ_INT(_st, (code)); \
    CHECK(_close); \
    CHECK(_json); \
    CHECK_EQ_INT(nrequests, 0); } while (0)

TEST(body_too_large_by_content_length)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* refused on the head alone: the body is never sent */
    static const char req[] = "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    CHECK_REJECTED(cl, 413);
    client_close(cl);

    /* with Expect: 100-continue the refusal comes instead of the 100 */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req2[] = "POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                               "Content-Length: 5000\r\n\r\n";
    client_send(cl, req2, sizeof req2 - 1);
    CHECK_REJECTED(cl, 413);
    client_close(cl);
    WAIT(s->nconns == 0, 2000);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    SERVER_DOWN(s);
}

TEST(body_too_large_chunked)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    /* 400 + 400 bytes fit; the third chunk takes the body past 1000 */
    char data[400];
    memset(data, 'z', sizeof data);
    sglr_buf_t b = { 0 };
    sglr_buf_printf(&b, "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for (int i = 0; i < 2; i++) {
        sglr_buf_printf(&b, "190\r\n");
        sglr_buf_append(&b, data, sizeof data);
        sglr_buf_printf(&b, "\r\n");
    }
    size_t cut = b.len;
    sglr_buf_printf(&b, "190\r\n");
    sglr_buf_append(&b, data, sizeof data);
    sglr_buf_printf(&b, "\r\n0\r\n\r\n");
    client_send_cuts(cl, b.data, b.len, &cut, 1, 20);
    CHECK_REJECTED(cl, 413);
    client_close(cl);

    /* all of it in one write */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    client_send(cl, b.data, b.len);
    sglr_buf_free(&b);
    CHECK_REJECTED(cl, 413);
    client_close(cl);
    WAIT(s->nconns == 0, 2000);
    SERVER_DOWN(s);
}

TEST(headers_too_large)
{
    sglr_server_t *s = server_up(1000, 1024);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    sglr_buf_t b = { 0 };
    sglr_buf_printf(&b, "GET /echo HTTP/1.1\r\nHost: t\r\nX-Big: ");
    for (int i = 0; i < 2000; i++)
        sglr_buf_append(&b, "b", 1);
    sglr_buf_printf(&b, "\r\n\r\n");
    client_send(cl, b.data, b.len);
    sglr_buf_free(&b);
    CHECK_REJECTED(cl, 431);
    client_close(cl);

    /* many small headers add up too */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    b = (sglr_buf_t){ 0 };
    sglr_buf_printf(&b, "GET /echo HTTP/1.1\r\nHost: t\r\n");
    for (int i = 0; i < 150; i++)
        sglr_buf_printf(&b, "X-H%d: v\r\n", i);
    sglr_buf_printf(&b, "\r\n");
    client_send_cuts(cl, b.data, b.len, (size_t[]){ 100, 400, 700 }, 3, 5);
    sglr_buf_free(&b);
    CHECK_REJECTED(cl, 431);
    client_close(cl);

    /* and a head under the limit is fine */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char ok[] = "GET /echo HTTP/1.1\r\nHost: t\r\nX-Test: small\r\n\r\n";
    client_send(cl, ok, sizeof ok - 1);
    WAIT(NRESP(cl) == 1, 2000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    int good = r[0].status == 200;
    resp_free(r, 1);
    CHECK(good);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(malformed_request)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "HELLO WORLD\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    CHECK_REJECTED(cl, 400);
    CHECK(strstr(cl->in.data, "malformed HTTP request") != NULL);
    client_close(cl);

    /* a good request, then garbage in the same write: the good one is
     * answered, then the 400, then the close */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req2[] = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n";
    client_send(cl, req2, sizeof req2 - 1);
    WAIT(cl->eof != 0, 2000);
    resp_t r[3];
    CHECK_EQ_INT(client_responses(cl, r, 3, 0), 2);
    int ok = r[0].status == 200 && body_is(&r[0], "GET /echo 0 -\n") && r[1].status == 400;
    resp_free(r, 2);
    CHECK(ok);
    CHECK_EQ_INT(nrequests, 1);
    client_close(cl);
    WAIT(s->nconns == 0, 2000);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    SERVER_DOWN(s);
}

TEST(http10_closes)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "GET /echo HTTP/1.0\r\nX-Test: ten\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(cl->eof != 0, 2000);
    static const char want[] = "HTTP/1.1 200 OK\r\nx-echo: 1\r\ncontent-length: 16\r\n"
                               "connection: close\r\n\r\nGET /echo 0 ten\n";
    CHECK_EQ_STR(cl->in.data, want);
    CHECK_EQ_INT(cl->eof, 1);
    client_close(cl);

    /* a streamed answer to HTTP/1.0 has no chunked framing: it ends with
     * the connection */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req2[] = "GET /stream HTTP/1.0\r\n\r\n";
    client_send(cl, req2, sizeof req2 - 1);
    WAIT(cl->eof != 0, 2000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    char v[64];
    int ok = r[0].status == 200 && resp_header(&r[0], "transfer-encoding", v, sizeof v) == NULL &&
             resp_header(&r[0], "content-length", v, sizeof v) == NULL &&
             resp_header(&r[0], "connection", v, sizeof v) && strcmp(v, "close") == 0 &&
             r[0].body.len == 305 && memcmp(r[0].body.data, "helloaaa", 8) == 0;
    resp_free(r, 1);
    CHECK(ok);
    client_close(cl);

    /* HTTP/1.0 with keep-alive stays open */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req3[] = "GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    client_send(cl, req3, sizeof req3 - 1);
    WAIT(NRESP(cl) == 1, 2000);
    client_send(cl, req3, sizeof req3 - 1);
    WAIT(NRESP(cl) == 2, 2000);
    CHECK_EQ_INT(cl->eof, 0);
    /* an HTTP/1.0 client only keeps the connection when told it may */
    CHECK(strstr(cl->in.data, "connection: keep-alive\r\n") != NULL);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(expect_100_continue)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char head[] = "POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    client_send(cl, head, sizeof head - 1);
    WAIT(cl->in.len >= sizeof cont - 1, 2000);
    CHECK_EQ_STR(cl->in.data, cont);
    CHECK_EQ_INT(nrequests, 0);
    client_send(cl, "abcde", 5);
    WAIT(NRESP(cl) == 2, 2000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = r[0].status == 100 && r[1].status == 200 && body_is(&r[1], "POST /echo 5 -\nabcde");
    resp_free(r, 2);
    CHECK(ok);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(chunked_response)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "GET /stream HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 2, 2000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    /* on the wire: hex sizes, each chunk closed by CRLF, the empty write
     * produced nothing, then the terminating 0 chunk */
    sglr_buf_t want = { 0 };
    sglr_buf_printf(&want, "5\r\nhello\r\n12c\r\n");
    for (int i = 0; i < 300; i++)
        sglr_buf_append(&want, "a", 1);
    sglr_buf_printf(&want, "\r\n0\r\n\r\n");
    char v[64];
    int ok = r[0].status == 200 && r[0].raw_len == want.len &&
             memcmp(cl->in.data + r[0].raw_off, want.data, want.len) == 0 &&
             resp_header(&r[0], "transfer-encoding", v, sizeof v) && strcmp(v, "chunked") == 0 &&
             resp_header(&r[0], "content-type", v, sizeof v) && strcmp(v, "text/plain") == 0 &&
             resp_header(&r[0], "content-length", v, sizeof v) == NULL &&
             r[0].body.len == 305 && body_is(&r[1], "GET /echo 0 -\n");
    sglr_buf_free(&want);
    resp_free(r, 2);
    CHECK(ok);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(client_gone_while_pending)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "GET /later?ms=60 HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(nrequests == 1, 2000);
    CHECK_EQ_INT(sglr_exchanges_active, 1);
    client_close(cl);
    /* the server sees the close first: the owner is told, the count drops */
    WAIT(s->nconns == 0, 2000);
    CHECK_EQ_INT(nclose_cb, 1);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    CHECK_EQ_INT(nlater_fired, 0);
    /* then the late answer finds the exchange closed and goes nowhere */
    WAIT(nlater_fired == 1, 2000);
    CHECK_EQ_INT(nlater_closed, 1);
    CHECK(later_rc < 0);
    CHECK_EQ_INT(sglr_exchanges_active, 0);

    /* the same while a chunked answer is half written */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req2[] = "GET /stream-later?ms=60 HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req2, sizeof req2 - 1);
    WAIT(find(cl->in.data, cl->in.len, "5\r\nfirst\r\n") != NULL, 2000);
    CHECK_EQ_INT(sglr_exchanges_active, 1);
    client_close(cl);
    WAIT(s->nconns == 0, 2000);
    CHECK_EQ_INT(nclose_cb, 2);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    WAIT(nlater_fired == 2, 2000);
    CHECK_EQ_INT(nlater_closed, 2);
    CHECK(later_rc < 0);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    SERVER_DOWN(s);
}

TEST(client_reset_mid_request)
{
    sglr_server_t *s = server_up(1000, 4096);
    /* the request and the reset reach the server together: it reads the
     * head, wants to say 100 Continue to a socket that is gone, and must
     * neither crash nor hand the half request to the handler */
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected && s->nconns == 1, 2000);
    static const char req[] = "POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                              "Content-Length: 10\r\n\r\n01234";
    client_send(cl, req, sizeof req - 1);
    client_reset(cl);
    WAIT(s->nconns == 0, 2000);
    CHECK_EQ_INT(nrequests, 0);

    /* a whole request, answered into the reset */
    cl = client_new(sglr_server_port(s));
    WAIT(cl->connected && s->nconns == 1, 2000);
    static const char req2[] = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\nGET /stream HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req2, sizeof req2 - 1);
    client_reset(cl);
    WAIT(s->nconns == 0, 2000);
    CHECK(nrequests <= 2);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    SERVER_DOWN(s);
}

TEST(stream_later_completes)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "GET /stream-later?ms=20 HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 2, 2000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(cl, r, 2, 0), 2);
    int ok = body_is(&r[0], "firstsecond") && body_is(&r[1], "GET /echo 0 -\n");
    resp_free(r, 2);
    CHECK(ok);
    CHECK_EQ_INT(later_rc, 0);
    CHECK_EQ_INT(nclose_cb, 0);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(stop_closes_idle)
{
    sglr_server_t *s = server_up(1000, 4096);
    int port = sglr_server_port(s);
    /* idle: one answered request, kept alive */
    client_t *idle = client_new(port);
    WAIT(idle->connected, 2000);
    static const char req[] = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(idle, req, sizeof req - 1);
    WAIT(NRESP(idle) == 1, 2000);
    size_t idle_bytes = idle->in.len;
    /* busy: its answer is 80 ms away */
    client_t *busy = client_new(port);
    WAIT(busy->connected, 2000);
    static const char req2[] = "GET /later?ms=80 HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(busy, req2, sizeof req2 - 1);
    WAIT(nrequests == 2, 2000);
    CHECK_EQ_INT(s->nconns, 2);

    int closed = nserver_closed;
    sglr_server_stop(s, server_closed_cb);
    WAIT(idle->eof != 0, 2000);
    /* the owner may free the server only after its last connection */
    CHECK_EQ_INT(nserver_closed, closed);
    CHECK_EQ_INT(idle->in.len, idle_bytes);
    CHECK_EQ_INT(busy->eof, 0);
    CHECK_EQ_INT(nlater_fired, 0);

    /* the listener is gone */
    client_t *late = client_new(port);
    WAIT(late->connected != 0, 2000);
    CHECK(late->connected < 0);
    client_close(late);

    /* the busy connection gets its answer, marked close, then the close */
    WAIT(busy->eof != 0, 2000);
    resp_t r[2];
    CHECK_EQ_INT(client_responses(busy, r, 2, 0), 1);
    char v[64];
    int ok = r[0].status == 200 && body_is(&r[0], "GET /later?ms=80 0 -\n") &&
             resp_header(&r[0], "connection", v, sizeof v) && strcmp(v, "close") == 0;
    resp_free(r, 1);
    CHECK(ok);
    WAIT(s->nconns == 0 && nserver_closed == closed + 1, 2000);
    CHECK_EQ_INT(sglr_exchanges_active, 0);
    client_close(idle);
    client_close(busy);
    free(s);
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void count_walk_cb(uv_handle_t *h, void *arg)
{
    if (h != (uv_handle_t *)&guard)
        (*(int *)arg)++;
}

static int handles_left(void)
{
    int n = 0;
    uv_walk(&loop, count_walk_cb, &n);
    return n;
}


TEST(header_timeout_answers_408)
{
    next_opts.header_timeout_ms = 50;
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char part[] = "GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: ";
    client_send(cl, part, sizeof part - 1);     /* and never the rest */
    WAIT(cl->eof != 0, 3000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    int st = r[0].status;
    resp_free(r, 1);
    CHECK_EQ_INT(st, 408);
    CHECK_EQ_INT(nrequests, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(stalled_body_answers_408)
{
    next_opts.body_timeout_ms = 50;
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char part[] = "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc";
    client_send(cl, part, sizeof part - 1);
    WAIT(cl->eof != 0, 3000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    int st = r[0].status;
    resp_free(r, 1);
    CHECK_EQ_INT(st, 408);
    CHECK_EQ_INT(nrequests, 0);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(idle_keepalive_is_closed)
{
    next_opts.keepalive_timeout_ms = 50;
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 1, 2000);
    CHECK_EQ_INT(cl->eof, 0);
    WAIT(cl->eof != 0, 3000);              /* closed by the server, unanswered */
    CHECK_EQ_INT(NRESP(cl), 1);
    client_close(cl);
    SERVER_DOWN(s);
}

/* A client that sends requests and reads none of the answers holds back the
 * next request (and its reading) while 1 MB of answers is unsent; reading
 * again, it gets every answer. */
TEST(pipelining_without_reading_is_paused)
{
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    uv_read_stop((uv_stream_t *)&cl->tcp);
    sglr_buf_t b = { 0 };
    for (int i = 0; i < 64; i++)
        sglr_buf_printf(&b, "GET /big?i=%d HTTP/1.1\r\nHost: t\r\n\r\n", i);
    client_send(cl, b.data, b.len);
    sglr_buf_free(&b);
    /* 64 answers are 32 MB; the server stops after a few */
    WAIT(nrequests >= 2, 2000);
    for (int i = 0; i < 20; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    int held = nrequests;
    CHECK(held < 16);
    uv_read_start((uv_stream_t *)&cl->tcp, client_alloc_cb, client_read_cb);
    WAIT(nrequests == 64, 10000);
    WAIT(cl->in.len >= 64u * (512u << 10), 10000);
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(stalled_reader_is_cut_off)
{
    next_opts.write_timeout_ms = 50;
    sglr_server_t *s = server_up(1000, 4096);
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    uv_read_stop((uv_stream_t *)&cl->tcp);
    /* more than the kernel's socket buffers take, so the server queues */
    sglr_buf_t b = { 0 };
    for (int i = 0; i < 32; i++)
        sglr_buf_printf(&b, "GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    client_send(cl, b.data, b.len);
    sglr_buf_free(&b);
    WAIT(nrequests >= 1, 2000);
    WAIT(s->nconns == 0, 4000);            /* the server gave up on it */
    client_close(cl);
    SERVER_DOWN(s);
}

TEST(max_connections_answers_503)
{
    next_opts.max_conns = 2;
    sglr_server_t *s = server_up(1000, 4096);
    client_t *a = client_new(sglr_server_port(s));
    client_t *b = client_new(sglr_server_port(s));
    WAIT(a->connected && b->connected && s->nconns == 2, 2000);
    client_t *c = client_new(sglr_server_port(s));
    WAIT(c->eof != 0, 2000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(c, r, 1, 0), 1);
    int st = r[0].status;
    resp_free(r, 1);
    CHECK_EQ_INT(st, 503);
    CHECK_EQ_INT(s->refused, 1);
    /* the two below the cap are served */
    static const char req[] = "GET /echo HTTP/1.1\r\nHost: t\r\n\r\n";
    client_send(a, req, sizeof req - 1);
    WAIT(NRESP(a) == 1, 2000);
    client_close(a);
    client_close(b);
    client_close(c);
    SERVER_DOWN(s);
}

/* Requests a strict server refuses with 400 instead of guessing. */
TEST(http_hygiene)
{
    static const char *const bad[] = {
        "GET /echo HTTP/1.1\r\n\r\n",                                   /* no Host */
        "GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",           /* two */
        "GET /echo\r\n",                                                  /* HTTP/0.9 */
        "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabcXX0\r\n\r\n",                                        /* chunk without CRLF */
        "GET /echo HTTP/1.1\r\nHost: t\r\n: empty\r\n\r\n",           /* empty header name */
    };
    sglr_server_t *s = server_up(1000, 4096);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        client_t *cl = client_new(sglr_server_port(s));
        WAIT(cl->connected, 2000);
        client_send(cl, bad[i], strlen(bad[i]));
        WAIT(cl->eof != 0, 2000);
        resp_t r[1];
        int n = client_responses(cl, r, 1, 0);
        int st = n == 1 ? r[0].status : -1;
        if (n > 0)
            resp_free(r, n);
        if (st != 400)
            fprintf(stderr, "request %zu: status %d\n", i, st);
        CHECK_EQ_INT(st, 400);
        client_close(cl);
    }
    CHECK_EQ_INT(nrequests, 0);
    /* chunked trailers are dropped, not merged into the headers */
    client_t *cl = client_new(sglr_server_port(s));
    WAIT(cl->connected, 2000);
    static const char req[] = "POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                              "3\r\nabc\r\n0\r\nX-Test: trailer\r\n\r\n";
    client_send(cl, req, sizeof req - 1);
    WAIT(NRESP(cl) == 1, 2000);
    resp_t r[1];
    CHECK_EQ_INT(client_responses(cl, r, 1, 0), 1);
    int ok = r[0].status == 200 && body_is(&r[0], "POST /echo 3 -\nabc");
    resp_free(r, 1);
    CHECK(ok);
    client_close(cl);
    SERVER_DOWN(s);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);   /* a peer that closed first is a result, not a crash */
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    uv_timer_init(&loop, &guard);

    RUN(get_simple);
    RUN(post_content_length);
    RUN(head_request_has_no_body);
    RUN(keep_alive);
    RUN(pipelined_in_order);
    RUN(pipelined_while_handling);
    RUN(abort_truncates);
    RUN(split_reads);
    RUN(fast_request_shapes);
    RUN(fast_request_names);
    RUN(chunked_request_body);
    RUN(body_too_large_by_content_length);
    RUN(body_too_large_chunked);
    RUN(headers_too_large);
    RUN(malformed_request);
    RUN(http10_closes);
    RUN(expect_100_continue);
    RUN(chunked_response);
    RUN(client_gone_while_pending);
    RUN(client_reset_mid_request);
    RUN(stream_later_completes);
    RUN(stop_closes_idle);
    RUN(header_timeout_answers_408);
    RUN(stalled_body_answers_408);
    RUN(idle_keepalive_is_closed);
    RUN(pipelining_without_reading_is_paused);
    RUN(stalled_reader_is_cut_off);
    RUN(max_connections_answers_503);
    RUN(http_hygiene);

    /* Drain: every handle closed, every close callback run, so that the
     * leak checker sees what the engine freed. A failed case may have left
     * handles behind: close those bluntly rather than hang. */
    sglr_clock_stop();
    sglr_server_shutdown();
    guard_fired = 0;
    uv_timer_start(&guard, guard_cb, 2000, 0);
    while (handles_left() && !guard_fired)
        uv_run(&loop, UV_RUN_ONCE);
    if (handles_left()) {
        fprintf(stderr, "%d handles left open\n", handles_left());
        test_failures++;
        uv_walk(&loop, close_walk_cb, NULL);
    }
    if (!uv_is_closing((uv_handle_t *)&guard))
        uv_close((uv_handle_t *)&guard, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) {
        fprintf(stderr, "loop did not close\n");
        test_failures++;
    }
    TEST_EXIT();
}
