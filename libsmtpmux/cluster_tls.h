/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CLUSTER_TLS_H
#define SMTPMUX_CLUSTER_TLS_H

#include <stddef.h>
#include <sys/socket.h>

#include <event2/event.h>

#include "tls.h"

/*
 * TLS to Redis under hiredis 0.14, which has none and whose asynchronous
 * client only connects by itself, to a host and port or a Unix socket
 * path, and then reads and writes that descriptor itself.
 *
 * So each rediss:// link gets a private bridge on its own loop: a Unix
 * socket listening in a fresh directory of mode 0700 under tmp_dir (only
 * this process' user can reach it), which takes one connection, from this
 * process (SO_PEERCRED), and is removed as soon as it has; and a TCP
 * connection to Redis with a GnuTLS client handshake (conn.c): the
 * certificate verified against the context's CA for servername (SNI when
 * it is a name). Octets are carried both ways unchanged; what hiredis
 * writes before the handshake is done waits in the bridge.
 *
 * Either side closing closes the other: hiredis then sees its connection
 * close. When the Redis side fails (connect, handshake, certificate,
 * timeout, reset), fail is called once with the reason first, so the link
 * can log that rather than hiredis' "connection closed". timeout_ms
 * bounds the TCP connect and the handshake.
 */

struct cluster_tls;

/* Called from the loop; must not free the bridge. */
typedef void (*cluster_tls_fail_fn)(void *arg, const char *why);

/* NULL with the reason in why when the socket cannot be made. */
struct cluster_tls *cluster_tls_new(struct event_base *base, const char *tmp_dir,
    const struct sockaddr *sa, socklen_t salen, struct tls_client_ctx *tls,
    const char *servername, unsigned timeout_ms, cluster_tls_fail_fn fail, void *arg,
    char *why, size_t whylen);

/* The Unix socket for redisAsyncConnectUnix(). */
const char *cluster_tls_path(const struct cluster_tls *);

/* Closes both sides and removes the socket and its directory. */
void cluster_tls_free(struct cluster_tls *);

#endif
