/* logbuf.h: log lines formatted natively, written once per loop turn
 * (logbuf.c). */
#ifndef SGLR_LOGBUF_H
#define SGLR_LOGBUF_H

#include <stddef.h>

/* Append n bytes to the lines written before the loop next polls (or at
 * once past a high-water mark). -> 0 | -ENOMEM */
int sglr_logbuf_write(const char *s, size_t n);
/* Write what is queued now (before another writer uses stderr). */
void sglr_logbuf_flush(void);
/* Flush and close the prepare handle (shutdown). */
void sglr_logbuf_close(void);

/* One text line, built in place at the end of the queue: begin (the
 * timestamp, level and message), fields, end (the newline; -> the line,
 * valid until the next call here, or NULL when out of memory), then commit
 * (keep: queue it for stderr; else drop it). Keys come in the caller's
 * order. */
size_t sglr_logline_begin(double wall, const char *level, const char *msg, size_t ml);
void sglr_logline_str(const char *k, size_t kl, const char *v, size_t vl);
void sglr_logline_num(const char *k, size_t kl, double v);
const char *sglr_logline_end(size_t start, size_t *n);
void sglr_logline_commit(size_t start, int keep);

#endif
