/* SPDX-License-Identifier: MIT */
/* A shared object that is no selector: it lacks the smtpmux_selector symbol. */
#include <smtpmux/selector.h>

const struct smtpmux_selector not_a_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "no_symbol",
};
