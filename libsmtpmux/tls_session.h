/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_TLS_SESSION_H
#define SMTPMUX_TLS_SESSION_H

#include <gnutls/gnutls.h>

#include "tls.h"

/*
 * Private to conn.c and tls.c: GnuTLS sessions built from the contexts of
 * tls.h, so that the rest of the daemon never sees a GnuTLS type.
 * Both constructors return 0 or a GnuTLS error code.
 */

int tls_server_session(struct tls_server_ctx *, gnutls_session_t *out);

/*
 * Sets SNI (unless servername is an IP literal), certificate verification
 * against servername when the context verifies, and the resumption data
 * remembered for servername, which is used once.
 */
int tls_client_session(struct tls_client_ctx *, const char *servername,
    gnutls_session_t *out);

/*
 * Stores the resumption data of an established session for the next
 * connection to servername. Returns true once it has usable data: under
 * TLS 1.3 that is only after the server's ticket arrived (fetching it
 * earlier would make GnuTLS wait for one), so callers retry after reads.
 */
bool tls_client_remember(struct tls_client_ctx *, const char *servername,
    gnutls_session_t);

#endif
