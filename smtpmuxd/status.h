/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_STATUS_H
#define SMTPMUXD_STATUS_H

#include <stddef.h>
#include <stdio.h>
#include <time.h>

#include <event2/event.h>

#include "config.h"
#include "health.h"

/*
 * What the shared health segment says, for people and for Prometheus.
 */

/*
 * `smtpmuxd -s status`: one table row per downstream of the running
 * configuration (state, failures, in flight, latency, messages sent in each
 * quota window against its limit, totals, last error).
 */
void status_print(FILE *out, const struct health *h, const struct health_cfg *hc, time_t now);
/* With a `cluster:` section, one line after the table: the link of each
 * worker, and which columns are the cluster's. */
void status_print_cluster(FILE *out, const struct config *cfg, const struct health *h);

/*
 * The Prometheus text exposition of every downstream, appended to out (an
 * evbuffer). Returns 0, or -1 when out of memory.
 */
struct evbuffer;
int status_metrics(struct evbuffer *out, const struct health *h,
    const struct health_cfg *hc, time_t now);
/* smtpmux_cluster_* (with a `cluster:` section only). 0, or -1 out of memory. */
int status_metrics_cluster(struct evbuffer *out, const struct config *cfg,
    const struct health *h);

/* For status_oauth.c: a label value escaped as the exposition format
 * requires, and a family's HELP and TYPE lines. 0, or -1 when out of memory. */
int status_label_value(struct evbuffer *out, const char *v);
int status_metric_family(struct evbuffer *out, const char *name, const char *type,
    const char *help);

/*
 * `status_listen:`: serves, in base's loop, GET / (the status page of
 * cfg's users, status_page.h) and GET /metrics on listen_addr
 * ("127.0.0.1:9100", "[::1]:9100"; numeric); any other path is 404.
 * cfg and h must outlive it. NULL with a message in err on failure.
 */
struct status_http;
struct status_http *status_http_start(struct event_base *base, const char *listen_addr,
    const struct config *cfg, struct health *h, char *err, size_t errlen);
/* Adds the OAuth token families (status_oauth.c) to /metrics. */
struct token_table;
void status_http_set_tokens(struct status_http *, const struct token_table *tokens);
/* Adds the queue's figures (status_queue.c) to /metrics. */
struct queue_stats;
void status_http_set_queue(struct status_http *, const struct queue_stats *qs);
/* The port bound, 0 if unknown. */
unsigned status_http_port(const struct status_http *);
void status_http_free(struct status_http *);

#endif
