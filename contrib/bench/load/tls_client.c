/* SPDX-License-Identifier: MIT */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tls.h"                        /* the project's default priority string */
#include "tls_client.h"

struct load_tls {
	gnutls_certificate_credentials_t cred;
	gnutls_priority_t prio;
	char name[256];                 /* SNI and verified name; "" for an IP literal without --tls-name */
	bool verify;
};

static bool
is_ip_literal(const char *name)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

struct load_tls *
load_tls_new(const struct load_opts *o, char *err, size_t errlen)
{
	const char *prio = o->tls_priority != NULL ? o->tls_priority : TLS_DEFAULT_PRIORITY;
	const char *errpos = NULL;
	struct load_tls *t;
	int r;

	t = calloc(1, sizeof(*t));
	if (t == NULL || gnutls_certificate_allocate_credentials(&t->cred) < 0) {
		snprintf(err, errlen, "cannot allocate TLS credentials");
		goto fail;
	}
	if (o->cafile != NULL) {
		r = gnutls_certificate_set_x509_trust_file(t->cred, o->cafile, GNUTLS_X509_FMT_PEM);
		if (r <= 0) {
			snprintf(err, errlen, "--cafile: no CA certificate loaded from %s%s%s", o->cafile,
			    r < 0 ? ": " : "", r < 0 ? gnutls_strerror(r) : "");
			goto fail;
		}
		t->verify = true;
	}
	if ((r = gnutls_priority_init(&t->prio, prio, &errpos)) < 0) {
		snprintf(err, errlen, "--tls-priority: \"%s\": %s", prio, gnutls_strerror(r));
		goto fail;
	}
	snprintf(t->name, sizeof(t->name), "%s", o->tls_name != NULL ? o->tls_name : o->host);
	return t;
fail:
	load_tls_free(t);
	return NULL;
}

void
load_tls_free(struct load_tls *t)
{
	if (t == NULL)
		return;
	if (t->prio != NULL)
		gnutls_priority_deinit(t->prio);
	if (t->cred != NULL)
		gnutls_certificate_free_credentials(t->cred);
	free(t);
}

int
load_tls_session(const struct load_tls *t, int fd, gnutls_session_t *out)
{
	gnutls_session_t s;
	int r;

	/* NONBLOCK: the event loop waits, never GnuTLS. NO_SIGNAL: no SIGPIPE. */
	r = gnutls_init(&s, GNUTLS_CLIENT | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
	if (r < 0)
		return r;
	if ((r = gnutls_priority_set(s, t->prio)) < 0 ||
	    (r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, t->cred)) < 0 ||
	    (!is_ip_literal(t->name) &&
	    (r = gnutls_server_name_set(s, GNUTLS_NAME_DNS, t->name, strlen(t->name))) < 0)) {
		gnutls_deinit(s);
		return r;
	}
	if (t->verify)
		gnutls_session_set_verify_cert(s, t->name, 0);
	/* GnuTLS would time the handshake by poll()ing the socket; the loop times it. */
	gnutls_handshake_set_timeout(s, 0);
	gnutls_transport_set_int(s, fd);
	*out = s;
	return 0;
}

void
load_tls_strerror(gnutls_session_t s, int r, char *buf, size_t len)
{
	gnutls_datum_t out;

	if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR &&
	    gnutls_certificate_verification_status_print(gnutls_session_get_verify_cert_status(s),
	    GNUTLS_CRT_X509, &out, 0) == 0) {
		snprintf(buf, len, "certificate verify failed: %s", (const char *)out.data);
		gnutls_free(out.data);
		return;
	}
	if (r == GNUTLS_E_FATAL_ALERT_RECEIVED) {
		snprintf(buf, len, "TLS alert received: %s", gnutls_alert_get_name(gnutls_alert_get(s)));
		return;
	}
	snprintf(buf, len, "%s", gnutls_strerror(r));
}
