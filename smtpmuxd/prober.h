/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_PROBER_H
#define SMTPMUXD_PROBER_H

#include <stdbool.h>

#include "config.h"
#include "health.h"
#include "token_table.h"
#include "queue_stats.h"

/*
 * The prober: a helper process the master forks (and re-forks at reload)
 * when prober_needed(cfg). It probes every downstream that has a
 * probe_interval (connect, EHLO, STARTTLS, QUIT) and feeds the verdicts
 * into the shared health segment, so a dead provider is known before a
 * message is tried on it and a recovered one comes back without waiting for
 * a trial message. It also serves `status_listen:` (GET /metrics).
 */

/* Any downstream with a probe_interval, or a status_listen address. */
bool prober_needed(const struct config *cfg);

/*
 * The helper's main: runs until SIGTERM, then returns 0 (the
 * exit code); returns 1 when it cannot start (logged). cfg must have been
 * bound to h by health_bind(). tokens (NULL without OAuth downstreams)
 * adds their token status to /metrics, qs (NULL without a queue) the
 * queue's figures to /metrics and the status page.
 */
int prober_main(const struct config *cfg, struct health *h, const struct token_table *tokens,
    const struct queue_stats *qs);

#endif
