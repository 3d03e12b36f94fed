/*
 * test_extract.c: routing text and request checks on raw JSON bodies
 * (core/extract.c).
 */
#include "test.h"
#include "extract.h"

#include <errno.h>

static sglr_extract_t X;
static char got[1 << 16];

/* Routing text of body for route, or NULL (X.err says why). */
static const char *text_of(sglr_route_t route, const char *body)
{
    if (sglr_extract_run(&X, route, body, strlen(body), SGLR_EXTRACT_TEXT) < 0)
        return NULL;
    memcpy(got, X.text, X.text_len);
    got[X.text_len] = 0;
    return got;
}

/* The error for body, or "" when it was accepted. */
static const char *error_of(sglr_route_t route, const char *body)
{
    if (sglr_extract_run(&X, route, body, strlen(body), 0) == 0)
        return "";
    return X.err;
}

#define GEN SGLR_ROUTE_GENERATE
#define CHAT SGLR_ROUTE_CHAT
#define COMP SGLR_ROUTE_COMPLETIONS

TEST(routes)
{
    CHECK_EQ_INT(sglr_extract_route("generate", 8), GEN);
    CHECK_EQ_INT(sglr_extract_route("chat", 4), CHAT);
    CHECK_EQ_INT(sglr_extract_route("completions", 11), COMP);
    CHECK_EQ_INT(sglr_extract_route("chat2", 5), -1);
}

TEST(generate_text)
{
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"Hello world\", \"sampling_params\": {\"max_new_tokens\": 8}}"),
                 "Hello world");
    /* a batch joins its prompts */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": [\"a b\", \"c\", \"\"]}"), "a b c ");
    /* text wins over prompt and input_ids, whatever the order */
    CHECK_EQ_STR(text_of(GEN, "{\"input_ids\": [1], \"prompt\": \"p\", \"text\": \"t\"}"), "t");
    CHECK_EQ_STR(text_of(GEN, "{\"input_ids\": [1], \"prompt\": [\"p\", \"q\"]}"), "p q");
    CHECK_EQ_STR(text_of(GEN, "{\"input_ids\": [101, 2023, -1, 0]}"), "101 2023 -1 0");
    CHECK_EQ_STR(text_of(GEN, "{\"input_ids\": [[1, 2], [3], []]}"), "1 2 3");
    CHECK_EQ_STR(text_of(GEN, "{\"sampling_params\": {}}"), "");
    CHECK_EQ_STR(text_of(GEN, "{}"), "");
    /* null means absent */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": null, \"input_ids\": [7]}"), "7");
    /* the last duplicate wins */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"first\", \"text\": \"second\"}"), "second");
    /* batch sampling params */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": [\"a\"], \"sampling_params\": [{\"n\": 1}]}"), "a");
}

TEST(stream_and_model)
{
    const char *b = "{\"text\":\"x\",\"stream\":true}";
    CHECK_EQ_INT(sglr_extract_run(&X, GEN, b, strlen(b), 0), 0);
    CHECK_EQ_INT(X.stream, 1);
    CHECK_EQ_INT(X.has_model, 0);
    b = "{\"model\": \"m\\u00e9\", \"messages\": [], \"stream\": false}";
    CHECK_EQ_INT(sglr_extract_run(&X, CHAT, b, strlen(b), 0), 0);
    CHECK_EQ_INT(X.stream, 0);
    CHECK_EQ_INT(X.has_model, 1);
    CHECK_EQ_INT(X.model_len, 3);
    CHECK(memcmp(X.model, "m\xc3\xa9", 3) == 0);
    b = "{\"prompt\": \"x\", \"stream\": null}";
    CHECK_EQ_INT(sglr_extract_run(&X, COMP, b, strlen(b), 0), 0);
    CHECK_EQ_INT(X.stream, 0);
}

TEST(chat_messages)
{
    CHECK_EQ_STR(text_of(CHAT,
        "{\"model\": \"m\", \"messages\": ["
        "{\"role\": \"system\", \"content\": \"Be brief.\"},"
        "{\"role\": \"user\", \"content\": \"Hi\"},"
        "{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"id\": \"1\"}]},"
        "{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"Look\"},"
        " {\"type\": \"image_url\", \"image_url\": {\"url\": \"data:x\"}},"
        " {\"text\": \"at this\", \"type\": \"text\"}]}"
        "]}"),
        "Be brief. Hi Look at this");
    CHECK_EQ_STR(text_of(CHAT, "{\"messages\": []}"), "");
    /* an image part with a stray text field is still skipped */
    CHECK_EQ_STR(text_of(CHAT, "{\"messages\": [{\"content\": [{\"type\": \"image_url\", "
                               "\"text\": \"no\"}, {\"type\": \"text\", \"text\": \"yes\"}]}]}"),
                 "yes");
    /* a repeated content key replaces the first */
    CHECK_EQ_STR(text_of(CHAT, "{\"messages\": [{\"content\": \"a\", \"content\": \"b\"},"
                               " {\"content\": \"c\"}]}"), "b c");
    /* prompt fields mean nothing to chat */
    CHECK_EQ_STR(text_of(CHAT, "{\"prompt\": \"p\", \"text\": 5, \"messages\": [{\"content\": \"m\"}]}"),
                 "m");
}

TEST(completions_prompt)
{
    CHECK_EQ_STR(text_of(COMP, "{\"model\": \"m\", \"prompt\": \"Once upon\", \"max_tokens\": 5}"),
                 "Once upon");
    CHECK_EQ_STR(text_of(COMP, "{\"prompt\": [\"a\", \"b\"]}"), "a b");
    CHECK_EQ_STR(text_of(COMP, "{\"prompt\": [1, 2, 3]}"), "1 2 3");
    CHECK_EQ_STR(text_of(COMP, "{\"prompt\": [[1, 2], [3]]}"), "1 2 3");
    CHECK_EQ_STR(text_of(COMP, "{\"text\": \"t\", \"prompt\": \"p\"}"), "p");
}

TEST(escapes)
{
    const char *b;
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"a\\nb\\t\\\"q\\\" \\\\ \\/ \\b\\f\\r\"}"),
                 "a\nb\t\"q\" \\ / \b\f\r");
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"\\u0041\\u00e9\\u20ac\"}"), "A\xc3\xa9\xe2\x82\xac");
    /* surrogate pair -> one 4-byte character */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"\\ud83d\\ude00!\"}"), "\xf0\x9f\x98\x80!");
    /* lone surrogates are valid JSON: they become U+FFFD */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"x\\ud83dy\\ude00\"}"), "x\xef\xbf\xbdy\xef\xbf\xbd");
    /* raw UTF-8 passes through */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\"}"),
                 "caf\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac");
    /* an escaped key still names the field */
    CHECK_EQ_STR(text_of(GEN, "{\"te\\u0078t\": \"k\"}"), "k");
    /* \u0000 decodes to a NUL byte inside the text */
    b = "{\"text\": \"a\\u0000b\"}";
    CHECK_EQ_INT(sglr_extract_run(&X, GEN, b, strlen(b), SGLR_EXTRACT_TEXT), 0);
    CHECK_EQ_INT(X.text_len, 3);
    CHECK(memcmp(X.text, "a\0b", 3) == 0);
}

TEST(long_strings)
{
    /* Exercise the 16-byte scanner across every alignment of specials. */
    static char body[5000], want[5000];
    for (int at = 0; at < 40; at++) {
        size_t n = 0, w = 0;
        n += (size_t)sprintf(body + n, "{\"text\": \"");
        for (int i = 0; i < 100; i++) {
            if (i == at) {
                n += (size_t)sprintf(body + n, "\\n\xc3\xa9\\\"");
                w += (size_t)sprintf(want + w, "\n\xc3\xa9\"");
            } else {
                body[n++] = (char)('a' + i % 26);
                want[w++] = (char)('a' + i % 26);
            }
        }
        n += (size_t)sprintf(body + n, "\"}");
        body[n] = want[w] = 0;
        CHECK_EQ_STR(text_of(GEN, body), want);
    }
}

TEST(nested_values_are_skipped)
{
    CHECK_EQ_STR(text_of(GEN,
        "{\"sampling_params\": {\"stop\": [\"text\", {\"text\": \"no\"}], \"x\": {\"y\": [[[]]]}},"
        " \"lora\": {\"text\": \"nope\"}, \"n\": -1.5e+3, \"t\": true, \"f\": false, \"z\": null,"
        " \"text\": \"yes\", \"after\": [1, {\"a\": [\"]}\"]}]}"),
        "yes");
    CHECK_EQ_STR(error_of(GEN, " \r\n\t{ \"text\" : \"x\" , \"a\" : [ ] , \"b\" : { } } \n"), "");
}

TEST(invalid_json)
{
    CHECK_EQ_STR(error_of(GEN, ""), "request body is empty");
    CHECK_EQ_STR(error_of(GEN, "   "), "request body is empty");
    CHECK_EQ_STR(error_of(GEN, "{\"text\" \"x\"}"), "invalid JSON at byte 8: expected ':'");
    CHECK_EQ_STR(error_of(GEN, "{\"text\": \"x\""), "invalid JSON at byte 12: unexpected end of input");
    CHECK_EQ_STR(error_of(GEN, "{\"text\": \"x"), "invalid JSON at byte 11: unterminated string");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 1,}"), "invalid JSON at byte 8: expected a string key");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": [1 2]}"), "invalid JSON at byte 9: expected ',' or ']'");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 1 \"b\": 2}"), "invalid JSON at byte 8: expected ',' or '}'");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": tru}"), "invalid JSON at byte 6: expected a value");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": nul"), "invalid JSON at byte 9: unexpected end of input");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 01}"), "invalid JSON at byte 7: expected ',' or '}'");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 1.}"), "invalid JSON at byte 8: invalid number");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": -}"), "invalid JSON at byte 7: invalid number");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 1e}"), "invalid JSON at byte 8: invalid number");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": 'x'}"), "invalid JSON at byte 6: unexpected character '''");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"\\x\"}"), "invalid JSON at byte 7: invalid escape in string");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"\\u12G4\"}"), "invalid JSON at byte 7: invalid \\u escape");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"x\ny\"}"), "invalid JSON at byte 8: control character in string");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"\xc3\x28\"}"), "invalid JSON at byte 7: invalid UTF-8 in string");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"\xed\xa0\x80\"}"), "invalid JSON at byte 7: invalid UTF-8 in string");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \"\xc0\xaf\"}"), "invalid JSON at byte 7: invalid UTF-8 in string");
    CHECK_EQ_STR(error_of(GEN, "{} x"), "invalid JSON at byte 3: unexpected data after the JSON object");
    CHECK_EQ_STR(error_of(GEN, "{}{}"), "invalid JSON at byte 2: unexpected data after the JSON object");
    CHECK_EQ_STR(error_of(GEN, "[1, 2]"), "request body must be a JSON object");
    CHECK_EQ_STR(error_of(GEN, "\"text\""), "request body must be a JSON object");
    CHECK_EQ_STR(error_of(GEN, "[1, 2"), "invalid JSON at byte 5: unexpected end of input");
    CHECK_EQ_STR(error_of(GEN, "{\"a\": \xff}"), "invalid JSON at byte 6: unexpected byte 0xff");
    /* a NUL byte in the body is not whitespace */
    CHECK_EQ_INT(sglr_extract_run(&X, GEN, "{}\0", 3, 0), -EINVAL);
    /* deep nesting is refused, not a stack overflow */
    static char deep[4000];
    memset(deep, '[', sizeof deep - 1);
    memcpy(deep, "{\"a\":", 5);
    CHECK(strstr(error_of(GEN, deep), "nesting deeper than") != NULL);
    /* inspecting and extracting refuse the same bodies */
    CHECK(text_of(GEN, "{\"text\": \"x\",}") == NULL);
}

TEST(wrong_types)
{
    CHECK_EQ_STR(error_of(GEN, "{\"text\": 5}"), "field 'text' must be a string or an array of strings");
    CHECK_EQ_STR(error_of(GEN, "{\"text\": [\"a\", 1]}"),
                 "field 'text' must be a string or an array of strings");
    CHECK_EQ_STR(error_of(GEN, "{\"prompt\": {}}"), "field 'prompt' must be a string or an array");
    CHECK_EQ_STR(error_of(GEN, "{\"input_ids\": \"1 2\"}"),
                 "field 'input_ids' must be an array of integers or an array of arrays of integers");
    CHECK_EQ_STR(error_of(GEN, "{\"input_ids\": [1.5]}"),
                 "field 'input_ids' must be an array of integers or an array of arrays of integers");
    CHECK_EQ_STR(error_of(GEN, "{\"input_ids\": [[1, \"2\"]]}"),
                 "field 'input_ids' must be an array of integers or an array of arrays of integers");
    CHECK_EQ_STR(error_of(GEN, "{\"stream\": \"yes\"}"), "field 'stream' must be a boolean");
    CHECK_EQ_STR(error_of(GEN, "{\"stream\": 1}"), "field 'stream' must be a boolean");
    CHECK_EQ_STR(error_of(GEN, "{\"sampling_params\": 3}"), "field 'sampling_params' must be an object");
    CHECK_EQ_STR(error_of(GEN, "{\"model\": 3}"), "");    /* not a generate field */
    CHECK_EQ_STR(error_of(CHAT, "{}"), "field 'messages' is required");
    CHECK_EQ_STR(error_of(CHAT, "{\"messages\": null}"), "field 'messages' must be an array");
    CHECK_EQ_STR(error_of(CHAT, "{\"messages\": {\"content\": \"x\"}}"), "field 'messages' must be an array");
    CHECK_EQ_STR(error_of(CHAT, "{\"messages\": [\"hi\"]}"), "field 'messages' must be an array of objects");
    CHECK_EQ_STR(error_of(CHAT, "{\"messages\": [], \"model\": 1}"), "field 'model' must be a string");
    CHECK_EQ_STR(error_of(CHAT, "{\"messages\": [], \"stream\": \"true\"}"), "field 'stream' must be a boolean");
    CHECK_EQ_STR(error_of(COMP, "{\"model\": \"m\"}"), "field 'prompt' is required");
    CHECK_EQ_STR(error_of(COMP, "{\"prompt\": null}"), "field 'prompt' is required");
    CHECK_EQ_STR(error_of(COMP, "{\"prompt\": 5}"), "field 'prompt' must be a string or an array");
    CHECK_EQ_STR(error_of(COMP, "{\"prompt\": \"x\", \"model\": [\"m\"]}"), "field 'model' must be a string");
}

TEST(every_truncation_is_refused)
{
    const char *b = "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": "
                    "[{\"type\": \"text\", \"text\": \"h\\u00e9\\ud83d\\ude00 \xc3\xa9\"}]}],"
                    " \"stream\": true, \"n\": -1.25e-3, \"x\": [null, false, {}]}";
    size_t n = strlen(b);
    CHECK_EQ_INT(sglr_extract_run(&X, CHAT, b, n, SGLR_EXTRACT_TEXT), 0);
    for (size_t i = 0; i < n - 1; i++) {
        /* copy so ASan sees a read past the cut */
        char *cut = malloc(i ? i : 1);
        memcpy(cut, b, i);
        int r = sglr_extract_run(&X, CHAT, cut, i, SGLR_EXTRACT_TEXT);
        free(cut);
        CHECK_EQ_INT(r, -EINVAL);
    }
}

TEST(buffers_are_reused)
{
    /* A big body and then small ones: results stay right as buffers are
     * reused, and a huge buffer is let go. */
    size_t n = 10u << 20;
    char *body = malloc(n + 32);
    CHECK(body != NULL);
    memcpy(body, "{\"text\": \"", 10);
    memset(body + 10, 'x', n);
    memcpy(body + 10 + n, "\"}", 3);
    CHECK_EQ_INT(sglr_extract_run(&X, GEN, body, n + 12, SGLR_EXTRACT_TEXT), 0);
    CHECK_EQ_INT(X.text_len, n);
    free(body);
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"small\"}"), "small");
    CHECK_EQ_STR(text_of(CHAT, "{\"messages\": [{\"content\": \"c\"}]}"), "c");
}

/* The routing text handed over without a copy (the flow keeps it in the
 * request's exchange): the buffers change places, each run after it
 * decodes into the one it was given, and a buffer over the cap, or no
 * text, leaves the caller's buffer alone. */
TEST(text_taken_without_a_copy)
{
    sglr_buf_t out = { 0 };
    CHECK_EQ_INT(sglr_buf_append(&out, "old text", 8), 0);
    char *given = out.data;
    const char *chat = "{\"messages\": [{\"content\": \"sys\"}, {\"content\": \"question one\"}]}";
    CHECK_EQ_INT(sglr_extract_run(&X, CHAT, chat, strlen(chat), SGLR_EXTRACT_TEXT), 0);
    const char *held = X.text;
    CHECK_EQ_INT(sglr_extract_take_text(&X, &out, 12, 1u << 14), 0);
    CHECK(out.data == held);                     /* the same bytes, not a copy */
    CHECK_EQ_INT(out.len, 12);
    CHECK(memcmp(out.data, "sys question", 12) == 0);
    CHECK_EQ_INT(X.text_len, 0);
    /* the next run decodes into the buffer the caller gave */
    CHECK_EQ_STR(text_of(COMP, "{\"prompt\": \"a prompt\"}"), "a prompt");
    CHECK_EQ_STR(text_of(CHAT, "{\"messages\": [{\"content\": \"next\"}]}"), "next");
    CHECK(X.text == given);
    CHECK(memcmp(out.data, "sys question", 12) == 0);     /* what was taken stays */
    /* from the prompt's buffer too */
    sglr_buf_t out2 = { 0 };
    CHECK_EQ_STR(text_of(COMP, "{\"prompt\": \"the prompt\"}"), "the prompt");
    CHECK_EQ_INT(sglr_extract_take_text(&X, &out2, 10, 1u << 14), 0);
    CHECK(out2.len == 10 && memcmp(out2.data, "the prompt", 10) == 0);
    /* over the cap, or no text: refused, nothing moved */
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"kept here\"}"), "kept here");
    CHECK_EQ_INT(sglr_extract_take_text(&X, &out, 9, 4), -1);
    CHECK(memcmp(out.data, "sys question", 12) == 0 && out.len == 12);
    CHECK_EQ_INT(X.text_len, 9);
    CHECK_EQ_STR(text_of(GEN, "{\"text\": \"\"}"), "");
    sglr_buf_t before = out;
    CHECK_EQ_INT(sglr_extract_take_text(&X, &out, 0, 1u << 14), -1);
    CHECK(out.data == before.data && out.len == before.len);
    sglr_buf_free(&out);
    sglr_buf_free(&out2);
}

int main(void)
{
    sglr_extract_init(&X);
    RUN(routes);
    RUN(generate_text);
    RUN(stream_and_model);
    RUN(chat_messages);
    RUN(completions_prompt);
    RUN(escapes);
    RUN(long_strings);
    RUN(nested_values_are_skipped);
    RUN(invalid_json);
    RUN(wrong_types);
    RUN(every_truncation_is_refused);
    RUN(buffers_are_reused);
    RUN(text_taken_without_a_copy);
    sglr_extract_close(&X);
    TEST_EXIT();
}
