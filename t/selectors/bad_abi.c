/* SPDX-License-Identifier: MIT */
/* A selector built for an ABI this smtpmuxd does not speak. */
#include <smtpmux/selector.h>

static size_t
bad_abi_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	return 0;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = 999,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "bad_abi",
	.select = bad_abi_select,
};
