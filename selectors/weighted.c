/* SPDX-License-Identifier: MIT */
/* STUB */
#include <smtpmux/selector.h>
const struct smtpmux_selector smtpmux_selector = { 0, 0, "stub", 0, 0, 0, {0} };
