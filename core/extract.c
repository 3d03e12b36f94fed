/*
 * extract.c: a single-pass JSON validator that decodes, on the way, the few
 * fields routing needs (see extract.h).
 *
 * The parser is a recursive descent over the raw bytes. Values nobody asked
 * about are validated and skipped; the known fields of the route are parsed
 * by their own small functions, which check the type and, when the caller
 * wants the routing text, decode strings straight into an output buffer.
 * Strings dominate the cost, so the string scanner moves over plain ASCII
 * sixteen bytes at a time (SSE2) and copies runs with memcpy.
 *
 * An output buffer is reserved for the rest of the body before a string is
 * decoded into it: decoding never lengthens a string (an escape is at least
 * as long as what it stands for), so the copy loop needs no bounds checks.
 *
 * Duplicate keys: the last one wins, as in Python's json, which is what the
 * workers will see.
 */
#include "extract.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define MAX_DEPTH 512
/* Buffers that grew past this for one huge body are dropped on the next
 * call instead of being kept for the life of the process. */
#define KEEP_CAP (8u << 20)

enum { SLOT_MODEL, SLOT_TEXT, SLOT_PROMPT, SLOT_IDS, SLOT_KEY, NSLOTS };

typedef sglr_extract_buf_t buf_t;

typedef struct {
    const uint8_t *s, *p, *end;
    sglr_extract_t *x;
    int depth;
} parser_t;

/* ---- errors ------------------------------------------------------------- */

static int syntax_error(parser_t *ps, const uint8_t *at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int syntax_error(parser_t *ps, const uint8_t *at, const char *fmt, ...)
{
    char *e = ps->x->err;
    size_t cap = sizeof ps->x->err;
    int n = snprintf(e, cap, "invalid JSON at byte %zu: ", (size_t)(at - ps->s));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e + n, cap - (size_t)n, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

static int type_error(parser_t *ps, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int type_error(parser_t *ps, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->x->err, sizeof ps->x->err, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

/* "expected X" at the current byte, or the end of input. */
static int expected(parser_t *ps, const char *what)
{
    if (ps->p >= ps->end)
        return syntax_error(ps, ps->p, "unexpected end of input");
    return syntax_error(ps, ps->p, "expected %s", what);
}

#define TRY(e) do { int _r = (e); if (_r < 0) return _r; } while (0)

/* ---- buffers ------------------------------------------------------------ */

static int reserve(buf_t *b, size_t extra)
{
    if (b->cap - b->len >= extra)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2)
            return -ENOMEM;
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d)
        return -ENOMEM;
    b->data = d;
    b->cap = cap;
    return 0;
}

static int append(buf_t *b, const void *s, size_t n)
{
    TRY(reserve(b, n));
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* Start the next piece of a " "-joined text. */
static int piece(buf_t *b, size_t *pieces)
{
    if (b && (*pieces)++ > 0)
        return append(b, " ", 1);
    return 0;
}

/* ---- lexical level ------------------------------------------------------ */

static inline void ws(parser_t *ps)
{
    const uint8_t *p = ps->p, *end = ps->end;
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    ps->p = p;
}

static inline int peek(parser_t *ps)
{
    ws(ps);
    return ps->p < ps->end ? *ps->p : -1;
}

/* Bytes a string may hold as they are. */
static uint8_t plain[256];

static void init_tables(void)
{
    if (plain['a'])
        return;
    for (int c = 0x20; c < 0x80; c++)
        plain[c] = c != '"' && c != '\\';
}

static int hex4(const uint8_t *p, const uint8_t *end, uint32_t *out)
{
    if (end - p < 4)
        return -1;
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f')
            v |= (c | 0x20) - 'a' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xC0 | cp >> 6);
        o[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12);
        o[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (char)(0xF0 | cp >> 18);
    o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Length of the well-formed UTF-8 sequence at p (lead byte >= 0x80), or 0
 * (overlongs, surrogates and code points past U+10FFFF are refused). */
static size_t utf8_seq(const uint8_t *p, const uint8_t *end)
{
    uint8_t c = p[0];
    size_t n;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if ((size_t)(end - p) < n || p[1] < lo || p[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++)
        if ((p[i] & 0xC0) != 0x80)
            return 0;
    return n;
}

/* The string at ps->p (on its opening quote): validated, and decoded onto
 * the end of out unless out is NULL. */
static int scan_string(parser_t *ps, buf_t *out)
{
    const uint8_t *p = ps->p + 1, *end = ps->end;
    char *o = NULL;
    if (out) {
        TRY(reserve(out, (size_t)(end - p)));
        o = out->data + out->len;
    }
    for (;;) {
        const uint8_t *run = p;
#ifdef __SSE2__
        /* One signed compare flags both control bytes and bytes >= 0x80. */
        const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\'),
                      space = _mm_set1_epi8(0x20);
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            __m128i m = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote),
                                                  _mm_cmpeq_epi8(v, bslash)),
                                     _mm_cmplt_epi8(v, space));
            int bits = _mm_movemask_epi8(m);
            if (bits) {
                p += __builtin_ctz((unsigned)bits);
                break;
            }
            p += 16;
        }
#endif
        while (p < end && plain[*p])
            p++;
        if (o && p > run) {
            memcpy(o, run, (size_t)(p - run));
            o += p - run;
        }
        if (p >= end)
            return syntax_error(ps, end, "unterminated string");
        uint8_t c = *p;
        if (c == '"')
            break;
        if (c == '\\') {
            if (end - p < 2)
                return syntax_error(ps, end, "unterminated string");
            char ch;
            switch (p[1]) {
            case '"': ch = '"'; break;
            case '\\': ch = '\\'; break;
            case '/': ch = '/'; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            case 'u': {
                uint32_t cp, lo;
                if (hex4(p + 2, end, &cp) < 0)
                    return syntax_error(ps, p, "invalid \\u escape");
                p += 6;
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    if (end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
                        hex4(p + 2, end, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        p += 6;
                    } else {
                        cp = 0xFFFD;    /* lone surrogate: valid JSON, not text */
                    }
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    cp = 0xFFFD;
                }
                if (o)
                    o += put_utf8(o, cp);
                continue;
            }
            default:
                return syntax_error(ps, p, "invalid escape in string");
            }
            if (o)
                *o++ = ch;
            p += 2;
        } else if (c < 0x20) {
            return syntax_error(ps, p, "control character in string");
        } else {
            size_t k = utf8_seq(p, end);
            if (!k)
                return syntax_error(ps, p, "invalid UTF-8 in string");
            if (o) {
                memcpy(o, p, k);
                o += k;
            }
            p += k;
        }
    }
    if (out)
        out->len = (size_t)(o - out->data);
    ps->p = p + 1;
    return 0;
}

static inline int is_digit(const uint8_t *p, const uint8_t *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

static int scan_number(parser_t *ps, int *is_int)
{
    const uint8_t *p = ps->p, *end = ps->end;
    *is_int = 1;
    if (p < end && *p == '-')
        p++;
    if (!is_digit(p, end))
        goto bad;
    if (*p == '0')
        p++;
    else
        while (is_digit(p, end))
            p++;
    if (p < end && *p == '.') {
        *is_int = 0;
        p++;
        if (!is_digit(p, end))
            goto bad;
        while (is_digit(p, end))
            p++;
    }
    if (p < end && (*p | 0x20) == 'e') {
        *is_int = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (!is_digit(p, end))
            goto bad;
        while (is_digit(p, end))
            p++;
    }
    ps->p = p;
    return 0;
bad:
    if (p >= end)
        return syntax_error(ps, p, "unexpected end of input");
    return syntax_error(ps, p, "invalid number");
}

static int scan_literal(parser_t *ps)
{
    static const char *const lits[] = { "true", "false", "null" };
    size_t left = (size_t)(ps->end - ps->p);
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(lits[i]);
        if (left >= n && memcmp(ps->p, lits[i], n) == 0) {
            ps->p += n;
            return 0;
        }
    }
    for (int i = 0; i < 3; i++)
        if (left < strlen(lits[i]) && memcmp(ps->p, lits[i], left) == 0)
            return syntax_error(ps, ps->end, "unexpected end of input");
    return syntax_error(ps, ps->p, "expected a value");
}

/* ---- generic values ----------------------------------------------------- */

static int skip_value(parser_t *ps);

static int enter(parser_t *ps)
{
    if (++ps->depth > MAX_DEPTH)
        return syntax_error(ps, ps->p, "nesting deeper than %d levels", MAX_DEPTH);
    ps->p++;
    return 0;
}

/* After an element: ',' (returns 1: another follows) or the closing byte
 * (returns 0, consumed). */
static int next_or_close(parser_t *ps, uint8_t close)
{
    int c = peek(ps);
    if (c == ',') {
        ps->p++;
        return 1;
    }
    if (c == close) {
        ps->p++;
        ps->depth--;
        return 0;
    }
    return expected(ps, close == '}' ? "',' or '}'" : "',' or ']'");
}

/* Opening an object or array at ps->p: 1 when it has elements, 0 when it
 * was empty (and is consumed). */
static int open_container(parser_t *ps, uint8_t close)
{
    TRY(enter(ps));
    if (peek(ps) == close) {
        ps->p++;
        ps->depth--;
        return 0;
    }
    return 1;
}

/* The key at ps->p and its ':'. *k points into the body, or into the key
 * buffer when the key had escapes. */
static int scan_key(parser_t *ps, const char **k, size_t *kn)
{
    if (peek(ps) != '"')
        return expected(ps, "a string key");
    const uint8_t *start = ps->p + 1;
    TRY(scan_string(ps, NULL));
    *k = (const char *)start;
    *kn = (size_t)(ps->p - 1 - start);
    if (memchr(start, '\\', *kn)) {
        buf_t *kb = &ps->x->buf[SLOT_KEY];
        parser_t again = *ps;
        again.p = start - 1;
        kb->len = 0;
        TRY(scan_string(&again, kb));
        *k = kb->data;
        *kn = kb->len;
    }
    if (peek(ps) != ':')
        return expected(ps, "':'");
    ps->p++;
    ws(ps);
    return 0;
}

static int skip_value(parser_t *ps)
{
    int c = peek(ps), more, is_int;
    const char *k;
    size_t kn;
    switch (c) {
    case -1:
        return syntax_error(ps, ps->p, "unexpected end of input");
    case '"':
        return scan_string(ps, NULL);
    case '{':
        TRY(more = open_container(ps, '}'));
        while (more) {
            TRY(scan_key(ps, &k, &kn));
            TRY(skip_value(ps));
            TRY(more = next_or_close(ps, '}'));
        }
        return 0;
    case '[':
        TRY(more = open_container(ps, ']'));
        while (more) {
            TRY(skip_value(ps));
            TRY(more = next_or_close(ps, ']'));
        }
        return 0;
    case 't': case 'f': case 'n':
        return scan_literal(ps);
    default:
        if (c == '-' || (c >= '0' && c <= '9'))
            return scan_number(ps, &is_int);
        if (c >= 0x20 && c < 0x7F)
            return syntax_error(ps, ps->p, "unexpected character '%c'", c);
        return syntax_error(ps, ps->p, "unexpected byte 0x%02x", c);
    }
}

static int key_is(const char *k, size_t kn, const char *name)
{
    size_t n = strlen(name);
    return kn == n && memcmp(k, name, n) == 0;
}

/* A JSON integer at ps->p, appended as written (JSON integers are plain
 * decimal). Returns 1 when the number was not an integer (not appended). */
static int integer(parser_t *ps, buf_t *out, size_t *pieces)
{
    const uint8_t *start = ps->p;
    int is_int;
    TRY(scan_number(ps, &is_int));
    if (!is_int)
        return 1;
    if (out) {
        TRY(piece(out, pieces));
        TRY(append(out, start, (size_t)(ps->p - start)));
    }
    return 0;
}

static inline int is_number_start(int c)
{
    return c == '-' || (c >= '0' && c <= '9');
}

/* ---- the fields routing knows ------------------------------------------- */

/* generate "text": a string or an array of strings. Returns 1 for null. */
static int field_text(parser_t *ps, buf_t *out)
{
    static const char msg[] = "field 'text' must be a string or an array of strings";
    size_t pieces = 0;
    int c = peek(ps), more;
    if (out)
        out->len = 0;
    if (c == '"')
        return scan_string(ps, out);
    if (c == 'n') {
        TRY(scan_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? skip_value(ps) : type_error(ps, msg);
    TRY(more = open_container(ps, ']'));
    while (more) {
        if (peek(ps) != '"')
            return ps->p >= ps->end ? skip_value(ps) : type_error(ps, msg);
        TRY(piece(out, &pieces));
        TRY(scan_string(ps, out));
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* Token ids: an array of integers at ps->p, each appended. */
static int id_array(parser_t *ps, buf_t *out, size_t *pieces, const char *msg)
{
    int more;
    TRY(more = open_container(ps, ']'));
    while (more) {
        int c = peek(ps), r;
        if (!is_number_start(c))
            return c < 0 ? skip_value(ps) : type_error(ps, "%s", msg);
        TRY(r = integer(ps, out, pieces));
        if (r)
            return type_error(ps, "%s", msg);
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* generate "input_ids": ids, or a batch of arrays of ids. 1 for null. */
static int field_input_ids(parser_t *ps, buf_t *out)
{
    static const char msg[] =
        "field 'input_ids' must be an array of integers or an array of arrays of integers";
    size_t pieces = 0;
    int c = peek(ps), more;
    if (out)
        out->len = 0;
    if (c == 'n') {
        TRY(scan_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? skip_value(ps) : type_error(ps, msg);
    TRY(more = open_container(ps, ']'));
    while (more) {
        int r;
        c = peek(ps);
        if (c == '[') {
            TRY(id_array(ps, out, &pieces, msg));
        } else if (is_number_start(c)) {
            TRY(r = integer(ps, out, &pieces));
            if (r)
                return type_error(ps, msg);
        } else {
            return c < 0 ? skip_value(ps) : type_error(ps, msg);
        }
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* "prompt": a string, or an array whose strings, token ids and arrays of
 * token ids are joined; other elements are left to the worker to judge.
 * Returns 1 for null. */
static int field_prompt(parser_t *ps, buf_t *out)
{
    size_t pieces = 0;
    int c = peek(ps), more;
    if (out)
        out->len = 0;
    if (c == '"')
        return scan_string(ps, out);
    if (c == 'n') {
        TRY(scan_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? skip_value(ps) : type_error(ps, "field 'prompt' must be a string or an array");
    TRY(more = open_container(ps, ']'));
    while (more) {
        c = peek(ps);
        if (c == '"') {
            TRY(piece(out, &pieces));
            TRY(scan_string(ps, out));
        } else if (is_number_start(c)) {
            TRY(integer(ps, out, &pieces));
        } else if (c == '[') {
            /* a batch of token-id prompts; anything odd inside is skipped */
            int inner;
            TRY(inner = open_container(ps, ']'));
            while (inner) {
                if (is_number_start(peek(ps)))
                    TRY(integer(ps, out, &pieces));
                else
                    TRY(skip_value(ps));
                TRY(inner = next_or_close(ps, ']'));
            }
        } else {
            TRY(skip_value(ps));
        }
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* One element of a content part array: {"type": "text", "text": "..."}
 * counts; image parts and the like are skipped. */
static int content_part(parser_t *ps, buf_t *out, size_t *pieces)
{
    size_t mark = out ? out->len : 0, mark_pieces = *pieces;
    int is_text = 0, has_text = 0, more;
    const char *k;
    size_t kn;
    TRY(more = open_container(ps, '}'));
    while (more) {
        TRY(scan_key(ps, &k, &kn));
        if (key_is(k, kn, "type") && peek(ps) == '"') {
            const uint8_t *start = ps->p + 1;
            TRY(scan_string(ps, NULL));
            is_text = ps->p - 1 - start == 4 && memcmp(start, "text", 4) == 0;
        } else if (key_is(k, kn, "text") && peek(ps) == '"') {
            if (has_text && out) {
                out->len = mark;
                *pieces = mark_pieces;
            }
            TRY(piece(out, pieces));
            TRY(scan_string(ps, out));
            has_text = 1;
        } else {
            TRY(skip_value(ps));
        }
        TRY(more = next_or_close(ps, '}'));
    }
    if (!is_text && out) {
        out->len = mark;
        *pieces = mark_pieces;
    }
    return 0;
}

static int message_content(parser_t *ps, buf_t *out, size_t *pieces)
{
    int c = peek(ps), more;
    if (c == '"') {
        TRY(piece(out, pieces));
        return scan_string(ps, out);
    }
    if (c != '[')
        return skip_value(ps);      /* null (tool calls) or odd: the worker judges */
    TRY(more = open_container(ps, ']'));
    while (more) {
        if (peek(ps) == '{')
            TRY(content_part(ps, out, pieces));
        else
            TRY(skip_value(ps));
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* chat "messages": an array of objects; the content of each is joined. */
static int field_messages(parser_t *ps, buf_t *out)
{
    size_t pieces = 0;
    int c = peek(ps), more;
    if (out)
        out->len = 0;
    if (c != '[')
        return c < 0 ? skip_value(ps) : type_error(ps, "field 'messages' must be an array");
    TRY(more = open_container(ps, ']'));
    while (more) {
        c = peek(ps);
        if (c != '{')
            return c < 0 ? skip_value(ps)
                         : type_error(ps, "field 'messages' must be an array of objects");
        TRY(more = open_container(ps, '}'));
        size_t mark = 0, mark_pieces = 0;
        int seen = 0;
        while (more) {
            const char *k;
            size_t kn;
            TRY(scan_key(ps, &k, &kn));
            if (key_is(k, kn, "content")) {
                if (out) {
                    if (seen) {     /* a repeated key replaces the first */
                        out->len = mark;
                        pieces = mark_pieces;
                    }
                    mark = out->len;
                    mark_pieces = pieces;
                }
                seen = 1;
                TRY(message_content(ps, out, &pieces));
            } else {
                TRY(skip_value(ps));
            }
            TRY(more = next_or_close(ps, '}'));
        }
        TRY(more = next_or_close(ps, ']'));
    }
    return 0;
}

/* ---- the body ----------------------------------------------------------- */

int sglr_extract_route(const char *name, size_t len)
{
    if (len == 8 && memcmp(name, "generate", 8) == 0)
        return SGLR_ROUTE_GENERATE;
    if (len == 4 && memcmp(name, "chat", 4) == 0)
        return SGLR_ROUTE_CHAT;
    if (len == 11 && memcmp(name, "completions", 11) == 0)
        return SGLR_ROUTE_COMPLETIONS;
    return -1;
}

void sglr_extract_init(sglr_extract_t *x)
{
    memset(x, 0, sizeof *x);
    init_tables();
}

void sglr_extract_close(sglr_extract_t *x)
{
    for (int i = 0; i < NSLOTS; i++)
        free(x->buf[i].data);
    memset(x, 0, sizeof *x);
}

int sglr_extract_run(sglr_extract_t *x, sglr_route_t route,
                     const char *body, size_t n, int flags)
{
    init_tables();
    for (int i = 0; i < NSLOTS; i++) {
        if (x->buf[i].cap > KEEP_CAP) {
            free(x->buf[i].data);
            x->buf[i] = (buf_t){ 0 };
        }
        x->buf[i].len = 0;
    }
    x->stream = 0;
    x->has_model = 0;
    x->model = "";
    x->model_len = 0;
    x->text = "";
    x->text_len = 0;
    x->err[0] = 0;

    int want = flags & SGLR_EXTRACT_TEXT;
    buf_t *text = want ? &x->buf[SLOT_TEXT] : NULL;
    buf_t *prompt = want ? &x->buf[SLOT_PROMPT] : NULL;
    buf_t *ids = want ? &x->buf[SLOT_IDS] : NULL;
    int have_text = 0, have_prompt = 0, have_ids = 0, have_messages = 0;
    parser_t ps = { (const uint8_t *)body, (const uint8_t *)body,
                    (const uint8_t *)body + n, x, 0 };
    parser_t *p = &ps;

    int c = peek(p), more, r;
    if (c < 0)
        return type_error(p, "request body is empty");
    if (c != '{') {
        TRY(skip_value(p));
        return type_error(p, "request body must be a JSON object");
    }
    TRY(more = open_container(p, '}'));
    while (more) {
        const char *k;
        size_t kn;
        TRY(scan_key(p, &k, &kn));
        c = peek(p);
        if (key_is(k, kn, "stream")) {
            if (c == 't' || c == 'f' || c == 'n') {
                TRY(scan_literal(p));
                x->stream = c == 't';
            } else if (c >= 0) {
                return type_error(p, "field 'stream' must be a boolean");
            } else {
                TRY(skip_value(p));
            }
        } else if (key_is(k, kn, "model")) {
            if (c == '"') {
                buf_t *m = &x->buf[SLOT_MODEL];
                m->len = 0;
                TRY(scan_string(p, m));
                x->has_model = 1;
            } else if (c == 'n' || c < 0 || route == SGLR_ROUTE_GENERATE) {
                TRY(skip_value(p));
                x->has_model = 0;
            } else {
                return type_error(p, "field 'model' must be a string");
            }
        } else if (route == SGLR_ROUTE_GENERATE && key_is(k, kn, "text")) {
            TRY(r = field_text(p, text));
            have_text = !r;
        } else if (route != SGLR_ROUTE_CHAT && key_is(k, kn, "prompt")) {
            TRY(r = field_prompt(p, prompt));
            have_prompt = !r;
        } else if (route == SGLR_ROUTE_GENERATE && key_is(k, kn, "input_ids")) {
            TRY(r = field_input_ids(p, ids));
            have_ids = !r;
        } else if (route == SGLR_ROUTE_GENERATE && key_is(k, kn, "sampling_params")) {
            /* an object, or one per prompt for a batch */
            if (c != '{' && c != '[' && c != 'n' && c >= 0)
                return type_error(p, "field 'sampling_params' must be an object");
            TRY(skip_value(p));
        } else if (route == SGLR_ROUTE_CHAT && key_is(k, kn, "messages")) {
            TRY(field_messages(p, text));
            have_messages = 1;
        } else {
            TRY(skip_value(p));
        }
        TRY(more = next_or_close(p, '}'));
    }
    if (peek(p) >= 0)
        return syntax_error(p, p->p, "unexpected data after the JSON object");

    if (route == SGLR_ROUTE_CHAT && !have_messages)
        return type_error(p, "field 'messages' is required");
    if (route == SGLR_ROUTE_COMPLETIONS && !have_prompt)
        return type_error(p, "field 'prompt' is required");

    if (x->has_model) {
        x->model = x->buf[SLOT_MODEL].data;
        x->model_len = x->buf[SLOT_MODEL].len;
    }
    if (want) {
        buf_t *b = NULL;
        if (route == SGLR_ROUTE_CHAT || (route == SGLR_ROUTE_GENERATE && have_text))
            b = text;
        else if (have_prompt)
            b = prompt;
        else if (have_ids)
            b = ids;
        if (b && b->len) {
            x->text = b->data;
            x->text_len = b->len;
        }
    }
    return 0;
}
