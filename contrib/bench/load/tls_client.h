/* SPDX-License-Identifier: MIT */
#ifndef SMTP_LOAD_TLS_CLIENT_H
#define SMTP_LOAD_TLS_CLIENT_H

#include <stddef.h>

#include <gnutls/gnutls.h>

#include "opts.h"

/*
 * GnuTLS client credentials for the run, built once and shared read-only
 * by every thread. Certificates are verified only when --cafile is given:
 * a benchmark usually runs against a throwaway certificate.
 */

struct load_tls;

struct load_tls *load_tls_new(const struct load_opts *, char *err, size_t errlen);
void load_tls_free(struct load_tls *);

/* A non-blocking client session on fd, with SNI and verification as configured. */
int load_tls_session(const struct load_tls *, int fd, gnutls_session_t *out);

/* Why a handshake or record call failed, for the error samples. */
void load_tls_strerror(gnutls_session_t, int r, char *buf, size_t len);

#endif
