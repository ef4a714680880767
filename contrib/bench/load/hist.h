/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_HIST_H
#define SMTP_LOAD_HIST_H

#include <stdint.h>

/*
 * A latency histogram in constant memory, so that a run of any length
 * keeps every sample: log-linear buckets (128 per power of two) give
 * percentiles within 1/128 (0.8%) of the true value. Values are
 * nanoseconds; anything above 2^40 ns (18 minutes) lands in the last
 * bucket. One per thread, merged at the end: no locking.
 */

#define HIST_SUB_BITS 7
#define HIST_MAX_BITS 40
#define HIST_BUCKETS ((HIST_MAX_BITS - HIST_SUB_BITS + 1) << HIST_SUB_BITS)

struct hist {
	uint64_t count;
	uint64_t sum;                   /* for the mean */
	uint64_t max;                   /* exact */
	uint64_t min;                   /* exact; UINT64_MAX while empty */
	uint64_t bucket[HIST_BUCKETS];
};

void hist_init(struct hist *);
void hist_add(struct hist *, uint64_t value);
void hist_merge(struct hist *into, const struct hist *from);

/*
 * The value at or below which a fraction q (0 < q <= 1) of the samples
 * lie, as the middle of its bucket, within [min, max]; max itself for
 * q = 1; 0 when empty.
 */
uint64_t hist_quantile(const struct hist *, double q);
uint64_t hist_mean(const struct hist *);

#endif
