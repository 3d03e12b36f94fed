/*
 * json.h: the JSON lexer under the readers that work on raw bodies without
 * building a document (core/extract.c, core/splice.c).
 *
 * A cursor walks the bytes once. The caller drives the structure with
 * open/next (so it can act on the members it knows) and skips the rest
 * with sglr_json_skip(), which validates as it goes:
 *
 *     { "text" : [ "a" , "b" ] , "n" : 1 }
 *     ^open    ^key  ^skip     ^next      ^next (closes)
 *
 * Everything is checked against RFC 8259 (syntax, UTF-8 inside strings),
 * and nesting is bounded by SGLR_JSON_MAX_DEPTH so hostile input cannot
 * exhaust the stack. A refusal returns -EINVAL; when the cursor has an
 * err buffer it also says where and why, in words fit for an API client.
 */
#ifndef SGLR_JSON_H
#define SGLR_JSON_H

#include "msg.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SGLR_JSON_MAX_DEPTH 512

typedef struct {
    const uint8_t *s, *p, *end;   /* document start, cursor, end */
    int depth;                    /* containers open at the cursor */
    char *err;                    /* message on refusal, or NULL for none */
    size_t errcap;
} sglr_json_t;

/* A key as written in the document (validated, quotes excluded). */
typedef struct {
    const char *s;
    size_t n;
    int escaped;                  /* holds a backslash: compare decoded */
} sglr_json_key_t;

static inline void sglr_json_init(sglr_json_t *j, const char *s, size_t n,
                                  char *err, size_t errcap)
{
    j->s = j->p = (const uint8_t *)s;
    j->end = j->s + n;
    j->depth = 0;
    j->err = err;
    j->errcap = errcap;
}

static inline void sglr_json_ws(sglr_json_t *j)
{
    const uint8_t *p = j->p, *end = j->end;
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    j->p = p;
}

/* The next byte after whitespace (not consumed), or -1 at the end. */
static inline int sglr_json_peek(sglr_json_t *j)
{
    sglr_json_ws(j);
    return j->p < j->end ? *j->p : -1;
}

static inline int sglr_json_is_number_start(int c)
{
    return c == '-' || (c >= '0' && c <= '9');
}

/* Record "invalid JSON at byte N: ..." (when the cursor has an err buffer)
 * and return -EINVAL. */
int sglr_json_error(sglr_json_t *j, const uint8_t *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* "expected WHAT" at the cursor, or "unexpected end of input". */
int sglr_json_expected(sglr_json_t *j, const char *what);

/* The string at the cursor (on its opening quote): validated, and decoded
 * onto the end of out unless out is NULL. 0, -EINVAL, -ENOMEM. */
int sglr_json_string(sglr_json_t *j, sglr_buf_t *out);
/* The number at the cursor; *is_int says it had no fraction or exponent. */
int sglr_json_number(sglr_json_t *j, int *is_int);
/* true, false or null at the cursor. */
int sglr_json_literal(sglr_json_t *j);
/* Any value at the cursor, validated and skipped. */
int sglr_json_skip(sglr_json_t *j);

/* On '{' or '[' (close is '}' or ']'): 1 when the container has members,
 * 0 when it was empty (and is consumed), or -EINVAL. */
static inline int sglr_json_open(sglr_json_t *j, uint8_t close)
{
    if (++j->depth > SGLR_JSON_MAX_DEPTH)
        return sglr_json_error(j, j->p, "nesting deeper than %d levels", SGLR_JSON_MAX_DEPTH);
    j->p++;
    if (sglr_json_peek(j) == close) {
        j->p++;
        j->depth--;
        return 0;
    }
    return 1;
}

/* After a member: 1 on ',' (consumed: another follows), 0 on close
 * (consumed), or -EINVAL. */
static inline int sglr_json_next(sglr_json_t *j, uint8_t close)
{
    int c = sglr_json_peek(j);
    if (c == ',') {
        j->p++;
        return 1;
    }
    if (c == close) {
        j->p++;
        j->depth--;
        return 0;
    }
    return sglr_json_expected(j, close == '}' ? "',' or '}'" : "',' or ']'");
}
/* An object key and its ':'; leaves the cursor on the value. */
int sglr_json_key(sglr_json_t *j, sglr_json_key_t *k);
int sglr_json_key_is_escaped(const sglr_json_key_t *k, const char *name, size_t n);
/* The key, decoded, equals name[0..n). Inline: it runs for every key. */
static inline int sglr_json_key_is(const sglr_json_key_t *k, const char *name, size_t n)
{
    if (k->escaped)
        return sglr_json_key_is_escaped(k, name, n);
    return k->n == n && memcmp(k->s, name, n) == 0;
}
#define SGLR_JSON_KEY_IS(k, lit) sglr_json_key_is((k), lit, sizeof lit - 1)

/* Length of the well-formed UTF-8 sequence at p (lead byte >= 0x80), or 0. */
size_t sglr_json_utf8_seq(const uint8_t *p, const uint8_t *end);
/* Write s[0..n) as a JSON string literal, quotes included, into dst
 * (cap >= 6 * n + 2 always suffices). Returns its length, or -EINVAL when
 * s is not valid UTF-8, -ENOSPC when dst is too small. */
int sglr_json_quote(char *dst, size_t cap, const char *s, size_t n);

#endif
