/* SPDX-License-Identifier: MIT */
/*
 * least_loaded: the downstream with the fewest deliveries in flight (across
 * all workers) first; ties go to the lowest average latency, then to
 * configuration order. A downstream that has not delivered anything yet has
 * latency 0 and so gets tried early, which is how it earns a latency.
 *
 * Parameters: none.
 */
#include <stdbool.h>
#include <stdio.h>

#include <smtpmux/selector.h>

static int
least_loaded_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	*state = NULL;
	if (n_params > 0) {
		snprintf(err, errlen, "unknown parameter '%s'", params[0].key);
		return -1;
	}
	return 0;
}

static bool
less_loaded(const struct smtpmux_downstream_view *ds, size_t a, size_t b)
{
	if (ds[a].in_flight != ds[b].in_flight)
		return ds[a].in_flight < ds[b].in_flight;
	if (ds[a].latency_ms != ds[b].latency_ms)
		return ds[a].latency_ms < ds[b].latency_ms;
	return a < b;
}

/* Insertion sort: stable, allocation-free, and n is a handful. */
static size_t
least_loaded_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	size_t i, j, cur;

	for (i = 0; i < n; i++) {
		cur = i;
		for (j = i; j > 0 && less_loaded(ds, cur, order[j - 1]); j--)
			order[j] = order[j - 1];
		order[j] = cur;
	}
	return n;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "least_loaded",
	.init = least_loaded_init,
	.select = least_loaded_select,
};
