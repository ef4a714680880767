/* SPDX-License-Identifier: MIT */
/* A selector whose struct_size is too small to hold the version 1 fields. */
#include <smtpmux/selector.h>

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = 8,
	.name = "incomplete",
};
