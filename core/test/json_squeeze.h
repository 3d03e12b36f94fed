/*
 * json_squeeze.h: for the splice tests and the JSON fuzz target, JSON text
 * without the whitespace outside strings, so two spellings of one document
 * compare equal.
 */
#ifndef SGLR_TEST_JSON_SQUEEZE_H
#define SGLR_TEST_JSON_SQUEEZE_H

#include <stddef.h>

/* Squeezes p[0..n) in place; returns the new length. */
static inline size_t json_squeeze(char *p, size_t n)
{
    size_t o = 0;
    int in_str = 0, esc = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (in_str) {
            if (esc)
                esc = 0;
            else if (c == '\\')
                esc = 1;
            else if (c == '"')
                in_str = 0;
        } else if (c == '"') {
            in_str = 1;
        } else if (c == ' ' || c == '\t' || c == '\r' || c == '\n') {
            continue;
        }
        p[o++] = c;
    }
    return o;
}

#endif
