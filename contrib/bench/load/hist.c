/* SPDX-License-Identifier: MIT */
#include <math.h>
#include <string.h>

#include "hist.h"

#define HIST_SUB (1u << HIST_SUB_BITS)

/*
 * Values below 2^(SUB_BITS+1) map to themselves; above that, a value with
 * its highest bit at position m keeps its top SUB_BITS+1 bits, so each
 * power of two [2^m, 2^(m+1)) is split into 2^SUB_BITS equal buckets.
 */
static unsigned
hist_index(uint64_t v)
{
	unsigned m, shift;

	if (v < 2 * HIST_SUB)
		return (unsigned)v;
	m = 63u - (unsigned)__builtin_clzll(v);
	if (m >= HIST_MAX_BITS)
		return HIST_BUCKETS - 1;
	shift = m - HIST_SUB_BITS;
	return ((shift + 1) << HIST_SUB_BITS) + (unsigned)(v >> shift) - HIST_SUB;
}

/* The smallest value of bucket i and the number of values it spans. */
static void
hist_bucket_range(unsigned i, uint64_t *low, uint64_t *width)
{
	unsigned shift;

	if (i < 2 * HIST_SUB) {
		*low = i;
		*width = 1;
		return;
	}
	shift = (i >> HIST_SUB_BITS) - 1;
	*low = (uint64_t)((i & (HIST_SUB - 1)) + HIST_SUB) << shift;
	*width = (uint64_t)1 << shift;
}

void
hist_init(struct hist *h)
{
	memset(h, 0, sizeof(*h));
	h->min = UINT64_MAX;
}

void
hist_add(struct hist *h, uint64_t v)
{
	h->bucket[hist_index(v)]++;
	h->count++;
	h->sum += v;
	if (v > h->max)
		h->max = v;
	if (v < h->min)
		h->min = v;
}

void
hist_merge(struct hist *into, const struct hist *from)
{
	for (unsigned i = 0; i < HIST_BUCKETS; i++)
		into->bucket[i] += from->bucket[i];
	into->count += from->count;
	into->sum += from->sum;
	if (from->max > into->max)
		into->max = from->max;
	if (from->min < into->min)
		into->min = from->min;
}

uint64_t
hist_quantile(const struct hist *h, double q)
{
	uint64_t rank, seen = 0, low, width, mid;

	if (h->count == 0)
		return 0;
	/* The rank-th smallest sample, 1-based: p50 of 2 samples is the first. */
	rank = (uint64_t)ceil(q * (double)h->count);
	if (rank < 1)
		rank = 1;
	if (rank >= h->count)
		return h->max;
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		seen += h->bucket[i];
		if (seen < rank)
			continue;
		hist_bucket_range(i, &low, &width);
		mid = low + width / 2;
		if (mid > h->max)
			mid = h->max;
		return mid < h->min ? h->min : mid;
	}
	return h->max;
}

uint64_t
hist_mean(const struct hist *h)
{
	return h->count == 0 ? 0 : h->sum / h->count;
}
