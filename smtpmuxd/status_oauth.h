/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_STATUS_OAUTH_H
#define SMTPMUXD_STATUS_OAUTH_H

#include <stdio.h>
#include <time.h>

#include "token_table.h"

/*
 * What the token table's status says about the OAuth tokens of the
 * downstreams: validity, last refresh, last error. Never a token.
 */

/*
 * `smtpmuxd -s status`: a second table, one row per downstream account
 * that logs in with a token (nothing when tt is NULL or has none).
 */
void status_oauth_print(FILE *out, const struct token_table *tt, time_t now);

/* The smtpmux_oauth_token_* families of /metrics, appended to out (an
 * evbuffer). Returns 0, or -1 when out of memory. */
struct evbuffer;
int status_oauth_metrics(struct evbuffer *out, const struct token_table *tt, time_t now);

#endif
