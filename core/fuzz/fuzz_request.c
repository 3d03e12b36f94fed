/*
 * fuzz_request.c: libFuzzer target for the request parsing path of the
 * HTTP server (server.c over llhttp): each input is sent as the raw bytes
 * of a client connection to a server on loopback, which answers what it
 * parses (200, a streamed answer, or its own 4xx) until the client's half
 * close. Crashes, sanitizer reports and hangs (a connection the server
 * never finishes) are findings.
 *
 * Each input is also read by sglr_req_fast (the reader that spares llhttp
 * the common request shape) and, wherever that answers, by llhttp on its
 * own (strict, as the server builds it): method, target, version, fields,
 * body, keep-alive and length must agree, else the input is a finding.
 */
#include "server.h"
#include "sglr.h"

#include "fuzz_ref.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static uv_loop_t loop;
static sglr_server_t server;
static int port;

static void on_request(sglr_exchange_t *x)
{
    size_t n = x->head.url_len;
    if (n > 1 && x->head.buf.data[x->head.url_off + 1] == 's') {
        sglr_exchange_start(x, 200, "", 0, -1);      /* a streamed answer */
        sglr_exchange_write(x, x->body.data ? x->body.data : "", x->body.len);
        sglr_exchange_finish(x);
    } else {
        sglr_exchange_respond(x, 200, "x-fuzz: 1\r\n", 11, "ok", 2);
    }
}

/* --- the fast request reader against llhttp ---------------------------------------- */

static sglr_buf_t ref_url, ref_body;
static int ref_done;

static int ref_url_cb(llhttp_t *p, const char *at, size_t n) { return sglr_buf_append(&ref_url, at, n) ? -1 : 0; }
static int ref_body_cb(llhttp_t *p, const char *at, size_t n) { return sglr_buf_append(&ref_body, at, n) ? -1 : 0; }
static int ref_complete(llhttp_t *p)
{
    ref_done = 1;
    return HPE_PAUSED;
}

static void differential(const uint8_t *data, size_t size)
{
    static sglr_head_t fast;
    sglr_head_reset(&fast);
    char *in = ref_copy(data, size);
    sglr_fast_req_t fr;
    size_t used = sglr_req_fast(in, size, 8 << 10, 64 << 10, &fast, &fr);
    free(in);
    if (ref_refused(used, &fast))
        return;
    llhttp_settings_t st;
    ref_settings(&st);
    st.on_url = ref_url_cb;
    st.on_body = ref_body_cb;
    st.on_message_complete = ref_complete;
    llhttp_t p;
    llhttp_init(&p, HTTP_REQUEST, &st);
    ref_url.len = ref_body.len = 0;
    ref_done = 0;
    llhttp_errno_t e = llhttp_execute(&p, (const char *)data, used);
    const char *pos = llhttp_get_error_pos(&p);
    if (getenv("FUZZ_DEBUG"))
        fprintf(stderr, "fast request %zu bytes (head %zu, body %zu), method %d; llhttp %s at %ld\n",
                used, fr.head_len, fr.body_len, fr.method, llhttp_errno_name(e),
                pos ? (long)(pos - (const char *)data) : -1L);
    if (e != HPE_PAUSED || !ref_done || !pos || (size_t)(pos - (const char *)data) != used)
        abort();                                   /* llhttp ends the request elsewhere, or refuses it */
    if (p.method != fr.method || p.http_major != 1 || p.http_minor != 1 ||
        llhttp_should_keep_alive(&p) != fr.keep_alive)
        abort();
    if (ref_url.len != fast.url_len || memcmp(ref_url.data, fast.buf.data + fast.url_off, fast.url_len) != 0)
        abort();
    if (ref_body.len != fr.body_len ||
        (fr.body_len && memcmp(ref_body.data, data + fr.head_len, fr.body_len) != 0))
        abort();
    ref_same_fields(&fast);
}

static void setup(void)
{
    signal(SIGPIPE, SIG_IGN);
    uv_loop_init(&loop);
    sglr_loop = &loop;
    sglr_clock_start();
    sglr_server_opts_t o = { .max_body = 64 << 10, .max_header = 8 << 10 };
    if (sglr_server_init(&server, "127.0.0.1", 0, &o, on_request, NULL) < 0)
        abort();
    port = sglr_server_port(&server);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        setup();
        ready = 1;
    }
    differential(data, size);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    /* close with a reset: thousands of connections a second would use up
     * the ephemeral ports in TIME_WAIT */
    struct linger lg = { 1, 0 };
    if (fd < 0)
        abort();
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return 0;
    }
    fcntl(fd, F_SETFL, O_NONBLOCK);
    size_t sent = 0;
    int eof = 0;
    char buf[65536];
    /* a bound on the loop turns: a connection the server never finishes is
     * a hang, which libFuzzer reports as a timeout */
    for (int turn = 0; turn < 200000 && !eof; turn++) {
        if (sent < size) {
            ssize_t w = send(fd, data + sent, size - sent, 0);
            if (w > 0)
                sent += (size_t)w;
            else if (w < 0 && errno != EAGAIN)
                sent = size;
            if (sent == size)
                shutdown(fd, SHUT_WR);
        } else if (turn == 0) {
            shutdown(fd, SHUT_WR);
        }
        uv_run(&loop, UV_RUN_NOWAIT);
        ssize_t r = recv(fd, buf, sizeof buf, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN))
            eof = 1;
    }
    close(fd);
    while (server.nconns > 0)
        uv_run(&loop, UV_RUN_NOWAIT);
    return 0;
}
