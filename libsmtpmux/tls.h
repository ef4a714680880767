/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_TLS_H
#define SMTPMUX_TLS_H

#include <stdbool.h>
#include <stddef.h>

/*
 * GnuTLS credentials, built when a configuration loads (in the master, so
 * a bad certificate refuses the configuration) and shared by the workers
 * after fork.
 */

#define TLS_DEFAULT_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct tls_server_ctx;
struct tls_client_ctx;

/* Once per process, before any other tls_ call. */
int tls_global_init(void);
void tls_global_deinit(void);

/*
 * Loads a certificate chain and key (PEM) and checks that they match.
 * Returns NULL with a reason in err (naming the file) on failure.
 */
struct tls_server_ctx *tls_server_new(const char *cert, const char *key,
    const char *priority, char *err, size_t errlen);
void tls_server_free(struct tls_server_ctx *);

/*
 * Client credentials for one downstream: the system trust store, or cafile
 * (PEM) when given. verify=false skips certificate checks (logged by the
 * caller). Holds the TLS session-resumption data for that downstream.
 */
struct tls_client_ctx *tls_client_new(const char *cafile, bool verify,
    const char *priority, char *err, size_t errlen);
void tls_client_free(struct tls_client_ctx *);

/*
 * A certificate and key (PEM) the client presents when the server asks
 * for one (Redis' tls-auth-clients). Returns -1 with a reason in err.
 */
int tls_client_set_keypair(struct tls_client_ctx *, const char *cert, const char *key,
    char *err, size_t errlen);

#endif
