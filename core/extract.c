/*
 * extract.c: a single-pass JSON validator that decodes, on the way, the few
 * fields routing needs (see extract.h).
 *
 * The parser is a recursive descent over the raw bytes, on the shared lexer
 * of core/json.c. Values nobody asked about are validated and skipped; the
 * known fields of the route are parsed by their own small functions, which
 * check the type and, when the caller wants the routing text, decode
 * strings straight into an output buffer.
 *
 * Duplicate keys: the last one wins, as in Python's json, which is what the
 * workers will see.
 */
#include "extract.h"

#include "json.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Buffers that grew past this for one huge body are dropped on the next
 * call instead of being kept for the life of the process. */
#define KEEP_CAP (8u << 20)

enum { SLOT_MODEL, SLOT_TEXT, SLOT_PROMPT, SLOT_IDS, NSLOTS };

typedef sglr_buf_t buf_t;

#define TRY(e) do { int _r = (e); if (_r < 0) return _r; } while (0)

/* A refusal that is not about syntax: the message stands alone. */
static int type_error(sglr_json_t *ps, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int type_error(sglr_json_t *ps, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->err, ps->errcap, fmt, ap);
    va_end(ap);
    return -EINVAL;
}

/* Start the next piece of a " "-joined text. */
static int piece(buf_t *b, size_t *pieces)
{
    if (b && (*pieces)++ > 0)
        return sglr_buf_append(b, " ", 1);
    return 0;
}

/* A JSON integer at ps->p, appended as written (JSON integers are plain
 * decimal). Returns 1 when the number was not an integer (not appended). */
static int integer(sglr_json_t *ps, buf_t *out, size_t *pieces)
{
    const uint8_t *start = ps->p;
    int is_int;
    TRY(sglr_json_number(ps, &is_int));
    if (!is_int)
        return 1;
    if (out) {
        TRY(piece(out, pieces));
        TRY(sglr_buf_append(out, (const char *)start, (size_t)(ps->p - start)));
    }
    return 0;
}

/* ---- the fields routing knows ------------------------------------------- */

/* generate "text": a string or an array of strings. Returns 1 for null. */
static int field_text(sglr_json_t *ps, buf_t *out)
{
    static const char msg[] = "field 'text' must be a string or an array of strings";
    size_t pieces = 0;
    int c = sglr_json_peek(ps), more;
    if (out)
        out->len = 0;
    if (c == '"')
        return sglr_json_string(ps, out);
    if (c == 'n') {
        TRY(sglr_json_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? sglr_json_skip(ps) : type_error(ps, msg);
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        if (sglr_json_peek(ps) != '"')
            return ps->p >= ps->end ? sglr_json_skip(ps) : type_error(ps, msg);
        TRY(piece(out, &pieces));
        TRY(sglr_json_string(ps, out));
        TRY(more = sglr_json_next(ps, ']'));
    }
    return 0;
}

/* Token ids: an array of integers at ps->p, each appended. */
static int id_array(sglr_json_t *ps, buf_t *out, size_t *pieces, const char *msg)
{
    int more;
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        int c = sglr_json_peek(ps), r;
        if (!sglr_json_is_number_start(c))
            return c < 0 ? sglr_json_skip(ps) : type_error(ps, "%s", msg);
        TRY(r = integer(ps, out, pieces));
        if (r)
            return type_error(ps, "%s", msg);
        TRY(more = sglr_json_next(ps, ']'));
    }
    return 0;
}

/* generate "input_ids": ids, or a batch of arrays of ids. 1 for null. */
static int field_input_ids(sglr_json_t *ps, buf_t *out)
{
    static const char msg[] =
        "field 'input_ids' must be an array of integers or an array of arrays of integers";
    size_t pieces = 0;
    int c = sglr_json_peek(ps), more;
    if (out)
        out->len = 0;
    if (c == 'n') {
        TRY(sglr_json_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? sglr_json_skip(ps) : type_error(ps, msg);
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        int r;
        c = sglr_json_peek(ps);
        if (c == '[') {
            TRY(id_array(ps, out, &pieces, msg));
        } else if (sglr_json_is_number_start(c)) {
            TRY(r = integer(ps, out, &pieces));
            if (r)
                return type_error(ps, msg);
        } else {
            return c < 0 ? sglr_json_skip(ps) : type_error(ps, msg);
        }
        TRY(more = sglr_json_next(ps, ']'));
    }
    return 0;
}

/* "prompt": a string, or an array whose strings, token ids and arrays of
 * token ids are joined; other elements are left to the worker to judge.
 * Returns 1 for null. */
static int field_prompt(sglr_json_t *ps, buf_t *out)
{
    size_t pieces = 0;
    int c = sglr_json_peek(ps), more;
    if (out)
        out->len = 0;
    if (c == '"')
        return sglr_json_string(ps, out);
    if (c == 'n') {
        TRY(sglr_json_literal(ps));
        return 1;
    }
    if (c != '[')
        return c < 0 ? sglr_json_skip(ps) : type_error(ps, "field 'prompt' must be a string or an array");
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        c = sglr_json_peek(ps);
        if (c == '"') {
            TRY(piece(out, &pieces));
            TRY(sglr_json_string(ps, out));
        } else if (sglr_json_is_number_start(c)) {
            TRY(integer(ps, out, &pieces));
        } else if (c == '[') {
            /* a batch of token-id prompts; anything odd inside is skipped */
            int inner;
            TRY(inner = sglr_json_open(ps, ']'));
            while (inner) {
                if (sglr_json_is_number_start(sglr_json_peek(ps)))
                    TRY(integer(ps, out, &pieces));
                else
                    TRY(sglr_json_skip(ps));
                TRY(inner = sglr_json_next(ps, ']'));
            }
        } else {
            TRY(sglr_json_skip(ps));
        }
        TRY(more = sglr_json_next(ps, ']'));
    }
    return 0;
}

/* One element of a content part array: {"type": "text", "text": "..."}
 * counts; image parts and the like are skipped. */
static int content_part(sglr_json_t *ps, buf_t *out, size_t *pieces)
{
    size_t mark = out ? out->len : 0, mark_pieces = *pieces;
    int is_text = 0, has_text = 0, more;
    sglr_json_key_t k;
    TRY(more = sglr_json_open(ps, '}'));
    while (more) {
        TRY(sglr_json_key(ps, &k));
        if (SGLR_JSON_KEY_IS(&k, "type") && sglr_json_peek(ps) == '"') {
            const uint8_t *start = ps->p + 1;
            TRY(sglr_json_string(ps, NULL));
            is_text = ps->p - 1 - start == 4 && memcmp(start, "text", 4) == 0;
        } else if (SGLR_JSON_KEY_IS(&k, "text") && sglr_json_peek(ps) == '"') {
            if (has_text && out) {
                out->len = mark;
                *pieces = mark_pieces;
            }
            TRY(piece(out, pieces));
            TRY(sglr_json_string(ps, out));
            has_text = 1;
        } else {
            TRY(sglr_json_skip(ps));
        }
        TRY(more = sglr_json_next(ps, '}'));
    }
    if (!is_text && out) {
        out->len = mark;
        *pieces = mark_pieces;
    }
    return 0;
}

static int message_content(sglr_json_t *ps, buf_t *out, size_t *pieces)
{
    int c = sglr_json_peek(ps), more;
    if (c == '"') {
        TRY(piece(out, pieces));
        return sglr_json_string(ps, out);
    }
    if (c != '[')
        return sglr_json_skip(ps);      /* null (tool calls) or odd: the worker judges */
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        if (sglr_json_peek(ps) == '{')
            TRY(content_part(ps, out, pieces));
        else
            TRY(sglr_json_skip(ps));
        TRY(more = sglr_json_next(ps, ']'));
    }
    return 0;
}

/* chat "messages": an array of objects; the content of each is joined. */
static int field_messages(sglr_json_t *ps, buf_t *out)
{
    size_t pieces = 0;
    int c = sglr_json_peek(ps), more;
    if (out)
        out->len = 0;
    if (c != '[')
        return c < 0 ? sglr_json_skip(ps) : type_error(ps, "field 'messages' must be an array");
    TRY(more = sglr_json_open(ps, ']'));
    while (more) {
        c = sglr_json_peek(ps);
        if (c != '{')
            return c < 0 ? sglr_json_skip(ps)
                         : type_error(ps, "field 'messages' must be an array of objects");
        TRY(more = sglr_json_open(ps, '}'));
        size_t mark = 0, mark_pieces = 0;
        int seen = 0;
        while (more) {
            sglr_json_key_t k;
            TRY(sglr_json_key(ps, &k));
            if (SGLR_JSON_KEY_IS(&k, "content")) {
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
                TRY(sglr_json_skip(ps));
            }
            TRY(more = sglr_json_next(ps, '}'));
        }
        TRY(more = sglr_json_next(ps, ']'));
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
    sglr_json_t ps;
    sglr_json_t *p = &ps;
    sglr_json_init(p, body, n, x->err, sizeof x->err);

    int c = sglr_json_peek(p), more, r;
    if (c < 0)
        return type_error(p, "request body is empty");
    if (c != '{') {
        TRY(sglr_json_skip(p));
        return type_error(p, "request body must be a JSON object");
    }
    TRY(more = sglr_json_open(p, '}'));
    while (more) {
        sglr_json_key_t k;
        TRY(sglr_json_key(p, &k));
        c = sglr_json_peek(p);
        if (SGLR_JSON_KEY_IS(&k, "stream")) {
            if (c == 't' || c == 'f' || c == 'n') {
                TRY(sglr_json_literal(p));
                x->stream = c == 't';
            } else if (c >= 0) {
                return type_error(p, "field 'stream' must be a boolean");
            } else {
                TRY(sglr_json_skip(p));
            }
        } else if (SGLR_JSON_KEY_IS(&k, "model")) {
            if (c == '"') {
                buf_t *m = &x->buf[SLOT_MODEL];
                m->len = 0;
                TRY(sglr_json_string(p, m));
                x->has_model = 1;
            } else if (c == 'n' || c < 0 || route == SGLR_ROUTE_GENERATE) {
                TRY(sglr_json_skip(p));
                x->has_model = 0;
            } else {
                return type_error(p, "field 'model' must be a string");
            }
        } else if (route == SGLR_ROUTE_GENERATE && SGLR_JSON_KEY_IS(&k, "text")) {
            TRY(r = field_text(p, text));
            have_text = !r;
        } else if (route != SGLR_ROUTE_CHAT && SGLR_JSON_KEY_IS(&k, "prompt")) {
            TRY(r = field_prompt(p, prompt));
            have_prompt = !r;
        } else if (route == SGLR_ROUTE_GENERATE && SGLR_JSON_KEY_IS(&k, "input_ids")) {
            TRY(r = field_input_ids(p, ids));
            have_ids = !r;
        } else if (route == SGLR_ROUTE_GENERATE && SGLR_JSON_KEY_IS(&k, "sampling_params")) {
            /* an object, or one per prompt for a batch */
            if (c != '{' && c != '[' && c != 'n' && c >= 0)
                return type_error(p, "field 'sampling_params' must be an object");
            TRY(sglr_json_skip(p));
        } else if (route == SGLR_ROUTE_CHAT && SGLR_JSON_KEY_IS(&k, "messages")) {
            TRY(field_messages(p, text));
            have_messages = 1;
        } else {
            TRY(sglr_json_skip(p));
        }
        TRY(more = sglr_json_next(p, '}'));
    }
    if (sglr_json_peek(p) >= 0)
        return sglr_json_error(p, p->p, "unexpected data after the JSON object");

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

int sglr_extract_take_text(sglr_extract_t *x, sglr_buf_t *out, size_t n, size_t max_cap)
{
    if (x->text_len == 0 || n > x->text_len)
        return -1;
    for (int i = 0; i < NSLOTS; i++) {
        buf_t *b = &x->buf[i];
        if (b->data != x->text)
            continue;
        if (b->cap > max_cap)
            return -1;
        buf_t spare = *out;
        spare.len = 0;
        *out = *b;
        out->len = n;
        *b = spare;
        x->text = "";
        x->text_len = 0;
        return 0;
    }
    return -1;
}
