/*
 * json.c: the shared JSON lexer (see json.h).
 *
 * Strings dominate the cost of reading request bodies, so the string
 * scanner moves over plain ASCII 32 bytes at a time where the CPU has AVX2,
 * else sixteen (SSE2), storing each block as it goes when it decodes. An output buffer is reserved for the rest of the input
 * before a string is decoded into it: decoding never lengthens a string (an
 * escape is at least as long as what it stands for), so the copy loop needs
 * no bounds checks.
 */
#include "json.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define TRY(e) do { int _r = (e); if (_r < 0) return _r; } while (0)

/* ---- errors ------------------------------------------------------------- */

int sglr_json_error(sglr_json_t *j, const uint8_t *at, const char *fmt, ...)
{
    if (!j->err || !j->errcap)
        return -EINVAL;
    int n = snprintf(j->err, j->errcap, "invalid JSON at byte %zu: ", (size_t)(at - j->s));
    if (n >= 0 && (size_t)n < j->errcap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->err + n, j->errcap - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return -EINVAL;
}

int sglr_json_expected(sglr_json_t *j, const char *what)
{
    if (j->p >= j->end)
        return sglr_json_error(j, j->p, "unexpected end of input");
    return sglr_json_error(j, j->p, "expected %s", what);
}

/* ---- strings ------------------------------------------------------------ */

static int reserve(sglr_buf_t *b, size_t extra)
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

/* Bytes a string may hold as they are: 0x20..0x7f but '"' and '\\'. */
static const uint8_t plain[256] = {
    [0x20 ... 0x21] = 1, [0x23 ... 0x5b] = 1, [0x5d ... 0x7f] = 1,
};

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

/* The code point of a \u escape whose four digits gave cp, with *pp just
 * past them: a high surrogate takes the low one that follows; a lone
 * surrogate is valid JSON but not text, so it becomes U+FFFD. */
static uint32_t surrogates(const uint8_t **pp, const uint8_t *end, uint32_t cp)
{
    const uint8_t *p = *pp;
    uint32_t lo;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
            hex4(p + 2, end, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
            *pp = p + 6;
            return 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        return 0xFFFD;
    }
    return cp >= 0xDC00 && cp <= 0xDFFF ? 0xFFFD : cp;
}

/* The byte a one-letter escape stands for, or -1. */
static int simple_escape(uint8_t c)
{
    switch (c) {
    case '"': return '"';
    case '\\': return '\\';
    case '/': return '/';
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    default: return -1;
    }
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

/* Overlongs, surrogates and code points past U+10FFFF are refused. */
size_t sglr_json_utf8_seq(const uint8_t *p, const uint8_t *end)
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

#if defined(__SSE2__) && defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SCAN_AVX2 1
/* Plain bytes 32 at a time where the CPU has AVX2 (asked once): half the
 * trips of the SSE2 loop, which a 4 KB chat body makes 250 of. The build
 * stays baseline x86-64; only these two functions use AVX2. Each returns
 * where the first byte that is not plain is, or the last block short of
 * 32 bytes begins; the decoding one stores each block as it checks it
 * (see sglr_json_string) and moves *o along. */
#define PLAIN_MASK32(v)                                                                      \
    ((unsigned)_mm256_movemask_epi8(_mm256_or_si256(                                       \
        _mm256_or_si256(_mm256_cmpeq_epi8((v), _mm256_set1_epi8('"')),                     \
                        _mm256_cmpeq_epi8((v), _mm256_set1_epi8('\\'))),                  \
        _mm256_cmpgt_epi8(_mm256_set1_epi8(0x20), (v)))))

__attribute__((target("avx2")))
static const uint8_t *plain_avx2(const uint8_t *p, const uint8_t *end)
{
    while (end - p >= 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        unsigned bits = PLAIN_MASK32(v);
        if (bits)
            return p + __builtin_ctz(bits);
        p += 32;
    }
    return p;
}

__attribute__((target("avx2")))
static const uint8_t *plain_avx2_copy(const uint8_t *p, const uint8_t *end, char **o)
{
    char *d = *o;
    while (end - p >= 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        _mm256_storeu_si256((__m256i *)d, v);
        unsigned bits = PLAIN_MASK32(v);
        if (bits) {
            unsigned k = (unsigned)__builtin_ctz(bits);
            *o = d + k;
            return p + k;
        }
        p += 32;
        d += 32;
    }
    *o = d;
    return p;
}

static int avx2_ok(void)
{
    static int ok = -1;
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return ok;
}
#endif

int sglr_json_string(sglr_json_t *j, sglr_buf_t *out)
{
    const uint8_t *p = j->p + 1, *end = j->end;
    char *o = NULL;
    if (out) {
        TRY(reserve(out, (size_t)(end - p) + 1));     /* + 1: never a NULL buffer */
        o = out->data + out->len;
    }
    for (;;) {
        const uint8_t *run = p;
#ifdef __SSE2__
        /* One signed compare flags both control bytes and bytes >= 0x80. */
        const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\'),
                      space = _mm_set1_epi8(0x20);
#define PLAIN_MASK(v) _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8((v), quote), \
                                                                 _mm_cmpeq_epi8((v), bslash)), \
                                                    _mm_cmplt_epi8((v), space)))
        if (o) {
            /* decoding: each block is stored as it is checked, instead of
             * a second pass over the run (memcpy below). The stores stay
             * within the reserve: o never runs ahead of p. */
            while (end - p >= 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)p);
                _mm_storeu_si128((__m128i *)o, v);
                int bits = PLAIN_MASK(v);
                if (bits) {
                    int k = __builtin_ctz((unsigned)bits);
                    p += k;
                    o += k;
                    break;
                }
                p += 16;
                o += 16;
#ifdef SCAN_AVX2
                /* past a first plain block: a long string (a key or a
                 * short value ends in its first block, with no call) */
                if (end - p >= 32 && avx2_ok())
                    p = plain_avx2_copy(p, end, &o);
#endif
            }
            run = p;
        } else {
            while (end - p >= 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)p);
                int bits = PLAIN_MASK(v);
                if (bits) {
                    p += __builtin_ctz((unsigned)bits);
                    break;
                }
                p += 16;
#ifdef SCAN_AVX2
                if (end - p >= 32 && avx2_ok())
                    p = plain_avx2(p, end);
#endif
            }
        }
#undef PLAIN_MASK
#endif
        while (p < end && plain[*p])
            p++;
        if (o && p > run) {
            memcpy(o, run, (size_t)(p - run));
            o += p - run;
        }
        if (p >= end)
            return sglr_json_error(j, end, "unterminated string");
        uint8_t c = *p;
        if (c == '"')
            break;
        if (c == '\\') {
            if (end - p < 2)
                return sglr_json_error(j, end, "unterminated string");
            if (p[1] == 'u') {
                uint32_t cp;
                if (hex4(p + 2, end, &cp) < 0)
                    return sglr_json_error(j, p, "invalid \\u escape");
                p += 6;
                cp = surrogates(&p, end, cp);
                if (o)
                    o += put_utf8(o, cp);
                continue;
            }
            int ch = simple_escape(p[1]);
            if (ch < 0)
                return sglr_json_error(j, p, "invalid escape in string");
            if (o)
                *o++ = (char)ch;
            p += 2;
        } else if (c < 0x20) {
            return sglr_json_error(j, p, "control character in string");
        } else {
            size_t k = sglr_json_utf8_seq(p, end);
            if (!k)
                return sglr_json_error(j, p, "invalid UTF-8 in string");
            if (o) {
                memcpy(o, p, k);
                o += k;
            }
            p += k;
        }
    }
    if (out)
        out->len = (size_t)(o - out->data);
    j->p = p + 1;
    return 0;
}

int sglr_json_quote(char *dst, size_t cap, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const uint8_t *p = (const uint8_t *)s, *end = p + n;
    size_t o = 0;
    if (n > (INT_MAX - 2) / 6)
        return -ENOSPC;
    /* worst case per input byte is \u00XX: check once, write unchecked */
    if (cap < 2)
        return -ENOSPC;
    dst[o++] = '"';
    while (p < end) {
        uint8_t c = *p;
        size_t k = 1;
        if (cap - o < 7)
            return -ENOSPC;
        if (c >= 0x80) {
            k = sglr_json_utf8_seq(p, end);
            if (!k)
                return -EINVAL;
            if (cap - o < k + 1)
                return -ENOSPC;
            memcpy(dst + o, p, k);
            o += k;
        } else if (c == '"' || c == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)c;
        } else if (c < 0x20) {
            const char *short_form = c == '\n' ? "n" : c == '\r' ? "r" : c == '\t' ? "t"
                                   : c == '\b' ? "b" : c == '\f' ? "f" : NULL;
            dst[o++] = '\\';
            if (short_form) {
                dst[o++] = short_form[0];
            } else {
                memcpy(dst + o, "u00", 3);
                o += 3;
                dst[o++] = hex[c >> 4];
                dst[o++] = hex[c & 15];
            }
        } else {
            dst[o++] = (char)c;
        }
        p += k;
    }
    if (cap - o < 1)
        return -ENOSPC;
    dst[o++] = '"';
    return (int)o;
}

/* ---- numbers and literals ----------------------------------------------- */

static inline int is_digit(const uint8_t *p, const uint8_t *end)
{
    return p < end && *p >= '0' && *p <= '9';
}

int sglr_json_number(sglr_json_t *j, int *is_int)
{
    const uint8_t *p = j->p, *end = j->end;
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
    j->p = p;
    return 0;
bad:
    if (p >= end)
        return sglr_json_error(j, p, "unexpected end of input");
    return sglr_json_error(j, p, "invalid number");
}

int sglr_json_literal(sglr_json_t *j)
{
    static const char *const lits[] = { "true", "false", "null" };
    size_t left = (size_t)(j->end - j->p);
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(lits[i]);
        if (left >= n && memcmp(j->p, lits[i], n) == 0) {
            j->p += n;
            return 0;
        }
    }
    for (int i = 0; i < 3; i++)
        if (left < strlen(lits[i]) && memcmp(j->p, lits[i], left) == 0)
            return sglr_json_error(j, j->end, "unexpected end of input");
    return sglr_json_error(j, j->p, "expected a value");
}

/* ---- structure ---------------------------------------------------------- */

int sglr_json_key(sglr_json_t *j, sglr_json_key_t *k)
{
    if (sglr_json_peek(j) != '"')
        return sglr_json_expected(j, "a string key");
    const uint8_t *start = j->p + 1;
    TRY(sglr_json_string(j, NULL));
    k->s = (const char *)start;
    k->n = (size_t)(j->p - 1 - start);
    k->escaped = memchr(start, '\\', k->n) != NULL;
    if (sglr_json_peek(j) != ':')
        return sglr_json_expected(j, "':'");
    j->p++;
    sglr_json_ws(j);
    return 0;
}

/* Decodes as it compares, so an escaped key needs no buffer. The key was
 * validated by sglr_json_key, but the bounds are checked all the same. */
int sglr_json_key_is_escaped(const sglr_json_key_t *k, const char *name, size_t n)
{
    const uint8_t *p = (const uint8_t *)k->s, *end = p + k->n;
    size_t at = 0;
    while (p < end) {
        char unit[4];
        size_t m = 1;
        if (*p != '\\') {
            unit[0] = (char)*p++;
        } else if (end - p >= 6 && p[1] == 'u') {
            uint32_t cp;
            if (hex4(p + 2, end, &cp) < 0)
                return 0;
            p += 6;
            m = put_utf8(unit, surrogates(&p, end, cp));
        } else {
            int ch = end - p >= 2 ? simple_escape(p[1]) : -1;
            if (ch < 0)
                return 0;
            unit[0] = (char)ch;
            p += 2;
        }
        if (n - at < m || memcmp(name + at, unit, m) != 0)
            return 0;
        at += m;
    }
    return at == n;
}

int sglr_json_skip(sglr_json_t *j)
{
    int c = sglr_json_peek(j), more, is_int;
    sglr_json_key_t k;
    switch (c) {
    case -1:
        return sglr_json_error(j, j->p, "unexpected end of input");
    case '"':
        return sglr_json_string(j, NULL);
    case '{':
        TRY(more = sglr_json_open(j, '}'));
        while (more) {
            TRY(sglr_json_key(j, &k));
            TRY(sglr_json_skip(j));
            TRY(more = sglr_json_next(j, '}'));
        }
        return 0;
    case '[':
        TRY(more = sglr_json_open(j, ']'));
        while (more) {
            TRY(sglr_json_skip(j));
            TRY(more = sglr_json_next(j, ']'));
        }
        return 0;
    case 't': case 'f': case 'n':
        return sglr_json_literal(j);
    default:
        if (sglr_json_is_number_start(c))
            return sglr_json_number(j, &is_int);
        if (c >= 0x20 && c < 0x7F)
            return sglr_json_error(j, j->p, "unexpected character '%c'", c);
        return sglr_json_error(j, j->p, "unexpected byte 0x%02x", c);
    }
}
