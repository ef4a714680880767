/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_TOKEN_HELPER_H
#define SMTPMUXD_TOKEN_HELPER_H

#include "config.h"
#include "token_table.h"

/*
 * The token helper: a process the master forks when some downstream logs
 * in with an OAuth token (token_table_needed), like the prober: its own
 * event loop, the workers' unprivileged user, respawned when it dies,
 * replaced by one with the new settings at each reload (the master starts
 * the new one only once the old one is gone, so each token slot has one
 * writer).
 *
 * For every token source it obtains an access token at start (unless the
 * table still holds a good one from a predecessor), refreshes it ahead of
 * expiry, and retries failures with a growing pause (2 s up to 60 s). HTTPS
 * goes through libcurl on the loop (http_client.c); a token_command runs as
 * a child of this process (token_command.c). A worker that had a token
 * refused wakes it for one immediate refresh. Status and errors go to the
 * token table's status file and the log; tokens and secrets never do.
 */

/* Runs until SIGTERM; returns the exit status (1 when it cannot start). */
int token_helper_main(const struct config *cfg, struct token_table *tt);

#endif
