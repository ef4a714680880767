/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config_cluster.h"
#include "secret_file.h"
#include "tls.h"

#define DEFAULT_KEY_PREFIX "smtpmux:"
#define DEFAULT_TIMEOUT_MS 250
#define DEFAULT_CONNECT_TIMEOUT_MS 1000
#define DEFAULT_RETRY_INTERVAL 1
#define MAX_TIMEOUT_MS 10000         /* a delivery waits at most this for Redis */
#define MAX_KEY_PREFIX 64

#define OPT CYAML_FLAG_OPTIONAL
#define STR_OPT(key, member) \
	CYAML_FIELD_STRING_PTR(key, OPT, struct raw_cluster, member, 1, CYAML_UNLIMITED)

const cyaml_schema_field_t config_cluster_fields[] = {
	CYAML_FIELD_STRING_PTR("redis", CYAML_FLAG_DEFAULT, struct raw_cluster, redis,
	    1, CYAML_UNLIMITED),
	STR_OPT("username", username),
	STR_OPT("password_file", password_file),
	CYAML_FIELD_STRING_PTR("key_prefix", OPT, struct raw_cluster, key_prefix,
	    0, CYAML_UNLIMITED),
	CYAML_FIELD_UINT_PTR("timeout_ms", OPT, struct raw_cluster, timeout_ms),
	CYAML_FIELD_UINT_PTR("connect_timeout_ms", OPT, struct raw_cluster, connect_timeout_ms),
	CYAML_FIELD_UINT_PTR("retry_interval", OPT, struct raw_cluster, retry_interval),
	STR_OPT("tls_ca", tls_ca),
	STR_OPT("tls_cert", tls_cert),
	STR_OPT("tls_key", tls_key),
	CYAML_FIELD_END
};

static int
fail(const char **key, const char *which, char *why, size_t whylen, const char *what)
{
	*key = which;
	snprintf(why, whylen, "%s", what);
	return -1;
}

static int
check_range(const unsigned *raw, unsigned def, unsigned min, unsigned max, unsigned *out,
    const char **key, const char *which, char *why, size_t whylen)
{
	*out = raw != NULL ? *raw : def;
	if (*out < min || *out > max) {
		*key = which;
		snprintf(why, whylen, "must be from %u to %u", min, max);
		return -1;
	}
	return 0;
}

/* Redis keys may hold anything, but a prefix that one cannot type into
 * redis-cli helps nobody. */
static int
check_prefix(const char *p, const char **key, char *why, size_t whylen)
{
	if (strlen(p) > MAX_KEY_PREFIX)
		return fail(key, "key_prefix", why, whylen, "longer than 64 characters");
	for (; *p != '\0'; p++)
		if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f || *p == '{' || *p == '}')
			return fail(key, "key_prefix", why, whylen, "only printable characters "
			    "other than blanks, { and } (Redis Cluster hash tags)");
	return 0;
}

static int
take_url(const struct raw_cluster *raw, struct cluster_cfg *c, const char **key, char *why,
    size_t whylen, bool *inline_secret)
{
	struct cluster_url url;
	char reason[256];

	if (cluster_url_parse(raw->redis, &url, reason, sizeof(reason)) < 0) {
		*key = "redis";
		snprintf(why, whylen, "%s", reason);
		return -1;
	}
	c->url = url;
	if (url.password != NULL)
		*inline_secret = true;
	if (url.password != NULL && raw->password_file != NULL)
		return fail(key, "password_file", why, whylen,
		    "the redis: address has a password already");
	if (url.username != NULL && raw->username != NULL)
		return fail(key, "username", why, whylen, "the redis: address has a user already");
	return 0;
}

/* The TLS keys mean something only with rediss://, and a certificate
 * only with its key. */
static int
check_tls(const struct raw_cluster *raw, const struct cluster_url *url, const char **key,
    char *why, size_t whylen)
{
	static const char only_tls[] = "only for a rediss:// address (TLS)";

	if (!url->tls && raw->tls_ca != NULL)
		return fail(key, "tls_ca", why, whylen, only_tls);
	if (!url->tls && raw->tls_cert != NULL)
		return fail(key, "tls_cert", why, whylen, only_tls);
	if (raw->tls_cert != NULL && raw->tls_key == NULL)
		return fail(key, "tls_cert", why, whylen, "needs tls_key (its private key)");
	if (raw->tls_key != NULL && raw->tls_cert == NULL)
		return fail(key, "tls_key", why, whylen, "needs tls_cert (its certificate)");
	return 0;
}

int
config_cluster_check(const struct raw_cluster *raw, struct cluster_cfg *c,
    const char **key, char *why, size_t whylen, bool *inline_secret)
{
	memset(c, 0, sizeof(*c));
	if (raw == NULL)
		return 0;
	c->enabled = true;
	if (take_url(raw, c, key, why, whylen, inline_secret) < 0 ||
	    check_tls(raw, &c->url, key, why, whylen) < 0)
		return -1;
	if (raw->username != NULL && (c->url.username = strdup(raw->username)) == NULL)
		return fail(key, "username", why, whylen, "out of memory");
	if (c->url.username != NULL && c->url.password == NULL && raw->password_file == NULL)
		return fail(key, "username", why, whylen, "needs a password: in redis: or in "
		    "password_file (ACL users log in with one)");
	if (check_prefix(raw->key_prefix ? raw->key_prefix : DEFAULT_KEY_PREFIX, key, why,
	    whylen) < 0)
		return -1;
	if ((c->key_prefix = strdup(raw->key_prefix ? raw->key_prefix : DEFAULT_KEY_PREFIX)) == NULL)
		return fail(key, "key_prefix", why, whylen, "out of memory");
	return check_range(raw->timeout_ms, DEFAULT_TIMEOUT_MS, 1, MAX_TIMEOUT_MS,
	        &c->timeout_ms, key, "timeout_ms", why, whylen) ||
	    check_range(raw->connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS, 1, 60000,
	        &c->connect_timeout_ms, key, "connect_timeout_ms", why, whylen) ||
	    check_range(raw->retry_interval, DEFAULT_RETRY_INTERVAL, 1, 3600,
	        &c->retry_interval, key, "retry_interval", why, whylen) ? -1 : 0;
}

/* Loaded here, in the master, so that a missing or broken file refuses the
 * configuration (and `smtpmuxd -t` says so) rather than every link. */
static int
build_tls(const struct raw_cluster *raw, const char *config_dir, struct cluster_cfg *c,
    const char **key, char *why, size_t whylen)
{
	char *ca = NULL, *cert = NULL, *pkey = NULL;
	int rc = -1;

	if ((raw->tls_ca != NULL && (ca = config_resolve(config_dir, raw->tls_ca)) == NULL) ||
	    (raw->tls_cert != NULL && (cert = config_resolve(config_dir, raw->tls_cert)) == NULL) ||
	    (raw->tls_key != NULL && (pkey = config_resolve(config_dir, raw->tls_key)) == NULL)) {
		fail(key, "", why, whylen, "out of memory");
		goto out;
	}
	why[0] = '\0';
	if ((c->tls = tls_client_new(ca, true, TLS_DEFAULT_PRIORITY, why, whylen)) == NULL) {
		*key = raw->tls_ca != NULL ? "tls_ca" : "redis";
		if (why[0] == '\0')
			snprintf(why, whylen, "cannot set up TLS");
		goto out;
	}
	if (cert != NULL && tls_client_set_keypair(c->tls, cert, pkey, why, whylen) < 0) {
		*key = "tls_cert";
		goto out;
	}
	rc = 0;
out:
	free(ca);
	free(cert);
	free(pkey);
	return rc;
}

int
config_cluster_build(const struct raw_cluster *raw, const char *config_dir,
    struct cluster_cfg *c, const char **key, char *why, size_t whylen)
{
	if (raw == NULL)
		return 0;
	if (c->url.tls && build_tls(raw, config_dir, c, key, why, whylen) < 0)
		return -1;
	if (raw->password_file == NULL)
		return 0;
	free(c->url.password);
	if ((c->url.password = secret_file_read(raw->password_file, config_dir, why, whylen)) == NULL) {
		*key = "password_file";
		return -1;
	}
	return 0;
}

void
config_cluster_free(struct cluster_cfg *c)
{
	cluster_url_free(&c->url);
	tls_client_free(c->tls);
	free(c->key_prefix);
	memset(c, 0, sizeof(*c));
}
