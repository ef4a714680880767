/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SMTP_PARSE_H
#define SMTPMUX_SMTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Pure SMTP command parsing: no I/O, no allocation, no state beyond the
 * arguments. Safe to fuzz.
 */

#define SMTP_CMD_LINE_MAX 512        /* RFC 5321 4.5.3.1.4, with CRLF */
#define SMTP_MAIL_AUTH_LINE_MAX 1012 /* RFC 4954 5: MAIL with AUTH= is 500 longer */
#define SMTP_AUTH_LINE_MAX 12288     /* RFC 4954 4: AUTH lines may be longer */
#define SMTP_PATH_MAX 256            /* RFC 5321 4.5.3.1.3 */
#define SMTP_DOMAIN_MAX 255

enum smtp_verb {
	SMTP_VERB_UNKNOWN = 0,
	SMTP_VERB_HELO, SMTP_VERB_EHLO, SMTP_VERB_MAIL, SMTP_VERB_RCPT,
	SMTP_VERB_DATA, SMTP_VERB_RSET, SMTP_VERB_NOOP, SMTP_VERB_QUIT,
	SMTP_VERB_HELP, SMTP_VERB_VRFY, SMTP_VERB_EXPN, SMTP_VERB_AUTH,
	SMTP_VERB_STARTTLS, SMTP_VERB_BDAT
};

enum smtp_body { SMTP_BODY_UNSET = 0, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME };

/* A reply the caller sends as is: code, enhanced status, text. */
struct smtp_error {
	int code;                        /* 500, 501, 504, 555 ... */
	const char *enhanced;            /* "5.5.2" */
	const char *text;                /* "Bad sender address syntax": no code */
};

struct smtp_cmd {
	enum smtp_verb verb;
	/* HELO/EHLO: the domain or address literal. */
	char domain[SMTP_DOMAIN_MAX + 1];
	/* MAIL/RCPT: the path without <>, validated: printable ASCII (or UTF-8
	 * octets >= 0x80), no CR/LF/NUL/space outside a quoted local part,
	 * at most SMTP_PATH_MAX octets. "" is the null reverse-path. */
	char path[SMTP_PATH_MAX + 1];
	/* MAIL parameters (RFC 1870, RFC 6152, RFC 4954 5). */
	bool has_size;
	uint64_t size;
	bool size_overflow;              /* SIZE= above 2^64-1: too big, not a syntax
	                                    error (size is then UINT64_MAX) */
	enum smtp_body body;
	bool has_auth;                   /* AUTH=<> or AUTH=xtext: accepted, not forwarded */
	/* AUTH: mechanism (upper-cased) and optional initial response. */
	char mech[21];
	const char *initial;             /* points into the line, NULL if absent */
	size_t initial_len;
	/* Raw argument text after the verb (VRFY, EXPN, HELP, NOOP, BDAT), no
	 * control characters; NULL when there is none. */
	const char *arg;
	size_t arg_len;
};

/*
 * Parses one command line (without its CRLF). Returns 0 and fills cmd, or
 * -1 and fills err with the RFC 5321 reply for the syntax error, e.g.
 * 500 5.5.2 for an unknown verb or a CR, LF or NUL anywhere in the line,
 * 501 5.5.4 for bad arguments (also SIZE/BODY/AUTH= values), 555 5.5.4 for
 * unknown MAIL/RCPT parameters, 501 5.1.7 / 5.1.3 for bad sender /
 * recipient addresses (and 5.1.3 for RCPT TO:<>), 553 5.6.7 for an address
 * with a non-ASCII octet (SMTPUTF8 is not offered). On error cmd holds only
 * the verb. Verbs and parameter names are case-insensitive, trailing
 * white space is ignored, "MAIL FROM: <a@b>" (one space) is tolerated, a
 * source route "<@a,@b:u@d>" is reduced to "u@d", and RCPT accepts a bare
 * "<postmaster>". No field of cmd can hold a control character.
 * Sequence errors (503) are the session's business, not the parser's.
 */
int smtp_parse_command(const char *line, size_t len, struct smtp_cmd *cmd,
    struct smtp_error *err);

/*
 * The longest line, with its CRLF, that a command may have: SMTP_AUTH_LINE_MAX
 * for AUTH, SMTP_MAIL_AUTH_LINE_MAX for MAIL with an AUTH= parameter,
 * SMTP_CMD_LINE_MAX for everything else (and for a line that did not parse:
 * pass NULL). A longer line is answered 500 5.5.2.
 */
size_t smtp_cmd_line_max(const struct smtp_cmd *cmd);

/*
 * Finds the end of the next command line in buf. Returns the length of
 * the line (without CRLF or LF) and sets *consumed to the bytes to drop,
 * or returns -1 when no complete line is present yet (*consumed = 0), or
 * -2 when more than max octets arrived without a line end (*consumed = 0;
 * the caller replies 500 5.5.2, or 500 5.5.6 inside an AUTH exchange, and
 * discards up to the next line end).
 * max counts the line end, as SMTP_CMD_LINE_MAX does. Only the CR right
 * before the LF is stripped; any other CR stays and the parser refuses it.
 */
long smtp_next_line(const char *buf, size_t len, size_t max, size_t *consumed);

/*
 * True when s[0..len) is a mailbox that MAIL FROM would accept
 * ("local@domain", the local part possibly quoted), for addresses that come
 * from the configuration rather than from a client.
 */
bool smtp_mailbox_valid(const char *s, size_t len);

#endif
