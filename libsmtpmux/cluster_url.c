/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster_url.h"

#define REDIS_DEFAULT_PORT "6379"
#define DB_MAX 1000000u              /* far above Redis' `databases` (16) */

static int
failv(struct cluster_url *url, char *why, size_t whylen, const char *what)
{
	snprintf(why, whylen, "%s", what);
	cluster_url_free(url);
	return -1;
}

static int
hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* A percent-decoded copy of s[0..len); NULL when malformed or holding NUL. */
static char *
decode(const char *s, size_t len)
{
	char *out = malloc(len + 1), *o = out;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < len; i++) {
		int hi, lo;

		if (s[i] != '%') {
			*o++ = s[i];
			continue;
		}
		if (i + 2 >= len) {
			free(out);
			return NULL;
		}
		hi = hexval((unsigned char)s[i + 1]);
		lo = hexval((unsigned char)s[i + 2]);
		if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
			free(out);
			return NULL;
		}
		*o++ = (char)(hi * 16 + lo);
		i += 2;
	}
	*o = '\0';
	return out;
}

static char *
dup_n(const char *s, size_t len)
{
	char *out = malloc(len + 1);

	if (out != NULL) {
		memcpy(out, s, len);
		out[len] = '\0';
	}
	return out;
}

/* A decimal number without sign, at most max; -1 otherwise. */
static long
number(const char *s, size_t len, unsigned long max)
{
	unsigned long v = 0;

	if (len == 0 || len > 10)
		return -1;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (unsigned long)(s[i] - '0');
	}
	return v <= max ? (long)v : -1;
}

/* "USER:PASSWORD", ":PASSWORD" or "PASSWORD" (the last as redis-cli -u). */
static int
parse_userinfo(const char *s, size_t len, struct cluster_url *url)
{
	const char *colon = memchr(s, ':', len);

	if (colon == NULL)
		return (url->password = decode(s, len)) != NULL && url->password[0] ? 0 : -1;
	if (colon > s && (url->username = decode(s, (size_t)(colon - s))) == NULL)
		return -1;
	url->password = decode(colon + 1, len - (size_t)(colon - s) - 1);
	return url->password != NULL && url->password[0] ? 0 : -1;
}

static bool
host_char_ok(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
	    c == '.' || c == '-' || c == '_';
}

/* HOST[:PORT] or [V6][:PORT]. */
static int
parse_hostport(const char *s, size_t len, struct cluster_url *url, char *why, size_t whylen)
{
	const char *host = s, *port = NULL;
	size_t hlen = len, plen = 0;

	if (len > 0 && s[0] == '[') {
		const char *close = memchr(s, ']', len);

		if (close == NULL)
			return snprintf(why, whylen, "missing ] after the IPv6 address"), -1;
		host = s + 1;
		hlen = (size_t)(close - host);
		if (close + 1 < s + len) {
			if (close[1] != ':')
				return snprintf(why, whylen, "unexpected text after ]"), -1;
			port = close + 2;
			plen = len - (size_t)(port - s);
		}
		for (size_t i = 0; i < hlen; i++)
			if (!(host_char_ok(host[i]) || host[i] == ':'))
				return snprintf(why, whylen, "not an IPv6 address in []"), -1;
	} else {
		const char *colon = memchr(s, ':', len);

		if (colon != NULL) {
			hlen = (size_t)(colon - s);
			port = colon + 1;
			plen = len - hlen - 1;
		}
		for (size_t i = 0; i < hlen; i++)
			if (!host_char_ok(host[i]))
				return snprintf(why, whylen, "the host has a character that no host "
				    "name or address has"), -1;
	}
	if (hlen == 0)
		return snprintf(why, whylen, "no host"), -1;
	if (port != NULL && number(port, plen, 65535) <= 0)
		return snprintf(why, whylen, "the port must be a number from 1 to 65535"), -1;
	url->host = dup_n(host, hlen);
	url->port = port != NULL ? dup_n(port, plen) : strdup(REDIS_DEFAULT_PORT);
	return url->host != NULL && url->port != NULL ? 0 :
	    (snprintf(why, whylen, "out of memory"), -1);
}

static int
parse_db(const char *s, size_t len, struct cluster_url *url, char *why, size_t whylen)
{
	long db = number(s, len, DB_MAX);

	if (len == 0)
		return 0;
	if (db < 0)
		return snprintf(why, whylen, "the database must be a number"), -1;
	url->db = (unsigned)db;
	return 0;
}

static int
parse_tcp(const char *rest, struct cluster_url *url, char *why, size_t whylen)
{
	size_t len = strcspn(rest, "/?#");
	const char *at = NULL, *hp = rest, *path = rest + len;

	for (size_t i = 0; i < len; i++)
		if (rest[i] == '@')
			at = rest + i;       /* the last one: a password may hold an unencoded @ */
	if (at != NULL) {
		if (parse_userinfo(rest, (size_t)(at - rest), url) < 0)
			return snprintf(why, whylen, "cannot read the user and password before @ "
			    "(percent-encode special characters, e.g. %%40 for @)"), -1;
		hp = at + 1;
	}
	if (parse_hostport(hp, (size_t)(rest + len - hp), url, why, whylen) < 0)
		return -1;
	if (*path == '?' || *path == '#')
		return snprintf(why, whylen, "unexpected %c: write the database as /N", *path), -1;
	if (*path == '/' && parse_db(path + 1, strlen(path + 1), url, why, whylen) < 0)
		return -1;
	return 0;
}

static int
parse_unix(const char *rest, struct cluster_url *url, char *why, size_t whylen)
{
	const char *q = strchr(rest, '?');
	size_t len = q != NULL ? (size_t)(q - rest) : strlen(rest);

	if (strncmp(rest, "//", 2) == 0) {
		rest += 2;
		len -= 2;
	}
	if (len == 0 || rest[0] != '/')
		return snprintf(why, whylen, "a Unix socket needs an absolute path, "
		    "e.g. unix:/run/redis/redis-server.sock"), -1;
	if ((url->socket = dup_n(rest, len)) == NULL)
		return snprintf(why, whylen, "out of memory"), -1;
	if (q != NULL) {
		if (strncmp(q, "?db=", 4) != 0)
			return snprintf(why, whylen, "the only parameter is ?db=N"), -1;
		return parse_db(q + 4, strlen(q + 4), url, why, whylen);
	}
	return 0;
}

static int
make_display(struct cluster_url *url)
{
	char buf[1024];

	if (url->socket != NULL)
		snprintf(buf, sizeof(buf), "unix:%s?db=%u", url->socket, url->db);
	else
		snprintf(buf, sizeof(buf), "%s://%s%s%s:%s/%u", url->tls ? "rediss" : "redis",
		    strchr(url->host, ':') ? "[" : "", url->host, strchr(url->host, ':') ? "]" : "", url->port, url->db);
	return (url->display = strdup(buf)) != NULL ? 0 : -1;
}

int
cluster_url_parse(const char *text, struct cluster_url *url, char *why, size_t whylen)
{
	static const char tcp[] = "redis://", tls[] = "rediss://", sock[] = "unix:";
	int rc;

	memset(url, 0, sizeof(*url));
	if (text == NULL || text[0] == '\0')
		return failv(url, why, whylen, "empty");
	for (const char *p = text; *p != '\0'; p++)
		if ((unsigned char)*p <= 0x20 || *p == 0x7f)
			return failv(url, why, whylen, "blanks and control characters have no "
			    "place in it");
	if (strncmp(text, tcp, sizeof(tcp) - 1) == 0) {
		rc = parse_tcp(text + sizeof(tcp) - 1, url, why, whylen);
	} else if (strncmp(text, tls, sizeof(tls) - 1) == 0) {
		url->tls = true;
		rc = parse_tcp(text + sizeof(tls) - 1, url, why, whylen);
	}
	else if (strncmp(text, sock, sizeof(sock) - 1) == 0)
		rc = parse_unix(text + sizeof(sock) - 1, url, why, whylen);
	else
		return failv(url, why, whylen, "must start with redis://, rediss:// or unix:");
	if (rc == 0 && make_display(url) < 0) {
		snprintf(why, whylen, "out of memory");
		rc = -1;
	}
	if (rc < 0)
		cluster_url_free(url);
	return rc;
}

/* The password is wiped: it stays out of freed memory. */
void
cluster_url_free(struct cluster_url *url)
{
	if (url->password != NULL) {
		volatile char *p = url->password;

		while (*p != '\0')
			*p++ = '\0';
	}
	free(url->host);
	free(url->port);
	free(url->socket);
	free(url->username);
	free(url->password);
	free(url->display);
	memset(url, 0, sizeof(*url));
}
