/*
 * test_proxy.c: the proxy engine (core/proxy.c): one client exchange, one or
 * more upstream legs, everything on one loop:
 *
 *   raw client --> sglr server --on_request--> px --leg i--> raw backend
 *
 * The backend answers by path:
 *
 *   /ok       200 "hello" (content-length)
 *   /err      500 "bad"
 *   /stream   200 chunked "part1", then waits for backend_cut or
 *             backend_end (test-driven)
 *   /big      200 with BIG bytes
 *   /hang     nothing              /drop   closes without answering
 *
 * What the owner does is in `plan`: which leg gets piped at its head (the
 * others are read), whether a failed leg cancels the others, and whether
 * the owner frees everything from inside on_end (re-entrancy). Callbacks
 * are recorded in `ev`. Every wait runs under a guard timer.
 */
#include "test.h"
#include "proxy.h"
#include "sglr.h"

#include <signal.h>

static uv_loop_t loop;
static uv_timer_t guard;
static int guard_fired;

static void guard_cb(uv_timer_t *t)
{
    guard_fired = 1;
}

#define WAIT(cond, ms) do { \
    guard_fired = 0; \
    uv_timer_start(&guard, guard_cb, (ms), 0); \
    while (!(cond) && !guard_fired) \
        uv_run(&loop, UV_RUN_ONCE); \
    uv_timer_stop(&guard); \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: timed out waiting for %s\n", __FILE__, __LINE__, #cond); \
        test_failures++; return; } } while (0)

#define BIG (8u << 20)

/* --- the backend --------------------------------------------------------------- */

typedef struct bpeer {
    uv_tcp_t tcp;
    sglr_buf_t in;
    int streaming;
    struct bpeer *next;
} bpeer_t;

static uv_tcp_t backend;
static int backend_port;
static int backend_open;        /* connections open on the backend side */
static bpeer_t *bpeers;

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

static void write_cb(uv_write_t *w, int status)
{
    free(w);
}

static void raw_write(uv_stream_t *s, const char *d, size_t n)
{
    uv_write_t *w = malloc(sizeof *w + n);
    memcpy(w + 1, d, n);
    uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)n);
    if (uv_write(w, s, &b, 1, write_cb) < 0)
        free(w);
}

static void bpeer_closed_cb(uv_handle_t *h)
{
    bpeer_t *p = h->data;
    for (bpeer_t **pp = &bpeers; *pp; pp = &(*pp)->next)
        if (*pp == p) {
            *pp = p->next;
            break;
        }
    backend_open--;
    sglr_buf_free(&p->in);
    free(p);
}

static void bpeer_close(bpeer_t *p)
{
    if (!uv_is_closing((uv_handle_t *)&p->tcp))
        uv_close((uv_handle_t *)&p->tcp, bpeer_closed_cb);
}

static void bpeer_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    bpeer_t *p = s->data;
    if (nread > 0)
        sglr_buf_append(&p->in, buf->base, (size_t)nread);
    free(buf->base);
    if (nread < 0) {
        bpeer_close(p);
        return;
    }
    /* requests here have small bodies: answer once the head is in */
    if (!p->in.len || !memmem(p->in.data, p->in.len, "\r\n\r\n", 4))
        return;
    const char *path = p->in.data + strcspn(p->in.data, " ") + 1;
    if (strncmp(path, "/ok ", 4) == 0) {
        static const char r[] = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-leg: ok\r\n\r\nhello";
        raw_write(s, r, sizeof r - 1);
    } else if (strncmp(path, "/err ", 5) == 0) {
        static const char r[] = "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 3\r\n\r\nbad";
        raw_write(s, r, sizeof r - 1);
    } else if (strncmp(path, "/stream ", 8) == 0) {
        static const char r[] = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\npart1\r\n";
        raw_write(s, r, sizeof r - 1);
        p->streaming = 1;
    } else if (strncmp(path, "/big ", 5) == 0) {
        sglr_buf_t b = { 0 };
        sglr_buf_printf(&b, "HTTP/1.1 200 OK\r\ncontent-length: %u\r\n\r\n", BIG);
        size_t head = b.len;
        sglr_buf_append(&b, NULL, 0);
        for (size_t i = 0; i < BIG; i++) {
            char c = (char)('a' + i % 26);
            sglr_buf_append(&b, &c, 1);
        }
        raw_write(s, b.data, b.len);
        (void)head;
        sglr_buf_free(&b);
    } else if (strncmp(path, "/drop ", 6) == 0) {
        bpeer_close(p);
        return;
    }
    /* /hang: nothing */
    sglr_buf_reset(&p->in);
}

static void on_backend(uv_stream_t *l, int status)
{
    bpeer_t *p = calloc(1, sizeof *p);
    uv_tcp_init(&loop, &p->tcp);
    p->tcp.data = p;
    backend_open++;
    p->next = bpeers;
    bpeers = p;
    if (status < 0 || uv_accept(l, (uv_stream_t *)&p->tcp) < 0) {
        bpeer_close(p);
        return;
    }
    uv_read_start((uv_stream_t *)&p->tcp, alloc_cb, bpeer_read_cb);
}

/* Streaming peers: end the stream cleanly (end) or reset it (cut). */
static void backend_streams(int end)
{
    for (bpeer_t *p = bpeers; p; p = p->next) {
        if (!p->streaming)
            continue;
        p->streaming = 0;
        if (end) {
            static const char r[] = "5\r\npart2\r\n0\r\n\r\n";
            raw_write((uv_stream_t *)&p->tcp, r, sizeof r - 1);
        } else if (!uv_is_closing((uv_handle_t *)&p->tcp)) {
            uv_tcp_close_reset(&p->tcp, bpeer_closed_cb);
        }
    }
}

/* --- the owner of the proxy ------------------------------------------------------ */

#define MAXLEGS 3

static struct {
    const char *paths[MAXLEGS];
    int nlegs;
    int pipe_leg;           /* piped at its head; -1: none */
    int cancel_on_fail;
    int free_in_end;        /* free every leg and answer from inside on_end */
    int respond_on_fail;    /* answer 502 when a leg fails before the commit */
} plan;

static struct {
    int heads[MAXLEGS], ends[MAXLEGS], err[MAXLEGS];
    sglr_buf_t body[MAXLEGS];
    int requests;
} ev;

static sglr_proxy_t *cur_px;
static sglr_leg_t *cur_legs[MAXLEGS];
static sglr_exchange_t *cur_x;

static void owner_reset(void)
{
    for (int i = 0; i < MAXLEGS; i++)
        sglr_buf_free(&ev.body[i]);
    memset(&ev, 0, sizeof ev);
    memset(&plan, 0, sizeof plan);
    plan.pipe_leg = -1;
}

static int leg_index(sglr_leg_t *leg)
{
    return (int)(intptr_t)leg->data;
}

static void free_all(void)
{
    for (int i = 0; i < plan.nlegs; i++) {
        if (cur_legs[i]) {
            sglr_proxy_leg_free(cur_legs[i]);
            cur_legs[i] = NULL;
        }
    }
    if (cur_x) {
        sglr_exchange_release(cur_x);
        cur_x = NULL;
    }
}

static void on_head(sglr_leg_t *leg)
{
    int i = leg_index(leg);
    ev.heads[i]++;
    if (plan.free_in_end && i == plan.pipe_leg)
        return;         /* keep the head waiting: the failure comes first */
    if (i == plan.pipe_leg) {
        static const char hdr[] = "x-proxied: 1\r\n";
        sglr_proxy_pipe(leg, hdr, sizeof hdr - 1);
    } else {
        sglr_proxy_read(leg);
    }
}

static void on_end(sglr_leg_t *leg, int err)
{
    int i = leg_index(leg);
    ev.ends[i]++;
    ev.err[i] = err;
    sglr_buf_append(&ev.body[i], leg->body.data, leg->body.len);
    sglr_exchange_t *x = cur_x;
    if (err && plan.respond_on_fail && x && x->state == SGLR_X_HANDLING) {
        static const char b[] = "{\"error\":\"leg failed\"}";
        sglr_exchange_respond(x, 502, "", 0, b, sizeof b - 1);
    } else if (err && x && x->state == SGLR_X_STREAMING && i == plan.pipe_leg) {
        sglr_exchange_abort(x);
    }
    if (plan.free_in_end)
        free_all();
}

static void on_request(sglr_exchange_t *x)
{
    ev.requests++;
    cur_x = x;
    sglr_exchange_hold(x);
    cur_px = sglr_proxy_new(x, 0);
    cur_px->cancel_on_fail = plan.cancel_on_fail;
    cur_px->on_head = on_head;
    cur_px->on_end = on_end;
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", backend_port);
    const char *err = NULL;
    sglr_pool_t *pool = sglr_pool_new(url, &err);
    for (int i = 0; i < plan.nlegs; i++) {
        sglr_leg_t *leg = sglr_proxy_leg_new(cur_px, pool);
        leg->data = (void *)(intptr_t)i;
        cur_legs[i] = leg;
        const char *p = plan.paths[i];
        sglr_upreq_build(leg->req, "POST", p, strlen(p), "", 0, x->body.data, x->body.len);
    }
    for (int i = 0; i < plan.nlegs; i++)
        sglr_proxy_leg_start(cur_legs[i], 1000, 5000);
    sglr_proxy_release(cur_px);
    sglr_pool_unref(pool);
}

/* --- the client ------------------------------------------------------------------- */

typedef struct {
    uv_tcp_t tcp;
    uv_connect_t creq;
    sglr_buf_t in;
    int eof, closed;
} client_t;

static void client_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    client_t *c = s->data;
    if (nread > 0)
        sglr_buf_append(&c->in, buf->base, (size_t)nread);
    else if (nread < 0) {
        c->eof = 1;
        uv_read_stop(s);
    }
    free(buf->base);
}

static void client_connect_cb(uv_connect_t *req, int status)
{
    client_t *c = req->data;
    static const char r[] = "POST /generate HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
    if (status < 0) {
        c->eof = 1;
        return;
    }
    raw_write((uv_stream_t *)&c->tcp, r, sizeof r - 1);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, client_read_cb);
}

static client_t *client_new(int port)
{
    client_t *c = calloc(1, sizeof *c);
    uv_tcp_init(&loop, &c->tcp);
    c->tcp.data = c->creq.data = c;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", port, &a);
    uv_tcp_connect(&c->creq, &c->tcp, (struct sockaddr *)&a, client_connect_cb);
    return c;
}

static void client_closed_cb(uv_handle_t *h)
{
    client_t *c = h->data;
    c->closed = 1;
}

static void client_free(client_t *c)
{
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
        uv_close((uv_handle_t *)&c->tcp, client_closed_cb);
    while (!c->closed)
        uv_run(&loop, UV_RUN_ONCE);
    sglr_buf_free(&c->in);
    free(c);
}

static int got(const client_t *c, const char *s)
{
    return c->in.len && memmem(c->in.data, c->in.len, s, strlen(s)) != NULL;
}

/* --- cases -------------------------------------------------------------------------- */

static sglr_server_t server;
static int server_port;

/* The exchange and every leg are gone once the client has its answer. */
#define SETTLE() do { \
    WAIT(cur_x == NULL || cur_x->state == SGLR_X_DONE || cur_x->conn == NULL, 2000); \
    free_all(); } while (0)

TEST(two_legs_one_streamed)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/ok";
    plan.paths[1] = "/stream";
    plan.pipe_leg = 1;
    client_t *c = client_new(server_port);
    WAIT(got(c, "part1") && ev.ends[0] == 1, 2000);
    CHECK(got(c, "HTTP/1.1 200"));
    CHECK(got(c, "x-proxied: 1"));
    CHECK_EQ_INT(ev.err[0], 0);
    CHECK_EQ_INT(ev.body[0].len, 5);
    CHECK(memcmp(ev.body[0].data, "hello", 5) == 0);
    CHECK_EQ_INT(ev.ends[1], 0);
    backend_streams(1);
    WAIT(ev.ends[1] == 1 && got(c, "0\r\n\r\n"), 2000);
    CHECK_EQ_INT(ev.err[1], 0);
    CHECK(got(c, "part2"));
    CHECK_EQ_INT(ev.heads[0], 1);
    CHECK_EQ_INT(ev.heads[1], 1);
    SETTLE();
    client_free(c);
}

TEST(leg_fails_before_head_cancels_the_other)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/drop";
    plan.paths[1] = "/hang";
    plan.pipe_leg = 1;
    plan.cancel_on_fail = 1;
    plan.respond_on_fail = 1;
    client_t *c = client_new(server_port);
    WAIT(ev.ends[0] == 1 && ev.ends[1] == 1, 2000);
    CHECK_EQ_INT(ev.err[0], SGLR_UP_ERESET);
    CHECK_EQ_INT(ev.err[1], SGLR_PROXY_ECANCEL);
    WAIT(got(c, "HTTP/1.1 502"), 2000);
    /* the hanging leg's connection was closed, not left to time out */
    WAIT(backend_open == 0, 2000);
    CHECK_EQ_INT(ev.heads[0] + ev.heads[1], 0);
    SETTLE();
    client_free(c);
}

TEST(an_error_status_is_not_a_leg_failure)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/err";
    plan.paths[1] = "/ok";
    plan.pipe_leg = 1;
    plan.cancel_on_fail = 1;
    client_t *c = client_new(server_port);
    WAIT(ev.ends[0] == 1 && ev.ends[1] == 1, 2000);
    CHECK_EQ_INT(ev.err[0], 0);
    CHECK_EQ_INT(cur_legs[0]->req->status, 500);
    CHECK_EQ_INT(ev.err[1], 0);
    WAIT(got(c, "hello"), 2000);
    SETTLE();
    client_free(c);
}

TEST(piped_leg_fails_after_head)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/hang";
    plan.paths[1] = "/stream";
    plan.pipe_leg = 1;
    plan.cancel_on_fail = 1;
    client_t *c = client_new(server_port);
    WAIT(got(c, "part1"), 2000);
    backend_streams(0);
    WAIT(ev.ends[1] == 1 && ev.ends[0] == 1, 2000);
    CHECK_EQ_INT(ev.err[1], SGLR_UP_ERESET);
    CHECK_EQ_INT(ev.err[0], SGLR_PROXY_ECANCEL);
    /* the owner aborted the stream: the client sees a truncated response */
    WAIT(c->eof, 2000);
    CHECK(!got(c, "0\r\n\r\n"));
    WAIT(backend_open == 0, 2000);
    SETTLE();
    client_free(c);
}

TEST(without_cancel_on_fail_the_other_leg_runs_on)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/drop";
    plan.paths[1] = "/ok";
    plan.pipe_leg = 1;
    client_t *c = client_new(server_port);
    WAIT(ev.ends[0] == 1 && ev.ends[1] == 1, 2000);
    CHECK_EQ_INT(ev.err[0], SGLR_UP_ERESET);
    CHECK_EQ_INT(ev.err[1], 0);
    WAIT(got(c, "hello"), 2000);
    SETTLE();
    client_free(c);
}

TEST(client_gone_mid_stream_ends_every_leg)
{
    owner_reset();
    plan.nlegs = 2;
    plan.paths[0] = "/hang";
    plan.paths[1] = "/stream";
    plan.pipe_leg = 1;
    client_t *c = client_new(server_port);
    WAIT(got(c, "part1"), 2000);
    uv_tcp_close_reset(&c->tcp, client_closed_cb);
    WAIT(ev.ends[0] == 1 && ev.ends[1] == 1, 2000);
    CHECK_EQ_INT(ev.err[0], SGLR_PROXY_ECLIENT);
    CHECK_EQ_INT(ev.err[1], SGLR_PROXY_ECLIENT);
    WAIT(backend_open == 0, 2000);
    free_all();
    client_free(c);
}

TEST(backpressure_pauses_the_piped_leg)
{
    owner_reset();
    plan.nlegs = 1;
    plan.paths[0] = "/big";
    plan.pipe_leg = 0;
    client_t *c = client_new(server_port);
    /* read only the head, then stop reading: the router's queue fills */
    WAIT(got(c, "HTTP/1.1 200"), 2000);
    uv_read_stop((uv_stream_t *)&c->tcp);
    WAIT(cur_legs[0] && cur_legs[0]->req && cur_legs[0]->req->throttled, 5000);
    CHECK(sglr_exchange_write_queue(cur_x) > SGLR_WRITE_HIGH / 2);
    CHECK(sglr_exchange_write_queue(cur_x) < BIG);
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, client_read_cb);
    WAIT(ev.ends[0] == 1, 10000);
    CHECK_EQ_INT(ev.err[0], 0);
    WAIT(c->in.len >= BIG, 10000);
    SETTLE();
    client_free(c);
}

TEST(owner_frees_everything_inside_on_end)
{
    owner_reset();
    plan.nlegs = 3;
    plan.paths[0] = "/hang";
    plan.paths[1] = "/drop";
    plan.paths[2] = "/stream";
    plan.pipe_leg = 2;
    plan.cancel_on_fail = 1;
    plan.respond_on_fail = 1;
    plan.free_in_end = 1;
    client_t *c = client_new(server_port);
    WAIT(got(c, "HTTP/1.1 502"), 2000);
    /* the first failure freed every leg: no callback for the others */
    CHECK_EQ_INT(ev.ends[0] + ev.ends[1] + ev.ends[2], 1);
    WAIT(backend_open == 0, 2000);
    client_free(c);
}

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void server_closed_cb(sglr_server_t *s)
{
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    uv_timer_init(&loop, &guard);
    uv_tcp_init(&loop, &backend);
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_bind(&backend, (struct sockaddr *)&a, 0);
    uv_listen((uv_stream_t *)&backend, 64, on_backend);
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_tcp_getsockname(&backend, (struct sockaddr *)&ss, &len);
    backend_port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    sglr_server_opts_t o = { .max_body = 1 << 20, .max_header = 16 << 10 };
    if (sglr_server_init(&server, "127.0.0.1", 0, &o, on_request, NULL) < 0)
        return 1;
    server_port = sglr_server_port(&server);

    RUN(two_legs_one_streamed);
    RUN(leg_fails_before_head_cancels_the_other);
    RUN(an_error_status_is_not_a_leg_failure);
    RUN(piped_leg_fails_after_head);
    RUN(without_cancel_on_fail_the_other_leg_runs_on);
    RUN(client_gone_mid_stream_ends_every_leg);
    RUN(backpressure_pauses_the_piped_leg);
    RUN(owner_frees_everything_inside_on_end);

    owner_reset();
    sglr_server_stop(&server, server_closed_cb);
    sglr_server_shutdown();
    sglr_upstream_release_spares();
    for (bpeer_t *p = bpeers; p; p = p->next)
        bpeer_close(p);
    uv_close((uv_handle_t *)&backend, NULL);
    uv_close((uv_handle_t *)&guard, NULL);
    for (int i = 0; i < 50 && uv_loop_alive(&loop); i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    uv_walk(&loop, close_walk_cb, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    TEST_EXIT();
}
