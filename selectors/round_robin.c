/* SPDX-License-Identifier: MIT */
/*
 * round_robin: each message starts at the next downstream in turn; the
 * others follow in rotation, so a failed delivery moves on to the next one.
 *
 * The turn comes from envelope->sequence, the user's message counter that
 * all workers share, so consecutive messages alternate across downstreams
 * whichever worker takes them, and the selector keeps no state.
 *
 * Message s starts at downstream s mod n. When some downstreams are
 * unavailable the rotation counts only the available ones (message s
 * starts at the (s mod n_available)-th available one), so the healthy ones
 * keep equal shares instead of the one after a dead downstream taking its
 * turns too.
 *
 * Parameters: none.
 */
#include <stdio.h>

#include <smtpmux/selector.h>

static int
round_robin_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	*state = NULL;
	if (n_params > 0) {
		snprintf(err, errlen, "unknown parameter '%s'", params[0].key);
		return -1;
	}
	return 0;
}

/* The downstream whose turn message seq is. */
static size_t
round_robin_start(const struct smtpmux_downstream_view *ds, size_t n,
    uint64_t seq)
{
	size_t i, n_up = 0, turn;

	for (i = 0; i < n; i++)
		n_up += ds[i].available != 0;
	if (n_up == 0 || n_up == n)
		return (size_t)(seq % n);
	turn = (size_t)(seq % n_up);
	for (i = 0; i < n; i++)
		if (ds[i].available && turn-- == 0)
			break;
	return i;
}

static size_t
round_robin_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	size_t i, start = round_robin_start(ds, n, env->sequence);

	for (i = 0; i < n; i++)
		order[i] = (start + i) % n;
	return n;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "round_robin",
	.init = round_robin_init,
	.select = round_robin_select,
};
