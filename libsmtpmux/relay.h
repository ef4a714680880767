/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_RELAY_H
#define SMTPMUX_RELAY_H

#include "config.h"
#include "runtime.h"
#include "upstream.h"

/*
 * Relaying one message: ask the user's selector for an order (with the
 * shared health view), then try the downstreams one after another with
 * upstream_start() until one accepts. Each attempt is logged and reported
 * to the health segment; over-quota downstreams are skipped. The result is
 * what the client is told.
 */

struct relay_result {
	bool ok;
	int code;                        /* 250, or 451 / the last permanent code */
	char enhanced[16];               /* "2.0.0", "4.4.1", ... */
	char text[SMTP_REPLY_TEXT_MAX];  /* never contains credentials */
	char relay[128];                 /* name of the downstream that accepted */
};

struct relay;
typedef void (*relay_done_fn)(void *arg, const struct relay_result *res);

/*
 * Starts relaying msg (which must stay valid until done or cancel) for
 * user; client_addr is passed to the selector. done is called exactly once
 * unless cancelled.
 */
struct relay *relay_start(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg);

void relay_cancel(struct relay *);

#endif
