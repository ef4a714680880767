/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONFIG_OAUTH_H
#define SMTPMUX_CONFIG_OAUTH_H

#include <stdbool.h>
#include <stddef.h>

#include <cyaml/cyaml.h>

#include "config.h"

/*
 * How a downstream logs in: the keys `auth`, `oauth2`, `token_command`,
 * `token_timeout` and `token_lifetime` of a downstream, and the rules that
 * tie them to `user`, `pass` and `pass_file`. config.c owns the YAML
 * layout of a downstream (and copies user and the password) and hands
 * these keys over as loaded by libcyaml; this file checks them and builds
 * ds->auth and ds->token. Private to config.c.
 */

/* `oauth2:` as libcyaml loads it. */
struct raw_oauth2 {
	enum token_source_kind *grant;
	char *token_url;
	char *client_id;
	char *client_secret;
	char *client_secret_file;
	char *refresh_token;
	char *refresh_token_file;
	char *scope;
	char *ca;
};

extern const cyaml_schema_field_t config_oauth2_fields[];
extern const cyaml_strval_t config_auth_names[];
#define CONFIG_AUTH_NAMES 6

/* The downstream keys this file checks. */
struct raw_downstream_auth {
	const char *user;
	const char *pass;
	const char *pass_file;
	const enum downstream_auth *auth;
	const struct raw_oauth2 *oauth2;
	const char *token_command;
	const unsigned *token_timeout;
	const unsigned *token_lifetime;
};

/*
 * Checks the keys and fills ds->auth and ds->token (relative file names
 * taken from dir); touches no file. Returns 0, or -1
 * with the key at fault, relative to the downstream ("oauth2.token_url"),
 * in *key and the reason in why; *key is NULL when out of memory.
 */
int config_oauth_check(const struct raw_downstream_auth *raw, const char *dir,
    struct downstream_cfg *ds, const char **key, char *why, size_t whylen);

/*
 * What the token source names, as config_build() loads certificates: the
 * secret files must be readable (their content is not kept), the token
 * endpoint's CA loadable, token_command's program found. No network.
 * Returns 0, or -1 as config_oauth_check().
 */
int config_oauth_build(const struct downstream_cfg *ds, const char **key, char *why,
    size_t whylen);

void config_oauth_free(struct token_source_cfg *);

#endif
