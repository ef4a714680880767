/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_OUTQ_H
#define SMTP_LOAD_OUTQ_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/uio.h>

/*
 * The bytes a session has to send, as references to text that lives for
 * the whole run (the commands and the message are built once, before the
 * run): queuing a 25 MiB message costs one pointer, and a pipelined batch
 * goes out in one sendmsg().
 */

/* The most a session queues at once: body, RSET, MAIL, RCPTs, DATA (or QUIT). */
#define OUTQ_SEGS 8

struct outq {
	struct iovec seg[OUTQ_SEGS];
	unsigned head, tail;            /* unsent segments are [head, tail) */
};

void outq_reset(struct outq *);
/* Returns false (and queues nothing) when all OUTQ_SEGS are in use. */
bool outq_add(struct outq *, const void *data, size_t len);
bool outq_empty(const struct outq *);
size_t outq_pending(const struct outq *);
/* The unsent segments, for sendmsg()/writev(). */
struct iovec *outq_iov(struct outq *, int *n);
/* Marks n bytes sent. */
void outq_consume(struct outq *, size_t n);

#endif
