/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_BUFFER_WIPE_H
#define SMTPMUX_BUFFER_WIPE_H

#include <stddef.h>

#include <event2/buffer.h>

/*
 * Input that may hold AUTH data (a password in base64 is a password) must
 * not survive in memory that libevent frees or reuses. evbuffer_drain()
 * hands fully drained chains back to malloc as they are, and leaves the
 * drained part of the first chain in place: these overwrite the octets
 * where they lie first.
 *
 * Whoever reads such a buffer must also never linearise it
 * (evbuffer_pullup copies and frees chains behind our back): copy lines
 * out with evbuffer_copyout into memory it wipes itself.
 */

/* Overwrites the first len octets of buf (or all it holds, if fewer), then drains them. */
void buffer_wipe_drain(struct evbuffer *buf, size_t len);

/* The same for everything in buf. */
void buffer_wipe_all(struct evbuffer *buf);

#endif
