/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_NETADDR_H
#define SMTPMUX_NETADDR_H

#include <stddef.h>
#include <sys/socket.h>

/*
 * Splits "host:port" or "[v6]:port" into freshly allocated host and port
 * strings. Returns 0, or -1 with a reason in err ("missing port", "bad
 * port", "empty host", ...).
 */
int netaddr_split(const char *text, char **host, char **port, char *err, size_t errlen);

/* Resolves a numeric host and port (no DNS). Returns 0 or -1. */
int netaddr_numeric(const char *host, const char *port,
    struct sockaddr_storage *ss, socklen_t *sslen);

/* Formats an address as "1.2.3.4" / "::1" (no port) into buf. */
const char *netaddr_ntop(const struct sockaddr *sa, char *buf, size_t len);

#endif
