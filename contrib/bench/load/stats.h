/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_STATS_H
#define SMTP_LOAD_STATS_H

#include <stdbool.h>
#include <stdint.h>

#include "hist.h"

/*
 * What one thread counted; merged into one at the end of the run.
 *
 * Errors are counted by the reply code of every negative reply (an RCPT
 * refused with 550 and the 554 to the DATA that follows count once each)
 * and by kind for failures that have no reply code.
 */

enum load_fault {
	FAULT_CONNECT,                  /* refused, unreachable */
	FAULT_RESET,                    /* the connection broke mid-session */
	FAULT_CLOSED,                   /* the server closed before its reply to QUIT */
	FAULT_TIMEOUT,                  /* no reply within --timeout */
	FAULT_TLS,                      /* handshake, verification or record error */
	FAULT_PROTOCOL,                 /* not an SMTP reply, or one over the input buffer */
	FAULT_NO_STARTTLS,              /* --starttls, but the server does not offer it */
	FAULT_KINDS
};

#define STATS_CODES 600                 /* reply codes 000-599 */
#define STATS_SAMPLES 16                /* distinct error keys with an example text */
#define STATS_SAMPLE_LEN 160

struct stats_sample {
	char key[16];                   /* "550", "timeout" */
	char text[STATS_SAMPLE_LEN];    /* "dot: 550 5.7.1 Message rejected" */
};

struct load_stats {
	uint64_t msgs_ok, msgs_failed;
	uint64_t sessions_ok, sessions_failed;
	uint64_t sessions_pipelined;    /* sessions that used PIPELINING */
	uint64_t code_errors[STATS_CODES];
	uint64_t fault_errors[FAULT_KINDS];
	struct stats_sample samples[STATS_SAMPLES];
	unsigned n_samples;
	struct hist msg_latency;        /* MAIL sent to the reply to the final dot */
	struct hist session_latency;    /* connect to the reply to QUIT */
};

void stats_init(struct load_stats *);
void stats_merge(struct load_stats *into, const struct load_stats *from);

/* A negative reply (code 0-599) at a stage ("mail", "dot"...) with its text. */
void stats_reply_error(struct load_stats *, int code, const char *stage, const char *text);
void stats_fault(struct load_stats *, enum load_fault, const char *detail);

const char *stats_fault_name(enum load_fault);
uint64_t stats_error_total(const struct load_stats *);
/*
 * The i-th error key, reply codes first ("550"), then fault kinds
 * ("timeout"), with its count (0 for keys never seen); false past the end.
 */
#define STATS_KEYS (STATS_CODES + FAULT_KINDS)
bool stats_error_key(const struct load_stats *, unsigned i, char key[16], uint64_t *count);
/* The example text kept for key ("550", "timeout"), or NULL. */
const char *stats_sample(const struct load_stats *, const char *key);

#endif
