/*
 * server.c: HTTP/1.1 server (see server.h for the shape).
 *
 * Parsing pauses at the end of each request (on_message_complete returns
 * HPE_PAUSED), so a connection never has two exchanges in flight; bytes that
 * arrive meanwhile are kept in conn->pending and parsed once the response is
 * done. Dispatch happens after llhttp_execute returns, never from inside a
 * parser callback, and a response finished synchronously by the handler is
 * picked up by the dispatch loop rather than by recursion.
 */
#include "server.h"
#include "sglr.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <llhttp.h>

/* What the connection waits for, and until when (uv_now ms; the server's
 * sweep timer enforces it once a second, so a request costs no timer). */
enum { WAIT_NONE, WAIT_IDLE, WAIT_HEADER, WAIT_BODY };

struct sglr_conn_s {
    uv_tcp_t tcp;
    sglr_server_t *srv;
    llhttp_t parser;
    sglr_exchange_t *x;         /* exchange being read or handled */
    sglr_buf_t pending;         /* bytes not parsed yet */
    size_t header_bytes;
    int reject_status;          /* 400/413/431 decided inside a parser callback */
    const char *reject_msg;
    int waiting;                /* WAIT_* */
    uint64_t deadline;          /* of waiting */
    uint64_t write_deadline;    /* unsent response bytes must move by then (0: none) */
    int write_blocked;          /* next request held back: responses unsent */
    int in_trailers;            /* header callbacks now are chunked trailers */
    const char *parse_end;      /* end of the bytes llhttp_execute is given */
    int llhttp_mid;             /* llhttp holds part of a request: it reads on */
    size_t field_len;           /* of the header name being read */
    int closing;
    int close_after;            /* close once the current response is written */
    int dispatching;            /* inside the dispatch loop */
    int reading;
    int shutting;               /* shutdown requested: no more requests */
    int queued;                 /* on the deferred-dispatch list */
    sglr_conn_t *prev, *next;
    sglr_conn_t *qnext;         /* deferred-dispatch list */
};

typedef struct {
    uv_write_t req;
    sglr_conn_t *conn;
    uv_buf_t buf;
    char data[];
} write_req_t;

int sglr_exchanges_active;
unsigned long sglr_requests_fast;
size_t sglr_exchange_body_bytes;

static llhttp_settings_t parser_settings;
static char read_buf[64 * 1024 + 1];    /* + a NUL after the bytes read (sglr_req_fast) */

static void conn_close(sglr_conn_t *c);
static void conn_shutdown(sglr_conn_t *c);
static void conn_dispatch(sglr_conn_t *c, const char *data, size_t len);
static void conn_start_read(sglr_conn_t *c);
static void dispatch_later(sglr_conn_t *c);
static void conn_wait(sglr_conn_t *c, int what, unsigned ms);

const char *sglr_status_text(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 304: return "Not Modified";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 411: return "Length Required";
    case 413: return "Payload Too Large";
    case 415: return "Unsupported Media Type";
    case 422: return "Unprocessable Entity";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 508: return "Loop Detected";
    default: return "Unknown";
    }
}

/* --- exchanges ----------------------------------------------------------- */

/* Finished exchanges are kept on a free list with their buffers (head,
 * header index, body, routing text, cork), so a steady stream of requests
 * allocates nothing here. Big buffers are not kept; sanitizer builds keep
 * nothing, so that a use after free is still caught. */
#define SPARE_MAX 256
#define SPARE_BUF_MAX (64u << 10)
#define SPARE_SMALL_BUF_MAX (16u << 10)   /* routing text, cork: kept when this small */
static sglr_exchange_t *spare[SPARE_MAX];
static int nspare;

static sglr_exchange_t *exchange_new(sglr_conn_t *c)
{
    sglr_exchange_t *x;
    if (nspare > 0) {
        x = spare[--nspare];
        sglr_head_t head = x->head;
        sglr_buf_t body = x->body, text = x->text, cork = x->cork;
        memset(x, 0, sizeof *x);
        sglr_head_reset(&head);
        body.len = text.len = cork.len = 0;
        x->head = head;
        x->body = body;
        x->text = text;
        x->cork = cork;
    } else {
        x = calloc(1, sizeof *x);
        if (!x)
            return NULL;
    }
    x->conn = c;
    x->server = c->srv;
    x->holds = 1;              /* the connection's */
    x->start_ms = sglr_clock_ms();
    return x;
}

static void exchange_free(sglr_exchange_t *x)
{
    sglr_exchange_body_bytes -= x->body_held;
    x->body_held = 0;
#ifndef SGLR_NO_FREELIST
    if (nspare < SPARE_MAX && x->head.buf.cap <= SPARE_BUF_MAX && x->body.cap <= SPARE_BUF_MAX) {
        if (x->text.cap > SPARE_SMALL_BUF_MAX)
            sglr_buf_free(&x->text);
        if (x->cork.cap > SPARE_SMALL_BUF_MAX)
            sglr_buf_free(&x->cork);
        spare[nspare++] = x;
        return;
    }
#endif
    sglr_buf_free(&x->cork);
    sglr_buf_free(&x->text);
    sglr_head_free(&x->head);
    sglr_buf_free(&x->body);
    free(x);
}

void sglr_exchange_hold(sglr_exchange_t *x)
{
    x->holds++;
}

void sglr_exchange_release(sglr_exchange_t *x)
{
    if (--x->holds == 0)
        exchange_free(x);
}

/* The exchange reached its end (answered or abandoned): counted once. */
static void exchange_settle(sglr_exchange_t *x)
{
    if (x->state == SGLR_X_HANDLING || x->state == SGLR_X_STREAMING)
        sglr_exchanges_active--;
    x->state = SGLR_X_DONE;
}

const char *sglr_exchange_method(const sglr_exchange_t *x)
{
    return llhttp_method_name((llhttp_method_t)x->method);
}

size_t sglr_exchange_write_queue(const sglr_exchange_t *x)
{
    return x->conn ? x->conn->tcp.write_queue_size : 0;
}

int sglr_exchange_peer(const sglr_exchange_t *x, char *buf, size_t len)
{
    struct sockaddr_storage ss;
    int n = (int)sizeof ss, rc;
    if (!x->conn)
        return UV_ENOTCONN;
    rc = uv_tcp_getpeername(&x->conn->tcp, (struct sockaddr *)&ss, &n);
    if (rc < 0)
        return rc;
    if (ss.ss_family == AF_INET6)
        return uv_ip6_name((const struct sockaddr_in6 *)&ss, buf, len);
    return uv_ip4_name((const struct sockaddr_in *)&ss, buf, len);
}

/* --- writing -------------------------------------------------------------- */

static void write_cb(uv_write_t *req, int status)
{
    write_req_t *w = (write_req_t *)req;
    sglr_conn_t *c = w->conn;
    free(w);
    if (status < 0) {
        conn_close(c);
        return;
    }
    size_t queued = c->tcp.write_queue_size;
    unsigned wt = c->srv->opts.write_timeout_ms;
    /* the client took bytes: the stall clock starts again */
    c->write_deadline = queued && wt ? uv_now(sglr_loop) + wt : 0;
    if (c->write_blocked && queued < SGLR_WRITE_LOW) {
        c->write_blocked = 0;
        dispatch_later(c);          /* the next pipelined request, and reading */
    }
    sglr_exchange_t *x = c->x;
    if (x && x->on_drain && queued < SGLR_WRITE_LOW)
        x->on_drain(x);
}

/* Write pieces in order. Most writes go out at once with uv_try_write (one
 * writev, no request, no callback, no epoll change); only what the socket
 * did not take is copied into a queued uv_write. */
static int conn_writev(sglr_conn_t *c, uv_buf_t *in, unsigned nin)
{
    if (c->closing || c->shutting)
        return -EPIPE;
    uv_buf_t bufs[8];
    unsigned nbufs = 0;
    size_t total = 0;
    for (unsigned i = 0; i < nin && nbufs < 8; i++) {
        if (in[i].len) {
            bufs[nbufs++] = in[i];
            total += in[i].len;
        }
    }
    if (total == 0)
        return 0;
    size_t done = 0;
    int r = uv_try_write((uv_stream_t *)&c->tcp, bufs, nbufs);
    if (r >= 0)
        done = (size_t)r;
    else if (r != UV_EAGAIN) {
        conn_close(c);
        return r;
    }
    if (done == total)
        return 0;
    write_req_t *w = malloc(sizeof *w + (total - done));
    if (!w) {
        conn_close(c);
        return -ENOMEM;
    }
    w->conn = c;
    size_t off = 0, skip = done;
    for (unsigned i = 0; i < nbufs; i++) {
        size_t len = bufs[i].len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        memcpy(w->data + off, bufs[i].base + skip, len - skip);
        off += len - skip;
        skip = 0;
    }
    w->buf = uv_buf_init(w->data, (unsigned)off);
    r = uv_write(&w->req, (uv_stream_t *)&c->tcp, &w->buf, 1, write_cb);
    if (r < 0) {
        free(w);
        conn_close(c);
        return r;
    }
    if (!c->write_deadline && c->srv->opts.write_timeout_ms)
        c->write_deadline = uv_now(sglr_loop) + c->srv->opts.write_timeout_ms;
    return 0;
}

static int conn_write3(sglr_conn_t *c, const char *a, size_t na, const char *b, size_t nb,
                       const char *d, size_t nd)
{
    uv_buf_t bufs[3] = { uv_buf_init((char *)a, (unsigned)na),
                         uv_buf_init((char *)b, (unsigned)nb),
                         uv_buf_init((char *)d, (unsigned)nd) };
    return conn_writev(c, bufs, 3);
}

/* "HTTP/1.1 200 OK\r\n" into out (>= 64 bytes); returns its length. */
static size_t status_line(char *out, int status)
{
    const char *text = sglr_status_text(status);
    memcpy(out, "HTTP/1.1 ", 9);
    out[9] = (char)('0' + (status / 100) % 10);
    out[10] = (char)('0' + (status / 10) % 10);
    out[11] = (char)('0' + status % 10);
    out[12] = ' ';
    size_t tl = strlen(text);
    memcpy(out + 13, text, tl);
    memcpy(out + 13 + tl, "\r\n", 2);
    return 15 + tl;
}


/* "content-length: N\r\n" [+ "connection: close" or, for an HTTP/1.0
 * client that asked to keep the connection, "connection: keep-alive"] +
 * "\r\n" */
static size_t length_tail(char *out, unsigned long long len, int keep, int http10)
{
    size_t n = 0;
    memcpy(out, "content-length: ", 16);
    n = 16 + sglr_u64_dec(out + 16, len);
    if (!keep) {
        memcpy(out + n, "\r\nconnection: close", 19);
        n += 19;
    } else if (http10) {
        memcpy(out + n, "\r\nconnection: keep-alive", 24);
        n += 24;
    }
    memcpy(out + n, "\r\n\r\n", 4);
    return n + 4;
}

/* Streamed writes of an exchange: while corked they collect in x->cork and
 * go out as one write on uncork (status line, headers and a small body in
 * one packet instead of three). */
static int x_write3(sglr_exchange_t *x, const char *a, size_t na, const char *b, size_t nb,
                    const char *d, size_t nd)
{
    if (!x->corked)
        return conn_write3(x->conn, a, na, b, nb, d, nd);
    sglr_buf_t *c = &x->cork;
    if (sglr_buf_reserve(c, na + nb + nd))
        return -ENOMEM;
    if (na)
        memcpy(c->data + c->len, a, na);
    if (nb)
        memcpy(c->data + c->len + na, b, nb);
    if (nd)
        memcpy(c->data + c->len + na + nb, d, nd);
    c->len += na + nb + nd;
    c->data[c->len] = 0;
    return 0;
}

void sglr_exchange_cork(sglr_exchange_t *x)
{
    x->corked = 1;
}

int sglr_exchange_uncork(sglr_exchange_t *x)
{
    if (!x->corked)
        return 0;
    x->corked = 0;
    int r = 0;
    if (x->conn && x->cork.len)
        r = conn_write3(x->conn, x->cork.data, x->cork.len, NULL, 0, NULL, 0);
    /* the bytes were copied or sent: the buffer stays for the next use */
    x->cork.len = 0;
    if (x->cork.cap > SPARE_SMALL_BUF_MAX)
        sglr_buf_free(&x->cork);
    return r;
}

static int head_keep_alive(sglr_exchange_t *x)
{
    sglr_conn_t *c = x->conn;
    return x->keep_alive && !c->close_after && !c->srv->closing;
}

/* Pipelined requests that wait behind a finished response are dispatched
 * from an idle handle, never from inside the call that finished the
 * response: that call may come from Lua, even from a finalizer (a collected
 * exchange answers 500), where starting another request's Lua is unsafe. */
static uv_idle_t dispatch_idle;
static int dispatch_idle_ready;
static sglr_conn_t *dispatch_head;

static void dispatch_idle_cb(uv_idle_t *h)
{
    sglr_conn_t *list = dispatch_head;
    dispatch_head = NULL;
    uv_idle_stop(h);
    while (list) {
        sglr_conn_t *c = list;
        list = c->qnext;
        c->qnext = NULL;
        c->queued = 0;
        sglr_clock_tick();        /* each pipelined request starts at its own time */
        if (!c->closing && !c->shutting)
            conn_dispatch(c, NULL, 0);
    }
}

static void dispatch_later(sglr_conn_t *c)
{
    if (c->queued)
        return;
    if (!dispatch_idle_ready) {
        uv_idle_init(sglr_loop, &dispatch_idle);
        uv_unref((uv_handle_t *)&dispatch_idle);
        dispatch_idle_ready = 1;
    }
    c->queued = 1;
    c->qnext = dispatch_head;
    dispatch_head = c;
    uv_idle_start(&dispatch_idle, dispatch_idle_cb);
}

void sglr_server_shutdown(void)
{
    if (dispatch_idle_ready) {
        uv_close((uv_handle_t *)&dispatch_idle, NULL);
        dispatch_idle_ready = 0;
        dispatch_head = NULL;
    }
}

static void dispatch_unqueue(sglr_conn_t *c)
{
    if (!c->queued)
        return;
    for (sglr_conn_t **pp = &dispatch_head; *pp; pp = &(*pp)->qnext) {
        if (*pp == c) {
            *pp = c->qnext;
            break;
        }
    }
    c->queued = 0;
}

/* The response is complete: release the connection for the next request. */
static void exchange_done(sglr_exchange_t *x)
{
    sglr_conn_t *c = x->conn;
    exchange_settle(x);
    if (!c)
        return;
    int keep = head_keep_alive(x);
    c->x = NULL;
    x->conn = NULL;
    sglr_exchange_release(x);
    if (!keep) {
        conn_shutdown(c);
        return;
    }
    if (c->pending.len) {
        if (!c->dispatching)
            dispatch_later(c);
    } else {
        conn_wait(c, WAIT_IDLE, c->srv->opts.keepalive_timeout_ms);
        if (!c->reading && !c->write_blocked)
            conn_start_read(c);
    }
}

int sglr_exchange_respond(sglr_exchange_t *x, int status, const char *hdrs, size_t hlen,
                          const char *body, size_t blen)
{
    if (x->state != SGLR_X_HANDLING)
        return -EINVAL;
    x->status = status;
    if (!x->conn) {
        exchange_settle(x);
        return 0;
    }
    char head[64], tail[96];
    size_t n = status_line(head, status);
    size_t m = length_tail(tail, blen, head_keep_alive(x), x->http_minor == 0);
    if (x->method == HTTP_HEAD)
        blen = 0;
    /* one writev: status line, given headers, framing headers, body */
    uv_buf_t bufs[4] = { uv_buf_init(head, (unsigned)n), uv_buf_init((char *)hdrs, (unsigned)hlen),
                         uv_buf_init(tail, (unsigned)m), uv_buf_init((char *)body, (unsigned)blen) };
    int r = conn_writev(x->conn, bufs, 4);
    x->bytes_out += blen;
    exchange_done(x);
    return r;
}

int sglr_exchange_start(sglr_exchange_t *x, int status, const char *hdrs, size_t hlen,
                        long long content_length)
{
    if (x->state != SGLR_X_HANDLING)
        return -EINVAL;
    x->status = status;
    x->state = SGLR_X_STREAMING;
    if (!x->conn)
        return -EPIPE;
    sglr_conn_t *c = x->conn;
    char tail[160];
    int m;
    /* A response to HEAD and a 1xx/204/304 have no body: no framing for
     * one, and nothing written after the head */
    x->nobody = x->method == HTTP_HEAD || status < 200 || status == 204 || status == 304;
    if (x->nobody && (status == 204 || status == 304 || status < 200)) {
        m = snprintf(tail, sizeof tail, "%s\r\n", head_keep_alive(x) ? "" : "connection: close\r\n");
    } else if (content_length >= 0) {
        m = (int)length_tail(tail, (unsigned long long)content_length, head_keep_alive(x),
                             x->http_minor == 0);
    } else if (x->nobody) {
        m = snprintf(tail, sizeof tail, "%s\r\n", head_keep_alive(x) ? "" : "connection: close\r\n");
    } else if (x->http_minor == 0) {
        /* HTTP/1.0 has no chunked encoding: the end is the connection's end */
        c->close_after = 1;
        m = snprintf(tail, sizeof tail, "connection: close\r\n\r\n");
    } else {
        x->chunked = 1;
        m = snprintf(tail, sizeof tail, "transfer-encoding: chunked\r\n%s\r\n",
                     head_keep_alive(x) ? "" : "connection: close\r\n");
    }
    char head[64];
    size_t n = status_line(head, status);
    return x_write3(x, head, n, hdrs, hlen, tail, (size_t)m);
}

int sglr_exchange_write(sglr_exchange_t *x, const char *data, size_t len)
{
    if (x->state != SGLR_X_STREAMING)
        return -EINVAL;
    if (!x->conn)
        return -EPIPE;
    if (len == 0 || x->nobody)
        return 0;
    x->bytes_out += len;
    if (!x->chunked)
        return x_write3(x, data, len, NULL, 0, NULL, 0);
    char size[24];
    static const char hex[] = "0123456789abcdef";
    char tmp[20];
    size_t k = 0, n = 0;
    for (size_t v = len; v; v >>= 4)
        tmp[k++] = hex[v & 15];
    while (k)
        size[n++] = tmp[--k];
    size[n++] = '\r';
    size[n++] = '\n';
    return x_write3(x, size, n, data, len, "\r\n", 2);
}

int sglr_exchange_finish(sglr_exchange_t *x)
{
    if (x->state != SGLR_X_STREAMING)
        return -EINVAL;
    int r = 0;
    if (x->conn && x->chunked)
        r = x_write3(x, "0\r\n\r\n", 5, NULL, 0, NULL, 0);
    if (x->conn)
        sglr_exchange_uncork(x);
    exchange_done(x);
    return r;
}

void sglr_exchange_abort(sglr_exchange_t *x)
{
    sglr_conn_t *c = x->conn;
    if (c)
        sglr_exchange_uncork(x);
    if (c)
        c->close_after = 1;
    if (x->state == SGLR_X_HANDLING || x->state == SGLR_X_STREAMING)
        exchange_done(x);
}

/* --- parser callbacks ------------------------------------------------------ */

static void conn_wait(sglr_conn_t *c, int what, unsigned ms)
{
    c->waiting = ms ? what : WAIT_NONE;
    c->deadline = ms ? uv_now(sglr_loop) + ms : 0;
}

static int on_message_begin(llhttp_t *p)
{
    sglr_conn_t *c = p->data;
    c->header_bytes = 0;
    c->in_trailers = 0;
    conn_wait(c, WAIT_HEADER, c->srv->opts.header_timeout_ms);
    c->x = exchange_new(c);
    return c->x ? 0 : -1;
}


static int refuse(sglr_conn_t *c, const char *msg)
{
    c->reject_status = 400;
    c->reject_msg = msg;
    return -1;
}

static int count_header(sglr_conn_t *c, size_t n)
{
    c->header_bytes += n;
    if (c->header_bytes > c->srv->opts.max_header) {
        c->reject_status = 431;
        return -1;
    }
    return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n)
{
    sglr_conn_t *c = p->data;
    if (count_header(c, n))
        return -1;
    /* a URL ended by the line end has no version: HTTP/0.9, which llhttp
     * would only finish on the next byte (a client waiting for an answer
     * never sends it) */
    if (at + n < c->parse_end && (at[n] == '\r' || at[n] == '\n'))
        return refuse(c, "HTTP/0.9 requests are not served");
    return sglr_head_url(&c->x->head, at, n) ? -1 : 0;
}

/* Chunked trailers come through the header callbacks after the body: they
 * are dropped, never merged into the request's headers. */
static int on_header_field(llhttp_t *p, const char *at, size_t n)
{
    sglr_conn_t *c = p->data;
    if (c->in_trailers)
        return 0;
    c->field_len += n;
    if (count_header(c, n + 4))
        return -1;
    return sglr_head_field(&c->x->head, at, n) ? -1 : 0;
}

static int on_header_field_complete(llhttp_t *p)
{
    sglr_conn_t *c = p->data;
    if (c->in_trailers)
        return 0;
    if (c->field_len == 0)
        return refuse(c, "empty header name");
    c->field_len = 0;
    return sglr_head_field_done(&c->x->head) ? -1 : 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n)
{
    sglr_conn_t *c = p->data;
    if (c->in_trailers)
        return 0;
    if (count_header(c, n))
        return -1;
    return sglr_head_value(&c->x->head, at, n) ? -1 : 0;
}

static int on_headers_complete(llhttp_t *p)
{
    sglr_conn_t *c = p->data;
    sglr_exchange_t *x = c->x;
    x->method = p->method;
    x->http_minor = p->http_minor;
    c->in_trailers = 1;
    if (p->http_major != 1)
        return refuse(c, "only HTTP/1.0 and HTTP/1.1 are served");
    if (p->http_minor == 1) {
        int hosts = 0;
        for (int i = 0; i < x->head.nhdrs; i++) {
            const sglr_hdr_t *h = &x->head.hdrs[i];
            hosts += h->name_len == 4 && memcmp(x->head.buf.data + h->name_off, "host", 4) == 0;
        }
        if (hosts != 1)
            return refuse(c, "an HTTP/1.1 request needs exactly one Host header");
    }
    /* every Via line: each hop appends its own */
    for (int i = 0; sglr_via_len && i < x->head.nhdrs; i++) {
        const sglr_hdr_t *h = &x->head.hdrs[i];
        if (h->name_len == 3 && memcmp(x->head.buf.data + h->name_off, "via", 3) == 0 &&
            memmem(x->head.buf.data + h->value_off, h->value_len, sglr_via_token, sglr_via_len)) {
            refuse(c, "request loop: this request already passed through this router");
            c->reject_status = 508;
            return -1;
        }
    }
    conn_wait(c, WAIT_BODY, c->srv->opts.body_timeout_ms);
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > c->srv->opts.max_body) {
        c->reject_status = 413;
        return -1;
    }
    /* a large body of known length is allocated once, not grown by
     * doubling (each growth a copy of all that came, on the loop) */
    if ((p->flags & F_CONTENT_LENGTH) && p->content_length > (64u << 10) &&
        sglr_buf_reserve(&x->body, (size_t)p->content_length))
        return -1;
    size_t elen;
    const char *expect = sglr_head_get(&x->head, "expect", &elen);
    if (expect && elen == 12 && strncasecmp(expect, "100-continue", 12) == 0) {
        conn_write3(c, "HTTP/1.1 100 Continue\r\n\r\n", 25, NULL, 0, NULL, 0);
        /* a failed write closed the connection and dropped c->x: stop the
         * parser before it calls back into the exchange */
        if (c->closing)
            return -1;
    }
    return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n)
{
    sglr_conn_t *c = p->data;
    sglr_exchange_t *x = c->x;
    if (x->body.len + n > c->srv->opts.max_body) {
        c->reject_status = 413;
        return -1;
    }
    if (c->waiting == WAIT_BODY)        /* a body may take long, but not stall */
        c->deadline = uv_now(sglr_loop) + c->srv->opts.body_timeout_ms;
    return sglr_buf_append(&x->body, at, n) ? -1 : 0;
}

static int on_message_complete(llhttp_t *p)
{
    sglr_conn_t *c = p->data;
    c->x->keep_alive = llhttp_should_keep_alive(p);
    c->x->state = SGLR_X_HANDLING;
    c->waiting = WAIT_NONE;
    return HPE_PAUSED;
}

/* --- connections ----------------------------------------------------------- */

/* The server's owner may free it once the listener and every connection
 * are closed (connections point at their server until then). */
static void server_maybe_closed(sglr_server_t *s)
{
    if (s->listener_closed && !s->sweep_open && s->nconns == 0 && s->on_closed) {
        void (*cb)(sglr_server_t *) = s->on_closed;
        s->on_closed = NULL;
        cb(s);
    }
}

static void conn_close_cb(uv_handle_t *h)
{
    sglr_conn_t *c = h->data;
    sglr_server_t *s = c->srv;
    dispatch_unqueue(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    sglr_buf_free(&c->pending);
    free(c);
    server_maybe_closed(s);
}

static void conn_close(sglr_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    sglr_exchange_t *x = c->x;
    if (x) {
        c->x = NULL;
        x->conn = NULL;
        int was_active = x->state == SGLR_X_HANDLING || x->state == SGLR_X_STREAMING;
        exchange_settle(x);
        if (was_active && x->on_close)
            x->on_close(x);
        sglr_exchange_release(x);
    }
    uv_close((uv_handle_t *)&c->tcp, conn_close_cb);
}

static void shutdown_cb(uv_shutdown_t *req, int status)
{
    sglr_conn_t *c = req->data;
    free(req);
    conn_close(c);
}

/* Close after the queued writes have gone out. */
static void conn_shutdown(sglr_conn_t *c)
{
    if (c->closing || c->shutting)
        return;
    c->shutting = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = 0;
    uv_shutdown_t *req = malloc(sizeof *req);
    if (!req || uv_shutdown(req, (uv_stream_t *)&c->tcp, shutdown_cb) < 0) {
        free(req);
        conn_close(c);
        return;
    }
    req->data = c;
}

/* Answer a request the parser refused and close the connection. */
static void conn_reject(sglr_conn_t *c, int status, const char *msg)
{
    char body[512];
    int n = snprintf(body, sizeof body,
                     "{\"error\":{\"message\":\"%s\",\"type\":\"invalid_request_error\"}}", msg);
    char head[256];
    int m = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n"
                     "content-length: %d\r\nconnection: close\r\n\r\n",
                     status, sglr_status_text(status), n);
    if (c->x) {
        sglr_exchange_t *x = c->x;
        c->x = NULL;
        x->conn = NULL;
        sglr_exchange_release(x);
    }
    conn_write3(c, head, (size_t)m, body, (size_t)n, NULL, 0);
    conn_shutdown(c);
}

/* A request read whole (by llhttp or conn_fast) goes to the handler. */
static void conn_request(sglr_conn_t *c, sglr_exchange_t *x)
{
    sglr_exchanges_active++;
    x->body_held = x->body.len;
    sglr_exchange_body_bytes += x->body_held;
    sglr_exchange_hold(x);
    c->srv->on_request(x);
    /* the handler may have answered already; then x->conn is NULL and the
     * dispatch loop goes on with the next pipelined request */
    sglr_exchange_release(x);
}

/* The common request shape, whole in `in`, read without llhttp
 * (sglr_req_fast) -> 1 when it was, and dispatched (what follows it is in
 * pending); 0 leaves `in` to llhttp (its names lowercased, which llhttp
 * does not mind). */
static int conn_fast(sglr_conn_t *c, sglr_buf_t *in)
{
    sglr_exchange_t *x = exchange_new(c);
    if (!x)
        return 0;
    sglr_fast_req_t fr;
    size_t used = sglr_req_fast(in->data, in->len, c->srv->opts.max_header, c->srv->opts.max_body,
                                &x->head, &fr);
    if (!used || (fr.body_len && sglr_buf_append(&x->body, in->data + fr.head_len, fr.body_len))) {
        x->conn = NULL;
        sglr_exchange_release(x);
        return 0;
    }
    sglr_requests_fast++;
    x->method = fr.method;
    x->http_minor = 1;
    x->keep_alive = fr.keep_alive;
    x->state = SGLR_X_HANDLING;
    c->x = x;
    c->waiting = WAIT_NONE;
    if (used < in->len)
        sglr_buf_append(&c->pending, in->data + used, in->len - used);
    conn_request(c, x);
    return 1;
}

/* Parse data (after any pending bytes) and dispatch complete requests.
 * Bytes that arrive with nothing pending are parsed where they are (the
 * read buffer, a NUL after them), and only what is left is kept. */
static void conn_dispatch(sglr_conn_t *c, const char *data, size_t len)
{
    const char *direct = NULL;
    if (data && len) {
        if (c->pending.len == 0) {
            direct = data;
        } else if (sglr_buf_append(&c->pending, data, len)) {
            conn_close(c);
            return;
        }
    }
    c->dispatching = 1;
    while (!c->closing && !c->shutting && (!c->x || c->x->state == SGLR_X_READING) &&
           (direct || c->pending.len)) {
        if (!c->x && c->tcp.write_queue_size > SGLR_WRITE_HIGH) {
            /* the client sends requests but does not read the answers:
             * no next request (and no reading) until they drain */
            c->write_blocked = 1;
            break;
        }
        /* parse from the read buffer or a private copy: pending is
         * refilled by what is left */
        sglr_buf_t in;
        int own = !direct;
        if (direct) {
            in = (sglr_buf_t){ (char *)direct, len, 0 };
            direct = NULL;
        } else {
            in = c->pending;
            c->pending = (sglr_buf_t){ 0 };
        }
        /* between requests, the common shape is read without llhttp */
        if (!c->llhttp_mid && !c->x && conn_fast(c, &in)) {
            if (own)
                sglr_buf_free(&in);
            continue;
        }
        c->parse_end = in.data + in.len;
        llhttp_errno_t err = llhttp_execute(&c->parser, in.data, in.len);
        c->llhttp_mid = err == HPE_OK;
        if (err == HPE_PAUSED) {
            const char *pos = llhttp_get_error_pos(&c->parser);
            size_t used = pos ? (size_t)(pos - in.data) : in.len;
            sglr_buf_append(&c->pending, in.data + used, in.len - used);
            if (own)
                sglr_buf_free(&in);
            llhttp_resume(&c->parser);
            conn_request(c, c->x);
            continue;
        }
        if (err == HPE_PAUSED_UPGRADE) {
            /* sglr upgrades nothing (h2c, websocket): the request was served
             * as plain HTTP/1.1, so go on parsing plain HTTP/1.1 */
            const char *pos = llhttp_get_error_pos(&c->parser);
            size_t used = pos ? (size_t)(pos - in.data) : in.len;
            sglr_buf_append(&c->pending, in.data + used, in.len - used);
            if (own)
                sglr_buf_free(&in);
            llhttp_resume_after_upgrade(&c->parser);
            continue;
        }
        if (own)
            sglr_buf_free(&in);
        if (err != HPE_OK) {
            if (c->reject_status == 413)
                conn_reject(c, 413, "request body exceeds --max-payload-size");
            else if (c->reject_status == 431)
                conn_reject(c, 431, "request headers too large");
            else if ((c->reject_status == 400 || c->reject_status == 508) && c->reject_msg)
                conn_reject(c, c->reject_status, c->reject_msg);
            else {
                char msg[160];
                snprintf(msg, sizeof msg, "malformed HTTP request: %s",
                         llhttp_errno_name(err));
                conn_reject(c, 400, msg);
            }
        }
    }
    /* bytes not parsed (writes blocked): kept for later */
    if (direct && !c->closing && sglr_buf_append(&c->pending, direct, len)) {
        c->dispatching = 0;
        conn_close(c);
        return;
    }
    c->dispatching = 0;
    if (c->closing || c->shutting)
        return;
    if (c->write_blocked) {
        if (c->reading) {
            uv_read_stop((uv_stream_t *)&c->tcp);
            c->reading = 0;
        }
        return;
    }
    /* reading stops while too many pipelined bytes wait; resume here */
    if (!c->reading && c->pending.len < (1 << 20))
        conn_start_read(c);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    *buf = uv_buf_init(read_buf, sizeof read_buf - 1);
}

static void read_cb(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    sglr_conn_t *c = stream->data;
    sglr_clock_tick();
    if (nread < 0) {
        conn_close(c);
        return;
    }
    if (nread == 0)
        return;
    if (c->x && c->x->state != SGLR_X_READING) {
        /* pipelined bytes while a request is handled: keep them for later */
        if (sglr_buf_append(&c->pending, buf->base, (size_t)nread)) {
            conn_close(c);
            return;
        }
        if (c->pending.len > (1 << 20)) {
            uv_read_stop(stream);
            c->reading = 0;
        }
        return;
    }
    buf->base[nread] = 0;              /* sglr_req_fast's sentinel */
    conn_dispatch(c, buf->base, (size_t)nread);
}

static void conn_start_read(sglr_conn_t *c)
{
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, read_cb) == 0)
        c->reading = 1;
}

/* Over max_conns: answer 503 and close, so the client learns why instead
 * of a reset; the log says so at most once a second. */
static void conn_refuse(sglr_conn_t *c)
{
    sglr_server_t *s = c->srv;
    s->refused++;
    double now = sglr_now_ms();
    if (now - s->refused_log_ms >= 1000) {
        s->refused_log_ms = now;
        sglr_log(SGLR_LOG_WARN, "%d client connections open (--max-connections): refusing new ones "
                 "with 503 (%lu so far)", s->opts.max_conns, s->refused);
    }
    static const char body[] =
        "{\"error\":{\"message\":\"too many client connections\",\"type\":\"overloaded\",\"code\":503}}";
    char head[160];
    int n = snprintf(head, sizeof head, "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                     "content-length: %zu\r\nconnection: close\r\n\r\n", sizeof body - 1);
    conn_write3(c, head, (size_t)n, body, sizeof body - 1, NULL, 0);
    conn_shutdown(c);
}

/* Once a second: close what waited too long (see sglr_server_opts_t). */
static void sweep_cb(uv_timer_t *t)
{
    sglr_server_t *s = t->data;
    uint64_t now = uv_now(sglr_loop);
    for (sglr_conn_t *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (c->closing || c->shutting)
            continue;
        if (c->write_deadline && now >= c->write_deadline) {
            sglr_log(SGLR_LOG_DEBUG, "client stopped reading its response for %u ms: closing",
                     s->opts.write_timeout_ms);
            conn_close(c);
        } else if (c->waiting != WAIT_NONE && now >= c->deadline) {
            if (c->waiting == WAIT_HEADER)
                conn_reject(c, 408, "request headers not complete within --client-header-timeout-secs");
            else if (c->waiting == WAIT_BODY)
                conn_reject(c, 408, "request body stalled for --client-body-timeout-secs");
            else
                conn_shutdown(c);       /* idle keep-alive */
        }
    }
}

static void sweep_close_cb(uv_handle_t *h)
{
    sglr_server_t *s = h->data;
    s->sweep_open = 0;
    server_maybe_closed(s);
}

static void on_connection(uv_stream_t *server, int status)
{
    sglr_server_t *s = server->data;
    if (status < 0 || s->closing)
        return;
    sglr_conn_t *c = calloc(1, sizeof *c);
    if (!c)
        return;
    c->srv = s;
    uv_tcp_init(server->loop, &c->tcp);
    c->tcp.data = c;
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) < 0) {
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    if (s->opts.max_conns > 0 && s->nconns > s->opts.max_conns) {
        conn_refuse(c);
        return;
    }
    llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
    c->parser.data = c;
    conn_wait(c, WAIT_IDLE, s->opts.keepalive_timeout_ms);
    conn_start_read(c);
}

/* --- server ---------------------------------------------------------------- */

static void server_close_cb(uv_handle_t *h)
{
    sglr_server_t *s = h->data;
    s->listener_closed = 1;
    server_maybe_closed(s);
}

int sglr_server_init(sglr_server_t *s, const char *host, int port,
                     const sglr_server_opts_t *opts, sglr_request_cb cb, void *data)
{
    static int settings_ready;
    if (!settings_ready) {
        llhttp_settings_init(&parser_settings);
        parser_settings.on_message_begin = on_message_begin;
        parser_settings.on_url = on_url;
        parser_settings.on_header_field = on_header_field;
        parser_settings.on_header_field_complete = on_header_field_complete;
        parser_settings.on_header_value = on_header_value;
        parser_settings.on_headers_complete = on_headers_complete;
        parser_settings.on_body = on_body;
        parser_settings.on_message_complete = on_message_complete;
        settings_ready = 1;
    }
    memset(s, 0, sizeof *s);
    s->opts = *opts;
    s->on_request = cb;
    s->data = data;
    uv_tcp_init(sglr_loop, &s->tcp);
    s->tcp.data = s;
    struct sockaddr_storage addr;
    int r = uv_ip4_addr(host, port, (struct sockaddr_in *)&addr);
    if (r < 0)
        r = uv_ip6_addr(host, port, (struct sockaddr_in6 *)&addr);
    if (r == 0)
        r = uv_tcp_bind(&s->tcp, (struct sockaddr *)&addr, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&s->tcp, 4096, on_connection);
    if (r < 0) {
        /* the handle is closed; the caller frees s after the loop has run
         * the close (it must not be freed before) */
        s->closing = 1;
        uv_close((uv_handle_t *)&s->tcp, server_close_cb);
        return r;
    }
    if (opts->header_timeout_ms || opts->body_timeout_ms || opts->keepalive_timeout_ms ||
        opts->write_timeout_ms) {
        uv_timer_init(sglr_loop, &s->sweep);
        s->sweep.data = s;
        s->sweep_open = 1;
        uv_timer_start(&s->sweep, sweep_cb, 1000, 1000);
        uv_unref((uv_handle_t *)&s->sweep);
    }
    return 0;
}

int sglr_server_port(sglr_server_t *s)
{
    struct sockaddr_storage addr;
    int len = sizeof addr;
    if (uv_tcp_getsockname(&s->tcp, (struct sockaddr *)&addr, &len) < 0)
        return -1;
    if (addr.ss_family == AF_INET6)
        return ntohs(((struct sockaddr_in6 *)&addr)->sin6_port);
    return ntohs(((struct sockaddr_in *)&addr)->sin_port);
}

void sglr_server_stop(sglr_server_t *s, void (*close_cb)(sglr_server_t *))
{
    if (s->closing)
        return;
    s->closing = 1;
    s->on_closed = close_cb;
    uv_close((uv_handle_t *)&s->tcp, server_close_cb);
    if (s->sweep_open)
        uv_close((uv_handle_t *)&s->sweep, sweep_close_cb);
    for (sglr_conn_t *c = s->conns, *next; c; c = next) {
        next = c->next;
        if (!c->x || c->x->state == SGLR_X_READING)
            conn_shutdown(c);      /* flushes what is queued, then closes */
        else
            c->close_after = 1;
    }
}
