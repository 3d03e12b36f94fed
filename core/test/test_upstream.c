/*
 * test_upstream.c: the upstream client (core/upstream.c) against a raw TCP
 * server that runs on the same loop and answers by the last segment of the
 * request path:
 *
 *   ok         200, content-length 5 "hello", x-a: b
 *   chunked    200 chunked "hello" now, " world" 10 ms later, the end at 20 ms
 *   empty      200 content-length 0            nocontent  204
 *   nocontentte  204 that says transfer-encoding: chunked, "body" bytes, close
 *   eof        200 without length: "until close", then the close
 *   continue   100 Continue, then 200 "ok"
 *   closehdr   200 "ok" with connection: close
 *   extra      200 "ok" and stray bytes after it
 *   bye        200 "ok" kept alive, then the server closes the idle connection
 *   stale      "ok" for the first request of a connection; on a later one the
 *              connection is closed unanswered (the keep-alive race)
 *   hang       never answers               slow   head and 5 of 10 bytes, then nothing
 *   cut        head for 100 bytes, 10 bytes, then a clean close
 *   rst        the same, then a reset
 *   big        200 with 256 KiB of a pattern     huge   the same with 3 MiB
 *   early      answers "ok" as soon as the head is in, then stops reading
 *              (a worker that refuses a body it has not read)
 *
 * Every wait runs under a guard timer: a bug fails a check instead of
 * hanging the run.
 */
#include "test.h"
#include "upstream.h"
#include "sglr.h"

#include <errno.h>
#include <signal.h>
#include <strings.h>

static uv_loop_t loop;

/* --- waiting -------------------------------------------------------------- */

static uv_timer_t guard;
static int guard_left;
static void guard_tick_cb(uv_timer_t *t);
static int guard_fired;

static void guard_cb(uv_timer_t *t)
{
    guard_fired = 1;
}

static void guard_tick_cb(uv_timer_t *t)
{
    if (--guard_left <= 0)
        guard_fired = 1;
}

/* The guard repeats every 5 ms so that a condition met by a timer callback
 * (the engine recycles freed requests from a 0 ms timer) is seen at once
 * instead of after the poll that follows it. */
#define WAIT(cond, ms) do { \
    guard_fired = 0; \
    guard_left = (ms) / 5 + 1; \
    uv_timer_start(&guard, guard_tick_cb, 5, 5); \
    while (!(cond) && !guard_fired) \
        uv_run(&loop, UV_RUN_ONCE); \
    uv_timer_stop(&guard); \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: timed out waiting for %s\n", __FILE__, __LINE__, #cond); \
        test_failures++; return; } } while (0)

/* --- the raw server ------------------------------------------------------------ */

typedef struct peer {
    uv_tcp_t tcp;
    sglr_buf_t in;
    int nreq;                /* requests seen on this connection */
    int refs;                /* the handle + pending delayed writes */
    int closing;
    int paused;              /* stopped reading (early) */
    int draining;            /* resumed: discard what comes */
    struct peer *prev, *next;
} peer_t;

static uv_tcp_t lsn;
static int port;
static int accepts;          /* connections accepted */
static int npeers;           /* connections open on the server side */
static int nreqs;            /* requests seen */
static peer_t *peers;
static sglr_buf_t last_req;  /* bytes of the last request seen */
static size_t drained;       /* bytes discarded by draining peers */

static void peer_unref(peer_t *p)
{
    if (--p->refs == 0) {
        sglr_buf_free(&p->in);
        free(p);
    }
}

static void peer_closed_cb(uv_handle_t *h)
{
    peer_t *p = h->data;
    npeers--;
    peer_unref(p);
}

static void peer_close(peer_t *p)
{
    if (p->closing)
        return;
    p->closing = 1;
    if (p->prev)
        p->prev->next = p->next;
    else
        peers = p->next;
    if (p->next)
        p->next->prev = p->prev;
    uv_close((uv_handle_t *)&p->tcp, peer_closed_cb);
}

static void peer_write_cb(uv_write_t *w, int status)
{
    free(w);
}

static void peer_write(peer_t *p, const char *data, size_t len)
{
    if (p->closing)
        return;
    uv_write_t *w = malloc(sizeof *w + len);
    memcpy(w + 1, data, len);
    uv_buf_t b = uv_buf_init((char *)(w + 1), (unsigned)len);
    uv_write(w, (uv_stream_t *)&p->tcp, &b, 1, peer_write_cb);
}

static void peer_shutdown_cb(uv_shutdown_t *req, int status)
{
    peer_t *p = req->data;
    free(req);
    peer_close(p);
    peer_unref(p);
}

/* Close once the queued writes are out (a clean FIN). */
static void peer_end(peer_t *p)
{
    if (p->closing)
        return;
    uv_shutdown_t *req = malloc(sizeof *req);
    req->data = p;
    p->refs++;
    if (uv_shutdown(req, (uv_stream_t *)&p->tcp, peer_shutdown_cb) < 0) {
        free(req);
        peer_close(p);
        peer_unref(p);
    }
}

typedef struct {
    uv_timer_t timer;
    peer_t *p;
    int end;                 /* 1: clean close, 2: reset */
    size_t len;
    char data[];
} later_t;

static void later_closed_cb(uv_handle_t *h)
{
    later_t *l = h->data;
    peer_unref(l->p);
    free(l);
}

static void later_cb(uv_timer_t *t)
{
    later_t *l = t->data;
    peer_t *p = l->p;
    if (!p->closing) {
        if (l->len)
            peer_write(p, l->data, l->len);
        if (l->end == 1)
            peer_end(p);
        else if (l->end == 2) {
            p->closing = 1;
            if (p->prev)
                p->prev->next = p->next;
            else
                peers = p->next;
            if (p->next)
                p->next->prev = p->prev;
            uv_tcp_close_reset(&p->tcp, peer_closed_cb);
        }
    }
    uv_close((uv_handle_t *)&l->timer, later_closed_cb);
}

/* Write data ms from now, then end the connection as end says. */
static void peer_later(peer_t *p, unsigned ms, const char *data, int end)
{
    size_t len = data ? strlen(data) : 0;
    later_t *l = calloc(1, sizeof *l + len);
    l->p = p;
    l->end = end;
    l->len = len;
    if (len)
        memcpy(l->data, data, len);
    p->refs++;
    uv_timer_init(&loop, &l->timer);
    l->timer.data = l;
    uv_timer_start(&l->timer, later_cb, ms, 0);
}

static const char *find(const char *p, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(p + i, needle, k) == 0)
            return p + i;
    return NULL;
}

/* Length of the request head (with its CRLFCRLF) and of the whole request;
 * 0 when the head is incomplete. */
static size_t request_len(const char *p, size_t n, size_t *head_len)
{
    const char *he = find(p, n, "\r\n\r\n");
    if (!he)
        return 0;
    *head_len = (size_t)(he + 4 - p);
    size_t clen = 0;
    for (const char *l = p; l < he; ) {
        const char *e = find(l, (size_t)(he + 2 - l), "\r\n");
        if (e - l > 15 && strncasecmp(l, "content-length:", 15) == 0)
            clen = (size_t)strtoull(l + 15, NULL, 10);
        l = e + 2;
    }
    return *head_len + clen;
}

/* The last segment of the request path: "POST /base/v1/ok?x HTTP/1.1" -> "ok". */
static void route_of(const char *req, char *out, size_t cap)
{
    const char *s = strchr(req, ' ');
    const char *e = s ? strchr(s + 1, ' ') : NULL;
    const char *q = s ? memchr(s + 1, '?', (size_t)(e - s - 1)) : NULL;
    if (q)
        e = q;
    const char *seg = s;
    for (const char *c = s; c && c < e; c++)
        if (*c == '/')
            seg = c;
    size_t n = seg && e ? (size_t)(e - seg - 1) : 0;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, seg ? seg + 1 : "", n);
    out[n] = 0;
}

static const char ok_resp[] = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\nhello";

static void big_body(sglr_buf_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        char c = (char)('a' + (i * 7 + i / 1000) % 26);
        sglr_buf_append(b, &c, 1);
    }
}

/* Answer the request at p->in; returns 0 to go on reading, 1 when the peer is
 * done with its input (closed or paused). */
static int answer(peer_t *p, const char *route, int head_method)
{
    if (strcmp(route, "ok") == 0) {
        /* the answer to HEAD is the same head without the body */
        peer_write(p, ok_resp, sizeof ok_resp - 1 - (head_method ? 5 : 0));
    } else if (strcmp(route, "chunked") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n";
        peer_write(p, h, sizeof h - 1);
        peer_later(p, 10, "6\r\n world\r\n", 0);
        peer_later(p, 20, "0\r\n\r\n", 0);
    } else if (strcmp(route, "splithead") == 0) {
        /* the head in two reads: not whole in the first, so llhttp reads it */
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-";
        peer_write(p, h, sizeof h - 1);
        peer_later(p, 10, "length: 5\r\nx-a: c\r\n\r\nhello", 0);
    } else if (strcmp(route, "empty") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        peer_write(p, h, sizeof h - 1);
    } else if (strcmp(route, "nocontentte") == 0) {
        static const char h[] = "HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n"
                                "A6\r\nabc";
        peer_write(p, h, sizeof h - 1);
        peer_end(p);
        return 1;
    } else if (strcmp(route, "nocontent") == 0) {
        static const char h[] = "HTTP/1.1 204 No Content\r\nx-a: none\r\n\r\n";
        peer_write(p, h, sizeof h - 1);
    } else if (strcmp(route, "eof") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\n\r\nuntil close";
        peer_write(p, h, sizeof h - 1);
        peer_end(p);
        return 1;
    } else if (strcmp(route, "continue") == 0) {
        static const char h[] = "HTTP/1.1 100 Continue\r\n\r\n"
                                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        peer_write(p, h, sizeof h - 1);
    } else if (strcmp(route, "closehdr") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
        peer_write(p, h, sizeof h - 1);
        peer_end(p);
        return 1;
    } else if (strcmp(route, "extra") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK";
        peer_write(p, h, sizeof h - 1);
    } else if (strcmp(route, "bye") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        peer_write(p, h, sizeof h - 1);
        peer_later(p, 10, NULL, 1);
    } else if (strcmp(route, "stale") == 0) {
        if (p->nreq >= 2) {
            peer_close(p);
            return 1;
        }
        peer_write(p, ok_resp, sizeof ok_resp - 1);
    } else if (strcmp(route, "hang") == 0) {
        /* nothing */
    } else if (strcmp(route, "slow") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234";
        peer_write(p, h, sizeof h - 1);
    } else if (strcmp(route, "cut") == 0 || strcmp(route, "rst") == 0) {
        static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789";
        peer_write(p, h, sizeof h - 1);
        peer_later(p, 10, NULL, route[0] == 'c' ? 1 : 2);
    } else if (strcmp(route, "big") == 0 || strcmp(route, "huge") == 0) {
        size_t n = route[0] == 'b' ? 256u << 10 : 3u << 20;
        sglr_buf_t b = { 0 };
        sglr_buf_printf(&b, "HTTP/1.1 200 OK\r\ncontent-length: %zu\r\n\r\n", n);
        big_body(&b, n);
        peer_write(p, b.data, b.len);
        sglr_buf_free(&b);
    } else {
        static const char h[] = "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        peer_write(p, h, sizeof h - 1);
    }
    return 0;
}

static void peer_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

static void peer_read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    peer_t *p = s->data;
    if (nread < 0) {
        free(buf->base);
        peer_close(p);
        return;
    }
    if (p->draining) {
        drained += (size_t)nread;
        free(buf->base);
        return;
    }
    sglr_buf_append(&p->in, buf->base, (size_t)nread);
    free(buf->base);
    for (;;) {
        size_t hl = 0, n = request_len(p->in.data, p->in.len, &hl);
        if (!n)
            return;
        char route[64];
        route_of(p->in.data, route, sizeof route);
        if (strcmp(route, "early") == 0) {
            /* answer on the head alone and read nothing more */
            nreqs++;
            p->nreq++;
            sglr_buf_reset(&last_req);
            sglr_buf_append(&last_req, p->in.data, hl);
            static const char h[] = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            peer_write(p, h, sizeof h - 1);
            uv_read_stop(s);
            p->paused = 1;
            return;
        }
        if (p->in.len < n)
            return;
        nreqs++;
        p->nreq++;
        sglr_buf_reset(&last_req);
        sglr_buf_append(&last_req, p->in.data, n);
        int stop = answer(p, route, strncmp(p->in.data, "HEAD ", 5) == 0);
        if (stop || p->closing)
            return;
        memmove(p->in.data, p->in.data + n, p->in.len - n);
        p->in.len -= n;
    }
}

static void on_peer(uv_stream_t *l, int status)
{
    if (status < 0)
        return;
    peer_t *p = calloc(1, sizeof *p);
    p->refs = 1;
    uv_tcp_init(&loop, &p->tcp);
    p->tcp.data = p;
    if (uv_accept(l, (uv_stream_t *)&p->tcp) < 0) {
        p->closing = 1;
        npeers++;
        uv_close((uv_handle_t *)&p->tcp, peer_closed_cb);
        return;
    }
    accepts++;
    npeers++;
    p->next = peers;
    if (peers)
        peers->prev = p;
    peers = p;
    uv_read_start((uv_stream_t *)&p->tcp, peer_alloc_cb, peer_read_cb);
}

/* Paused peers start reading again and throw away what they get. */
static void peers_drain(void)
{
    for (peer_t *p = peers; p; p = p->next) {
        if (p->paused) {
            p->paused = 0;
            p->draining = 1;
            uv_read_start((uv_stream_t *)&p->tcp, peer_alloc_cb, peer_read_cb);
        }
    }
}

static int free_port(void)
{
    uv_tcp_t t;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(&loop, &t);
    uv_tcp_bind(&t, (struct sockaddr *)&a, 0);
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_tcp_getsockname(&t, (struct sockaddr *)&ss, &len);
    int pt = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    return pt;
}

/* --- the client side ---------------------------------------------------------------- */

typedef struct {
    sglr_upreq_t *r;
    int heads, ndone, err;
    int status;
    long long clen;
    char xa[16];             /* x-a header as seen in on_head */
    int nbody;
    sglr_buf_t body;
    int manual;              /* on_head does not continue: the test does */
    int abort_in_body;       /* abort and free from the first on_body */
    int throttle;            /* throttle on the first on_body; aux resumes */
    int free_in_done;
    int free_in_head;        /* free from on_head instead of continuing */
    int freed;
    uint64_t t_start, t_done;
} call_t;

static call_t calls[4];
static uv_timer_t aux;       /* delayed continue / unthrottle */

static void on_head(sglr_upreq_t *r)
{
    call_t *c = r->data;
    c->heads++;
    c->status = r->status;
    c->clen = r->content_length;
    size_t n = 0;
    const char *v = sglr_head_get(&r->head, "x-a", &n);
    if (v && n < sizeof c->xa) {
        memcpy(c->xa, v, n);
        c->xa[n] = 0;
    }
    if (c->free_in_head) {
        sglr_upreq_free(r);
        c->freed = 1;
        return;
    }
    if (!c->manual)
        sglr_upreq_continue(r);
}

static void aux_unthrottle_cb(uv_timer_t *t)
{
    call_t *c = t->data;
    sglr_upreq_throttle(c->r, 0);
}

static void on_body(sglr_upreq_t *r, const char *d, size_t n)
{
    call_t *c = r->data;
    c->nbody++;
    sglr_buf_append(&c->body, d, n);
    if (c->abort_in_body) {
        sglr_upreq_abort(r);
        sglr_upreq_free(r);
        c->freed = 1;
        return;
    }
    if (c->throttle && c->nbody == 1) {
        sglr_upreq_throttle(r, 1);
        aux.data = c;
        uv_timer_start(&aux, aux_unthrottle_cb, 20, 0);
    }
}

static void on_done(sglr_upreq_t *r, int err)
{
    call_t *c = r->data;
    c->ndone++;
    c->err = err;
    c->t_done = uv_now(&loop);
    if (c->free_in_done) {
        sglr_upreq_free(r);
        c->freed = 1;
    }
}

static call_t *call_reset(int i)
{
    call_t *c = &calls[i];
    sglr_buf_free(&c->body);
    memset(c, 0, sizeof *c);
    return c;
}

static void call_start(call_t *c, sglr_pool_t *pool, const char *method, const char *path,
                       const char *body, unsigned timeout_ms)
{
    c->r = sglr_upreq_new(pool);
    c->r->data = c;
    c->r->on_head = on_head;
    c->r->on_body = on_body;
    c->r->on_done = on_done;
    sglr_upreq_build(c->r, method, path, strlen(path), "x-h: 1\r\n", 8, body,
                     body ? strlen(body) : 0);
    uv_update_time(&loop);
    c->t_start = uv_now(&loop);
    sglr_upreq_start(c->r, 1000, timeout_ms);
}

static void call_free(call_t *c)
{
    if (c->r && !c->freed)
        sglr_upreq_free(c->r);
    c->freed = 1;
}

/* call_start with a connect timeout of its own. */
static void call_start_ct(call_t *c, sglr_pool_t *pool, const char *path, unsigned connect_ms)
{
    c->r = sglr_upreq_new(pool);
    c->r->data = c;
    c->r->on_head = on_head;
    c->r->on_body = on_body;
    c->r->on_done = on_done;
    sglr_upreq_build(c->r, "GET", path, strlen(path), "", 0, NULL, 0);
    uv_update_time(&loop);
    c->t_start = uv_now(&loop);
    sglr_upreq_start(c->r, connect_ms, 5000);
}

static int body_is(const call_t *c, const char *s)
{
    return c->body.len == strlen(s) && (c->body.len == 0 || memcmp(c->body.data, s, c->body.len) == 0);
}

static sglr_pool_t *pool_up(const char *base)
{
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, base);
    const char *err = NULL;
    sglr_pool_t *p = sglr_pool_new(url, &err);
    if (!p) {
        fprintf(stderr, "pool %s: %s\n", url, err);
        exit(1);
    }
    accepts = nreqs = 0;
    return p;
}

/* Wait until only the pool's own and its idle connections' references are
 * left (every request freed), drop the pool, and wait until the server has
 * seen every connection close. */
#define POOL_DOWN(p) do { \
    WAIT(!(p)->resolving && (p)->refs == 1 + (p)->nconns && (p)->nconns == (p)->nidle, 2000); \
    sglr_pool_unref(p); \
    WAIT(npeers == 0, 2000); } while (0)

/* --- cases ---------------------------------------------------------------------------- */

TEST(pool_parse)
{
    static const struct { const char *url, *err; } bad[] = {
        { "https://127.0.0.1:8000", "only http:// workers can use the native client" },
        { "127.0.0.1:8000", "only http:// workers can use the native client" },
        { "http://", "missing host" },
        { "http://:8000", "missing host" },
        { "http://127.0.0.1:", "bad port" },
        { "http://127.0.0.1:0", "bad port" },
        { "http://127.0.0.1:65536", "bad port" },
        { "http://127.0.0.1:-1", "bad port" },
        { "http://127.0.0.1:80x", "bad port" },
        { "http://127.0.0.1:abc/", "bad port" },
        { "http://[::1", "bad IPv6 address" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *err = NULL;
        sglr_pool_t *p = sglr_pool_new(bad[i].url, &err);
        if (p) {
            fprintf(stderr, "  %s parsed\n", bad[i].url);
            sglr_pool_unref(p);
        }
        CHECK(p == NULL);
        CHECK_EQ_STR(err, bad[i].err);
    }

    const char *err = NULL;
    sglr_pool_t *p = sglr_pool_new("http://127.0.0.1:8080/base/v1//", &err);
    CHECK(p != NULL);
    int ok = strcmp(p->url, "http://127.0.0.1:8080/base/v1") == 0 &&
             strcmp(p->hostport, "127.0.0.1:8080") == 0 &&
             strcmp(p->base_path, "/base/v1") == 0 && p->addr.ss_family == AF_INET &&
             ntohs(((struct sockaddr_in *)&p->addr)->sin_port) == 8080 && p->refs == 1;
    sglr_pool_unref(p);
    CHECK(ok);

    p = sglr_pool_new("http://[::1]:9000", &err);
    CHECK(p != NULL);
    ok = strcmp(p->hostport, "[::1]:9000") == 0 && strcmp(p->base_path, "") == 0 &&
         p->addr.ss_family == AF_INET6 &&
         ntohs(((struct sockaddr_in6 *)&p->addr)->sin6_port) == 9000;
    sglr_pool_unref(p);
    CHECK(ok);

    p = sglr_pool_new("http://127.0.0.1", &err);
    CHECK(p != NULL);
    ok = strcmp(p->hostport, "127.0.0.1") == 0 &&
         ntohs(((struct sockaddr_in *)&p->addr)->sin_port) == 80;
    sglr_pool_unref(p);
    CHECK(ok);
}

TEST(content_length)
{
    sglr_pool_t *pool = pool_up("/base/");
    call_t *c = call_reset(0);
    call_start(c, pool, "POST", "/v1/ok", "ping", 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->heads, 1);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, 5);
    CHECK_EQ_STR(c->xa, "b");
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(c->r->fast, 1);          /* the common shape: read without llhttp */
    char want[256];
    snprintf(want, sizeof want, "POST /base/v1/ok HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-h: 1\r\n"
             "content-length: 4\r\n\r\nping", port);
    CHECK_EQ_STR(last_req.data, want);
    /* the connection went back to the pool */
    CHECK_EQ_INT(pool->nconns, 1);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);

    /* a GET without a body carries no content-length */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok?q=1", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    snprintf(want, sizeof want, "GET /base/ok?q=1 HTTP/1.1\r\nhost: 127.0.0.1:%d\r\nx-h: 1\r\n\r\n",
             port);
    CHECK_EQ_STR(last_req.data, want);
    call_free(c);
    POOL_DOWN(pool);
}

/* skip_ok_fields (a PD prefill leg whose success nobody reads the headers
 * of): a 2xx keeps its status and body and the connection is reused, its
 * header fields are not stored; a refusal's fields are. */
TEST(skip_ok_fields)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "POST", "/ok", "ping", 2000);
    c->r->skip_ok_fields = 1;
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, 5);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_STR(c->xa, "");
    CHECK_EQ_INT(c->r->head.nhdrs, 0);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);

    c = call_reset(0);
    call_start(c, pool, "POST", "/missing", "ping", 2000);
    c->r->skip_ok_fields = 1;
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->status, 404);
    size_t n = 0;
    const char *v = sglr_head_get(&c->r->head, "content-length", &n);
    CHECK(v != NULL && n == 1 && v[0] == '0');
    call_free(c);

    /* without the flag a 2xx keeps its fields */
    c = call_reset(0);
    call_start(c, pool, "POST", "/ok", "ping", 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_STR(c->xa, "b");
    call_free(c);
    POOL_DOWN(pool);
}

/* Response heads sglr_resp_head_fast reads (status, content-length,
 * keep-alive, length, fields) and those it leaves to llhttp (0, nothing
 * stored). fuzz_response checks its answers against llhttp's. */
TEST(fast_head_shapes)
{
    static const struct {
        const char *in;
        int fast;                /* 0: left to llhttp; 1: read up to the blank line */
        int status, keep_alive, nhdrs;
        long long cl;
    } cases[] = {
        { "HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nContent-Length: 5\r\n\r\nhello", 1, 200, 1, 2, 5 },
        { "HTTP/1.1 503 Busy\r\ncontent-length: 0\r\nconnection: close\r\n\r\n", 1, 503, 0, 2, 0 },
        { "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", 1, 200, 0, 1, 2 },
        { "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\n", 1, 200, 1, 2, 2 },
        { "HTTP/1.1 200\r\ncontent-length: 1\r\nx:\r\nx-b:  \t v\r\n\r\n", 1, 200, 1, 3, 1 },
        /* left to llhttp */
        { "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\n\r\nuntil close", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n", 0, 0, 0, 0, 0 },                    /* not whole */
        { "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\ncontent-length: 5x\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 5\r\n\r\n", 0, 0, 0, 0, 0 },   /* obs-fold */
        { "HTTP/1.1 200 OK\r\nx y: a\r\ncontent-length: 5\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nx: a \r\ncontent-length: 5\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nx: a\001\r\ncontent-length: 5\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\ncontent-length: 5\n\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nconnection: upgrade\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nupgrade: h2c\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 200 OK\r\nproxy-connection: close\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/2.0 200 OK\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
        { "HTTP/1.1 20 OK\r\ncontent-length: 0\r\n\r\n", 0, 0, 0, 0, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sglr_head_t h = { 0 };
        int status = -1, ka = -1;
        long long cl = -2;
        size_t n = strlen(cases[i].in);
        char in[256];                     /* writable, and a NUL after the bytes */
        memcpy(in, cases[i].in, n + 1);
        size_t used = sglr_resp_head_fast(in, n, 64u << 10, &h, 0, &status, &cl, &ka);
        int nh = h.nhdrs;
        const char *blank = strstr(cases[i].in, "\r\n\r\n");
        size_t want = cases[i].fast ? (size_t)(blank + 4 - cases[i].in) : 0;
        if (used != want)
            fprintf(stderr, "case %zu: used %zu, want %zu\n", i, used, want);
        int ok = used == want && (!used || (status == cases[i].status && ka == cases[i].keep_alive &&
                                            nh == cases[i].nhdrs && cl == cases[i].cl));
        if (used && ok && i == 0) {
            size_t vl = 0;
            const char *v = sglr_head_get(&h, "content-type", &vl);
            ok = v && vl == 3 && memcmp(v, "a/b", 3) == 0 && memcmp(SGLR_HDR_NAME(&h, 0), "content-type", 13) == 0;
        }
        if (used && ok && i == 4) {
            ok = h.hdrs[1].value_len == 0 && h.hdrs[2].value_len == 1 && SGLR_HDR_VALUE(&h, 2)[0] == 'v';
        }
        sglr_head_free(&h);
        CHECK(ok);
        CHECK(used || nh == 0);
    }
    /* a head longer than the cap is left to llhttp (which refuses it) */
    sglr_head_t h = { 0 };
    int status, ka;
    long long cl;
    char in[] = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
    CHECK_EQ_INT(sglr_resp_head_fast(in, strlen(in), 20, &h, 0, &status, &cl, &ka), 0);
    CHECK_EQ_INT(sglr_resp_head_fast(in, strlen(in), 64, &h, 1, &status, &cl, &ka), strlen(in));
    CHECK_EQ_INT(h.nhdrs, 0);             /* skip_ok: a 2xx keeps no fields */
    sglr_head_free(&h);
}

/* A head that does not arrive whole in one read goes to llhttp */
TEST(split_head)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/splithead", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, 5);
    CHECK_EQ_STR(c->xa, "c");
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(c->r->fast, 0);
    /* the head's time is the read that completed it, 10 ms after the
     * first (the callback clock is read again in each read) */
    CHECK(c->r->t_head - c->r->t_start >= 9);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);
    POOL_DOWN(pool);
}

/* The callback clock answers one reading until a tick: a read callback's
 * own, or the loop's before and after it polls. */
TEST(callback_clock)
{
    double t0 = sglr_clock_ms();
    double real0 = sglr_now_ms();
    while (sglr_now_ms() - real0 < 2)
        ;
    CHECK(sglr_clock_ms() == t0);
    sglr_clock_tick();
    double t1 = sglr_clock_ms();
    CHECK(t1 - t0 >= 2);
    real0 = sglr_now_ms();
    while (sglr_now_ms() - real0 < 2)
        ;
    CHECK(sglr_clock_ms() == t1);
    /* a sleep or a timer takes the real clock: never shorter than asked,
     * however long this callback has run */
    double real = sglr_now_ms();
    CHECK(uv_now(&loop) + sglr_timer_ms(10) >= (uint64_t)real + 10);
    uv_run(&loop, UV_RUN_NOWAIT);
    CHECK(sglr_clock_ms() - t1 >= 2);
}

TEST(chunked_response)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/chunked", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, -1);
    CHECK(body_is(c, "hello world"));
    CHECK(c->nbody >= 2);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);
    POOL_DOWN(pool);
}

/* A 204 has no body whatever its framing says: it ends at its head, not
 * at the deadline, even when the worker then closes (found by
 * fuzz_response). */
/* A borrowed body (build_ref) goes out as it is, however the socket takes
 * it: 3 MiB is more than one write. */
TEST(borrowed_body_is_sent_whole)
{
    sglr_pool_t *pool = pool_up("");
    size_t n = 3u << 20;
    char *body = malloc(n);
    for (size_t i = 0; i < n; i++)
        body[i] = (char)('a' + i % 23);
    call_t *c = call_reset(0);
    c->r = sglr_upreq_new(pool);
    c->r->data = c;
    c->r->on_head = on_head;
    c->r->on_body = on_body;
    c->r->on_done = on_done;
    CHECK_EQ_INT(sglr_upreq_build_ref(c->r, "POST", "/ok", 3, "", 0, body, n), 0);
    CHECK(c->r->out.len < 256);             /* the head only */
    sglr_upreq_start(c->r, 1000, 5000);
    WAIT(c->ndone, 5000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK(last_req.len > n);
    CHECK(memcmp(last_req.data + last_req.len - n, body, n) == 0);
    call_free(c);
    free(body);
    POOL_DOWN(pool);
}

TEST(no_content_with_chunked_framing)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/nocontentte", NULL, 2000);
    WAIT(c->ndone, 500);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 204);
    CHECK_EQ_INT(c->nbody, 0);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(no_body)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/empty", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, 0);
    CHECK_EQ_INT(c->nbody, 0);
    call_free(c);

    /* 204, and the test continues by itself: nothing ends before that */
    c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/nocontent", NULL, 2000);
    WAIT(c->heads, 2000);
    CHECK_EQ_INT(c->status, 204);
    CHECK_EQ_STR(c->xa, "none");
    CHECK_EQ_INT(c->ndone, 0);
    sglr_upreq_continue(c->r);
    CHECK_EQ_INT(c->ndone, 1);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->nbody, 0);
    CHECK(c->r->reused);
    /* both on one connection */
    CHECK_EQ_INT(accepts, 1);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);

    /* a body-less answer that is followed by the next one still leaves
     * the connection clean */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(accepts, 1);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(continue_later)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->heads, 2000);
    /* the body already arrived with the head, but waits for continue */
    CHECK_EQ_INT(c->nbody, 0);
    CHECK_EQ_INT(c->ndone, 0);
    sglr_upreq_continue(c->r);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);

    c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/chunked", NULL, 2000);
    WAIT(c->heads, 2000);
    sglr_upreq_continue(c->r);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello world"));
    call_free(c);
    POOL_DOWN(pool);
}

TEST(paused_while_connection_ends)
{
    sglr_pool_t *pool = pool_up("");
    /* the whole close-delimited answer and its end arrive while the head
     * is with the caller: continue delivers the body, then the end */
    call_t *c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/eof", NULL, 2000);
    WAIT(c->heads && c->r->eof_pending, 2000);
    CHECK_EQ_INT(c->ndone, 0);
    sglr_upreq_continue(c->r);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "until close"));
    call_free(c);

    /* the same with an answer cut short: the body, then the reset */
    c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/cut", NULL, 2000);
    WAIT(c->heads && c->r->eof_pending, 2000);
    sglr_upreq_continue(c->r);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ERESET);
    CHECK(body_is(c, "0123456789"));
    call_free(c);

    /* throttled when the end comes: it is reported once unthrottled */
    c = call_reset(0);
    c->throttle = 1;
    call_start(c, pool, "GET", "/eof", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "until close"));
    call_free(c);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(paused_with_much_pending)
{
    sglr_pool_t *pool = pool_up("");
    /* more than 1 MiB piles up while the head is with the caller: reading
     * stops, and resumes on continue without losing a byte */
    call_t *c = call_reset(0);
    c->manual = 1;
    call_start(c, pool, "GET", "/huge", NULL, 3000);
    WAIT(c->heads && c->r->pending.len > (1u << 20), 2000);
    /* give the worker 30 ms to push more: at most one more read lands */
    guard_fired = 0;
    uv_timer_start(&guard, guard_cb, 30, 0);
    while (!guard_fired)
        uv_run(&loop, UV_RUN_ONCE);
    CHECK(c->r->pending.len <= (1u << 20) + (64u << 10));
    sglr_upreq_continue(c->r);
    WAIT(c->ndone, 3000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    sglr_buf_t want = { 0 };
    big_body(&want, 3u << 20);
    int ok = c->body.len == want.len && memcmp(c->body.data, want.data, want.len) == 0;
    sglr_buf_free(&want);
    CHECK(ok);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);

    /* freed from on_head, with the body still coming: no more callbacks */
    c = call_reset(0);
    c->free_in_head = 1;
    call_start(c, pool, "GET", "/huge", NULL, 3000);
    WAIT(c->heads, 2000);
    CHECK(c->freed);
    WAIT(pool->nconns == 0 && npeers == 0, 2000);
    CHECK_EQ_INT(c->nbody + c->ndone, 0);
    POOL_DOWN(pool);
}

/* The deadline timer is lazy: a request on a recycled object whose timer
 * fires no later than the new deadline leaves it as it is (no timer-heap
 * work); one due earlier arms it earlier, and it times out on time. */
TEST(lazy_deadline_timer)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 5000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
#ifndef SGLR_NO_FREELIST
    sglr_upreq_t *first = c->r;
    uint64_t due = first->timer_due;         /* its own, or an earlier one still armed */
    CHECK(due != 0 && due <= c->t_start + 5001);
#endif
    call_free(c);
    uv_run(&loop, UV_RUN_NOWAIT);            /* recycled on the next loop turn */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 5000);
#ifndef SGLR_NO_FREELIST
    CHECK(c->r == first);
    CHECK(c->r->timer_due == due);           /* not armed again */
#endif
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    call_free(c);
    uv_run(&loop, UV_RUN_NOWAIT);
    c = call_reset(0);
    call_start(c, pool, "GET", "/hang", NULL, 150);
#ifndef SGLR_NO_FREELIST
    CHECK(c->r == first);
    CHECK(c->r->timer_due != 0 && c->r->timer_due <= c->t_start + 151);   /* armed by its deadline */
#endif
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ETIMEOUT);
    CHECK(c->t_done - c->t_start >= 140);
    CHECK(c->t_done - c->t_start < 1000);
    call_free(c);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(interim_100)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "POST", "/continue", "x", 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->heads, 1);
    CHECK_EQ_INT(c->status, 200);
    CHECK(body_is(c, "ok"));
    call_free(c);
    POOL_DOWN(pool);
}

TEST(eof_delimited)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    c->free_in_done = 1;
    call_start(c, pool, "GET", "/eof", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->clen, -1);
    CHECK(body_is(c, "until close"));
    CHECK_EQ_INT(pool->nidle, 0);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(keep_alive_reuse)
{
    sglr_pool_t *pool = pool_up("");
    for (int i = 0; i < 3; i++) {
        call_t *c = call_reset(0);
        call_start(c, pool, "GET", "/ok", NULL, 2000);
        WAIT(c->ndone, 2000);
        CHECK_EQ_INT(c->err, SGLR_UP_OK);
        CHECK(body_is(c, "hello"));
        CHECK_EQ_INT(c->r->reused, i > 0);
        CHECK_EQ_INT(pool->nconns, 1);
        CHECK_EQ_INT(pool->nidle, 1);
        call_free(c);
    }
    CHECK_EQ_INT(accepts, 1);
    CHECK_EQ_INT(nreqs, 3);

    /* two at once need two connections; both are kept, the next reuses */
    call_t *a = call_reset(0), *b = call_reset(1);
    call_start(a, pool, "GET", "/ok", NULL, 2000);
    call_start(b, pool, "GET", "/chunked", NULL, 2000);
    WAIT(a->ndone && b->ndone, 2000);
    CHECK_EQ_INT(a->err, SGLR_UP_OK);
    CHECK_EQ_INT(b->err, SGLR_UP_OK);
    CHECK(body_is(b, "hello world"));
    CHECK_EQ_INT(pool->nconns, 2);
    CHECK_EQ_INT(pool->nidle, 2);
    CHECK_EQ_INT(accepts, 2);
    call_free(a);
    call_free(b);
    a = call_reset(0);
    call_start(a, pool, "GET", "/ok", NULL, 2000);
    WAIT(a->ndone, 2000);
    CHECK_EQ_INT(a->err, SGLR_UP_OK);
    CHECK(a->r->reused);
    CHECK_EQ_INT(accepts, 2);
    call_free(a);

    /* connection: close is honoured: not kept */
    a = call_reset(0);
    call_start(a, pool, "GET", "/closehdr", NULL, 2000);
    WAIT(a->ndone, 2000);
    CHECK_EQ_INT(a->err, SGLR_UP_OK);
    CHECK(body_is(a, "ok"));
    call_free(a);
    WAIT(pool->nconns == 1, 2000);
    CHECK_EQ_INT(pool->nidle, 1);

    /* bytes after the end of the answer: the connection is not clean */
    a = call_reset(0);
    call_start(a, pool, "GET", "/extra", NULL, 2000);
    WAIT(a->ndone, 2000);
    CHECK_EQ_INT(a->err, SGLR_UP_OK);
    CHECK(body_is(a, "ok"));
    CHECK(a->r->reused);
    CHECK_EQ_INT(pool->nidle, 0);
    call_free(a);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(stale_idle_closed)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/bye", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);
    /* the server closes the idle connection: the pool notices and drops it */
    WAIT(pool->nidle == 0 && pool->nconns == 0, 2000);
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(c->r->reused, 0);
    CHECK_EQ_INT(accepts, 2);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(stale_race_retried)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/stale", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    call_free(c);
    /* the request goes out on the idle connection, which the server closes
     * unanswered: it is sent again on a fresh connection */
    c = call_reset(0);
    call_start(c, pool, "POST", "/stale", "again", 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(c->r->retried, 1);
    CHECK_EQ_INT(accepts, 2);
    CHECK_EQ_INT(nreqs, 3);
    CHECK(find(last_req.data, last_req.len, "\r\n\r\nagain") != NULL);
    CHECK_EQ_INT(pool->nconns, 1);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(stale_replay_counted)
{
    sglr_pool_t *pool = pool_up("");
    CHECK_EQ_INT(pool->replays, 0);
    /* a failure after response bytes on a reused connection is no replay */
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    call_free(c);
    c = call_reset(0);
    call_start(c, pool, "GET", "/cut", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ERESET);
    CHECK(c->r->reused);
    CHECK_EQ_INT(pool->replays, 0);
    call_free(c);
    WAIT(pool->nconns == 0, 2000);
    /* each request the server drops unanswered on a reused connection is
     * sent again once, and counted once (and logged: run the debug line) */
    int level = sglr_log_level;
    sglr_log_level = SGLR_LOG_DEBUG;
    for (int i = 0; i < 3; i++) {
        c = call_reset(0);
        call_start(c, pool, "GET", "/stale", NULL, 2000);
        WAIT(c->ndone, 2000);
        CHECK_EQ_INT(c->err, SGLR_UP_OK);
        CHECK_EQ_INT(c->r->retried, i > 0);
        CHECK_EQ_INT(pool->replays, i);
        call_free(c);
    }
    sglr_log_level = level;
    POOL_DOWN(pool);
}

TEST(connect_refused)
{
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", free_port());
    const char *err = NULL;
    sglr_pool_t *pool = sglr_pool_new(url, &err);
    CHECK(pool != NULL);
    call_t *c = call_reset(0);
    c->free_in_done = 1;
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
    CHECK_EQ_INT(c->heads, 0);
    CHECK_EQ_STR(sglr_up_errname(c->err), "connect");
    WAIT(pool->nconns == 0 && pool->refs == 1, 2000);
    sglr_pool_unref(pool);
}

TEST(total_timeout)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/hang", NULL, 150);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ETIMEOUT);
    CHECK_EQ_INT(c->heads, 0);
    CHECK(c->t_done - c->t_start >= 140);
    CHECK(c->t_done - c->t_start < 1000);
    CHECK_EQ_INT(nreqs, 1);
    call_free(c);
    WAIT(pool->nconns == 0, 2000);

    /* in the middle of the body */
    c = call_reset(0);
    call_start(c, pool, "GET", "/slow", NULL, 150);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ETIMEOUT);
    CHECK_EQ_INT(c->heads, 1);
    CHECK(body_is(c, "01234"));
    call_free(c);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(reset_mid_body)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/cut", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ERESET);
    CHECK_EQ_INT(c->heads, 1);
    CHECK_EQ_INT(c->clen, 100);
    CHECK(body_is(c, "0123456789"));
    call_free(c);

    c = call_reset(0);
    call_start(c, pool, "GET", "/rst", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ERESET);
    CHECK(body_is(c, "0123456789"));
    call_free(c);

    /* on a reused connection, once response bytes came, it is not retried */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    call_free(c);
    int before = accepts;
    c = call_reset(0);
    call_start(c, pool, "GET", "/cut", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ERESET);
    CHECK(c->r->reused);
    CHECK_EQ_INT(c->r->retried, 0);
    CHECK_EQ_INT(accepts, before);
    call_free(c);
    WAIT(pool->nconns == 0, 2000);
    POOL_DOWN(pool);
}

TEST(abort_in_body)
{
    sglr_pool_t *pool = pool_up("");
    /* the rest of the chunked body comes later: nothing more is delivered */
    call_t *c = call_reset(0);
    c->abort_in_body = 1;
    call_start(c, pool, "GET", "/chunked", NULL, 2000);
    WAIT(c->nbody, 2000);
    CHECK(c->freed);
    /* the connection is closed and the server sees it go */
    WAIT(pool->nconns == 0 && npeers == 0, 2000);
    CHECK_EQ_INT(c->nbody, 1);
    CHECK_EQ_INT(c->ndone, 0);
    CHECK(body_is(c, "hello"));

    /* the body in the same read as the head: abort from inside the
     * continue that on_head makes */
    c = call_reset(0);
    c->abort_in_body = 1;
    call_start(c, pool, "GET", "/big", NULL, 2000);
    WAIT(c->nbody, 2000);
    WAIT(pool->nconns == 0 && npeers == 0, 2000);
    CHECK_EQ_INT(c->nbody, 1);
    CHECK_EQ_INT(c->ndone, 0);

    /* abort before the head: no callback at all */
    c = call_reset(0);
    call_start(c, pool, "GET", "/hang", NULL, 2000);
    WAIT(nreqs == 3, 2000);
    sglr_upreq_abort(c->r);
    WAIT(pool->nconns == 0 && npeers == 0, 2000);
    CHECK_EQ_INT(c->heads + c->nbody + c->ndone, 0);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(throttle)
{
    sglr_pool_t *pool = pool_up("");
    call_t *c = call_reset(0);
    c->throttle = 1;
    call_start(c, pool, "GET", "/big", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    sglr_buf_t want = { 0 };
    big_body(&want, 256 << 10);
    int ok = c->body.len == want.len && memcmp(c->body.data, want.data, want.len) == 0;
    sglr_buf_free(&want);
    CHECK(ok);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(answer_before_request_sent)
{
    sglr_pool_t *pool = pool_up("");
    /* a body far larger than the socket buffers: the worker answers after
     * the head and reads no more, so the request is still being written
     * when the response is complete */
    size_t big = 32u << 20;
    char *body = malloc(big + 1);
    memset(body, 'p', big);
    body[big] = 0;
    call_t *c = call_reset(0);
    call_start(c, pool, "POST", "/early", body, 5000);
    free(body);
    WAIT(c->ndone, 5000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "ok"));
    /* half a request is on that connection: it cannot serve another */
    CHECK_EQ_INT(pool->nidle, 0);
    call_free(c);
    WAIT(pool->refs == 1 + pool->nconns, 2000);
    /* the worker reads again: the client must not be writing any more, and
     * least of all from the freed request */
    peers_drain();
    WAIT(npeers == 0, 5000);
    CHECK(drained < big);
    CHECK_EQ_INT(pool->nconns, 0);

    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->r->reused, 0);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(head_request)
{
    sglr_pool_t *pool = pool_up("");
    /* the answer to HEAD announces a length but has no body */
    call_t *c = call_reset(0);
    call_start(c, pool, "HEAD", "/ok", NULL, 1000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(c->status, 200);
    CHECK_EQ_INT(c->clen, 5);
    CHECK_EQ_INT(c->nbody, 0);
    CHECK_EQ_INT(pool->nidle, 1);
    call_free(c);
    /* and the connection is clean for the next request */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 1000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello"));
    CHECK(c->r->reused);
    call_free(c);
    POOL_DOWN(pool);
}

/* --- host names ----------------------------------------------------------------------- */

static sglr_pool_t *name_pool(const char *host, int pt)
{
    char url[128];
    snprintf(url, sizeof url, "http://%s:%d", host, pt);
    const char *err = NULL;
    sglr_pool_t *p = sglr_pool_new(url, &err);
    if (!p) {
        fprintf(stderr, "pool %s: %s\n", url, err);
        exit(1);
    }
    accepts = nreqs = 0;
    return p;
}

TEST(resolve_without_blocking)
{
    char want[64], got[64];
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    /* the lookup runs on the thread pool: nothing is known on return */
    sglr_pool_t *pool = name_pool("localhost", port);
    CHECK(pool->resolving);
    CHECK_EQ_INT(pool->naddrs, 0);
    CHECK_EQ_STR(sglr_pool_address(pool, got), "");
    /* a request before the answer waits for it, then connects */
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    CHECK_EQ_INT(c->ndone, 0);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK(body_is(c, "hello"));
    CHECK_EQ_INT(pool->resolves, 1);
    CHECK_EQ_INT(pool->resolve_err, 0);
    /* the Host header names the worker as its URL does */
    char host[80];
    snprintf(host, sizeof host, "\r\nhost: localhost:%d\r\n", port);
    CHECK(strstr(last_req.data, host) != NULL);
    /* the address that answered is the one dialled from now on (if the
     * name also gave ::1, that one was refused and skipped) */
    CHECK_EQ_STR(sglr_pool_address(pool, got), want);
    call_free(c);
    POOL_DOWN(pool);

    /* an IP address is not looked up */
    pool = pool_up("");
    CHECK(!pool->resolving);
    CHECK(pool->host == NULL);
    CHECK_EQ_STR(sglr_pool_address(pool, got), want);
    POOL_DOWN(pool);
}

TEST(unresolvable_name)
{
    int level = sglr_log_level;
    sglr_log_level = SGLR_LOG_ERROR;  /* the lookup's failure is a warning */
    sglr_pool_t *pool = name_pool("no-such-worker.invalid", port);
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 10000);
    CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
    CHECK_EQ_INT(c->heads, 0);
    CHECK(pool->resolve_err != 0);
    CHECK_EQ_INT(pool->naddrs, 0);
    unsigned before = pool->resolves;
    call_free(c);
    /* the next request asks again: the name may exist by now */
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 10000);
    CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
    CHECK_EQ_INT(pool->resolves, before + 1);
    CHECK_EQ_INT(accepts, 0);
    call_free(c);
    sglr_log_level = level;
    POOL_DOWN(pool);
}

static void sleep_work_cb(uv_work_t *w)
{
    uv_sleep(400);
}

static int works_done;

static void sleep_after_cb(uv_work_t *w, int status)
{
    works_done++;
    free(w);
}

TEST(connect_timeout_covers_resolution)
{
    /* Every thread of libuv's pool sleeps 400 ms: the lookup cannot start
     * before then, and the request's 60 ms connect timeout runs out. */
    enum { WORKS = 16 };
    works_done = 0;
    for (int i = 0; i < WORKS; i++) {
        uv_work_t *w = malloc(sizeof *w);
        uv_queue_work(&loop, w, sleep_work_cb, sleep_after_cb);
    }
    sglr_pool_t *pool = name_pool("localhost", port);
    call_t *c = call_reset(0);
    call_start_ct(c, pool, "/ok", 60);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
    CHECK(c->t_done - c->t_start >= 55 && c->t_done - c->t_start < 350);
    CHECK(pool->resolving);                    /* still waiting for a thread */
    CHECK(pool->waiting == NULL);
    call_free(c);
    WAIT(works_done == WORKS && !pool->resolving, 10000);
    CHECK_EQ_INT(pool->naddrs > 0, 1);
    c = call_reset(0);
    call_start_ct(c, pool, "/ok", 60);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    call_free(c);
    POOL_DOWN(pool);
}

TEST(failed_connect_reresolves)
{
    int level = sglr_log_level;
    sglr_log_level = SGLR_LOG_WARN;
    sglr_pool_t *pool = name_pool("localhost", port);
    pool->reresolve_ms = 0;
    WAIT(!pool->resolving, 5000);
    CHECK_EQ_INT(pool->resolves, 1);
    /* The name moved away from the address the pool knows: make it point
     * at a port where nothing listens, as a pod's old IP would. */
    int dead = free_port();
    char good[64], got[64];
    sglr_pool_address(pool, good);
    ((struct sockaddr_in *)&pool->addr)->sin_port = htons((uint16_t)dead);
    pool->addrs[pool->cur] = pool->addr;
    call_t *c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
    call_free(c);
    /* the failed connect asked again, and the answer is dialled next */
    CHECK(pool->resolving || pool->resolves == 2);
    WAIT(pool->resolves == 2 && !pool->resolving, 5000);
    CHECK_EQ_STR(sglr_pool_address(pool, got), good);
    c = call_reset(0);
    call_start(c, pool, "GET", "/closehdr", NULL, 2000);   /* keeps no connection */
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    call_free(c);
    WAIT(pool->nconns == 0, 2000);

    /* Not more often than reresolve_ms: two failures, one lookup. */
    pool->reresolve_ms = 60000;
    ((struct sockaddr_in *)&pool->addr)->sin_port = htons((uint16_t)dead);
    pool->addrs[pool->cur] = pool->addr;
    for (int i = 0; i < 2; i++) {
        c = call_reset(0);
        call_start(c, pool, "GET", "/ok", NULL, 2000);
        WAIT(c->ndone, 2000);
        CHECK_EQ_INT(c->err, SGLR_UP_ECONNECT);
        call_free(c);
    }
    CHECK_EQ_INT(pool->resolves, 2);
    CHECK(!pool->resolving);

    /* A name with two addresses, the first refusing: the request goes on
     * to the second, and the pool dials that one from then on. */
    struct sockaddr_storage ok = pool->addrs[0];
    ((struct sockaddr_in *)&ok)->sin_port = htons((uint16_t)port);
    pool->addrs[1] = ok;
    pool->naddrs = 2;
    pool->cur = 0;
    pool->addr_gen++;
    c = call_reset(0);
    call_start(c, pool, "GET", "/ok", NULL, 2000);
    WAIT(c->ndone, 2000);
    CHECK_EQ_INT(c->err, SGLR_UP_OK);
    CHECK_EQ_INT(pool->cur, 1);
    CHECK_EQ_STR(sglr_pool_address(pool, got), good);
    call_free(c);
    sglr_log_level = level;
    POOL_DOWN(pool);
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

static void close_walk_cb(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h) && h != (uv_handle_t *)&guard)
        uv_close(h, NULL);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);   /* a peer that closed first is a result, not a crash */
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    uv_timer_init(&loop, &guard);
    uv_timer_init(&loop, &aux);

    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(&loop, &lsn);
    if (uv_tcp_bind(&lsn, (struct sockaddr *)&a, 0) < 0 ||
        uv_listen((uv_stream_t *)&lsn, 128, on_peer) < 0) {
        fprintf(stderr, "cannot listen on 127.0.0.1\n");
        return 1;
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_tcp_getsockname(&lsn, (struct sockaddr *)&ss, &len);
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);

    RUN(pool_parse);
    RUN(content_length);
    RUN(skip_ok_fields);
    RUN(fast_head_shapes);
    RUN(split_head);
    RUN(callback_clock);
    RUN(chunked_response);
    RUN(no_body);
    RUN(no_content_with_chunked_framing);
    RUN(borrowed_body_is_sent_whole);
    RUN(continue_later);
    RUN(paused_while_connection_ends);
    RUN(paused_with_much_pending);
    RUN(lazy_deadline_timer);
    RUN(interim_100);
    RUN(eof_delimited);
    RUN(keep_alive_reuse);
    RUN(stale_idle_closed);
    RUN(stale_race_retried);
    RUN(stale_replay_counted);
    RUN(connect_refused);
    RUN(total_timeout);
    RUN(reset_mid_body);
    RUN(abort_in_body);
    RUN(throttle);
    RUN(answer_before_request_sent);
    RUN(head_request);
    RUN(resolve_without_blocking);
    RUN(unresolvable_name);
    RUN(connect_timeout_covers_resolution);
    RUN(failed_connect_reresolves);

    /* Drain: close the server side, then run until every close callback
     * (where the engine frees) has run. A failed case may have left
     * handles behind: close those bluntly rather than hang. */
    while (peers)
        peer_close(peers);
    /* let freed requests reach the free list, then close what it keeps */
    uv_run(&loop, UV_RUN_NOWAIT);
    sglr_clock_stop();
    sglr_upstream_release_spares();
    uv_close((uv_handle_t *)&lsn, NULL);
    uv_close((uv_handle_t *)&aux, NULL);
    guard_fired = 0;
    uv_timer_start(&guard, guard_cb, 2000, 0);
    while (handles_left() && !guard_fired)
        uv_run(&loop, UV_RUN_ONCE);
    if (handles_left()) {
        fprintf(stderr, "%d handles left open\n", handles_left());
        test_failures++;
        uv_walk(&loop, close_walk_cb, NULL);
    }
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) {
        fprintf(stderr, "loop did not close\n");
        test_failures++;
    }
    for (int i = 0; i < 4; i++)
        sglr_buf_free(&calls[i].body);
    sglr_buf_free(&last_req);
    TEST_EXIT();
}
