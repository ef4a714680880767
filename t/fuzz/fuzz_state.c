/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the state file loader: the root master reads the
 * state file at start, and whoever can write its folder may have written
 * it. Each input is loaded into fresh segments; besides crashes and
 * sanitizer reports, it aborts when a promise is broken:
 *  - what was loaded can be read (every snapshot, every view) and cleaned
 *    up after a dead worker without reaching outside the segments;
 *  - the record and user counts are within the segments;
 *  - a window never shows more room than its limit;
 *  - what a loaded state saves loads again and saves the same bytes.
 * See README in this folder.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "health_layout.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define require(cond) do { if (!(cond)) abort(); } while (0)

static const struct health_cfg hcfg = { 3, 30, 600, 60 };

static void
read_everything(struct health *h)
{
	struct health_snapshot s;

	require(health_count(h) <= HEALTH_MAX_DOWNSTREAMS);
	for (size_t i = 0; i < health_count(h); i++) {
		require(health_snapshot(h, i, &hcfg, 1700000000, &s) >= 0);
		require(strlen(s.key) < sizeof(s.key) && strlen(s.name) < sizeof(s.name));
		require(s.view.quota_limit == 0 || s.view.quota_left <= (int32_t)s.view.quota_limit);
	}
	health_worker_gone(h, 3);
}

/* A state that was saved loads again, and saves the same. */
static void
round_trip(struct health *h)
{
	struct health *again = health_create(NULL);
	unsigned char *first, *second;
	size_t len1, len2;
	const char *why;

	require(again != NULL);
	first = health_image(h, &len1);
	require(first != NULL);
	require(health_load_image(again, first, len1, &why) == 0);
	health_settle(again);
	health_segment_format(again);
	second = health_image(again, &len2);
	require(second != NULL && len1 == len2 && memcmp(first, second, len1) == 0);
	free(first);
	free(second);
	health_destroy(again);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct health *h = health_create(NULL);
	const char *why;

	require(h != NULL);
	if (health_load_image(h, data, size, &why) == 0) {
		health_settle(h);
		health_segment_format(h);
		read_everything(h);
		round_trip(h);
	}
	health_destroy(h);
	return 0;
}
