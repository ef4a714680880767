/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_OPTS_H
#define SMTP_LOAD_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* What the command line asked for; read-only once the run starts. */

#define OPTS_MAX_RCPTS 100
#define OPTS_MAX_SIZE ((uint64_t)1 << 31)

enum opts_auth { OPTS_AUTH_NONE, OPTS_AUTH_PLAIN, OPTS_AUTH_LOGIN };
enum opts_tls { OPTS_TLS_NONE, OPTS_TLS_STARTTLS, OPTS_TLS_IMPLICIT };

struct load_opts {
	char host[256];                 /* as given: name, IPv4 or IPv6 literal */
	char port[16];
	unsigned concurrency;
	uint64_t messages;              /* 0: no count limit (--duration alone) */
	double duration;                /* seconds; 0: no time limit */
	uint64_t size;                  /* bytes of header and body, before the final dot */
	unsigned per_session;           /* 0: unlimited */
	unsigned rcpts;
	const char *from, *to, *helo;
	const char *user, *password;
	enum opts_auth auth;
	enum opts_tls tls;
	const char *cafile;             /* NULL: certificates are not verified */
	const char *tls_name;           /* SNI and the verified name; NULL: host */
	const char *tls_priority;       /* NULL: the project's default */
	bool pipelining;
	unsigned threads;
	unsigned timeout_ms;
	bool json;
};

/*
 * Parses argv into o. Returns 0; 1 when --help was asked for (the caller
 * prints opts_usage()); or -1 with a one-line reason naming the option in
 * err. The password falls back to $SMTP_LOAD_PASSWORD, which, unlike the
 * command line, other users cannot read.
 */
int opts_parse(int argc, char **argv, struct load_opts *o, char *err, size_t errlen);
const char *opts_usage(void);

const char *opts_auth_name(enum opts_auth);
const char *opts_tls_name(enum opts_tls);

#endif
