/*
 * splice.h: rewrite JSON bodies for prefill/decode (PD) disaggregation and
 * data-parallel ranks by splicing text, never by decoding and re-encoding
 * (a JSON library turns [] into {} or prints integers above 2^53 as
 * floats; see DESIGN.md 3).
 *
 * The router sends one client body to a prefill and a decode worker at
 * once, both told where to meet for the KV transfer:
 *
 *     {"text": "hi", "bootstrap_room": 7}            client (its room dropped)
 *     {"text": "hi","bootstrap_host":"10.0.0.5",     to both workers
 *      "bootstrap_port":8998,"bootstrap_room":4135821...}
 *
 * and, when logprobs were asked for, answers with the decode response
 * whose meta_info.input_token_logprobs is prefixed by the prefill's:
 *
 *     prefill  {"meta_info": {"input_token_logprobs": [P1, P2]}}
 *     decode   {"text": "..", "meta_info": {"input_token_logprobs": [D1]}}
 *     client   {"text": "..", "meta_info": {"input_token_logprobs": [P1, P2,D1]}}
 *
 * Every function reads its input in one pass with the validating lexer of
 * core/json.c (bounded nesting; any byte string is safe input), copies the
 * untouched bytes as they are, and allocates nothing but the output buffer
 * (and, for the stream transformer, its own buffers). Duplicate keys:
 * the last one counts, as for Python's json on the workers. The module
 * knows nothing of Lua.
 */
#ifndef SGLR_SPLICE_H
#define SGLR_SPLICE_H

#include "msg.h"

#include <stddef.h>
#include <stdint.h>

/* Largest batch accepted (it sizes the caller's room array). */
#define SGLR_SPLICE_MAX_BATCH 65536

/* The batch size of a request body for route (an sglr_route_t of
 * extract.h): 0 for a single request, N >= 1 for a batch of N:
 *
 *     generate     "text": [N strings]; else "input_ids": [N arrays of ids]
 *                  (a string, or an array of ids, is single)
 *     completions  "prompt": [N strings] or [N arrays of ids]
 *                  (a string, or an array of ids, is single)
 *     chat         "n": N > 1
 *
 * -EINVAL when the body is not a JSON object, the route is unknown, or the
 * field has a shape no worker takes (an empty batch, mixed elements, "n"
 * not an integer); -E2BIG past SGLR_SPLICE_MAX_BATCH. */
int sglr_splice_batch(int route, const char *body, size_t len);
/* The same, in the same pass also telling whether the request asks for
 * logprobs (*logprobs = 1 for top-level "return_logprob": true, or
 * "logprobs" true or a number), which the PD merge needs. */
int sglr_splice_request(int route, const char *body, size_t len, int *logprobs);
/* The same, also telling (*bootstrap_keys = 1) whether the object has
 * top-level bootstrap_* members of its own, which decides how the
 * bootstrap fields can be added. */
int sglr_splice_request_ex(int route, const char *body, size_t len, int *logprobs,
                           int *bootstrap_keys);

/* Append to out the body with top-level bootstrap_host (a JSON string:
 * host[0..hlen), an IPv6 address already in brackets), bootstrap_port
 * (an integer, null when port < 0) and bootstrap_room (exact decimal)
 * added as its last members; the client's own top-level bootstrap_* members
 * are removed. batch == 0: scalars, nrooms == 1. batch > 0: arrays of
 * batch elements, one room each (nrooms == batch). Returns 0, -EINVAL (body
 * not a JSON object, bad arguments, host not UTF-8) with out as it was, or
 * -ENOMEM. */
int sglr_splice_bootstrap(sglr_buf_t *out, const char *body, size_t len,
                          const char *host, size_t hlen, int port,
                          const uint64_t *rooms, size_t nrooms, int batch);
/* sglr_splice_bootstrap for a body sglr_splice_request_ex accepted and
 * found without bootstrap members: the fields are written before its
 * closing brace without a second pass over it. Other bytes are kept as
 * they are (sglr_splice_bootstrap drops whitespace between members).
 * Returns 0, -EINVAL (no closing brace, bad arguments, host not UTF-8)
 * with out as it was, or -ENOMEM. */
int sglr_splice_bootstrap_append(sglr_buf_t *out, const char *body, size_t len,
                                 const char *host, size_t hlen, int port,
                                 const uint64_t *rooms, size_t nrooms, int batch);

/* Append to out the body with top-level "data_parallel_rank": rank added
 * as its last member, the client's own top-level data_parallel_rank
 * members removed (a dp-aware router picks the rank, not the client):
 *
 *     {"text":"hi","data_parallel_rank":7}  ->  {"text":"hi","data_parallel_rank":2}
 *
 * Returns 0, -EINVAL (body not a JSON object, rank < 0) with out as it
 * was, or -ENOMEM. */
int sglr_splice_rank(sglr_buf_t *out, const char *body, size_t len, int rank);

/* A fresh random room in [0, 2^63-1]: a per-thread PRNG (splitmix64)
 * seeded once from getrandom(), reseeded in a forked child. */
uint64_t sglr_splice_room(void);

/* Append to out the decode response with meta_info.input_token_logprobs
 * holding the prefill's items first, then its own. A top-level array is a
 * batch: element i takes prefill element i. A decode object takes a prefill
 * object, or element "index" (default 0) of a prefill array. Where either
 * side lacks the key (or it is not an array) decode is copied unchanged.
 * Returns 0, -EINVAL when either body is not valid JSON (out as it was),
 * -ENOMEM. */
int sglr_splice_merge_logprobs(sglr_buf_t *out, const char *prefill, size_t plen,
                               const char *decode, size_t dlen);

/* The JSON payload of the last "data: {...}" line of an SSE body (a
 * prefill that streamed): *off and *len locate it. 0, or -ENOENT. */
int sglr_splice_sse_last(const char *p, size_t n, size_t *off, size_t *len);

/* The same merge over a decode SSE stream, event by event:
 *
 *     feed "data: {..}\n\ndata: {..."  ->  out "data: {merged}\n\n"
 *     feed "}\n\ndata: [DONE]\n\n"      ->  out "data: {merged}\n\ndata: [DONE]\n\n"
 *
 * An event ends at a blank line (LF or CRLF line ends). An event with one
 * "data:" line whose payload is JSON carrying the key is merged; any other
 * event ([DONE], comments, non-JSON) passes byte for byte. A partial event
 * is held until the next feed; close() flushes it unchanged. The prefill's
 * items are copied at init/set, so its body need not outlive the call. */
typedef struct {
    void *data;             /* the caller's */
    /* private */
    sglr_buf_t tail;        /* the event not complete yet */
    sglr_buf_t items;       /* prefill items, one element after another */
    sglr_buf_t spans;       /* per prefill element: where its items are */
    size_t nspans;
    int prefill;            /* 0: none set, '{': one response, '[': a batch */
    int line;               /* the current line so far: empty, "\r", text */
    int spill;              /* an event too long to hold is passing through */
} sglr_splice_sse_t;

/* prefill may be NULL (set it later); until one is set events pass
 * unchanged. Returns what set_prefill returns; the transformer is usable
 * (as a pass-through) whatever it returns. */
int sglr_splice_sse_init(sglr_splice_sse_t *s, const char *prefill, size_t plen);
/* 0, -EINVAL (not valid JSON: events will pass unchanged), -ENOMEM. */
int sglr_splice_sse_set_prefill(sglr_splice_sse_t *s, const char *prefill, size_t plen);
/* Append the complete events of chunk p[0..n) to out. 0 or -ENOMEM. */
int sglr_splice_sse_feed(sglr_splice_sse_t *s, sglr_buf_t *out, const char *p, size_t n);
/* Append the held partial event (when out is not NULL) and free
 * everything; safe twice. 0 or -ENOMEM. */
int sglr_splice_sse_close(sglr_splice_sse_t *s, sglr_buf_t *out);

#endif
