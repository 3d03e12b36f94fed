/*
 * fuzz_response.c: libFuzzer target for the upstream client's response
 * parsing (upstream.c over llhttp): each input is what a worker answers to
 * a request, sent from a plain socket on loopback, then the worker closes.
 * The request must end (on_done) whatever the bytes: a crash, a sanitizer
 * report or a request that never ends is a finding.
 *
 * Each input is also read by sglr_resp_head_fast (the head reader that
 * spares llhttp the common response shape) and, wherever that answers, by
 * llhttp on its own: status, framing, keep-alive, head length and every
 * stored field must agree, else the input is a finding (abort).
 */
#include "upstream.h"
#include "sglr.h"

#include "fuzz_ref.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uv_loop_t loop;
static int lfd, port;
static sglr_pool_t *pool;
static int done, body_bytes;

static void on_head(sglr_upreq_t *r)
{
    sglr_upreq_continue(r);
}

static void on_body(sglr_upreq_t *r, const char *d, size_t n)
{
    body_bytes += (int)n;
}

static int last_err;

static void on_done(sglr_upreq_t *r, int err)
{
    done = 1;
    last_err = err;
}

/* --- the fast head reader against llhttp ------------------------------------------ */

static int ref_done;

static int ref_headers_complete(llhttp_t *p)
{
    ref_done = 1;
    return HPE_PAUSED;
}

static void differential(const uint8_t *data, size_t size)
{
    static sglr_head_t fast;
    int status = 0, keep_alive = 0;
    long long cl = 0;
    sglr_head_reset(&fast);
    char *in = ref_copy(data, size);
    size_t used = sglr_resp_head_fast(in, size, 64u << 10, &fast, 0, &status, &cl, &keep_alive);
    free(in);
    if (ref_refused(used, &fast))
        return;
    llhttp_settings_t st;
    ref_settings(&st);
    st.on_headers_complete = ref_headers_complete;
    llhttp_t p;
    llhttp_init(&p, HTTP_RESPONSE, &st);
    ref_done = 0;
    llhttp_errno_t e = llhttp_execute(&p, (const char *)data, used);
    const char *pos = llhttp_get_error_pos(&p);
    if (getenv("FUZZ_DEBUG"))
        fprintf(stderr, "fast head %zu bytes, status %d, cl %lld, keep-alive %d; llhttp %s at %ld\n",
                used, status, cl, keep_alive, llhttp_errno_name(e),
                pos ? (long)(pos - (const char *)data) : -1L);
    if (e != HPE_PAUSED || !ref_done || !pos || (size_t)(pos - (const char *)data) != used)
        abort();                                   /* llhttp ends the head elsewhere, or refuses it */
    if (p.status_code != status || !(p.flags & F_CONTENT_LENGTH) || (long long)p.content_length != cl ||
        llhttp_should_keep_alive(&p) != keep_alive)
        abort();
    ref_same_fields(&fast);
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t len = sizeof a;
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 16) < 0 ||
        getsockname(lfd, (struct sockaddr *)&a, &len) < 0)
        abort();
    fcntl(lfd, F_SETFL, O_NONBLOCK);
    port = ntohs(a.sin_port);
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    const char *err;
    pool = sglr_pool_new(url, &err);
    if (!pool)
        abort();
    pool->max_idle = 0;          /* a fresh connection per input */
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        setup();
        ready = 1;
    }
    differential(data, size);
    sglr_upreq_t *r = sglr_upreq_new(pool);
    r->on_head = on_head;
    r->on_body = on_body;
    r->on_done = on_done;
    done = 0;
    sglr_upreq_build(r, "GET", "/", 1, "", 0, NULL, 0);
    sglr_upreq_start(r, 1000, 2000);
    int fd = -1;
    size_t sent = 0;
    char buf[4096];
    double t0 = sglr_now_ms();
    for (int turn = 0; !done && sglr_now_ms() - t0 < 5000; turn++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        if (fd < 0) {
            fd = accept(lfd, NULL, NULL);
            if (fd >= 0) {
                /* a reset, not TIME_WAIT: see fuzz_request.c */
                struct linger lg = { 1, 0 };
                setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
                fcntl(fd, F_SETFL, O_NONBLOCK);
            }
            continue;
        }
        (void)!recv(fd, buf, sizeof buf, 0);      /* the request; not checked */
        if (sent < size) {
            ssize_t w = send(fd, data + sent, size - sent, 0);
            if (w > 0)
                sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN)
                sent = size;
        } else if (fd >= 0) {
            close(fd);                             /* the worker hangs up */
            fd = -2;
        }
    }
    if (fd >= 0)
        close(fd);
    if (!done)
        abort();                                   /* the request never ended */
    if (getenv("FUZZ_DEBUG"))
        fprintf(stderr, "done err=%d after %.0f ms, %d body bytes\n", last_err, sglr_now_ms() - t0,
                body_bytes);
    sglr_upreq_free(r);
    for (int i = 0; i < 8; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    return 0;
}
