/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SPOOL_FORMAT_H
#define SMTPMUX_SPOOL_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "smtp_parse.h"

/*
 * The text formats of the spool, pure: no I/O, no state, safe to fuzz.
 *
 * A message file is a versioned header, an empty line, then the body
 * exactly as received (CRLF line ends, unstuffed):
 *
 *   SMTPMUX-SPOOL 1
 *   user app@example.com          the account that handed it over
 *   client 192.0.2.7              its address, for the selector
 *   arrived 1700000000            seconds since the epoch
 *   from <app@example.com>        MAIL FROM path, "<>" for the null sender
 *   body 8bitmime                 MAIL BODY= parameter (optional)
 *   rcpt <a@example.org>          one line per recipient
 *   size 2312                     octets of body after the empty line
 *   attempts 1                    delivery state as first written (optional)
 *   next 1700000060
 *   warned 0
 *   error NAME TEXT               last error per downstream (optional)
 *
 * The message file never changes once committed. The queue runner keeps
 * the delivery state (attempts, next, warned, error) in a state file,
 * "SMTPMUX-STATE 1" and those keys, ended by an empty line as well (a
 * state file cut short is refused, and the message's own values hold).
 *
 * Every field is validated as the inbound session validates it: paths are
 * re-parsed with smtp_parse_command(), text may hold no control character,
 * numbers are bounded. Unknown keys are errors: a new key means a new
 * version number.
 */

#define SPOOL_VERSION 1
#define SPOOL_ID_LEN 12                  /* upper-case hex, as runtime_new_id() */
#define SPOOL_HEADER_MAX (1024 * 1024)   /* a header longer than this is refused */
#define SPOOL_USER_MAX 255
#define SPOOL_CLIENT_MAX 63
#define SPOOL_RELAY_MAX 63
#define SPOOL_ERROR_TEXT_MAX 255
#define SPOOL_ERRORS_MAX 16
#define SPOOL_RCPTS_MAX 10000

struct spool_error {
	char relay[SPOOL_RELAY_MAX + 1];     /* downstream name */
	char text[SPOOL_ERROR_TEXT_MAX + 1]; /* "451 4.7.0 Rate limit", printable */
};

struct spool_env {
	/* as received: never changes */
	char user[SPOOL_USER_MAX + 1];
	char client[SPOOL_CLIENT_MAX + 1];
	int64_t arrived;
	char from[SMTP_PATH_MAX + 1];        /* "" for <> */
	enum smtp_body body;
	char (*rcpts)[SMTP_PATH_MAX + 1];    /* owned; spool_env_clear() frees */
	size_t n_rcpts;
	uint64_t size;                       /* body octets */
	/* delivery state */
	unsigned attempts;
	int64_t next;                        /* 0: not set */
	bool warned;                         /* the "delayed" DSN was sent */
	struct spool_error errors[SPOOL_ERRORS_MAX];  /* oldest first */
	size_t n_errors;
};

/*
 * Parses a message file's header from buf (the file's first len octets;
 * len may go past the header). Returns 0 with env filled and *header_len
 * set to the offset of the body, or -1 with a reason ("line 3: ...") in
 * err. env must be zeroed or cleared; it is left cleared on error.
 */
int spool_parse_message(const char *buf, size_t len, struct spool_env *env,
    size_t *header_len, char *err, size_t errlen);

/*
 * Parses a state file over the delivery-state fields of env (the other
 * fields are left alone). Returns 0, or -1 with a reason in err and env's
 * state untouched.
 */
int spool_parse_state(const char *buf, size_t len, struct spool_env *env,
    char *err, size_t errlen);

/* The message header / the state file for env; *out is malloc'ed. -1 when
 * out of memory or when env holds what the parser would refuse. */
int spool_format_message(const struct spool_env *env, char **out, size_t *outlen);
int spool_format_state(const struct spool_env *env, char **out, size_t *outlen);

/* Adds a recipient (a copy); -1 when out of memory or too many. */
int spool_env_add_rcpt(struct spool_env *env, const char *path);

/*
 * Remembers the last error of a downstream: replaces its entry (moving it
 * last) or appends, dropping the oldest when full. Text is made printable.
 */
void spool_env_note_error(struct spool_env *env, const char *relay, const char *text);

/* The most recent error, or NULL. */
const struct spool_error *spool_env_last_error(const struct spool_env *env);

void spool_env_clear(struct spool_env *env);

/* A queue id: SPOOL_ID_LEN upper-case hex digits. */
bool spool_id_valid(const char *s, size_t len);

#endif
