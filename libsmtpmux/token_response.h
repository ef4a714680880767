/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_TOKEN_RESPONSE_H
#define SMTPMUX_TOKEN_RESPONSE_H

#include <stdbool.h>
#include <stddef.h>

/*
 * What an OAuth 2.0 token endpoint answers (RFC 6749 5.1, 5.2), and what a
 * token_command prints, read into one struct. Pure functions.
 *
 * Reasons written to `why` are meant for the log and `smtpmuxd -s status`:
 * they quote the HTTP status, the OAuth error code and (cut short, made
 * printable) its description, never a token.
 */

/* Octets of an access or refresh token. Microsoft's JWTs are 1.5-3 KB; the
 * XOAUTH2/OAUTHBEARER AUTH line built from one stays under RFC 4954's
 * 12288. */
#define TOKEN_MAX 8192

struct token_response {
	char access_token[TOKEN_MAX + 1];
	char refresh_token[TOKEN_MAX + 1];   /* "" unless the server sent one */
	long long expires_in;                /* seconds; -1 when not given */
	char error[64];                      /* the OAuth error code, "" if none */
	char error_description[128];         /* printable, cut short */
};

/*
 * A token endpoint's reply with HTTP status `status`. Returns 0 for a 200
 * with a Bearer access token; else -1 and why, e.g.
 *   "HTTP 400 invalid_grant (Token has been expired or revoked.)"
 *   "HTTP 200: malformed token response (expected ':' at offset 17)"
 * out is wiped on failure (but error and error_description are kept).
 */
int token_response_parse(long status, const char *body, size_t len,
    struct token_response *out, char *why, size_t whylen);

/*
 * What a token_command printed on its standard output: a JSON token
 * response (when the first non-blank character is "{"), or the access token
 * alone on the first line. Returns 0, or -1 with why.
 */
int token_output_parse(const char *text, size_t len, struct token_response *out,
    char *why, size_t whylen);

/* RFC 6750 2.1 b64token: 1*(ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/") *"=" */
bool token_is_b64token(const char *s, size_t len);

void token_response_wipe(struct token_response *);

#endif
