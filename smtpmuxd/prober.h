/* SPDX-License-Identifier: MIT */
/* STUB */
