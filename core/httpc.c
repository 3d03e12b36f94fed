/*
 * httpc.c: libcurl multi-socket on libuv (see httpc.h for the shape).
 *
 * The integration contract, in curl's terms:
 * - SOCKETFUNCTION tells us which sockets to watch for what. The first
 *   time we see a socket we make a uv_poll_t for it and hand it back to
 *   curl with curl_multi_assign; CURL_POLL_REMOVE stops and closes it.
 * - TIMERFUNCTION asks for one timer: -1 stops it, 0 means "as soon as
 *   possible". We never call curl_multi_socket_action from inside a curl
 *   callback; a 0 ms uv timer fires on the next loop iteration.
 * - Readiness and timer expiry go to curl_multi_socket_action (with
 *   CURL_CSELECT_IN/OUT/ERR from the uv events), and after every action
 *   curl_multi_info_read reaps finished transfers.
 *
 * - No user callback runs inside curl (curl refuses most calls made from
 *   its callbacks, curl_multi_remove_handle and curl_multi_add_handle
 *   among them). The write callback only buffers; after each
 *   curl_multi_socket_action, body bytes of streamed requests go to their
 *   on_data (flush_data), then finished transfers to their callbacks.
 *
 * Cancelling removes the transfer from curl at once (curl closes a
 * connection whose transfer was cut short) and parks the request on
 * `cancelled`; a 0 ms timer (`reap`) runs its callback from the loop, so
 * that a caller of sglr_httpc_cancel() never sees it run underneath.
 *
 * Lifetime: uv handles are freed only from their close callbacks, and the
 * client itself when its last handle has closed. So a user callback may
 * call sglr_httpc_close() (or start new requests) while we are still
 * inside one of our own frames: the memory stays valid until the loop's
 * close phase, and every frame re-checks `closing` before touching curl.
 */
#include "httpc.h"
#include "sglr.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

typedef struct sock {
    uv_poll_t poll;
    curl_socket_t fd;
    sglr_httpc_t *c;
    struct sock *prev, *next;
} sock_t;

struct sglr_httpc_req {
    sglr_httpc_t *c;
    CURL *easy;
    struct curl_slist *hdrs;
    char *body;                      /* our copy of the request body */
    sglr_httpc_cb cb;
    sglr_httpc_data_cb on_data;
    void *data;
    sglr_httpc_req_t *prev, *next;   /* c->reqs: every request not finished yet */
    sglr_httpc_req_t *pnext;         /* c->pending or c->cancelled */
    int queued;                      /* on c->pending */
    int cancelled;                   /* out of curl, on c->cancelled until reaped */
    int finishing;                   /* its final callback runs */
    buf_t resp;                      /* response body (with on_data: not handed over yet) */
    buf_t rh;                        /* response headers: "name\0value\0"... */
    size_t nrh;
    int oom;                         /* a response buffer could not grow */
    char errbuf[CURL_ERROR_SIZE];
};

struct sglr_httpc {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    uv_timer_t reap;                 /* finishes cancelled requests */
    sglr_httpc_req_t *reqs;          /* in flight */
    size_t nreqs;
    sglr_httpc_req_t *pending;       /* streamed requests with body bytes to hand over */
    sglr_httpc_req_t *cancelled;     /* cancelled, callback not run yet */
    sock_t *socks;                   /* watched */
    int handles;                     /* open uv handles; the client is freed at 0 */
    int closing;
};

static int global_inited;
static sglr_httpc_t *default_client;
static int default_shut;

static void check_multi_info(sglr_httpc_t *c);
static void flush_data(sglr_httpc_t *c);

/* ------------------------------------------------------------ buffers */

static int buf_add(buf_t *b, const char *p, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1)
            cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d)
            return -1;
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

/* ------------------------------------------------------- handle lifetimes */

static void handle_gone(sglr_httpc_t *c)
{
    if (--c->handles == 0 && c->closing)
        free(c);
}

static void sock_closed_cb(uv_handle_t *h)
{
    sock_t *k = h->data;
    sglr_httpc_t *c = k->c;
    free(k);
    handle_gone(c);
}

static void timer_closed_cb(uv_handle_t *h)
{
    handle_gone(h->data);
}

static void sock_close(sock_t *k)
{
    sglr_httpc_t *c = k->c;
    uv_poll_stop(&k->poll);
    if (k->prev)
        k->prev->next = k->next;
    else
        c->socks = k->next;
    if (k->next)
        k->next->prev = k->prev;
    k->prev = k->next = NULL;
    uv_close((uv_handle_t *)&k->poll, sock_closed_cb);
}

/* ------------------------------------------------------ curl <-> libuv */

static void poll_cb(uv_poll_t *h, int status, int events)
{
    sock_t *k = h->data;
    sglr_httpc_t *c = k->c;
    if (c->closing)
        return;
    int flags = 0;
    if (status < 0) {
        flags = CURL_CSELECT_ERR;
    } else {
        if (events & UV_READABLE)
            flags |= CURL_CSELECT_IN;
        if (events & UV_WRITABLE)
            flags |= CURL_CSELECT_OUT;
    }
    int running;
    /* k may be closed (not freed) by the socket callback during this call. */
    curl_multi_socket_action(c->multi, k->fd, flags, &running);
    flush_data(c);
    check_multi_info(c);
}

static void timer_cb(uv_timer_t *t)
{
    sglr_httpc_t *c = t->data;
    if (c->closing)
        return;
    int running;
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    flush_data(c);
    check_multi_info(c);
}

static int socket_fn(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    sglr_httpc_t *c = userp;
    sock_t *k = socketp;
    if (what == CURL_POLL_REMOVE) {
        /* curl forgets the assignment itself after REMOVE. */
        if (k)
            sock_close(k);
        return 0;
    }
    if (c->closing)
        return 0;                    /* tearing down: every socket is closed below */
    if (!k) {
        k = calloc(1, sizeof *k);
        if (!k)
            return -1;
        if (uv_poll_init_socket(c->loop, &k->poll, s) != 0) {
            free(k);
            return -1;
        }
        k->poll.data = k;
        k->fd = s;
        k->c = c;
        k->next = c->socks;
        if (c->socks)
            c->socks->prev = k;
        c->socks = k;
        c->handles++;
        curl_multi_assign(c->multi, s, k);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&k->poll, events, poll_cb);
    return 0;
}

static int timer_fn(CURLM *multi, long timeout_ms, void *userp)
{
    sglr_httpc_t *c = userp;
    if (c->closing)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, timer_cb, (uint64_t)timeout_ms, 0);
    return 0;
}

/* ------------------------------------------------------------ requests */

static size_t write_fn(char *p, size_t size, size_t n, void *ud)
{
    sglr_httpc_req_t *r = ud;
    if (buf_add(&r->resp, p, size * n) != 0) {
        r->oom = 1;
        return 0;                    /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    if (r->on_data && !r->queued && n) {
        sglr_httpc_t *c = r->c;
        r->queued = 1;
        r->pnext = c->pending;
        c->pending = r;
    }
    return size * n;
}

/* Hand streamed body bytes to their on_data, outside curl. A callback may
 * cancel requests (skipped here from then on) or close the client (then
 * every request is gone: stop). */
static void flush_data(sglr_httpc_t *c)
{
    sglr_httpc_req_t *r;
    while (!c->closing && (r = c->pending)) {
        c->pending = r->pnext;
        r->pnext = NULL;
        r->queued = 0;
        if (r->cancelled || !r->resp.len)
            continue;
        long status = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        size_t len = r->resp.len;
        r->resp.len = 0;             /* the buffer is refilled only by curl, after we return */
        r->on_data(r, (int)status, r->resp.data, len, r->data);
    }
}

static int is_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

static size_t header_fn(char *p, size_t size, size_t n, void *ud)
{
    sglr_httpc_req_t *r = ud;
    size_t len = size * n;
    /* A status line starts a new header block (after a 100 Continue or a
     * redirect): keep only the final response's headers. */
    if (len >= 5 && memcmp(p, "HTTP/", 5) == 0) {
        r->rh.len = 0;
        r->nrh = 0;
        return len;
    }
    const char *colon = memchr(p, ':', len);
    if (!colon || colon == p || is_space(p[0]))
        return len;                  /* blank line or obsolete folding */
    size_t nlen = (size_t)(colon - p);
    while (nlen && is_space(p[nlen - 1]))
        nlen--;
    const char *v = colon + 1, *end = p + len;
    while (v < end && is_space(*v))
        v++;
    while (end > v && is_space(end[-1]))
        end--;
    size_t start = r->rh.len;
    if (buf_add(&r->rh, p, nlen) || buf_add(&r->rh, "", 1) ||
        buf_add(&r->rh, v, (size_t)(end - v)) || buf_add(&r->rh, "", 1)) {
        r->oom = 1;
        return 0;
    }
    for (size_t i = start; i < start + nlen; i++) {
        char ch = r->rh.data[i];
        if (ch >= 'A' && ch <= 'Z')
            r->rh.data[i] = (char)(ch - 'A' + 'a');
    }
    r->nrh++;
    return len;
}

static void req_free(sglr_httpc_req_t *r)
{
    if (r->easy)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    free(r->resp.data);
    free(r->rh.data);
    free(r);
}

static void req_unlink(sglr_httpc_req_t *r)
{
    sglr_httpc_t *c = r->c;
    if (r->prev)
        r->prev->next = r->next;
    else
        c->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;
    c->nreqs--;
}

/* The transfer is out of the multi handle: report it and free it. */
static void req_finish(sglr_httpc_req_t *r, CURLcode rc, const char *error)
{
    sglr_httpc_response_t res = { 0 };
    sglr_httpc_header_t *hv = NULL;
    req_unlink(r);
    r->finishing = 1;
    if (!error && rc == CURLE_OK && !r->oom) {
        long status = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        res.status = (int)status;
        res.body = r->resp.data && !r->on_data ? r->resp.data : "";
        res.body_len = r->on_data ? 0 : r->resp.len;
        if (r->nrh && !(hv = calloc(r->nrh, sizeof *hv))) {
            error = "out of memory";
        } else {
            const char *p = r->rh.data;
            for (size_t i = 0; i < r->nrh; i++) {
                hv[i].name = p;
                hv[i].name_len = strlen(p);
                p += hv[i].name_len + 1;
                hv[i].value = p;
                hv[i].value_len = strlen(p);
                p += hv[i].value_len + 1;
            }
            res.headers = hv;
            res.nheaders = r->nrh;
        }
    } else if (!error) {
        if (r->oom)
            error = "out of memory";
        else if (rc == CURLE_OPERATION_TIMEDOUT)
            error = "timeout";
        else
            /* curl's detailed message names host and port; its generic
             * strerror text is the fallback. */
            error = r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc);
    }
    if (error) {
        memset(&res, 0, sizeof res);
        res.error = error;
    }
    r->cb(r, &res, r->data);
    free(hv);
    req_free(r);
}

static void check_multi_info(sglr_httpc_t *c)
{
    CURLMsg *msg;
    int pending;
    /* A callback may close the client: then curl's queue is gone. */
    while (!c->closing && (msg = curl_multi_info_read(c->multi, &pending))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        /* msg is invalid once the handle is removed: copy first. */
        CURL *easy = msg->easy_handle;
        CURLcode rc = msg->data.result;
        char *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        sglr_httpc_req_t *r = (sglr_httpc_req_t *)priv;
        curl_multi_remove_handle(c->multi, easy);
        req_finish(r, rc, NULL);
    }
}

static int valid_token(const char *s, size_t len)
{
    if (!len)
        return 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= ' ' || ch == ':' || ch >= 127)
            return 0;
    }
    return 1;
}

static int valid_value(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
            return 0;
    return 1;
}

/* "name: value" into the list; curl sends "name;" as an empty header. */
static int add_header(struct curl_slist **list, const char *name, size_t nlen,
                      const char *value, size_t vlen)
{
    char stackbuf[512];
    size_t need = nlen + vlen + 3;
    char *line = need <= sizeof stackbuf ? stackbuf : malloc(need);
    if (!line)
        return -1;
    memcpy(line, name, nlen);
    if (vlen) {
        memcpy(line + nlen, ": ", 2);
        memcpy(line + nlen + 2, value, vlen);
        line[nlen + 2 + vlen] = '\0';
    } else {
        line[nlen] = ';';
        line[nlen + 1] = '\0';
    }
    struct curl_slist *l = curl_slist_append(*list, line);
    if (line != stackbuf)
        free(line);
    if (!l)
        return -1;
    *list = l;
    return 0;
}

int sglr_httpc_request(sglr_httpc_t *c, const sglr_httpc_opts_t *o,
                       sglr_httpc_cb cb, void *data, sglr_httpc_req_t **out)
{
    if (out)
        *out = NULL;
    if (c->closing)
        return -ECANCELED;
    if (!o->url || !*o->url || !cb)
        return -EINVAL;
    const char *method = o->method ? o->method : (o->body ? "POST" : "GET");
    if (!valid_token(method, strlen(method)))
        return -EINVAL;
    int has_expect = 0;
    for (size_t i = 0; i < o->nheaders; i++) {
        const sglr_httpc_header_t *h = &o->headers[i];
        if (!valid_token(h->name, h->name_len) || !valid_value(h->value, h->value_len))
            return -EINVAL;
        if (h->name_len == 6 && strncasecmp(h->name, "expect", 6) == 0)
            has_expect = 1;
    }
    if (o->bearer_token && (!*o->bearer_token || !valid_value(o->bearer_token, strlen(o->bearer_token))))
        return -EINVAL;
#if LIBCURL_VERSION_NUM < 0x074d00
    if (o->ca_data || o->cert_data || o->key_data)
        return -ENOTSUP;             /* CURLOPT_*_BLOB: libcurl 7.77 */
#endif

    sglr_httpc_req_t *r = calloc(1, sizeof *r);
    if (!r)
        return -ENOMEM;
    r->c = c;
    r->cb = cb;
    r->on_data = o->on_data;
    r->data = data;
    if (!(r->easy = curl_easy_init()))
        goto nomem;
    for (size_t i = 0; i < o->nheaders; i++) {
        const sglr_httpc_header_t *h = &o->headers[i];
        if (add_header(&r->hdrs, h->name, h->name_len, h->value, h->value_len))
            goto nomem;
    }
    if (o->bearer_token) {
        static const char bearer[] = "Bearer ";
        size_t tl = strlen(o->bearer_token);
        char *v = malloc(sizeof bearer - 1 + tl);
        int bad = !v;
        if (v) {
            memcpy(v, bearer, sizeof bearer - 1);
            memcpy(v + sizeof bearer - 1, o->bearer_token, tl);
            bad = add_header(&r->hdrs, "authorization", 13, v, sizeof bearer - 1 + tl);
            free(v);
        }
        if (bad)
            goto nomem;
    }
    /* curl waits up to a second for "100 Continue" on larger bodies; the
     * control plane talks to servers that never send it. */
    if (!has_expect && !(r->hdrs = curl_slist_append(r->hdrs, "Expect:")))
        goto nomem;

    CURL *e = r->easy;
    CURLcode rc = CURLE_OK;
#define SET(opt, val) do { if (rc == CURLE_OK) rc = curl_easy_setopt(e, opt, val); } while (0)
    SET(CURLOPT_URL, o->url);
    SET(CURLOPT_PRIVATE, (void *)r);
    SET(CURLOPT_NOSIGNAL, 1L);
#if LIBCURL_VERSION_NUM >= 0x075500
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
#else
    SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    SET(CURLOPT_USERAGENT, "sglr");
    SET(CURLOPT_ERRORBUFFER, r->errbuf);
    SET(CURLOPT_WRITEFUNCTION, write_fn);
    SET(CURLOPT_WRITEDATA, (void *)r);
    SET(CURLOPT_HEADERFUNCTION, header_fn);
    SET(CURLOPT_HEADERDATA, (void *)r);
    SET(CURLOPT_HTTPHEADER, r->hdrs);
    if (o->timeout_ms > 0)
        SET(CURLOPT_TIMEOUT_MS, o->timeout_ms);
    if (o->connect_timeout_ms > 0)
        SET(CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
    if (o->ca_file)
        SET(CURLOPT_CAINFO, o->ca_file);
    if (o->cert_file)
        SET(CURLOPT_SSLCERT, o->cert_file);
    if (o->key_file)
        SET(CURLOPT_SSLKEY, o->key_file);
#if LIBCURL_VERSION_NUM >= 0x074d00
    /* CURL_BLOB_COPY: curl keeps its own copy, as for string options. */
    if (o->ca_data) {
        struct curl_blob b = { (void *)o->ca_data, o->ca_data_len, CURL_BLOB_COPY };
        SET(CURLOPT_CAINFO_BLOB, &b);
    }
    if (o->cert_data) {
        struct curl_blob b = { (void *)o->cert_data, o->cert_data_len, CURL_BLOB_COPY };
        SET(CURLOPT_SSLCERT_BLOB, &b);
    }
    if (o->key_data) {
        struct curl_blob b = { (void *)o->key_data, o->key_data_len, CURL_BLOB_COPY };
        SET(CURLOPT_SSLKEY_BLOB, &b);
    }
#endif
    if (o->insecure) {
        SET(CURLOPT_SSL_VERIFYPEER, 0L);
        SET(CURLOPT_SSL_VERIFYHOST, 0L);
    }
    int is_get = strcmp(method, "GET") == 0, is_post = strcmp(method, "POST") == 0;
    int is_head = strcmp(method, "HEAD") == 0;
    if (is_head) {
        SET(CURLOPT_NOBODY, 1L);
    } else if (o->body || is_post || !strcmp(method, "PUT") || !strcmp(method, "PATCH")) {
        /* Our own copy: POSTFIELDS does not copy, COPYPOSTFIELDS would
         * copy a second time. */
        if (!(r->body = malloc(o->body_len + 1)))
            goto nomem;
        if (o->body_len)
            memcpy(r->body, o->body, o->body_len);
        r->body[o->body_len] = '\0';
        SET(CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
        SET(CURLOPT_POSTFIELDS, r->body);
    }
    if (!is_get && !is_post && !is_head)
        SET(CURLOPT_CUSTOMREQUEST, method);
    else if (is_get && o->body)
        SET(CURLOPT_CUSTOMREQUEST, "GET");
#undef SET
    if (rc != CURLE_OK) {
        int err = rc == CURLE_OUT_OF_MEMORY ? -ENOMEM : -EINVAL;
        req_free(r);
        return err;
    }

    r->next = c->reqs;
    if (c->reqs)
        c->reqs->prev = r;
    c->reqs = r;
    c->nreqs++;
    /* Starts nothing synchronously: curl asks for a 0 ms timer. */
    if (curl_multi_add_handle(c->multi, e) != CURLM_OK) {
        req_unlink(r);
        req_free(r);
        return -ENOMEM;
    }
    if (out)
        *out = r;
    return 0;

nomem:
    req_free(r);
    return -ENOMEM;
}

size_t sglr_httpc_active(const sglr_httpc_t *c)
{
    return c->nreqs;
}

static void reap_cb(uv_timer_t *t)
{
    sglr_httpc_t *c = t->data;
    sglr_httpc_req_t *r;
    /* A callback may cancel more (they are run here too) or close the
     * client (which has then finished them all). */
    while (!c->closing && (r = c->cancelled)) {
        c->cancelled = r->pnext;
        r->pnext = NULL;
        req_finish(r, CURLE_OK, "cancelled");
    }
}

void sglr_httpc_cancel(sglr_httpc_req_t *r)
{
    sglr_httpc_t *c = r->c;
    if (r->cancelled || r->finishing || c->closing)
        return;
    r->cancelled = 1;
    /* Never from inside a curl callback (no user code runs there), so
     * allowed; a transfer cut short closes its connection. A message curl
     * had queued for this transfer (it just finished) goes with it. */
    curl_multi_remove_handle(c->multi, r->easy);
    if (r->queued) {                 /* its unread bytes are dropped */
        sglr_httpc_req_t **pp = &c->pending;
        while (*pp != r)
            pp = &(*pp)->pnext;
        *pp = r->pnext;
        r->queued = 0;
    }
    r->pnext = c->cancelled;
    c->cancelled = r;
    uv_timer_start(&c->reap, reap_cb, 0, 0);
}

/* ------------------------------------------------------------- client */

int sglr_httpc_init(uv_loop_t *loop, sglr_httpc_t **out)
{
    *out = NULL;
    if (!global_inited) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
            return -EIO;
        global_inited = 1;
    }
    sglr_httpc_t *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    if (!(c->multi = curl_multi_init())) {
        free(c);
        return -ENOMEM;
    }
    c->loop = loop;
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    uv_timer_init(loop, &c->reap);
    c->reap.data = c;
    c->handles = 2;
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, socket_fn);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, (void *)c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_fn);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, (void *)c);
    *out = c;
    return 0;
}

sglr_httpc_t *sglr_httpc_default(void)
{
    if (!default_client && !default_shut && sglr_loop)
        sglr_httpc_init(sglr_loop, &default_client);
    return default_client;
}

void sglr_httpc_close(sglr_httpc_t *c)
{
    if (!c || c->closing)
        return;
    c->closing = 1;
    if (c == default_client)
        default_client = NULL;
    uv_timer_stop(&c->timer);
    uv_timer_stop(&c->reap);
    c->pending = c->cancelled = NULL;    /* every request is on c->reqs too */
    /* Each callback may start requests (refused now) or close again (a
     * no-op); take the head afresh every time. */
    sglr_httpc_req_t *r;
    while ((r = c->reqs)) {
        if (!r->cancelled)
            curl_multi_remove_handle(c->multi, r->easy);
        req_finish(r, CURLE_OK, "cancelled");
    }
    /* Closes the cached connections; curl reports them with
     * CURL_POLL_REMOVE, which closes their polls. */
    curl_multi_cleanup(c->multi);
    c->multi = NULL;
    while (c->socks)
        sock_close(c->socks);
    uv_close((uv_handle_t *)&c->timer, timer_closed_cb);
    uv_close((uv_handle_t *)&c->reap, timer_closed_cb);
}

void sglr_httpc_shutdown(void)
{
    default_shut = 1;
    sglr_httpc_close(default_client);
}

void sglr_httpc_global_cleanup(void)
{
    if (global_inited) {
        curl_global_cleanup();
        global_inited = 0;
    }
}
