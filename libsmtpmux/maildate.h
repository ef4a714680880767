/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_MAILDATE_H
#define SMTPMUX_MAILDATE_H

#include <stddef.h>
#include <time.h>

/* Writes t as an RFC 5322 date in UTC ("Tue, 14 Nov 2023 22:13:20 +0000"). */
const char *maildate_format(time_t t, char *buf, size_t len);

#endif
