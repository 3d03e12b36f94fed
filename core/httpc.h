/*
 * httpc.h: the control-plane HTTP client: libcurl's multi-socket interface
 * driven by the libuv loop (health checks, /get_load polls, fan-outs, the
 * Kubernetes API, https workers). The proxy hot path does not use it.
 *
 *   sglr_httpc_t ── one CURLM (connection cache: keep-alive and TLS
 *        │          sessions are reused across requests)
 *        ├── uv_timer_t          curl's single timeout (TIMERFUNCTION)
 *        ├── sock ── uv_poll_t   one per socket curl asks us to watch
 *        └── req ── CURL easy    one per request in flight
 *
 * Every request ends in exactly one callback: a response, or an error
 * ("timeout", curl's message, "cancelled" when the request was cancelled
 * or the client closed). The callback never runs from inside
 * sglr_httpc_request() or sglr_httpc_cancel().
 *
 * A request with an on_data callback gets its body as it arrives (a
 * Kubernetes watch is one response that never ends): each piece goes to
 * on_data and the final callback has an empty body. No callback of ours
 * ever runs inside libcurl: pieces are collected by curl's write callback
 * and handed over once curl_multi_socket_action has returned, so on_data
 * may start requests, cancel any request (its own too) or close the client.
 */
#ifndef SGLR_HTTPC_H
#define SGLR_HTTPC_H

#include <stddef.h>
#include <uv.h>

typedef struct sglr_httpc sglr_httpc_t;
typedef struct sglr_httpc_req sglr_httpc_req_t;

typedef struct {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} sglr_httpc_header_t;

typedef void (*sglr_httpc_data_cb)(sglr_httpc_req_t *req, int status, const char *data,
                                   size_t len, void *ud);

typedef struct {
    const char *method;              /* NULL: GET, or POST when body is set */
    const char *url;                 /* http:// or https:// */
    const sglr_httpc_header_t *headers;
    size_t nheaders;
    const char *body;                /* may be NULL */
    size_t body_len;
    long timeout_ms;                 /* total; <= 0: none */
    long connect_timeout_ms;         /* <= 0: curl's default (300 s) */
    /* TLS, as the Kubernetes API needs it (all optional) */
    const char *ca_file;             /* CA bundle file; NULL: system CAs */
    const char *ca_data;             /* CA bundle, PEM in memory; wins over ca_file */
    size_t ca_data_len;
    const char *cert_file, *key_file;    /* client certificate and key, PEM files */
    const char *cert_data, *key_data;    /* the same, PEM in memory */
    size_t cert_data_len, key_data_len;
    int insecure;                    /* skip TLS peer and host verification */
    const char *bearer_token;        /* sent as "authorization: Bearer <token>" */
    /* The body as it arrives, instead of buffered for the final callback;
     * called with the response status, never with len 0. */
    sglr_httpc_data_cb on_data;
} sglr_httpc_opts_t;

typedef struct {
    int status;                      /* HTTP status; 0 when error is set */
    const char *error;               /* NULL on a response */
    const char *body;                /* NUL-terminated, body_len bytes ("" with on_data) */
    size_t body_len;
    const sglr_httpc_header_t *headers;  /* names lowercased, values trimmed; */
    size_t nheaders;                     /* all NUL-terminated, in order */
} sglr_httpc_response_t;

/* Everything in res is valid only during the callback. */
typedef void (*sglr_httpc_cb)(sglr_httpc_req_t *req, const sglr_httpc_response_t *res,
                              void *data);

/* curl_global_init on first use; call sglr_httpc_global_cleanup() once at
 * exit, after every client has been closed and the loop has drained. */
int sglr_httpc_init(uv_loop_t *loop, sglr_httpc_t **out);
/* The client the Lua module uses, created on sglr_loop at first use;
 * NULL on -ENOMEM. */
sglr_httpc_t *sglr_httpc_default(void);

/* Start a request; all of opts is copied. Returns 0, -EINVAL (no URL,
 * CR/LF in a header or the token), -ECANCELED (client closing), -ENOTSUP
 * (TLS data in memory with a libcurl older than 7.77) or -ENOMEM; on
 * failure cb is never called. *out, when given, is valid until cb returns:
 * the handle for sglr_httpc_cancel(). */
int sglr_httpc_request(sglr_httpc_t *c, const sglr_httpc_opts_t *opts,
                       sglr_httpc_cb cb, void *data, sglr_httpc_req_t **out);

/* Stop a request in flight: its connection is closed at once (a transfer
 * cut short is never reused), no more on_data follows, and cb runs from
 * the loop soon after with error "cancelled". A second cancel is a no-op;
 * so is one from inside the request's own final callback. */
void sglr_httpc_cancel(sglr_httpc_req_t *req);

/* Number of requests in flight. */
size_t sglr_httpc_active(const sglr_httpc_t *c);

/* Abort every request in flight (each callback runs with "cancelled"),
 * close the connections and the uv handles. The memory is freed from the
 * handles' close callbacks, so the loop must run afterwards. Safe to call
 * from a request callback. */
void sglr_httpc_close(sglr_httpc_t *c);
/* Close the default client if it was ever created. */
void sglr_httpc_shutdown(void);
void sglr_httpc_global_cleanup(void);

#endif
