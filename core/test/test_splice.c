/*
 * test_splice.c: body splicing on raw JSON (core/splice.c): batch sizes,
 * bootstrap injection, rooms, the data-parallel rank, the logprob merge and
 * its stream transformer, then hostile input.
 */
#include "test.h"
#include "json_squeeze.h"
#include "extract.h"
#include "json.h"
#include "splice.h"
#include "msg.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#define GEN SGLR_ROUTE_GENERATE
#define CHAT SGLR_ROUTE_CHAT
#define COMP SGLR_ROUTE_COMPLETIONS

static sglr_buf_t OUT;

static int valid_json(const char *s, size_t n)
{
    sglr_json_t j;
    sglr_json_init(&j, s, n, NULL, 0);
    return sglr_json_skip(&j) == 0 && sglr_json_peek(&j) < 0;
}

/* How often each top-level key of the object s is present. */
static int top_count(const char *s, size_t n, const char *name)
{
    sglr_json_t j;
    sglr_json_key_t k;
    int more, count = 0;
    sglr_json_init(&j, s, n, NULL, 0);
    if (sglr_json_peek(&j) != '{' || (more = sglr_json_open(&j, '}')) < 0)
        return -1;
    while (more > 0) {
        if (sglr_json_key(&j, &k) < 0 || sglr_json_skip(&j) < 0)
            return -1;
        count += sglr_json_key_is(&k, name, strlen(name));
        more = sglr_json_next(&j, '}');
    }
    return more < 0 ? -1 : count;
}

static int batch(int route, const char *body)
{
    return sglr_splice_batch(route, body, strlen(body));
}

static int same_from_append;     /* splices the append path also made, the same */

/* The append path (for a body a request check found without bootstrap
 * members of its own) must write what the rewriting path wrote. */
static void check_append(const char *body, const char *host, int port, const uint64_t *rooms,
                         int n)
{
    int lp, own = -1;
    if (sglr_splice_request_ex(GEN, body, strlen(body), &lp, &own) < 0 || own)
        return;
    sglr_buf_t b = { 0 };
    CHECK_EQ_INT(sglr_splice_bootstrap_append(&b, body, strlen(body), host, strlen(host), port,
                                              rooms, n ? (size_t)n : 1, n), 0);
    /* the same members; whitespace between them may differ (the rewrite
     * drops what stood between a value and its comma) */
    char *x = malloc(OUT.len + 1), *y = malloc(b.len + 1);
    CHECK(x && y);
    memcpy(x, OUT.data, OUT.len);
    memcpy(y, b.data, b.len);
    size_t xn = json_squeeze(x, OUT.len), yn = json_squeeze(y, b.len);
    int same = xn == yn && memcmp(x, y, xn) == 0;
    free(x);
    free(y);
    CHECK(same);
    same_from_append++;
    sglr_buf_free(&b);
}

/* The spliced body (as a C string), or NULL on failure. */
static const char *boot(const char *body, const char *host, int port, uint64_t room)
{
    sglr_buf_reset(&OUT);
    if (sglr_splice_bootstrap(&OUT, body, strlen(body), host, strlen(host), port,
                              &room, 1, 0) < 0)
        return NULL;
    check_append(body, host, port, &room, 0);
    return valid_json(OUT.data, OUT.len) ? OUT.data : "(invalid JSON)";
}

static const char *boot_batch(const char *body, int port, const uint64_t *rooms, int n)
{
    sglr_buf_reset(&OUT);
    if (sglr_splice_bootstrap(&OUT, body, strlen(body), "h", 1, port, rooms, (size_t)n, n) < 0)
        return NULL;
    check_append(body, "h", port, rooms, n);
    return valid_json(OUT.data, OUT.len) ? OUT.data : "(invalid JSON)";
}

static const char *rank(const char *body, int r)
{
    sglr_buf_reset(&OUT);
    if (sglr_splice_rank(&OUT, body, strlen(body), r) < 0)
        return NULL;
    return valid_json(OUT.data, OUT.len) ? OUT.data : "(invalid JSON)";
}

static const char *merge(const char *prefill, const char *decode)
{
    sglr_buf_reset(&OUT);
    if (sglr_splice_merge_logprobs(&OUT, prefill, strlen(prefill), decode, strlen(decode)) < 0)
        return NULL;
    if (!OUT.data)
        sglr_buf_append(&OUT, "", 0);
    return OUT.data;
}

/* ---- batch detection ------------------------------------------------------ */

TEST(batch_generate)
{
    CHECK_EQ_INT(batch(GEN, "{\"text\": \"hi\"}"), 0);
    CHECK_EQ_INT(batch(GEN, "{\"text\": [\"a\", \"b\", \"c\"]}"), 3);
    CHECK_EQ_INT(batch(GEN, "{\"text\": [\"only\"]}"), 1);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [1, 2, 3]}"), 0);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [[1, 2], [3], []]}"), 3);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [[5]]}"), 1);
    CHECK_EQ_INT(batch(GEN, "{}"), 0);
    CHECK_EQ_INT(batch(GEN, " {\"sampling_params\": {\"text\": [\"x\", \"y\"], \"n\": 4}} "), 0);
    /* text decides when it is there, whatever the order; null is absent */
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [[1], [2]], \"text\": \"t\"}"), 0);
    CHECK_EQ_INT(batch(GEN, "{\"text\": null, \"input_ids\": [[1], [2]]}"), 2);
    /* the last duplicate counts, as on the worker */
    CHECK_EQ_INT(batch(GEN, "{\"text\": [\"a\", \"b\"], \"text\": \"c\"}"), 0);
    CHECK_EQ_INT(batch(GEN, "{\"text\": \"c\", \"text\": [\"a\", \"b\"]}"), 2);
    /* an escaped key names the same field */
    CHECK_EQ_INT(batch(GEN, "{\"te\\u0078t\": [\"a\", \"b\"]}"), 2);
    /* prompt and n mean nothing to generate */
    CHECK_EQ_INT(batch(GEN, "{\"prompt\": [\"a\", \"b\"], \"n\": 3}"), 0);
    /* shapes no worker takes */
    CHECK_EQ_INT(batch(GEN, "{\"text\": []}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"text\": [\"a\", 1]}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"text\": 5}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [[1], 2]}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [1.5]}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [[\"1\"]]}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": \"1 2\"}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"input_ids\": [\"a\"]}"), -EINVAL);
}

TEST(batch_completions)
{
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": \"once\"}"), 0);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [\"a\", \"b\"]}"), 2);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [1, 2, 3]}"), 0);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [[1, 2], [3], [4]]}"), 3);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": null}"), 0);
    CHECK_EQ_INT(batch(COMP, "{\"model\": \"m\"}"), 0);
    CHECK_EQ_INT(batch(COMP, "{\"text\": [\"a\", \"b\"], \"n\": 2, \"prompt\": \"p\"}"), 0);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [\"a\", [1]]}"), -EINVAL);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [1, [1]]}"), -EINVAL);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": []}"), -EINVAL);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": [{}]}"), -EINVAL);
    CHECK_EQ_INT(batch(COMP, "{\"prompt\": {\"a\": 1}}"), -EINVAL);
}

TEST(batch_chat)
{
    const char *msgs = "\"messages\": [{\"role\": \"user\", \"content\": \"n: 5\"}]";
    char b[256];
    CHECK_EQ_INT(batch(CHAT, "{\"messages\": []}"), 0);
    snprintf(b, sizeof b, "{%s, \"n\": 4}", msgs);
    CHECK_EQ_INT(batch(CHAT, b), 4);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 2}"), 2);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 1}"), 0);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 0}"), 0);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": -3}"), 0);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": null}"), 0);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 65536}"), 65536);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 65537}"), -E2BIG);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 99999999999999999999999999}"), -E2BIG);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": 2.0}"), -EINVAL);
    CHECK_EQ_INT(batch(CHAT, "{\"n\": \"2\"}"), -EINVAL);
    /* a nested n is not the request's */
    CHECK_EQ_INT(batch(CHAT, "{\"tools\": [{\"n\": 3}], \"x\": {\"n\": 9}}"), 0);
    CHECK_EQ_INT(batch(CHAT, "{\"text\": [\"a\", \"b\"], \"prompt\": [\"a\", \"b\"]}"), 0);
}

TEST(batch_refuses_non_objects)
{
    CHECK_EQ_INT(batch(GEN, ""), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "   "), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "[\"a\", \"b\"]"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "\"text\""), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"text\": \"a\""), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{} {}"), -EINVAL);
    CHECK_EQ_INT(batch(GEN, "{\"a\": 1,}"), -EINVAL);
    CHECK_EQ_INT(sglr_splice_batch(7, "{}", 2), -EINVAL);
    CHECK_EQ_INT(sglr_splice_batch(-1, "{}", 2), -EINVAL);
    CHECK_EQ_INT(sglr_splice_batch(GEN, NULL, 0), -EINVAL);
    /* the length is what counts, not a NUL */
    CHECK_EQ_INT(sglr_splice_batch(GEN, "{\"text\": [\"a\"]}xyz", 15), 1);
}

/* ---- bootstrap injection ---------------------------------------------------- */

#define FIELDS(host, port, room) \
    "\"bootstrap_host\":\"" host "\",\"bootstrap_port\":" port ",\"bootstrap_room\":" room

#define LOGPROBS(route, body) ({ int _lp = -1; \
    int _b = sglr_splice_request((route), body, sizeof body - 1, &_lp); (void)_b; _lp; })

TEST(request_tells_logprobs)
{
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_GENERATE, "{\"text\":\"a\",\"return_logprob\":true}"), 1);
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_GENERATE, "{\"text\":\"a\",\"return_logprob\":false}"), 0);
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_GENERATE, "{\"text\":\"a\"}"), 0);
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_COMPLETIONS, "{\"prompt\":\"a\",\"logprobs\":0}"), 1);
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_COMPLETIONS, "{\"prompt\":\"a\",\"logprobs\":null}"), 0);
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_CHAT, "{\"messages\":[],\"logprobs\":true}"), 1);
    /* nested or quoted look-alikes do not count */
    CHECK_EQ_INT(LOGPROBS(SGLR_ROUTE_GENERATE,
        "{\"text\":\"\\\"return_logprob\\\": true\",\"sampling_params\":{\"logprobs\":1}}"), 0);
    /* and the batch is still counted in the same pass */
    int lp = 0;
    static const char b[] = "{\"text\":[\"a\",\"b\"],\"return_logprob\":true}";
    CHECK_EQ_INT(sglr_splice_request(SGLR_ROUTE_GENERATE, b, sizeof b - 1, &lp), 2);
    CHECK_EQ_INT(lp, 1);
}

TEST(sse_last_finds_the_last_json_event)
{
    static const char s[] = "data: {\"a\":1}\n\ndata: {\"a\":2}\r\n\r\ndata: [DONE]\n\n";
    size_t off = 0, len = 0;
    CHECK_EQ_INT(sglr_splice_sse_last(s, sizeof s - 1, &off, &len), 0);
    CHECK_EQ_INT(len, 7);
    CHECK(memcmp(s + off, "{\"a\":2}", 7) == 0);
    CHECK_EQ_INT(sglr_splice_sse_last("data: [DONE]\n\n", 14, &off, &len), -ENOENT);
    CHECK_EQ_INT(sglr_splice_sse_last("", 0, &off, &len), -ENOENT);
}

TEST(bootstrap_single)
{
    CHECK_EQ_STR(boot("{\"text\":\"hi\"}", "10.0.0.1", 8998, 42),
                 "{\"text\":\"hi\"," FIELDS("10.0.0.1", "8998", "42") "}");
    /* whitespace around members is kept; ours go before the brace */
    CHECK_EQ_STR(boot(" {\n  \"text\": \"hi\",\n  \"stream\": true\n}\n", "h", 1, 7),
                 " {\n  \"text\": \"hi\",\n  \"stream\": true," FIELDS("h", "1", "7") "\n}\n");
    /* bytes a JSON library would change pass as they came */
    const char *b = "{\"stop\": [], \"seed\": 18446744073709551617, \"x\": 1.0e+2, "
                    "\"t\": \"caf\xc3\xa9 \\u00e9 \\ud83d\\ude00\", \"o\": {}}";
    const char *got = boot(b, "h", 1, 2);
    CHECK(got != NULL);
    CHECK(strncmp(got, b, strlen(b) - 1) == 0);
    CHECK_EQ_STR(got + strlen(b) - 1, "," FIELDS("h", "1", "2") "}");
}

TEST(bootstrap_empty_objects)
{
    CHECK_EQ_STR(boot("{}", "h", 1, 2), "{" FIELDS("h", "1", "2") "}");
    CHECK_EQ_STR(boot("{ }", "h", 1, 2), "{" FIELDS("h", "1", "2") " }");
    CHECK_EQ_STR(boot("\r\n\t{\n}\n ", "h", 1, 2), "\r\n\t{" FIELDS("h", "1", "2") "\n}\n ");
}

TEST(bootstrap_append_matches_the_rewrite)
{
    int before = same_from_append;
    CHECK_EQ_STR(boot("{\"text\":\"hi\"}", "10.0.0.1", 8998, 42),
                 "{\"text\":\"hi\"," FIELDS("10.0.0.1", "8998", "42") "}");
    CHECK_EQ_STR(boot("\r\n\t{\n}\n ", "h", 1, 2), "\r\n\t{" FIELDS("h", "1", "2") "\n}\n ");
    CHECK_EQ_STR(boot("{\"a\": {\"bootstrap_room\": 1} \t}", "h", 1, 2),
                 "{\"a\": {\"bootstrap_room\": 1}," FIELDS("h", "1", "2") " \t}");
    uint64_t rooms[2] = { 5, 6 };
    CHECK(boot_batch("{\"text\": [\"a\", \"b\"]}", 7, rooms, 2) != NULL);
    CHECK_EQ_INT(same_from_append - before, 4);
    /* a body with members of its own is for the rewrite, which the check says */
    int lp, own = 0;
    static const char b[] = "{\"text\":\"a\",\"bootstrap_port\":1}";
    CHECK_EQ_INT(sglr_splice_request_ex(GEN, b, sizeof b - 1, &lp, &own), 0);
    CHECK_EQ_INT(own, 1);
    static const char nested[] = "{\"text\":\"a\",\"o\":{\"bootstrap_port\":1}}";
    CHECK_EQ_INT(sglr_splice_request_ex(GEN, nested, sizeof nested - 1, &lp, &own), 0);
    CHECK_EQ_INT(own, 0);
    /* refused without a closing brace, out as it was */
    sglr_buf_t out = { 0 };
    uint64_t room = 1;
    CHECK_EQ_INT(sglr_splice_bootstrap_append(&out, "{\"a\":1", 6, "h", 1, 1, &room, 1, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap_append(&out, "  ", 2, "h", 1, 1, &room, 1, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap_append(&out, "}", 1, "h", 1, 1, &room, 1, 0), -EINVAL);
    CHECK_EQ_INT(out.len, 0);
    sglr_buf_free(&out);
}

TEST(bootstrap_replaces_client_fields)
{
    CHECK_EQ_STR(boot("{\"bootstrap_room\": 5, \"text\": \"x\", \"bootstrap_host\": \"evil\","
                      " \"bootstrap_port\": 1}", "h", 2, 3),
                 "{ \"text\": \"x\"," FIELDS("h", "2", "3") "}");
    /* the object held nothing else */
    CHECK_EQ_STR(boot("{\"bootstrap_room\": 5}", "h", 2, 3), "{" FIELDS("h", "2", "3") "}");
    CHECK_EQ_STR(boot("{ \"bootstrap_room\" : [1, 2] , \"bootstrap_port\" : null }", "h", 2, 3),
                 "{" FIELDS("h", "2", "3") " }");
    /* the last member removed */
    CHECK_EQ_STR(boot("{\"a\": 1, \"bootstrap_room\": 2 }", "h", 2, 3),
                 "{\"a\": 1," FIELDS("h", "2", "3") " }");
    /* one in the middle */
    CHECK_EQ_STR(boot("{\"a\": 1, \"bootstrap_room\": 2, \"b\": 3}", "h", 2, 3),
                 "{\"a\": 1, \"b\": 3," FIELDS("h", "2", "3") "}");
    /* duplicates, and spellings that decode to the same key */
    CHECK_EQ_STR(boot("{\"bootstrap_room\": 1, \"bootstrap_room\": 2, \"bootstrap\\u005froom\": 3,"
                      " \"\\u0062ootstrap_host\": \"x\", \"z\": 0}", "h", 2, 3),
                 "{ \"z\": 0," FIELDS("h", "2", "3") "}");
    /* near misses are other keys */
    CHECK_EQ_STR(boot("{\"bootstrap_rooms\": 1, \"Bootstrap_room\": 2, \"bootstrap\": 3}", "h", 2, 3),
                 "{\"bootstrap_rooms\": 1, \"Bootstrap_room\": 2, \"bootstrap\": 3,"
                 FIELDS("h", "2", "3") "}");
    const char *got = boot("{\"bootstrap_room\": 1, \"text\": \"a\", \"bootstrap_room\": 2}", "h", 2, 3);
    CHECK(got != NULL);
    CHECK_EQ_INT(top_count(got, strlen(got), "bootstrap_room"), 1);
}

TEST(bootstrap_leaves_nested_and_quoted_keys)
{
    const char *b =
        "{\"text\": \"\\\"bootstrap_room\\\": 5, bootstrap_host\","
        " \"sampling_params\": {\"bootstrap_room\": 5, \"bootstrap_port\": 6},"
        " \"x\": [{\"bootstrap_host\": \"in\"}, \"bootstrap_room\"],"
        " \"\\u65e5\\u672c\": \"\xe6\x97\xa5\xe6\x9c\xac bootstrap_room\"}";
    const char *got = boot(b, "h", 2, 3);
    CHECK(got != NULL);
    CHECK(strncmp(got, b, strlen(b) - 1) == 0);
    CHECK_EQ_STR(got + strlen(b) - 1, "," FIELDS("h", "2", "3") "}");
    CHECK_EQ_INT(top_count(got, strlen(got), "bootstrap_room"), 1);
}

TEST(bootstrap_rooms_are_exact)
{
    CHECK_EQ_STR(boot("{}", "h", 1, UINT64_C(9223372036854775807)),
                 "{" FIELDS("h", "1", "9223372036854775807") "}");
    CHECK_EQ_STR(boot("{}", "h", 1, UINT64_MAX), "{" FIELDS("h", "1", "18446744073709551615") "}");
    CHECK_EQ_STR(boot("{}", "h", 1, 0), "{" FIELDS("h", "1", "0") "}");
    /* 2^53 + 1: where a double would round */
    CHECK_EQ_STR(boot("{}", "h", 1, UINT64_C(9007199254740993)),
                 "{" FIELDS("h", "1", "9007199254740993") "}");
}

TEST(bootstrap_hosts_and_ports)
{
    CHECK_EQ_STR(boot("{}", "[::1]", 8998, 1), "{" FIELDS("[::1]", "8998", "1") "}");
    CHECK_EQ_STR(boot("{}", "[fe80::1%eth0]", 0, 1), "{" FIELDS("[fe80::1%eth0]", "0", "1") "}");
    CHECK_EQ_STR(boot("{}", "a\"b\\c\n\x01", 1, 1),
                 "{" FIELDS("a\\\"b\\\\c\\n\\u0001", "1", "1") "}");
    CHECK_EQ_STR(boot("{}", "h\xc3\xa9", 1, 1), "{" FIELDS("h\xc3\xa9", "1", "1") "}");
    CHECK_EQ_STR(boot("{}", "", 1, 1), "{" FIELDS("", "1", "1") "}");
    CHECK_EQ_STR(boot("{}", "h", -1, 1),
                 "{\"bootstrap_host\":\"h\",\"bootstrap_port\":null,\"bootstrap_room\":1}");
    CHECK_EQ_STR(boot("{}", "h", 65535, 1), "{" FIELDS("h", "65535", "1") "}");
    /* refused: invalid UTF-8 in the host, a port past 65535 */
    CHECK(boot("{}", "h\xc3", 1, 1) == NULL);
    CHECK(boot("{}", "h", 65536, 1) == NULL);
}

TEST(bootstrap_batches)
{
    uint64_t rooms[3] = { 1, UINT64_C(9223372036854775807), 3 };
    CHECK_EQ_STR(boot_batch("{\"text\": [\"a\", \"b\", \"c\"]}", 80, rooms, 3),
                 "{\"text\": [\"a\", \"b\", \"c\"],\"bootstrap_host\":[\"h\",\"h\",\"h\"],"
                 "\"bootstrap_port\":[80,80,80],"
                 "\"bootstrap_room\":[1,9223372036854775807,3]}");
    CHECK_EQ_STR(boot_batch("{\"input_ids\": [[1]], \"bootstrap_room\": [9]}", -1, rooms, 1),
                 "{\"input_ids\": [[1]],\"bootstrap_host\":[\"h\"],\"bootstrap_port\":[null],"
                 "\"bootstrap_room\":[1]}");
    CHECK_EQ_STR(boot_batch("{}", 1, rooms, 2),
                 "{\"bootstrap_host\":[\"h\",\"h\"],\"bootstrap_port\":[1,1],"
                 "\"bootstrap_room\":[1,9223372036854775807]}");
    /* the room count must match the batch */
    sglr_buf_reset(&OUT);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, "h", 1, 1, rooms, 2, 3), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, "h", 1, 1, rooms, 3, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, "h", 1, 1, rooms, 0, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, "h", 1, 1, NULL, 1, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, "h", 1, 1, rooms, 1, -1), -EINVAL);
    CHECK_EQ_INT(OUT.len, 0);
}

TEST(bootstrap_refuses_and_keeps_out)
{
    static const char *const bad[] = {
        "", " ", "[]", "\"x\"", "5", "null", "{", "{\"a\"", "{\"a\":}", "{\"a\":1,}",
        "{\"a\":1} x", "{}{}", "{\"a\":\"\xff\"}", "{\"bootstrap_room\": 5",
        "{\"a\":1 \"b\":2}", "{'a':1}",
    };
    uint64_t room = 1;
    sglr_buf_reset(&OUT);
    sglr_buf_append(&OUT, "kept", 4);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, bad[i], strlen(bad[i]), "h", 1, 1, &room, 1, 0),
                     -EINVAL);
        CHECK_EQ_INT(OUT.len, 4);
        CHECK_EQ_STR(OUT.data, "kept");
    }
    char host[300];
    memset(host, 'a', sizeof host);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, host, 256, 1, &room, 1, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, "{}", 2, host, 255, 1, &room, 1, 0), 0);
    /* appends after what was there */
    CHECK(strncmp(OUT.data, "kept{\"bootstrap_host\":\"aaa", 26) == 0);
}

TEST(bootstrap_every_truncation_is_refused)
{
    const char *b = "{\"text\": [\"a\\\"b\", \"\xc3\xa9\"], \"bootstrap_room\": 5,"
                    " \"sp\": {\"stop\": [], \"x\": -1.5e3}, \"t\": true}";
    size_t n = strlen(b);
    uint64_t rooms[2] = { 1, 2 };
    CHECK_EQ_INT(sglr_splice_batch(GEN, b, n), 2);
    for (size_t i = 0; i < n; i++) {
        char *cut = malloc(i ? i : 1);     /* exact size: ASan sees a read past the cut */
        memcpy(cut, b, i);
        sglr_buf_reset(&OUT);
        int r1 = sglr_splice_batch(GEN, cut, i);
        int r2 = sglr_splice_bootstrap(&OUT, cut, i, "h", 1, 1, rooms, 2, 2);
        free(cut);
        CHECK_EQ_INT(r1, -EINVAL);
        CHECK_EQ_INT(r2, -EINVAL);
        CHECK_EQ_INT(OUT.len, 0);
    }
}

/* ---- data-parallel rank ---------------------------------------------------- */

#define RANK(r) "\"data_parallel_rank\":" #r

TEST(rank_added)
{
    CHECK_EQ_STR(rank("{\"text\":\"hi\"}", 3), "{\"text\":\"hi\"," RANK(3) "}");
    CHECK_EQ_STR(rank("{}", 0), "{" RANK(0) "}");
    CHECK_EQ_STR(rank(" {\n}\n", 12), " {" RANK(12) "\n}\n");
    CHECK_EQ_STR(rank("{\"a\":1}", 2147483647), "{\"a\":1," RANK(2147483647) "}");
    /* bytes a JSON library would change pass as they came */
    const char *b = "{\"stop\": [], \"seed\": 18446744073709551617, \"x\": 1.0e+2, "
                    "\"t\": \"caf\xc3\xa9 \\u00e9\", \"o\": {}}";
    const char *got = rank(b, 1);
    CHECK(got != NULL);
    CHECK(strncmp(got, b, strlen(b) - 1) == 0);
    CHECK_EQ_STR(got + strlen(b) - 1, "," RANK(1) "}");
}

TEST(rank_replaces_the_clients)
{
    CHECK_EQ_STR(rank("{\"data_parallel_rank\": 7, \"text\": \"x\"}", 1),
                 "{ \"text\": \"x\"," RANK(1) "}");
    CHECK_EQ_STR(rank("{\"text\": \"x\", \"data_parallel_rank\": null}", 1),
                 "{\"text\": \"x\"," RANK(1) "}");
    CHECK_EQ_STR(rank("{\"data_parallel_rank\": 7}", 0), "{" RANK(0) "}");
    /* duplicates and escaped spellings all go; look-alikes stay */
    const char *got = rank("{\"data_parallel_rank\": 1, \"data\\u005fparallel_rank\": 2,"
                           " \"data_parallel_ranks\": 3, \"sp\": {\"data_parallel_rank\": 4},"
                           " \"t\": \"\\\"data_parallel_rank\\\": 5\", \"data_parallel_rank\": [6]}", 0);
    CHECK_EQ_STR(got, "{ \"data_parallel_ranks\": 3, \"sp\": {\"data_parallel_rank\": 4},"
                      " \"t\": \"\\\"data_parallel_rank\\\": 5\"," RANK(0) "}");
    CHECK_EQ_INT(top_count(got, strlen(got), "data_parallel_rank"), 1);
    /* PD bootstrap fields are not touched */
    CHECK_EQ_STR(rank("{\"bootstrap_room\": 5}", 2), "{\"bootstrap_room\": 5," RANK(2) "}");
}

TEST(rank_refuses_and_keeps_out)
{
    static const char *const bad[] = {
        "", " ", "[]", "\"x\"", "5", "null", "{", "{\"a\"", "{\"a\":}", "{\"a\":1,}",
        "{\"a\":1} x", "{}{}", "{\"a\":\"\xff\"}", "{\"data_parallel_rank\": 5",
    };
    sglr_buf_reset(&OUT);
    sglr_buf_append(&OUT, "kept", 4);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_EQ_INT(sglr_splice_rank(&OUT, bad[i], strlen(bad[i]), 1), -EINVAL);
        CHECK_EQ_INT(OUT.len, 4);
        CHECK_EQ_STR(OUT.data, "kept");
    }
    CHECK_EQ_INT(sglr_splice_rank(&OUT, "{}", 2, -1), -EINVAL);
    CHECK_EQ_INT(sglr_splice_rank(NULL, "{}", 2, 1), -EINVAL);
    CHECK_EQ_INT(sglr_splice_rank(&OUT, NULL, 2, 1), -EINVAL);
    /* appends after what was there */
    CHECK_EQ_INT(sglr_splice_rank(&OUT, "{}", 2, 4), 0);
    CHECK_EQ_STR(OUT.data, "kept{" RANK(4) "}");
    /* every truncation of a valid body is refused, nothing written */
    const char *b = "{\"text\": [\"a\\\"b\", \"\xc3\xa9\"], \"data_parallel_rank\": 5, \"t\": true}";
    size_t n = strlen(b);
    for (size_t i = 0; i < n; i++) {
        char *cut = malloc(i ? i : 1);
        memcpy(cut, b, i);
        sglr_buf_reset(&OUT);
        int r = sglr_splice_rank(&OUT, cut, i, 1);
        free(cut);
        CHECK_EQ_INT(r, -EINVAL);
        CHECK_EQ_INT(OUT.len, 0);
    }
}

/* the rank goes on top of a PD splice: each leg's body is the bootstrap
 * splice, then its own rank */
TEST(rank_after_bootstrap)
{
    uint64_t room = 9223372036854775807ull;
    sglr_buf_t pd = { 0 };
    const char *b = "{\"text\":\"hi\",\"data_parallel_rank\":3}";
    CHECK_EQ_INT(sglr_splice_bootstrap(&pd, b, strlen(b), "h", 1, 8998, &room, 1, 0), 0);
    CHECK_EQ_STR(rank(pd.data, 1),
                 "{\"text\":\"hi\"," FIELDS("h", "8998", "9223372036854775807") "," RANK(1) "}");
    sglr_buf_free(&pd);
}

/* ---- rooms -------------------------------------------------------------------- */

/* The decimal writer the rooms, ports and lengths go through, at every
 * digit count, against printf. */
TEST(u64_decimal)
{
    unsigned long long vs[] = { 0, 9, 10, 99, 100, 101, 999, 1000, 65535, 4294967296ull,
                                9007199254740993ull, 9223372036854775807ull,
                                18446744073709551615ull };
    for (size_t i = 0; i < sizeof vs / sizeof vs[0]; i++) {
        char got[32], want[32];
        size_t n = sglr_u64_dec(got, vs[i]);
        got[n] = 0;
        snprintf(want, sizeof want, "%llu", vs[i]);
        CHECK_EQ_STR(got, want);
    }
    unsigned long long v = 1;
    for (int d = 1; d <= 19; d++, v *= 10) {
        char got[32], want[32];
        size_t n = sglr_u64_dec(got, v * 7 + d);
        got[n] = 0;
        snprintf(want, sizeof want, "%llu", v * 7 + d);
        CHECK_EQ_STR(got, want);
    }
}

/* Header names are stored lowercased: every byte value at every place of
 * names long enough to take the eight-byte steps and the tail, whole and
 * split across two field callbacks; only A-Z change. */
TEST(head_names_lowercased)
{
    for (size_t len = 1; len <= 19; len++) {
        for (size_t at = 0; at < len; at++) {
            for (int c = 0; c < 256; c++) {
                char name[24], want[24];
                for (size_t i = 0; i < len; i++)
                    name[i] = (char)('A' + (i * 7 + at) % 26);
                name[at] = (char)c;
                for (size_t i = 0; i < len; i++) {
                    unsigned char b = (unsigned char)name[i];
                    want[i] = (char)(b >= 'A' && b <= 'Z' ? b + 32 : b);
                }
                sglr_head_t h = { 0 };
                size_t cut = (at * 5 + (size_t)c) % (len + 1);
                CHECK(sglr_head_field(&h, name, cut) == 0);
                CHECK(sglr_head_field(&h, name + cut, len - cut) == 0);
                CHECK(sglr_head_field_done(&h) == 0);
                CHECK(sglr_head_value(&h, "v", 1) == 0);
                CHECK_EQ_INT(h.nhdrs, 1);
                CHECK_EQ_INT(h.hdrs[0].name_len, len);
                int same = memcmp(h.buf.data + h.hdrs[0].name_off, want, len) == 0;
                sglr_head_free(&h);
                CHECK(same);
            }
        }
    }
}

TEST(rooms)
{
    enum { N = 4096 };
    static uint64_t seen[N];
    uint64_t max = 0;
    for (int i = 0; i < N; i++) {
        uint64_t r = sglr_splice_room();
        CHECK(r <= UINT64_C(9223372036854775807));
        for (int k = 0; k < i; k++)
            CHECK(seen[k] != r);
        seen[i] = r;
        if (r > max)
            max = r;
    }
    /* the whole range is used: some room of 4096 has bit 62 set */
    CHECK(max >> 62);

    /* a forked child does not repeat its parent's sequence */
    int fd[2];
    CHECK(pipe(fd) == 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        uint64_t r = sglr_splice_room();
        _exit(write(fd[1], &r, sizeof r) == sizeof r ? 0 : 1);
    }
    uint64_t mine = sglr_splice_room(), theirs = 0;
    CHECK(read(fd[0], &theirs, sizeof theirs) == sizeof theirs);
    int status;
    waitpid(pid, &status, 0);
    close(fd[0]);
    close(fd[1]);
    CHECK(mine != theirs);
}

/* ---- logprob merge ------------------------------------------------------------ */

#define PRE "{\"text\": \"\", \"meta_info\": {\"id\": \"p\", \"input_token_logprobs\": " \
            "[[-0.5, 101, null], [-1.25, 2023, null]]}}"

TEST(merge_objects)
{
    CHECK_EQ_STR(merge(PRE, "{\"text\": \"ok\", \"meta_info\": {\"input_token_logprobs\": "
                            "[[-0.75, 7, null]], \"id\": \"d\"}}"),
                 "{\"text\": \"ok\", \"meta_info\": {\"input_token_logprobs\": "
                 "[[-0.5, 101, null], [-1.25, 2023, null],[-0.75, 7, null]], \"id\": \"d\"}}");
    /* the decode side empty */
    CHECK_EQ_STR(merge(PRE, "{\"meta_info\": {\"input_token_logprobs\": []}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [[-0.5, 101, null], [-1.25, 2023, null]]}}");
    CHECK_EQ_STR(merge(PRE, "{\"meta_info\":{\"input_token_logprobs\":[ \n ]}}"),
                 "{\"meta_info\":{\"input_token_logprobs\":[[-0.5, 101, null], [-1.25, 2023, null] \n ]}}");
    /* the prefill side empty, or both */
    const char *d = "{\"meta_info\": {\"input_token_logprobs\": [[-0.75, 7, null]]}}";
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": [ ]}}", d), d);
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": []}}",
                       "{\"meta_info\": {\"input_token_logprobs\": []}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": []}}");
    /* items of any kind are copied as written */
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": [ 18446744073709551617 , {} ,[]]}}",
                       "{\"meta_info\": {\"input_token_logprobs\": [1e400]}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [18446744073709551617 , {} ,[],1e400]}}");
}

TEST(merge_without_the_key)
{
    const char *d = "{\"text\": \"ok\", \"meta_info\": {\"input_token_logprobs\": [[-0.75, 7, null]]}}";
    const char *none[] = {
        "{\"text\": \"\"}",
        "{\"meta_info\": {}}",
        "{\"meta_info\": null}",
        "{\"meta_info\": {\"input_token_logprobs\": null}}",
        "{\"meta_info\": {\"output_token_logprobs\": [[1, 2, null]]}}",
        "{\"input_token_logprobs\": [[1, 2, null]]}",
        "{\"x\": {\"meta_info\": {\"input_token_logprobs\": [[1, 2, null]]}}}",
        "[]", "5", "\"s\"", "null",
    };
    for (size_t i = 0; i < sizeof none / sizeof *none; i++) {
        CHECK_EQ_STR(merge(none[i], d), d);         /* prefill lacks it */
        CHECK_EQ_STR(merge(PRE, none[i]), none[i]); /* decode lacks it */
    }
}

TEST(merge_keys_in_strings_and_duplicates)
{
    /* a key name inside a string is text */
    const char *d = "{\"text\": \"\\\"meta_info\\\": {\\\"input_token_logprobs\\\": [\", "
                    "\"meta_info\": {\"input_token_logprobs\": [3]}}";
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": [1, 2]}}", d),
                 "{\"text\": \"\\\"meta_info\\\": {\\\"input_token_logprobs\\\": [\", "
                 "\"meta_info\": {\"input_token_logprobs\": [1, 2,3]}}");
    /* the last duplicate is the one the client reads, on either side */
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": [0], \"input_token_logprobs\": [1]}}",
                       "{\"meta_info\": {\"input_token_logprobs\": [8]}, "
                       "\"meta_info\": {\"input_token_logprobs\": [9]}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [8]}, "
                 "\"meta_info\": {\"input_token_logprobs\": [1,9]}}");
    CHECK_EQ_STR(merge("{\"meta_info\": {\"input_token_logprobs\": [1]}}",
                       "{\"meta_info\": {\"input_token_logprobs\": [8]}, \"meta_info\": {}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [8]}, \"meta_info\": {}}");
    /* escaped key spellings */
    CHECK_EQ_STR(merge("{\"meta\\u005finfo\": {\"input_token_logprobs\": [1]}}",
                       "{\"meta_info\": {\"input_token\\u005flogprobs\": [2]}}"),
                 "{\"meta_info\": {\"input_token\\u005flogprobs\": [1,2]}}");
}

TEST(merge_batches)
{
    const char *pre = "[{\"meta_info\": {\"input_token_logprobs\": [\"a0\"]}},"
                      " {\"meta_info\": {\"input_token_logprobs\": [\"a1\", \"b1\"]}},"
                      " {\"meta_info\": {\"input_token_logprobs\": [\"a2\"]}}]";
    CHECK_EQ_STR(merge(pre, "[{\"meta_info\": {\"input_token_logprobs\": [\"d0\"]}},"
                            " {\"meta_info\": {\"input_token_logprobs\": []}},"
                            " {\"meta_info\": {\"input_token_logprobs\": [\"d2\"]}}]"),
                 "[{\"meta_info\": {\"input_token_logprobs\": [\"a0\",\"d0\"]}},"
                 " {\"meta_info\": {\"input_token_logprobs\": [\"a1\", \"b1\"]}},"
                 " {\"meta_info\": {\"input_token_logprobs\": [\"a2\",\"d2\"]}}]");
    /* an element without the key is left, the next still pairs by position */
    CHECK_EQ_STR(merge(pre, "[{\"meta_info\": {}}, 5, {\"meta_info\": {\"input_token_logprobs\": [\"d2\"]}}]"),
                 "[{\"meta_info\": {}}, 5, {\"meta_info\": {\"input_token_logprobs\": [\"a2\",\"d2\"]}}]");
    /* decode longer than prefill */
    CHECK_EQ_STR(merge("[{\"meta_info\": {\"input_token_logprobs\": [\"a0\"]}}]",
                       "[{\"meta_info\": {\"input_token_logprobs\": [\"d0\"]}},"
                       "{\"meta_info\": {\"input_token_logprobs\": [\"d1\"]}}]"),
                 "[{\"meta_info\": {\"input_token_logprobs\": [\"a0\",\"d0\"]}},"
                 "{\"meta_info\": {\"input_token_logprobs\": [\"d1\"]}}]");
    /* a lone response pairs with prefill element "index" (0 without one) */
    CHECK_EQ_STR(merge(pre, "{\"index\": 1, \"meta_info\": {\"input_token_logprobs\": [\"d\"]}}"),
                 "{\"index\": 1, \"meta_info\": {\"input_token_logprobs\": [\"a1\", \"b1\",\"d\"]}}");
    CHECK_EQ_STR(merge(pre, "{\"meta_info\": {\"input_token_logprobs\": [\"d\"]}, \"index\": 2}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [\"a2\",\"d\"]}, \"index\": 2}");
    CHECK_EQ_STR(merge(pre, "{\"meta_info\": {\"input_token_logprobs\": [\"d\"]}}"),
                 "{\"meta_info\": {\"input_token_logprobs\": [\"a0\",\"d\"]}}");
    CHECK_EQ_STR(merge(pre, "{\"index\": 3, \"meta_info\": {\"input_token_logprobs\": [\"d\"]}}"),
                 "{\"index\": 3, \"meta_info\": {\"input_token_logprobs\": [\"d\"]}}");
    /* a batch against one prefill response has no pairs */
    CHECK_EQ_STR(merge(PRE, "[{\"meta_info\": {\"input_token_logprobs\": [\"d\"]}}]"),
                 "[{\"meta_info\": {\"input_token_logprobs\": [\"d\"]}}]");
}

TEST(merge_refuses_invalid_json)
{
    const char *d = "{\"meta_info\": {\"input_token_logprobs\": [1]}}";
    sglr_buf_reset(&OUT);
    sglr_buf_append(&OUT, "kept", 4);
    static const char *const bad[] = {
        "", "{", "{\"meta_info\": {\"input_token_logprobs\": [1,]}}", "[{}, ]", "{} {}", "tru",
        "{\"meta_info\": {\"input_token_logprobs\": [1]}}x", "[{\"meta_info\": {}}, {\"a\" 1}]",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, PRE, strlen(PRE), bad[i], strlen(bad[i])), -EINVAL);
        CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, bad[i], strlen(bad[i]), d, strlen(d)), -EINVAL);
        CHECK_EQ_INT(OUT.len, 4);
    }
    /* the rest of a prefill batch is checked even when decode needs none of it */
    const char *pre = "[{\"meta_info\": {\"input_token_logprobs\": [1]}}, {]";
    CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, pre, strlen(pre), d, strlen(d)), -EINVAL);
    CHECK_EQ_INT(OUT.len, 4);
}

/* ---- the stream transformer ------------------------------------------------- */

#define EV(json) "data: " json "\n\n"

static const char STREAM[] =
    EV("{\"text\": \"a\", \"meta_info\": {\"id\": \"x\", \"input_token_logprobs\": [[-0.75, 7, null]]}}")
    ": keep-alive comment\n\n"
    EV("{\"text\": \"ab\", \"meta_info\": {\"id\": \"x\"}}")
    "data: {\"text\": \"abc\", \"meta_info\": {\"input_token_logprobs\": []}}\r\n\r\n"
    EV("not json {")
    EV("[DONE]");

static const char MERGED[] =
    EV("{\"text\": \"a\", \"meta_info\": {\"id\": \"x\", \"input_token_logprobs\": "
       "[[-0.5, 101, null], [-1.25, 2023, null],[-0.75, 7, null]]}}")
    ": keep-alive comment\n\n"
    EV("{\"text\": \"ab\", \"meta_info\": {\"id\": \"x\"}}")
    "data: {\"text\": \"abc\", \"meta_info\": {\"input_token_logprobs\": "
    "[[-0.5, 101, null], [-1.25, 2023, null]]}}\r\n\r\n"
    EV("not json {")
    EV("[DONE]");

/* Run a stream through a transformer in pieces cut at the given offsets
 * (sorted, ending with n), then close. */
static int run_stream(sglr_splice_sse_t *s, sglr_buf_t *out, const char *p, size_t n,
                      const size_t *cuts, size_t ncuts)
{
    size_t at = 0;
    for (size_t i = 0; i < ncuts; i++) {
        /* each piece in its own exact-size block, so ASan sees overreads */
        size_t len = cuts[i] - at;
        char *piece = malloc(len ? len : 1);
        memcpy(piece, p + at, len);
        int r = sglr_splice_sse_feed(s, out, piece, len);
        free(piece);
        if (r < 0)
            return r;
        at = cuts[i];
    }
    return sglr_splice_sse_close(s, out);
}

static int stream_equals(const char *prefill, const char *in, size_t n, const char *want,
                         const size_t *cuts, size_t ncuts)
{
    sglr_splice_sse_t s;
    sglr_buf_t out = { 0 };
    int ok = sglr_splice_sse_init(&s, prefill, prefill ? strlen(prefill) : 0) == 0 &&
             run_stream(&s, &out, in, n, cuts, ncuts) == 0 &&
             out.len == strlen(want) && memcmp(out.data ? out.data : "", want, out.len) == 0;
    if (!ok)
        fprintf(stderr, "got: %.*s\n", (int)out.len, out.data ? out.data : "");
    sglr_buf_free(&out);
    return ok;
}

TEST(sse_merges_events)
{
    size_t n = strlen(STREAM), cut[1] = { n };
    CHECK(stream_equals(PRE, STREAM, n, MERGED, cut, 1));
    /* each merged event is what the one-shot merge gives */
    const char *ev = "{\"text\": \"a\", \"meta_info\": {\"id\": \"x\", \"input_token_logprobs\": [[-0.75, 7, null]]}}";
    CHECK(strstr(MERGED, merge(PRE, ev)) != NULL);
}

TEST(sse_every_split)
{
    size_t n = strlen(STREAM);
    for (size_t i = 0; i <= n; i++) {
        size_t cuts[2] = { i, n };
        CHECK(stream_equals(PRE, STREAM, n, MERGED, cuts, 2));
    }
    /* byte by byte, and in threes */
    static size_t cuts[sizeof STREAM];
    for (size_t i = 0; i < n; i++)
        cuts[i] = i + 1;
    CHECK(stream_equals(PRE, STREAM, n, MERGED, cuts, n));
    size_t m = 0;
    for (size_t i = 3; i < n; i += 3)
        cuts[m++] = i;
    cuts[m++] = n;
    CHECK(stream_equals(PRE, STREAM, n, MERGED, cuts, m));
}

TEST(sse_passes_through)
{
    size_t n = strlen(STREAM), cut[1] = { n };
    /* no prefill, or one without the key: bytes out equal bytes in */
    CHECK(stream_equals(NULL, STREAM, n, STREAM, cut, 1));
    CHECK(stream_equals("{\"meta_info\": {}}", STREAM, n, STREAM, cut, 1));
    CHECK(stream_equals("{\"meta_info\": {\"input_token_logprobs\": []}}", STREAM, n, STREAM, cut, 1));
    /* a held tail is flushed unchanged at close */
    const char *tail = "data: {\"meta_info\": {\"input_token_logprobs\": [1]}}\n";
    size_t tn = strlen(tail), tcut[1] = { tn };
    CHECK(stream_equals(PRE, tail, tn, tail, tcut, 1));
    /* lines ending in a bare CR are not blank lines */
    const char *cr = "data: {}\r\rdata: {}\n\n";
    size_t cn = strlen(cr), ccut[1] = { cn };
    CHECK(stream_equals(PRE, cr, cn, cr, ccut, 1));
    /* two data lines make one payload: not ours to merge */
    const char *two = "data: {\"meta_info\":\ndata: {\"input_token_logprobs\": [1]}}\n\n";
    size_t wn = strlen(two), wcut[1] = { wn };
    CHECK(stream_equals(PRE, two, wn, two, wcut, 1));
    /* an event field before the data line is kept */
    const char *named = "event: x\r\nid: 1\r\ndata:{\"meta_info\":{\"input_token_logprobs\":[9]}}\r\n\r\n";
    const char *want = "event: x\r\nid: 1\r\ndata:{\"meta_info\":{\"input_token_logprobs\":"
                       "[[-0.5, 101, null], [-1.25, 2023, null],9]}}\r\n\r\n";
    size_t nn = strlen(named), ncut[1] = { nn };
    CHECK(stream_equals(PRE, named, nn, want, ncut, 1));
    /* mixed line ends still close an event */
    const char *mixed = "data: {\"meta_info\":{\"input_token_logprobs\":[9]}}\r\n\n";
    const char *mwant = "data: {\"meta_info\":{\"input_token_logprobs\":"
                        "[[-0.5, 101, null], [-1.25, 2023, null],9]}}\r\n\n";
    size_t mn = strlen(mixed), mcut[1] = { mn };
    CHECK(stream_equals(PRE, mixed, mn, mwant, mcut, 1));
}

TEST(sse_batch_by_index)
{
    const char *pre = "[{\"meta_info\": {\"input_token_logprobs\": [\"a0\"]}},"
                      " {\"meta_info\": {\"input_token_logprobs\": [\"a1\"]}}]";
    const char *in =
        EV("{\"index\": 1, \"meta_info\": {\"input_token_logprobs\": [\"d1\"]}}")
        EV("{\"index\": 0, \"meta_info\": {\"input_token_logprobs\": [\"d0\"]}}")
        EV("{\"index\": 5, \"meta_info\": {\"input_token_logprobs\": [\"d5\"]}}")
        EV("{\"meta_info\": {\"input_token_logprobs\": [\"d\"]}}")
        EV("[DONE]");
    const char *want =
        EV("{\"index\": 1, \"meta_info\": {\"input_token_logprobs\": [\"a1\",\"d1\"]}}")
        EV("{\"index\": 0, \"meta_info\": {\"input_token_logprobs\": [\"a0\",\"d0\"]}}")
        EV("{\"index\": 5, \"meta_info\": {\"input_token_logprobs\": [\"d5\"]}}")
        EV("{\"meta_info\": {\"input_token_logprobs\": [\"a0\",\"d\"]}}")
        EV("[DONE]");
    size_t n = strlen(in);
    for (size_t i = 0; i <= n; i++) {
        size_t cuts[2] = { i, n };
        CHECK(stream_equals(pre, in, n, want, cuts, 2));
    }
}

TEST(sse_prefill_later_or_invalid)
{
    sglr_splice_sse_t s;
    sglr_buf_t out = { 0 };
    const char *ev = EV("{\"meta_info\": {\"input_token_logprobs\": [9]}}");
    s.data = &out;
    CHECK_EQ_INT(sglr_splice_sse_init(&s, NULL, 0), 0);
    CHECK(s.data == &out);
    CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, ev, strlen(ev)), 0);
    CHECK_EQ_INT(out.len, strlen(ev));          /* before a prefill: unchanged */
    const char *pre1 = "{\"meta_info\": {\"input_token_logprobs\": [1]}}";
    CHECK_EQ_INT(sglr_splice_sse_set_prefill(&s, pre1, strlen(pre1)), 0);
    sglr_buf_reset(&out);
    CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, ev, strlen(ev)), 0);
    CHECK_EQ_STR(out.data, EV("{\"meta_info\": {\"input_token_logprobs\": [1,9]}}"));
    /* an invalid prefill: refused, and events pass unchanged */
    CHECK_EQ_INT(sglr_splice_sse_set_prefill(&s, "{\"meta_info\": ", 14), -EINVAL);
    sglr_buf_reset(&out);
    CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, ev, strlen(ev)), 0);
    CHECK_EQ_STR(out.data, ev);
    CHECK_EQ_INT(sglr_splice_sse_close(&s, &out), 0);
    CHECK_EQ_INT(sglr_splice_sse_close(&s, NULL), 0);   /* safe twice */
    /* the prefill body need not outlive the call */
    char *pre = strdup("{\"meta_info\": {\"input_token_logprobs\": [2]}}");
    CHECK_EQ_INT(sglr_splice_sse_init(&s, pre, strlen(pre)), 0);
    free(pre);
    sglr_buf_reset(&out);
    CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, ev, strlen(ev)), 0);
    CHECK_EQ_STR(out.data, EV("{\"meta_info\": {\"input_token_logprobs\": [2,9]}}"));
    sglr_splice_sse_close(&s, NULL);
    sglr_buf_free(&out);
}

TEST(sse_huge_event_passes_through)
{
    /* an event past the hold limit is streamed on unchanged, and the next
     * one is merged again */
    size_t big = (66u << 20) + 100;
    char *p = malloc(big + 256);
    CHECK(p != NULL);
    size_t n = (size_t)sprintf(p, "data: {\"meta_info\": {\"input_token_logprobs\": [\"");
    memset(p + n, 'x', big);
    n += big;
    n += (size_t)sprintf(p + n, "\"]}}\n\n" EV("{\"meta_info\": {\"input_token_logprobs\": [9]}}"));
    sglr_splice_sse_t s;
    sglr_buf_t out = { 0 };
    const char *pre1 = "{\"meta_info\": {\"input_token_logprobs\": [1]}}";
    CHECK_EQ_INT(sglr_splice_sse_init(&s, pre1, strlen(pre1)), 0);
    for (size_t at = 0; at < n; at += 1 << 20) {
        size_t len = n - at < (1 << 20) ? n - at : 1 << 20;
        CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, p + at, len), 0);
    }
    CHECK_EQ_INT(sglr_splice_sse_close(&s, &out), 0);
    const char *last = EV("{\"meta_info\": {\"input_token_logprobs\": [1,9]}}");
    CHECK_EQ_INT(out.len, n + 2);
    CHECK(memcmp(out.data, p, n - strlen(last) + 2) == 0);
    CHECK(memcmp(out.data + out.len - strlen(last), last, strlen(last)) == 0);
    free(p);
    sglr_buf_free(&out);
}

/* ---- hostile input ------------------------------------------------------------ */

TEST(deep_nesting_is_refused)
{
    size_t n = 200000;
    char *deep = malloc(n);
    uint64_t room = 1;
    memset(deep, '[', n);
    memcpy(deep, "{\"a\":", 5);
    sglr_buf_reset(&OUT);
    CHECK_EQ_INT(sglr_splice_batch(GEN, deep, n), -EINVAL);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, deep, n, "h", 1, 1, &room, 1, 0), -EINVAL);
    CHECK_EQ_INT(sglr_splice_rank(&OUT, deep, n, 1), -EINVAL);
    CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, deep, n, PRE, strlen(PRE)), -EINVAL);
    CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, PRE, strlen(PRE), deep + 5, n - 5), -EINVAL);
    memcpy(deep, "{\"meta_info\":{\"input_token_logprobs\":", 37);
    CHECK_EQ_INT(sglr_splice_merge_logprobs(&OUT, PRE, strlen(PRE), deep, n), -EINVAL);
    CHECK_EQ_INT(OUT.len, 0);
    /* 500 levels are fine */
    size_t m = 0;
    m += (size_t)sprintf(deep, "{\"a\":");
    for (int i = 0; i < 500; i++)
        deep[m++] = '[';
    for (int i = 0; i < 500; i++)
        deep[m++] = ']';
    deep[m++] = '}';
    CHECK_EQ_INT(sglr_splice_batch(GEN, deep, m), 0);
    CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, deep, m, "h", 1, 1, &room, 1, 0), 0);
    free(deep);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng >> 11) % n;
}

static const char *const SEEDS[] = {
    "{\"text\": [\"a\", \"b\"], \"bootstrap_room\": 5, \"sampling_params\": {\"bootstrap_host\": \"x\"}}",
    "{\"input_ids\": [[1, 2], [3]], \"stream\": true}",
    "{\"prompt\": [[1], [2, 3]], \"n\": 2, \"model\": \"m\\u00e9\"}",
    "{\"messages\": [{\"role\": \"user\", \"content\": \"\\\"bootstrap_room\\\": 5\"}], \"n\": 3}",
    "{}",
    "{\"meta_info\": {\"input_token_logprobs\": [[-0.5, 1, null], [-1, 2, \"t\"]]}, \"index\": 1}",
    "[{\"meta_info\": {\"input_token_logprobs\": [1]}}, {\"meta_info\": {\"input_token_logprobs\": []}}]",
    PRE,
};

/* A seed, or a mutation of it: bytes flipped, JSON punctuation inserted, spans
 * deleted or repeated, truncation. */
static size_t mutate(char *dst, size_t cap, const char *src)
{
    static const char punct[] = "{}[],:\"\\ \n0-.eEtfnu\xc3\xa9\xff";
    size_t n = strlen(src);
    memcpy(dst, src, n);
    int edits = (int)rnd(3);
    for (int e = 0; e < edits; e++) {
        size_t at = n ? rnd((uint32_t)n) : 0;
        switch (rnd(9)) {
        case 0:
            if (n)
                dst[at] = (char)rnd(256);
            break;
        case 1:
            if (n + 1 < cap) {
                memmove(dst + at + 1, dst + at, n - at);
                dst[at] = punct[rnd(sizeof punct - 1)];
                n++;
            }
            break;
        case 2: {
            size_t len = rnd(8);
            if (at + len <= n) {
                memmove(dst + at, dst + at + len, n - at - len);
                n -= len;
            }
            break;
        }
        case 3: case 4: case 5: case 6: case 7: {
            size_t len = rnd(16);
            if (at + len <= n && n + len < cap) {
                memmove(dst + at + len, dst + at, n - at);
                n += len;
            }
            break;
        }
        default:
            n = at;
            break;
        }
    }
    return n;
}

TEST(fuzz_mutated_bodies)
{
    static char tmp[4096];
    uint64_t rooms[64] = { 0 };
    for (int iter = 0; iter < 30000; iter++) {
        const char *seed = SEEDS[rnd(sizeof SEEDS / sizeof *SEEDS)];
        size_t n = mutate(tmp, sizeof tmp, seed);
        char *body = malloc(n ? n : 1);
        memcpy(body, tmp, n);
        for (int route = 0; route < 3; route++) {
            int b = sglr_splice_batch(route, body, n);
            CHECK(b >= 0 || b == -EINVAL || b == -E2BIG);
            if (b > 64)
                continue;
            sglr_buf_reset(&OUT);
            int r = sglr_splice_bootstrap(&OUT, body, n, "[::1]", 5, 8998, rooms,
                                          b > 0 ? (size_t)b : 1, b > 0 ? b : 0);
            if (b >= 0) {
                /* whatever the batch reader took, the splicer takes too */
                CHECK_EQ_INT(r, 0);
                CHECK(valid_json(OUT.data, OUT.len));
                CHECK_EQ_INT(top_count(OUT.data, OUT.len, "bootstrap_room"), 1);
                CHECK_EQ_INT(top_count(OUT.data, OUT.len, "bootstrap_host"), 1);
                CHECK_EQ_INT(top_count(OUT.data, OUT.len, "bootstrap_port"), 1);
            } else if (r == 0) {
                CHECK(valid_json(OUT.data, OUT.len));
            } else {
                CHECK_EQ_INT(OUT.len, 0);
            }
        }
        /* the rank splice takes what the bootstrap splice takes */
        sglr_buf_reset(&OUT);
        int rr = sglr_splice_rank(&OUT, body, n, 3);
        if (rr == 0) {
            CHECK(valid_json(OUT.data, OUT.len));
            CHECK_EQ_INT(top_count(OUT.data, OUT.len, "data_parallel_rank"), 1);
        } else {
            CHECK_EQ_INT(rr, -EINVAL);
            CHECK_EQ_INT(OUT.len, 0);
        }
        sglr_buf_reset(&OUT);
        CHECK_EQ_INT(sglr_splice_bootstrap(&OUT, body, n, "h", 1, 1, rooms, 1, 0), rr);
        /* merge, both ways round and with itself */
        const char *other = SEEDS[rnd(sizeof SEEDS / sizeof *SEEDS)];
        sglr_buf_reset(&OUT);
        if (sglr_splice_merge_logprobs(&OUT, other, strlen(other), body, n) == 0)
            CHECK(valid_json(OUT.data, OUT.len));
        else
            CHECK_EQ_INT(OUT.len, 0);
        sglr_buf_reset(&OUT);
        if (sglr_splice_merge_logprobs(&OUT, body, n, other, strlen(other)) == 0)
            CHECK(valid_json(OUT.data, OUT.len));
        sglr_buf_reset(&OUT);
        if (sglr_splice_merge_logprobs(&OUT, body, n, body, n) == 0)
            CHECK(valid_json(OUT.data, OUT.len));
        /* as an SSE stream against a prefill, fed in random pieces */
        sglr_splice_sse_t s;
        sglr_buf_t out = { 0 };
        char *stream = malloc(n + 16);
        memcpy(stream, "data: ", 6);
        memcpy(stream + 6, body, n);
        size_t sn = 6 + n;
        if (rnd(2)) {
            memcpy(stream + sn, "\n\n", 2);
            sn += 2;
        }
        int own = rnd(2);
        sglr_splice_sse_init(&s, own ? body : other, own ? n : strlen(other));
        size_t at = 0;
        while (at < sn) {
            size_t len = 1 + rnd(12);
            if (len > sn - at)
                len = sn - at;
            CHECK_EQ_INT(sglr_splice_sse_feed(&s, &out, stream + at, len), 0);
            at += len;
        }
        CHECK_EQ_INT(sglr_splice_sse_close(&s, &out), 0);
        /* a merge only inserts: same length means same bytes */
        CHECK(out.len >= sn);
        CHECK(out.len > sn || memcmp(out.data, stream, sn) == 0);
        free(stream);
        sglr_buf_free(&out);
        free(body);
    }
}

TEST(fuzz_streams_without_the_key_are_unchanged)
{
    /* random SSE-ish byte soup: with no logprobs key anywhere, the output
     * is the input, however it is cut */
    static const char *const parts[] = {
        "data: ", "{\"text\": \"a\"}", "\n", "\r\n", "\r", "[DONE]", ": c", "data:",
        "{\"meta_info\": {\"id\": 1}}", "[1, 2]", "x", "{", "}",
    };
    static char in[2048];
    for (int iter = 0; iter < 3000; iter++) {
        size_t n = 0;
        while (n < 1500) {
            const char *p = parts[rnd(sizeof parts / sizeof *parts)];
            memcpy(in + n, p, strlen(p));
            n += strlen(p);
        }
        size_t cuts[64], m = 0, at = 0;
        while (m < 63 && at < n) {
            at += 1 + rnd(100);
            if (at > n)
                at = n;
            cuts[m++] = at;
        }
        if (at < n)
            cuts[m++] = n;
        in[n] = 0;
        CHECK(stream_equals(PRE, in, n, in, cuts, m));
    }
}

int main(void)
{
    RUN(batch_generate);
    RUN(request_tells_logprobs);
    RUN(sse_last_finds_the_last_json_event);
    RUN(batch_completions);
    RUN(batch_chat);
    RUN(batch_refuses_non_objects);
    RUN(bootstrap_single);
    RUN(bootstrap_empty_objects);
    RUN(bootstrap_append_matches_the_rewrite);
    RUN(bootstrap_replaces_client_fields);
    RUN(bootstrap_leaves_nested_and_quoted_keys);
    RUN(bootstrap_rooms_are_exact);
    RUN(bootstrap_hosts_and_ports);
    RUN(bootstrap_batches);
    RUN(bootstrap_refuses_and_keeps_out);
    RUN(bootstrap_every_truncation_is_refused);
    RUN(rank_added);
    RUN(rank_replaces_the_clients);
    RUN(rank_refuses_and_keeps_out);
    RUN(rank_after_bootstrap);
    RUN(u64_decimal);
    RUN(head_names_lowercased);
    RUN(rooms);
    RUN(merge_objects);
    RUN(merge_without_the_key);
    RUN(merge_keys_in_strings_and_duplicates);
    RUN(merge_batches);
    RUN(merge_refuses_invalid_json);
    RUN(sse_merges_events);
    RUN(sse_every_split);
    RUN(sse_passes_through);
    RUN(sse_batch_by_index);
    RUN(sse_prefill_later_or_invalid);
    RUN(sse_huge_event_passes_through);
    RUN(deep_nesting_is_refused);
    RUN(fuzz_mutated_bodies);
    RUN(fuzz_streams_without_the_key_are_unchanged);
    sglr_buf_free(&OUT);
    TEST_EXIT();
}
