/* SPDX-License-Identifier: MIT */
/*
 * weighted: smooth weighted round robin over the downstreams' `weight:`
 * (nginx's algorithm), so weights 3:1 send mail A A B A A A B A ... rather
 * than in bursts.
 *
 * nginx keeps a running "current weight" per peer. That would be state
 * shared by every worker, so instead the schedule is a pure function of the
 * weights: it repeats every W messages, W being the sum of the weights, and
 * message s goes first to the downstream the algorithm picks at step
 * s mod W, with s the user's message sequence that all workers share.
 * Weights 3:1 therefore give exactly 3:1 over any 4k consecutive messages.
 *
 * Finding step s mod W replays the schedule from its start, O(n * W). The
 * weights are first divided by their greatest common divisor, which leaves
 * the schedule unchanged (300:100 is 3:1). If W is still above
 * WEIGHTED_MAX_REPLAY, the first downstream comes from a golden-ratio
 * sequence over s instead (weyl.h): as proportional over many messages and
 * O(n), but not exact over every W messages.
 *
 * Unavailable downstreams count as weight 0 for the first choice, so the
 * healthy ones keep their ratio among themselves (when none is available,
 * all count). Weight 0 downstreams are never first. After the first, the
 * others follow by descending weight, then configuration order.
 *
 * Parameters: none.
 */
#include <stdbool.h>
#include <stdio.h>

#include <smtpmux/selector.h>

#include "weyl.h"

/* A full replay with 5 downstreams takes under 10 us on a 2020s CPU. */
#define WEIGHTED_MAX_REPLAY 1024

static int
weighted_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	*state = NULL;
	if (n_params > 0) {
		snprintf(err, errlen, "unknown parameter '%s'", params[0].key);
		return -1;
	}
	return 0;
}

/* The weights that count for the first choice, divided by their gcd. */
struct first_weights {
	const struct smtpmux_downstream_view *ds;
	size_t n;
	bool only_available;
	uint64_t gcd;                        /* 0: every weight is 0 */
	uint64_t total;                      /* of the reduced weights */
	uint64_t raw_total;
};

static uint64_t
gcd64(uint64_t a, uint64_t b)
{
	uint64_t t;

	while (b != 0) {
		t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static uint64_t
raw_weight(const struct first_weights *fw, size_t i)
{
	return fw->only_available && !fw->ds[i].available ? 0 : fw->ds[i].weight;
}

static uint64_t
weight_of(const struct first_weights *fw, size_t i)
{
	return raw_weight(fw, i) / fw->gcd;
}

static void
first_weights_init(struct first_weights *fw,
    const struct smtpmux_downstream_view *ds, size_t n)
{
	size_t i;

	fw->ds = ds;
	fw->n = n;
	fw->only_available = false;
	for (i = 0; i < n; i++)
		fw->only_available |= ds[i].available != 0;
	fw->gcd = 0;
	for (i = 0; i < n; i++)
		fw->gcd = gcd64(fw->gcd, raw_weight(fw, i));
	fw->total = fw->raw_total = 0;
	for (i = 0; fw->gcd > 0 && i < n; i++) {
		fw->total += weight_of(fw, i);
		fw->raw_total += raw_weight(fw, i);
	}
}

/*
 * Replays smooth weighted round robin up to step (0-based) and returns the
 * downstream picked there. After t additions a peer's current weight is
 * t * w - W * (times picked so far), so only the pick counts are kept, in
 * count[] (n entries, zeroed here). Ties go to the lower index, as in nginx.
 * The raw weights pick exactly as the reduced ones (every current weight is
 * just gcd times larger) and spare a division per peer and step.
 */
static size_t
swrr_pick(const struct first_weights *fw, uint64_t step, size_t *count)
{
	uint64_t t, w;
	int64_t cw, best_cw = 0;
	size_t i, best = 0;

	for (i = 0; i < fw->n; i++)
		count[i] = 0;
	for (t = 1; t <= step + 1; t++) {
		best = fw->n;
		for (i = 0; i < fw->n; i++) {
			if ((w = raw_weight(fw, i)) == 0)
				continue;
			cw = (int64_t)(t * w) - (int64_t)(fw->raw_total * count[i]);
			if (best == fw->n || cw > best_cw) {
				best = i;
				best_cw = cw;
			}
		}
		count[best]++;
	}
	return best;
}

/* The downstream whose share of [0, total) holds point. */
static size_t
share_holding(const struct first_weights *fw, uint64_t point)
{
	size_t i;

	for (i = 0; i < fw->n - 1 && point >= weight_of(fw, i); i++)
		point -= weight_of(fw, i);
	return i;
}

/* Fills order[] with first (if < n), then the rest by descending weight. */
static size_t
order_rest(const struct smtpmux_downstream_view *ds, size_t n, size_t first,
    size_t *order)
{
	size_t i, j, k = 0, lo;

	if (first < n)
		order[k++] = first;
	lo = k;
	for (i = 0; i < n; i++) {
		if (i == first)
			continue;
		for (j = k; j > lo && ds[order[j - 1]].weight < ds[i].weight; j--)
			order[j] = order[j - 1];
		order[j] = i;
		k++;
	}
	return k;
}

/* order[] doubles as swrr_pick()'s scratch space before it is filled. */
static size_t
weighted_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	struct first_weights fw;
	size_t first = n;

	first_weights_init(&fw, ds, n);
	if (fw.total > 0 && fw.total <= WEIGHTED_MAX_REPLAY)
		first = swrr_pick(&fw, env->sequence % fw.total, order);
	else if (fw.total > 0)
		first = share_holding(&fw, weyl_point(env->sequence, fw.total));
	return order_rest(ds, n, first, order);
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "weighted",
	.init = weighted_init,
	.select = weighted_select,
};
