/*
 * upstream.c: keep-alive HTTP/1.1 client for the proxy path (see upstream.h).
 */
#include "upstream.h"
#include "sglr.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <llhttp.h>

enum { UP_NEW, UP_RESOLVING, UP_CONNECTING, UP_WAIT_HEAD, UP_HEAD, UP_BODY, UP_DONE, UP_ABORTED };

struct sglr_upconn_s {
    uv_tcp_t tcp;
    uv_connect_t creq;
    uv_write_t wreq;
    uv_buf_t wbuf[2];        /* what uv_try_write left of head and body */
    sglr_pool_t *pool;
    sglr_upreq_t *req;       /* NULL while idle */
    sglr_upconn_t *next;     /* idle list */
    llhttp_t parser;
    unsigned addr_gen;       /* the pool's addr_gen when it dialled */
    int closing;
    int idle;
    int reading;             /* uv_read_start is in effect */
    int writing;             /* wreq is with libuv until write_cb runs */
    int park;                /* become idle once write_cb has run */
};

static llhttp_settings_t settings;
static char read_buf[64 * 1024 + 1];    /* + a NUL after the bytes read */

static void req_fail(sglr_upreq_t *r, int err);
static void req_eof(sglr_upreq_t *r, int err);
static void req_feed(sglr_upreq_t *r, char *data, size_t len);
static void req_dial(sglr_upreq_t *r);
static void req_connect(sglr_upreq_t *r);
static void req_release_conn(sglr_upreq_t *r, int reusable);
static int pool_lookup(sglr_pool_t *p);

const char *sglr_up_errname(int err)
{
    switch (err) {
    case SGLR_UP_OK: return "ok";
    case SGLR_UP_ECONNECT: return "connect";
    case SGLR_UP_ERESET: return "reset";
    case SGLR_UP_ETIMEOUT: return "timeout";
    case SGLR_UP_EPROTO: return "protocol";
    case SGLR_UP_ENOMEM: return "nomem";
    default: return "unknown";
    }
}

/* --- pools ------------------------------------------------------------------- */

sglr_pool_t *sglr_pool_new(const char *url, const char **err)
{
    const char *p;
    int port = 80;
    if (strncmp(url, "http://", 7) == 0) {
        p = url + 7;
    } else {
        *err = "only http:// workers can use the native client";
        return NULL;
    }
    const char *hend = p;
    char host[256];
    if (*p == '[') {                      /* [v6]:port */
        const char *close = strchr(p, ']');
        if (!close || (size_t)(close - p - 1) >= sizeof host) {
            *err = "bad IPv6 address";
            return NULL;
        }
        memcpy(host, p + 1, (size_t)(close - p - 1));
        host[close - p - 1] = 0;
        hend = close + 1;
    } else {
        while (*hend && *hend != ':' && *hend != '/')
            hend++;
        if (hend == p || (size_t)(hend - p) >= sizeof host) {
            *err = "missing host";
            return NULL;
        }
        memcpy(host, p, (size_t)(hend - p));
        host[hend - p] = 0;
    }
    const char *rest = hend;
    if (*rest == ':') {
        char *end;
        long v = strtol(rest + 1, &end, 10);
        if (end == rest + 1 || v <= 0 || v > 65535 || (*end && *end != '/')) {
            *err = "bad port";
            return NULL;
        }
        port = (int)v;
        rest = end;
    }
    sglr_pool_t *pool = calloc(1, sizeof *pool);
    if (!pool) {
        *err = "out of memory";
        return NULL;
    }
    int is_ip = uv_ip4_addr(host, port, (struct sockaddr_in *)&pool->addr) == 0 ||
                uv_ip6_addr(host, port, (struct sockaddr_in6 *)&pool->addr) == 0;
    pool->port = port;
    pool->reresolve_ms = 1000;
    if (is_ip) {
        pool->addrs[0] = pool->addr;
        pool->naddrs = 1;
    } else if (!(pool->host = strdup(host))) {
        free(pool);
        *err = "out of memory";
        return NULL;
    }
    size_t ulen = strlen(url);
    while (ulen > 0 && url[ulen - 1] == '/')
        ulen--;
    pool->url = strndup(url, ulen);
    pool->hostport = strndup(p, (size_t)(rest - p));
    const char *bp = rest;
    size_t blen = strlen(bp);
    while (blen > 0 && bp[blen - 1] == '/')
        blen--;
    pool->base_path = strndup(bp, blen);
    pool->refs = 1;
    pool->max_idle = 512;
    if (!pool->url || !pool->hostport || !pool->base_path) {
        free(pool->url);
        free(pool->hostport);
        free(pool->base_path);
        free(pool->host);
        free(pool);
        *err = "out of memory";
        return NULL;
    }
    if (pool->host)
        pool_lookup(pool);           /* by the first request it has mostly answered */
    return pool;
}

/* --- host names ---------------------------------------------------------------- */

const char *sglr_pool_address(const sglr_pool_t *p, char *buf)
{
    char ip[INET6_ADDRSTRLEN] = "";
    buf[0] = '\0';
    if (!p->naddrs)
        return buf;
    if (p->addr.ss_family == AF_INET6) {
        uv_ip6_name((const struct sockaddr_in6 *)&p->addr, ip, sizeof ip);
        snprintf(buf, 64, "[%s]:%d", ip, p->port);
    } else {
        uv_ip4_name((const struct sockaddr_in *)&p->addr, ip, sizeof ip);
        snprintf(buf, 64, "%s:%d", ip, p->port);
    }
    return buf;
}

static void pool_enqueue(sglr_upreq_t *r)
{
    sglr_pool_t *p = r->pool;
    r->wprev = p->waiting_tail;
    r->wnext = NULL;
    if (p->waiting_tail)
        p->waiting_tail->wnext = r;
    else
        p->waiting = r;
    p->waiting_tail = r;
}

static void pool_unqueue(sglr_upreq_t *r)
{
    sglr_pool_t *p = r->pool;
    if (r->wprev)
        r->wprev->wnext = r->wnext;
    else
        p->waiting = r->wnext;
    if (r->wnext)
        r->wnext->wprev = r->wprev;
    else
        p->waiting_tail = r->wprev;
    r->wnext = r->wprev = NULL;
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return 0;
    size_t n = a->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    return memcmp(a, b, n) == 0;
}

static void resolved_cb(uv_getaddrinfo_t *gr, int status, struct addrinfo *res)
{
    sglr_pool_t *p = gr->data;
    free(gr);
    p->resolving = 0;
    p->resolves++;
    p->resolved_at = uv_now(sglr_loop);
    char was[64], now[64];
    sglr_pool_address(p, was);
    int n = 0;
    struct sockaddr_storage found[SGLR_POOL_MAX_ADDRS];
    for (struct addrinfo *ai = status == 0 ? res : NULL; ai && n < SGLR_POOL_MAX_ADDRS; ai = ai->ai_next) {
        if ((ai->ai_family != AF_INET && ai->ai_family != AF_INET6) ||
            ai->ai_addrlen > sizeof found[0])
            continue;
        struct sockaddr_storage a;
        memset(&a, 0, sizeof a);
        memcpy(&a, ai->ai_addr, ai->ai_addrlen);
        int dup = 0;
        for (int i = 0; i < n; i++)
            dup |= same_addr(&found[i], &a);
        if (!dup)
            found[n++] = a;
    }
    if (res)
        uv_freeaddrinfo(res);
    if (n > 0) {
        /* Keep dialling the address in use while the name still has it. */
        int cur = 0;
        for (int i = 0; i < n; i++)
            if (p->naddrs && same_addr(&found[i], &p->addr))
                cur = i;
        memcpy(p->addrs, found, (size_t)n * sizeof found[0]);
        p->cur = cur;
        if (!p->naddrs || !same_addr(&p->addr, &p->addrs[cur])) {
            p->addr = p->addrs[cur];
            p->addr_gen++;
        }
        p->naddrs = n;
        p->resolve_err = 0;
        sglr_pool_address(p, now);
        if (was[0] && strcmp(was, now) != 0)
            sglr_log(SGLR_LOG_INFO, "upstream %s: %s now resolves to %s (was %s)", p->url, p->host,
                     now, was);
    } else {
        p->resolve_err = status ? status : UV_EAI_NODATA;
        sglr_log(SGLR_LOG_WARN, "upstream %s: cannot resolve %s: %s%s", p->url, p->host,
                 uv_strerror(p->resolve_err),
                 p->naddrs ? " (the addresses known last stay in use)" : "");
    }
    /* Serve the requests that waited for this lookup. One that a callback
     * queues meanwhile waits for the next lookup (it starts one), so a
     * caller that retries at once cannot keep this loop going. */
    unsigned gen = p->lookup_gen;
    sglr_upreq_t *r;
    while ((r = p->waiting) && r->wait_gen == gen) {
        pool_unqueue(r);
        if (p->naddrs)
            req_connect(r);
        else
            req_fail(r, SGLR_UP_ECONNECT);
    }
    sglr_pool_unref(p);
}

/* Start a lookup of the pool's name unless one runs; -ENOMEM when none
 * could start. A lookup that fails at once is reported at once. */
static int pool_lookup(sglr_pool_t *p)
{
    if (!p->host || p->resolving)
        return 0;
    uv_getaddrinfo_t *gr = malloc(sizeof *gr);
    if (!gr)
        return -ENOMEM;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char ps[8];
    snprintf(ps, sizeof ps, "%d", p->port);
    gr->data = p;
    p->resolving = 1;
    p->lookup_gen++;
    sglr_pool_ref(p);
    int e = uv_getaddrinfo(sglr_loop, gr, resolved_cb, p->host, ps, &hints);
    if (e < 0)
        resolved_cb(gr, e, NULL);
    return 0;
}

/* A connection of the pool failed to connect: the next connection tries
 * the next address of the name, and the name is looked up again. gen is
 * the pool's addr_gen when that connection dialled, so that a burst of
 * failures moves on by one address, not past the next (good) one. */
static void pool_connect_failed(sglr_pool_t *p, unsigned gen)
{
    if (!p->host)
        return;
    if (gen == p->addr_gen && p->naddrs > 1) {
        p->cur = (p->cur + 1) % p->naddrs;
        p->addr = p->addrs[p->cur];
        p->addr_gen++;
    }
    if (!p->resolving && uv_now(sglr_loop) - p->resolved_at >= p->reresolve_ms)
        pool_lookup(p);
}

void sglr_pool_ref(sglr_pool_t *p)
{
    p->refs++;
}

static void conn_close(sglr_upconn_t *c);

void sglr_pool_unref(sglr_pool_t *p)
{
    if (--p->refs > 0) {
        /* only idle connections hold the pool otherwise: drop them */
        if (p->refs == p->nidle) {
            while (p->idle) {
                sglr_upconn_t *c = p->idle;
                p->idle = c->next;
                p->nidle--;
                c->idle = 0;
                conn_close(c);
            }
        }
        return;
    }
    free(p->url);
    free(p->hostport);
    free(p->base_path);
    free(p->host);
    free(p);
}

/* --- connections ------------------------------------------------------------ */

static void conn_close_cb(uv_handle_t *h)
{
    sglr_upconn_t *c = h->data;
    sglr_pool_t *p = c->pool;
    p->nconns--;
    free(c);
    sglr_pool_unref(p);
}

static void conn_close(sglr_upconn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    if (c->idle) {
        sglr_upconn_t **pp = &c->pool->idle;
        while (*pp && *pp != c)
            pp = &(*pp)->next;
        if (*pp)
            *pp = c->next;
        c->pool->nidle--;
        c->idle = 0;
    }
    c->req = NULL;
    uv_close((uv_handle_t *)&c->tcp, conn_close_cb);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    *buf = uv_buf_init(read_buf, sizeof read_buf - 1);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

/* A connection reads from connect to close, so that no request pays for
 * epoll_ctl calls; bytes that arrive while the request is paused (head
 * handed to Lua, or throttled) wait in r->pending. */
static void conn_read(sglr_upconn_t *c, int on)
{
    if (on && !c->reading && !c->closing) {
        if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) == 0)
            c->reading = 1;
    } else if (!on && c->reading) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = 0;
    }
}

static void conn_make_idle(sglr_upconn_t *c)
{
    sglr_pool_t *p = c->pool;
    c->req = NULL;
    if (p->nidle >= p->max_idle || p->refs == p->nidle + 1) {
        conn_close(c);
        return;
    }
    llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
    c->parser.data = c;
    c->idle = 1;
    c->next = p->idle;
    p->idle = c;
    p->nidle++;
    conn_read(c, 1);   /* an idle connection that speaks or closes is closed */
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    sglr_upconn_t *c = s->data;
    sglr_upreq_t *r = c->req;
    sglr_clock_tick();                 /* a worker's bytes, its end or its error: now */
    if (!r) {
        if (nread != 0)
            conn_close(c);
        return;
    }
    if (nread > 0) {
        r->got_bytes = 1;
        if (r->state == UP_HEAD || r->throttled) {
            /* paused: keep the bytes; stop reading if too many wait */
            if (sglr_buf_append(&r->pending, buf->base, (size_t)nread)) {
                req_fail(r, SGLR_UP_ENOMEM);
                return;
            }
            if (r->pending.len > (1u << 20))
                conn_read(c, 0);
            return;
        }
        buf->base[nread] = 0;          /* sglr_resp_head_fast's sentinel */
        req_feed(r, buf->base, (size_t)nread);
        return;
    }
    if (nread == 0)
        return;
    if (r->state == UP_HEAD || r->throttled) {
        /* the end arrived while paused: handled when the caller goes on */
        r->eof_pending = nread == UV_EOF ? 1 : 2;
        conn_read(c, 0);
        return;
    }
    req_eof(r, (int)nread);
}

/* The worker closed the connection (err = UV_EOF) or it failed. */
static void req_eof(sglr_upreq_t *r, int err)
{
    sglr_upconn_t *c = r->conn;
    int nread = err;
    /* EOF or error */
    if (nread == UV_EOF && r->state == UP_BODY && !r->fast && llhttp_message_needs_eof(&c->parser)) {
        r->in_parse = 1;
        llhttp_errno_t e = llhttp_finish(&c->parser);
        r->in_parse = 0;
        (void)e;
        if (r->complete) {
            conn_close(c);
            r->conn = NULL;
            r->on_done(r, SGLR_UP_OK);
            return;
        }
    }
    req_fail(r, SGLR_UP_ERESET);
}

static void write_cb(uv_write_t *w, int status)
{
    sglr_upconn_t *c = w->data;
    c->writing = 0;
    if (c->park) {
        /* the response came in before libuv reported the write done */
        c->park = 0;
        if (status < 0 || c->closing)
            conn_close(c);
        else
            conn_make_idle(c);
        return;
    }
    if (status < 0 && c->req)
        req_fail(c->req, SGLR_UP_ERESET);
}

static void conn_send(sglr_upconn_t *c, sglr_upreq_t *r)
{
    r->state = UP_WAIT_HEAD;
    r->sent_at = sglr_loop_now();
    /* Usually the socket takes the whole request at once: no write request,
     * no callback. Otherwise the rest is queued from r->out and r->body,
     * which stay put: r is freed only from its timer's close callback, after
     * an abort has closed this connection and so cancelled the write, and a
     * borrowed body outlives r (its owner frees r first). */
    uv_buf_t bufs[2] = { uv_buf_init(r->out.data, (unsigned)r->out.len),
                         uv_buf_init((char *)(r->body ? r->body : ""), (unsigned)r->body_len) };
    unsigned nbufs = r->body_len ? 2 : 1;
    int n = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
    if (n < 0 && n != UV_EAGAIN) {
        req_fail(r, SGLR_UP_ERESET);
        return;
    }
    size_t done = n > 0 ? (size_t)n : 0;
    if (done < r->out.len + r->body_len) {
        unsigned k = 0;
        if (done < r->out.len) {
            c->wbuf[k++] = uv_buf_init(r->out.data + done, (unsigned)(r->out.len - done));
            done = 0;
        } else {
            done -= r->out.len;
        }
        if (r->body_len)
            c->wbuf[k++] = uv_buf_init((char *)r->body + done, (unsigned)(r->body_len - done));
        c->wreq.data = c;
        if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, c->wbuf, k, write_cb) < 0) {
            req_fail(r, SGLR_UP_ERESET);
            return;
        }
        c->writing = 1;
    }
    conn_read(c, 1);
}

static void connect_cb(uv_connect_t *creq, int status)
{
    sglr_upconn_t *c = creq->data;
    sglr_upreq_t *r = c->req;
    if (c->closing || !r)
        return;
    if (status < 0) {
        sglr_pool_t *p = r->pool;
        pool_connect_failed(p, c->addr_gen);
        /* Another address of the name may answer (a worker on 127.0.0.1
         * only, asked for as "localhost", which may give ::1 first): each
         * is tried once within the connect timeout. */
        if (p->host && p->naddrs > 1 && ++r->addr_tries < p->naddrs) {
            req_release_conn(r, 0);
            req_connect(r);
            return;
        }
        req_fail(r, SGLR_UP_ECONNECT);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    conn_send(c, r);
}

/* --- parser callbacks ------------------------------------------------------------ */

static int on_status(llhttp_t *p, const char *at, size_t n) { return 0; }

/* A worker's response head is capped like a client's request head. */
#define MAX_RESPONSE_HEAD (64u << 10)

/* The status is parsed before the header fields: a 2xx whose fields
 * nobody reads (skip_ok_fields) is not stored. */
static int skip_fields(const llhttp_t *p, const sglr_upreq_t *r)
{
    return r->skip_ok_fields && p->status_code >= 200 && p->status_code < 300;
}

static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    sglr_upconn_t *c = p->data;
    if (!c->req || c->req->head.buf.len + c->req->skipped + n > MAX_RESPONSE_HEAD)
        return -1;
    if (skip_fields(p, c->req)) {
        c->req->skipped += n;
        return 0;
    }
    return sglr_head_field(&c->req->head, at, n) == 0 ? 0 : -1;
}

static int on_header_field_complete(llhttp_t *p)
{
    sglr_upconn_t *c = p->data;
    if (c->req && skip_fields(p, c->req))
        return 0;
    return c->req && sglr_head_field_done(&c->req->head) == 0 ? 0 : -1;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    sglr_upconn_t *c = p->data;
    if (!c->req || c->req->head.buf.len + c->req->skipped + n > MAX_RESPONSE_HEAD)
        return -1;
    if (skip_fields(p, c->req)) {
        c->req->skipped += n;
        return 0;
    }
    return sglr_head_value(&c->req->head, at, n) == 0 ? 0 : -1;
}

static int on_headers_complete(llhttp_t *p)
{
    sglr_upconn_t *c = p->data;
    sglr_upreq_t *r = c->req;
    if (!r)
        return -1;
    if (p->status_code < 200)      /* 1xx: wait for the real head */
        return 0;
    r->status = p->status_code;
    r->content_length = (p->flags & F_CONTENT_LENGTH) ? (long long)p->content_length : -1;
    r->state = UP_HEAD;
    /* The answer to HEAD has no body whatever its content-length says; the
     * response parser cannot know the method, so say it (1 = skip body). */
    if (r->out.len > 5 && memcmp(r->out.data, "HEAD ", 5) == 0)
        return 1;
    /* Nor has a 204 or 304, whatever its framing headers say (RFC 9112
     * 6.3): a chunked "body" would otherwise be parsed while the head is
     * not yet handed over, and a close then went unnoticed until the
     * deadline (found by fuzz_response). */
    if (r->status == 204 || r->status == 304)
        return 1;
    /* Without a body the parser completes the message without needing
     * another byte: let it run into on_message_complete, which pauses. */
    if (r->content_length == 0)
        return 0;
    return HPE_PAUSED;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    sglr_upconn_t *c = p->data;
    sglr_upreq_t *r = c->req;
    if (!r || r->abort_pending)
        return -1;
    r->on_body(r, at, n);
    return r->abort_pending ? -1 : 0;
}

static int on_message_complete(llhttp_t *p)
{
    sglr_upconn_t *c = p->data;
    sglr_upreq_t *r = c->req;
    if (!r)
        return -1;
    if (r->state == UP_WAIT_HEAD) {
        /* a 1xx response ended: reset the head for the real one */
        sglr_head_reset(&r->head);
        return 0;
    }
    r->keep_alive = llhttp_should_keep_alive(p);
    r->complete = 1;
    if (r->state != UP_HEAD)
        r->state = UP_DONE;
    return HPE_PAUSED;
}

/* --- requests ------------------------------------------------------------------ */

static void timer_close_cb(uv_handle_t *h)
{
    sglr_upreq_t *r = h->data;
    sglr_buf_free(&r->out);
    sglr_buf_free(&r->pending);
    sglr_head_free(&r->head);
    if (r->pool)
        sglr_pool_unref(r->pool);
    free(r);
}

/* Freed requests are recycled on the next loop turn (an idle handle, active
 * while any wait: after whatever call chain freed them has unwound, and the
 * loop does not block in between) onto a free list that keeps their timer
 * and buffers. One handle for all, not a 0 ms timer per request: that cost
 * a timer-heap insert and removal each. Sanitizer builds close and free
 * instead, so that a use after free is still caught. */
#define SPARE_MAX 256
static sglr_upreq_t *spare[SPARE_MAX];
static int nspare;
static sglr_upreq_t *recycle_q;
static uv_idle_t recycle_idle;
static int recycle_ready, recycle_off;     /* the handle runs; it was closed (shutdown) */

static void recycle(sglr_upreq_t *r)
{
    sglr_pool_unref(r->pool);
    r->pool = NULL;
    if (nspare < SPARE_MAX && r->out.cap <= (64u << 10) && r->pending.cap <= (64u << 10) &&
        r->head.buf.cap <= (64u << 10)) {
        spare[nspare++] = r;
        return;
    }
    uv_close((uv_handle_t *)&r->timer, timer_close_cb);
}

static void recycle_idle_cb(uv_idle_t *h)
{
    if (h)
        uv_idle_stop(h);
    while (recycle_q) {
        sglr_upreq_t *r = recycle_q;
        recycle_q = r->rnext;
        recycle(r);
    }
}

void sglr_upstream_release_spares(void)
{
    recycle_idle_cb(NULL);
    if (recycle_ready) {
        uv_close((uv_handle_t *)&recycle_idle, NULL);
        recycle_ready = 0;
    }
    recycle_off = 1;            /* a request freed from here on is closed at once */
    while (nspare > 0) {
        sglr_upreq_t *r = spare[--nspare];
        uv_close((uv_handle_t *)&r->timer, timer_close_cb);
    }
}

sglr_upreq_t *sglr_upreq_new(sglr_pool_t *p)
{
    static int ready;
    if (!ready) {
        llhttp_settings_init(&settings);
        settings.on_status = on_status;
        settings.on_header_field = on_header_field;
        settings.on_header_field_complete = on_header_field_complete;
        settings.on_header_value = on_header_value;
        settings.on_headers_complete = on_headers_complete;
        settings.on_body = on_body;
        settings.on_message_complete = on_message_complete;
        ready = 1;
    }
    sglr_upreq_t *r;
    if (nspare > 0) {
        /* a recycled request: its timer is initialized, its buffers kept */
        r = spare[--nspare];
        sglr_buf_t out = r->out, pending = r->pending;
        sglr_head_t head = r->head;
        uv_timer_t timer = r->timer;
        uint64_t due = r->timer_due;
        memset(r, 0, sizeof *r);
        r->timer_due = due;
        out.len = pending.len = 0;
        sglr_head_reset(&head);
        r->out = out;
        r->pending = pending;
        r->head = head;
        r->timer = timer;
    } else {
        r = calloc(1, sizeof *r);
        if (!r)
            return NULL;
        uv_timer_init(sglr_loop, &r->timer);
        uv_unref((uv_handle_t *)&r->timer);  /* lazy (below): the loop waits on the request, not on it */
        r->timer.data = r;
    }
    r->pool = p;
    sglr_pool_ref(p);
    r->content_length = -1;
    return r;
}

int sglr_upreq_build_ref(sglr_upreq_t *r, const char *method, const char *path, size_t plen,
                     const char *hdrs, size_t hlen, const char *body, size_t blen)
{
    sglr_buf_t *b = &r->out;
    b->len = 0;
    size_t ml = strlen(method);
    const sglr_pool_t *p = r->pool;
    size_t bpl = strlen(p->base_path), hpl = strlen(p->hostport);
    int has_length = body || strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0;
    /* one reservation for the whole head, then plain copies */
    size_t need = ml + 1 + bpl + plen + 17 + hpl + 2 + hlen + 7 + sglr_via_len + 16 + 20 + 2 + 2;
    if (sglr_buf_reserve(b, need))
        return -ENOMEM;
    char *d = b->data;
#define PUT(src, n) (memcpy(d, (src), (n)), d += (n))
    PUT(method, ml);
    *d++ = ' ';
    PUT(p->base_path, bpl);
    PUT(path, plen);
    PUT(" HTTP/1.1\r\nhost: ", 17);
    PUT(p->hostport, hpl);
    PUT("\r\n", 2);
    if (hlen)
        PUT(hdrs, hlen);
    if (sglr_via_len) {    /* the hop this router adds (loop detection) */
        PUT("via: ", 5);
        PUT(sglr_via_token, sglr_via_len);
        PUT("\r\n", 2);
    }
    if (has_length) {
        PUT("content-length: ", 16);
        d += sglr_u64_dec(d, blen);
        PUT("\r\n", 2);
    }
    PUT("\r\n", 2);
#undef PUT
    *d = 0;
    b->len = (size_t)(d - b->data);
    r->body = body;
    r->body_len = body ? blen : 0;
    return 0;
}

int sglr_upreq_build(sglr_upreq_t *r, const char *method, const char *path, size_t plen,
                     const char *hdrs, size_t hlen, const char *body, size_t blen)
{
    if (sglr_upreq_build_ref(r, method, path, plen, hdrs, hlen, body, blen) ||
        sglr_buf_append(&r->out, body, r->body_len))
        return -ENOMEM;
    r->body = NULL;
    r->body_len = 0;
    return 0;
}

/* The deadline timer is lazy: it is armed only when a request needs it
 * earlier than it is armed for, and never stopped. When it fires it
 * checks the request it belongs to now (none, or a later one on the same
 * recycled object) and arms itself again for what is due next, if
 * anything. A keep-alive stream of requests, each due a timeout from its
 * start, so touches the timer heap about once a timeout, not twice a
 * request. The handle keeps no loop alive (the request's connection or
 * lookup does). */
static int req_active(const sglr_upreq_t *r)
{
    return !r->freed && r->state != UP_NEW && r->state != UP_DONE && r->state != UP_ABORTED;
}

/* when the request's next deadline falls due (uv_now based), 0 = none */
static uint64_t req_due(const sglr_upreq_t *r)
{
    uint64_t next = 0;
    if ((r->state == UP_CONNECTING || r->state == UP_RESOLVING) && r->connect_deadline)
        next = r->connect_deadline;
    if (r->deadline && (!next || r->deadline < next))
        next = r->deadline;
    return next;
}

static void timer_cb(uv_timer_t *t)
{
    sglr_upreq_t *r = t->data;
    r->timer_due = 0;
    if (!req_active(r))
        return;
    uint64_t now = uv_now(sglr_loop);
    if ((r->state == UP_CONNECTING || r->state == UP_RESOLVING) && r->connect_deadline &&
        now >= r->connect_deadline) {
        if (r->state == UP_CONNECTING && r->conn)
            pool_connect_failed(r->pool, r->conn->addr_gen);
        req_fail(r, SGLR_UP_ECONNECT);
        return;
    }
    if (r->deadline && now >= r->deadline) {
        req_fail(r, SGLR_UP_ETIMEOUT);
        return;
    }
    uint64_t next = req_due(r);
    if (next) {
        uv_timer_start(&r->timer, timer_cb, next > now ? next - now : 0, 0);
        r->timer_due = next;
    }
}

static void arm_timer(sglr_upreq_t *r)
{
    uint64_t next = req_due(r);
    if (!next || (r->timer_due && r->timer_due <= next))
        return;                 /* nothing due, or the timer fires first and checks again */
    uint64_t now = uv_now(sglr_loop);
    uv_timer_start(&r->timer, timer_cb, next > now ? next - now : 0, 0);
    r->timer_due = next;
}

static void req_dial(sglr_upreq_t *r)
{
    sglr_pool_t *p = r->pool;
    if (p->idle && !r->retried) {
        sglr_upconn_t *c = p->idle;
        p->idle = c->next;
        p->nidle--;
        c->idle = 0;
        c->req = r;
        r->conn = c;
        r->reused = 1;
        arm_timer(r);
        conn_send(c, r);
        return;
    }
    if (!p->naddrs) {
        /* No address yet: wait for the lookup (started if none runs),
         * under the connect timeout. */
        r->state = UP_RESOLVING;
        r->wait_gen = p->resolving ? p->lookup_gen : p->lookup_gen + 1;
        pool_enqueue(r);
        arm_timer(r);
        if (pool_lookup(p) < 0)
            req_fail(r, SGLR_UP_ENOMEM);
        return;
    }
    req_connect(r);
}

/* A new connection to the pool's address for r. */
static void req_connect(sglr_upreq_t *r)
{
    sglr_pool_t *p = r->pool;
    sglr_upconn_t *c = calloc(1, sizeof *c);
    if (!c) {
        req_fail(r, SGLR_UP_ENOMEM);
        return;
    }
    c->pool = p;
    sglr_pool_ref(p);
    p->nconns++;
    uv_tcp_init(sglr_loop, &c->tcp);
    c->tcp.data = c;
    c->creq.data = c;
    llhttp_init(&c->parser, HTTP_RESPONSE, &settings);
    c->parser.data = c;
    c->addr_gen = p->addr_gen;
    c->req = r;
    r->conn = c;
    r->reused = 0;
    r->state = UP_CONNECTING;
    arm_timer(r);
    int e = uv_tcp_connect(&c->creq, &c->tcp, (struct sockaddr *)&p->addr, connect_cb);
    if (e < 0) {
        pool_connect_failed(p, c->addr_gen);
        req_fail(r, SGLR_UP_ECONNECT);
    }
}

int sglr_upreq_start(sglr_upreq_t *r, unsigned connect_timeout_ms, unsigned timeout_ms)
{
    uint64_t now = sglr_loop_now();     /* see sglr_loop_now in bridge.c */
    r->connect_timeout_ms = connect_timeout_ms;
    r->connect_deadline = connect_timeout_ms ? now + connect_timeout_ms : 0;
    r->deadline = timeout_ms ? now + timeout_ms : 0;
    r->t_start = sglr_clock_ms();
    req_dial(r);
    return 0;
}

/* Detach the request from its connection; keep the connection if it is
 * clean for another request. */
static void req_release_conn(sglr_upreq_t *r, int reusable)
{
    sglr_upconn_t *c = r->conn;
    if (!c)
        return;
    r->conn = NULL;
    c->req = NULL;
    if (reusable && !c->closing && c->writing) {
        /* The worker answered while our write request is still with libuv:
         * wreq may not be reused before write_cb, and unsent bytes would be
         * read from r->out after r is gone. Park the connection if every
         * byte went out, close it otherwise. */
        if (c->tcp.write_queue_size == 0)
            c->park = 1;
        else
            conn_close(c);
        return;
    }
    if (reusable && !c->closing)
        conn_make_idle(c);
    else
        conn_close(c);
}

static void req_fail(sglr_upreq_t *r, int err)
{
    if (r->state == UP_DONE || r->state == UP_ABORTED)
        return;
    if (r->state == UP_RESOLVING)
        pool_unqueue(r);
    if (r->in_parse) {
        /* inside llhttp_execute: finish once it has returned */
        r->err = err;
        r->abort_pending = 1;
        return;
    }
    /* A reused connection that fails at once, before any byte came back,
     * was closed by the worker while idle: retry on a fresh one. Later than
     * that the worker may have been working on the request: no retry. */
    int stale = r->reused && !r->got_bytes && !r->retried &&
                (err == SGLR_UP_ERESET) && r->state == UP_WAIT_HEAD &&
                sglr_loop_now() - r->sent_at <= 250;
    req_release_conn(r, 0);
    if (stale) {
        r->retried = 1;
        r->pool->replays++;
        sglr_log(SGLR_LOG_DEBUG, "upstream %s: a reused keep-alive connection failed before any "
                 "response byte; sending the request again on a new connection", r->pool->url);
        sglr_head_reset(&r->head);
        if (r->connect_timeout_ms)
            r->connect_deadline = sglr_loop_now() + r->connect_timeout_ms;
        req_dial(r);
        return;
    }
    r->state = UP_DONE;
    r->err = err;
    r->on_done(r, err);
}

static void req_complete(sglr_upreq_t *r)
{
    req_release_conn(r, r->keep_alive && r->pending.len == 0 && !r->eof_pending);
    r->on_done(r, SGLR_UP_OK);
}

/* A head read by sglr_resp_head_fast: handed over as llhttp's pause at
 * on_headers_complete would (the bytes after it wait in pending). */
static void fast_head(sglr_upreq_t *r, const char *data, size_t len, size_t used, int status,
                      long long cl, int keep_alive)
{
    r->fast = 1;
    r->fast_left = cl;
    r->fast_keep_alive = keep_alive;
    r->status = status;
    r->content_length = cl;
    r->state = UP_HEAD;
    if (cl == 0) {                 /* complete already, as llhttp's message end */
        r->complete = 1;
        r->keep_alive = keep_alive;
    }
    if (used < len && sglr_buf_append(&r->pending, data + used, len - used)) {
        req_fail(r, SGLR_UP_ENOMEM);
        return;
    }
    r->t_head = sglr_clock_ms();
    r->on_head(r);
}

/* An abort or failure asked for while the body was being delivered (the
 * caller's on_body ran) is carried out now -> 1 when it was. */
static int abort_deferred(sglr_upreq_t *r)
{
    if (!r->abort_pending)
        return 0;
    if (r->state == UP_ABORTED) {
        req_release_conn(r, 0);
        return 1;
    }
    r->abort_pending = 0;
    req_fail(r, r->err ? r->err : SGLR_UP_ERESET);
    return 1;
}

/* The body of a fast head: content-length bytes, then the response is
 * complete (bytes beyond it leave the connection unclean). */
static void fast_body(sglr_upreq_t *r, const char *data, size_t len)
{
    size_t n = (unsigned long long)r->fast_left < len ? (size_t)r->fast_left : len;
    if (n) {
        r->in_parse = 1;
        if (!r->abort_pending)
            r->on_body(r, data, n);
        r->in_parse = 0;
        if (abort_deferred(r))
            return;
        r->fast_left -= (long long)n;
    }
    if (r->fast_left == 0) {
        r->complete = 1;
        r->keep_alive = r->fast_keep_alive && n == len;
        r->state = UP_DONE;
        req_complete(r);
    }
}

static void req_feed(sglr_upreq_t *r, char *data, size_t len)
{
    sglr_upconn_t *c = r->conn;
    if (r->fast) {
        fast_body(r, data, len);
        return;
    }
    if (!r->llhttp_fed && r->state == UP_WAIT_HEAD && !(r->out.len > 5 && memcmp(r->out.data, "HEAD ", 5) == 0)) {
        int status, keep_alive;
        long long cl;
        size_t used = sglr_resp_head_fast(data, len, MAX_RESPONSE_HEAD, &r->head, r->skip_ok_fields,
                                          &status, &cl, &keep_alive);
        if (used) {
            fast_head(r, data, len, used, status, cl, keep_alive);
            return;
        }
    }
    r->llhttp_fed = 1;
    r->in_parse = 1;
    llhttp_errno_t e = llhttp_execute(&c->parser, data, len);
    r->in_parse = 0;
    if (abort_deferred(r))
        return;
    if (e == HPE_PAUSED) {
        const char *pos = llhttp_get_error_pos(&c->parser);
        size_t used = pos ? (size_t)(pos - data) : len;
        llhttp_resume(&c->parser);
        if (r->state == UP_HEAD) {
            sglr_buf_append(&r->pending, data + used, len - used);
            r->t_head = sglr_clock_ms();
            r->on_head(r);
            return;
        }
        if (r->state == UP_DONE) {
            /* bytes after a complete response: the connection is not clean */
            if (used < len)
                r->keep_alive = 0;
            req_complete(r);
            return;
        }
        return;
    }
    if (e != HPE_OK)
        req_fail(r, SGLR_UP_EPROTO);
}

static void req_drain(sglr_upreq_t *r);

void sglr_upreq_fail(sglr_upreq_t *r, int err)
{
    req_fail(r, err);
}

void sglr_upreq_continue(sglr_upreq_t *r)
{
    if (r->state != UP_HEAD)
        return;
    r->state = UP_BODY;
    if (r->complete) {       /* a response without body */
        r->state = UP_DONE;
        req_complete(r);
        return;
    }
    req_drain(r);
}

/* Parse what waited while the request was paused, then read on. */
static void req_drain(sglr_upreq_t *r)
{
    sglr_upconn_t *c = r->conn;
    if (!c)
        return;
    sglr_buf_t in = r->pending;
    r->pending = (sglr_buf_t){ 0 };
    if (in.len)
        req_feed(r, in.data, in.len);
    /* the buffer goes back for the next response unless the feed refilled
     * pending (r itself outlives this call: freed requests are recycled
     * on a later loop turn) */
    if (r->pending.cap == 0) {
        in.len = 0;
        r->pending = in;
    } else {
        sglr_buf_free(&in);
    }
    if (r->state != UP_BODY || r->conn != c || r->throttled)
        return;
    if (r->eof_pending) {
        int err = r->eof_pending == 1 ? UV_EOF : UV_ECONNRESET;
        r->eof_pending = 0;
        req_eof(r, err);
        return;
    }
    conn_read(c, 1);
}

void sglr_upreq_throttle(sglr_upreq_t *r, int on)
{
    if (r->throttled == on)
        return;
    r->throttled = on;
    if (!r->conn || r->state != UP_BODY)
        return;
    if (on)
        conn_read(r->conn, 0);
    else
        req_drain(r);
}

void sglr_upreq_abort(sglr_upreq_t *r)
{
    if (r->state == UP_DONE || r->state == UP_ABORTED)
        return;
    if (r->state == UP_RESOLVING)
        pool_unqueue(r);
    r->state = UP_ABORTED;
    if (r->in_parse) {
        r->abort_pending = 1;
        return;
    }
    req_release_conn(r, 0);
}

void sglr_upreq_free(sglr_upreq_t *r)
{
    if (r->state != UP_DONE && r->state != UP_ABORTED)
        sglr_upreq_abort(r);
    if (r->conn && !r->in_parse)
        req_release_conn(r, 0);
    r->freed = 1;
#ifdef SGLR_NO_FREELIST
    uv_close((uv_handle_t *)&r->timer, timer_close_cb);
#else
    if (recycle_off) {
        uv_close((uv_handle_t *)&r->timer, timer_close_cb);
        return;
    }
    if (!recycle_ready) {
        uv_idle_init(sglr_loop, &recycle_idle);
        recycle_ready = 1;
    }
    if (!recycle_q)
        uv_idle_start(&recycle_idle, recycle_idle_cb);
    r->rnext = recycle_q;
    recycle_q = r;
#endif
}
