/* msg.c: growing buffers and parsed HTTP heads (see msg.h). */
#include "msg.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static int buf_reserve(sglr_buf_t *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p)
        return -ENOMEM;
    b->data = p;
    b->cap = cap;
    return 0;
}

size_t sglr_u64_dec(char *out, unsigned long long v)
{
    /* two digits a division: a bootstrap room has 19 */
    static const char pairs[201] =
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
        "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
        "8081828384858687888990919293949596979899";
    char tmp[24];
    char *p = tmp + sizeof tmp;
    while (v >= 100) {
        unsigned d = (unsigned)(v % 100) * 2;
        v /= 100;
        *--p = pairs[d + 1];
        *--p = pairs[d];
    }
    if (v >= 10) {
        unsigned d = (unsigned)v * 2;
        *--p = pairs[d + 1];
        *--p = pairs[d];
    } else {
        *--p = (char)('0' + v);
    }
    size_t n = (size_t)(tmp + sizeof tmp - p);
    memcpy(out, p, n);
    return n;
}

char sglr_via_token[48];
size_t sglr_via_len;

int sglr_buf_reserve(sglr_buf_t *b, size_t extra)
{
    return buf_reserve(b, extra + 1);
}

int sglr_buf_append_header(sglr_buf_t *b, const char *name, size_t nl, const char *value,
                           size_t vl)
{
    if (buf_reserve(b, nl + vl + 5))
        return -ENOMEM;
    char *d = b->data + b->len;
    memcpy(d, name, nl);
    d += nl;
    *d++ = ':';
    *d++ = ' ';
    memcpy(d, value, vl);
    d += vl;
    *d++ = '\r';
    *d++ = '\n';
    *d = 0;
    b->len = (size_t)(d - b->data);
    return 0;
}

int sglr_buf_append(sglr_buf_t *b, const char *p, size_t n)
{
    if (buf_reserve(b, n + 1))
        return -ENOMEM;
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = 0;   /* always terminated, so C string helpers work */
    return 0;
}

int sglr_buf_printf(sglr_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || buf_reserve(b, (size_t)n + 1))
        return -ENOMEM;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
    return 0;
}

void sglr_buf_free(sglr_buf_t *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void sglr_head_reset(sglr_head_t *h)
{
    h->buf.len = 0;
    h->url_off = h->url_len = 0;
    h->nhdrs = 0;
    h->in_value = 0;
}

void sglr_head_free(sglr_head_t *h)
{
    sglr_buf_free(&h->buf);
    free(h->hdrs);
    h->hdrs = NULL;
    h->nhdrs = h->cap_hdrs = 0;
}

int sglr_head_url(sglr_head_t *h, const char *p, size_t n)
{
    if (h->url_len == 0)
        h->url_off = (uint32_t)h->buf.len;
    h->url_len += (uint32_t)n;
    return sglr_buf_append(&h->buf, p, n);
}

int sglr_head_field(sglr_head_t *h, const char *p, size_t n)
{
    if (h->nhdrs == 0 || h->in_value) {
        if (h->nhdrs == h->cap_hdrs) {
            int cap = h->cap_hdrs ? h->cap_hdrs * 2 : 16;
            sglr_hdr_t *nh = realloc(h->hdrs, sizeof *nh * (size_t)cap);
            if (!nh)
                return -ENOMEM;
            h->hdrs = nh;
            h->cap_hdrs = cap;
        }
        sglr_hdr_t *hd = &h->hdrs[h->nhdrs++];
        hd->name_off = (uint32_t)h->buf.len;
        hd->name_len = 0;
        hd->value_off = 0;
        hd->value_len = 0;
        h->in_value = 0;
    }
    sglr_hdr_t *hd = &h->hdrs[h->nhdrs - 1];
    /* Names are stored lowercased: lookups and Lua tables use that form. */
    if (buf_reserve(&h->buf, n + 1))
        return -ENOMEM;
    char *d = h->buf.data + h->buf.len;
    size_t i = 0;
    /* eight bytes a step: a byte in 'A'..'Z' (below 0x80) gets 0x20 */
    for (; i + 8 <= n; i += 8) {
        const uint64_t ones = 0x0101010101010101ull, highs = ones * 0x80;
        uint64_t w;
        memcpy(&w, p + i, 8);
        uint64_t low7 = w & ~highs;
        uint64_t ge_a = low7 + ones * (0x80 - 'A');   /* high bit: >= 'A' */
        uint64_t gt_z = low7 + ones * (0x7f - 'Z');   /* high bit: > 'Z' */
        w |= ((ge_a ^ gt_z) & ~w & highs) >> 2;
        memcpy(d + i, &w, 8);
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        d[i] = (char)(c + ((unsigned)(c - 'A') < 26u ? 32 : 0));
    }
    d[n] = 0;
    h->buf.len += n;
    hd->name_len += (uint32_t)n;
    return 0;
}

int sglr_head_field_done(sglr_head_t *h)
{
    if (h->nhdrs == 0)
        return -EINVAL;
    /* the name is terminated (a C string): its NUL is kept as a byte */
    if (buf_reserve(&h->buf, 2))
        return -ENOMEM;
    h->buf.data[++h->buf.len] = 0;
    h->hdrs[h->nhdrs - 1].value_off = (uint32_t)h->buf.len;
    h->in_value = 1;
    return 0;
}

int sglr_head_value(sglr_head_t *h, const char *p, size_t n)
{
    if (h->nhdrs == 0 || !h->in_value)
        return -EINVAL;
    if (buf_reserve(&h->buf, n + 1))
        return -ENOMEM;
    memcpy(h->buf.data + h->buf.len, p, n);
    h->buf.len += n;
    h->buf.data[h->buf.len] = 0;
    h->hdrs[h->nhdrs - 1].value_len += (uint32_t)n;
    return 0;
}

const char *sglr_head_get(const sglr_head_t *h, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    for (int i = 0; i < h->nhdrs; i++) {
        const sglr_hdr_t *hd = &h->hdrs[i];
        /* names are stored lowercased; name may not be */
        if (hd->name_len == nl && (h->buf.data[hd->name_off] | 0x20) == (name[0] | 0x20) &&
            strncasecmp(h->buf.data + hd->name_off, name, nl) == 0) {
            if (len)
                *len = hd->value_len;
            return h->buf.data + hd->value_off;
        }
    }
    return NULL;
}
