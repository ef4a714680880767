/* SPDX-License-Identifier: MIT */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "auth.h"
#include "json_object.h"
#include "log.h"
#include "token_response.h"

/* Longer than any provider's token lifetime; more is a broken server. */
#define LIFETIME_MAX (10LL * 365 * 24 * 3600)

enum field_bit {
	F_ACCESS = 1, F_REFRESH = 2, F_EXPIRES = 4, F_TYPE = 8, F_ERROR = 16, F_DESC = 32
};

static const struct {
	const char *name;
	unsigned bit;
} fields[] = {
	{ "access_token", F_ACCESS },
	{ "refresh_token", F_REFRESH },
	{ "expires_in", F_EXPIRES },
	{ "token_type", F_TYPE },
	{ "error", F_ERROR },
	{ "error_description", F_DESC },
};

struct collect {
	struct token_response *out;
	unsigned seen;
	char token_type[16];
	char why[96];                    /* why a member was refused */
};

static int __attribute__((format(printf, 2, 3)))
refuse(struct collect *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->why, sizeof(c->why), fmt, ap);
	va_end(ap);
	return -1;
}

static bool
printable_in(const char *s, size_t len, const char *excluded)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char ch = (unsigned char)s[i];

		if (ch < 0x20 || ch > 0x7e || (excluded != NULL && strchr(excluded, ch) != NULL))
			return false;
	}
	return true;
}

static int
copy_string(struct collect *c, const struct json_member *m, char *dst, size_t size)
{
	if (m->type != JSON_STRING)
		return refuse(c, "%s is not a string", m->key);
	if (m->len >= size)
		return refuse(c, "%s is too long", m->key);
	memcpy(dst, m->value, m->len + 1);
	return 0;
}

/* A number, or digits in a string (Azure AD's v1 endpoint sends "3599");
 * whole seconds only. */
static int
copy_seconds(struct collect *c, const struct json_member *m, long long *out)
{
	long long v = 0;

	if (m->len == 0 || m->len > 12)
		return refuse(c, "%s is out of range", m->key);
	for (size_t i = 0; i < m->len; i++) {
		if (m->value[i] < '0' || m->value[i] > '9')
			return refuse(c, "%s is not a whole number of seconds", m->key);
		v = v * 10 + (m->value[i] - '0');
	}
	if (v > LIFETIME_MAX)
		return refuse(c, "%s is out of range", m->key);
	*out = v;
	return 0;
}

static int
take_field(struct collect *c, unsigned bit, const struct json_member *m)
{
	struct token_response *out = c->out;

	switch (bit) {
	case F_ACCESS:
		return copy_string(c, m, out->access_token, sizeof(out->access_token));
	case F_REFRESH:
		if (copy_string(c, m, out->refresh_token, sizeof(out->refresh_token)) < 0)
			return -1;
		/* RFC 6749 A.17: VSCHAR; it is written to a file, one line. */
		return printable_in(m->value, m->len, NULL) ? 0 :
		    refuse(c, "%s holds characters a refresh token may not", m->key);
	case F_EXPIRES:
		return copy_seconds(c, m, &out->expires_in);
	case F_TYPE:
		return copy_string(c, m, c->token_type, sizeof(c->token_type));
	case F_ERROR:
		if (copy_string(c, m, out->error, sizeof(out->error)) < 0)
			return -1;
		/* RFC 6749 5.2: %x20-21 / %x23-5B / %x5D-7E */
		return printable_in(m->value, m->len, "\"\\") ? 0 :
		    refuse(c, "%s holds characters an error code may not", m->key);
	default:
		if (m->type != JSON_STRING)
			return refuse(c, "%s is not a string", m->key);
		log_sanitize(out->error_description, sizeof(out->error_description),
		    m->value, m->len);
		return 0;
	}
}

static int
on_member(const struct json_member *m, void *arg)
{
	struct collect *c = arg;

	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		if (strcmp(m->key, fields[i].name) != 0)
			continue;
		if (c->seen & fields[i].bit)
			return refuse(c, "duplicate %s", m->key);
		c->seen |= fields[i].bit;
		return take_field(c, fields[i].bit, m);
	}
	return 0;                        /* scope, id_token, ext_expires_in... */
}

static void
secrets_wipe(struct token_response *out)
{
	auth_wipe(out->access_token, sizeof(out->access_token));
	auth_wipe(out->refresh_token, sizeof(out->refresh_token));
}

void
token_response_wipe(struct token_response *out)
{
	auth_wipe(out, sizeof(*out));
}

static int
parse_json(const char *body, size_t len, struct token_response *out, struct collect *c,
    char *jerr, size_t jerrlen)
{
	memset(out, 0, sizeof(*out));
	out->expires_in = -1;
	memset(c, 0, sizeof(*c));
	c->out = out;
	if (json_object_parse(body, len, on_member, c, jerr, jerrlen) < 0) {
		if (c->why[0] != '\0')
			snprintf(jerr, jerrlen, "%s", c->why);
		return -1;
	}
	return 0;
}

/* "HTTP 400 invalid_grant (description)" */
static void
oauth_error(const struct token_response *out, const char *what, char *why, size_t whylen)
{
	const char *d = out->error_description;

	snprintf(why, whylen, "%s %s%s%s%s", what, out->error, d[0] ? " (" : "", d, d[0] ? ")" : "");
}

/* The checks of a response that parsed; what: "HTTP 200", "output". */
static int
check_success(struct token_response *out, const struct collect *c, bool need_type,
    const char *what, char *why, size_t whylen)
{
	char type[sizeof(c->token_type)];

	if (out->error[0] != '\0')
		oauth_error(out, what, why, whylen);
	else if (out->access_token[0] == '\0')
		snprintf(why, whylen, "%s: no access_token in the response", what);
	else if (!token_is_b64token(out->access_token, strlen(out->access_token)))
		snprintf(why, whylen, "%s: access_token is not a bearer token", what);
	else if (need_type && !(c->seen & F_TYPE))
		snprintf(why, whylen, "%s: no token_type in the response", what);
	else if (c->seen & F_TYPE && strcasecmp(c->token_type, "Bearer") != 0)
		snprintf(why, whylen, "%s: token_type \"%s\" is not Bearer", what,
		    log_sanitize(type, sizeof(type), c->token_type, strlen(c->token_type)));
	else
		return 0;
	secrets_wipe(out);
	return -1;
}

int
token_response_parse(long status, const char *body, size_t len,
    struct token_response *out, char *why, size_t whylen)
{
	struct collect c;
	char jerr[96], what[32];
	int parsed = parse_json(body, len, out, &c, jerr, sizeof(jerr));

	snprintf(what, sizeof(what), "HTTP %ld", status);
	if (status != 200) {
		if (parsed == 0 && out->error[0] != '\0')
			oauth_error(out, what, why, whylen);
		else
			snprintf(why, whylen, "%s", what);
		secrets_wipe(out);
		return -1;
	}
	if (parsed < 0) {
		snprintf(why, whylen, "%s: malformed token response (%s)", what, jerr);
		secrets_wipe(out);
		return -1;
	}
	return check_success(out, &c, true, what, why, whylen);
}

static bool
blank(char ch)
{
	return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
}

int
token_output_parse(const char *text, size_t len, struct token_response *out,
    char *why, size_t whylen)
{
	struct collect c;
	char jerr[96];
	size_t i = 0, n;

	while (i < len && blank(text[i]))
		i++;
	if (i < len && text[i] == '{') {
		if (parse_json(text + i, len - i, out, &c, jerr, sizeof(jerr)) < 0) {
			snprintf(why, whylen, "output: malformed token response (%s)", jerr);
			secrets_wipe(out);
			return -1;
		}
		return check_success(out, &c, false, "output", why, whylen);
	}
	memset(out, 0, sizeof(*out));
	out->expires_in = -1;
	for (n = 0; i + n < len && text[i + n] != '\n'; n++)
		;
	while (n > 0 && blank(text[i + n - 1]))
		n--;
	if (n == 0)
		snprintf(why, whylen, "output: no token");
	else if (n > TOKEN_MAX)
		snprintf(why, whylen, "output: token longer than %d octets", TOKEN_MAX);
	else if (!token_is_b64token(text + i, n))
		snprintf(why, whylen, "output: not a bearer token");
	else {
		memcpy(out->access_token, text + i, n);
		out->access_token[n] = '\0';
		return 0;
	}
	return -1;
}

bool
token_is_b64token(const char *s, size_t len)
{
	size_t i = 0;

	while (i < len && s[i] != '=') {
		char ch = s[i];

		if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
		    (ch >= '0' && ch <= '9') || strchr("-._~+/", ch) != NULL) || ch == '\0')
			return false;
		i++;
	}
	if (i == 0)
		return false;
	while (i < len && s[i] == '=')
		i++;
	return i == len;
}
