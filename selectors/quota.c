/* SPDX-License-Identifier: MIT */
/*
 * quota: spreads mail in proportion to the quota each downstream has left,
 * so that a small free plan is not used up while a big one idles: with 100
 * and 400 messages left, about one message in five goes to the first.
 * Shares follow the remaining quotas as they drain, so the plans tend to
 * run out together.
 *
 * A downstream's weight is its quota_left (the tightest of its
 * max_per_minute/hour/day windows). One without any limit weighs
 * `unlimited_weight`. The first downstream is picked by a golden-ratio
 * sequence over the user's shared message sequence (weyl.h): deterministic,
 * no state, and over many messages each downstream's share is proportional
 * to its weight. Unavailable downstreams weigh 0 for that pick (unless none
 * is available). The others follow by descending weight, then
 * configuration order; exhausted downstreams (weight 0) come last.
 *
 * Parameters:
 *   unlimited_weight  the weight of a downstream without a quota: a whole
 *                     number (0 makes such downstreams an overflow, used
 *                     first only when every quota is spent), or "max"
 *                     (default): the largest quota_left among the limited
 *                     downstreams, i.e. as much as the roomiest plan, or 1
 *                     when no downstream has a limit (then: round robin).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <smtpmux/selector.h>

#include "weyl.h"

struct quota_conf {
	bool unlimited_max;
	uint64_t unlimited_weight;           /* when !unlimited_max */
};

static int
parse_unlimited_weight(struct quota_conf *qc, const char *value, char *err,
    size_t errlen)
{
	unsigned long long w;
	char *end;

	if (strcmp(value, "max") == 0) {
		qc->unlimited_max = true;
		return 0;
	}
	errno = 0;
	w = strtoull(value, &end, 10);
	if (value[0] < '0' || value[0] > '9' || *end != '\0' || errno != 0 ||
	    w > INT32_MAX) {
		snprintf(err, errlen, "unlimited_weight: expected 'max' or a whole "
		    "number up to %d, got '%s'", INT32_MAX, value);
		return -1;
	}
	qc->unlimited_max = false;
	qc->unlimited_weight = w;
	return 0;
}

static int
quota_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	struct quota_conf *qc;
	size_t i;

	if ((qc = calloc(1, sizeof(*qc))) == NULL) {
		snprintf(err, errlen, "%s", strerror(errno));
		return -1;
	}
	qc->unlimited_max = true;
	for (i = 0; i < n_params; i++) {
		if (strcmp(params[i].key, "unlimited_weight") != 0) {
			snprintf(err, errlen, "unknown parameter '%s'", params[i].key);
			free(qc);
			return -1;
		}
		if (parse_unlimited_weight(qc, params[i].value, err, errlen) == -1) {
			free(qc);
			return -1;
		}
	}
	*state = qc;
	return 0;
}

static void
quota_fini(void *state)
{
	free(state);
}

/* The weights of one message's downstreams. */
struct quota_weights {
	const struct smtpmux_downstream_view *ds;
	size_t n;
	bool only_available;                 /* for the first pick */
	uint64_t unlimited;                  /* a quota-less downstream's weight */
};

static bool
has_quota(const struct smtpmux_downstream_view *v)
{
	return v->quota_limit > 0 && v->quota_left >= 0;
}

static void
quota_weights_init(struct quota_weights *qw, const struct quota_conf *qc,
    const struct smtpmux_downstream_view *ds, size_t n)
{
	uint64_t max_left = 0;
	size_t i;

	qw->ds = ds;
	qw->n = n;
	qw->only_available = false;
	for (i = 0; i < n; i++)
		qw->only_available |= ds[i].available != 0;
	for (i = 0; i < n; i++)
		if (has_quota(&ds[i]) && (uint64_t)ds[i].quota_left > max_left &&
		    (ds[i].available || !qw->only_available))
			max_left = (uint64_t)ds[i].quota_left;
	if (!qc->unlimited_max)
		qw->unlimited = qc->unlimited_weight;
	else
		qw->unlimited = max_left > 0 ? max_left : 1;
}

static uint64_t
weight_of(const struct quota_weights *qw, size_t i)
{
	const struct smtpmux_downstream_view *v = &qw->ds[i];

	return has_quota(v) ? (uint64_t)v->quota_left : qw->unlimited;
}

static uint64_t
first_weight(const struct quota_weights *qw, size_t i)
{
	return qw->only_available && !qw->ds[i].available ? 0 : weight_of(qw, i);
}

/* The downstream picked first for message seq; n when every weight is 0. */
static size_t
quota_first(const struct quota_weights *qw, uint64_t seq)
{
	uint64_t total = 0, point;
	size_t i;

	for (i = 0; i < qw->n; i++)
		total += first_weight(qw, i);
	if (total == 0)
		return qw->n;
	point = weyl_point(seq, total);
	for (i = 0; point >= first_weight(qw, i); i++)
		point -= first_weight(qw, i);
	return i;
}

static size_t
quota_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	struct quota_weights qw;
	size_t i, j, k = 0, lo, first;

	quota_weights_init(&qw, state, ds, n);
	if ((first = quota_first(&qw, env->sequence)) < n)
		order[k++] = first;
	lo = k;
	for (i = 0; i < n; i++) {
		if (i == first)
			continue;
		for (j = k; j > lo &&
		    weight_of(&qw, order[j - 1]) < weight_of(&qw, i); j--)
			order[j] = order[j - 1];
		order[j] = i;
		k++;
	}
	return k;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "quota",
	.init = quota_init,
	.select = quota_select,
	.fini = quota_fini,
};
