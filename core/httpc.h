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
 * ("timeout", curl's message, "cancelled" when the client is closed).
 * The callback never runs from inside sglr_httpc_request().
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

typedef struct {
    const char *method;              /* NULL: GET, or POST when body is set */
    const char *url;                 /* http:// or https:// */
    const sglr_httpc_header_t *headers;
    size_t nheaders;
    const char *body;                /* may be NULL */
    size_t body_len;
    long timeout_ms;                 /* total; <= 0: none */
    long connect_timeout_ms;         /* <= 0: curl's default (300 s) */
    const char *ca_file;             /* NULL: system CAs */
    int insecure;                    /* skip TLS peer and host verification */
} sglr_httpc_opts_t;

typedef struct {
    int status;                      /* HTTP status; 0 when error is set */
    const char *error;               /* NULL on a response */
    const char *body;                /* NUL-terminated, body_len bytes */
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
 * CR/LF in a header), -ECANCELED (client closing) or -ENOMEM; on failure
 * cb is never called. */
int sglr_httpc_request(sglr_httpc_t *c, const sglr_httpc_opts_t *opts,
                       sglr_httpc_cb cb, void *data, sglr_httpc_req_t **out);

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
