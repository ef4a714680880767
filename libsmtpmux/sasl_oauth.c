/* SPDX-License-Identifier: MIT */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"
#include "json_object.h"
#include "log.h"
#include "sasl_oauth.h"
#include "token_response.h"

#define KVSEP "\x01"
#define ERROR_JSON_MAX 2048              /* a decoded error challenge */

const char *
sasl_oauth_name(enum sasl_oauth_mech mech)
{
	return mech == SASL_OAUTHBEARER ? "OAUTHBEARER" : "XOAUTH2";
}

const char *
sasl_oauth_abort_line(enum sasl_oauth_mech mech)
{
	return mech == SASL_OAUTHBEARER ? "AQ==" : "";
}

/* Nothing below 0x20 (^A separates the fields) and no DEL. */
static bool
field_ok(const char *s)
{
	for (; *s != '\0'; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return false;
	return true;
}

/* RFC 5801 saslname: "=" and "," travel as "=3D" and "=2C". */
static size_t
put_saslname(char *out, const char *user)
{
	size_t n = 0;

	for (; *user != '\0'; user++) {
		if (*user == '=' || *user == ',') {
			memcpy(out + n, *user == '=' ? "=3D" : "=2C", 3);
			n += 3;
		} else
			out[n++] = *user;
	}
	return n;
}

/* The client's first message, before base64, into raw (sized by caller). */
static size_t
build_message(enum sasl_oauth_mech mech, const char *user, const char *host,
    const char *port, const char *token, size_t token_len, char *raw)
{
	size_t n;

	if (mech == SASL_XOAUTH2) {
		n = (size_t)sprintf(raw, "user=%s" KVSEP "auth=Bearer ", user);
	} else {
		n = (size_t)sprintf(raw, "n,a=");
		n += put_saslname(raw + n, user);
		n += (size_t)sprintf(raw + n, "," KVSEP "host=%s" KVSEP "port=%s" KVSEP
		    "auth=Bearer ", host, port);
	}
	memcpy(raw + n, token, token_len);
	n += token_len;
	memcpy(raw + n, KVSEP KVSEP, 2);
	return n + 2;
}

int
sasl_oauth_encode(enum sasl_oauth_mech mech, const char *user, const char *host,
    const char *port, const char *token, size_t token_len, struct evbuffer *out)
{
	size_t cap, n, b64cap;
	char *raw, *b64 = NULL;
	int rc = -1;

	if (user == NULL || user[0] == '\0' || !field_ok(user) ||
	    token_len > TOKEN_MAX || !token_is_b64token(token, token_len))
		return -1;
	if (mech == SASL_OAUTHBEARER && (host == NULL || port == NULL ||
	    !field_ok(host) || !field_ok(port)))
		return -1;
	/* every user octet may triple; the fixed words take under 64 */
	cap = 3 * strlen(user) + (host ? strlen(host) : 0) + (port ? strlen(port) : 0) +
	    token_len + 64;
	if ((raw = malloc(cap)) == NULL)
		return -1;
	n = build_message(mech, user, host, port, token, token_len, raw);
	b64cap = (n + 2) / 3 * 4 + 1;
	if ((b64 = malloc(b64cap)) != NULL && auth_b64_encode(raw, n, b64, b64cap) == 0 &&
	    evbuffer_add_printf(out, "AUTH %s %s\r\n", sasl_oauth_name(mech), b64) > 0)
		rc = 0;
	auth_wipe(raw, cap);
	free(raw);
	if (b64 != NULL) {
		auth_wipe(b64, b64cap);
		free(b64);
	}
	return rc;
}

struct error_summary {
	char *out;
	size_t len, used;
};

/* status, schemes and scope are what RFC 7628 3.2.2 defines; the rest
 * (Google adds nothing else) is not needed to understand a refusal. */
static int
on_error_member(const struct json_member *m, void *arg)
{
	struct error_summary *s = arg;
	char clean[160];
	int n;

	if (m->type != JSON_STRING || (strcmp(m->key, "status") != 0 &&
	    strcmp(m->key, "schemes") != 0 && strcmp(m->key, "scope") != 0))
		return 0;
	if (s->used >= s->len)
		return 0;
	n = snprintf(s->out + s->used, s->len - s->used, "%s%s=%s", s->used ? " " : "",
	    m->key, log_sanitize(clean, sizeof(clean), m->value, m->len));
	if (n > 0)
		s->used += (size_t)n < s->len - s->used ? (size_t)n : s->len - s->used - 1;
	return 0;
}

int
sasl_oauth_error_decode(const char *b64, size_t len, char *out, size_t outlen)
{
	struct error_summary s = { .out = out, .len = outlen };
	char json[ERROR_JSON_MAX + 1], err[96];
	int rc = -1;

	if (outlen == 0)
		return -1;
	out[0] = '\0';
	if (len == 0 || auth_b64_decode_text(b64, len, json, sizeof(json)) < 0)
		return -1;
	if (json_object_parse(json, strlen(json), on_error_member, &s, err, sizeof(err)) == 0) {
		if (s.used == 0)
			snprintf(out, outlen, "(no status)");
		rc = 0;
	}
	auth_wipe(json, sizeof(json));
	return rc;
}
