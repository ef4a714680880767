/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONFIG_CLUSTER_H
#define SMTPMUX_CONFIG_CLUSTER_H

#include <stdbool.h>
#include <stddef.h>

#include <cyaml/cyaml.h>

#include "config.h"

/*
 * The `cluster:` section: its YAML layout (for config.c's schema) and the
 * checks that turn it into a struct cluster_cfg. Private to the
 * configuration loader; everyone else reads struct cluster_cfg.
 */

/* Optional scalars are pointers, so that "absent" and "0" differ. */
struct raw_cluster {
	char *redis;
	char *username;
	char *password_file;
	char *key_prefix;
	unsigned *timeout_ms;
	unsigned *connect_timeout_ms;
	unsigned *retry_interval;
	char *tls_ca;
	char *tls_cert;
	char *tls_key;
};

extern const cyaml_schema_field_t config_cluster_fields[];

/*
 * Fills c from raw (NULL: the section is absent, and c says disabled).
 * Returns 0, or -1 with the offending key of the section in *key ("" for
 * the section itself) and the reason in why. *inline_secret is set when a
 * password is written in the file (in the redis: address).
 */
int config_cluster_check(const struct raw_cluster *raw, struct cluster_cfg *c,
    const char **key, char *why, size_t whylen, bool *inline_secret);

/* Reads `password_file:` (relative to config_dir or $CREDENTIALS_DIRECTORY)
 * and, for rediss://, loads the TLS files (relative to config_dir). */
int config_cluster_build(const struct raw_cluster *raw, const char *config_dir,
    struct cluster_cfg *c, const char **key, char *why, size_t whylen);

void config_cluster_free(struct cluster_cfg *c);

#endif
