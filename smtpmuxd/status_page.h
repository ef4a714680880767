/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_STATUS_PAGE_H
#define SMTPMUXD_STATUS_PAGE_H

#include "status_snapshot.h"

struct evbuffer;

/* How often the page reloads itself (meta refresh), seconds. */
#define STATUS_PAGE_REFRESH 10

/*
 * The status page for people (status_listen, GET /): one self-contained
 * HTML document (inline CSS, no script, no outside resource) with a
 * section per user, a row per downstream (state in words and colour,
 * quota bars, messages in flight, failures, latency, last error), and the
 * queue summary when s->queue.present. Every text from the configuration
 * or a provider is escaped; the markup is well-formed XML as well as HTML.
 * A pure function of s: appends to out, returns 0, or -1 out of memory.
 */
int status_page_render(struct evbuffer *out, const struct status_snapshot *s);

#endif
