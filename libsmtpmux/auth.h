/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_AUTH_H
#define SMTPMUX_AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include <event2/buffer.h>

/*
 * SASL PLAIN (RFC 4616) and LOGIN decoding and encoding, and password
 * checks. Base64 is GnuTLS's. Pure functions.
 */

#define AUTH_FIELD_MAX 255

struct auth_plain {
	char authzid[AUTH_FIELD_MAX + 1];
	char authcid[AUTH_FIELD_MAX + 1];
	char passwd[AUTH_FIELD_MAX + 1];
};

enum auth_status {
	AUTH_OK = 0,
	AUTH_BAD_BASE64,                 /* 501 5.5.2 */
	AUTH_BAD_FORMAT,                 /* 501 5.5.2: missing NULs, empty user, too long */
	AUTH_CANCELLED                   /* "*": 501 5.7.0 */
};

/* Decodes a PLAIN response (base64 of authzid NUL authcid NUL passwd). */
enum auth_status auth_plain_decode(const char *b64, size_t len, struct auth_plain *out);

/* Decodes one LOGIN step (base64 of the user name or the password). */
enum auth_status auth_login_decode(const char *b64, size_t len, char *out, size_t outlen);

/* Base64-decodes text that must not contain NUL octets into out
 * (NUL-terminated); returns 0, or -1 when it is not base64, holds a NUL or
 * does not fit. */
int auth_b64_decode_text(const char *b64, size_t len, char *out, size_t outlen);

/* Base64-encodes data into out (NUL-terminated); returns 0 or -1. */
int auth_b64_encode(const void *data, size_t len, char *out, size_t outlen);

/* Appends "AUTH PLAIN <base64>\r\n" credentials for a downstream. */
int auth_plain_encode(const char *user, const char *pass, struct evbuffer *out);

/*
 * Compares a password in time that does not depend on where the strings
 * differ (both are hashed first, so neither does it leak their lengths).
 */
bool auth_password_equal(const char *given, const char *expected);

/* Overwrites secrets so they do not linger in memory. */
void auth_wipe(void *p, size_t len);

#endif
