/*
 * upstream.h: the native HTTP/1.1 client of the proxy path.
 *
 *   pool (one per worker) ---- idle keep-alive connections (LIFO)
 *     |
 *   upreq --take or dial--> upconn --write request, parse response-->
 *     on_head (parser paused) ... caller: sglr_upreq_continue
 *     on_body* ... on_done(err)
 *
 * The response head is handed over with parsing paused, so the caller can
 * still decide (retry elsewhere, or stream to the client) before any body
 * byte is consumed. Every callback runs after llhttp_execute has returned,
 * or from on_body while it runs; an abort from inside on_body is deferred
 * until the parser is out of the way.
 *
 * A request that fails on a reused keep-alive connection before any response
 * byte arrived is retried once on a fresh connection: the worker closed an
 * idle connection, which is not the request's fault. Such replays are
 * counted per pool (replays) and logged at debug, since no retry policy
 * above sees them.
 *
 * A worker named by host name is resolved without blocking the loop
 * (uv_getaddrinfo, on libuv's thread pool), starting when the pool is
 * made. Requests that need a new connection before the first answer wait
 * for it, under their connect timeout. A connection that fails to connect
 * (refused, unreachable, connect timeout) moves the pool to the next
 * address of the name and has the name looked up again, at most once per
 * reresolve_ms: a Kubernetes Service or pod name can move. Until a new
 * lookup answers, the addresses known last are used.
 */
#ifndef SGLR_UPSTREAM_H
#define SGLR_UPSTREAM_H

#include <uv.h>
#include "msg.h"

typedef struct sglr_pool_s sglr_pool_t;
typedef struct sglr_upconn_s sglr_upconn_t;
typedef struct sglr_upreq_s sglr_upreq_t;

enum {
    SGLR_UP_OK = 0,
    SGLR_UP_ECONNECT = 1,   /* could not connect (refused, unreachable, connect timeout) */
    SGLR_UP_ERESET = 2,     /* connection closed or reset before the response ended */
    SGLR_UP_ETIMEOUT = 3,   /* total timeout */
    SGLR_UP_EPROTO = 4,     /* malformed response */
    SGLR_UP_ENOMEM = 5,
};
const char *sglr_up_errname(int err);

#define SGLR_POOL_MAX_ADDRS 8

struct sglr_pool_s {
    char *url;               /* as given, without trailing slash */
    char *hostport;          /* for the Host header */
    char *base_path;         /* path prefix ("" for none) */
    struct sockaddr_storage addr;   /* the address new connections dial */
    unsigned addr_gen;       /* bumped whenever addr changes */
    /* host names only (host == NULL for an IP address) */
    char *host;
    int port;
    struct sockaddr_storage addrs[SGLR_POOL_MAX_ADDRS];  /* the last answer */
    int naddrs, cur;         /* addr is addrs[cur]; naddrs 0: none known yet */
    int resolving;           /* a lookup is in flight (it holds a reference) */
    unsigned lookup_gen;     /* lookups started */
    int resolve_err;         /* the last lookup's failure (UV_E*), 0 if it answered */
    unsigned resolves;       /* lookups finished */
    unsigned reresolve_ms;   /* least time between lookups after connect failures */
    uint64_t resolved_at;    /* loop time the last lookup finished */
    sglr_upreq_t *waiting, *waiting_tail;  /* requests waiting for an address */
    int refs;
    int nidle, nconns;
    int max_idle;
    sglr_upconn_t *idle;
    uint64_t replays;        /* requests sent again after a stale keep-alive failure */
};

struct sglr_upreq_s {
    sglr_pool_t *pool;
    sglr_upconn_t *conn;
    sglr_buf_t out;          /* the serialized request (its head, with a borrowed body) */
    const char *body;        /* a borrowed body, sent after out (build_ref) */
    size_t body_len;
    sglr_head_t head;        /* response: headers, names lowercased */
    int status;
    long long content_length; /* -1 when unknown */
    int keep_alive;
    int state;
    int err;
    int reused, retried;
    int got_bytes;           /* any response byte arrived */
    int complete;            /* the parser saw the end of the response */
    int in_parse, abort_pending, throttled;
    int freed;               /* sglr_upreq_free was called */
    int eof_pending;         /* the connection ended while paused: 1 EOF, 2 error */
    int fast;                /* the head was read without llhttp: the body is
                              * counted down from fast_left (content-length) */
    int fast_keep_alive;     /* that head's keep-alive */
    int llhttp_fed;          /* llhttp has seen bytes of this response */
    long long fast_left;
    int skip_ok_fields;      /* a 2xx head keeps its status, not its header fields
                              * (set by a caller that reads no header of a success) */
    size_t skipped;          /* header bytes not kept, counted against the head cap */
    sglr_buf_t pending;      /* bytes after the head, parsed on continue */
    uv_timer_t timer;
    uint64_t timer_due;      /* when the timer is armed to fire (uv_now based), 0 = not armed */
    uint64_t connect_deadline, deadline;   /* uv_now based, 0 = none */
    uint64_t sent_at;        /* uv_now when the request was written */
    sglr_upreq_t *wnext, *wprev;   /* the pool's waiting list */
    sglr_upreq_t *rnext;     /* freed: the list waiting to be recycled */
    unsigned wait_gen;       /* the lookup it waits for */
    int addr_tries;          /* addresses tried by this request's connect */
    unsigned connect_timeout_ms;
    double t_start, t_head;  /* ms */
    void (*on_head)(sglr_upreq_t *);
    void (*on_body)(sglr_upreq_t *, const char *, size_t);
    void (*on_done)(sglr_upreq_t *, int err);
    void *data;
};

/* Parse "http://host[:port][/base]"; NULL and *err set on failure. Never
 * blocks: a host name is looked up in the background from here on. */
sglr_pool_t *sglr_pool_new(const char *url, const char **err);
/* The address new connections dial, as "ip:port" ("[v6]:port"), or "" when
 * none is known yet; buf must hold 64 bytes. */
const char *sglr_pool_address(const sglr_pool_t *p, char *buf);
void sglr_pool_ref(sglr_pool_t *p);
void sglr_pool_unref(sglr_pool_t *p);

sglr_upreq_t *sglr_upreq_new(sglr_pool_t *p);
/* Serialize the request into req->out. hdrs: "name: value\r\n" lines without
 * host/content-length (added here). */
int sglr_upreq_build(sglr_upreq_t *r, const char *method, const char *path, size_t plen,
                     const char *hdrs, size_t hlen, const char *body, size_t blen);
/* The same without copying the body: it is sent from body[0..blen), which
 * must stay as it is until r is freed (a client's request body, held by
 * the exchange the proxy holds). */
int sglr_upreq_build_ref(sglr_upreq_t *r, const char *method, const char *path, size_t plen,
                         const char *hdrs, size_t hlen, const char *body, size_t blen);
int sglr_upreq_start(sglr_upreq_t *r, unsigned connect_timeout_ms, unsigned timeout_ms);
/* After on_head: deliver the body (on_body*, then on_done). */
void sglr_upreq_continue(sglr_upreq_t *r);
/* Backpressure: stop / restart reading the worker's socket. */
void sglr_upreq_throttle(sglr_upreq_t *r, int on);
/* End the request with err: on_done(err) follows (deferred while parsing). */
void sglr_upreq_fail(sglr_upreq_t *r, int err);
/* Give up: the connection is closed, no callback runs any more. */
void sglr_upreq_abort(sglr_upreq_t *r);
/* Release a request that is done or aborted. */
void sglr_upreq_free(sglr_upreq_t *r);
/* Close the timers of recycled requests kept for reuse (at shutdown). */
void sglr_upstream_release_spares(void);

#endif
