/* SPDX-License-Identifier: MIT */
#include <ctype.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "netaddr.h"

/*
 * Only numeric ports: a service name would make the meaning of a
 * configuration depend on /etc/services.
 */
static int
port_check(const char *port, char *err, size_t errlen)
{
	unsigned long v;
	char *end;

	if (*port == '\0') {
		snprintf(err, errlen, "missing port");
		return -1;
	}
	for (const char *p = port; *p != '\0'; p++) {
		if (!isdigit((unsigned char)*p)) {
			snprintf(err, errlen, "bad port \"%s\"", port);
			return -1;
		}
	}
	errno = 0;
	v = strtoul(port, &end, 10);
	if (errno != 0 || v < 1 || v > 65535) {
		snprintf(err, errlen, "port %s out of range (1-65535)", port);
		return -1;
	}
	return 0;
}

static int
host_check(const char *host, size_t len, char *err, size_t errlen)
{
	if (len == 0) {
		snprintf(err, errlen, "empty host");
		return -1;
	}
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)host[i];

		if (isspace(c) || iscntrl(c) || c == '[' || c == ']') {
			snprintf(err, errlen, "bad host \"%.*s\"", (int)len, host);
			return -1;
		}
	}
	return 0;
}

int
netaddr_split(const char *text, char **host, char **port, char *err, size_t errlen)
{
	const char *hs, *colon;
	size_t hlen;

	*host = *port = NULL;
	if (text == NULL || *text == '\0') {
		snprintf(err, errlen, "empty address");
		return -1;
	}
	if (text[0] == '[') {
		const char *close = strchr(text, ']');

		if (close == NULL) {
			snprintf(err, errlen, "missing \"]\" after IPv6 address");
			return -1;
		}
		hs = text + 1;
		hlen = (size_t)(close - hs);
		if (close[1] != ':') {
			snprintf(err, errlen, close[1] == '\0' ? "missing port" :
			    "expected \":PORT\" after \"]\"");
			return -1;
		}
		colon = close + 1;
	} else {
		colon = strrchr(text, ':');
		if (colon == NULL) {
			snprintf(err, errlen, "missing port");
			return -1;
		}
		hs = text;
		hlen = (size_t)(colon - hs);
		if (memchr(hs, ':', hlen) != NULL) {
			snprintf(err, errlen, "IPv6 address must be written \"[ADDR]:PORT\"");
			return -1;
		}
	}
	if (host_check(hs, hlen, err, errlen) == -1 ||
	    port_check(colon + 1, err, errlen) == -1)
		return -1;
	*host = strndup(hs, hlen);
	*port = strdup(colon + 1);
	if (*host == NULL || *port == NULL) {
		free(*host);
		free(*port);
		*host = *port = NULL;
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	return 0;
}

int
netaddr_numeric(const char *host, const char *port,
    struct sockaddr_storage *ss, socklen_t *sslen)
{
	struct addrinfo hints, *res;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
	if (getaddrinfo(host, port, &hints, &res) != 0)
		return -1;
	if (res->ai_addrlen > sizeof(*ss)) {
		freeaddrinfo(res);
		return -1;
	}
	memset(ss, 0, sizeof(*ss));
	memcpy(ss, res->ai_addr, res->ai_addrlen);
	*sslen = res->ai_addrlen;
	freeaddrinfo(res);
	return 0;
}

const char *
netaddr_ntop(const struct sockaddr *sa, char *buf, size_t len)
{
	socklen_t salen;

	switch (sa->sa_family) {
	case AF_INET:
		salen = sizeof(struct sockaddr_in);
		break;
	case AF_INET6:
		salen = sizeof(struct sockaddr_in6);
		break;
	default:
		snprintf(buf, len, "?");
		return buf;
	}
	if (getnameinfo(sa, salen, buf, (socklen_t)len, NULL, 0, NI_NUMERICHOST) != 0)
		snprintf(buf, len, "?");
	return buf;
}
