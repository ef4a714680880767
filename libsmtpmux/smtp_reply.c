/* SPDX-License-Identifier: MIT */
/* STUB: to be written */
typedef int stub_smtp_reply;
