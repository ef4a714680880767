/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runner_index.h"

#define INITIAL_BUCKETS 256

static size_t
hash_id(const char *id, size_t n_buckets)
{
	uint64_t h = 1469598103934665603ULL;   /* FNV-1a */

	for (; *id != '\0'; id++)
		h = (h ^ (unsigned char)*id) * 1099511628211ULL;
	return (size_t)(h % n_buckets);
}

void
qindex_init(struct qindex *qi)
{
	memset(qi, 0, sizeof(*qi));
}

void
qindex_free(struct qindex *qi)
{
	for (size_t b = 0; b < qi->n_buckets; b++) {
		struct qentry *e = qi->buckets[b], *next;

		for (; e != NULL; e = next) {
			next = e->hnext;
			free(e);
		}
	}
	free(qi->buckets);
	free(qi->heap);
	memset(qi, 0, sizeof(*qi));
}

struct qentry *
qindex_find(const struct qindex *qi, const char *id)
{
	if (qi->n_buckets == 0)
		return NULL;
	for (struct qentry *e = qi->buckets[hash_id(id, qi->n_buckets)]; e != NULL; e = e->hnext)
		if (strcmp(e->id, id) == 0)
			return e;
	return NULL;
}

/* Doubles the table once it holds as many entries as buckets. */
static int
grow_buckets(struct qindex *qi)
{
	size_t n = qi->n_buckets ? qi->n_buckets * 2 : INITIAL_BUCKETS;
	struct qentry **b = calloc(n, sizeof(*b));

	if (b == NULL)
		return -1;
	for (size_t i = 0; i < qi->n_buckets; i++) {
		struct qentry *e = qi->buckets[i], *next;

		for (; e != NULL; e = next) {
			size_t h = hash_id(e->id, n);

			next = e->hnext;
			e->hnext = b[h];
			b[h] = e;
		}
	}
	free(qi->buckets);
	qi->buckets = b;
	qi->n_buckets = n;
	return 0;
}

struct qentry *
qindex_add(struct qindex *qi, const char *id, int64_t arrived, uint64_t bytes)
{
	struct qentry *e;
	size_t h;

	if (qindex_find(qi, id) != NULL)
		return NULL;
	if (qi->count >= qi->n_buckets && grow_buckets(qi) < 0)
		return NULL;
	if ((e = calloc(1, sizeof(*e))) == NULL)
		return NULL;
	snprintf(e->id, sizeof(e->id), "%s", id);
	e->arrived = arrived;
	e->bytes = bytes;
	e->seq = qi->seq++;
	e->heap_pos = SIZE_MAX;
	h = hash_id(id, qi->n_buckets);
	e->hnext = qi->buckets[h];
	qi->buckets[h] = e;
	qi->count++;
	qi->bytes += bytes;
	return e;
}

void
qindex_remove(struct qindex *qi, struct qentry *e)
{
	struct qentry **pp;

	qindex_unschedule(qi, e);
	for (pp = &qi->buckets[hash_id(e->id, qi->n_buckets)]; *pp != NULL; pp = &(*pp)->hnext) {
		if (*pp == e) {
			*pp = e->hnext;
			break;
		}
	}
	qi->count--;
	qi->bytes -= e->bytes;
	free(e);
}

/* --- the heap */

static bool
before(const struct qentry *a, const struct qentry *b)
{
	if (a->next != b->next)
		return a->next < b->next;
	if (a->arrived != b->arrived)
		return a->arrived < b->arrived;
	return a->seq < b->seq;
}

static void
heap_set(struct qindex *qi, size_t pos, struct qentry *e)
{
	qi->heap[pos] = e;
	e->heap_pos = pos;
}

static void
sift_up(struct qindex *qi, size_t pos)
{
	struct qentry *e = qi->heap[pos];

	while (pos > 0 && before(e, qi->heap[(pos - 1) / 2])) {
		heap_set(qi, pos, qi->heap[(pos - 1) / 2]);
		pos = (pos - 1) / 2;
	}
	heap_set(qi, pos, e);
}

static void
sift_down(struct qindex *qi, size_t pos)
{
	struct qentry *e = qi->heap[pos];

	for (;;) {
		size_t c = 2 * pos + 1;

		if (c >= qi->heap_len)
			break;
		if (c + 1 < qi->heap_len && before(qi->heap[c + 1], qi->heap[c]))
			c++;
		if (!before(qi->heap[c], e))
			break;
		heap_set(qi, pos, qi->heap[c]);
		pos = c;
	}
	heap_set(qi, pos, e);
}

int
qindex_schedule(struct qindex *qi, struct qentry *e, int64_t next)
{
	if (e->heap_pos != SIZE_MAX) {
		e->next = next;
		sift_up(qi, e->heap_pos);
		sift_down(qi, e->heap_pos);
		return 0;
	}
	if (qi->heap_len == qi->heap_cap) {
		size_t cap = qi->heap_cap ? qi->heap_cap * 2 : 64;
		struct qentry **h = realloc(qi->heap, cap * sizeof(*h));

		if (h == NULL)
			return -1;
		qi->heap = h;
		qi->heap_cap = cap;
	}
	e->next = next;
	heap_set(qi, qi->heap_len++, e);
	sift_up(qi, e->heap_pos);
	return 0;
}

void
qindex_unschedule(struct qindex *qi, struct qentry *e)
{
	size_t pos = e->heap_pos;
	struct qentry *last;

	if (pos == SIZE_MAX)
		return;
	e->heap_pos = SIZE_MAX;
	last = qi->heap[--qi->heap_len];
	if (last == e)
		return;
	heap_set(qi, pos, last);
	sift_up(qi, pos);
	sift_down(qi, last->heap_pos);
}

struct qentry *
qindex_first(const struct qindex *qi)
{
	return qi->heap_len > 0 ? qi->heap[0] : NULL;
}

int64_t
qindex_oldest(const struct qindex *qi)
{
	int64_t oldest = 0;

	for (size_t b = 0; b < qi->n_buckets; b++)
		for (const struct qentry *e = qi->buckets[b]; e != NULL; e = e->hnext)
			if (oldest == 0 || e->arrived < oldest)
				oldest = e->arrived;
	return oldest;
}

void
qindex_each(struct qindex *qi, void (*fn)(struct qentry *e, void *arg), void *arg)
{
	for (size_t b = 0; b < qi->n_buckets; b++) {
		struct qentry *e = qi->buckets[b], *next;

		for (; e != NULL; e = next) {
			next = e->hnext;
			fn(e, arg);
		}
	}
}
