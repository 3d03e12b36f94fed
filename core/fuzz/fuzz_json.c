/*
 * fuzz_json.c: libFuzzer target for the JSON readers a request body meets:
 * the routing-text extractor (extract.c) and the PD splicing (splice.c).
 * The first byte picks the route and what to run; the rest is the body.
 * Every function must tolerate any bytes; ASan/UBSan catch what does not.
 */
#include "extract.h"
#include "splice.h"
#include "../test/json_squeeze.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static sglr_extract_t x;
    static int ready;
    if (!ready) {
        sglr_extract_init(&x);
        ready = 1;
    }
    if (size < 1)
        return 0;
    int route = data[0] % 3;
    int what = (data[0] / 3) % 4;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    sglr_buf_t out = { 0 };
    switch (what) {
    case 0:
        sglr_extract_run(&x, (sglr_route_t)route, body, len, SGLR_EXTRACT_TEXT);
        break;
    case 1: {
        int logprobs = 0, own = 1;
        int batch = sglr_splice_request_ex(route, body, len, &logprobs, &own);
        if (batch >= 0 && batch <= 64) {
            uint64_t rooms[64];
            size_t n = batch ? (size_t)batch : 1;
            for (size_t i = 0; i < n; i++)
                rooms[i] = i * 0x9e3779b97f4a7c15ull;
            int port = batch & 1 ? -1 : 8998;
            int r = sglr_splice_bootstrap(&out, body, len, "[::1]", 5, port, rooms, n, batch);
            if (!own) {
                /* the append path writes the members the rewrite wrote
                 * (whitespace between them may differ) */
                sglr_buf_t fast = { 0 };
                int f = sglr_splice_bootstrap_append(&fast, body, len, "[::1]", 5, port, rooms, n,
                                                     batch);
                if (f != r)
                    abort();
                if (r == 0) {
                    size_t a = json_squeeze(out.data, out.len);
                    size_t b = json_squeeze(fast.data, fast.len);
                    if (a != b || memcmp(out.data, fast.data, a) != 0)
                        abort();
                    out.len = a;
                }
                sglr_buf_free(&fast);
            }
        }
        break;
    }
    case 2: {
        /* prefill and decode bodies, split at the first NUL */
        const char *nul = memchr(body, 0, len);
        size_t plen = nul ? (size_t)(nul - body) : len / 2;
        const char *d = body + plen + (nul ? 1 : 0);
        sglr_splice_merge_logprobs(&out, body, plen, d, len - (size_t)(d - body));
        break;
    }
    default: {
        /* a decode stream fed in pieces, the prefill as the first line */
        const char *nl = memchr(body, '\n', len);
        size_t plen = nl ? (size_t)(nl - body) : 0;
        sglr_splice_sse_t s;
        sglr_splice_sse_init(&s, body, plen);
        size_t at = plen, step = 1 + (size_t)(data[0] % 7);
        while (at < len) {
            size_t n = len - at < step ? len - at : step;
            sglr_splice_sse_feed(&s, &out, body + at, n);
            at += n;
            step = step * 3 % 17 + 1;
        }
        sglr_splice_sse_close(&s, &out);
        break;
    }
    }
    sglr_buf_free(&out);
    return 0;
}
