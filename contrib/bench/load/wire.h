/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_WIRE_H
#define SMTP_LOAD_WIRE_H

#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/event_struct.h>
#include <gnutls/gnutls.h>

#include "client.h"
#include "loop.h"
#include "outq.h"

/*
 * One connection slot: it runs sessions one after the other, each on a
 * fresh socket, until nothing is left to claim. Built to cost the fewest
 * system calls per message, so that the server is what a run measures:
 * the read event stays armed for the whole session (no epoll_ctl per
 * reply), replies are read straight into a fixed buffer (no FIONREAD, no
 * read until EAGAIN), and commands are written at once with one sendmsg
 * per batch; write interest is armed only when the socket is full.
 */

/* Replies only: an EHLO reply is a few hundred octets, 100 pipelined RCPT replies 3 KiB. */
#define WIRE_IN_CAP 4096

enum wire_state { WIRE_IDLE, WIRE_HANDSHAKE, WIRE_OPEN };

struct wire {
	struct load_loop *loop;
	enum wire_state state;
	int fd;
	int connect_errno;              /* socket() or connect() failed at once */
	struct event ev_read;           /* persistent while a session runs */
	struct event ev_write;          /* one-shot, armed when a write would block */
	bool write_armed;
	gnutls_session_t tls;
	bool tls_uncorking;             /* corked records still to be flushed */
	bool got_bytes;                 /* the server has said something */
	unsigned reserved;              /* messages taken for this session, not yet begun */
	uint64_t started_ns, last_io_ns;
	struct client cl;
	struct outq out;
	size_t in_len;
	char in[WIRE_IN_CAP];
};

void wire_init(struct wire *, struct load_loop *);
/* Claims a message and opens a session for it; false when none is left. */
bool wire_start(struct wire *);
/* Fails the session when the server has been silent longer than --timeout. */
void wire_check_timeout(struct wire *, uint64_t now);
/* At the end of the loop: closes whatever is still open, without counting it. */
void wire_cleanup(struct wire *);

#endif
