/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_DSN_H
#define SMTPMUX_DSN_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

#include <event2/buffer.h>

/*
 * Delivery status notifications (RFC 3464): the multipart/report that
 * tells the sender of a queued message that it was given up ("failed") or
 * is still being retried ("delayed"), with the original message's headers
 * (RFC 6522 text/rfc822-headers). Pure: the caller gives every fact, the
 * clock included.
 */

enum dsn_action { DSN_FAILED, DSN_DELAYED };

struct dsn_report {
	enum dsn_action action;
	const char *hostname;            /* Reporting-MTA, and the From: domain */
	const char *queue_id;            /* the original message's */
	const char *sender;              /* its envelope sender: whom the DSN goes to */
	const char *const *rcpts;        /* its recipients */
	size_t n_rcpts;
	time_t arrived;                  /* Arrival-Date */
	time_t last_attempt;             /* Last-Attempt-Date */
	time_t retry_until;              /* Will-Retry-Until (delayed only) */
	time_t now;                      /* Date */
	const char *status;              /* RFC 3463 code, e.g. "5.7.1", "4.4.7" */
	const char *diagnostic;          /* the downstream's reply "550 5.7.1 ...", or NULL */
	const char *reason;              /* one line for people */
	const char *headers;             /* the original header block (CRLF lines), or NULL */
	size_t headers_len;
};

/*
 * Appends the whole notification (header and body, CRLF line ends, no line
 * longer than 998 octets) to out. *eightbit tells whether it holds octets
 * above 127 (from the original headers): it then needs BODY=8BITMIME.
 * Returns 0, or -1 when out of memory.
 */
int dsn_build(const struct dsn_report *r, struct evbuffer *out, bool *eightbit);

/*
 * The length of the header block at the start of a message body: up to and
 * including the empty line that ends it, or up to the last complete line
 * within max octets when it is longer (or has no body).
 */
size_t dsn_header_block(const char *body, size_t len, size_t max);

#endif
