/*
 * server.h: the HTTP/1.1 server on libuv + llhttp.
 *
 *   listener --accept--> conn --parse--> exchange --on_request--> owner (Lua)
 *                          ^                 |
 *                          +--- respond / start + write* + finish
 *
 * A connection handles one exchange (request + response) at a time; bytes of
 * pipelined requests that arrive meanwhile wait in a buffer and are parsed
 * when the response is done. A client that sends but does not read is
 * paused: reading stops while 1 MB of requests wait, and the next request
 * is not started while its responses above SGLR_WRITE_HIGH are unsent. The request body is buffered whole (it is a
 * prompt, needed before routing) and capped: a body over max_body is refused
 * with 413 before more of it is read.
 *
 * An exchange outlives its connection while its owner holds it
 * (sglr_exchange_hold/release): after the client goes away, writes become
 * no-ops and sglr_exchange_closed() says so.
 */
#ifndef SGLR_SERVER_H
#define SGLR_SERVER_H

#include <uv.h>
#include "msg.h"

typedef struct sglr_server_s sglr_server_t;
typedef struct sglr_exchange_s sglr_exchange_t;
typedef struct sglr_conn_s sglr_conn_t;

typedef void (*sglr_request_cb)(sglr_exchange_t *x);
typedef void (*sglr_exchange_cb)(sglr_exchange_t *x);

typedef struct {
    size_t max_body;        /* bytes; larger bodies get 413 */
    size_t max_header;      /* bytes of request line + headers; larger get 431 */
    /* timeouts in ms, 0 = none: a request's line and headers must arrive
     * within header_timeout_ms of its first byte, and its body may not stall
     * for body_timeout_ms (both: 408, then close); a kept-alive connection
     * idle for keepalive_timeout_ms is closed; a response the client stops
     * reading for write_timeout_ms is cut (the connection closed, so its
     * owner frees the request's slot) */
    unsigned header_timeout_ms, body_timeout_ms, keepalive_timeout_ms, write_timeout_ms;
    int max_conns;          /* above it a new connection gets 503 and is closed; 0 = no cap */
} sglr_server_opts_t;

struct sglr_server_s {
    uv_tcp_t tcp;
    sglr_server_opts_t opts;
    sglr_request_cb on_request;
    void *data;
    int closing;
    int nconns;
    uv_timer_t sweep;        /* enforces the timeouts, once a second */
    int sweep_open;          /* the sweep handle is not closed yet */
    double refused_log_ms;   /* last "too many connections" log line */
    unsigned long refused;   /* connections refused over max_conns */
    sglr_conn_t *conns;      /* doubly linked list of open connections */
    int listener_closed;
    /* called once the listener and every connection are closed: only then
     * may the owner free the server */
    void (*on_closed)(sglr_server_t *);
};

struct sglr_exchange_s {
    sglr_conn_t *conn;       /* NULL once the client connection is gone */
    sglr_server_t *server;
    sglr_head_t head;        /* url and headers, names lowercased */
    sglr_buf_t body;
    /* the routing text kept for the policy (sglr.extract's check with
     * keep; the radix tree reads it from here), valid when has_text */
    sglr_buf_t text;
    int has_text;
    uint64_t text_serial;    /* names this text to the radix tree (never 0, never reused) */
    int method;              /* llhttp_method_t */
    int http_minor;
    int keep_alive;
    int state;               /* SGLR_X_* */
    int chunked;             /* response uses chunked transfer-encoding */
    int corked;              /* streamed writes collect in cork until uncork */
    int nobody;              /* HEAD or 1xx/204/304: the response has no body */
    sglr_buf_t cork;
    int holds;               /* owner references */
    int status;              /* response status once started */
    double start_ms;
    /* the request's id once the flow chose it (sglr_lua_x_set_request_id):
     * a header value in head, or prefix and random characters in rid_buf;
     * NULL until then */
    const char *rid;
    size_t rid_len;
    char rid_buf[48];
    size_t bytes_out;
    size_t body_held;        /* counted in sglr_exchange_body_bytes */
    /* set by whoever streams into this exchange (the proxy) */
    sglr_exchange_cb on_close;   /* client went away */
    sglr_exchange_cb on_drain;   /* write queue fell below the low mark */
    void *data;
};

enum { SGLR_X_READING, SGLR_X_HANDLING, SGLR_X_STREAMING, SGLR_X_DONE };

#define SGLR_WRITE_HIGH (1 << 20)   /* pause the producer above this many queued bytes */
#define SGLR_WRITE_LOW  (256 << 10)

int sglr_server_init(sglr_server_t *s, const char *host, int port,
                     const sglr_server_opts_t *opts, sglr_request_cb cb, void *data);
int sglr_server_port(sglr_server_t *s);
/* Stop accepting and close idle connections; busy ones close after their
 * response. close_cb runs once the listener handle is closed. */
void sglr_server_stop(sglr_server_t *s, void (*close_cb)(sglr_server_t *));

/* Close the engine's own handle (deferred dispatch) once every server is
 * stopped, before the loop is closed. */
void sglr_server_shutdown(void);

/* Exchanges in flight across all servers (for graceful shutdown). */
extern int sglr_exchanges_active;
/* Requests read whole by sglr_req_fast, not llhttp (the common shape). */
extern unsigned long sglr_requests_fast;
/* Bytes of request bodies held by exchanges not yet freed (their owners
 * still hold them): what request bodies cost the process now. */
extern size_t sglr_exchange_body_bytes;

void sglr_exchange_hold(sglr_exchange_t *x);
void sglr_exchange_release(sglr_exchange_t *x);
static inline int sglr_exchange_closed(const sglr_exchange_t *x) { return x->conn == NULL; }
const char *sglr_exchange_method(const sglr_exchange_t *x);
size_t sglr_exchange_write_queue(const sglr_exchange_t *x);
/* The client's IP address as text into buf; 0 or a negative errno
 * (UV_ENOTCONN once the client has gone). */
int sglr_exchange_peer(const sglr_exchange_t *x, char *buf, size_t len);

/* hdrs: a block of "name: value\r\n" lines (may be empty). content-length and
 * connection are added here. */
int sglr_exchange_respond(sglr_exchange_t *x, int status, const char *hdrs, size_t hlen,
                          const char *body, size_t blen);
/* Start a streamed response: content_length >= 0 sends it as is, -1 uses
 * chunked encoding (or close-delimited for an HTTP/1.0 client). */
int sglr_exchange_start(sglr_exchange_t *x, int status, const char *hdrs, size_t hlen,
                        long long content_length);
int sglr_exchange_write(sglr_exchange_t *x, const char *data, size_t len);
int sglr_exchange_finish(sglr_exchange_t *x);
/* Hold back streamed writes (start, write) until uncork or finish. */
void sglr_exchange_cork(sglr_exchange_t *x);
int sglr_exchange_uncork(sglr_exchange_t *x);
/* End a started response abruptly (the body is incomplete): closes the
 * connection so the client sees the truncation. */
void sglr_exchange_abort(sglr_exchange_t *x);

const char *sglr_status_text(int status);

#endif
