/*
 * test.h: the smallest unit-test harness that does the job. Each
 * core/test/test_X.c lists its cases with TEST() and runs them from main()
 * with RUN(); a failed CHECK prints file:line and the run exits non-zero.
 */
#ifndef SGLR_TEST_H
#define SGLR_TEST_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int test_failures;
static int test_count;

#define CHECK(cond) do { if (!(cond)) { \
    fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    test_failures++; return; } } while (0)
#define CHECK_EQ_INT(a, b) do { long long _a = (long long)(a), _b = (long long)(b); if (_a != _b) { \
    fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, _a, _b); \
    test_failures++; return; } } while (0)
#define CHECK_EQ_STR(a, b) do { const char *_a = (a), *_b = (b); \
    if (!_a || !_b || strcmp(_a, _b) != 0) { \
    fprintf(stderr, "%s:%d: %s == \"%s\", expected \"%s\"\n", __FILE__, __LINE__, #a, \
            _a ? _a : "(null)", _b ? _b : "(null)"); test_failures++; return; } } while (0)

#define TEST(name) static void test_##name(void)
#define RUN(name) do { int _f = test_failures; test_count++; test_##name(); \
    fprintf(stderr, "%s %s\n", _f == test_failures ? "ok  " : "FAIL", #name); } while (0)
#define TEST_EXIT() do { \
    fprintf(stderr, "%d passed, %d failed\n", test_count - test_failures, test_failures); \
    return test_failures ? 1 : 0; } while (0)

#endif
