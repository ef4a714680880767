/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_SCRIPT_H
#define SMTP_LOAD_SCRIPT_H

#include <stddef.h>

#include "opts.h"

/*
 * Everything a session sends, built once before the run and shared
 * read-only by every session and thread: sessions queue references to
 * these bytes (outq.h) and never format or copy a command.
 */

struct script_text {
	char *p;
	size_t len;
};

struct load_script {
	struct script_text ehlo;        /* "EHLO name\r\n" */
	struct script_text auth;        /* "AUTH PLAIN b64\r\n" or "AUTH LOGIN\r\n"; empty: none */
	struct script_text login_user;  /* "b64(user)\r\n" for LOGIN */
	struct script_text login_pass;
	struct script_text mail;        /* "MAIL FROM:<from>\r\n" */
	struct script_text rcpts;       /* every "RCPT TO:<...>\r\n", one after the other */
	size_t *rcpt_end;               /* rcpt i is rcpts.p[i ? rcpt_end[i-1] : 0 .. rcpt_end[i]) */
	unsigned n_rcpts;
	struct script_text message;     /* header and body, then ".\r\n" */
	size_t message_size;            /* the message without the final dot */
};

/* Returns 0, or -1 with the reason in err. */
int script_build(struct load_script *, const struct load_opts *, char *err, size_t errlen);
void script_free(struct load_script *);

/* The smallest --size: the generated header alone. */
size_t script_header_len(const struct load_opts *);

#endif
