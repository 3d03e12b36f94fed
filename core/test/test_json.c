/*
 * test_json.c: the shared JSON lexer (core/json.c). Syntax errors and
 * their messages are covered through the extractor in test_extract.c;
 * this holds what only the lexer offers: key comparison and quoting.
 */
#include "test.h"
#include "json.h"

#include <errno.h>

/* Whether the first key of object s, decoded, is name. */
static int first_key_is(const char *s, const char *name)
{
    sglr_json_t j;
    sglr_json_key_t k;
    sglr_json_init(&j, s, strlen(s), NULL, 0);
    if (sglr_json_peek(&j) != '{' || sglr_json_open(&j, '}') != 1 || sglr_json_key(&j, &k) < 0)
        return -1;
    return sglr_json_key_is(&k, name, strlen(name));
}

TEST(keys_compare_decoded)
{
    CHECK_EQ_INT(first_key_is("{\"text\": 1}", "text"), 1);
    CHECK_EQ_INT(first_key_is("{\"text\": 1}", "tex"), 0);
    CHECK_EQ_INT(first_key_is("{\"text\": 1}", "texts"), 0);
    CHECK_EQ_INT(first_key_is("{\"\": 1}", ""), 1);
    CHECK_EQ_INT(first_key_is("{\"te\\u0078t\": 1}", "text"), 1);
    CHECK_EQ_INT(first_key_is("{\"te\\u0078t\": 1}", "te"), 0);
    CHECK_EQ_INT(first_key_is("{\"te\\u0078t\": 1}", "textx"), 0);
    CHECK_EQ_INT(first_key_is("{\"a\\\"b\\\\c\\/\\n\": 1}", "a\"b\\c/\n"), 1);
    CHECK_EQ_INT(first_key_is("{\"\\u00e9\\ud83d\\ude00\": 1}", "\xc3\xa9\xf0\x9f\x98\x80"), 1);
    /* a lone surrogate reads as U+FFFD, as in decoded strings */
    CHECK_EQ_INT(first_key_is("{\"\\ud83dx\": 1}", "\xef\xbf\xbdx"), 1);
    CHECK_EQ_INT(first_key_is("{\"caf\xc3\xa9\": 1}", "caf\xc3\xa9"), 1);
    /* a key must be followed by ':' */
    CHECK_EQ_INT(first_key_is("{\"text\" 1}", "text"), -1);
}

static const char *quoted(const char *s, size_t n)
{
    static char out[256];
    int r = sglr_json_quote(out, sizeof out - 1, s, n);
    if (r < 0)
        return NULL;
    out[r] = 0;
    return out;
}

TEST(quote)
{
    CHECK_EQ_STR(quoted("", 0), "\"\"");
    CHECK_EQ_STR(quoted("[::1]", 5), "\"[::1]\"");
    CHECK_EQ_STR(quoted("a\"b\\c/", 6), "\"a\\\"b\\\\c/\"");
    CHECK_EQ_STR(quoted("\n\r\t\b\f\x01\x1f\x7f", 8), "\"\\n\\r\\t\\b\\f\\u0001\\u001f\x7f\"");
    CHECK_EQ_STR(quoted("\0x", 2), "\"\\u0000x\"");
    CHECK_EQ_STR(quoted("\xc3\xa9\xf0\x9f\x98\x80", 6), "\"\xc3\xa9\xf0\x9f\x98\x80\"");
    CHECK(quoted("\xc3", 1) == NULL);
    CHECK(quoted("\xed\xa0\x80", 3) == NULL);     /* an encoded surrogate */
    CHECK(quoted("\xff", 1) == NULL);
    /* the quoted text reads back as the original */
    const char *s = "x\"\\\n\x02\xc3\xa9";
    const char *q = quoted(s, strlen(s));
    sglr_json_t j;
    sglr_buf_t back = { 0 };
    sglr_json_init(&j, q, strlen(q), NULL, 0);
    CHECK_EQ_INT(sglr_json_string(&j, &back), 0);
    CHECK_EQ_INT(back.len, strlen(s));
    CHECK(memcmp(back.data, s, back.len) == 0);
    sglr_buf_free(&back);
    /* too small a buffer is refused, never overrun; 6n + 2 always fits */
    char small[8];
    CHECK_EQ_INT(sglr_json_quote(small, 1, "", 0), -ENOSPC);
    CHECK_EQ_INT(sglr_json_quote(small, 2, "", 0), 2);
    CHECK_EQ_INT(sglr_json_quote(small, sizeof small, "\x01", 1), 8);
    CHECK_EQ_INT(sglr_json_quote(small, 7, "\x01", 1), -ENOSPC);
}

TEST(errors_name_the_byte)
{
    char err[64];
    sglr_json_t j;
    sglr_json_init(&j, "[1, }", 5, err, sizeof err);
    CHECK_EQ_INT(sglr_json_skip(&j), -EINVAL);
    CHECK_EQ_STR(err, "invalid JSON at byte 4: unexpected character '}'");
    /* a short buffer is cut, not overrun; none at all is fine */
    char tiny[8];
    sglr_json_init(&j, "[1, }", 5, tiny, sizeof tiny);
    CHECK_EQ_INT(sglr_json_skip(&j), -EINVAL);
    CHECK_EQ_STR(tiny, "invalid");
    sglr_json_init(&j, "[1, }", 5, NULL, 0);
    CHECK_EQ_INT(sglr_json_skip(&j), -EINVAL);
}

int main(void)
{
    RUN(keys_compare_decoded);
    RUN(quote);
    RUN(errors_name_the_byte);
    TEST_EXIT();
}
