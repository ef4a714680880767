/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLUSTER_URL_H
#define SMTPMUX_CLUSTER_URL_H

#include <stdbool.h>
#include <stddef.h>

/*
 * The `cluster.redis:` address, parsed (a pure function: unit tested and in
 * the configuration's fuzz target):
 *
 *   redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]     TCP; HOST a name, an IPv4
 *                                                  address or [IPv6]; PORT 6379
 *   rediss://...                                   the same over TLS
 *   unix:PATH[?db=DB]  unix://PATH[?db=DB]         a Unix socket (PATH absolute)
 *
 * USER and PASSWORD may be percent-encoded (%40 for "@").
 */
struct cluster_url {
	char *host;                      /* NULL for a Unix socket */
	char *port;                      /* "6379" by default */
	char *socket;                    /* the socket's path, or NULL */
	bool tls;                        /* rediss://: HOST is also the name the
	                                    server's certificate must carry */
	unsigned db;                     /* 0 by default */
	char *username;                  /* NULL: none (Redis' "default" user) */
	char *password;                  /* NULL: no AUTH */
	char *display;                   /* the address without USER and PASSWORD */
};

/*
 * Fills url from text. Returns 0, or -1 with the reason in why (and url
 * freed). The strings are malloc'ed: cluster_url_free() them.
 */
int cluster_url_parse(const char *text, struct cluster_url *url, char *why, size_t whylen);
void cluster_url_free(struct cluster_url *url);

#endif
