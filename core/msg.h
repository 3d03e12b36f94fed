/*
 * msg.h: the parsed head of an HTTP message (request or response), shared by
 * the server (core/server.c) and the upstream client (core/upstream.c).
 *
 * llhttp hands over header names and values in pieces that may be split
 * across reads, so everything is appended to one growing byte buffer and
 * headers are kept as (offset, length) pairs into it:
 *
 *     buf:  GET/generate?x=1 | content-type | application/json | ...
 *           ^url              ^hdr[0].name   ^hdr[0].value
 *
 * Offsets, not pointers, because the buffer moves when it grows.
 */
#ifndef SGLR_MSG_H
#define SGLR_MSG_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    char *data;
    size_t len, cap;
} sglr_buf_t;

int sglr_buf_append(sglr_buf_t *b, const char *p, size_t n);   /* 0 or -ENOMEM */
/* This router's hop token ("sglr-XXXX", empty until set): sent to workers
 * as "via: 1.1 TOKEN", and a request that arrives carrying it has looped
 * back (through other routers, or a router listed as its own worker). */
extern char sglr_via_token[48];
extern size_t sglr_via_len;

/* The decimal digits of v at out (room for 20); returns their count. */
size_t sglr_u64_dec(char *out, unsigned long long v);

/* Room for extra more bytes (and the terminator) without another realloc. */
int sglr_buf_reserve(sglr_buf_t *b, size_t extra);
/* Append "name: value\r\n" in one step. 0 or -ENOMEM. */
int sglr_buf_append_header(sglr_buf_t *b, const char *name, size_t nl, const char *value,
                           size_t vl);
int sglr_buf_printf(sglr_buf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void sglr_buf_free(sglr_buf_t *b);
static inline void sglr_buf_reset(sglr_buf_t *b) { b->len = 0; }

typedef struct {
    uint32_t name_off, name_len, value_off, value_len;
} sglr_hdr_t;

typedef struct {
    sglr_buf_t buf;          /* url bytes, then header names and values */
    uint32_t url_off, url_len;
    sglr_hdr_t *hdrs;
    int nhdrs, cap_hdrs;
    int in_value;            /* last callback was a header value */
} sglr_head_t;

void sglr_head_reset(sglr_head_t *h);
void sglr_head_free(sglr_head_t *h);
int sglr_head_url(sglr_head_t *h, const char *p, size_t n);
int sglr_head_field(sglr_head_t *h, const char *p, size_t n);
int sglr_head_field_done(sglr_head_t *h);   /* on_header_field_complete */
int sglr_head_value(sglr_head_t *h, const char *p, size_t n);
/* A worker's response head read without llhttp, for the common shape only:
 * "HTTP/1.1" or "HTTP/1.0", a status 200-599 other than 204 and 304, CRLF
 * lines, token names, values of visible bytes (no obs-fold, no trailing
 * blank), exactly one Content-Length, no Transfer-Encoding, Upgrade or
 * Proxy-Connection, at most one Connection of "close" or "keep-alive", at
 * most 32 fields and at most max bytes. p[n] must be a NUL (the scans stop
 * there instead of checking bounds), and the names in p are lowercased in
 * place. Anything else, or a head not complete in p[0..n), returns 0 and
 * leaves h as it was: the caller hands the same bytes to llhttp, which
 * decides (core/fuzz/fuzz_response.c checks both agree wherever this
 * answers). Else returns the head's length, with its fields in h (none
 * when skip_ok and the status is 2xx; h holds the whole head, each name
 * and value NUL-terminated in place) and *status, *content_length and
 * *keep_alive set as llhttp would. */
size_t sglr_resp_head_fast(char *p, size_t n, size_t max, sglr_head_t *h, int skip_ok,
                           int *status, long long *content_length, int *keep_alive);

/* A client's request read without llhttp, for the common shape only: a
 * method among GET POST PUT DELETE HEAD OPTIONS PATCH, an origin-form
 * target of visible ASCII, "HTTP/1.1", field lines as sglr_resp_head_fast
 * takes them, exactly one Host, no Expect or Via, at most one
 * Content-Length, the head at most max_head bytes as the server counts
 * them (the target, and each name + 4 + value) and the whole body (at most
 * max_body bytes) in p[0..n). p[n] must be a NUL; names in p are
 * lowercased in place. Anything else returns 0 and leaves h as it was (the
 * caller hands the same bytes to llhttp; core/fuzz/fuzz_request.c checks
 * both agree wherever this answers). Else returns the bytes of the head
 * and body, with the head in h (the target at url_off) and *out set; the
 * body is p[head_len .. head_len + body_len). */
typedef struct {
    int method;              /* llhttp's number */
    int keep_alive;
    size_t head_len, body_len;
} sglr_fast_req_t;
size_t sglr_req_fast(char *p, size_t n, size_t max_head, size_t max_body, sglr_head_t *h,
                     sglr_fast_req_t *out);

/* Case-insensitive lookup of the first header called name; NULL if absent. */
const char *sglr_head_get(const sglr_head_t *h, const char *name, size_t *len);

#define SGLR_HDR_NAME(h, i) ((h)->buf.data + (h)->hdrs[i].name_off)
#define SGLR_HDR_VALUE(h, i) ((h)->buf.data + (h)->hdrs[i].value_off)

#endif
