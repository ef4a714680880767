/* SPDX-License-Identifier: MIT */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "tls.h"
#include "tls_session.h"

/*
 * Resumption data is kept per server name; a context serves one
 * downstream, so a handful of names (a host and its MX fallbacks) at most.
 */
#define TLS_RESUME_MAX 8

struct tls_server_ctx {
	gnutls_certificate_credentials_t cred;
	gnutls_priority_t prio;
	/*
	 * Generated once per configuration, before the workers fork, so a
	 * ticket issued by one worker resumes in any other.
	 */
	gnutls_datum_t ticket_key;
};

struct tls_resume {
	char *name;
	gnutls_datum_t data;
};

struct tls_client_ctx {
	gnutls_certificate_credentials_t cred;
	gnutls_priority_t prio;
	bool verify;
	/* Most recently stored first; the worker is single-threaded. */
	struct tls_resume resume[TLS_RESUME_MAX];
	size_t n_resume;
};

int
tls_global_init(void)
{
	if (gnutls_check_version("3.7.0") == NULL)
		return -1;
	return gnutls_global_init() < 0 ? -1 : 0;
}

void
tls_global_deinit(void)
{
	gnutls_global_deinit();
}

static int
tls_priority_new(gnutls_priority_t *prio, const char *priority, char *err, size_t errlen)
{
	const char *errpos = NULL;
	int r;

	if (priority == NULL || *priority == '\0')
		priority = TLS_DEFAULT_PRIORITY;
	r = gnutls_priority_init(prio, priority, &errpos);
	if (r == 0)
		return 0;
	if (r == GNUTLS_E_INVALID_REQUEST && errpos != NULL)
		snprintf(err, errlen, "invalid TLS priority string \"%s\" at position %td (\"%s\")",
		    priority, errpos - priority, errpos);
	else
		snprintf(err, errlen, "invalid TLS priority string \"%s\": %s",
		    priority, gnutls_strerror(r));
	return -1;
}

/* GnuTLS says only "Error while reading file."; name the file and why. */
static bool
tls_unreadable(const char *path, char *err, size_t errlen)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd >= 0) {
		close(fd);
		return false;
	}
	snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
	return true;
}

static int
tls_load_keypair(gnutls_certificate_credentials_t cred, const char *cert,
    const char *key, char *err, size_t errlen)
{
	int r;

	r = gnutls_certificate_set_x509_key_file2(cred, cert, key, GNUTLS_X509_FMT_PEM, NULL, 0);
	if (r >= 0)
		return 0;
	if (r == GNUTLS_E_FILE_ERROR &&
	    (tls_unreadable(cert, err, errlen) || tls_unreadable(key, err, errlen)))
		return -1;
	snprintf(err, errlen, "cannot load certificate %s / key %s: %s%s", cert, key,
	    gnutls_strerror(r),
	    /* Some GnuTLS versions report a key mismatch only as this. */
	    r == GNUTLS_E_INVALID_REQUEST ? " (mismatched key?)" : "");
	return -1;
}

struct tls_server_ctx *
tls_server_new(const char *cert, const char *key, const char *priority,
    char *err, size_t errlen)
{
	struct tls_server_ctx *ctx;

	ctx = calloc(1, sizeof(*ctx));
	if (ctx == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	if (gnutls_certificate_allocate_credentials(&ctx->cred) < 0) {
		snprintf(err, errlen, "cannot allocate TLS credentials");
		goto fail;
	}
	if (tls_load_keypair(ctx->cred, cert, key, err, errlen) < 0)
		goto fail;
	if (tls_priority_new(&ctx->prio, priority, err, errlen) < 0)
		goto fail;
	if (gnutls_session_ticket_key_generate(&ctx->ticket_key) < 0) {
		snprintf(err, errlen, "cannot generate a TLS session ticket key");
		goto fail;
	}
	return ctx;
fail:
	tls_server_free(ctx);
	return NULL;
}

void
tls_server_free(struct tls_server_ctx *ctx)
{
	if (ctx == NULL)
		return;
	if (ctx->ticket_key.data != NULL) {
		gnutls_memset(ctx->ticket_key.data, 0, ctx->ticket_key.size);
		gnutls_free(ctx->ticket_key.data);
	}
	if (ctx->prio != NULL)
		gnutls_priority_deinit(ctx->prio);
	if (ctx->cred != NULL)
		gnutls_certificate_free_credentials(ctx->cred);
	free(ctx);
}

static int
tls_load_trust(gnutls_certificate_credentials_t cred, const char *cafile,
    char *err, size_t errlen)
{
	int r;

	if (cafile != NULL) {
		r = gnutls_certificate_set_x509_trust_file(cred, cafile, GNUTLS_X509_FMT_PEM);
		if (r == GNUTLS_E_FILE_ERROR && tls_unreadable(cafile, err, errlen))
			return -1;
		if (r < 0) {
			snprintf(err, errlen, "cannot load CA file %s: %s", cafile, gnutls_strerror(r));
			return -1;
		}
		if (r == 0) {
			snprintf(err, errlen, "no CA certificate found in %s", cafile);
			return -1;
		}
		return 0;
	}
	r = gnutls_certificate_set_x509_system_trust(cred);
	if (r < 0) {
		snprintf(err, errlen, "cannot load the system trust store: %s", gnutls_strerror(r));
		return -1;
	}
	if (r == 0) {
		/* Every verification would fail: refuse the configuration now. */
		snprintf(err, errlen, "the system trust store is empty "
		    "(install ca-certificates or set a CA file)");
		return -1;
	}
	return 0;
}

struct tls_client_ctx *
tls_client_new(const char *cafile, bool verify, const char *priority,
    char *err, size_t errlen)
{
	struct tls_client_ctx *ctx;

	ctx = calloc(1, sizeof(*ctx));
	if (ctx == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	ctx->verify = verify;
	if (gnutls_certificate_allocate_credentials(&ctx->cred) < 0) {
		snprintf(err, errlen, "cannot allocate TLS credentials");
		goto fail;
	}
	if (verify && tls_load_trust(ctx->cred, cafile, err, errlen) < 0)
		goto fail;
	if (tls_priority_new(&ctx->prio, priority, err, errlen) < 0)
		goto fail;
	return ctx;
fail:
	tls_client_free(ctx);
	return NULL;
}

int
tls_client_set_keypair(struct tls_client_ctx *ctx, const char *cert, const char *key,
    char *err, size_t errlen)
{
	return tls_load_keypair(ctx->cred, cert, key, err, errlen);
}

static void
tls_resume_clear(struct tls_resume *r)
{
	free(r->name);
	gnutls_free(r->data.data);
	memset(r, 0, sizeof(*r));
}

void
tls_client_free(struct tls_client_ctx *ctx)
{
	if (ctx == NULL)
		return;
	for (size_t i = 0; i < ctx->n_resume; i++)
		tls_resume_clear(&ctx->resume[i]);
	if (ctx->prio != NULL)
		gnutls_priority_deinit(ctx->prio);
	if (ctx->cred != NULL)
		gnutls_certificate_free_credentials(ctx->cred);
	free(ctx);
}

static int
tls_session_new(gnutls_session_t *out, unsigned flags, gnutls_priority_t prio,
    gnutls_certificate_credentials_t cred)
{
	gnutls_session_t s;
	int r;

	/*
	 * NONBLOCK: GnuTLS never waits on the socket itself. NO_SIGNAL: a peer
	 * that resets must not raise SIGPIPE in a worker.
	 */
	r = gnutls_init(&s, flags | GNUTLS_NONBLOCK | GNUTLS_NO_SIGNAL);
	if (r < 0)
		return r;
	if ((r = gnutls_priority_set(s, prio)) < 0 ||
	    (r = gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, cred)) < 0) {
		gnutls_deinit(s);
		return r;
	}
	/*
	 * GnuTLS enforces its own handshake timeout by poll()ing the socket,
	 * which would block the worker; conn.c times the handshake instead.
	 */
	gnutls_handshake_set_timeout(s, 0);
	*out = s;
	return 0;
}

int
tls_server_session(struct tls_server_ctx *ctx, gnutls_session_t *out)
{
	int r;

	r = tls_session_new(out, GNUTLS_SERVER, ctx->prio, ctx->cred);
	if (r < 0)
		return r;
	r = gnutls_session_ticket_enable_server(*out, &ctx->ticket_key);
	if (r < 0) {
		gnutls_deinit(*out);
		*out = NULL;
	}
	return r;
}

static bool
tls_is_ip_literal(const char *name)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, name, buf) == 1 || inet_pton(AF_INET6, name, buf) == 1;
}

static struct tls_resume *
tls_resume_find(struct tls_client_ctx *ctx, const char *name)
{
	for (size_t i = 0; i < ctx->n_resume; i++)
		if (strcmp(ctx->resume[i].name, name) == 0)
			return &ctx->resume[i];
	return NULL;
}

/* Removes an entry, keeping the others most-recent first. */
static void
tls_resume_remove(struct tls_client_ctx *ctx, struct tls_resume *r)
{
	size_t i = (size_t)(r - ctx->resume);

	tls_resume_clear(r);
	memmove(&ctx->resume[i], &ctx->resume[i + 1],
	    (ctx->n_resume - i - 1) * sizeof(ctx->resume[0]));
	ctx->n_resume--;
	memset(&ctx->resume[ctx->n_resume], 0, sizeof(ctx->resume[0]));
}

int
tls_client_session(struct tls_client_ctx *ctx, const char *servername,
    gnutls_session_t *out)
{
	struct tls_resume *resume;
	const char *name = servername != NULL ? servername : "";
	int r;

	r = tls_session_new(out, GNUTLS_CLIENT, ctx->prio, ctx->cred);
	if (r < 0)
		return r;
	if (*name != '\0' && !tls_is_ip_literal(name) &&
	    (r = gnutls_server_name_set(*out, GNUTLS_NAME_DNS, name, strlen(name))) < 0)
		goto fail;
	if (ctx->verify)
		gnutls_session_set_verify_cert(*out, *name != '\0' ? name : NULL, 0);
	/*
	 * Resumption data is used once: TLS 1.3 tickets are single-use, and
	 * reuse would let an observer link the connections.
	 */
	resume = tls_resume_find(ctx, name);
	if (resume != NULL) {
		r = gnutls_session_set_data(*out, resume->data.data, resume->data.size);
		tls_resume_remove(ctx, resume);
		if (r < 0)
			goto fail;
	}
	return 0;
fail:
	gnutls_deinit(*out);
	*out = NULL;
	return r;
}

bool
tls_client_remember(struct tls_client_ctx *ctx, const char *servername,
    gnutls_session_t s)
{
	struct tls_resume *slot;
	gnutls_datum_t data;
	const char *name = servername != NULL ? servername : "";
	char *copy;

	if (gnutls_protocol_get_version(s) == GNUTLS_TLS1_3 &&
	    !(gnutls_session_get_flags(s) & GNUTLS_SFLAGS_SESSION_TICKET))
		return false;
	if (gnutls_session_get_data2(s, &data) < 0)
		return true;                    /* nothing to keep; stop asking */
	copy = strdup(name);
	if (copy == NULL) {
		gnutls_free(data.data);
		return true;
	}
	slot = tls_resume_find(ctx, name);
	if (slot != NULL)
		tls_resume_remove(ctx, slot);
	else if (ctx->n_resume == TLS_RESUME_MAX)
		tls_resume_remove(ctx, &ctx->resume[TLS_RESUME_MAX - 1]);
	memmove(&ctx->resume[1], &ctx->resume[0], ctx->n_resume * sizeof(ctx->resume[0]));
	ctx->resume[0].name = copy;
	ctx->resume[0].data = data;
	ctx->n_resume++;
	return true;
}
