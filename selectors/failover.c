/* SPDX-License-Identifier: MIT */
/*
 * failover: the downstreams in configuration order.
 *
 * The first downstream takes all the mail; the second is tried only when
 * the first fails for a message or is unavailable (smtpmuxd moves down,
 * throttled and over-quota downstreams after the others), and so on.
 *
 * Parameters: none.
 */
#include <stdio.h>

#include <smtpmux/selector.h>

static int
failover_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	*state = NULL;
	if (n_params > 0) {
		snprintf(err, errlen, "unknown parameter '%s'", params[0].key);
		return -1;
	}
	return 0;
}

static size_t
failover_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	size_t i;

	for (i = 0; i < n; i++)
		order[i] = i;
	return n;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "failover",
	.init = failover_init,
	.select = failover_select,
};
