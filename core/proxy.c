/*
 * proxy.c: one client request, one or more upstream legs (see proxy.h).
 *
 * The engine sits between server.c (the client's exchange) and upstream.c
 * (a request to a worker per leg) and owns what joins them: which leg's
 * bytes go to the client, backpressure from the client's socket to that
 * leg's, the end of every leg reported once, and the cancellation of the
 * legs when the client leaves or, if asked, when one of them fails.
 *
 * Re-entrancy: the owner's callbacks may do anything, including cancelling
 * or freeing legs and releasing px, and a client write may close the client
 * (which ends every leg) while the engine is inside an upstream callback.
 * px->busy counts the engine's frames on the stack; frees asked for meanwhile
 * only mark the leg, and the outermost frame sweeps them on its way out.
 */
#include "proxy.h"
#include "sglr.h"       /* the clock */

#include <stdlib.h>
#include <string.h>

/* Freed proxies and legs are kept on a free list by size (a proxy with its
 * inline leg and owner data, a leg of its own), so a steady stream of
 * requests allocates neither. Sanitizer builds keep nothing, so that a use
 * after free is still caught. */
#ifndef SGLR_NO_FREELIST
#define BLOCK_SPARE_MAX 1024      /* a router at 1,000 requests in flight reuses them all */
static struct { size_t size; void *p; } block_spare[BLOCK_SPARE_MAX];
static int nblock_spare;
#endif

static void *block_new(size_t size)
{
#ifndef SGLR_NO_FREELIST
    for (int i = nblock_spare - 1; i >= 0 && i >= nblock_spare - 4; i--) {
        if (block_spare[i].size == size) {
            void *p = block_spare[i].p;
            block_spare[i] = block_spare[--nblock_spare];
            return memset(p, 0, size);
        }
    }
#endif
    return calloc(1, size);
}

static void block_free(void *p, size_t size)
{
#ifndef SGLR_NO_FREELIST
    if (nblock_spare < BLOCK_SPARE_MAX) {
        block_spare[nblock_spare].size = size;
        block_spare[nblock_spare++].p = p;
        return;
    }
#endif
    (void)size;
    free(p);
}

/* sizes rounded so that what follows is aligned for any owner data */
#define ALIGNED(n) (((n) + 15) & ~(size_t)15)

static size_t px_size(size_t leg_data)
{
    return ALIGNED(sizeof(sglr_proxy_t)) + ALIGNED(sizeof(sglr_leg_t)) + leg_data;
}

static void px_destroy(sglr_proxy_t *px)
{
    sglr_buf_free(&px->filtered);
    if (px->x)
        sglr_exchange_release(px->x);
    block_free(px, px_size(px->leg_data));
}

static void leg_destroy(sglr_leg_t *leg)
{
    if (leg->req)
        sglr_upreq_free(leg->req);
    sglr_buf_free(&leg->body);
    if (!leg->inline_)
        block_free(leg, ALIGNED(sizeof *leg) + leg->px->leg_data);
}

static void px_enter(sglr_proxy_t *px)
{
    px->busy++;
}

/* Leave an engine frame; the outermost one frees what was released meanwhile
 * (px itself included: do not touch px after this). */
static void px_leave(sglr_proxy_t *px)
{
    if (--px->busy > 0)
        return;
    sglr_leg_t **pp = &px->legs;
    while (*pp) {
        sglr_leg_t *leg = *pp;
        if (leg->freed) {
            *pp = leg->next;
            leg_destroy(leg);
            px->refs--;
        } else {
            pp = &leg->next;
        }
    }
    if (px->refs == 0)
        px_destroy(px);
}

int sglr_proxy_unfinished(const sglr_proxy_t *px)
{
    int n = 0;
    for (const sglr_leg_t *l = px->legs; l; l = l->next)
        n += l->state != SGLR_LEG_DONE;
    return n;
}

static void px_detach(sglr_proxy_t *px)
{
    sglr_exchange_t *x = px->x;
    if (!px->attached)
        return;
    px->attached = 0;
    if (x->data == px) {
        x->on_close = NULL;
        x->on_drain = NULL;
        x->data = NULL;
    }
}

/* Once no leg is unfinished, the exchange is free for the next attempt (or
 * for the owner's own writes and drain waits). */
static void px_detach_if_idle(sglr_proxy_t *px)
{
    if (px->attached && sglr_proxy_unfinished(px) == 0)
        px_detach(px);
}

/* End an unfinished leg with err, and tell the owner unless it cancelled. */
static void leg_end(sglr_leg_t *leg, int err)
{
    sglr_proxy_t *px = leg->px;
    if (leg->state == SGLR_LEG_DONE)
        return;
    int piping = leg->state == SGLR_LEG_PIPE;
    leg->state = SGLR_LEG_DONE;
    leg->err = err;
    if (err < 0)
        sglr_upreq_abort(leg->req);
    if (piping && err == 0 && px->x) {
        if (leg->filter && !sglr_exchange_closed(px->x)) {
            px->filtered.len = 0;
            if (leg->filter(leg, NULL, 0, &px->filtered) == 0 && px->filtered.len)
                sglr_exchange_write(px->x, px->filtered.data, px->filtered.len);
        }
        sglr_exchange_finish(px->x);
    }
    px_detach_if_idle(px);
    if (!leg->cancelled && px->on_end)
        px->on_end(leg, err);
}

static void px_cancel_others(sglr_proxy_t *px, sglr_leg_t *failed, int err)
{
    for (sglr_leg_t *l = px->legs; l; l = l->next)
        if (l != failed && l->state != SGLR_LEG_DONE)
            leg_end(l, err);
}

/* --- client events ---------------------------------------------------------- */

static void px_client_close(sglr_exchange_t *x)
{
    sglr_proxy_t *px = x->data;
    px_enter(px);
    px_detach(px);
    px_cancel_others(px, NULL, SGLR_PROXY_ECLIENT);
    px_leave(px);
}

static void px_client_drain(sglr_exchange_t *x)
{
    sglr_proxy_t *px = x->data;
    for (sglr_leg_t *l = px->legs; l; l = l->next)
        if (l->state == SGLR_LEG_PIPE)
            sglr_upreq_throttle(l->req, 0);
}

/* --- upstream events ---------------------------------------------------------- */

static void up_on_head(sglr_upreq_t *r)
{
    sglr_leg_t *leg = r->data;
    sglr_proxy_t *px = leg->px;
    if (leg->auto_read) {
        leg->state = SGLR_LEG_READ;
        sglr_upreq_continue(r);
        return;
    }
    leg->state = SGLR_LEG_HEAD;
    px_enter(px);
    if (!leg->cancelled && px->on_head)
        px->on_head(leg);
    px_leave(px);
}

static void up_on_body(sglr_upreq_t *r, const char *d, size_t n)
{
    sglr_leg_t *leg = r->data;
    sglr_proxy_t *px = leg->px;
    if (leg->t_body == 0)
        leg->t_body = sglr_clock_ms();
    if (leg->state == SGLR_LEG_PIPE) {
        sglr_exchange_t *x = px->x;
        if (!x || sglr_exchange_closed(x))
            return;
        /* a failed write closes the client, which ends every leg */
        px_enter(px);
        if (leg->filter) {
            px->filtered.len = 0;
            if (leg->filter(leg, d, n, &px->filtered)) {
                sglr_upreq_fail(r, SGLR_UP_ENOMEM);     /* deferred: we are parsing */
                px_leave(px);
                return;
            }
            d = px->filtered.data;
            n = px->filtered.len;
        }
        if (n)
            sglr_exchange_write(x, d, n);
        if (leg->state == SGLR_LEG_PIPE && sglr_exchange_write_queue(x) > SGLR_WRITE_HIGH)
            sglr_upreq_throttle(r, 1);
        px_leave(px);
        return;
    }
    if (leg->discard)
        return;
    if (leg->max_body >= 0 && (long long)(leg->body.len + n) > leg->max_body) {
        sglr_upreq_fail(r, SGLR_UP_EPROTO);    /* on_done follows, with the error */
        return;
    }
    if (sglr_buf_append(&leg->body, d, n))
        sglr_upreq_fail(r, SGLR_UP_ENOMEM);
}

static void up_on_done(sglr_upreq_t *r, int err)
{
    sglr_leg_t *leg = r->data;
    sglr_proxy_t *px = leg->px;
    px_enter(px);
    leg_end(leg, err);
    if (err && px->cancel_on_fail)
        px_cancel_others(px, leg, SGLR_PROXY_ECANCEL);
    px_leave(px);
}

/* --- the owner's calls ------------------------------------------------------------ */

sglr_proxy_t *sglr_proxy_new(sglr_exchange_t *x, size_t leg_data)
{
    size_t head = ALIGNED(sizeof(sglr_proxy_t));
    sglr_proxy_t *px = block_new(px_size(leg_data));
    if (!px)
        return NULL;
    px->spare = (sglr_leg_t *)((char *)px + head);
    px->leg_data = leg_data;
    px->refs = 1;
    px->x = x;
    if (x)
        sglr_exchange_hold(x);
    return px;
}

void sglr_proxy_release(sglr_proxy_t *px)
{
    if (--px->refs == 0 && !px->busy)
        px_destroy(px);
}

sglr_leg_t *sglr_proxy_leg_new(sglr_proxy_t *px, sglr_pool_t *pool)
{
    sglr_leg_t *leg = px->spare;
    if (!leg && !(leg = block_new(ALIGNED(sizeof *leg) + px->leg_data)))
        return NULL;
    leg->req = sglr_upreq_new(pool);
    if (!leg->req) {
        if (leg != px->spare)
            block_free(leg, ALIGNED(sizeof *leg) + px->leg_data);
        return NULL;
    }
    if (leg == px->spare) {
        px->spare = NULL;
        leg->inline_ = 1;
    }
    if (px->leg_data)
        leg->data = (char *)leg + ALIGNED(sizeof *leg);
    leg->req->data = leg;
    leg->req->on_head = up_on_head;
    leg->req->on_body = up_on_body;
    leg->req->on_done = up_on_done;
    leg->px = px;
    leg->max_body = -1;
    leg->next = px->legs;
    px->legs = leg;
    px->refs++;
    return leg;
}

void sglr_proxy_leg_start(sglr_leg_t *leg, unsigned connect_timeout_ms, unsigned timeout_ms)
{
    sglr_proxy_t *px = leg->px;
    sglr_exchange_t *x = px->x;
    if (leg->state != SGLR_LEG_NEW)
        return;     /* ended before it started: another leg failed at its start */
    if (x && !px->attached && !sglr_exchange_closed(x) && !x->on_close) {
        px->attached = 1;
        x->data = px;
        x->on_close = px_client_close;
        x->on_drain = px_client_drain;
    }
    leg->state = SGLR_LEG_RUNNING;
    /* a start that fails at once reports it through on_done, later */
    sglr_upreq_start(leg->req, connect_timeout_ms, timeout_ms);
}

int sglr_proxy_pipe(sglr_leg_t *leg, const char *hdrs, size_t hlen)
{
    sglr_proxy_t *px = leg->px;
    sglr_exchange_t *x = px->x;
    if (leg->state != SGLR_LEG_HEAD || !x || sglr_exchange_closed(x))
        return -1;
    sglr_upreq_t *r = leg->req;
    leg->state = SGLR_LEG_PIPE;
    px_enter(px);
    /* the head waits for what of the body is already here: one write */
    sglr_exchange_hold(x);
    sglr_exchange_cork(x);
    sglr_exchange_start(x, r->status, hdrs, hlen, leg->filter ? -1 : r->content_length);
    sglr_upreq_continue(r);
    sglr_exchange_uncork(x);
    sglr_exchange_release(x);
    px_leave(px);
    return 0;
}

void sglr_proxy_read(sglr_leg_t *leg)
{
    sglr_proxy_t *px = leg->px;
    if (leg->state != SGLR_LEG_HEAD)
        return;
    leg->state = SGLR_LEG_READ;
    px_enter(px);
    sglr_upreq_continue(leg->req);
    px_leave(px);
}

void sglr_proxy_leg_cancel(sglr_leg_t *leg)
{
    leg->cancelled = 1;
    if (leg->state != SGLR_LEG_DONE) {
        leg->state = SGLR_LEG_DONE;
        leg->err = SGLR_PROXY_ECANCEL;
        px_detach_if_idle(leg->px);
    }
    /* the upstream request goes now (it is recycled, and no callback runs
     * for it any more); the leg itself lives until it is freed */
    if (leg->req) {
        sglr_upreq_free(leg->req);
        leg->req = NULL;
    }
}

void sglr_proxy_leg_free(sglr_leg_t *leg)
{
    sglr_proxy_t *px = leg->px;
    sglr_proxy_leg_cancel(leg);
    leg->freed = 1;
    /* the leg waits for the engine frames on the stack */
    px_enter(px);
    px_leave(px);
}
