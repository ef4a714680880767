/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_DELIVERY_H
#define SMTPMUX_DELIVERY_H

#include "config.h"
#include "relay.h"
#include "runtime.h"
#include "upstream.h"

/*
 * What happens to a message once its client sent the final dot, as the
 * client will hear it:
 *
 *   queue disabled   the relay's verdict, as is;
 *   mode fallback    the relay's verdict, unless no downstream took the
 *                    message and some failure was temporary: then the
 *                    message is written to the queue and, once it is on
 *                    disk, the client hears "250 ... queued as ID" (a write
 *                    that fails: 452 4.3.1, never 250);
 *   mode always      the message is written to the queue at once and
 *                    delivered by the queue runner.
 *
 * A permanent refusal by every downstream stays a synchronous 5xx.
 */

struct delivery;

/*
 * Starts delivering msg (which must stay valid until done or cancel) for
 * user. done is called exactly once, from the event loop, unless the
 * delivery is cancelled. NULL when out of memory.
 */
struct delivery *delivery_start(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *msg, uint64_t size, const char *client_addr,
    relay_done_fn done, void *arg);

/*
 * The client is gone: a relay in progress is cancelled; a message already
 * being written to the queue stays there (it will be delivered: the client
 * may send it again, as after any lost reply).
 */
void delivery_cancel(struct delivery *);

/*
 * Early connect (relay_prepare() in relay.h): a delivery prepared at the
 * first accepted RCPT, begun at the final dot as delivery_start() would
 * start one. NULL when there is nothing to prepare (early connect off, or
 * queue mode always: the message goes to the queue whatever happens).
 */
struct delivery *delivery_prepare(struct runtime *rt, const struct user_cfg *user,
    const struct upstream_msg *env, uint64_t size, const char *client_addr);
struct delivery *delivery_begin(struct delivery *prepared, const struct upstream_msg *msg,
    uint64_t size, relay_done_fn done, void *arg);

/*
 * True when the delivery can no longer be taken back: its relay has sent
 * the final dot to a downstream (relay_dot_sent()), or the message is being
 * written to the queue. It must then run to its end, even if the client
 * hangs up or the worker stops.
 */
bool delivery_dot_sent(const struct delivery *);

/*
 * The worker's shutdown grace is over (SIGTERM, or the end of a retirement
 * after a reload). With the queue enabled, a relay that has not yet sent
 * its final dot to any downstream is cancelled and the message is queued
 * instead: the client hears 250 queued rather than 421, and the queue runner
 * delivers it. Returns true when the delivery will end that way (or is
 * already being queued); false when the caller must wind it down as before:
 * no queue, or the dot already went to a downstream, which may deliver it,
 * so queueing it could deliver it twice.
 */
bool delivery_defer_now(struct delivery *);

#endif
