/* SPDX-License-Identifier: MIT */
#include <stdint.h>

#include "outq.h"

void
outq_reset(struct outq *q)
{
	q->head = q->tail = 0;
}

bool
outq_add(struct outq *q, const void *data, size_t len)
{
	if (len == 0)
		return true;
	if (q->tail == OUTQ_SEGS) {
		if (q->head == 0)
			return false;
		/* Slide the unsent segments to the front. */
		for (unsigned i = q->head; i < q->tail; i++)
			q->seg[i - q->head] = q->seg[i];
		q->tail -= q->head;
		q->head = 0;
	}
	q->seg[q->tail].iov_base = (void *)(uintptr_t)data;
	q->seg[q->tail].iov_len = len;
	q->tail++;
	return true;
}

bool
outq_empty(const struct outq *q)
{
	return q->head == q->tail;
}

size_t
outq_pending(const struct outq *q)
{
	size_t n = 0;

	for (unsigned i = q->head; i < q->tail; i++)
		n += q->seg[i].iov_len;
	return n;
}

struct iovec *
outq_iov(struct outq *q, int *n)
{
	*n = (int)(q->tail - q->head);
	return &q->seg[q->head];
}

void
outq_consume(struct outq *q, size_t n)
{
	while (n > 0 && q->head < q->tail) {
		struct iovec *s = &q->seg[q->head];

		if (n < s->iov_len) {
			s->iov_base = (char *)s->iov_base + n;
			s->iov_len -= n;
			return;
		}
		n -= s->iov_len;
		q->head++;
	}
	if (q->head == q->tail)
		q->head = q->tail = 0;
}
