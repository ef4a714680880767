/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONFIG_H
#define SMTPMUX_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "cluster_url.h"
#include "netmask.h"

/*
 * The configuration as the rest of smtpmux sees it: loaded from YAML with a
 * libcyaml schema, then validated and completed (defaults, parsed
 * addresses, loaded selectors) by config_load(). Nothing outside config.c
 * knows the YAML layout. A struct config is immutable once loaded; reload
 * builds a new one and drops the old one when no session uses it.
 *
 * Every key is documented in man/smtpmux.yaml.5; t/check_config.c fails when
 * a schema key is missing there.
 */

enum tls_mode {
	TLS_MODE_NONE = 0,
	TLS_MODE_STARTTLS,
	TLS_MODE_IMPLICIT,
	TLS_MODE_MAY                     /* downstreams only: STARTTLS if offered, else plain */
};

struct tls_server_ctx;
struct tls_client_ctx;
struct selector_inst;
struct health_rec;
struct health_user;

/* One listening address. `listen:` entries are strings:
 *   "HOST:PORT [tls=none|starttls|implicit] [require_tls]"
 * with "[v6addr]:PORT" for IPv6. Default tls: implicit on port 465 and
 * starttls elsewhere when `tls:` has a certificate, none otherwise. */
struct listen_cfg {
	char *text;                      /* as written, for logs */
	char *host;
	char *port;
	struct sockaddr_storage ss;      /* resolved numerically at load */
	socklen_t sslen;
	enum tls_mode tls;
	bool require_tls;
};

/* `limits:` */
struct limits_cfg {
	uint64_t max_message_size;       /* octets; default 26214400 (SIZE) */
	unsigned max_recipients;         /* default 100 */
	unsigned max_errors;             /* bad commands before 421; default 10 */
	unsigned max_sessions;           /* per worker; default 1000 */
	unsigned command_timeout;        /* s, waiting for a command; default 300 */
	unsigned data_timeout;           /* s, between DATA chunks; default 300 */
	uint64_t memory_threshold;       /* octets kept in memory before a temp file; default 1048576 */
	unsigned upstream_connect_timeout;  /* s; default 30 */
	unsigned upstream_timeout;       /* s, per downstream reply; default 300 */
	unsigned upstream_data_timeout;  /* s, for the reply to the final dot; default 600 */
	unsigned shutdown_timeout;       /* s, grace for sessions at stop/reload; default 60 */
	unsigned max_input_buffer;       /* octets read ahead per session; default 65536 */
	unsigned max_output_buffer;      /* octets of unread replies before reading stops;
	                                    default 65536 (resumes at a quarter) */
	unsigned command_deadline;       /* s from a command line's first octet to its end;
	                                    default 60 */
	unsigned min_data_rate;          /* octets/s a DATA transfer must keep up; default 500,
	                                    0: off */
	unsigned max_sessions_per_ip;    /* per client address, all workers; default 100,
	                                    0: no limit */
	unsigned relay_deadline;         /* s, all attempts of one message; default 240 */
};

/* `auth:` failed logins per client address, counted across workers */
struct auth_cfg {
	unsigned max_failures;           /* in `window` before a lockout; default 5, 0: off */
	unsigned window;                 /* s; default 600 */
	unsigned lockout;                /* s; default 600 */
	unsigned failure_delay;          /* s before the first 535, doubling after each
	                                    failure; default 1, 0: none */
};

/* `connection_cache:` (idle authenticated sessions to downstreams, per worker) */
struct cache_cfg {
	bool enabled;                    /* default true; false: one session per message */
	unsigned max_idle;               /* idle sessions kept per downstream; default 100 */
	unsigned idle_timeout;           /* s, before an idle session is closed; default 5 */
	unsigned max_messages;           /* messages per session; default 100 */
	bool early_connect;              /* connect at the first RCPT; default true */
};

/* `tls:` (inbound certificate and GnuTLS priority string) */
struct tls_cfg {
	char *cert;                      /* PEM file, NULL: no inbound TLS */
	char *key;
	char *priority;                  /* default "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2" */
	struct tls_server_ctx *server;   /* built at load; NULL without cert */
};

/* How a downstream's max_per_* windows count (health_quota.c). */
enum quota_window {
	QUOTA_ROLLING,                   /* no more than the limit in any 60 s / 1 h / 24 h */
	QUOTA_CALENDAR                   /* per UTC minute / hour / day */
};

/* `health:` (circuit breaker and throttling defaults) */
struct health_cfg {
	unsigned fail_threshold;         /* consecutive failures to open; default 3 */
	unsigned cooldown;               /* s, first open period; default 30 */
	unsigned max_cooldown;           /* s, doubling stops here; default 600 */
	unsigned throttle_backoff;       /* s, after a rate-limit reply; default 60 */
};

/* `cluster:` (instances sharing quotas, health and rotation through Redis;
 * config_cluster.c, cluster*.c) */
struct cluster_cfg {
	bool enabled;                    /* the section is present */
	struct cluster_url url;          /* `redis:`, with `username:` and `password_file:`
	                                    folded in */
	char *key_prefix;                /* default "smtpmux:" */
	unsigned timeout_ms;             /* per call; default 250 */
	unsigned connect_timeout_ms;     /* default 1000 */
	unsigned retry_interval;         /* s between reconnections; default 1 */
	struct tls_client_ctx *tls;      /* rediss://: `tls_ca:`, `tls_cert:`, `tls_key:`
	                                    loaded; NULL otherwise */
};

/* `auth:` of a downstream: how it logs in. */
enum downstream_auth {
	DS_AUTH_AUTO = 0,                /* password: PLAIN or LOGIN as offered; token:
	                                    XOAUTH2 or OAUTHBEARER as offered */
	DS_AUTH_PLAIN,
	DS_AUTH_LOGIN,
	DS_AUTH_XOAUTH2,
	DS_AUTH_OAUTHBEARER,
	DS_AUTH_NONE                     /* no AUTH at all */
};

enum token_source_kind {
	TOKEN_SOURCE_REFRESH_TOKEN = 1,  /* `oauth2:` with the refresh-token grant */
	TOKEN_SOURCE_CLIENT_CREDENTIALS, /* `oauth2: {grant: client_credentials}` */
	TOKEN_SOURCE_COMMAND             /* `token_command:` */
};

/*
 * Where a downstream's OAuth 2.0 access tokens come from (config_oauth.c).
 * Only the token helper process uses it; workers read the tokens it
 * obtains from the shared token table (token_table.h).
 */
struct token_source_cfg {
	enum token_source_kind kind;
	char *token_url;                 /* https:// only */
	char *client_id;
	char *client_secret;             /* or, read at each request: */
	char *client_secret_file;
	char *refresh_token;             /* or, read at each request and rewritten */
	char *refresh_token_file;        /* when the provider rotates it: */
	char *scope;                     /* NULL: none sent */
	char *ca;                        /* PEM for the token endpoint; NULL: system store */
	char *command;                   /* token_command as written */
	char **argv;                     /* ... split (argv_split.h) */
	unsigned timeout;                /* s, one request or command run; default 30 */
	unsigned lifetime;               /* s, when no expires_in is given; default 300 */
	uint64_t id;                     /* fingerprint of all of the above */
};

/* `queue:` (the spool that keeps what no downstream took; config_queue.c) */
enum queue_mode {
	QUEUE_MODE_FALLBACK = 0,         /* relay first; spool what failed temporarily */
	QUEUE_MODE_ALWAYS                /* spool at once, deliver in the background */
};

struct queue_cfg {
	bool enabled;                    /* default true */
	enum queue_mode mode;            /* default fallback */
	char *dir;                       /* default LOCALSTATEDIR "/spool/smtpmux" */
	uint64_t max_size;               /* octets queued at most; 0: no limit; default 1 GiB */
	unsigned min_backoff;            /* s, first retry delay; default 60 */
	unsigned max_backoff;            /* s, longest retry delay; default 3600 */
	unsigned max_lifetime;           /* s, then bounced; default 432000 (5 days) */
	unsigned max_concurrency;        /* the runner's deliveries at once; default 10 */
	bool bounce;                     /* DSN to the sender on failure; default true */
	unsigned delay_warning;          /* s, one "delayed" DSN after this; 0: none (default) */
};

struct downstream_cfg {
	char *name;                      /* `name:`, default: addr */
	char *addr;                      /* "host:port" as written */
	char *host;
	char *port;
	char *user;                      /* NULL or "": no AUTH */
	char *pass;                      /* `pass:`, or the contents of `pass_file:` */
	enum tls_mode tls;               /* default: implicit on 465, else starttls;
	                                    may with USE_INSECURE_AUTH=true */
	bool tls_explicit;               /* `tls:` was written in the config */
	char *tls_ca;                    /* PEM bundle; NULL: system trust store */
	bool tls_verify;                 /* default true */
	struct tls_client_ctx *tls_client;  /* built at load */
	unsigned weight;                 /* default 1 */
	unsigned max_per_minute;         /* 0: unlimited */
	unsigned max_per_hour;
	unsigned max_per_day;
	enum quota_window quota_window;  /* default rolling */
	unsigned probe_interval;         /* s; 0: no active probe */
	char *rewrite_from;              /* envelope and header From for this downstream;
	                                    NULL: kept (`rewrite_from: user` is resolved) */
	enum downstream_auth auth;       /* default DS_AUTH_AUTO */
	struct token_source_cfg *token;  /* NULL: a password (or no AUTH) */
	int token_slot;                  /* token table slot, bound by token_table_bind(); -1 */
	struct health_rec *health;       /* shared record, bound by health_bind() */
};

struct selector_param_cfg {
	char *key;
	char *value;
};

struct user_cfg {
	char *email;
	char *password;                  /* plaintext or a crypt(3) hash (passwd.h); from
	                                    `password:` or `password_file:` */
	char **allowed_senders;          /* MAIL FROM patterns (sender_match.h) */
	size_t n_allowed_senders;        /* 0: any sender */
	char *selector_path;             /* `selector.path` or legacy `selector_algo_path` */
	char *selector_resolved;         /* the file actually loaded */
	struct selector_param_cfg *params;
	size_t n_params;
	struct selector_inst *selector;  /* loaded and initialised at load */
	struct downstream_cfg *downstreams;
	size_t n_downstreams;
	struct health_user *health;      /* shared per-user record (sequence) */
};

/* `clients:` entry: a network whose hosts send without AUTH, as `user`. */
struct client_cfg {
	char *network;                   /* as written, for logs */
	const struct user_cfg *user;
};

struct config {
	char *path;                      /* the file it was loaded from */
	char *dir;                       /* its folder: base of relative paths */
	struct listen_cfg *listen;       /* default: one entry, 127.0.0.1:1020 */
	size_t n_listen;
	unsigned workers;                /* default: number of online CPUs */
	char *hostname;                  /* default: gethostname() */
	bool allow_insecure_auth;        /* also set by env USE_INSECURE_AUTH=true */
	char *run_user;                  /* `user:`, default "smtpmux" (used only as root) */
	char *run_group;                 /* `group:`, default: the user's primary group */
	bool run_as_root;                /* `run_as_root:`, default false */
	char *tmp_dir;                   /* big message bodies; default $TMPDIR or /tmp */
	char *log_file;                  /* NULL: syslog (or stderr with -f) */
	char *status_listen;             /* "127.0.0.1:PORT" Prometheus endpoint; NULL: off */
	char *state_file;                /* shared health segment, read by `smtpmuxd -s status`;
	                                    default RUNSTATEDIR "/smtpmux/smtpmuxd.state" */
	struct limits_cfg limits;
	struct tls_cfg tls;
	struct health_cfg health;
	struct auth_cfg auth;
	struct cache_cfg connection_cache;
	struct cluster_cfg cluster;
	struct queue_cfg queue;
	struct user_cfg *users;
	size_t n_users;
	struct client_cfg *clients;
	struct netmask *client_nets;     /* client_nets[i] is clients[i].network */
	size_t n_clients;
	bool inline_secrets;             /* a password or pass is written in the file */
	const char *unknown_user_hash;   /* a user's hash, checked for unknown names */
	void *priv;                      /* config.c's own (libcyaml tree etc.) */
};

/*
 * Loads, validates and completes a configuration. On error returns NULL and
 * writes one line to err: "FILE:LINE: KEY: what is wrong", e.g.
 *   "/etc/smtpmux/smtpmux.yaml:12: users[0].downstreams[1].addr: missing port"
 * Loads the selectors and TLS credentials too, so a config that loads is
 * one that can run.
 */
struct config *config_load(const char *path, char *err, size_t errlen);
void config_free(struct config *cfg);

/* Finds a user by `email`, case-insensitively; NULL when unknown. */
const struct user_cfg *config_find_user(const struct config *cfg, const char *email);

/*
 * A file without users loads (the configuration as installed is one), but
 * there is nothing to run: start-up, -t and reload refuse it. Returns 0
 * when cfg has at least one user, else -1 with one line in err that says
 * what to do.
 */
int config_has_users(const struct config *cfg, char *err, size_t errlen);

/*
 * The user a client address (numeric text) may send as without AUTH: the
 * most specific `clients:` network that contains it. NULL when none does.
 */
const struct client_cfg *config_find_client(const struct config *cfg, const char *addr);

/* A file name from the configuration: relative ones are taken from the
 * configuration's folder dir. Allocated; NULL when out of memory. */
char *config_resolve(const char *dir, const char *name);

/* Default config file: SYSCONFDIR "/smtpmux/smtpmux.yaml". */
const char *config_default_path(void);

/* ---- for tests ---- */

/*
 * config_load() on text in memory, without loading what the configuration
 * names (selectors, certificates): every rule of the file itself is
 * checked. path names it in messages. For the unit tests and the fuzzer.
 */
struct config *config_check_text(const char *path, const char *data, size_t len,
    char *err, size_t errlen);

/*
 * Calls fn once for every key of the YAML schema, as a dotted path with
 * "[]" for list entries, e.g. "users[].downstreams[].addr"; the man page
 * test checks that each one is documented.
 */
void config_schema_keys(void (*fn)(const char *key, void *arg), void *arg);

#endif
