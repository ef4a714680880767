/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SASL_OAUTH_H
#define SMTPMUX_SASL_OAUTH_H

#include <stddef.h>

#include <event2/buffer.h>

/*
 * The client side of the two SASL mechanisms that carry an OAuth 2.0
 * bearer token over SMTP AUTH: XOAUTH2 (Google's, also Microsoft's) and
 * OAUTHBEARER (RFC 7628). Pure functions; base64 is GnuTLS's (auth.c).
 *
 * Both send the token in the initial response. A server that refuses it
 * answers "334 <base64 JSON error>" (RFC 7628 3.2.2); the client must then
 * answer once more (sasl_oauth_abort_line) and gets the final 5xx.
 */

enum sasl_oauth_mech {
	SASL_XOAUTH2,
	SASL_OAUTHBEARER
};

/*
 * Appends "AUTH XOAUTH2 <base64>\r\n" or "AUTH OAUTHBEARER <base64>\r\n":
 *   XOAUTH2      "user=" user ^A "auth=Bearer " token ^A ^A
 *   OAUTHBEARER  "n,a=" saslname "," ^A "host=" host ^A "port=" port ^A
 *                "auth=Bearer " token ^A ^A      (RFC 7628 3.1, 4.1)
 * where saslname is user with "=" and "," escaped (RFC 5801). Returns 0, or
 * -1 with nothing appended when a field holds what the mechanism cannot
 * carry (a control character, a token that is not a b64token). Every copy
 * of the token it makes is wiped.
 */
int sasl_oauth_encode(enum sasl_oauth_mech mech, const char *user, const char *host,
    const char *port, const char *token, size_t token_len, struct evbuffer *out);

/* The answer to the error continuation: "" (an empty line) for XOAUTH2, as
 * Google documents it; "AQ==", a lone %x01, for OAUTHBEARER (RFC 7628 3.2.3). */
const char *sasl_oauth_abort_line(enum sasl_oauth_mech mech);

/* "XOAUTH2", "OAUTHBEARER" */
const char *sasl_oauth_name(enum sasl_oauth_mech mech);

/*
 * The text of a 334 error continuation (base64 of a JSON object) as a short
 * printable summary for the log, e.g. "status=invalid_token
 * scope=https://mail.google.com/". Returns 0, or -1 when the text is not
 * such a challenge.
 */
int sasl_oauth_error_decode(const char *b64, size_t len, char *out, size_t outlen);

#endif
