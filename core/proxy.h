/*
 * proxy.h: an exchange between one client request and one or more upstream
 * legs. The engine knows nothing of Lua; core/lua_proxy.c binds it.
 *
 *                           +-- leg 0 -- upreq --> worker A (e.g. prefill)
 *   client exchange x -- px +
 *                           +-- leg 1 -- upreq --> worker B (e.g. decode)
 *
 * A leg forwards one request to a worker. When the worker's response head
 * is known the leg stops (parser paused) and px->on_head(leg) asks its owner
 * what to do with it: sglr_proxy_pipe() streams it to the client (the commit
 * point: from here on the client sees this leg's response), sglr_proxy_read()
 * buffers its body, sglr_proxy_leg_cancel() drops it. Nothing per chunk
 * reaches the owner: a piped body goes from the worker's socket to the
 * client's, with the worker's socket paused while the client's write queue is
 * above SGLR_WRITE_HIGH; a read body collects in leg->body.
 *
 * Every leg the owner has not cancelled ends exactly once with
 * px->on_end(leg, err): err 0 (complete), an SGLR_UP_* error from the
 * upstream client, SGLR_PROXY_ECLIENT (the client went away: every leg ends
 * so) or SGLR_PROXY_ECANCEL (another leg failed and px->cancel_on_fail is
 * set). A piped leg that completes finishes the client's response; one that
 * fails leaves it open, so the owner can add an error event and then finish
 * or abort it.
 *
 * Lifetime: px is reference counted by its creator and by each leg. The
 * owner may cancel or free any leg, or release px, from inside a callback:
 * frees requested while the engine is inside a callback (px->busy) wait
 * until it has returned. The client exchange is held while px lives; px is
 * attached to it (x->on_close, x->on_drain) only while a leg is unfinished,
 * so sequential attempts on one exchange can each use a px of their own.
 */
#ifndef SGLR_PROXY_H
#define SGLR_PROXY_H

#include "server.h"
#include "upstream.h"

typedef struct sglr_proxy_s sglr_proxy_t;
typedef struct sglr_leg_s sglr_leg_t;

enum {
    SGLR_PROXY_ECLIENT = -1,    /* the client went away */
    SGLR_PROXY_ECANCEL = -2,    /* cancelled because another leg failed */
};

enum {
    SGLR_LEG_NEW,               /* not started yet */
    SGLR_LEG_RUNNING,           /* request sent, waiting for the head */
    SGLR_LEG_HEAD,              /* head known, waiting for the owner */
    SGLR_LEG_PIPE,              /* streaming to the client */
    SGLR_LEG_READ,              /* buffering the body */
    SGLR_LEG_DONE,              /* ended (err says how) or cancelled */
};

struct sglr_leg_s {
    sglr_proxy_t *px;
    sglr_upreq_t *req;          /* status, headers, timings of the response */
    int state;
    int err;                    /* outcome once SGLR_LEG_DONE */
    int auto_read;              /* read the body without stopping at the head */
    int discard;                /* a read body is dropped, not kept */
    /* a piped body passes through filter when set: it appends what to send
     * for d[0..n) to out (n == 0 and d == NULL: the end, flush); a nonzero
     * return fails the leg (SGLR_UP_ENOMEM). The response is then framed
     * chunked, since its length changes. */
    int (*filter)(sglr_leg_t *, const char *d, size_t n, sglr_buf_t *out);
    long long max_body;         /* cap for a read body (-1: none) */
    sglr_buf_t body;            /* a read body */
    double t_body;              /* first body byte (ms), 0 before */
    int cancelled, freed;
    int inline_;                /* carved from px's own allocation */
    sglr_leg_t *next;           /* px's legs */
    void *data;                 /* owner's */
};

struct sglr_proxy_s {
    sglr_exchange_t *x;         /* the client, or NULL (a request of our own) */
    sglr_leg_t *legs;
    int refs;
    int busy;                   /* inside a callback: frees wait */
    int attached;               /* x->on_close / on_drain point here */
    int cancel_on_fail;         /* a failed leg cancels the others */
    size_t leg_data;            /* owner bytes at each leg's data */
    sglr_leg_t *spare;          /* the first leg, allocated with px */
    sglr_buf_t filtered;        /* a filter's output, reused per chunk */
    void (*on_head)(sglr_leg_t *);
    void (*on_end)(sglr_leg_t *, int err);
    void *data;                 /* owner's */
};

/* A proxy for client exchange x (NULL for requests of the router's own),
 * with one reference for the caller. Each leg gets leg_data zeroed bytes of
 * the owner's at leg->data (0: data is the owner's to set), living as long
 * as the leg. The first leg comes with px's own allocation, so a one-leg
 * proxy costs one malloc. NULL when out of memory. */
sglr_proxy_t *sglr_proxy_new(sglr_exchange_t *x, size_t leg_data);
void sglr_proxy_release(sglr_proxy_t *px);

/* A new leg to pool's worker. Build its request with sglr_upreq_build on
 * leg->req, then start it. NULL when out of memory. */
sglr_leg_t *sglr_proxy_leg_new(sglr_proxy_t *px, sglr_pool_t *pool);
void sglr_proxy_leg_start(sglr_leg_t *leg, unsigned connect_timeout_ms, unsigned timeout_ms);

/* After on_head: stream the leg's response to the client, with hdrs
 * ("name: value\r\n" lines, framing headers left to the server) as its head.
 * Returns -1 when the client is gone (the leg then ends with ECLIENT). */
int sglr_proxy_pipe(sglr_leg_t *leg, const char *hdrs, size_t hlen);
/* After on_head: buffer the body into leg->body. */
void sglr_proxy_read(sglr_leg_t *leg);
/* Stop the leg: its connection is closed unless the response was complete;
 * no callback runs for it any more, and leg->req is gone (NULL). */
void sglr_proxy_leg_cancel(sglr_leg_t *leg);
/* Cancel (if unfinished) and release the leg, with its owner data. */
void sglr_proxy_leg_free(sglr_leg_t *leg);

/* Legs not yet ended. */
int sglr_proxy_unfinished(const sglr_proxy_t *px);

#endif
