/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SMTP_REPLY_H
#define SMTPMUX_SMTP_REPLY_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Parsing replies from a downstream server (pure, resumable by re-calling
 * with more data): "250-a\r\n250-b\r\n250 c\r\n".
 */

#define SMTP_REPLY_TEXT_MAX 512

struct smtp_reply {
	int code;                        /* 220, 250, 354, 421 ... */
	char enhanced[16];               /* "4.7.0" when the first line has one, else "" */
	/* The text of all lines, joined by one space, each without its
	 * enhanced code; octets outside printable ASCII become '?'; truncated
	 * to fit. Multi-line errors often say why only on their first lines. */
	char text[SMTP_REPLY_TEXT_MAX];
	/* EHLO capabilities, set when the reply is parsed with ehlo=true */
	bool cap_starttls, cap_auth_plain, cap_auth_login, cap_pipelining,
	    cap_8bitmime, cap_size, cap_enhancedstatuscodes;
	bool cap_auth_xoauth2, cap_auth_oauthbearer;
	unsigned long size_limit;        /* SIZE argument, 0 if none */
};

/*
 * Looks for one complete reply at the start of buf. Returns the number of
 * bytes it spans (the reply is in *r), 0 when incomplete, or -1 when the
 * data is not an SMTP reply (bad code, mixed codes, a line over 2048 bytes,
 * a reply over 64 KiB). Lines end at LF, a CR before it is dropped. Garbage
 * is refused as soon as its first octets arrive.
 */
long smtp_reply_parse(const char *buf, size_t len, bool ehlo, struct smtp_reply *r);

/* 2yz, 3yz, 4yz, 5yz. */
static inline bool smtp_reply_ok(const struct smtp_reply *r) { return r->code >= 200 && r->code < 400; }
static inline bool smtp_reply_temp(const struct smtp_reply *r) { return r->code >= 400 && r->code < 500; }

/*
 * True when a reply means "this provider is rate limiting or out of quota"
 * rather than "this message is bad": x.4.5 (Gmail's 550 5.4.5), 421/450/
 * 451/452 with 4.7.x, 454 4.7.0, and other 4xx/5xx whose text mentions a
 * quota, a rate limit, too many messages or a sending limit -- except x.2.2
 * (the recipient's mailbox is over quota). Details in smtp_reply.c.
 */
bool smtp_reply_is_throttle(const struct smtp_reply *r);

#endif
