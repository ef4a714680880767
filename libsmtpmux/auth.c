/* SPDX-License-Identifier: MIT */
#include <stdint.h>
#include <string.h>

#include <gnutls/crypto.h>
#include <gnutls/gnutls.h>

#include "auth.h"

#define SHA256_LEN 32

/*
 * GnuTLS's decoder skips white space inside the input; RFC 4954 4 allows
 * none, so the alphabet is checked first (the decoding itself is GnuTLS's).
 */
static bool
b64_alphabet_only(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		    (c >= '0' && c <= '9') || c == '+' || c == '/' || c == '='))
			return false;
	}
	return true;
}

/*
 * Decodes a client response into *out (gnutls_free it after wiping).
 * "*" is the client cancelling the exchange (RFC 4954 4).
 */
static enum auth_status
b64_decode(const char *b64, size_t len, gnutls_datum_t *out)
{
	gnutls_datum_t in = { (unsigned char *)(uintptr_t)b64, (unsigned)len };

	out->data = NULL;
	out->size = 0;
	if (len == 1 && b64[0] == '*')
		return AUTH_CANCELLED;
	if (len > 0xffff || !b64_alphabet_only(b64, len))
		return AUTH_BAD_BASE64;
	if (len == 0)
		return AUTH_OK;
	if (gnutls_base64_decode2(&in, out) < 0)
		return AUTH_BAD_BASE64;
	return AUTH_OK;
}

static void
datum_wipe_free(gnutls_datum_t *d)
{
	if (d->data != NULL) {
		gnutls_memset(d->data, 0, d->size);
		gnutls_free(d->data);
	}
	d->data = NULL;
	d->size = 0;
}

/* Copies one NUL-free field of at most AUTH_FIELD_MAX octets. */
static bool
copy_field(char *dst, const unsigned char *src, size_t len)
{
	if (len > AUTH_FIELD_MAX || memchr(src, '\0', len) != NULL)
		return false;
	memcpy(dst, src, len);
	dst[len] = '\0';
	return true;
}

/* RFC 4616 2: [authzid] NUL authcid NUL passwd, exactly two NULs. */
static enum auth_status
split_plain(const unsigned char *p, size_t len, struct auth_plain *out)
{
	const unsigned char *nul1, *nul2, *end;

	if (len == 0)
		return AUTH_BAD_FORMAT;         /* and p may be NULL */
	end = p + len;
	nul1 = memchr(p, '\0', len);
	if (nul1 == NULL)
		return AUTH_BAD_FORMAT;
	nul2 = memchr(nul1 + 1, '\0', (size_t)(end - nul1 - 1));
	if (nul2 == NULL || nul2 == nul1 + 1 || nul2 + 1 == end)
		return AUTH_BAD_FORMAT;         /* no second NUL, empty authcid or passwd */
	if (!copy_field(out->authzid, p, (size_t)(nul1 - p)) ||
	    !copy_field(out->authcid, nul1 + 1, (size_t)(nul2 - nul1 - 1)) ||
	    !copy_field(out->passwd, nul2 + 1, (size_t)(end - nul2 - 1)))
		return AUTH_BAD_FORMAT;         /* too long, or a third NUL */
	return AUTH_OK;
}

enum auth_status
auth_plain_decode(const char *b64, size_t len, struct auth_plain *out)
{
	gnutls_datum_t raw;
	enum auth_status st;

	memset(out, 0, sizeof(*out));
	st = b64_decode(b64, len, &raw);
	if (st == AUTH_OK)
		st = split_plain(raw.data, raw.size, out);
	datum_wipe_free(&raw);
	if (st != AUTH_OK)
		auth_wipe(out, sizeof(*out));
	return st;
}

enum auth_status
auth_login_decode(const char *b64, size_t len, char *out, size_t outlen)
{
	gnutls_datum_t raw;
	enum auth_status st;

	if (outlen == 0)
		return AUTH_BAD_FORMAT;
	out[0] = '\0';
	st = b64_decode(b64, len, &raw);
	if (st == AUTH_OK && (raw.size == 0 || raw.size >= outlen ||
	    !copy_field(out, raw.data, raw.size)))
		st = AUTH_BAD_FORMAT;
	datum_wipe_free(&raw);
	if (st != AUTH_OK)
		auth_wipe(out, outlen);
	return st;
}

int
auth_b64_decode_text(const char *b64, size_t len, char *out, size_t outlen)
{
	gnutls_datum_t raw;
	int rc = -1;

	if (outlen == 0)
		return -1;
	out[0] = '\0';
	if (b64_decode(b64, len, &raw) != AUTH_OK)
		return -1;
	if (raw.size < outlen && (raw.size == 0 || memchr(raw.data, '\0', raw.size) == NULL)) {
		if (raw.size > 0)
			memcpy(out, raw.data, raw.size);
		out[raw.size] = '\0';
		rc = 0;
	}
	datum_wipe_free(&raw);
	return rc;
}

int
auth_b64_encode(const void *data, size_t len, char *out, size_t outlen)
{
	gnutls_datum_t in = { (unsigned char *)(uintptr_t)data, (unsigned)len };
	gnutls_datum_t enc = { NULL, 0 };
	int rc = -1;

	if (outlen == 0 || len > 0xffff)
		return -1;
	out[0] = '\0';
	if (len == 0)
		return 0;
	if (gnutls_base64_encode2(&in, &enc) < 0)
		return -1;
	if (enc.size < outlen) {
		memcpy(out, enc.data, enc.size);
		out[enc.size] = '\0';
		rc = 0;
	}
	datum_wipe_free(&enc);
	return rc;
}

int
auth_plain_encode(const char *user, const char *pass, struct evbuffer *out)
{
	/* NUL user NUL pass, and its base64 (4/3 of it, rounded up, plus NUL) */
	char raw[2 * AUTH_FIELD_MAX + 2];
	char b64[(sizeof(raw) + 2) / 3 * 4 + 1];
	size_t ulen = strlen(user), plen = strlen(pass);
	int rc = -1;

	if (ulen == 0 || plen == 0 || ulen > AUTH_FIELD_MAX || plen > AUTH_FIELD_MAX)
		return -1;
	raw[0] = '\0';
	memcpy(raw + 1, user, ulen);
	raw[1 + ulen] = '\0';
	memcpy(raw + 2 + ulen, pass, plen);
	if (auth_b64_encode(raw, 2 + ulen + plen, b64, sizeof(b64)) == 0 &&
	    evbuffer_add_printf(out, "AUTH PLAIN %s\r\n", b64) > 0)
		rc = 0;
	auth_wipe(raw, sizeof(raw));
	auth_wipe(b64, sizeof(b64));
	return rc;
}

/*
 * Hashing both sides makes the comparison length-independent: the loop
 * always covers 32 octets and has no early exit.
 */
bool
auth_password_equal(const char *given, const char *expected)
{
	unsigned char a[SHA256_LEN] = { 0 }, b[SHA256_LEN] = { 0 };
	unsigned char diff = 0;
	bool ok;

	if (given == NULL || expected == NULL)
		return false;
	ok = gnutls_hash_fast(GNUTLS_DIG_SHA256, given, strlen(given), a) == 0 &&
	    gnutls_hash_fast(GNUTLS_DIG_SHA256, expected, strlen(expected), b) == 0;
	for (size_t i = 0; i < SHA256_LEN; i++)
		diff |= (unsigned char)(a[i] ^ b[i]);
	auth_wipe(a, sizeof(a));
	auth_wipe(b, sizeof(b));
	return ok && diff == 0;
}

void
auth_wipe(void *p, size_t len)
{
	if (p != NULL && len > 0)
		gnutls_memset(p, 0, len);
}
