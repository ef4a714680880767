/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_STATUS_QUEUE_H
#define SMTPMUXD_STATUS_QUEUE_H

#include <stdio.h>
#include <time.h>

#include <event2/buffer.h>

#include "queue_stats.h"

/* The queue's figures for `smtpmuxd -s status`: one line. */
void status_queue_print(FILE *out, const struct queue_stats *qs, time_t now);

/* The queue section of the status page (status_snapshot.h). */
struct status_queue_summary;
void status_queue_summary(const struct queue_stats *qs, time_t now,
    struct status_queue_summary *out);

/* The same as Prometheus metrics, appended to out. 0, or -1 when out of memory. */
int status_queue_metrics(struct evbuffer *out, const struct queue_stats *qs, time_t now);

#endif
