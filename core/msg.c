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

/* n bytes from p to d, 'A'..'Z' lowercased */
static void lower_copy(char *d, const char *p, size_t n)
{
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
}

static int head_grow(sglr_head_t *h)
{
    if (h->nhdrs < h->cap_hdrs)
        return 0;
    int cap = h->cap_hdrs ? h->cap_hdrs * 2 : 16;
    sglr_hdr_t *nh = realloc(h->hdrs, sizeof *nh * (size_t)cap);
    if (!nh)
        return -ENOMEM;
    h->hdrs = nh;
    h->cap_hdrs = cap;
    return 0;
}

int sglr_head_field(sglr_head_t *h, const char *p, size_t n)
{
    if (h->nhdrs == 0 || h->in_value) {
        if (head_grow(h))
            return -ENOMEM;
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
    lower_copy(d, p, n);
    d[n] = 0;
    h->buf.len += n;
    hd->name_len += (uint32_t)n;
    return 0;
}

/* Each RFC 9110 tchar lowercased; 0 for any other byte. */
static const unsigned char tlower[256] = {
    ['A'] = 'a', ['B'] = 'b', ['C'] = 'c', ['D'] = 'd', ['E'] = 'e', ['F'] = 'f', ['G'] = 'g',
    ['H'] = 'h', ['I'] = 'i', ['J'] = 'j', ['K'] = 'k', ['L'] = 'l', ['M'] = 'm', ['N'] = 'n',
    ['O'] = 'o', ['P'] = 'p', ['Q'] = 'q', ['R'] = 'r', ['S'] = 's', ['T'] = 't', ['U'] = 'u',
    ['V'] = 'v', ['W'] = 'w', ['X'] = 'x', ['Y'] = 'y', ['Z'] = 'z',
    ['a'] = 'a', ['b'] = 'b', ['c'] = 'c', ['d'] = 'd', ['e'] = 'e', ['f'] = 'f', ['g'] = 'g',
    ['h'] = 'h', ['i'] = 'i', ['j'] = 'j', ['k'] = 'k', ['l'] = 'l', ['m'] = 'm', ['n'] = 'n',
    ['o'] = 'o', ['p'] = 'p', ['q'] = 'q', ['r'] = 'r', ['s'] = 's', ['t'] = 't', ['u'] = 'u',
    ['v'] = 'v', ['w'] = 'w', ['x'] = 'x', ['y'] = 'y', ['z'] = 'z', ['0'] = '0', ['1'] = '1',
    ['2'] = '2', ['3'] = '3', ['4'] = '4', ['5'] = '5', ['6'] = '6', ['7'] = '7', ['8'] = '8',
    ['9'] = '9',
    ['!'] = '!', ['#'] = '#', ['$'] = '$', ['%'] = '%', ['&'] = '&', ['\''] = '\'', ['*'] = '*',
    ['+'] = '+', ['-'] = '-', ['.'] = '.', ['^'] = '^', ['_'] = '_', ['`'] = '`', ['|'] = '|',
    ['~'] = '~',
};

/* High bit of each byte of w (read little-endian) that may not be in a
 * field value or reason phrase: a control byte other than HTAB, or DEL.
 * Exact per byte (no borrow between bytes). */
static inline uint64_t ctl_bytes(uint64_t w)
{
    const uint64_t ones = 0x0101010101010101ull, highs = ones * 0x80, lows = ~highs;
    uint64_t lt20 = ~(((w & lows) + ones * 0x60) | w) & highs;
    uint64_t t = w ^ (ones * '\t');
    uint64_t tab = ~(((t & lows) + lows) | t) & highs;
    uint64_t d = w ^ (ones * 0x7f);
    uint64_t del = ~(((d & lows) + lows) | d) & highs;
    return (lt20 & ~tab) | del;
}

/* The first byte at or after q (before end) that may not be in a field
 * value or reason phrase (ctl_bytes), or end. */
static inline const char *ctl_scan(const char *q, const char *end)
{
    for (; end - q >= 8; q += 8) {
        uint64_t w;
        memcpy(&w, q, 8);
        uint64_t m = ctl_bytes(w);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (m)
            return q + (__builtin_ctzll(m) >> 3);
#else
        if (m)
            break;
#endif
    }
    for (; q < end; q++) {
        unsigned char c = (unsigned char)*q;
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return q;
    }
    return end;
}

static int name_is(const char *p, size_t n, const char *lower)
{
    return strlen(lower) == n && strncasecmp(p, lower, n) == 0;
}

/* The header fields of a head read by the fast readers, as offsets into
 * its bytes, and what the framing needs of them. */
typedef struct {
    struct { uint32_t no, nl, vo, vl; } f[32];
    int nf;
    size_t bytes;              /* each name + 4 + value, as the server counts a head */
    long long cl;              /* content-length, -1 if none */
    int conn;                  /* connection: 0 none, 1 close, 2 keep-alive */
    int hosts;                 /* host fields (requests) */
} fast_fields_t;

/* The field lines from q (the byte after the start line) through the
 * blank line, names lowercased in place -> the byte after the head, or
 * NULL for anything not of the common shape, and for fields the caller
 * leaves to llhttp: transfer-encoding, upgrade, proxy-connection, and in
 * a request expect and via. p[n] is a NUL. */
static char *fields_scan(char *p, char *q, const char *end, fast_fields_t *ff, int request)
{
    ff->nf = 0;
    ff->bytes = 0;
    ff->cl = -1;
    ff->conn = 0;
    ff->hosts = 0;
    for (;;) {
        if (*q == '\r')
            return q[1] == '\n' ? q + 2 : NULL;
        char *name = q;
        unsigned char c;
        while ((c = tlower[(unsigned char)*q]) != 0)
            *q++ = (char)c;
        if (q == name || *q != ':')
            return NULL;
        size_t nl = (size_t)(q - name);
        q++;
        while (*q == ' ' || *q == '\t')
            q++;
        const char *v = q;
        const char *cr = ctl_scan(q, end);
        if (cr[0] != '\r' || cr[1] != '\n' || cr[2] == ' ' || cr[2] == '\t')
            return NULL;           /* a control byte, a bare CR, obs-fold, or the end */
        size_t vl = (size_t)(cr - v);
        if (vl && (v[vl - 1] == ' ' || v[vl - 1] == '\t'))
            return NULL;
        q = (char *)cr + 2;
        switch (nl) {
        case 3:
            if (request && memcmp(name, "via", 3) == 0)
                return NULL;
            break;
        case 4:
            ff->hosts += memcmp(name, "host", 4) == 0;
            break;
        case 6:
            if (request && memcmp(name, "expect", 6) == 0)
                return NULL;
            break;
        case 7:
            if (memcmp(name, "upgrade", 7) == 0)
                return NULL;
            break;
        case 10:
            if (memcmp(name, "connection", 10) == 0) {
                if (ff->conn)
                    return NULL;
                if (name_is(v, vl, "close"))
                    ff->conn = 1;
                else if (name_is(v, vl, "keep-alive"))
                    ff->conn = 2;
                else
                    return NULL;
            }
            break;
        case 14:
            if (memcmp(name, "content-length", 14) == 0) {
                if (ff->cl >= 0 || vl == 0 || vl > 15)
                    return NULL;
                long long cl = 0;
                for (size_t i = 0; i < vl; i++) {
                    if (v[i] < '0' || v[i] > '9')
                        return NULL;
                    cl = cl * 10 + (v[i] - '0');
                }
                ff->cl = cl;
            }
            break;
        case 16:
            if (memcmp(name, "proxy-connection", 16) == 0)
                return NULL;
            break;
        case 17:
            if (memcmp(name, "transfer-encoding", 17) == 0)
                return NULL;
            break;
        }
        if (ff->nf == 32)
            return NULL;
        ff->f[ff->nf].no = (uint32_t)(name - p);
        ff->f[ff->nf].nl = (uint32_t)nl;
        ff->f[ff->nf].vo = (uint32_t)(v - p);
        ff->f[ff->nf].vl = (uint32_t)vl;
        ff->nf++;
        ff->bytes += nl + 4 + vl;
    }
}

/* h becomes one copy of the head p[0..hl), in which each name ends at its
 * ':' and each value at its CR (both made NULs). 0 or -ENOMEM. */
static int fields_store(sglr_head_t *h, const char *p, size_t hl, const fast_fields_t *ff)
{
    int nf = ff->nf;
    if (buf_reserve(&h->buf, hl + 1))
        return -ENOMEM;
    if (h->cap_hdrs < nf) {
        sglr_hdr_t *nh = realloc(h->hdrs, sizeof *nh * (size_t)(nf < 16 ? 16 : nf));
        if (!nh)
            return -ENOMEM;
        h->hdrs = nh;
        h->cap_hdrs = nf < 16 ? 16 : nf;
    }
    char *d = h->buf.data;
    memcpy(d, p, hl);
    d[hl] = 0;
    for (int i = 0; i < nf; i++) {
        d[ff->f[i].no + ff->f[i].nl] = 0;
        d[ff->f[i].vo + ff->f[i].vl] = 0;
        h->hdrs[i] = (sglr_hdr_t){ ff->f[i].no, ff->f[i].nl, ff->f[i].vo, ff->f[i].vl };
    }
    h->buf.len = hl;
    h->nhdrs = nf;
    h->in_value = nf > 0;
    return 0;
}

size_t sglr_resp_head_fast(char *p, size_t n, size_t max, sglr_head_t *h, int skip_ok,
                           int *status, long long *content_length, int *keep_alive)
{
    /* p[n] is a NUL: no byte a scan below stops at can lie beyond it */
    if (n > max || n < 16 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') ||
        p[8] != ' ')
        return 0;
    int st = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        st = st * 10 + (p[i] - '0');
    }
    if (st < 200 || st > 599 || st == 204 || st == 304 || (p[12] != ' ' && p[12] != '\r'))
        return 0;
    const char *end = p + n;
    const char *cr = ctl_scan(p + 12, end);
    if (cr[0] != '\r' || cr[1] != '\n')
        return 0;
    fast_fields_t ff;
    char *q = fields_scan(p, p + (cr - p) + 2, end, &ff, 0);
    if (!q || ff.cl < 0)
        return 0;              /* not the common shape; chunked or read to the close */
    size_t hl = (size_t)(q - p);
    if (!(skip_ok && st < 300) && fields_store(h, p, hl, &ff))
        return 0;
    *status = st;
    *content_length = ff.cl;
    *keep_alive = p[7] == '1' ? ff.conn != 1 : ff.conn == 2;
    return hl;
}

/* llhttp's method numbers (llhttp.h), by the method's length and name */
static int fast_method(const char *p, size_t n)
{
    switch (n) {
    case 3:
        if (memcmp(p, "GET", 3) == 0)
            return 1;
        if (memcmp(p, "PUT", 3) == 0)
            return 4;
        break;
    case 4:
        if (memcmp(p, "POST", 4) == 0)
            return 3;
        if (memcmp(p, "HEAD", 4) == 0)
            return 2;
        break;
    case 5:
        if (memcmp(p, "PATCH", 5) == 0)
            return 28;
        break;
    case 6:
        if (memcmp(p, "DELETE", 6) == 0)
            return 0;
        break;
    case 7:
        if (memcmp(p, "OPTIONS", 7) == 0)
            return 6;
        break;
    }
    return -1;
}

size_t sglr_req_fast(char *p, size_t n, size_t max_head, size_t max_body, sglr_head_t *h,
                     sglr_fast_req_t *out)
{
    /* the method */
    char *q = p;
    while ((unsigned)(*q - 'A') < 26u)
        q++;
    if (*q != ' ')
        return 0;
    int method = fast_method(p, (size_t)(q - p));
    if (method < 0)
        return 0;
    /* the target: origin-form, visible ASCII */
    char *url = ++q;
    if (*url != '/')
        return 0;
    while ((unsigned char)(*q - 0x21) < 0x5e)
        q++;
    size_t ul = (size_t)(q - url);
    if ((size_t)(p + n - q) < 11 || memcmp(q, " HTTP/1.1\r\n", 11) != 0)
        return 0;
    fast_fields_t ff;
    char *hend = fields_scan(p, q + 11, p + n, &ff, 1);
    if (!hend || ff.hosts != 1)
        return 0;
    size_t hl = (size_t)(hend - p);
    long long cl = ff.cl < 0 ? 0 : ff.cl;
    /* the head's size as the server's llhttp path counts it (target, and
     * each name + 4 + value), so that both give the same answer */
    if (ul + ff.bytes > max_head || (unsigned long long)cl > max_body ||
        (unsigned long long)cl > n - hl)
        return 0;              /* over a limit (llhttp's path answers it), or the body is not all in */
    if (fields_store(h, p, hl, &ff))
        return 0;
    h->url_off = (uint32_t)(url - p);
    h->url_len = (uint32_t)ul;
    out->method = method;
    out->keep_alive = ff.conn != 1;
    out->head_len = hl;
    out->body_len = (size_t)cl;
    return hl + (size_t)cl;
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
