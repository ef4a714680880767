/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SELECTORS_WEYL_H
#define SMTPMUX_SELECTORS_WEYL_H

#include <stdint.h>

/*
 * A point in [0, total) for message number seq: frac(seq / phi) scaled to
 * total (a Weyl sequence). Consecutive messages land far apart and any run
 * of N messages covers [0, total) evenly to within O(log N / N), so giving
 * each downstream a share of [0, total) equal to its weight spreads mail in
 * proportion to the weights, deterministically and with no state beyond the
 * shared sequence number.
 */
static inline uint64_t
weyl_point(uint64_t seq, uint64_t total)
{
	uint64_t frac = seq * UINT64_C(0x9E3779B97F4A7C15); /* 2^64 / phi */
	uint64_t p = (uint64_t)((double)(frac >> 11) * 0x1p-53 * (double)total);

	return p < total ? p : total - 1;
}

#endif
