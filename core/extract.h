/*
 * extract.h: read what routing needs from a raw JSON request body, in one
 * pass over the bytes and without building a document.
 *
 * sglr_extract_run() fully validates the body (RFC 8259 syntax, UTF-8 in
 * strings, nesting depth), checks the types of the fields the route knows,
 * and reports "stream" and "model". With SGLR_EXTRACT_TEXT it also decodes
 * the routing text the cache-aware policy matches on:
 *
 *     generate     text (batch arrays joined with " "), else prompt, else
 *                  input_ids as decimal ids joined with " "
 *     chat         the text of every message, in order, joined with " "
 *                  (string content, or the "text" parts of a part array)
 *     completions  prompt (string, or array joined with " ")
 *
 * Results point into buffers owned by the sglr_extract_t, reused from call
 * to call (so a request costs no allocation once they have grown) and valid
 * until the next call. The extractor knows nothing of Lua; see
 * core/lua_extract.c.
 */
#ifndef SGLR_EXTRACT_H
#define SGLR_EXTRACT_H

#include "msg.h"

#include <stddef.h>

typedef enum {
    SGLR_ROUTE_GENERATE = 0,
    SGLR_ROUTE_CHAT,
    SGLR_ROUTE_COMPLETIONS,
} sglr_route_t;

/* "generate", "chat", "completions" -> route, anything else -> -1. */
int sglr_extract_route(const char *name, size_t len);

enum { SGLR_EXTRACT_TEXT = 1 };

typedef struct {
    /* results of the last sglr_extract_run() */
    int stream;                 /* "stream": true */
    int has_model;              /* "model" was a string */
    const char *model;          /* decoded, not NUL-terminated */
    size_t model_len;
    const char *text;           /* routing text ("" when none) */
    size_t text_len;
    char err[192];              /* why the body was refused */
    /* private */
    sglr_buf_t buf[4];
} sglr_extract_t;

void sglr_extract_init(sglr_extract_t *x);
void sglr_extract_close(sglr_extract_t *x);

/* Returns 0, -EINVAL when the body is refused (x->err says why, in words
 * fit for an API client), -ENOMEM. */
int sglr_extract_run(sglr_extract_t *x, sglr_route_t route,
                     const char *body, size_t n, int flags);

/* Hand the routing text of the last run to *out without copying it: the
 * extractor's buffer that holds it changes places with *out's (emptied,
 * and kept for the next run), and out->len becomes n (at most text_len).
 * Then x->text is "". -> 0, or -1 (*out left alone) when no buffer of x
 * holds the text (an empty one) or that buffer is over max_cap bytes (the
 * extractor keeps a large one rather than grow a small one again). */
int sglr_extract_take_text(sglr_extract_t *x, sglr_buf_t *out, size_t n, size_t max_cap);

#endif
