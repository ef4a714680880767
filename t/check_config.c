/* SPDX-License-Identifier: MIT */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <check.h>
#include <sys/resource.h>

#include "cluster_url.h"
#include "config.h"
#include "config_lines.h"
#include "netaddr.h"
#include "passwd.h"
#include "tls.h"

#define FIXTURES SRCDIR "/t/data/config"

/*
 * Certificates for the TLS cases, made once per run with certtool in a
 * temporary folder (an unchecked fixture runs in the parent, before the
 * forked tests). Fixtures that name certificates by relative path are
 * copied there and loaded from there.
 */
static char tmpdir[] = "/tmp/check_config.XXXXXX";

static void
run(const char *cmd)
{
	int st = system(cmd);

	ck_assert_msg(st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0, "failed: %s", cmd);
}

static void
write_file(const char *dir, const char *name, const char *text)
{
	char path[512];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fp = fopen(path, "w");
	ck_assert_msg(fp != NULL, "%s: %s", path, strerror(errno));
	fputs(text, fp);
	ck_assert_int_eq(fclose(fp), 0);
}

static void
certs_setup(void)
{
	char cmd[2048];
	const char *d = tmpdir;

	ck_assert_ptr_nonnull(mkdtemp(tmpdir));
	write_file(d, "ca.tmpl", "cn = \"smtpmux test CA\"\nca\ncert_signing_key\n"
	    "expiration_days = 2\n");
	write_file(d, "server.tmpl", "cn = \"localhost\"\ndns_name = \"localhost\"\n"
	    "tls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n");
	snprintf(cmd, sizeof(cmd),
	    "exec >/dev/null 2>&1; cd '%s' && "
	    "certtool --generate-privkey --key-type=ecdsa --outfile ca.key && "
	    "certtool --generate-self-signed --load-privkey ca.key --template ca.tmpl "
	    "--outfile ca.crt && "
	    "certtool --generate-privkey --key-type=ecdsa --outfile server.key && "
	    "certtool --generate-certificate --load-privkey server.key "
	    "--load-ca-certificate ca.crt --load-ca-privkey ca.key --template server.tmpl "
	    "--outfile server.crt && "
	    "certtool --generate-privkey --key-type=ecdsa --outfile other.key", d);
	run(cmd);
	/* The secrets full.yaml reads from files. */
	{
		char hash[256], line[300];

		ck_assert_int_eq(passwd_hash_new("carol-pw", hash, sizeof(hash)), 0);
		snprintf(line, sizeof(line), "%s\n", hash);
		write_file(d, "carol.pass", line);
		write_file(d, "bob-provider.pass", "bob-provider-secret\n");
		write_file(d, "redis.pass", "redis-secret\n");
	}
	write_file(d, "refresh.token", "  refresh-from-file \r\n");
	write_file(d, "client.secret", "secret-from-file\n");
}

static void
certs_teardown(void)
{
	char cmd[600];

	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmpdir);
	run(cmd);
}

/* Copies a fixture next to the certificates; returns its new path. */
static const char *
fixture_in_tmp(const char *name, char *buf, size_t len)
{
	char cmd[1200];

	snprintf(buf, len, "%s/%s", tmpdir, name);
	snprintf(cmd, sizeof(cmd), "cp '%s/%s' '%s'", FIXTURES, name, buf);
	run(cmd);
	return buf;
}

static struct config *
load_ok(const char *path)
{
	char err[1024] = "";
	struct config *cfg = config_load(path, err, sizeof(err));

	ck_assert_msg(cfg != NULL, "%s did not load: %s", path, err);
	ck_assert_str_eq(err, "");
	return cfg;
}

static const char *
ntop(const struct sockaddr_storage *ss, char *buf, size_t len)
{
	return netaddr_ntop((const struct sockaddr *)ss, buf, len);
}

static unsigned
port_of(const struct sockaddr_storage *ss)
{
	if (ss->ss_family == AF_INET6)
		return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
	return ntohs(((const struct sockaddr_in *)ss)->sin_port);
}

/* ---- good configurations ---- */

START_TEST(test_prototype)
{
	struct config *cfg = load_ok(FIXTURES "/prototype.yaml");
	const struct user_cfg *u;
	const struct downstream_cfg *ds;

	ck_assert_uint_eq(cfg->n_users, 1);
	u = &cfg->users[0];
	ck_assert_str_eq(u->email, "test@user.com");
	ck_assert_str_eq(u->password, "password123");
	ck_assert_str_eq(u->selector_path, "selectors/round_robin.so");
	ck_assert_ptr_nonnull(u->selector);
	ck_assert_str_eq(u->selector_resolved, BUILDDIR "/selectors/round_robin.so");
	ck_assert_uint_eq(u->n_params, 0);
	ck_assert_uint_eq(u->n_downstreams, 1);
	ds = &u->downstreams[0];
	ck_assert_str_eq(ds->addr, "127.0.0.1:2526");
	ck_assert_str_eq(ds->name, "127.0.0.1:2526");
	ck_assert_str_eq(ds->host, "127.0.0.1");
	ck_assert_str_eq(ds->port, "2526");
	ck_assert_str_eq(ds->user, "any");
	ck_assert_str_eq(ds->pass, "any");
	/* Not port 465, nothing written: STARTTLS, as the prototype's Go client. */
	ck_assert_int_eq(ds->tls, TLS_MODE_STARTTLS);
	ck_assert(!ds->tls_explicit);
	ck_assert_ptr_nonnull(ds->tls_client);
	ck_assert_str_eq(cfg->path, FIXTURES "/prototype.yaml");
	ck_assert_str_eq(cfg->dir, FIXTURES);
	config_free(cfg);
}
END_TEST

static void
check_full_top(const struct config *cfg)
{
	char buf[64];

	ck_assert_uint_eq(cfg->n_listen, 4);
	ck_assert_str_eq(cfg->listen[0].text, "127.0.0.1:465");
	ck_assert_int_eq(cfg->listen[0].tls, TLS_MODE_IMPLICIT);
	ck_assert(!cfg->listen[0].require_tls);
	ck_assert_str_eq(ntop(&cfg->listen[0].ss, buf, sizeof(buf)), "127.0.0.1");
	ck_assert_uint_eq(port_of(&cfg->listen[0].ss), 465);
	ck_assert_str_eq(cfg->listen[1].host, "::1");
	ck_assert_str_eq(cfg->listen[1].port, "587");
	ck_assert_int_eq(cfg->listen[1].ss.ss_family, AF_INET6);
	ck_assert_uint_eq(cfg->listen[1].sslen, sizeof(struct sockaddr_in6));
	ck_assert_str_eq(ntop(&cfg->listen[1].ss, buf, sizeof(buf)), "::1");
	ck_assert_int_eq(cfg->listen[1].tls, TLS_MODE_STARTTLS);
	ck_assert(cfg->listen[1].require_tls);
	ck_assert_int_eq(cfg->listen[2].tls, TLS_MODE_NONE);
	ck_assert_str_eq(cfg->listen[3].host, "localhost");
	ck_assert_str_eq(ntop(&cfg->listen[3].ss, buf, sizeof(buf)), "127.0.0.1");
	ck_assert_uint_eq(port_of(&cfg->listen[3].ss), 2465);
	ck_assert_int_eq(cfg->listen[3].tls, TLS_MODE_IMPLICIT);

	ck_assert_uint_eq(cfg->workers, 3);
	ck_assert_str_eq(cfg->hostname, "mx.example.org");
	ck_assert(cfg->allow_insecure_auth);
	ck_assert_str_eq(cfg->run_user, "mailer");
	ck_assert_str_eq(cfg->run_group, "mailgrp");
	ck_assert(cfg->run_as_root);
	ck_assert_str_eq(cfg->tmp_dir, "/var/tmp");
	snprintf(buf, sizeof(buf), "%s/smtpmuxd.log", tmpdir);
	ck_assert_str_eq(cfg->log_file, buf);
	ck_assert_str_eq(cfg->status_listen, "127.0.0.1:9125");
	ck_assert_str_eq(cfg->state_file, "/var/lib/smtpmux/state");
}

static void
check_full_sections(const struct config *cfg)
{
	char buf[64];

	ck_assert_uint_eq(cfg->limits.max_message_size, 10485760);
	ck_assert_uint_eq(cfg->limits.max_recipients, 50);
	ck_assert_uint_eq(cfg->limits.max_errors, 5);
	ck_assert_uint_eq(cfg->limits.max_sessions, 200);
	ck_assert_uint_eq(cfg->limits.command_timeout, 120);
	ck_assert_uint_eq(cfg->limits.data_timeout, 180);
	ck_assert_uint_eq(cfg->limits.memory_threshold, 65536);
	ck_assert_uint_eq(cfg->limits.upstream_connect_timeout, 10);
	ck_assert_uint_eq(cfg->limits.upstream_timeout, 100);
	ck_assert_uint_eq(cfg->limits.upstream_data_timeout, 200);
	ck_assert_uint_eq(cfg->limits.shutdown_timeout, 20);
	ck_assert_uint_eq(cfg->limits.max_input_buffer, 32768);
	ck_assert_uint_eq(cfg->limits.max_output_buffer, 16384);
	ck_assert_uint_eq(cfg->limits.command_deadline, 30);
	ck_assert_uint_eq(cfg->limits.min_data_rate, 1000);
	ck_assert_uint_eq(cfg->limits.max_sessions_per_ip, 20);
	ck_assert_uint_eq(cfg->auth.max_failures, 3);
	ck_assert_uint_eq(cfg->auth.window, 300);
	ck_assert_uint_eq(cfg->auth.lockout, 900);
	ck_assert_uint_eq(cfg->auth.failure_delay, 2);
	ck_assert_uint_eq(cfg->limits.relay_deadline, 90);
	ck_assert(!cfg->connection_cache.enabled);
	ck_assert_uint_eq(cfg->connection_cache.max_idle, 4);
	ck_assert_uint_eq(cfg->connection_cache.idle_timeout, 30);
	ck_assert_uint_eq(cfg->connection_cache.max_messages, 10);
	ck_assert(!cfg->connection_cache.early_connect);

	snprintf(buf, sizeof(buf), "%s/server.crt", tmpdir);
	ck_assert_str_eq(cfg->tls.cert, buf);
	snprintf(buf, sizeof(buf), "%s/server.key", tmpdir);
	ck_assert_str_eq(cfg->tls.key, buf);
	ck_assert_str_eq(cfg->tls.priority, "NORMAL:-VERS-ALL:+VERS-TLS1.3");
	ck_assert_ptr_nonnull(cfg->tls.server);

	ck_assert_uint_eq(cfg->health.fail_threshold, 5);
	ck_assert_uint_eq(cfg->health.cooldown, 15);
	ck_assert_uint_eq(cfg->health.max_cooldown, 300);
	ck_assert_uint_eq(cfg->health.throttle_backoff, 120);

	ck_assert(!cfg->queue.enabled);
	ck_assert_int_eq(cfg->queue.mode, QUEUE_MODE_ALWAYS);
	snprintf(buf, sizeof(buf), "%s/spool", tmpdir);
	ck_assert_str_eq(cfg->queue.dir, buf);
	ck_assert_uint_eq(cfg->queue.max_size, 1048576);
	ck_assert_uint_eq(cfg->queue.min_backoff, 5);
	ck_assert_uint_eq(cfg->queue.max_backoff, 600);
	ck_assert_uint_eq(cfg->queue.max_lifetime, 86400);
	ck_assert_uint_eq(cfg->queue.max_concurrency, 4);
	ck_assert(!cfg->queue.bounce);
	ck_assert_uint_eq(cfg->queue.delay_warning, 3600);
}

static void
check_full_alice(const struct user_cfg *u)
{
	const struct downstream_cfg *ds = u->downstreams;
	char buf[64];

	ck_assert_str_eq(u->email, "Alice@Example.org");
	ck_assert_str_eq(u->password, "s3cret");
	ck_assert_str_eq(u->selector_path, "quota");
	ck_assert_ptr_nonnull(u->selector);
	ck_assert_str_eq(u->selector_resolved, BUILDDIR "/selectors/quota.so");
	ck_assert_uint_eq(u->n_params, 1);
	ck_assert_str_eq(u->params[0].key, "unlimited_weight");
	ck_assert_str_eq(u->params[0].value, "5");
	ck_assert_uint_eq(u->n_downstreams, 3);

	ck_assert_str_eq(ds[0].name, "primary");
	ck_assert_str_eq(ds[0].addr, "smtp.example.net:465");
	ck_assert_str_eq(ds[0].host, "smtp.example.net");
	ck_assert_str_eq(ds[0].user, "alice");
	ck_assert_str_eq(ds[0].pass, "provider-pass");
	ck_assert_int_eq(ds[0].tls, TLS_MODE_IMPLICIT);
	ck_assert(!ds[0].tls_explicit);
	snprintf(buf, sizeof(buf), "%s/ca.crt", tmpdir);
	ck_assert_str_eq(ds[0].tls_ca, buf);
	ck_assert(ds[0].tls_verify);
	ck_assert_ptr_nonnull(ds[0].tls_client);
	ck_assert_uint_eq(ds[0].weight, 3);
	ck_assert_uint_eq(ds[0].max_per_minute, 10);
	ck_assert_uint_eq(ds[0].max_per_hour, 100);
	ck_assert_uint_eq(ds[0].max_per_day, 1000);
	ck_assert_int_eq(ds[0].quota_window, QUOTA_CALENDAR);
	ck_assert_uint_eq(ds[0].probe_interval, 60);
	ck_assert_str_eq(ds[0].rewrite_from, "alerts@example.net");
	ck_assert_uint_eq(u->n_allowed_senders, 4);
	ck_assert_str_eq(u->allowed_senders[0], "*@example.org");
	ck_assert_str_eq(u->allowed_senders[3], "<>");

	ck_assert_str_eq(ds[1].name, "[2001:db8::1]:25");
	ck_assert_ptr_null(ds[1].rewrite_from);
	ck_assert_str_eq(ds[1].host, "2001:db8::1");
	ck_assert_str_eq(ds[1].port, "25");
	ck_assert_int_eq(ds[1].tls, TLS_MODE_NONE);
	ck_assert(ds[1].tls_explicit);
	ck_assert_ptr_null(ds[1].tls_client);
	ck_assert_ptr_null(ds[1].user);
	ck_assert_ptr_null(ds[1].pass);

	ck_assert_int_eq(ds[2].tls, TLS_MODE_IMPLICIT);
	ck_assert(ds[2].tls_explicit);
	ck_assert(!ds[2].tls_verify);
	ck_assert_ptr_nonnull(ds[2].tls_client);
}

/* Token sources: relative file names from the config's folder, the
 * command split into words, a fingerprint per source. */
static void
check_full_dave(const struct user_cfg *u)
{
	const struct downstream_cfg *ds = u->downstreams;
	char path[600];

	ck_assert_uint_eq(u->n_downstreams, 5);
	ck_assert_int_eq(ds[0].auth, DS_AUTH_XOAUTH2);
	ck_assert_int_eq(ds[0].token->kind, TOKEN_SOURCE_REFRESH_TOKEN);
	ck_assert_str_eq(ds[0].token->token_url, "https://oauth2.googleapis.com/token");
	ck_assert_str_eq(ds[0].token->client_id, "123.apps.googleusercontent.com");
	ck_assert_str_eq(ds[0].token->client_secret, "client-secret");
	ck_assert_ptr_null(ds[0].token->client_secret_file);
	snprintf(path, sizeof(path), "%s/refresh.token", tmpdir);
	ck_assert_str_eq(ds[0].token->refresh_token_file, path);
	ck_assert_str_eq(ds[0].token->scope, "https://mail.google.com/");
	snprintf(path, sizeof(path), "%s/ca.crt", tmpdir);
	ck_assert_str_eq(ds[0].token->ca, path);
	ck_assert_uint_eq(ds[0].token->timeout, 10);
	ck_assert_uint_eq(ds[0].token->lifetime, 600);
	ck_assert_ptr_null(ds[0].pass);
	ck_assert_int_eq(ds[0].token_slot, -1);
	ck_assert_int_eq(ds[1].auth, DS_AUTH_OAUTHBEARER);
	ck_assert_int_eq(ds[1].token->kind, TOKEN_SOURCE_CLIENT_CREDENTIALS);
	snprintf(path, sizeof(path), "%s/client.secret", tmpdir);
	ck_assert_str_eq(ds[1].token->client_secret_file, path);
	ck_assert_uint_eq(ds[1].token->timeout, 30);
	ck_assert_uint_eq(ds[1].token->lifetime, 300);
	ck_assert_int_eq(ds[2].auth, DS_AUTH_AUTO);
	ck_assert_int_eq(ds[2].token->kind, TOKEN_SOURCE_REFRESH_TOKEN);
	ck_assert_str_eq(ds[2].token->refresh_token, "inline-refresh");
	ck_assert_ptr_null(ds[2].token->scope);
	ck_assert_ptr_null(ds[2].token->ca);
	ck_assert_int_eq(ds[3].token->kind, TOKEN_SOURCE_COMMAND);
	ck_assert_str_eq(ds[3].token->argv[0], "/bin/echo");
	ck_assert_str_eq(ds[3].token->argv[1], "a token");
	ck_assert_ptr_null(ds[3].token->argv[2]);
	ck_assert_int_eq(ds[4].auth, DS_AUTH_LOGIN);
	ck_assert_ptr_null(ds[4].token);
	for (size_t i = 0; i < 4; i++)
		for (size_t j = 0; j < i; j++)
			ck_assert_uint_ne(ds[i].token->id, ds[j].token->id);
}

START_TEST(test_full)
{
	char path[512];
	struct config *cfg = load_ok(fixture_in_tmp("full.yaml", path, sizeof(path)));

	ck_assert_str_eq(cfg->path, path);
	ck_assert_str_eq(cfg->dir, tmpdir);
	check_full_top(cfg);
	check_full_sections(cfg);
	ck_assert_uint_eq(cfg->n_users, 4);
	check_full_alice(&cfg->users[0]);
	check_full_dave(&cfg->users[3]);
	ck_assert_str_eq(cfg->users[1].selector_path, "failover");
	ck_assert_int_eq(cfg->users[1].downstreams[0].tls, TLS_MODE_STARTTLS);
	ck_assert(cfg->users[1].downstreams[0].tls_explicit);
	/* pass_file: the trailing newline is not part of the secret */
	ck_assert_str_eq(cfg->users[1].downstreams[0].pass, "bob-provider-secret");
	ck_assert_str_eq(cfg->users[1].downstreams[0].rewrite_from, "bob@provider.example");
	ck_assert_uint_eq(cfg->users[1].n_allowed_senders, 0);
	ck_assert_str_eq(cfg->users[2].selector_path, "weighted");
	ck_assert_uint_eq(cfg->users[2].n_params, 0);
	ck_assert(passwd_is_hash(cfg->users[2].password));
	ck_assert(passwd_verify(NULL, "carol-pw", cfg->users[2].password));
	ck_assert_ptr_eq(cfg->unknown_user_hash, cfg->users[2].password);
	ck_assert_int_eq(cfg->users[2].downstreams[0].tls, TLS_MODE_MAY);
	ck_assert(cfg->inline_secrets);
	ck_assert(cfg->cluster.enabled);
	ck_assert_str_eq(cfg->cluster.url.host, "redis.example.com");
	ck_assert_str_eq(cfg->cluster.url.port, "6380");
	ck_assert_uint_eq(cfg->cluster.url.db, 2);
	ck_assert_str_eq(cfg->cluster.url.username, "smtpmux");
	ck_assert_str_eq(cfg->cluster.url.password, "redis-secret");
	ck_assert_str_eq(cfg->cluster.url.display, "rediss://redis.example.com:6380/2");
	ck_assert(cfg->cluster.url.tls);
	ck_assert_ptr_nonnull(cfg->cluster.tls);       /* tls_ca, tls_cert, tls_key loaded */
	ck_assert_str_eq(cfg->cluster.key_prefix, "relay1:");
	ck_assert_uint_eq(cfg->cluster.timeout_ms, 100);
	ck_assert_uint_eq(cfg->cluster.connect_timeout_ms, 500);
	ck_assert_uint_eq(cfg->cluster.retry_interval, 2);

	ck_assert_uint_eq(cfg->n_clients, 3);
	ck_assert_str_eq(cfg->clients[0].network, "192.168.1.0/24");
	ck_assert_ptr_eq(cfg->clients[0].user, &cfg->users[1]);
	ck_assert_ptr_eq(config_find_client(cfg, "192.168.1.5"), &cfg->clients[0]);
	ck_assert_ptr_eq(config_find_client(cfg, "192.168.1.200"), &cfg->clients[1]);
	ck_assert_ptr_eq(config_find_client(cfg, "::ffff:192.168.1.200"), &cfg->clients[1]);
	ck_assert_ptr_eq(config_find_client(cfg, "2001:db8:1:2::5"), &cfg->clients[2]);
	ck_assert_ptr_null(config_find_client(cfg, "192.168.2.1"));
	ck_assert_ptr_null(config_find_client(cfg, "2001:db8:2::1"));
	ck_assert_ptr_null(config_find_client(cfg, "not an address"));
	config_free(cfg);
}
END_TEST

static void
collect_generic_paths(const struct config_lines *cl, const struct config_node *n, char *out,
    size_t len)
{
	char generic[256];
	size_t g = 0;

	/* "users[2].downstreams[0].addr" -> "|users[].downstreams[].addr|" */
	for (const char *p = n->path; *p && g < sizeof(generic) - 3; p++) {
		generic[g++] = *p;
		if (*p == '[')
			p += strspn(p + 1, "0123456789");
	}
	generic[g] = '\0';
	if (g > 0 && strlen(out) + g + 2 < len) {
		strcat(out, generic);
		strcat(out, "|");
	}
	for (const struct config_node *c = config_lines_child(cl, n, NULL); c;
	    c = config_lines_child(cl, n, c))
		collect_generic_paths(cl, c, out, len);
}

static char *
file_slurp(const char *path, size_t *len)
{
	FILE *fp = fopen(path, "r");
	char *buf = malloc(1 << 20);

	ck_assert_msg(fp != NULL, "%s: %s", path, strerror(errno));
	ck_assert_ptr_nonnull(buf);
	*len = fread(buf, 1, (1 << 20) - 1, fp);
	buf[*len] = '\0';
	fclose(fp);
	return buf;
}

struct key_check {
	const char *haystack;
	const char *what;
};

static void
key_must_be_in(const char *key, void *arg)
{
	const struct key_check *kc = arg;
	char needle[260];

	snprintf(needle, sizeof(needle), "|%s|", key);
	ck_assert_msg(strstr(kc->haystack, needle) != NULL, "key %s is missing from %s",
	    key, kc->what);
}

/* So that test_full keeps meaning "every key" as the schema grows. */
START_TEST(test_full_sets_every_key)
{
	size_t len;
	char *data = file_slurp(FIXTURES "/full.yaml", &len), err[256];
	unsigned line;
	struct config_lines *cl = config_lines_scan(data, len, &line, err, sizeof(err));
	static char paths[16384];
	struct key_check kc = { paths, "t/data/config/full.yaml" };

	ck_assert_msg(cl != NULL, "%u: %s", line, err);
	strcpy(paths, "|");
	collect_generic_paths(cl, config_lines_get(cl, ""), paths, sizeof(paths));
	config_schema_keys(key_must_be_in, &kc);
	config_lines_free(cl);
	free(data);
}
END_TEST

START_TEST(test_defaults)
{
	struct config *cfg;
	const struct downstream_cfg *ds;
	long cpus = sysconf(_SC_NPROCESSORS_ONLN);
	char buf[64];

	unsetenv("USE_INSECURE_AUTH");
	setenv("TMPDIR", "/var/tmp/smtpmux-test", 1);
	cfg = load_ok(FIXTURES "/minimal.yaml");
	ck_assert_uint_eq(cfg->n_listen, 1);
	ck_assert_str_eq(cfg->listen[0].text, "127.0.0.1:1020");
	ck_assert_str_eq(ntop(&cfg->listen[0].ss, buf, sizeof(buf)), "127.0.0.1");
	ck_assert_uint_eq(port_of(&cfg->listen[0].ss), 1020);
	ck_assert_int_eq(cfg->listen[0].tls, TLS_MODE_NONE);
	ck_assert(!cfg->listen[0].require_tls);
	ck_assert_uint_eq(cfg->workers, cpus > 62 ? 62 : (unsigned)cpus);
	ck_assert(cfg->hostname != NULL && cfg->hostname[0] != '\0');
	ck_assert(!cfg->allow_insecure_auth);
	ck_assert_str_eq(cfg->run_user, "smtpmux");
	ck_assert_ptr_null(cfg->run_group);
	ck_assert(!cfg->run_as_root);
	ck_assert_str_eq(cfg->tmp_dir, "/var/tmp/smtpmux-test");
	ck_assert_ptr_null(cfg->log_file);
	ck_assert_ptr_null(cfg->status_listen);
	if (geteuid() == 0) {
		ck_assert_str_eq(cfg->state_file, RUNSTATEDIR "/smtpmux/smtpmuxd.state");
	} else {
		snprintf(buf, sizeof(buf), "/tmp/smtpmuxd-%u.state", (unsigned)geteuid());
		ck_assert_str_eq(cfg->state_file, buf);
	}

	ck_assert_uint_eq(cfg->limits.max_message_size, 26214400);
	ck_assert_uint_eq(cfg->limits.max_recipients, 100);
	ck_assert_uint_eq(cfg->limits.max_errors, 10);
	ck_assert_uint_eq(cfg->limits.max_sessions, 1000);
	ck_assert_uint_eq(cfg->limits.command_timeout, 300);
	ck_assert_uint_eq(cfg->limits.data_timeout, 300);
	ck_assert_uint_eq(cfg->limits.memory_threshold, 1048576);
	ck_assert_uint_eq(cfg->limits.upstream_connect_timeout, 30);
	ck_assert_uint_eq(cfg->limits.upstream_timeout, 300);
	ck_assert_uint_eq(cfg->limits.upstream_data_timeout, 600);
	ck_assert_uint_eq(cfg->limits.shutdown_timeout, 60);
	ck_assert_uint_eq(cfg->limits.max_input_buffer, 65536);
	ck_assert_uint_eq(cfg->limits.max_output_buffer, 65536);
	ck_assert_uint_eq(cfg->limits.command_deadline, 60);
	ck_assert_uint_eq(cfg->limits.min_data_rate, 500);
	ck_assert_uint_eq(cfg->limits.max_sessions_per_ip, 100);
	ck_assert_uint_eq(cfg->auth.max_failures, 5);
	ck_assert_uint_eq(cfg->auth.window, 600);
	ck_assert_uint_eq(cfg->auth.lockout, 600);
	ck_assert_uint_eq(cfg->auth.failure_delay, 1);
	ck_assert_uint_eq(cfg->limits.relay_deadline, 240);
	ck_assert(cfg->connection_cache.enabled);
	ck_assert_uint_eq(cfg->connection_cache.max_idle, 100);
	ck_assert_uint_eq(cfg->connection_cache.idle_timeout, 5);
	ck_assert_uint_eq(cfg->connection_cache.max_messages, 100);
	ck_assert(cfg->connection_cache.early_connect);
	ck_assert_ptr_null(cfg->tls.cert);
	ck_assert_ptr_null(cfg->tls.key);
	ck_assert_ptr_null(cfg->tls.server);
	ck_assert_str_eq(cfg->tls.priority, TLS_DEFAULT_PRIORITY);
	ck_assert_uint_eq(cfg->health.fail_threshold, 3);
	ck_assert_uint_eq(cfg->health.cooldown, 30);
	ck_assert_uint_eq(cfg->health.max_cooldown, 600);
	ck_assert_uint_eq(cfg->health.throttle_backoff, 60);
	ck_assert(cfg->queue.enabled);
	ck_assert_int_eq(cfg->queue.mode, QUEUE_MODE_FALLBACK);
	ck_assert_str_eq(cfg->queue.dir, LOCALSTATEDIR "/spool/smtpmux");
	ck_assert_uint_eq(cfg->queue.max_size, 1073741824);
	ck_assert_uint_eq(cfg->queue.min_backoff, 60);
	ck_assert_uint_eq(cfg->queue.max_backoff, 3600);
	ck_assert_uint_eq(cfg->queue.max_lifetime, 432000);
	ck_assert_uint_eq(cfg->queue.max_concurrency, 10);
	ck_assert(cfg->queue.bounce);
	ck_assert_uint_eq(cfg->queue.delay_warning, 0);

	ck_assert_str_eq(cfg->users[0].selector_path, "round_robin");
	ck_assert_ptr_nonnull(cfg->users[0].selector);
	ds = cfg->users[0].downstreams;
	ck_assert_str_eq(ds[0].name, "smtp.example.net:587");
	ck_assert_ptr_null(ds[0].user);
	ck_assert_ptr_null(ds[0].pass);
	ck_assert_int_eq(ds[0].tls, TLS_MODE_STARTTLS);
	ck_assert_int_eq(ds[1].tls, TLS_MODE_IMPLICIT);
	ck_assert(!ds[0].tls_explicit && !ds[1].tls_explicit);
	ck_assert_ptr_null(ds[0].tls_ca);
	ck_assert(ds[0].tls_verify);
	ck_assert_ptr_nonnull(ds[0].tls_client);
	ck_assert_uint_eq(ds[0].weight, 1);
	ck_assert_uint_eq(ds[0].max_per_minute, 0);
	ck_assert_uint_eq(ds[0].max_per_hour, 0);
	ck_assert_uint_eq(ds[0].max_per_day, 0);
	ck_assert_int_eq(ds[0].quota_window, QUOTA_ROLLING);
	ck_assert_uint_eq(ds[0].probe_interval, 0);
	ck_assert_ptr_null(ds[0].rewrite_from);
	ck_assert_uint_eq(cfg->users[0].n_allowed_senders, 0);
	ck_assert_uint_eq(cfg->n_clients, 0);
	ck_assert_ptr_null(config_find_client(cfg, "127.0.0.1"));
	ck_assert_ptr_null(cfg->unknown_user_hash);
	ck_assert_int_eq(ds[0].auth, DS_AUTH_AUTO);
	ck_assert_ptr_null(ds[0].token);
	ck_assert_int_eq(ds[0].token_slot, -1);
	config_free(cfg);
	unsetenv("TMPDIR");
}
END_TEST

START_TEST(test_listen_default_tls_with_cert)
{
	char path[512];
	struct config *cfg;

	snprintf(path, sizeof(path), "%s/listen.yaml", tmpdir);
	write_file(tmpdir, "listen.yaml",
	    "listen: [\"127.0.0.1:465\", \"127.0.0.1:587\", \"127.0.0.1:25 tls=none\"]\n"
	    "tls: {cert: server.crt, key: server.key}\n"
	    "users: [{email: a@b, password: pw, downstreams: [{addr: \"127.0.0.1:2526\"}]}]\n");
	cfg = load_ok(path);
	ck_assert_int_eq(cfg->listen[0].tls, TLS_MODE_IMPLICIT);
	ck_assert_int_eq(cfg->listen[1].tls, TLS_MODE_STARTTLS);
	ck_assert_int_eq(cfg->listen[2].tls, TLS_MODE_NONE);
	config_free(cfg);
}
END_TEST

/* The status page names users and providers: a bare port is loopback only. */
START_TEST(test_status_listen_bare_port_is_loopback)
{
	static const char *const written[] = { "9125", "\"9125\"", "\"[::1]:9125\"" };
	static const char *const used[] = { "127.0.0.1:9125", "127.0.0.1:9125", "[::1]:9125" };
	char path[512], text[256];
	struct config *cfg;

	snprintf(path, sizeof(path), "%s/status.yaml", tmpdir);
	for (size_t i = 0; i < sizeof(written) / sizeof(written[0]); i++) {
		snprintf(text, sizeof(text), "status_listen: %s\n"
		    "users: [{email: a@b, password: pw, downstreams: [{addr: \"127.0.0.1:2526\"}]}]\n",
		    written[i]);
		write_file(tmpdir, "status.yaml", text);
		cfg = load_ok(path);
		ck_assert_str_eq(cfg->status_listen, used[i]);
		config_free(cfg);
	}
}
END_TEST

/*
 * The prototype's meaning: inbound AUTH without TLS, and downstreams
 * without `tls:` as `tls: may` (but implicit TLS stays implicit on 465,
 * and a written `tls:` is kept).
 */
START_TEST(test_env_insecure_auth)
{
	struct config *cfg;

	setenv("USE_INSECURE_AUTH", "true", 1);
	cfg = load_ok(FIXTURES "/minimal.yaml");
	ck_assert(cfg->allow_insecure_auth);
	ck_assert_int_eq(cfg->users[0].downstreams[0].tls, TLS_MODE_MAY);
	ck_assert(!cfg->users[0].downstreams[0].tls_explicit);
	ck_assert_ptr_nonnull(cfg->users[0].downstreams[0].tls_client);
	ck_assert_int_eq(cfg->users[0].downstreams[1].tls, TLS_MODE_IMPLICIT);
	config_free(cfg);
	cfg = load_ok(FIXTURES "/aliases.yaml");
	ck_assert_int_eq(cfg->users[1].downstreams[1].tls, TLS_MODE_NONE);
	config_free(cfg);

	setenv("USE_INSECURE_AUTH", "false", 1);
	cfg = load_ok(FIXTURES "/minimal.yaml");
	ck_assert(!cfg->allow_insecure_auth);
	ck_assert_int_eq(cfg->users[0].downstreams[0].tls, TLS_MODE_STARTTLS);
	config_free(cfg);

	unsetenv("USE_INSECURE_AUTH");
	cfg = load_ok(FIXTURES "/minimal.yaml");
	ck_assert(!cfg->allow_insecure_auth);
	ck_assert_int_eq(cfg->users[0].downstreams[0].tls, TLS_MODE_STARTTLS);
	config_free(cfg);
}
END_TEST

START_TEST(test_aliases)
{
	struct config *cfg = load_ok(FIXTURES "/aliases.yaml");

	ck_assert_uint_eq(cfg->n_users, 2);
	ck_assert_uint_eq(cfg->users[1].n_downstreams, 2);
	ck_assert_str_eq(cfg->users[1].downstreams[1].addr, "127.0.0.1:2527");
	ck_assert_int_eq(cfg->users[1].downstreams[1].tls, TLS_MODE_NONE);
	config_free(cfg);
}
END_TEST

START_TEST(test_find_user)
{
	char path[512];
	struct config *cfg = load_ok(fixture_in_tmp("full.yaml", path, sizeof(path)));

	ck_assert_ptr_eq(config_find_user(cfg, "alice@example.org"), &cfg->users[0]);
	ck_assert_ptr_eq(config_find_user(cfg, "ALICE@EXAMPLE.ORG"), &cfg->users[0]);
	ck_assert_ptr_eq(config_find_user(cfg, "Bob@Example.Org"), &cfg->users[1]);
	ck_assert_ptr_null(config_find_user(cfg, "alice@example.org "));
	ck_assert_ptr_null(config_find_user(cfg, "mallory@example.org"));
	ck_assert_ptr_null(config_find_user(cfg, ""));
	config_free(cfg);
}
END_TEST

/* Loads path with stderr, where log.c writes in the foreground, captured;
 * returns what was logged. */
static char *
load_logged(const char *path)
{
	char logpath[512], *log;
	int saved = dup(STDERR_FILENO), fd;
	size_t len;
	struct config *cfg;

	snprintf(logpath, sizeof(logpath), "%s/warn-%d.log", tmpdir, (int)getpid());
	fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ck_assert_int_ge(fd, 0);
	fflush(stderr);
	dup2(fd, STDERR_FILENO);
	cfg = load_ok(path);
	fflush(stderr);
	dup2(saved, STDERR_FILENO);
	close(saved);
	close(fd);
	config_free(cfg);
	log = file_slurp(logpath, &len);
	unlink(logpath);
	return log;
}

static size_t
count_of(const char *hay, const char *needle)
{
	size_t n = 0;

	for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
		n++;
	return n;
}

START_TEST(test_tls_verify_false_warns)
{
	char path[512], *log;
	const char *hit;

	fixture_in_tmp("full.yaml", path, sizeof(path));
	log = load_logged(path);
	hit = strstr(log, "tls_verify is false");
	ck_assert_msg(hit != NULL && strstr(log, "relay.example.com:2525") != NULL, "log: %s", log);
	ck_assert_msg(strstr(hit + 1, "tls_verify is false") == NULL, "warned twice: %s", log);
	ck_assert_ptr_null(strstr(log, "provider-pass"));
	free(log);
}
END_TEST

/* One line names every downstream that may get credentials in clear. */
START_TEST(test_plaintext_credentials_warn)
{
	char *log;

	unsetenv("USE_INSECURE_AUTH");
	log = load_logged(FIXTURES "/prototype.yaml");
	ck_assert_msg(strstr(log, "without TLS") == NULL, "log: %s", log);
	free(log);

	setenv("USE_INSECURE_AUTH", "true", 1);
	log = load_logged(FIXTURES "/prototype.yaml");
	unsetenv("USE_INSECURE_AUTH");
	ck_assert_msg(count_of(log, "warning: config: credentials may be sent without TLS to: "
	    "user=test@user.com downstream=127.0.0.1:2526 tls=may\n") == 1, "log: %s", log);
	ck_assert_uint_eq(count_of(log, "without TLS"), 1);
	free(log);

	/* `tls: none` with a login counts; without one it does not */
	log = load_logged(FIXTURES "/plain_credentials.yaml");
	ck_assert_msg(count_of(log, "without TLS to: user=app@example.com downstream=a[127.0.0.1:2526] "
	    "tls=none, user=app@example.com downstream=c[127.0.0.1:2528] tls=may\n") == 1,
	    "log: %s", log);
	free(log);
}
END_TEST

/* password_file / pass_file: relative to $CREDENTIALS_DIRECTORY when set. */
START_TEST(test_secret_files)
{
	char dir[600], cfgpath[700], cmd[1400], err[1024];
	struct config *cfg;

	snprintf(dir, sizeof(dir), "%s/creds-%d", tmpdir, (int)getpid());
	snprintf(cmd, sizeof(cmd), "mkdir -p '%s' && cp -r '%s/secrets' '%s/'", dir, FIXTURES, dir);
	run(cmd);
	write_file(dir, "files.yaml",
	    "users:\n"
	    "  - email: app@example.com\n"
	    "    password_file: secrets/app.pass\n"
	    "    downstreams:\n"
	    "      - addr: \"127.0.0.1:2526\"\n"
	    "        user: someone@example.net\n"
	    "        pass_file: secrets/provider.pass\n");
	snprintf(cfgpath, sizeof(cfgpath), "%s/files.yaml", dir);
	unsetenv("CREDENTIALS_DIRECTORY");
	cfg = load_ok(cfgpath);
	ck_assert_str_eq(cfg->users[0].password, "app-secret");
	/* CR LF counts as one newline */
	ck_assert_str_eq(cfg->users[0].downstreams[0].pass, "provider-secret");
	ck_assert(!cfg->inline_secrets);
	config_free(cfg);

	/* systemd's LoadCredential=: the folder it names wins. */
	setenv("CREDENTIALS_DIRECTORY", FIXTURES, 1);
	snprintf(cmd, sizeof(cmd), "rm -r '%s/secrets'", dir);
	run(cmd);
	cfg = load_ok(cfgpath);
	ck_assert_str_eq(cfg->users[0].password, "app-secret");
	config_free(cfg);
	unsetenv("CREDENTIALS_DIRECTORY");
	ck_assert_ptr_null(config_load(cfgpath, err, sizeof(err)));
	ck_assert_msg(strstr(err, ":3: users[0].password_file: cannot open ") != NULL &&
	    strstr(err, "/secrets/app.pass: No such file or directory") != NULL, "%s", err);
	snprintf(cmd, sizeof(cmd), "rm -r '%s'", dir);
	run(cmd);
}
END_TEST

/* The demo of `make run`; never installed. */
START_TEST(test_demo_config)
{
	struct config *cfg = load_ok(SRCDIR "/contrib/demo/smtpmux.yaml");
	const struct user_cfg *u;

	ck_assert_uint_eq(cfg->n_listen, 1);
	ck_assert_str_eq(cfg->listen[0].text, "127.0.0.1:2525");
	ck_assert_int_eq(cfg->listen[0].tls, TLS_MODE_NONE);
	ck_assert(cfg->allow_insecure_auth);
	ck_assert_uint_eq(cfg->n_users, 1);
	u = config_find_user(cfg, "app@example.com");
	ck_assert_ptr_nonnull(u);
	ck_assert_str_eq(u->password, "demo-password");
	ck_assert_str_eq(u->selector_path, "round_robin");
	ck_assert_uint_eq(u->n_downstreams, 2);
	ck_assert_str_eq(u->downstreams[0].addr, "127.0.0.1:2526");
	ck_assert_str_eq(u->downstreams[1].addr, "127.0.0.1:2527");
	ck_assert_int_eq(u->downstreams[0].tls, TLS_MODE_NONE);
	ck_assert_int_eq(u->downstreams[1].tls, TLS_MODE_NONE);
	ck_assert_ptr_null(u->downstreams[0].user);
	config_free(cfg);
}
END_TEST

/*
 * A file without users (as installed by the package) loads: it is not
 * broken, just not configured yet; config_has_users says what to do.
 */
static const char *const no_users_files[] = {
	"no_users_missing.yaml", "no_users_empty_list.yaml", "no_users_empty_file.yaml",
};

START_TEST(test_no_users_is_not_configured)
{
	char path[512], err[1024];
	struct config *cfg;

	snprintf(path, sizeof(path), FIXTURES "/%s", no_users_files[_i]);
	cfg = load_ok(path);
	ck_assert_uint_eq(cfg->n_users, 0);
	ck_assert_int_eq(config_has_users(cfg, err, sizeof(err)), -1);
	ck_assert_msg(strncmp(err, path, strlen(path)) == 0, "%s", err);
	ck_assert_msg(strstr(err, ": no users defined, so there is nothing to relay: add the "
	    "applications and their providers under \"users:\"") != NULL, "%s", err);
	config_free(cfg);
	cfg = load_ok(FIXTURES "/minimal.yaml");
	ck_assert_int_eq(config_has_users(cfg, err, sizeof(err)), 0);
	config_free(cfg);
}
END_TEST

/*
 * The file `make install` and the package install: no users (so nothing
 * runs until the administrator adds one), and the commented example user
 * at its end loads once uncommented, so the template cannot rot.
 */
START_TEST(test_installed_config)
{
	struct config *cfg = load_ok(SRCDIR "/etc/smtpmux.yaml");
	char path[512], cmd[1200];

	ck_assert_uint_eq(cfg->n_users, 0);
	ck_assert(!cfg->allow_insecure_auth);
	config_free(cfg);
	snprintf(path, sizeof(path), "%s/installed-uncommented.yaml", tmpdir);
	snprintf(cmd, sizeof(cmd), "sed -e 's/^users: \\[\\]$/users:/' -e '/^users:/,$s/^#//' "
	    "'%s/etc/smtpmux.yaml' >'%s'", SRCDIR, path);
	run(cmd);
	cfg = load_ok(path);
	ck_assert_uint_eq(cfg->n_users, 1);
	ck_assert_str_eq(cfg->users[0].selector_path, "weighted");
	ck_assert_uint_eq(cfg->users[0].n_downstreams, 5);
	ck_assert_uint_eq(cfg->users[0].downstreams[0].max_per_day, 500);
	ck_assert_uint_eq(cfg->n_clients, 2);
	ck_assert_ptr_eq(cfg->clients[1].user, &cfg->users[0]);
	ck_assert_uint_eq(cfg->users[0].n_allowed_senders, 1);
	ck_assert_int_eq(cfg->users[0].downstreams[3].token->kind, TOKEN_SOURCE_CLIENT_CREDENTIALS);
	ck_assert_int_eq(cfg->users[0].downstreams[4].token->kind, TOKEN_SOURCE_REFRESH_TOKEN);
	config_free(cfg);
}
END_TEST

START_TEST(test_default_path)
{
	ck_assert_str_eq(config_default_path(), SYSCONFDIR "/smtpmux/smtpmux.yaml");
}
END_TEST

/* ---- bad configurations: one line, FILE:LINE: KEY: what ---- */

struct bad_case {
	const char *file;
	bool in_tmp;                     /* needs the certificates next to it */
	unsigned line;
	const char *key;                 /* NULL: the message has no key */
	const char *what;                /* the rest, exactly; or a part of it */
	bool what_is_part;               /* text from another module */
};

static const struct bad_case bad_cases[] = {
	{ "bad_syntax.yaml", false, 6, NULL,
	  "syntax error: did not find expected key while parsing a block mapping", false },
	{ "bad_unknown_key.yaml", false, 8, "users[0].downstreams[1].bogus", "unknown key", false },
	{ "bad_wrong_type.yaml", false, 2, "workers",
	  "expected a whole number from 0 to 4294967295, got \"abc\"", false },
	{ "bad_tls_mode.yaml", false, 6, "users[0].downstreams[0].tls",
	  "expected one of none, starttls, implicit, may, got \"maybe\"", false },
	{ "bad_quota_window.yaml", false, 6, "users[0].downstreams[0].quota_window",
	  "expected one of rolling, calendar, got \"sliding\"", false },
	{ "bad_list_type.yaml", false, 4, "users[0].downstreams",
	  "expected a list, got a mapping", false },
	{ "bad_params_type.yaml", false, 6, "users[0].selector.params",
	  "expected a mapping of names to strings", false },
	{ "bad_missing_addr.yaml", false, 7, "users[0].downstreams[1].addr",
	  "required key missing", false },
	{ "bad_duplicate_key.yaml", false, 2, "users[0].email", "duplicate key", false },
	{ "bad_missing_port.yaml", false, 6, "users[0].downstreams[1].addr", "missing port", false },
	{ "bad_port_range.yaml", false, 5, "users[0].downstreams[0].addr",
	  "port 70000 out of range (1-65535)", false },
	{ "bad_empty_host.yaml", false, 5, "users[0].downstreams[0].addr", "empty host", false },
	{ "bad_listen_host.yaml", false, 2, "listen[0]",
	  "\"mail.example.com\" is not a numeric IP address", false },
	{ "bad_listen_option.yaml", false, 2, "listen[0]",
	  "unknown option \"fast\" (expected tls=none|starttls|implicit or require_tls)", false },
	{ "bad_listen_tls.yaml", false, 3, "listen[1]",
	  "tls=starttls needs tls.cert and tls.key", false },
	{ "bad_workers_range.yaml", false, 1, "workers", "must be from 1 to 62", false },
	{ "bad_input_buffer.yaml", false, 3, "limits.max_input_buffer", "must be at least 16384",
	  false },
	{ "bad_duplicate_user.yaml", false, 6, "users[1].email",
	  "duplicate user \"APP@Example.com\" (also users[0])", false },
	{ "bad_newline_value.yaml", false, 5, "users[1].email",
	  "duplicate user \"A?B\" (also users[0])", false },
	{ "bad_alias_value.yaml", false, 5, "users[1].email",
	  "duplicate user \"app@example.com\" (also users[0])", false },
	{ "bad_duplicate_name.yaml", false, 8, "users[0].downstreams[1].name",
	  "duplicate downstream name \"relay\" (also downstreams[0])", false },
	{ "bad_user_without_pass.yaml", false, 5, "users[0].downstreams[0].pass",
	  "required with user", false },
	{ "bad_both_selectors.yaml", false, 5, "users[0].selector_algo_path",
	  "use either selector or selector_algo_path, not both", false },
	{ "bad_selector.yaml", false, 4, "users[0].selector_algo_path", "no_such_selector", true },
	{ "bad_selector_params.yaml", false, 5, "users[0].selector.path", "bogus", true },
	{ "bad_cert_missing.yaml", true, 2, "tls.cert", "missing.crt", true },
	{ "bad_cert_mismatch.yaml", true, 2, "tls.cert", "other.key", true },
	{ "bad_tls_ca.yaml", false, 8, "users[0].downstreams[1].tls_ca", "missing-ca.pem", true },
	{ "bad_listen_may.yaml", false, 2, "listen[0]",
	  "unknown option \"tls=may\" (expected tls=none|starttls|implicit or require_tls)", false },
	{ "bad_client_network.yaml", false, 8, "clients[0].network",
	  "\"192.168.1.300\" is not a numeric IPv4 or IPv6 address", false },
	{ "bad_client_everything.yaml", false, 10, "clients[1].network",
	  "\"::/0\" covers every address: sending without AUTH is for the hosts of a "
	  "local network", false },
	{ "bad_client_host_bits.yaml", false, 8, "clients[0].network",
	  "host bits set after /24 (the network address, with the last bits zero, "
	  "is expected)", false },
	{ "bad_client_user.yaml", false, 9, "clients[0].user",
	  "no user \"backup@example.com\" in users", false },
	{ "bad_client_duplicate.yaml", false, 10, "clients[1].network",
	  "same network as clients[0]", false },
	{ "bad_allowed_sender.yaml", false, 6, "users[0].allowed_senders[1]",
	  "\"*\" is only allowed as the whole local part (\"*@example.org\") or before "
	  "the domain (\"*@*.example.org\")", false },
	{ "bad_pass_file.yaml", false, 7, "users[0].downstreams[0].pass_file",
	  "/no-such-secret: No such file or directory", true },
	{ "bad_password_file.yaml", false, 3, "users[0].password_file",
	  "/secrets/two-lines.pass holds more than one line", true },
	{ "bad_password_both.yaml", false, 4, "users[0].password_file",
	  "use either password or password_file, not both", false },
	{ "bad_password_missing.yaml", false, 2, "users[0].password",
	  "required key missing (or password_file)", false },
	{ "bad_password_hash.yaml", false, 8, "users[1].password",
	  "malformed $y$ password hash (make one with smtpmuxd -H)", false },
	{ "bad_rewrite_from.yaml", false, 7, "users[0].downstreams[0].rewrite_from",
	  "\"Alerts <alerts@example.com>\" is not an e-mail address (or \"user\")", false },
	{ "bad_cluster_tls.yaml", false, 8, "cluster.tls_ca",
	  "only for a rediss:// address (TLS)", false },
	{ "bad_cluster_tls_ca.yaml", false, 8, "cluster.tls_ca",
	  "/missing-redis-ca.pem: No such file or directory", true },
	{ "bad_cluster_tls_key.yaml", false, 9, "cluster.tls_cert",
	  "needs tls_key (its private key)", false },
	{ "bad_cluster_username.yaml", false, 8, "cluster.username",
	  "needs a password: in redis: or in password_file (ACL users log in with one)", false },
	{ "bad_rewrite_from_user.yaml", false, 8, "users[0].downstreams[0].rewrite_from",
	  "\"user\": the downstream's user is not an e-mail address; write the address "
	  "to send as", false },
	{ "bad_oauth_http.yaml", false, 8, "users[0].downstreams[0].oauth2.token_url",
	  "must be an https:// URL (the token endpoint's certificate is always checked)", false },
	{ "bad_oauth_pass.yaml", false, 7, "users[0].downstreams[0].pass",
	  "not used with oauth2: the token is the credential", false },
	{ "bad_oauth_no_user.yaml", false, 5, "users[0].downstreams[0].user",
	  "required with token_command: the account the token logs in as", false },
	{ "bad_oauth_no_refresh.yaml", false, 7, "users[0].downstreams[0].oauth2.refresh_token",
	  "required (or refresh_token_file) with grant: refresh_token", false },
	{ "bad_oauth_no_secret.yaml", false, 7, "users[0].downstreams[0].oauth2.client_secret",
	  "required (or client_secret_file) with grant: client_credentials", false },
	{ "bad_oauth_two_secrets.yaml", false, 12,
	  "users[0].downstreams[0].oauth2.client_secret_file",
	  "use either client_secret or client_secret_file, not both", false },
	{ "bad_oauth_and_command.yaml", false, 11, "users[0].downstreams[0].token_command",
	  "use either oauth2 or token_command, not both", false },
	{ "bad_oauth_secret_file.yaml", false, 11,
	  "users[0].downstreams[0].oauth2.client_secret_file",
	  "missing.secret: No such file or directory", true },
	{ "bad_oauth_ca.yaml", false, 11, "users[0].downstreams[0].oauth2.ca",
	  "missing-idp-ca.pem", true },
	{ "bad_oauth_missing_url.yaml", false, 7, "users[0].downstreams[0].oauth2.token_url",
	  "required key missing", false },
	{ "bad_oauth_grant.yaml", false, 8, "users[0].downstreams[0].oauth2.grant",
	  "expected one of refresh_token, client_credentials, got \"password\"", false },
	{ "bad_auth_mode.yaml", false, 8, "users[0].downstreams[0].auth",
	  "expected one of auto, plain, login, xoauth2, oauthbearer, none, got \"cram-md5\"",
	  false },
	{ "bad_auth_xoauth2_password.yaml", false, 8, "users[0].downstreams[0].auth",
	  "xoauth2 needs oauth2 or token_command", false },
	{ "bad_auth_plain_token.yaml", false, 7, "users[0].downstreams[0].auth",
	  "plain sends a password; a token goes with xoauth2 or oauthbearer", false },
	{ "bad_token_command_quote.yaml", false, 7, "users[0].downstreams[0].token_command",
	  "unterminated ' quote", false },
	{ "bad_token_command_missing.yaml", false, 7, "users[0].downstreams[0].token_command",
	  "\"no-such-token-program\" is not a program in PATH", false },
	{ "bad_token_timeout.yaml", false, 8, "users[0].downstreams[0].token_timeout",
	  "only with oauth2 or token_command", false },
	{ "bad_oauth_twin.yaml", false, 13, "users[1].downstreams[0].token_command",
	  "same addr and user as users[0].downstreams[0], but another token source", false },
	{ "bad_queue_backoff.yaml", false, 8, "queue.max_backoff",
	  "must be at least min_backoff", false },
	{ "bad_queue_mode.yaml", false, 7, "queue.mode",
	  "expected one of fallback, always, got \"sometimes\"", false },
};

START_TEST(test_bad)
{
	const struct bad_case *bc = &bad_cases[_i];
	char path[512], prefix[1024], err[1024] = "";
	struct config *cfg;

	if (bc->in_tmp)
		fixture_in_tmp(bc->file, path, sizeof(path));
	else
		snprintf(path, sizeof(path), "%s/%s", FIXTURES, bc->file);
	cfg = config_load(path, err, sizeof(err));
	ck_assert_msg(cfg == NULL, "%s loaded", bc->file);
	ck_assert_ptr_null(strchr(err, '\n'));
	if (bc->key != NULL)
		snprintf(prefix, sizeof(prefix), "%s:%u: %s: ", path, bc->line, bc->key);
	else
		snprintf(prefix, sizeof(prefix), "%s:%u: ", path, bc->line);
	ck_assert_msg(strncmp(err, prefix, strlen(prefix)) == 0, "%s: got \"%s\", want \"%s...\"",
	    bc->file, err, prefix);
	if (bc->what_is_part)
		ck_assert_msg(strlen(err) > strlen(prefix) && strstr(err + strlen(prefix), bc->what),
		    "%s: \"%s\" lacks \"%s\"", bc->file, err, bc->what);
	else
		ck_assert_str_eq(err + strlen(prefix), bc->what);
}
END_TEST

/*
 * A "billion laughs" file: 284 octets whose nested aliases expand to 4.8
 * million values (1.3 GB). It is refused at the alias that crosses the
 * bound, quickly and in little memory; the address-space limit makes a
 * loader without the bound fail here rather than swap the machine.
 */
START_TEST(test_alias_bomb)
{
	char err[1024] = "";
	struct config *cfg;

#if !defined(__SANITIZE_ADDRESS__)       /* ASan reserves terabytes of address space */
	struct rlimit as = { 1024UL << 20, 1024UL << 20 };

	ck_assert_int_eq(setrlimit(RLIMIT_AS, &as), 0);
#endif
	cfg = config_load(FIXTURES "/bad_alias_bomb.yaml", err, sizeof(err));
	ck_assert_ptr_null(cfg);
	ck_assert_str_eq(err, FIXTURES "/bad_alias_bomb.yaml:6: f[0]: aliases expand the file to "
	    "more than 100000 keys and values");
}
END_TEST

START_TEST(test_unreadable)
{
	char err[512];

	ck_assert_ptr_null(config_load(FIXTURES "/no-such-file.yaml", err, sizeof(err)));
	ck_assert_str_eq(err, FIXTURES "/no-such-file.yaml: cannot open: No such file or directory");
	ck_assert_ptr_null(config_load(FIXTURES, err, sizeof(err)));
	ck_assert_str_eq(err, FIXTURES ": cannot read: Is a directory");
}
END_TEST

/* Booleans are strict: libcyaml alone reads any unknown word as true. */
START_TEST(test_bool_words)
{
	char path[512], err[512];
	struct config *cfg;

	snprintf(path, sizeof(path), "%s/bool-%d.yaml", tmpdir, (int)getpid());
	write_file(tmpdir, strrchr(path, '/') + 1,
	    "allow_insecure_auth: nope\n"
	    "users: [{email: a@b, password: pw, downstreams: [{addr: \"127.0.0.1:2526\"}]}]\n");
	ck_assert_ptr_null(config_load(path, err, sizeof(err)));
	ck_assert(strstr(err, ":1: allow_insecure_auth: expected true or false, got \"nope\"") != NULL);

	write_file(tmpdir, strrchr(path, '/') + 1,
	    "allow_insecure_auth: Off\nrun_as_root: yes\n"
	    "users: [{email: a@b, password: pw, downstreams: [{addr: \"127.0.0.1:2526\"}]}]\n");
	cfg = load_ok(path);
	ck_assert(!cfg->allow_insecure_auth);
	ck_assert(cfg->run_as_root);
	config_free(cfg);
	unlink(path);
}
END_TEST

/* rediss://: the CA and the client's certificate and key are loaded with
 * the configuration (relative to it), so a broken one refuses it. */
START_TEST(test_cluster_tls_files)
{
	char path[512], err[512] = "";
	struct config *cfg;
	const char *head = "users: [{email: a@b, password: pw, downstreams: "
	    "[{addr: \"127.0.0.1:2526\"}]}]\ncluster:\n  redis: \"rediss://127.0.0.1:6380/1\"\n";
	char text[1024];

	/* full.yaml loads a good set. */
	snprintf(path, sizeof(path), "%s/rediss-%d.yaml", tmpdir, (int)getpid());
	snprintf(text, sizeof(text), "%s  tls_ca: ca.crt\n  tls_cert: server.crt\n"
	    "  tls_key: other.key\n", head);
	write_file(tmpdir, strrchr(path, '/') + 1, text);
	ck_assert_ptr_null(config_load(path, err, sizeof(err)));
	ck_assert_msg(strstr(err, ":5: cluster.tls_cert: cannot load certificate ") != NULL &&
	    strstr(err, "other.key") != NULL, "%s", err);

	/* Without TLS nothing is loaded. */
	write_file(tmpdir, strrchr(path, '/') + 1, "users: [{email: a@b, password: pw, "
	    "downstreams: [{addr: \"127.0.0.1:2526\"}]}]\ncluster: {redis: \"redis://h\"}\n");
	cfg = load_ok(path);
	ck_assert(!cfg->cluster.url.tls);
	ck_assert_ptr_null(cfg->cluster.tls);
	config_free(cfg);
	unlink(path);
}
END_TEST

/* ---- cluster.redis: the address parser ---- */

struct url_case {
	const char *text;
	const char *host, *port, *socket, *user, *password, *display;
	unsigned db;
	const char *error;               /* NULL: parses */
	bool tls;
};

static const struct url_case url_cases[] = {
	{ "redis://127.0.0.1", "127.0.0.1", "6379", NULL, NULL, NULL,
	  "redis://127.0.0.1:6379/0", 0, NULL, false },
	{ "redis://:s3cr%40t@redis.example.com:6380/3", "redis.example.com", "6380", NULL, NULL,
	  "s3cr@t", "redis://redis.example.com:6380/3", 3, NULL, false },
	{ "redis://relay:pw@[::1]:7000/1", "::1", "7000", NULL, "relay", "pw",
	  "redis://[::1]:7000/1", 1, NULL, false },
	{ "redis://pw@host", "host", "6379", NULL, NULL, "pw", "redis://host:6379/0", 0, NULL, false },
	{ "unix:/run/redis/redis.sock", NULL, NULL, "/run/redis/redis.sock", NULL, NULL,
	  "unix:/run/redis/redis.sock?db=0", 0, NULL, false },
	{ "unix:///run/redis.sock?db=5", NULL, NULL, "/run/redis.sock", NULL, NULL,
	  "unix:/run/redis.sock?db=5", 5, NULL, false },
	{ "rediss://127.0.0.1:6380", "127.0.0.1", "6380", NULL, NULL, NULL,
	  "rediss://127.0.0.1:6380/0", 0, NULL, true },
	{ "rediss://relay:p%40ss@redis.example.com/2", "redis.example.com", "6379", NULL, "relay",
	  "p@ss", "rediss://redis.example.com:6379/2", 2, NULL, true },
	{ "rediss://[::1]:7000", "::1", "7000", NULL, NULL, NULL, "rediss://[::1]:7000/0", 0, NULL,
	  true },
	{ "rediss://", NULL, NULL, NULL, NULL, NULL, NULL, 0, "no host", false },
	{ "rediss:/host", NULL, NULL, NULL, NULL, NULL, NULL, 0, "must start with", false },
	{ "rediss://host:0", NULL, NULL, NULL, NULL, NULL, NULL, 0, "port", false },
	{ "rediss://host?db=1", NULL, NULL, NULL, NULL, NULL, NULL, 0, "/N", false },
	{ "http://host", NULL, NULL, NULL, NULL, NULL, NULL, 0, "must start with", false },
	{ "redis://host:0", NULL, NULL, NULL, NULL, NULL, NULL, 0, "port", false },
	{ "redis://host:99999", NULL, NULL, NULL, NULL, NULL, NULL, 0, "port", false },
	{ "redis://host/x", NULL, NULL, NULL, NULL, NULL, NULL, 0, "database", false },
	{ "redis://", NULL, NULL, NULL, NULL, NULL, NULL, 0, "no host", false },
	{ "redis://[::1", NULL, NULL, NULL, NULL, NULL, NULL, 0, "missing ]", false },
	{ "redis://:%4@host", NULL, NULL, NULL, NULL, NULL, NULL, 0, "percent-encode", false },
	{ "redis://:%00@host", NULL, NULL, NULL, NULL, NULL, NULL, 0, "percent-encode", false },
	{ "redis://ho st", NULL, NULL, NULL, NULL, NULL, NULL, 0, "blanks", false },
	{ "redis://host?db=1", NULL, NULL, NULL, NULL, NULL, NULL, 0, "/N", false },
	{ "unix:relative.sock", NULL, NULL, NULL, NULL, NULL, NULL, 0, "absolute path", false },
	{ "unix:/s?x=1", NULL, NULL, NULL, NULL, NULL, NULL, 0, "?db=N", false },
};

static void
ck_str_or_null(const char *got, const char *want, const char *what)
{
	if (want == NULL)
		ck_assert_msg(got == NULL, "%s: got %s", what, got);
	else
		ck_assert_msg(got != NULL && strcmp(got, want) == 0, "%s: got %s, want %s", what,
		    got ? got : "(null)", want);
}

START_TEST(test_cluster_url)
{
	const struct url_case *c = &url_cases[_i];
	struct cluster_url u;
	char why[256] = "";
	int rc = cluster_url_parse(c->text, &u, why, sizeof(why));

	if (c->error != NULL) {
		ck_assert_msg(rc == -1, "%s parsed", c->text);
		ck_assert_msg(strstr(why, c->error) != NULL, "%s: \"%s\" lacks \"%s\"", c->text,
		    why, c->error);
		ck_assert_ptr_null(u.display);
		return;
	}
	ck_assert_msg(rc == 0, "%s: %s", c->text, why);
	ck_str_or_null(u.host, c->host, "host");
	ck_str_or_null(u.port, c->port, "port");
	ck_str_or_null(u.socket, c->socket, "socket");
	ck_str_or_null(u.username, c->user, "username");
	ck_str_or_null(u.password, c->password, "password");
	ck_str_or_null(u.display, c->display, "display");
	ck_assert_uint_eq(u.db, c->db);
	ck_assert_msg(u.tls == c->tls, "%s: tls %d", c->text, u.tls);
	cluster_url_free(&u);
}
END_TEST

/* ---- the man page documents every key, and only keys that exist ---- */

struct man_keys {
	char text[16384];                /* "|key|key|...|" */
};

static void
man_keys_parse(struct man_keys *mk, char *page)
{
	char prefix[128] = "", *save = NULL;
	bool after_tp = false, in_keys = false;

	strcpy(mk->text, "|");
	for (char *line = strtok_r(page, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		/* A section lists keys only below its "keys:" comment. */
		if (strncmp(line, ".SH", 3) == 0) {
			in_keys = false;
		} else if (strncmp(line, ".\\\" keys:", 9) == 0) {
			snprintf(prefix, sizeof(prefix), "%s", line + 9 + strspn(line + 9, " "));
			in_keys = true;
		} else if (strncmp(line, ".TP", 3) == 0) {
			after_tp = true;
			continue;
		} else if (in_keys && after_tp && strncmp(line, ".B ", 3) == 0) {
			char key[300];
			const char *name = line + 3;

			snprintf(key, sizeof(key), "%s%s%.*s|", prefix, *prefix ? "." : "",
			    (int)strcspn(name, " "), name);
			ck_assert(strlen(mk->text) + strlen(key) < sizeof(mk->text));
			strcat(mk->text, key);
		}
		after_tp = false;
	}
}

static void
schema_has_key(const char *key, void *arg)
{
	char *text = arg;
	char needle[260];
	char *hit;

	/* Marks each schema key found, so that what is left is not in the schema. */
	snprintf(needle, sizeof(needle), "|%s|", key);
	while ((hit = strstr(text, needle)) != NULL)
		memset(hit + 1, '#', strlen(key));
}

START_TEST(test_man_page_documents_schema)
{
	static struct man_keys mk;
	size_t len;
	char *page = file_slurp(SRCDIR "/man/smtpmux.yaml.5.in", &len);
	struct key_check kc = { mk.text, "man/smtpmux.yaml.5.in" };
	char *left;

	man_keys_parse(&mk, page);
	config_schema_keys(key_must_be_in, &kc);
	config_schema_keys(schema_has_key, mk.text);
	/* Only "|###|###|" should be left: any letters name a stale entry. */
	for (left = mk.text; *left; left++)
		ck_assert_msg(*left == '|' || *left == '#', "man page documents a key that "
		    "is not in the schema: %s", left);
	free(page);
}
END_TEST

/* ---- netaddr ---- */

START_TEST(test_netaddr)
{
	struct { const char *text, *host, *port, *err; } cases[] = {
		{ "127.0.0.1:25", "127.0.0.1", "25", NULL },
		{ "[::1]:587", "::1", "587", NULL },
		{ "smtp.gmail.com:587", "smtp.gmail.com", "587", NULL },
		{ "smtp.gmail.com", NULL, NULL, "missing port" },
		{ "smtp.gmail.com:", NULL, NULL, "missing port" },
		{ "[::1]", NULL, NULL, "missing port" },
		{ "[::1:25", NULL, NULL, "missing \"]\" after IPv6 address" },
		{ "::1:25", NULL, NULL, "IPv6 address must be written \"[ADDR]:PORT\"" },
		{ ":25", NULL, NULL, "empty host" },
		{ "[]:25", NULL, NULL, "empty host" },
		{ "a b:25", NULL, NULL, "bad host \"a b\"" },
		{ "host:0", NULL, NULL, "port 0 out of range (1-65535)" },
		{ "host:65536", NULL, NULL, "port 65536 out of range (1-65535)" },
		{ "host:99999999999999999999", NULL, NULL,
		  "port 99999999999999999999 out of range (1-65535)" },
		{ "host:smtp", NULL, NULL, "bad port \"smtp\"" },
		{ "host:-1", NULL, NULL, "bad port \"-1\"" },
		{ "", NULL, NULL, "empty address" },
	};
	struct sockaddr_storage ss;
	socklen_t sslen;
	char buf[64];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		char *host = (char *)"x", *port = (char *)"x", err[128] = "";
		int rc = netaddr_split(cases[i].text, &host, &port, err, sizeof(err));

		if (cases[i].err == NULL) {
			ck_assert_msg(rc == 0, "%s: %s", cases[i].text, err);
			ck_assert_str_eq(host, cases[i].host);
			ck_assert_str_eq(port, cases[i].port);
			free(host);
			free(port);
		} else {
			ck_assert_msg(rc == -1, "%s accepted", cases[i].text);
			ck_assert_str_eq(err, cases[i].err);
			ck_assert_ptr_null(host);
			ck_assert_ptr_null(port);
		}
	}
	ck_assert_int_eq(netaddr_numeric("192.0.2.7", "2525", &ss, &sslen), 0);
	ck_assert_uint_eq(sslen, sizeof(struct sockaddr_in));
	ck_assert_str_eq(ntop(&ss, buf, sizeof(buf)), "192.0.2.7");
	ck_assert_uint_eq(port_of(&ss), 2525);
	ck_assert_int_eq(netaddr_numeric("2001:db8::25", "25", &ss, &sslen), 0);
	ck_assert_int_eq(ss.ss_family, AF_INET6);
	ck_assert_str_eq(ntop(&ss, buf, sizeof(buf)), "2001:db8::25");
	ck_assert_int_eq(netaddr_numeric("example.com", "25", &ss, &sslen), -1);
	ck_assert_int_eq(netaddr_numeric("127.0.0.1", "smtp", &ss, &sslen), -1);
	ss.ss_family = AF_UNIX;
	ck_assert_str_eq(ntop(&ss, buf, sizeof(buf)), "?");
}
END_TEST

/* ---- config_lines ---- */

START_TEST(test_config_lines)
{
	static const char yaml[] =
	    "a: 1\n"
	    "list:\n"
	    "  - x\n"
	    "  - {k: v,\n"
	    "     m: [1, 2]}\n"
	    "ref: &r {p: q}\n"
	    "copy: *r\n";
	char err[128];
	unsigned line;
	struct config_lines *cl = config_lines_scan(yaml, strlen(yaml), &line, err, sizeof(err));
	const struct config_node *n, *c;

	ck_assert_msg(cl != NULL, "%u: %s", line, err);
	ck_assert_uint_eq(config_lines_line(cl, "a"), 1);
	ck_assert_uint_eq(config_lines_line(cl, "list[0]"), 3);
	ck_assert_uint_eq(config_lines_line(cl, "list[1]"), 4);
	ck_assert_uint_eq(config_lines_line(cl, "list[1].m"), 5);
	ck_assert_uint_eq(config_lines_line(cl, "list[1].m[1]"), 5);
	/* Missing keys: the nearest ancestor's line. */
	ck_assert_uint_eq(config_lines_line(cl, "list[1].nope.deeper"), 4);
	ck_assert_uint_eq(config_lines_line(cl, "nope"), 1);
	n = config_lines_get(cl, "copy.p");
	ck_assert_ptr_nonnull(n);
	ck_assert_str_eq(n->value, "q");
	ck_assert_uint_eq(n->line, 6);
	n = config_lines_get(cl, "list[1]");
	ck_assert_int_eq(n->kind, CONFIG_NODE_MAPPING);
	c = config_lines_child(cl, n, NULL);
	ck_assert_str_eq(c->key, "k");
	c = config_lines_child(cl, n, c);
	ck_assert_str_eq(c->key, "m");
	ck_assert_int_eq(c->kind, CONFIG_NODE_SEQUENCE);
	ck_assert_ptr_null(config_lines_child(cl, n, c));
	config_lines_free(cl);

	ck_assert_ptr_null(config_lines_scan("a: [\n", 5, &line, err, sizeof(err)));
	ck_assert_uint_eq(line, 2);
	ck_assert(strncmp(err, "syntax error: ", 14) == 0);
	ck_assert_ptr_null(config_lines_scan("a: 1\n---\nb: 2\n", 14, &line, err, sizeof(err)));
	ck_assert_uint_eq(line, 3);
	ck_assert_str_eq(err, "syntax error: only one YAML document is allowed");
}
END_TEST

static Suite *
config_suite(void)
{
	Suite *s = suite_create("config");
	TCase *tc = tcase_create("load");

	tcase_add_unchecked_fixture(tc, certs_setup, certs_teardown);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, test_prototype);
	tcase_add_test(tc, test_full);
	tcase_add_test(tc, test_full_sets_every_key);
	tcase_add_test(tc, test_defaults);
	tcase_add_test(tc, test_listen_default_tls_with_cert);
	tcase_add_test(tc, test_env_insecure_auth);
	tcase_add_test(tc, test_aliases);
	tcase_add_test(tc, test_find_user);
	tcase_add_test(tc, test_tls_verify_false_warns);
	tcase_add_test(tc, test_plaintext_credentials_warn);
	tcase_add_test(tc, test_secret_files);
	tcase_add_test(tc, test_demo_config);
	tcase_add_test(tc, test_installed_config);
	tcase_add_test(tc, test_default_path);
	tcase_add_test(tc, test_status_listen_bare_port_is_loopback);
	tcase_add_loop_test(tc, test_no_users_is_not_configured, 0,
	    (int)(sizeof(no_users_files) / sizeof(no_users_files[0])));
	tcase_add_loop_test(tc, test_bad, 0, (int)(sizeof(bad_cases) / sizeof(bad_cases[0])));
	tcase_add_test(tc, test_cluster_tls_files);
	tcase_add_loop_test(tc, test_cluster_url, 0, (int)(sizeof(url_cases) / sizeof(url_cases[0])));
	tcase_add_test(tc, test_unreadable);
	tcase_add_test(tc, test_alias_bomb);
	tcase_add_test(tc, test_bool_words);
	tcase_add_test(tc, test_man_page_documents_schema);
	tcase_add_test(tc, test_netaddr);
	tcase_add_test(tc, test_config_lines);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr;
	int failed;

	/* The selectors of this build, not installed ones. */
	setenv("SMTPMUX_SELECTOR_PATH", BUILDDIR "/selectors", 1);
	unsetenv("USE_INSECURE_AUTH");
	unsetenv("CREDENTIALS_DIRECTORY");
	if (tls_global_init() != 0)
		return 99;
	sr = srunner_create(config_suite());
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	tls_global_deinit();
	return failed == 0 ? 0 : 1;
}
