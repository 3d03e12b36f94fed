/*
 * fuzz_ref.h: what fuzz_request and fuzz_response share to check the
 * hand-written head scanners (core/msg.c) against llhttp: llhttp's fields
 * collected into a head as the server and upstream client collect them,
 * the writable copy with a NUL after it the scanners need, and the
 * field-by-field comparison. Any difference aborts (a finding).
 */
#ifndef SGLR_FUZZ_REF_H
#define SGLR_FUZZ_REF_H

#include "msg.h"

#include <llhttp.h>
#include <stdlib.h>
#include <string.h>

static sglr_head_t ref_head;

static int ref_field(llhttp_t *p, const char *at, size_t n) { return sglr_head_field(&ref_head, at, n) ? -1 : 0; }
static int ref_field_done(llhttp_t *p) { return sglr_head_field_done(&ref_head) ? -1 : 0; }
static int ref_value(llhttp_t *p, const char *at, size_t n) { return sglr_head_value(&ref_head, at, n) ? -1 : 0; }

/* llhttp settings that collect the fields into ref_head (reset here) */
static void ref_settings(llhttp_settings_t *st)
{
    llhttp_settings_init(st);
    st->on_header_field = ref_field;
    st->on_header_field_complete = ref_field_done;
    st->on_header_value = ref_value;
    sglr_head_reset(&ref_head);
}

/* data as the scanners take it: writable, a NUL after it (free it) */
static char *ref_copy(const uint8_t *data, size_t size)
{
    char *in = malloc(size + 1);
    if (!in)
        abort();
    memcpy(in, data, size);
    in[size] = 0;
    return in;
}

/* A scan that answered 0 (left the bytes to llhttp): then it must have
 * left its head empty. -> 1 when refused */
static int ref_refused(size_t used, const sglr_head_t *fast)
{
    if (used)
        return 0;
    if (fast->nhdrs != 0)
        abort();
    return 1;
}

/* the scanner's fields must be llhttp's, in order, byte for byte */
static void ref_same_fields(const sglr_head_t *fast)
{
    if (ref_head.nhdrs != fast->nhdrs)
        abort();
    for (int i = 0; i < fast->nhdrs; i++) {
        const sglr_hdr_t *a = &fast->hdrs[i], *b = &ref_head.hdrs[i];
        if (a->name_len != b->name_len || a->value_len != b->value_len ||
            memcmp(SGLR_HDR_NAME(fast, i), SGLR_HDR_NAME(&ref_head, i), a->name_len) != 0 ||
            memcmp(SGLR_HDR_VALUE(fast, i), SGLR_HDR_VALUE(&ref_head, i), a->value_len) != 0)
            abort();
    }
}

#endif
