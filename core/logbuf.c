/*
 * logbuf.c: the log lines of the request path, formatted natively and
 * written to stderr once per loop turn.
 *
 *   request ends -> sglr_logbuf_line() -> buf: "line\nline\n..." -> prepare
 *                                          (one write(2) before the loop polls)
 *
 * A prepare handle (unreferenced: it keeps no loop alive) writes the lines
 * gathered during a turn just before the loop blocks for I/O, so a line is
 * never held while the process waits. Anything else that writes to stderr
 * (sglr_log, log.lua's other lines) flushes first, so lines keep their
 * order; exit flushes too.
 *
 * The text line is the one log.lua has always printed:
 *   2026-11-29T13:00:00.123Z info  request k1=v1 k2=v2 ...
 * keys in the caller's order (log.lua sorts them), a value as it is unless
 * it holds a space, '=', a quote, a backslash or a control byte (or is
 * empty), else quoted with those escaped, so a client's value cannot forge
 * fields or lines.
 */
#include "logbuf.h"
#include "sglr.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* lines past this are written at once rather than at the end of the turn */
#define LOGBUF_HIGH (64 * 1024)

static char *buf;
static size_t len, cap;
static uv_prepare_t prep;
static int prep_started, exit_hooked;

void sglr_logbuf_flush(void)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(2, buf + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;          /* stderr gone or full: the lines are lost, as with stdio */
        off += (size_t)n;
    }
    len = 0;
}

static void prepare_cb(uv_prepare_t *h)
{
    (void)h;
    if (len)
        sglr_logbuf_flush();
}

static int reserve(size_t more)
{
    if (len + more <= cap)
        return 0;
    size_t ncap = cap ? cap : 4096;
    while (ncap < len + more)
        ncap *= 2;
    char *nb = realloc(buf, ncap);
    if (!nb)
        return -ENOMEM;
    buf = nb;
    cap = ncap;
    return 0;
}

static void arm(void)
{
    if (!exit_hooked) {
        exit_hooked = 1;
        atexit(sglr_logbuf_flush);
    }
    if (!prep_started && sglr_loop) {
        prep_started = 1;
        uv_prepare_init(sglr_loop, &prep);
        uv_prepare_start(&prep, prepare_cb);
        uv_unref((uv_handle_t *)&prep);
    }
}

void sglr_logbuf_close(void)
{
    sglr_logbuf_flush();
    if (prep_started && !uv_is_closing((uv_handle_t *)&prep))
        uv_close((uv_handle_t *)&prep, NULL);
}

int sglr_logbuf_write(const char *s, size_t n)
{
    arm();
    if (reserve(n))
        return -ENOMEM;
    memcpy(buf + len, s, n);
    len += n;
    if (len >= LOGBUF_HIGH)
        sglr_logbuf_flush();
    return 0;
}

/* --- the text line ------------------------------------------------------------ */

/* The line is built in place at the end of the queue: a failed allocation
 * marks it, and sglr_logline_end then drops it. */
static int line_failed;

static void put(const char *s, size_t n)
{
    if (line_failed || reserve(n)) {
        line_failed = 1;
        return;
    }
    memcpy(buf + len, s, n);
    len += n;
}

size_t sglr_logline_begin(double wall, const char *level, const char *msg, size_t ml)
{
    /* the same arithmetic as log.lua's: whole seconds, then milliseconds
     * from the fraction, rounded down */
    static time_t cached_sec = -1;
    static char cached[24];
    size_t start = len;
    line_failed = 0;
    double sec = floor(wall);
    time_t t = (time_t)sec;
    if (t != cached_sec) {
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = t;
    }
    /* ".mmmZ level " by hand: printf was a tenth of the line's cost */
    int ms = (int)floor((wall - sec) * 1000);
    char tail[24];
    memset(tail, ' ', sizeof tail);
    tail[0] = '.';
    tail[1] = (char)('0' + ms / 100 % 10);
    tail[2] = (char)('0' + ms / 10 % 10);
    tail[3] = (char)('0' + ms % 10);
    tail[4] = 'Z';
    size_t ll = strlen(level);
    if (ll > 16)
        ll = 16;
    memcpy(tail + 6, level, ll);
    size_t tl = 6 + (ll < 5 ? 5 : ll) + 1;
    put(cached, strlen(cached));
    put(tail, tl);
    put(msg, ml);
    return start;
}

/* A value needs quotes when empty or holding a byte <= ' ', DEL, '=', '"'
 * or a backslash. Eight bytes a step: these tests only say whether some
 * byte of the word is one (bytes >= 0x80, UTF-8, never are). */
static int needs_quotes(const char *s, size_t n)
{
    if (n == 0)
        return 1;
    const uint64_t ones = 0x0101010101010101ull, highs = ones * 0x80;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, s + i, 8);
        uint64_t x1 = w ^ (ones * 127), x2 = w ^ (ones * '='), x3 = w ^ (ones * '"'),
                 x4 = w ^ (ones * '\\');
        uint64_t hit = (w - ones * 0x21) | (x1 - ones) | (x2 - ones) | (x3 - ones) | (x4 - ones);
        hit &= ~w & highs;
        if (hit)
            return 1;
    }
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c <= ' ' || c == 127 || c == '=' || c == '"' || c == '\\')
            return 1;
    }
    return 0;
}

void sglr_logline_str(const char *k, size_t kl, const char *v, size_t vl)
{
    /* room for the worst case (every byte escaped as \xNN), reserved once */
    if (line_failed || reserve(kl + 4 * vl + 4)) {
        line_failed = 1;
        return;
    }
    char *d = buf + len;
    *d++ = ' ';
    memcpy(d, k, kl);
    d += kl;
    *d++ = '=';
    if (!needs_quotes(v, vl)) {
        memcpy(d, v, vl);
        len = (size_t)(d + vl - buf);
        return;
    }
    static const char hex[] = "0123456789abcdef";
    *d++ = '"';
    for (size_t i = 0; i < vl; i++) {
        unsigned char c = (unsigned char)v[i];
        if (c == '"' || c == '\\') {
            *d++ = '\\';
            *d++ = (char)c;
        } else if (c == '\n') {
            *d++ = '\\';
            *d++ = 'n';
        } else if (c == '\r') {
            *d++ = '\\';
            *d++ = 'r';
        } else if (c == '\t') {
            *d++ = '\\';
            *d++ = 't';
        } else if (c < ' ' || c == 127) {
            *d++ = '\\';
            *d++ = 'x';
            *d++ = hex[c >> 4];
            *d++ = hex[c & 15];
        } else {
            *d++ = (char)c;
        }
    }
    *d++ = '"';
    len = (size_t)(d - buf);
}

/* Lua's tostring of a number is "%.14g". The request path's numbers are
 * whole (status, retries) or tenths (duration_ms), which print the same
 * digit by digit for a fraction of printf's cost; others go to printf. */
void sglr_logline_num(const char *k, size_t kl, double v)
{
    char num[40];
    int n;
    double tenths = floor(v * 10 + 0.5);
    if (v >= 0 && tenths < 1e13 && tenths / 10 == v) {
        uint64_t t = (uint64_t)tenths;
        char rev[24];
        int r = 0;
        if (t % 10)
            rev[r++] = (char)('0' + t % 10), rev[r++] = '.';
        t /= 10;
        do
            rev[r++] = (char)('0' + t % 10);
        while (t /= 10);
        for (n = 0; n < r; n++)
            num[n] = rev[r - 1 - n];
    } else {
        n = snprintf(num, sizeof num, "%.14g", v);
    }
    sglr_logline_str(k, kl, num, (size_t)n);
}

const char *sglr_logline_end(size_t start, size_t *n)
{
    put("\n", 1);
    if (line_failed) {
        len = start;
        return NULL;
    }
    *n = len - start;
    return buf + start;
}

void sglr_logline_commit(size_t start, int keep)
{
    if (!keep) {
        len = start;
        return;
    }
    arm();
    if (len >= LOGBUF_HIGH)
        sglr_logbuf_flush();
}
