/* SPDX-License-Identifier: MIT */
/*
 * The outbound side against real SMTP servers on loopback: Postfix's
 * smtp-sink (pipelining, fault injection) and aiosmtpd (byte-exact
 * capture, AUTH, STARTTLS, implicit TLS). Each test builds its own event
 * loop, runtime and configuration, and starts its own servers on free
 * ports; servers die with the test process (PR_SET_PDEATHSIG) and are
 * killed and reaped by the fixture.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <event2/dns.h>
#include <event2/event.h>

#include "config.h"
#include "health.h"
#include "log.h"
#include "msgbody.h"
#include "relay.h"
#include "runtime.h"
#include "selector_host.h"
#include "tls.h"
#include "token_table.h"
#include "upstream.h"
#include "upstream_cache.h"

#define PYTHON "/usr/bin/python3"            /* the pyenv python3 lacks aiosmtpd */
#define SMTP_SINK "/usr/sbin/smtp-sink"
#define MAX_CHILDREN 8
#define MAX_DS 4

/* --- per-test scratch space and child processes ------------------------- */

static char workdir[256];
static pid_t children[MAX_CHILDREN];
static size_t n_children;

static int
rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static void
setup(void)
{
	char log[PATH_MAX + 8];

	snprintf(workdir, sizeof(workdir), "/tmp/check_relay.XXXXXX");
	ck_assert_ptr_nonnull(mkdtemp(workdir));
	snprintf(log, sizeof(log), "%s/log", workdir);
	ck_assert_int_eq(log_open("check_relay", LOG_TO_FILE, log), 0);
	log_set_level(LOG_LEVEL_DEBUG);
	n_children = 0;
}

static void
kill_children(void)
{
	for (size_t i = 0; i < n_children; i++) {
		if (children[i] <= 0)
			continue;
		kill(children[i], SIGKILL);
		while (waitpid(children[i], NULL, 0) < 0 && errno == EINTR)
			;
		children[i] = 0;
	}
	n_children = 0;
}

static void
teardown(void)
{
	kill_children();
	log_close();
	if (workdir[0] != '\0' && getenv("CHECK_RELAY_KEEP") == NULL)
		nftw(workdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
	workdir[0] = '\0';
}

static pid_t
spawn(char *const argv[], const char *out)
{
	pid_t pid;
	int fd;

	ck_assert_uint_lt(n_children, MAX_CHILDREN);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		/* Dies with the test, even when a failed assertion ends it early. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		fd = open(out, O_WRONLY | O_CREAT | O_APPEND, 0600);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
			close(fd);
		}
		execv(argv[0], argv);
		_exit(127);
	}
	children[n_children++] = pid;
	return pid;
}

/* Runs a helper command to completion; returns its exit status. */
static int
run_cmd(char *const argv[])
{
	char out[PATH_MAX + 16];
	pid_t pid;
	int st = -1;

	snprintf(out, sizeof(out), "%s/cmd.log", workdir);
	pid = spawn(argv, out);
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	children[--n_children] = 0;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int
free_port(void)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	int fd, port;

	fd = socket(AF_INET, SOCK_STREAM, 0);
	ck_assert_int_ge(fd, 0);
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	port = ntohs(sin.sin_port);
	close(fd);
	return port;
}

/*
 * Readiness: connect until the server answers with its banner (bounded:
 * about 10 s), then QUIT. tls: the server speaks implicit TLS, so a
 * completed TCP connect is all we can check without a TLS client here.
 */
static void
wait_ready(int port, pid_t pid, bool tls, const char *banner)
{
	struct sockaddr_in sin;
	struct timespec nap = { 0, 20 * 1000 * 1000 };
	char buf[512];
	ssize_t n;
	size_t got = 0;

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons((uint16_t)port);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	for (int tries = 0; tries < 500; tries++) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		struct pollfd pfd;

		ck_assert_int_ge(fd, 0);
		if (connect(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0) {
			close(fd);
			ck_assert_msg(waitpid(pid, NULL, WNOHANG) == 0, "server on port %d died", port);
			nanosleep(&nap, NULL);
			continue;
		}
		if (tls) {
			close(fd);
			return;
		}
		pfd.fd = fd;
		pfd.events = POLLIN;
		while (got < sizeof(buf) - 1 && memchr(buf, '\n', got) == NULL &&
		    poll(&pfd, 1, 5000) == 1 && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0)
			got += (size_t)n;
		buf[got] = '\0';
		ck_assert_msg(strncmp(buf, banner, strlen(banner)) == 0,
		    "no banner on port %d: %s", port, buf);
		n = write(fd, "QUIT\r\n", 6);
		(void)n;
		close(fd);
		return;
	}
	ck_abort_msg("server on port %d not ready", port);
}

/* --- downstream servers ------------------------------------------------ */

struct server {
	int port;
	pid_t pid;
	char dir[512];
};

static void
server_dir(struct server *s, const char *name)
{
	snprintf(s->dir, sizeof(s->dir), "%s/%s", workdir, name);
	ck_assert_int_eq(mkdir(s->dir, 0700), 0);
}

/* smtp-sink dumping each message into dir; extra: fault flags. */
static void
start_sink(struct server *s, const char *name, const char *const *extra)
{
	char tmpl[PATH_MAX + 8], listen[32], out[PATH_MAX + 8];
	const char *banner = "220";
	char *argv[32];
	size_t n = 0;

	server_dir(s, name);
	s->port = free_port();
	snprintf(tmpl, sizeof(tmpl), "%s/%%M.", s->dir);
	snprintf(listen, sizeof(listen), "127.0.0.1:%d", s->port);
	snprintf(out, sizeof(out), "%s.log", s->dir);
	argv[n++] = (char *)SMTP_SINK;
	argv[n++] = (char *)"-u";
	argv[n++] = (char *)"root";
	argv[n++] = (char *)"-d";
	argv[n++] = tmpl;
	for (; extra != NULL && *extra != NULL && n < 28; extra++) {
		argv[n++] = (char *)*extra;
		if (strcasecmp(*extra, "connect") == 0)
			banner = "5";        /* -f connect: a 5xx greeting */
	}
	argv[n++] = listen;
	argv[n++] = (char *)"64";
	argv[n] = NULL;
	s->pid = spawn(argv, out);
	wait_ready(s->port, s->pid, false, banner);
}

/*
 * An aiosmtpd server. It saves each message's exact octets as msg.N, the
 * envelope as env.N, every AUTH command as a line in auth-cmd and every
 * authentication attempt (mechanism, user, TLS or not) in auth. Options
 * are key=value words: auth=USER:PASS, auth_require_tls=1,
 * auth_exclude=PLAIN, cert=/key= (STARTTLS, or implicit=1), rcpt_reply=,
 * rcpt_delay=SECONDS, data_reply=.
 */
static const char aiosmtpd_script[] =
"import asyncio, os, ssl, sys\n"
"from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword\n"
"args = dict(a.split('=', 1) for a in sys.argv[1:])\n"
"out = args['dir']\n"
"def mark(name, text):\n"
"    with open(os.path.join(out, name), 'a') as f:\n"
"        f.write(text + '\\n')\n"
"class Handler:\n"
"    n = 0\n"
"    async def handle_RCPT(self, server, session, envelope, address, options):\n"
"        if 'rcpt_delay' in args:\n"
"            await asyncio.sleep(float(args['rcpt_delay']))\n"
"        if 'rcpt_reply' in args:\n"
"            return args['rcpt_reply']\n"
"        envelope.rcpt_tos.append(address)\n"
"        return '250 2.1.5 OK'\n"
"    async def handle_DATA(self, server, session, envelope):\n"
"        if 'data_reply' in args:\n"
"            return args['data_reply']\n"
"        Handler.n += 1\n"
"        with open(os.path.join(out, 'msg.%d' % Handler.n), 'wb') as f:\n"
"            f.write(envelope.original_content)\n"
"        e = 'env.%d' % Handler.n\n"
"        mark(e, 'from=%s' % envelope.mail_from)\n"
"        mark(e, 'opts=%s' % ' '.join(envelope.mail_options))\n"
"        for r in envelope.rcpt_tos:\n"
"            mark(e, 'rcpt=%s' % r)\n"
"        mark(e, 'tls=%s' % (session.ssl is not None))\n"
"        mark(e, 'peer=%s' % session.peer[1])\n"
"        return '250 2.0.0 Ok: stored as %d' % Handler.n\n"
"def authenticator(server, session, envelope, mechanism, auth_data):\n"
"    ok = False\n"
"    if isinstance(auth_data, LoginPassword):\n"
"        mark('auth', '%s %s tls=%s' % (mechanism, auth_data.login.decode(),\n"
"                                       session.ssl is not None))\n"
"        want = args['auth'].split(':', 1)\n"
"        ok = auth_data.login.decode() == want[0] and auth_data.password.decode() == want[1]\n"
"    return AuthResult(success=ok, handled=False)\n"
"class RecordingSMTP(SMTP):\n"
"    async def smtp_AUTH(self, arg):\n"
"        mark('auth-cmd', 'AUTH')\n"
"        return await super().smtp_AUTH(arg)\n"
"kw = {}\n"
"if 'auth' in args:\n"
"    kw.update(authenticator=authenticator, auth_required=True,\n"
"              auth_require_tls=args.get('auth_require_tls', '0') == '1')\n"
"    if 'auth_exclude' in args:\n"
"        kw['auth_exclude_mechanism'] = args['auth_exclude'].split(',')\n"
"ctx = None\n"
"implicit = args.get('implicit') == '1'\n"
"if 'cert' in args:\n"
"    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)\n"
"    ctx.load_cert_chain(args['cert'], args['key'])\n"
"    if not implicit:\n"
"        kw['tls_context'] = ctx\n"
"        kw['require_starttls'] = True\n"
"loop = asyncio.new_event_loop()\n"
"asyncio.set_event_loop(loop)\n"
"loop.run_until_complete(loop.create_server(\n"
"    lambda: RecordingSMTP(Handler(), hostname='aiosmtpd', **kw),\n"
"    host='127.0.0.1', port=int(args['port']), ssl=ctx if implicit else None))\n"
"loop.run_forever()\n";

static void
start_aiosmtpd(struct server *s, const char *name, const char *const *opts)
{
	char script[PATH_MAX + 16], port[32], dir[PATH_MAX + 8], out[PATH_MAX + 8];
	char *argv[32];
	bool implicit = false;
	size_t n = 0;
	FILE *f;

	server_dir(s, name);
	s->port = free_port();
	snprintf(script, sizeof(script), "%s/aiosmtpd_server.py", workdir);
	if (access(script, R_OK) != 0) {
		ck_assert_ptr_nonnull(f = fopen(script, "w"));
		fputs(aiosmtpd_script, f);
		fclose(f);
	}
	snprintf(port, sizeof(port), "port=%d", s->port);
	snprintf(dir, sizeof(dir), "dir=%s", s->dir);
	snprintf(out, sizeof(out), "%s.log", s->dir);
	argv[n++] = (char *)PYTHON;
	argv[n++] = script;
	argv[n++] = port;
	argv[n++] = dir;
	for (; opts != NULL && *opts != NULL && n < 30; opts++) {
		argv[n++] = (char *)*opts;
		if (strcmp(*opts, "implicit=1") == 0)
			implicit = true;
	}
	argv[n] = NULL;
	s->pid = spawn(argv, out);
	wait_ready(s->port, s->pid, implicit, "220");
}

/*
 * t/integration/fakesmtp.py: a raw-socket server whose every reply is
 * scripted (VERB=REPLY, ehlo=CAP,CAP, greeting=TEXT, see that file). It
 * writes each connection's transcript to dir/session.N, ending "CLOSED".
 */
static void
start_fake(struct server *s, const char *name, const char *const *opts)
{
	char script[PATH_MAX + 16], port[32], out[PATH_MAX + 8];
	char *argv[32];
	bool greets = true;
	size_t n = 0;

	server_dir(s, name);
	s->port = free_port();
	snprintf(script, sizeof(script), "%s/t/integration/fakesmtp.py", SRCDIR);
	snprintf(port, sizeof(port), "%d", s->port);
	snprintf(out, sizeof(out), "%s.log", s->dir);
	argv[n++] = (char *)PYTHON;
	argv[n++] = script;
	argv[n++] = port;
	argv[n++] = s->dir;
	for (; opts != NULL && *opts != NULL && n < 30; opts++) {
		argv[n++] = (char *)*opts;
		if (strcmp(*opts, "greeting=") == 0)
			greets = false;
	}
	argv[n] = NULL;
	s->pid = spawn(argv, out);
	wait_ready(s->port, s->pid, !greets, "220");
}

/* --- files ------------------------------------------------------------------ */

static char *
slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	char *buf;
	long n;

	if (f == NULL)
		return NULL;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	buf = malloc((size_t)n + 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
	buf[n] = '\0';
	fclose(f);
	*len = (size_t)n;
	return buf;
}

static char *
slurp_in(const struct server *s, const char *name, size_t *len)
{
	char path[PATH_MAX + 64];

	snprintf(path, sizeof(path), "%s/%s", s->dir, name);
	return slurp(path, len);
}

static bool
exists_in(const struct server *s, const char *name)
{
	char path[PATH_MAX + 64];

	snprintf(path, sizeof(path), "%s/%s", s->dir, name);
	return access(path, F_OK) == 0;
}

/* Files in dir, and the name of the last one (smtp-sink dumps). */
static int
count_files(const char *dir, char *last, size_t lastlen)
{
	struct dirent *de;
	DIR *d = opendir(dir);
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		n++;
		if (last != NULL)
			snprintf(last, lastlen, "%s/%s", dir, de->d_name);
	}
	closedir(d);
	return n;
}

/*
 * smtp-sink opens a dump file at MAIL, so aborted transactions leave files
 * too: a message was delivered only if its last line made it.
 */
static int
count_delivered(const char *dir)
{
	char path[PATH_MAX + 300];
	struct dirent *de;
	DIR *d = opendir(dir);
	size_t len;
	char *s;
	int n = 0;

	ck_assert_ptr_nonnull(d);
	while ((de = readdir(d)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		if ((s = slurp(path, &len)) == NULL)
			continue;
		if (strstr(s, "\nlast line\n") != NULL)
			n++;
		free(s);
	}
	closedir(d);
	return n;
}

/*
 * The transcript of the n-th connection (from 0) the fake got after
 * wait_ready()'s, once that connection is over; bounded (about 10 s).
 */
static char *
fake_transcript(const struct server *s, int n)
{
	struct timespec nap = { 0, 20 * 1000 * 1000 };
	char name[32];
	size_t len;
	char *t;

	snprintf(name, sizeof(name), "session.%d", n + 1);
	for (int tries = 0; tries < 500; tries++) {
		if ((t = slurp_in(s, name, &len)) != NULL) {
			if (len >= 8 && strcmp(t + len - 8, "CLOSED\r\n") == 0)
				return t;
			free(t);
		}
		nanosleep(&nap, NULL);
	}
	ck_abort_msg("connection %d of %s did not end", n, s->dir);
	return NULL;
}

static char *
read_log(void)
{
	char path[PATH_MAX + 8];
	size_t len;
	char *s;

	snprintf(path, sizeof(path), "%s/log", workdir);
	s = slurp(path, &len);
	ck_assert_ptr_nonnull(s);
	return s;
}

static bool
log_has(const char *needle)
{
	char *log = read_log();
	bool found = strstr(log, needle) != NULL;

	free(log);
	return found;
}

/* Open descriptors on unlinked smtpmux temp files inside dir. */
static int
count_unlinked_tmp(const char *dir)
{
	char fdpath[300], target[PATH_MAX], prefix[PATH_MAX + 16];
	struct dirent *de;
	DIR *d = opendir("/proc/self/fd");
	int n = 0;
	ssize_t len;

	ck_assert_ptr_nonnull(d);
	snprintf(prefix, sizeof(prefix), "%s/smtpmux.", dir);
	while ((de = readdir(d)) != NULL) {
		snprintf(fdpath, sizeof(fdpath), "/proc/self/fd/%s", de->d_name);
		len = readlink(fdpath, target, sizeof(target) - 1);
		if (len <= 0)
			continue;
		target[len] = '\0';
		if (strncmp(target, prefix, strlen(prefix)) == 0 &&
		    strstr(target, " (deleted)") != NULL)
			n++;
	}
	closedir(d);
	return n;
}

/* --- the client side: runtime, configuration, messages ------------------------ */

struct tenv {
	struct event_base *base;
	struct evdns_base *dns;
	struct runtime rt;
	struct config cfg;
	struct user_cfg user;
	struct downstream_cfg ds[MAX_DS];
	char strs[MAX_DS][4][80];
	char tmp_dir[512];
	struct tls_client_ctx *tls[MAX_DS];
	struct health *health;
	struct selector_inst *selector;
};

static void
tenv_init(struct tenv *t)
{
	memset(t, 0, sizeof(*t));
	t->base = event_base_new();
	ck_assert_ptr_nonnull(t->base);
	t->dns = evdns_base_new(t->base, 0);
	ck_assert_ptr_nonnull(t->dns);
	ck_assert_int_eq(evdns_base_load_hosts(t->dns, "/etc/hosts"), 0);
	snprintf(t->tmp_dir, sizeof(t->tmp_dir), "%s/tmp", workdir);
	mkdir(t->tmp_dir, 0700);
	t->cfg.hostname = (char *)"relay-test.example";
	t->cfg.tmp_dir = t->tmp_dir;
	t->cfg.limits.memory_threshold = 1024 * 1024;
	t->cfg.limits.upstream_connect_timeout = 5;
	t->cfg.limits.upstream_timeout = 10;
	t->cfg.limits.upstream_data_timeout = 20;
	t->cfg.health = (struct health_cfg){ 3, 30, 600, 60 };
	t->cfg.users = &t->user;
	t->cfg.n_users = 1;
	t->user.email = (char *)"app@example.org";
	t->user.downstreams = t->ds;
	t->rt.base = t->base;
	t->rt.dns = t->dns;
	t->rt.cfg = &t->cfg;
	t->rt.worker_slot = 0;
}

/* A connection cache in the runtime, as a worker has with the default config. */
static void
tenv_cache(struct tenv *t, unsigned idle_timeout, bool early_connect)
{
	t->cfg.connection_cache = (struct cache_cfg){
		.enabled = true, .max_idle = 2, .idle_timeout = idle_timeout,
		.max_messages = 100, .early_connect = early_connect,
	};
	t->rt.cache = upstream_cache_new(&t->cfg.connection_cache);
	ck_assert_ptr_nonnull(t->rt.cache);
}

static void
tenv_free(struct tenv *t)
{
	if (t->rt.cache != NULL) {
		/* As a stopping worker does: QUIT to the idle ones, let them end. */
		upstream_close_idle(&t->rt);
		event_base_dispatch(t->base);
		upstream_free_lingering(&t->rt);
		ck_assert_uint_eq(upstream_cache_count(t->rt.cache, NULL), 0);
		upstream_cache_free(t->rt.cache);
	}
	for (size_t i = 0; i < MAX_DS; i++)
		tls_client_free(t->tls[i]);
	evdns_base_free(t->dns, 0);
	event_base_free(t->base);
	if (t->health != NULL)
		health_destroy(t->health);
	selector_free(t->selector);
}

static struct downstream_cfg *
add_ds(struct tenv *t, const char *name, const char *host, int port, enum tls_mode tls)
{
	size_t i = t->user.n_downstreams++;
	struct downstream_cfg *ds = &t->ds[i];

	ck_assert_uint_lt(i, MAX_DS);
	snprintf(t->strs[i][0], sizeof(t->strs[i][0]), "%s", name);
	snprintf(t->strs[i][1], sizeof(t->strs[i][1]), "%s:%d", host, port);
	snprintf(t->strs[i][2], sizeof(t->strs[i][2]), "%s", host);
	snprintf(t->strs[i][3], sizeof(t->strs[i][3]), "%d", port);
	ds->name = t->strs[i][0];
	ds->addr = t->strs[i][1];
	ds->host = t->strs[i][2];
	ds->port = t->strs[i][3];
	ds->tls = tls;
	ds->tls_explicit = true;
	ds->tls_verify = true;
	ds->weight = 1;
	return ds;
}

/* A port nothing listens on. */
static int
closed_port(void)
{
	return free_port();
}

struct tmsg {
	struct upstream_msg m;
	struct msgbody *body;
	char id[13];
};

static void
tmsg_init(struct tmsg *tm, struct tenv *t, const char *from, const char *const *rcpts,
    size_t n_rcpts, const void *data, size_t len)
{
	memset(tm, 0, sizeof(*tm));
	runtime_new_id(&t->rt, tm->id, (uint64_t)time(NULL) * 1000000, (uint32_t)getpid());
	tm->body = msgbody_new(t->cfg.limits.memory_threshold, t->cfg.tmp_dir);
	ck_assert_ptr_nonnull(tm->body);
	ck_assert_int_eq(msgbody_append(tm->body, data, len), 0);
	tm->m.id = tm->id;
	tm->m.mail_from = from;
	tm->m.rcpts = rcpts;
	tm->m.n_rcpts = n_rcpts;
	tm->m.body = SMTP_BODY_7BIT;
	tm->m.data = tm->body;
}

/* --- running the loop ------------------------------------------------------------- */

struct waiter {
	bool done;
	bool timed_out;
	struct relay_result rres;
	struct upstream_result ures;
	char ustage[16];
};

static void
on_relay_done(void *arg, const struct relay_result *res)
{
	struct waiter *w = arg;

	ck_assert(!w->done);
	w->done = true;
	w->rres = *res;
}

static void
on_upstream_done(void *arg, const struct upstream_result *res)
{
	struct waiter *w = arg;

	ck_assert(!w->done);
	w->done = true;
	w->ures = *res;
	/* stage points to static text, but keep a copy to be safe */
	snprintf(w->ustage, sizeof(w->ustage), "%s", res->stage ? res->stage : "");
}

static void
on_guard(evutil_socket_t fd, short what, void *arg)
{
	struct waiter *w = arg;

	(void)fd;
	(void)what;
	w->timed_out = true;
}

/*
 * Runs the loop until done, then until nothing is left (the attempt's QUIT
 * and self-destruction), so that leaks show under valgrind. With a
 * connection cache the session stays for the next message instead;
 * tenv_free() ends it.
 */
static void
run_until_done(struct tenv *t, struct waiter *w, unsigned seconds)
{
	struct timeval tv = { seconds, 0 };
	struct event *guard = evtimer_new(t->base, on_guard, w);

	evtimer_add(guard, &tv);
	while (!w->done && !w->timed_out)
		event_base_loop(t->base, EVLOOP_ONCE);
	event_free(guard);
	ck_assert_msg(w->done, "no result within %u s", seconds);
	if (t->rt.cache == NULL)
		event_base_dispatch(t->base);
}

/* Runs the loop until the log says what we wait for (bounded). */
static void
run_until_logged(struct tenv *t, const char *needle, unsigned seconds)
{
	struct waiter w;
	struct timeval tv = { seconds, 0 };
	struct event *guard;

	memset(&w, 0, sizeof(w));
	guard = evtimer_new(t->base, on_guard, &w);
	evtimer_add(guard, &tv);
	while (!log_has(needle) && !w.timed_out)
		event_base_loop(t->base, EVLOOP_ONCE);
	event_free(guard);
	ck_assert_msg(log_has(needle), "not logged within %u s: %s", seconds, needle);
}

#define assert_status(w, st) \
	ck_assert_msg((w).ures.status == (st), "status %d stage %s: %d %s", \
	    (w).ures.status, (w).ustage, (w).ures.code, (w).ures.text)

static struct relay_result
relay_run(struct tenv *t, struct tmsg *tm)
{
	struct waiter w;
	struct relay *r;

	memset(&w, 0, sizeof(w));
	r = relay_start(&t->rt, &t->user, &tm->m, msgbody_size(tm->body), "192.0.2.1",
	    on_relay_done, &w);
	ck_assert_ptr_nonnull(r);
	ck_assert(!w.done);                  /* never inside relay_start() */
	run_until_done(t, &w, 60);
	return w.rres;
}

static struct waiter
upstream_run(struct tenv *t, const struct downstream_cfg *ds, struct tmsg *tm)
{
	struct waiter w;
	struct upstream *up;

	memset(&w, 0, sizeof(w));
	if (tm != NULL)
		up = upstream_start(&t->rt, ds, &tm->m, 0, on_upstream_done, &w);
	else
		up = upstream_probe(&t->rt, ds, on_upstream_done, &w);
	ck_assert_ptr_nonnull(up);
	ck_assert(!w.done);
	run_until_done(t, &w, 60);
	return w;
}

/* --- sample messages ------------------------------------------------------------------ */

static const char sample[] =
    "From: App <app@example.org>\r\n"
    "To: <rcpt@example.net>\r\n"
    "Subject: dots and such\r\n"
    "\r\n"
    ".\r\n"
    "..two dots\r\n"
    ".leading dot\r\n"
    "a line . with a dot\r\n"
    "\r\n"
    ". \r\n"
    "last line\r\n";

static const char *const one_rcpt[] = { "rcpt@example.net" };
static const char *const two_rcpts[] = { "rcpt@example.net", "other@example.com" };

/* smtp-sink stores lines with LF ends and appends an empty line. */
static char *
sink_expected(const char *msg, size_t len, size_t *outlen)
{
	char *out = malloc(len + 2);
	size_t o = 0;

	ck_assert_ptr_nonnull(out);
	for (size_t i = 0; i < len; i++)
		if (!(msg[i] == '\r' && i + 1 < len && msg[i + 1] == '\n'))
			out[o++] = msg[i];
	out[o++] = '\n';
	out[o] = '\0';
	*outlen = o;
	return out;
}

/* The message part of a smtp-sink dump: after its three-line Received: header. */
static const char *
sink_body(const char *dump)
{
	const char *p = strstr(dump, "\nReceived: ");

	ck_assert_ptr_nonnull(p);
	for (int lines = 0; lines < 3; lines++) {
		p = strchr(p + 1, '\n');
		ck_assert_ptr_nonnull(p);
	}
	return p + 1;
}

/* ======================================================================== */
/* msgbody */

START_TEST(test_msgbody_memory)
{
	struct msgbody *b = msgbody_new(4096, workdir);
	char buf[64];

	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(msgbody_append(b, "hello ", 6), 0);
	ck_assert_int_eq(msgbody_append(b, "world\r\n", 7), 0);
	ck_assert_uint_eq(msgbody_size(b), 13);
	ck_assert_int_eq(count_unlinked_tmp(workdir), 0);
	ck_assert_int_eq(msgbody_read(b, 0, buf, sizeof(buf)), 13);
	ck_assert(memcmp(buf, "hello world\r\n", 13) == 0);
	ck_assert_int_eq(msgbody_read(b, 6, buf, 3), 3);
	ck_assert(memcmp(buf, "wor", 3) == 0);
	ck_assert_int_eq(msgbody_read(b, 13, buf, sizeof(buf)), 0);
	ck_assert_int_eq(msgbody_read(b, 1000, buf, sizeof(buf)), 0);
	msgbody_free(b);
}
END_TEST

START_TEST(test_msgbody_spills_to_unlinked_file)
{
	char dir[PATH_MAX + 8], chunk[700], buf[4096];
	struct msgbody *b;
	size_t total = 0;
	ssize_t n;

	snprintf(dir, sizeof(dir), "%s/spill", workdir);
	ck_assert_int_eq(mkdir(dir, 0700), 0);
	b = msgbody_new(2000, dir);
	ck_assert_ptr_nonnull(b);
	for (int i = 0; i < 5; i++) {
		memset(chunk, 'a' + i, sizeof(chunk));
		ck_assert_int_eq(msgbody_append(b, chunk, sizeof(chunk)), 0);
		total += sizeof(chunk);
		/* 1400 octets fit the threshold; the third chunk moves all to a file */
		ck_assert_int_eq(count_unlinked_tmp(dir), total > 2000 ? 1 : 0);
	}
	ck_assert_uint_eq(msgbody_size(b), 3500);
	ck_assert_int_eq(count_files(dir, NULL, 0), 0);  /* unlinked right away */
	n = msgbody_read(b, 0, buf, sizeof(buf));
	ck_assert_int_eq(n, 3500);
	for (size_t i = 0; i < 3500; i++)
		ck_assert_int_eq(buf[i], 'a' + (int)(i / 700));
	/* a read straddling chunk boundaries, from the file */
	ck_assert_int_eq(msgbody_read(b, 1390, buf, 20), 20);
	ck_assert(memcmp(buf, "bbbbbbbbbbcccccccccc", 20) == 0);
	ck_assert_int_eq(msgbody_read(b, 3490, buf, 100), 10);
	ck_assert_int_eq(msgbody_read(b, 3500, buf, 100), 0);
	msgbody_free(b);
	ck_assert_int_eq(count_unlinked_tmp(dir), 0);
}
END_TEST

START_TEST(test_msgbody_bad_tmp_dir)
{
	char dir[PATH_MAX + 16];
	struct msgbody *b;

	snprintf(dir, sizeof(dir), "%s/missing", workdir);
	b = msgbody_new(10, dir);
	ck_assert_ptr_nonnull(b);
	ck_assert_int_eq(msgbody_append(b, "0123456789", 10), 0);
	errno = 0;
	ck_assert_int_eq(msgbody_append(b, "x", 1), -1);
	ck_assert_int_eq(errno, ENOENT);
	msgbody_free(b);
}
END_TEST

/* ======================================================================== */
/* delivery */

START_TEST(test_relay_byte_identical_aiosmtpd)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char expect[256];
	size_t len;
	char *got, *env;

	start_aiosmtpd(&srv, "aio", NULL);
	tenv_init(&t);
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", two_rcpts, 2, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert(res.ok);
	ck_assert_int_eq(res.code, 250);
	ck_assert_str_eq(res.enhanced, "2.0.0");
	snprintf(expect, sizeof(expect), "Ok: queued as %s", tm.id);
	ck_assert_str_eq(res.text, expect);
	ck_assert_str_eq(res.relay, "aio");

	got = slurp_in(&srv, "msg.1", &len);
	ck_assert_ptr_nonnull(got);
	ck_assert_uint_eq(len, strlen(sample));
	ck_assert(memcmp(got, sample, len) == 0);
	env = slurp_in(&srv, "env.1", &len);
	ck_assert_ptr_nonnull(env);
	ck_assert_ptr_nonnull(strstr(env, "from=app@example.org\n"));
	snprintf(expect, sizeof(expect), "opts=SIZE=%zu\n", strlen(sample));
	ck_assert_ptr_nonnull(strstr(env, expect));
	ck_assert_ptr_nonnull(strstr(env, "rcpt=rcpt@example.net\nrcpt=other@example.com\n"));
	ck_assert(!exists_in(&srv, "msg.2"));

	snprintf(expect, sizeof(expect), "id=%s relay=aio[127.0.0.1:%d] attempt=1 stage=dot "
	    "status=sent", tm.id, srv.port);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	snprintf(expect, sizeof(expect), "id=%s user=app@example.org from=<app@example.org> "
	    "to=<rcpt@example.net>,<other@example.com> nrcpt=2 size=%zu relay=aio attempts=1 "
	    "status=sent", tm.id, strlen(sample));
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	ck_assert(log_has("tls=none (250 2.0.0 Ok: stored as 1)"));
	free(got);
	free(env);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_relay_pipelined_smtp_sink)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char dump[PATH_MAX + 300], *content, *expect;
	size_t len, elen;

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", two_rcpts, 2, sample, strlen(sample));
	tm.m.body = SMTP_BODY_8BITMIME;
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_int_eq(count_files(srv.dir, dump, sizeof(dump)), 1);
	content = slurp(dump, &len);
	ck_assert_ptr_nonnull(content);
	/* smtp-sink advertises PIPELINING and 8BITMIME but not SIZE */
	ck_assert_ptr_nonnull(strstr(content, "X-Helo-Args: relay-test.example\n"));
	ck_assert_ptr_nonnull(strstr(content, "X-Mail-Args: <app@example.org> BODY=8BITMIME\n"));
	ck_assert_ptr_nonnull(strstr(content, "X-Rcpt-Args: <rcpt@example.net>\n"
	    "X-Rcpt-Args: <other@example.com>\n"));
	expect = sink_expected(sample, strlen(sample), &elen);
	ck_assert_str_eq(sink_body(content), expect);
	free(expect);
	free(content);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A message that does not end with CRLF still ends with one before the dot. */
START_TEST(test_relay_unterminated_and_empty)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char *got;
	size_t len;

	start_aiosmtpd(&srv, "aio", NULL);
	tenv_init(&t);
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "", one_rcpt, 1, "Subject: x\r\n\r\n.no end", 21);
	res = relay_run(&t, &tm);
	ck_assert(res.ok);
	got = slurp_in(&srv, "msg.1", &len);
	ck_assert_ptr_nonnull(got);
	ck_assert_uint_eq(len, 23);
	ck_assert(memcmp(got, "Subject: x\r\n\r\n.no end\r\n", 23) == 0);
	free(got);
	got = slurp_in(&srv, "env.1", &len);
	ck_assert_ptr_nonnull(strstr(got, "from=<>\n"));      /* null reverse-path */
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_relay_10mb_from_temp_file)
{
	const size_t target = 10 * 1024 * 1024;
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	struct timeval t0, t1;
	char *msg, *got;
	size_t len = 0, glen;
	unsigned line = 0;

	msg = malloc(target + 128);
	ck_assert_ptr_nonnull(msg);
	len += (size_t)sprintf(msg, "Subject: big\r\n\r\n");
	while (len < target) {
		/* every 7th line starts with a dot; every 11th is a lone dot */
		if (line % 11 == 0)
			len += (size_t)sprintf(msg + len, ".\r\n");
		else
			len += (size_t)sprintf(msg + len, "%s%08u ABCDEFGHIJKLMNOPQRSTUVWXYZ "
			    "abcdefghijklmnopqrstuvwxyz 0123456789 0123456789\r\n",
			    line % 7 == 0 ? "." : "", line);
		line++;
	}
	start_aiosmtpd(&srv, "aio", NULL);
	tenv_init(&t);
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, msg, len);
	/* over the 1 MiB threshold: the body lives in an unlinked temp file */
	ck_assert_int_eq(count_unlinked_tmp(t.tmp_dir), 1);
	ck_assert_int_eq(count_files(t.tmp_dir, NULL, 0), 0);
	gettimeofday(&t0, NULL);
	res = relay_run(&t, &tm);
	gettimeofday(&t1, NULL);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	got = slurp_in(&srv, "msg.1", &glen);
	ck_assert_ptr_nonnull(got);
	ck_assert_uint_eq(glen, len);
	ck_assert(memcmp(got, msg, len) == 0);
	fprintf(stderr, "10 MB relayed to aiosmtpd in %.2f s\n",
	    (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_usec - t0.tv_usec) / 1e6);
	free(got);
	free(msg);
	msgbody_free(tm.body);
	ck_assert_int_eq(count_unlinked_tmp(t.tmp_dir), 0);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* failover */

static void
assert_second_used(struct tenv *t, struct tmsg *tm, const struct server *second,
    const char *first_stage)
{
	struct relay_result res = relay_run(t, tm);
	char expect[160];

	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_str_eq(res.relay, "second");
	ck_assert_int_eq(count_files(second->dir, NULL, 0), 1);
	snprintf(expect, sizeof(expect), "id=%s relay=first[%s] attempt=1 stage=%s status=deferred",
	    tm->id, t->ds[0].addr, first_stage);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	snprintf(expect, sizeof(expect), "id=%s relay=second[%s] attempt=2 stage=dot status=sent",
	    tm->id, t->ds[1].addr);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	ck_assert(log_has("relay=second attempts=2 status=sent"));
}

START_TEST(test_failover_connect_refused)
{
	struct server s2;
	struct tenv t;
	struct tmsg tm;
	char expect[128];
	int dead = closed_port();

	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", dead, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	assert_second_used(&t, &tm, &s2, "connect");
	snprintf(expect, sizeof(expect), "(0 connect to 127.0.0.1:%d: Connection refused)", dead);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_failover_rcpt_451)
{
	static const char *const soft_rcpt[] = { "-r", "rcpt", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;

	start_sink(&s1, "first", soft_rcpt);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", two_rcpts, 2, sample, strlen(sample));
	assert_second_used(&t, &tm, &s2, "rcpt");
	ck_assert_int_eq(count_delivered(s1.dir), 0);
	ck_assert(log_has("stage=rcpt status=deferred delay="));
	ck_assert(log_has("(450 4.3.0 Error: command failed)"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_failover_disconnect_at_dot)
{
	static const char *const drop_dot[] = { "-q", ".", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;

	start_sink(&s1, "first", drop_dot);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	assert_second_used(&t, &tm, &s2, "dot");
	ck_assert(log_has("connection closed by downstream while waiting for reply to end of data"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_failover_disconnect_at_data)
{
	static const char *const drop_data[] = { "-q", "data", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;

	start_sink(&s1, "first", drop_data);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	assert_second_used(&t, &tm, &s2, "data");
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_all_down_451)
{
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;

	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", closed_port(), TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", closed_port(), TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert(!res.ok);
	ck_assert_int_eq(res.code, 451);
	ck_assert_str_eq(res.enhanced, "4.4.1");
	ck_assert_str_eq(res.text, "Requested action aborted: no downstream accepted the "
	    "message, try again later");
	ck_assert_str_eq(res.relay, "");
	ck_assert(log_has("relay=none attempts=2 status=deferred"));
	/* For the queue: retry later, by backoff (attempts were made), and the
	 * last failure. */
	ck_assert(res.temporary);
	ck_assert_int_eq(res.quota_reopens, 0);
	ck_assert_str_eq(res.failed_relay, "second");
	ck_assert_ptr_nonnull(strstr(res.failed_text, "Connection refused"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_no_downstream_451)
{
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;

	tenv_init(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);
	ck_assert_str_eq(res.enhanced, "4.4.1");
	ck_assert(log_has("relay=none attempts=0 status=deferred"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_all_550_bounces)
{
	static const char *const hard_rcpt[] = { "-f", "rcpt", "-B", "550 5.1.1 No such user", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;

	start_sink(&s1, "first", hard_rcpt);
	start_sink(&s2, "second", hard_rcpt);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert(!res.ok);
	ck_assert_int_eq(res.code, 550);
	ck_assert_str_eq(res.enhanced, "5.1.1");
	ck_assert_str_eq(res.text, "Message rejected by downstream: No such user");
	ck_assert(!res.temporary);
	ck_assert_ptr_nonnull(strstr(res.failed_text, "550 5.1.1"));
	ck_assert(log_has("attempt=1 stage=rcpt status=bounced"));
	ck_assert(log_has("attempt=2 stage=rcpt status=bounced"));
	ck_assert(log_has("relay=none attempts=2 status=bounced"));
	ck_assert_int_eq(count_delivered(s1.dir) + count_delivered(s2.dir), 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* One temporary failure among permanent ones: the client retries later. */
START_TEST(test_perm_and_temp_defers)
{
	static const char *const hard_data[] = { "-f", "data", NULL };
	static const char *const soft_rcpt[] = { "-r", "rcpt", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;

	start_sink(&s1, "first", hard_data);
	start_sink(&s2, "second", soft_rcpt);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);
	ck_assert_str_eq(res.enhanced, "4.4.1");
	ck_assert(log_has("attempt=1 stage=data status=bounced"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* Account names in a downstream's reply are masked. */
START_TEST(test_perm_text_masks_account)
{
	static const char *const opts[] = {
		"auth=relayacct:s3cret", "data_reply=554 5.7.1 relayacct may not send this", NULL
	};
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayacct";
	ds->pass = (char *)"s3cret";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 554);
	ck_assert_str_eq(res.enhanced, "5.7.1");
	ck_assert_str_eq(res.text, "Message rejected by downstream: *** may not send this");
	ck_assert(!log_has("s3cret"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A secret where the client's copy of the text is cut short is masked whole. */
START_TEST(test_perm_text_masks_secret_at_cut)
{
	char reply[512], pad[192];
	const char *opts[] = { "auth=relayacct:s3cretpassword", reply, NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;

	/* the secret starts 191 octets into the text, which is cut at 199 */
	memset(pad, 'y', 190);
	pad[190] = '\0';
	snprintf(reply, sizeof(reply), "data_reply=554 5.7.1 %s s3cretpassword was refused", pad);
	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayacct";
	ds->pass = (char *)"s3cretpassword";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 554);
	ck_assert_msg(strstr(res.text, "s3cre") == NULL, "secret leaked: %s", res.text);
	ck_assert_msg(strstr(res.text, " ***") != NULL, "%s", res.text);
	ck_assert(log_has("was refused"));
	ck_assert(!log_has("s3cretpassword"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* throttling */

START_TEST(test_throttle_reply)
{
	static const char *const opts[] = { "rcpt_reply=451 4.7.0 Rate limit exceeded, slow down", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert(w.ures.throttle);
	ck_assert_str_eq(w.ustage, "rcpt");
	ck_assert_int_eq(w.ures.code, 451);
	ck_assert_str_eq(w.ures.enhanced, "4.7.0");
	ck_assert_str_eq(w.ures.text, "Rate limit exceeded, slow down");
	ck_assert_str_eq(w.ures.tls_desc, "");
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A quota reported as 5xx fails over and defers; it never bounces. */
START_TEST(test_throttle_5xx_defers)
{
	static const char *const opts[] = {
		"data_reply=550 5.4.5 Daily user sending quota exceeded", NULL
	};
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	struct waiter w;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_PERMFAIL);
	ck_assert(w.ures.throttle);
	ck_assert_str_eq(w.ustage, "dot");
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);
	ck_assert_str_eq(res.enhanced, "4.4.1");
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* AUTH and credentials */

/*
 * Relays one message through an aiosmtpd that takes relayuser:relaypass
 * (server options opts) with `auth: auth`, and checks the one AUTH it
 * recorded ("MECHANISM user tls=...").
 */
static void
assert_auth_used(const char *const *opts, enum downstream_auth auth, const char *want)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;
	size_t len;
	char *seen;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	ds->auth = auth;
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	seen = slurp_in(&srv, "auth", &len);
	ck_assert_ptr_nonnull(seen);
	ck_assert_str_eq(seen, want);
	ck_assert(exists_in(&srv, "msg.1"));
	ck_assert(!log_has("relaypass"));
	free(seen);
	msgbody_free(tm.body);
	tenv_free(&t);
}

START_TEST(test_auth_plain)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };

	assert_auth_used(opts, DS_AUTH_AUTO, "PLAIN relayuser tls=False\n");
}
END_TEST

START_TEST(test_auth_login)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", "auth_exclude=PLAIN", NULL };

	assert_auth_used(opts, DS_AUTH_AUTO, "LOGIN relayuser tls=False\n");
}
END_TEST

/* `auth: login` is used even when the server would take PLAIN. */
START_TEST(test_auth_mechanism_from_config)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };

	assert_auth_used(opts, DS_AUTH_LOGIN, "LOGIN relayuser tls=False\n");
}
END_TEST

/* `auth: none`: a user name (the health record's key) but no AUTH at all. */
START_TEST(test_auth_none)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;

	start_aiosmtpd(&srv, "aio", NULL);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->auth = DS_AUTH_NONE;
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert(!exists_in(&srv, "auth-cmd"));
	ck_assert(exists_in(&srv, "msg.1"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/*
 * A downstream whose token source has no token is skipped, with the token
 * helper's reason, and never connected to; an attempt started anyway ends
 * at AUTH without waiting.
 */
START_TEST(test_no_token_skips_downstream)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };
	struct token_source_cfg src = { .kind = TOKEN_SOURCE_REFRESH_TOKEN, .id = 7 };
	struct token_status st = { .failing = 1,
	    .last_error = "token endpoint: HTTP 400 invalid_grant" };
	struct server oauth, backup;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;
	struct waiter w;
	char state[PATH_MAX], err[256];

	start_aiosmtpd(&oauth, "oauth", opts);
	start_aiosmtpd(&backup, "backup", NULL);
	tenv_init(&t);
	ds = add_ds(&t, "oauth", "127.0.0.1", oauth.port, TLS_MODE_NONE);
	ds->user = (char *)"me@example.com";
	ds->auth = DS_AUTH_XOAUTH2;          /* the server offers none: sent anyway */
	ds->token = &src;
	add_ds(&t, "backup", "127.0.0.1", backup.port, TLS_MODE_NONE);
	snprintf(state, sizeof(state), "%s/state", workdir);
	t.cfg.state_file = state;
	t.cfg.users = &t.user;
	t.cfg.n_users = 1;
	ck_assert_msg(token_table_bind(&t.rt.tokens, &t.cfg, err, sizeof(err)) == 0, "%s", err);
	token_table_status_put(t.rt.tokens, ds->token_slot, &st);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert(exists_in(&backup, "msg.1"));
	ck_assert(!exists_in(&oauth, "auth-cmd"));
	ck_assert(log_has("relay=oauth[127.0.0.1:"));
	ck_assert(log_has("stage=auth status=skipped delay=0.000 tls=none (0 no OAuth token: "
	    "token endpoint: HTTP 400 invalid_grant)"));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "auth");
	ck_assert_str_eq(w.ures.text, "no OAuth token: token endpoint: HTTP 400 invalid_grant");
	ck_assert(!exists_in(&oauth, "auth-cmd"));
	msgbody_free(tm.body);
	token_table_destroy(t.rt.tokens);
	tenv_free(&t);
}
END_TEST

/* Bad credentials are the downstream's problem, not the message's: 451. */
START_TEST(test_auth_rejected_defers)
{
	static const char *const opts[] = { "auth=relayuser:other", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;
	struct waiter w;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_PERMFAIL);
	ck_assert_str_eq(w.ustage, "auth");
	ck_assert_int_eq(w.ures.code, 535);
	ck_assert_ptr_null(strstr(w.ures.text, "relaypass"));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);
	ck_assert(!exists_in(&srv, "msg.1"));
	ck_assert(!log_has("relaypass"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_no_credentials_without_starttls)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;
	char err[256];

	ck_assert_int_eq(tls_global_init(), 0);
	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_STARTTLS);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	ds->tls_client = t.tls[0] = tls_client_new(NULL, false, NULL, err, sizeof(err));
	ck_assert_msg(ds->tls_client != NULL, "%s", err);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "tls");
	ck_assert_str_eq(w.ures.text, "downstream does not offer STARTTLS");
	ck_assert(!exists_in(&srv, "auth-cmd"));
	ck_assert(!exists_in(&srv, "auth"));
	ck_assert(!exists_in(&srv, "msg.1"));
	msgbody_free(tm.body);
	tenv_free(&t);
	tls_global_deinit();
}
END_TEST

/* tls none that the administrator did not write: still no plain-text credentials. */
START_TEST(test_no_credentials_on_implicit_plain)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->tls_explicit = false;
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "auth");
	ck_assert_str_eq(w.ures.text, "refusing to send credentials without TLS");
	ck_assert(!exists_in(&srv, "auth-cmd"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* protocol corners */

START_TEST(test_reply_timeout)
{
	static const char *const slow_rcpt[] = { "rcpt_delay=5", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;

	start_aiosmtpd(&srv, "aio", slow_rcpt);
	tenv_init(&t);
	t.cfg.limits.upstream_timeout = 1;
	add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "rcpt");
	ck_assert_str_eq(w.ures.text, "timeout waiting for reply to RCPT");
	ck_assert_uint_ge(w.ures.latency_ms, 900);
	ck_assert_uint_lt(w.ures.latency_ms, 4000);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/*
 * A downstream that answers up to DATA with `data_reply` (one write, so
 * a reply to the final dot may come with the 354), then reads nothing for
 * `stall` seconds, then everything until EOF into the file out.
 */
static void
start_stalling_server(int *port, const char *data_reply, const char *out, unsigned stall)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	int lfd;
	pid_t pid;

	lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	ck_assert_int_ge(lfd, 0);
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	ck_assert_int_eq(listen(lfd, 4), 0);
	ck_assert_int_eq(getsockname(lfd, (struct sockaddr *)&sin, &len), 0);
	*port = ntohs(sin.sin_port);
	ck_assert_uint_lt(n_children, MAX_CHILDREN);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		char buf[65536], *lf;
		size_t got = 0;
		ssize_t n;
		struct pollfd pfd;
		int fd, ofd;
		bool data = false;

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if ((fd = accept(lfd, NULL, NULL)) < 0 ||
		    (ofd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600)) < 0)
			_exit(1);
		(void)!write(fd, "220 stall ESMTP\r\n", 17);
		while (!data && (n = read(fd, buf + got, sizeof(buf) - 1 - got)) > 0) {
			got += (size_t)n;
			buf[got] = '\0';
			while (!data && (lf = strchr(buf, '\n')) != NULL) {
				const char *r = "250 ok\r\n";

				if ((data = strncasecmp(buf, "DATA", 4) == 0))
					r = data_reply;
				(void)!write(fd, r, strlen(r));
				got -= (size_t)(lf + 1 - buf);
				memmove(buf, lf + 1, got + 1);
			}
		}
		sleep(stall);
		pfd.fd = fd;
		pfd.events = POLLIN;
		while (poll(&pfd, 1, 15000) == 1 && (n = read(fd, buf, sizeof(buf))) > 0)
			(void)!write(ofd, buf, (size_t)n);
		close(ofd);
		_exit(0);
	}
	close(lfd);
	children[n_children++] = pid;
}

/*
 * The attempt ended (here a reply came early; a timeout waiting for the
 * reply does the same) while the end of the message and its final dot
 * were still queued: they must never reach the downstream, which would
 * otherwise accept a message reported as failed and retried elsewhere.
 */
START_TEST(test_dot_failure_drops_unsent_end)
{
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	char out[PATH_MAX + 16], *got;
	size_t glen;
	pid_t pid;
	int port, st;

	snprintf(out, sizeof(out), "%s/stalled", workdir);
	start_stalling_server(&port, "354 go ahead\r\n451 4.3.0 not now\r\n", out, 2);
	pid = children[n_children - 1];
	tenv_init(&t);
	add_ds(&t, "stall", "127.0.0.1", port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "dot");
	ck_assert_int_eq(w.ures.code, 451);
	while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
		;
	children[--n_children] = 0;
	ck_assert(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	got = slurp(out, &glen);
	ck_assert_ptr_nonnull(got);
	ck_assert_msg(strstr(got, "\r\n.\r\n") == NULL, "the final dot was sent");
	ck_assert(strstr(got, "QUIT") == NULL);
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_greeting_rejected)
{
	static const char *const reject_connect[] = { "-f", "connect", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct relay_result res;

	start_sink(&srv, "sink", reject_connect);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	ck_assert_str_eq(w.ustage, "greeting");
	ck_assert_int_ge(w.ures.code, 500);
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);      /* not the message's fault */
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_helo_fallback)
{
	static const char *const reject_ehlo[] = { "-f", "ehlo", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char dump[PATH_MAX + 300], *content;
	size_t len;

	start_sink(&srv, "sink", reject_ehlo);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_int_eq(count_files(srv.dir, dump, sizeof(dump)), 1);
	content = slurp(dump, &len);
	ck_assert_ptr_nonnull(strstr(content, "X-Client-Proto: SMTP\n"));
	ck_assert_ptr_nonnull(strstr(content, "X-Mail-Args: <app@example.org>\n"));
	free(content);
	/* no EHLO, no 8BITMIME: an 8-bit message cannot go there (RFC 6152) */
	tm.m.body = SMTP_BODY_8BITMIME;
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 554);
	ck_assert_str_eq(res.enhanced, "5.6.3");
	ck_assert_int_eq(count_files(srv.dir, NULL, 0), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_refuses_crlf_in_command)
{
	static const char *const evil[] = { "ok@example.net>\r\nRCPT TO:<evil@example.net" };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", evil, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "rcpt");
	ck_assert_str_eq(w.ures.text, "refusing to send a command containing CR, LF or NUL");
	ck_assert_int_eq(count_files(srv.dir, NULL, 0), 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_probe)
{
	struct server srv;
	struct tenv t;
	struct waiter w;

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	add_ds(&t, "dead", "127.0.0.1", closed_port(), TLS_MODE_NONE);
	w = upstream_run(&t, &t.ds[0], NULL);
	assert_status(w, UPSTREAM_OK);
	ck_assert_str_eq(w.ustage, "ehlo");
	w = upstream_run(&t, &t.ds[1], NULL);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "connect");
	ck_assert_ptr_nonnull(strstr(w.ures.text, "Connection refused"));
	tenv_free(&t);
}
END_TEST

START_TEST(test_resolve_failure)
{
	struct tenv t;
	struct tmsg tm;
	struct waiter w;

	tenv_init(&t);
	/* no nameservers configured: only /etc/hosts answers */
	add_ds(&t, "nowhere", "no-such-host.invalid", 25, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, &t.ds[0], &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "connect");
	ck_assert_ptr_nonnull(strstr(w.ures.text, "resolve no-such-host.invalid: "));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

static void
on_cancel_timer(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	relay_cancel(arg);
}

/* Cancel mid-attempt: no callback, nothing left behind (see valgrind). */
START_TEST(test_cancel)
{
	static const char *const slow_data[] = { "-W", "data:5", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct relay *r;
	struct timeval tv = { 0, 300 * 1000 }, t0, t1;

	start_sink(&srv, "sink", slow_data);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	memset(&w, 0, sizeof(w));
	r = relay_start(&t.rt, &t.user, &tm.m, msgbody_size(tm.body), "192.0.2.1",
	    on_relay_done, &w);
	ck_assert_ptr_nonnull(r);
	event_base_once(t.base, -1, EV_TIMEOUT, on_cancel_timer, r, &tv);
	gettimeofday(&t0, NULL);
	event_base_dispatch(t.base);       /* returns once nothing is pending */
	gettimeofday(&t1, NULL);
	ck_assert(!w.done);
	ck_assert_int_lt(t1.tv_sec - t0.tv_sec, 3);
	ck_assert(log_has("attempt=1 status=cancelled"));
	ck_assert_int_eq(count_delivered(srv.dir), 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A name with two addresses: the first refuses, the second is used. */
START_TEST(test_tries_each_address)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char hosts[PATH_MAX + 16], expect[160];
	FILE *f;

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	snprintf(hosts, sizeof(hosts), "%s/hosts", workdir);
	ck_assert_ptr_nonnull(f = fopen(hosts, "w"));
	/* nothing listens on 127.0.0.3 at this port */
	fputs("127.0.0.3 multi.test\n127.0.0.1 multi.test\n", f);
	fclose(f);
	ck_assert_int_eq(evdns_base_load_hosts(t.dns, hosts), 0);
	add_ds(&t, "multi", "multi.test", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_int_eq(count_delivered(srv.dir), 1);
	snprintf(expect, sizeof(expect), "relay=multi[multi.test:%d] attempt=1 stage=dot status=sent",
	    srv.port);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	snprintf(expect, sizeof(expect), "relay=multi: connect to 127.0.0.3:%d: Connection refused",
	    srv.port);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_auth_not_offered)
{
	static const char *const no_auth[] = { "-a", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;

	start_sink(&srv, "sink", no_auth);
	tenv_init(&t);
	ds = add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "auth");
	ck_assert_str_eq(w.ures.text, "downstream offers neither AUTH PLAIN nor AUTH LOGIN");
	ck_assert_int_eq(count_files(srv.dir, NULL, 0), 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

static void
on_cancel_upstream(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	upstream_cancel(arg);
}

/* Cancelled while evdns is still resolving: no callback, nothing leaked. */
START_TEST(test_cancel_while_resolving)
{
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct upstream *up;
	struct timeval tv = { 0, 100 * 1000 };
	int sink;
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	char ns[64];

	tenv_init(&t);
	/* a nameserver that never answers: a bound UDP socket nobody reads */
	sink = socket(AF_INET, SOCK_DGRAM, 0);
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(sink, (struct sockaddr *)&sin, sizeof(sin)), 0);
	ck_assert_int_eq(getsockname(sink, (struct sockaddr *)&sin, &len), 0);
	snprintf(ns, sizeof(ns), "127.0.0.1:%d", ntohs(sin.sin_port));
	ck_assert_int_eq(evdns_base_nameserver_ip_add(t.dns, ns), 0);
	add_ds(&t, "slowdns", "mail.example.com", 25, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	memset(&w, 0, sizeof(w));
	up = upstream_start(&t.rt, &t.ds[0], &tm.m, 0, on_upstream_done, &w);
	ck_assert_ptr_nonnull(up);
	event_base_once(t.base, -1, EV_TIMEOUT, on_cancel_upstream, up, &tv);
	/* run until the cancel, then let evdns deliver its EAI_CANCEL */
	tv.tv_usec = 300 * 1000;
	event_base_loopexit(t.base, &tv);
	event_base_dispatch(t.base);
	ck_assert(!w.done);
	close(sink);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* The user's selector orders the downstreams with the shared sequence. */
START_TEST(test_round_robin_selector)
{
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char path[PATH_MAX + 16], err[256];

	start_sink(&s1, "first", NULL);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	t.selector = selector_load(BUILDDIR "/selectors/round_robin.so", BUILDDIR, NULL, 0,
	    NULL, err, sizeof(err));
	ck_assert_msg(t.selector != NULL, "%s", err);
	t.user.selector = t.selector;
	snprintf(path, sizeof(path), "%s/state", workdir);
	ck_assert_ptr_nonnull(t.health = health_create(path));
	ck_assert_int_eq(health_bind(t.health, &t.cfg, err, sizeof(err)), 0);
	t.rt.health = t.health;
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_str_eq(res.relay, "first");
	res = relay_run(&t, &tm);
	ck_assert_str_eq(res.relay, "second");
	res = relay_run(&t, &tm);
	ck_assert_str_eq(res.relay, "first");
	ck_assert_int_eq(count_delivered(s1.dir), 2);
	ck_assert_int_eq(count_delivered(s2.dir), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* with the shared health segment */

START_TEST(test_quota_skip_and_exhaustion)
{
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char path[PATH_MAX + 16], err[256];
	time_t before, after;

	start_sink(&s1, "first", NULL);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE)->max_per_minute = 1;
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE)->max_per_minute = 1;
	snprintf(path, sizeof(path), "%s/state", workdir);
	ck_assert_ptr_nonnull(t.health = health_create(path));
	ck_assert_int_eq(health_bind(t.health, &t.cfg, err, sizeof(err)), 0);
	t.rt.health = t.health;
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));

	before = time(NULL);
	res = relay_run(&t, &tm);
	ck_assert(res.ok);
	ck_assert_str_eq(res.relay, "first");
	/* first is out of quota: skipped (or ordered last) */
	res = relay_run(&t, &tm);
	ck_assert(res.ok);
	ck_assert_str_eq(res.relay, "second");
	/* both out of quota: nothing is tried; the queue learns when the
	 * first of them takes a message again: 60 s (rolling) after the first
	 * delivery */
	res = relay_run(&t, &tm);
	after = time(NULL);
	ck_assert(!res.ok);
	ck_assert_int_eq(res.code, 451);
	ck_assert_str_eq(res.enhanced, "4.4.1");
	ck_assert(res.temporary);
	ck_assert_int_ge(res.quota_reopens, before + 60);
	ck_assert_int_le(res.quota_reopens, after + 60);
	ck_assert_str_eq(res.failed_relay, "second");
	ck_assert_str_eq(res.failed_text, "over quota");
	ck_assert(log_has("attempt=1 stage=connect status=skipped delay=0.000 tls=none (0 over quota)"));
	ck_assert(log_has("relay=none attempts=0 status=deferred"));
	ck_assert_int_eq(count_files(s1.dir, NULL, 0), 1);
	ck_assert_int_eq(count_files(s2.dir, NULL, 0), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/*
 * A downstream that is down (circuit open) or throttled comes after the
 * others, and is still tried once they all failed: no message fails while
 * any path could work.
 */
START_TEST(test_last_resort_down_or_throttled)
{
	struct server s1;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	struct downstream_cfg *first;
	struct smtpmux_downstream_view v;
	char path[PATH_MAX + 16], err[256], expect[160];
	time_t now = time(NULL);

	start_sink(&s1, "first", NULL);
	tenv_init(&t);
	first = add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", closed_port(), TLS_MODE_NONE);
	snprintf(path, sizeof(path), "%s/state", workdir);
	ck_assert_ptr_nonnull(t.health = health_create(path));
	ck_assert_int_eq(health_bind(t.health, &t.cfg, err, sizeof(err)), 0);
	t.rt.health = t.health;
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));

	for (int i = 0; i < 3; i++) {
		ck_assert(health_begin(first->health, first, 0, now));
		health_end(first->health, first, &t.cfg.health, 0, now, HEALTH_FAIL, 0, "451 test");
	}
	health_view(first->health, first, &t.cfg.health, now, &v);
	ck_assert_uint_eq(v.state, SMTPMUX_DS_DOWN);
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_str_eq(res.relay, "first");
	snprintf(expect, sizeof(expect), "id=%s relay=second[%s] attempt=1 stage=connect "
	    "status=deferred", tm.id, t.ds[1].addr);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	snprintf(expect, sizeof(expect), "id=%s relay=first[%s] attempt=2 stage=dot status=sent",
	    tm.id, first->addr);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	/* the delivery proved it works: the circuit is closed */
	health_view(first->health, first, &t.cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.state, SMTPMUX_DS_UP);

	now = time(NULL);
	ck_assert(health_begin(first->health, first, 0, now));
	health_end(first->health, first, &t.cfg.health, 0, now, HEALTH_THROTTLED, 0, "451 4.7.0 slow");
	health_view(first->health, first, &t.cfg.health, now, &v);
	ck_assert_uint_eq(v.state, SMTPMUX_DS_THROTTLED);
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_str_eq(res.relay, "first");
	ck_assert_int_eq(count_delivered(s1.dir), 2);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* TLS to downstreams */

struct pki {
	char ca[PATH_MAX + 16], cert[PATH_MAX + 16], key[PATH_MAX + 16];
	char cert_opt[PATH_MAX + 32], key_opt[PATH_MAX + 32];
};

static void
write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	ck_assert_ptr_nonnull(f);
	fputs(text, f);
	fclose(f);
}

/* A CA and a server certificate for "localhost", made with certtool. */
static void
make_pki(struct pki *p)
{
	char cakey[PATH_MAX + 16], catmpl[PATH_MAX + 16], srvtmpl[PATH_MAX + 16];

	snprintf(cakey, sizeof(cakey), "%s/ca.key", workdir);
	snprintf(catmpl, sizeof(catmpl), "%s/ca.tmpl", workdir);
	snprintf(srvtmpl, sizeof(srvtmpl), "%s/srv.tmpl", workdir);
	snprintf(p->ca, sizeof(p->ca), "%s/ca.pem", workdir);
	snprintf(p->cert, sizeof(p->cert), "%s/srv.pem", workdir);
	snprintf(p->key, sizeof(p->key), "%s/srv.key", workdir);
	snprintf(p->cert_opt, sizeof(p->cert_opt), "cert=%s", p->cert);
	snprintf(p->key_opt, sizeof(p->key_opt), "key=%s", p->key);
	write_text(catmpl, "cn = \"smtpmux test CA\"\nca\ncert_signing_key\nexpiration_days = 2\n");
	write_text(srvtmpl, "cn = \"localhost\"\ndns_name = \"localhost\"\ntls_www_server\n"
	    "encryption_key\nsigning_key\nexpiration_days = 2\n");
	{
		char *a[] = { (char *)"/usr/bin/certtool", (char *)"--generate-privkey",
		    (char *)"--key-type=ecdsa", (char *)"--no-text", (char *)"--outfile", cakey, NULL };
		ck_assert_int_eq(run_cmd(a), 0);
	}
	{
		char *a[] = { (char *)"/usr/bin/certtool", (char *)"--generate-self-signed",
		    (char *)"--load-privkey", cakey, (char *)"--template", catmpl,
		    (char *)"--outfile", p->ca, NULL };
		ck_assert_int_eq(run_cmd(a), 0);
	}
	{
		char *a[] = { (char *)"/usr/bin/certtool", (char *)"--generate-privkey",
		    (char *)"--key-type=ecdsa", (char *)"--no-text", (char *)"--outfile", p->key, NULL };
		ck_assert_int_eq(run_cmd(a), 0);
	}
	{
		char *a[] = { (char *)"/usr/bin/certtool", (char *)"--generate-certificate",
		    (char *)"--load-privkey", p->key, (char *)"--load-ca-certificate", p->ca,
		    (char *)"--load-ca-privkey", cakey, (char *)"--template", srvtmpl,
		    (char *)"--outfile", p->cert, NULL };
		ck_assert_int_eq(run_cmd(a), 0);
	}
}

static struct tls_client_ctx *
client_ctx(struct tenv *t, size_t i, const char *ca)
{
	char err[256];

	t->tls[i] = tls_client_new(ca, true, NULL, err, sizeof(err));
	ck_assert_msg(t->tls[i] != NULL, "%s", err);
	return t->tls[i];
}

START_TEST(test_starttls_auth)
{
	struct pki p;
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;
	char *auth, *env, *msg;
	size_t len;

	ck_assert_int_eq(tls_global_init(), 0);
	make_pki(&p);
	{
		const char *opts[] = { p.cert_opt, p.key_opt, "auth=relayuser:relaypass",
		    "auth_require_tls=1", NULL };
		start_aiosmtpd(&srv, "aio", opts);
	}
	tenv_init(&t);
	ds = add_ds(&t, "aio", "localhost", srv.port, TLS_MODE_STARTTLS);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	ds->tls_client = client_ctx(&t, 0, p.ca);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	ck_assert_msg(w.ures.status == UPSTREAM_OK, "%s: %s", w.ustage, w.ures.text);
	ck_assert_str_eq(w.ustage, "dot");
	ck_assert_msg(strncmp(w.ures.tls_desc, "TLSv1.", 6) == 0, "%s", w.ures.tls_desc);
	auth = slurp_in(&srv, "auth", &len);
	ck_assert_ptr_nonnull(auth);
	ck_assert_str_eq(auth, "PLAIN relayuser tls=True\n");
	env = slurp_in(&srv, "env.1", &len);
	ck_assert_ptr_nonnull(strstr(env, "tls=True\n"));
	msg = slurp_in(&srv, "msg.1", &len);
	ck_assert_uint_eq(len, strlen(sample));
	ck_assert(memcmp(msg, sample, len) == 0);
	free(auth);
	free(env);
	free(msg);
	msgbody_free(tm.body);
	tenv_free(&t);
	tls_global_deinit();
}
END_TEST

/* The certificate names localhost; asking for 127.0.0.1 must fail, then fail over. */
START_TEST(test_starttls_wrong_name_fails_over)
{
	struct pki p;
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct relay_result res;

	ck_assert_int_eq(tls_global_init(), 0);
	make_pki(&p);
	{
		const char *opts[] = { p.cert_opt, p.key_opt, NULL };
		start_aiosmtpd(&srv, "aio", opts);
	}
	tenv_init(&t);
	ds = add_ds(&t, "first", "127.0.0.1", srv.port, TLS_MODE_STARTTLS);
	ds->tls_client = client_ctx(&t, 0, p.ca);
	ds = add_ds(&t, "second", "localhost", srv.port, TLS_MODE_STARTTLS);
	ds->tls_client = client_ctx(&t, 1, p.ca);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_str_eq(res.relay, "second");
	ck_assert(log_has("attempt=1 stage=tls status=deferred"));
	ck_assert(log_has("TLS: certificate verify failed"));
	ck_assert(log_has("attempt=2 stage=dot status=sent"));
	ck_assert(log_has("tls=TLSv1."));
	msgbody_free(tm.body);
	tenv_free(&t);
	tls_global_deinit();
}
END_TEST

START_TEST(test_implicit_tls)
{
	struct pki p;
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;
	char *msg;
	size_t len;

	ck_assert_int_eq(tls_global_init(), 0);
	make_pki(&p);
	{
		const char *opts[] = { p.cert_opt, p.key_opt, "implicit=1", NULL };
		start_aiosmtpd(&srv, "aio", opts);
	}
	tenv_init(&t);
	ds = add_ds(&t, "aio", "localhost", srv.port, TLS_MODE_IMPLICIT);
	ds->tls_client = client_ctx(&t, 0, p.ca);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	ck_assert_msg(w.ures.status == UPSTREAM_OK, "%s: %s", w.ustage, w.ures.text);
	ck_assert(w.ures.tls_desc[0] != '\0');
	msg = slurp_in(&srv, "msg.1", &len);
	ck_assert_ptr_nonnull(msg);
	ck_assert_uint_eq(len, strlen(sample));
	free(msg);
	/* a plain-text server on an implicit-TLS downstream fails at stage tls */
	msgbody_free(tm.body);
	tenv_free(&t);
	tls_global_deinit();
}
END_TEST

START_TEST(test_implicit_tls_against_plain_server)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct downstream_cfg *ds;
	struct waiter w;

	ck_assert_int_eq(tls_global_init(), 0);
	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	t.cfg.limits.upstream_timeout = 2;
	ds = add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_IMPLICIT);
	ds->tls_client = client_ctx(&t, 0, NULL);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	w = upstream_run(&t, ds, &tm);
	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "tls");
	ck_assert_str_eq(w.ures.tls_desc, "");
	msgbody_free(tm.body);
	tenv_free(&t);
	tls_global_deinit();
}
END_TEST


/* ======================================================================== */
/* replies matched to what was asked (issue 9.5) */

/* One attempt at a scripted fake downstream (fakesmtp.py with opts). */
static struct waiter
fake_attempt(struct server *srv, struct tenv *t, struct tmsg *tm, const char *const *opts,
    const char *const *rcpts, size_t n_rcpts)
{
	start_fake(srv, "fake", opts);
	tenv_init(t);
	add_ds(t, "fake", "127.0.0.1", srv->port, TLS_MODE_NONE);
	tmsg_init(tm, t, "app@example.org", rcpts, n_rcpts, sample, strlen(sample));
	return upstream_run(t, &t->ds[0], tm);
}

/*
 * A 250 glued to the 354 in one write came before any of the message was
 * sent: it is no reply to the final dot, and the attempt fails (before,
 * it was taken for one: the client heard 250, nothing was delivered).
 */
START_TEST(test_reply_glued_to_354_is_unsolicited)
{
	static const char *const opts[] = { "DATA=354 go ahead\r\n250 2.0.0 fake ok\r\n", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w = fake_attempt(&srv, &t, &tm, opts, one_rcpt, 1);
	char *got;

	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ustage, "dot");
	ck_assert_int_eq(w.ures.code, 250);
	ck_assert_str_eq(w.ures.text, "unsolicited reply from downstream: 250 fake ok");
	got = fake_transcript(&srv, 0);
	ck_assert_ptr_nonnull(strstr(got, "DATA\r\n"));
	ck_assert_msg(strstr(got, "MESSAGE") == NULL, "the message was sent: %s", got);
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* Without PIPELINING: a 250 that came with the EHLO reply, before MAIL
 * was sent, is not MAIL's (whose real reply is a refusal). */
START_TEST(test_reply_glued_to_ehlo_is_unsolicited)
{
	static const char *const opts[] = {
		"ehlo=8BITMIME", "EHLO=250-fake.test\r\n250 8BITMIME\r\n250 2.1.0 sender ok\r\n",
		"MAIL=550 5.7.1 sender refused\r\n", NULL
	};
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w = fake_attempt(&srv, &t, &tm, opts, one_rcpt, 1);
	char *got;

	assert_status(w, UPSTREAM_TEMPFAIL);
	ck_assert_str_eq(w.ures.text, "unsolicited reply from downstream: 250 sender ok");
	got = fake_transcript(&srv, 0);
	ck_assert_msg(strstr(got, "RCPT") == NULL, "RCPT was sent: %s", got);
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* With PIPELINING the envelope goes in one write; one refused recipient
 * fails the attempt whole, and the message body is never sent. */
START_TEST(test_pipelined_refused_recipient)
{
	static const char *const opts[] = { "RCPT=550 5.1.1 no such user\r\n", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w = fake_attempt(&srv, &t, &tm, opts, two_rcpts, 2);
	char *got;

	assert_status(w, UPSTREAM_PERMFAIL);
	ck_assert_str_eq(w.ustage, "rcpt");
	ck_assert_int_eq(w.ures.code, 550);
	got = fake_transcript(&srv, 0);
	ck_assert_ptr_nonnull(strstr(got, "MAIL FROM:<app@example.org>\r\n"
	    "RCPT TO:<rcpt@example.net>\r\nRCPT TO:<other@example.com>\r\nDATA\r\n"));
	ck_assert(strstr(got, "MESSAGE") == NULL);
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* the relay deadline (issue 9.6) */

START_TEST(test_relay_deadline)
{
	static const char *const silent[] = { "greeting=", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char expect[160];

	start_fake(&s1, "silent", silent);
	start_sink(&s2, "second", NULL);
	tenv_init(&t);
	t.cfg.limits.relay_deadline = 1;
	t.cfg.limits.upstream_timeout = 30;
	add_ds(&t, "silent", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 451);
	ck_assert(log_has("stage=greeting status=deferred"));
	ck_assert(log_has("(0 relay deadline reached while waiting for greeting)"));
	snprintf(expect, sizeof(expect), "relay=second[%s] attempt=2 stage=connect "
	    "status=skipped delay=0.000 tls=none (0 relay deadline: ", t.ds[1].addr);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	ck_assert_int_eq(count_files(s2.dir, NULL, 0), 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* 8BITMIME and SIZE per downstream (issue 9.14) */

static void
with_health(struct tenv *t)
{
	char path[PATH_MAX + 16], err[256];

	snprintf(path, sizeof(path), "%s/state", workdir);
	ck_assert_ptr_nonnull(t->health = health_create(path));
	ck_assert_int_eq(health_bind(t->health, &t->cfg, err, sizeof(err)), 0);
	t->rt.health = t->health;
}

static void
assert_untouched(struct tenv *t, const struct downstream_cfg *ds)
{
	struct smtpmux_downstream_view v;

	health_view(ds->health, ds, &t->cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.state, SMTPMUX_DS_UP);
	ck_assert_uint_eq(v.attempts, 0);
	ck_assert_uint_eq(v.failures, 0);
	ck_assert_uint_eq(v.in_flight, 0);
}

START_TEST(test_8bit_skips_downstream_without_8bitmime)
{
	static const char *const no_8bitmime[] = { "-8", NULL };
	struct server s1, s2;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char expect[160], *env;
	size_t len;

	start_sink(&s1, "first", no_8bitmime);
	start_aiosmtpd(&s2, "second", NULL);
	tenv_init(&t);
	add_ds(&t, "first", "127.0.0.1", s1.port, TLS_MODE_NONE);
	add_ds(&t, "second", "127.0.0.1", s2.port, TLS_MODE_NONE);
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, "Subject: \xc3\xa9t\xc3\xa9\r\n\r\nx\r\n", 20);
	tm.m.body = SMTP_BODY_8BITMIME;
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_str_eq(res.relay, "second");
	ck_assert_int_eq(count_files(s1.dir, NULL, 0), 0);
	env = slurp_in(&s2, "env.1", &len);
	ck_assert_ptr_nonnull(strstr(env, "opts=BODY=8BITMIME SIZE=20\n"));
	free(env);
	snprintf(expect, sizeof(expect), "relay=first[%s] attempt=1 stage=mail status=skipped",
	    t.ds[0].addr);
	ck_assert_msg(log_has(expect), "missing: %s", expect);
	ck_assert(log_has("(554 5.6.3 downstream does not offer 8BITMIME"));
	assert_untouched(&t, &t.ds[0]);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_size_limit_skips_and_refuses)
{
	static const char *const small[] = { "ehlo=PIPELINING,8BITMIME,SIZE 100", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	char *got, expect[160];

	start_fake(&srv, "small", small);
	tenv_init(&t);
	add_ds(&t, "small", "127.0.0.1", srv.port, TLS_MODE_NONE);
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_int_eq(res.code, 552);
	ck_assert_str_eq(res.enhanced, "5.3.4");
	snprintf(expect, sizeof(expect), "No downstream can take this message: message of %zu "
	    "octets exceeds the downstream's SIZE limit of 100", strlen(sample));
	ck_assert_str_eq(res.text, expect);
	ck_assert(log_has("relay=none attempts=1 status=bounced"));
	assert_untouched(&t, &t.ds[0]);
	got = fake_transcript(&srv, 0);
	ck_assert(strstr(got, "MAIL") == NULL);
	free(got);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */
/* the connection cache (issue 12.1) and early connect (12.3) */

START_TEST(test_cache_container)
{
	struct downstream_cfg a = { .host = (char *)"Mail.Example.net", .port = (char *)"587",
	    .user = (char *)"u", .pass = (char *)"p", .tls = TLS_MODE_STARTTLS,
	    .tls_verify = true };
	struct downstream_cfg same = a, other_pass = a, other_tls = a, other_host = a;
	struct cache_cfg cc = { .enabled = true, .max_idle = 2, .idle_timeout = 5,
	    .max_messages = 100 };
	struct upstream_cache *c = upstream_cache_new(&cc);
	struct upstream_cache_entry e[4];
	int tokens[4];

	same.host = (char *)"mail.example.NET";
	other_pass.pass = (char *)"q";
	other_tls.tls = TLS_MODE_IMPLICIT;
	other_host.port = (char *)"465";
	ck_assert(upstream_cache_same_account(&a, &same));
	ck_assert(!upstream_cache_same_account(&a, &other_pass));
	ck_assert(!upstream_cache_same_account(&a, &other_tls));
	ck_assert(!upstream_cache_same_account(&a, &other_host));
	memset(e, 0, sizeof(e));
	for (int i = 0; i < 4; i++) {
		e[i].up = (struct upstream *)&tokens[i];
		e[i].ds = i < 3 ? &a : &other_pass;
	}
	ck_assert(upstream_cache_put(c, &e[0]));
	ck_assert(upstream_cache_put(c, &e[1]));
	ck_assert(!upstream_cache_put(c, &e[2]));           /* max_idle of that account */
	ck_assert(upstream_cache_put(c, &e[3]));            /* another account has room */
	ck_assert_uint_eq(upstream_cache_count(c, &same), 2);
	ck_assert_uint_eq(upstream_cache_count(c, NULL), 3);
	ck_assert_ptr_eq(upstream_cache_take(c, &same), e[1].up);   /* the newest first */
	upstream_cache_remove(c, &e[0]);
	ck_assert_ptr_null(upstream_cache_take(c, &a));
	upstream_cache_close(c);
	ck_assert(!upstream_cache_put(c, &e[0]));
	ck_assert_ptr_eq(upstream_cache_pop(c), e[3].up);
	ck_assert_ptr_null(upstream_cache_pop(c));
	upstream_cache_free(c);
}
END_TEST

/* The peer port each message came from (aiosmtpd records it). */
static int
peer_of(const struct server *s, int n)
{
	char name[16], *env, *p;
	size_t len;
	int port;

	snprintf(name, sizeof(name), "env.%d", n);
	env = slurp_in(s, name, &len);
	ck_assert_ptr_nonnull(env);
	p = strstr(env, "peer=");
	ck_assert_ptr_nonnull(p);
	port = atoi(p + 5);
	free(env);
	return port;
}

START_TEST(test_cache_reuses_session)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	struct downstream_cfg *ds;
	char *auth;
	size_t len;

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	tenv_cache(&t, 60, false);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	for (int i = 0; i < 3; i++) {
		res = relay_run(&t, &tm);
		ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	}
	ck_assert_int_eq(peer_of(&srv, 1), peer_of(&srv, 3));
	ck_assert_int_eq(peer_of(&srv, 2), peer_of(&srv, 3));
	auth = slurp_in(&srv, "auth", &len);
	ck_assert_str_eq(auth, "PLAIN relayuser tls=False\n");           /* once */
	free(auth);
	ck_assert(log_has("attempt=1 stage=dot status=sent conn_use=3 delay="));
	ck_assert_uint_eq(upstream_cache_count(t.rt.cache, ds), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
	ck_assert(log_has("relay=aio[127.0.0.1:"));
}
END_TEST

/* The server dropped the session while it was idle (smtp-sink hangs up at
 * RSET): the message goes over a fresh one, and the downstream is not
 * blamed. */
START_TEST(test_cache_dead_session_reconnects)
{
	static const char *const drop_rset[] = { "-q", "rset", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;
	struct smtpmux_downstream_view v;

	start_sink(&srv, "sink", drop_rset);
	tenv_init(&t);
	tenv_cache(&t, 60, false);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	res = relay_run(&t, &tm);
	ck_assert_msg(res.ok, "%d %s", res.code, res.text);
	ck_assert_int_eq(count_delivered(srv.dir), 2);
	ck_assert(log_has("reused session found dead (connection closed by downstream while "
	    "waiting for reply to RSET"));
	health_view(t.ds[0].health, &t.ds[0], &t.cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.attempts, 2);
	ck_assert_uint_eq(v.successes, 2);
	ck_assert_uint_eq(v.failures, 0);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

START_TEST(test_cache_idle_timeout)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay_result res;

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	tenv_cache(&t, 1, false);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	res = relay_run(&t, &tm);
	ck_assert(res.ok);
	ck_assert_uint_eq(upstream_cache_count(t.rt.cache, NULL), 1);
	event_base_dispatch(t.base);           /* until the idle session has said QUIT */
	ck_assert_uint_eq(upstream_cache_count(t.rt.cache, NULL), 0);
	ck_assert(log_has("idle session closed after 1 s"));
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A prepared relay logs in at once; the message then needs only its
 * transaction, and only that one attempt is counted. */
START_TEST(test_early_connect)
{
	static const char *const opts[] = { "auth=relayuser:relaypass", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct relay *r;
	struct downstream_cfg *ds;
	struct smtpmux_downstream_view v;
	char expect[160];

	start_aiosmtpd(&srv, "aio", opts);
	tenv_init(&t);
	tenv_cache(&t, 60, true);
	ds = add_ds(&t, "aio", "127.0.0.1", srv.port, TLS_MODE_NONE);
	ds->user = (char *)"relayuser";
	ds->pass = (char *)"relaypass";
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	r = relay_prepare(&t.rt, &t.user, &tm.m, 0, "192.0.2.1");
	ck_assert_ptr_nonnull(r);
	snprintf(expect, sizeof(expect), "relay=aio[%s]: early session ready", ds->addr);
	run_until_logged(&t, expect, 20);
	ck_assert(exists_in(&srv, "auth"));
	ck_assert(!exists_in(&srv, "msg.1"));
	health_view(ds->health, ds, &t.cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.attempts, 0);
	memset(&w, 0, sizeof(w));
	ck_assert_ptr_eq(relay_begin(r, &tm.m, msgbody_size(tm.body), on_relay_done, &w), r);
	run_until_done(&t, &w, 60);
	ck_assert_msg(w.rres.ok, "%d %s", w.rres.code, w.rres.text);
	ck_assert(exists_in(&srv, "msg.1"));
	health_view(ds->health, ds, &t.cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.attempts, 1);
	ck_assert_uint_eq(v.successes, 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* A prepared relay given up (RSET, QUIT, hang-up): its logged-in session
 * goes to the cache, and nothing is counted. */
START_TEST(test_early_connect_cancelled)
{
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct relay *r;
	struct relay_result res;
	char expect[160];

	start_sink(&srv, "sink", NULL);
	tenv_init(&t);
	tenv_cache(&t, 60, true);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	r = relay_prepare(&t.rt, &t.user, &tm.m, 0, "192.0.2.1");
	ck_assert_ptr_nonnull(r);
	snprintf(expect, sizeof(expect), "relay=sink[%s]: early session ready", t.ds[0].addr);
	run_until_logged(&t, expect, 20);
	relay_cancel(r);
	ck_assert_uint_eq(upstream_cache_count(t.rt.cache, &t.ds[0]), 1);
	assert_untouched(&t, &t.ds[0]);
	res = relay_run(&t, &tm);             /* over the kept session */
	ck_assert(res.ok);
	ck_assert(log_has("conn_use=") == false);
	ck_assert_int_eq(count_delivered(srv.dir), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* An early session that failed is no attempt; the message's own attempt
 * then connects afresh (and is the only one counted). */
START_TEST(test_early_connect_failure_not_counted)
{
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct relay *r;
	struct smtpmux_downstream_view v;

	tenv_init(&t);
	tenv_cache(&t, 60, true);
	add_ds(&t, "dead", "127.0.0.1", closed_port(), TLS_MODE_NONE);
	with_health(&t);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	r = relay_prepare(&t.rt, &t.user, &tm.m, 0, "192.0.2.1");
	ck_assert_ptr_nonnull(r);
	run_until_logged(&t, "early session failed: connect to 127.0.0.1:", 20);
	assert_untouched(&t, &t.ds[0]);
	memset(&w, 0, sizeof(w));
	relay_begin(r, &tm.m, msgbody_size(tm.body), on_relay_done, &w);
	run_until_done(&t, &w, 60);
	ck_assert_int_eq(w.rres.code, 451);
	health_view(t.ds[0].health, &t.ds[0], &t.cfg.health, time(NULL), &v);
	ck_assert_uint_eq(v.attempts, 1);
	ck_assert_uint_eq(v.failures, 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* Until the final dot is written, relay_dot_sent() says a relay can still
 * be taken back; from then on it must run to its end. */
START_TEST(test_dot_sent)
{
	static const char *const slow_dot[] = { "-W", ".:3", NULL };
	struct server srv;
	struct tenv t;
	struct tmsg tm;
	struct waiter w;
	struct relay *r;

	start_sink(&srv, "sink", slow_dot);
	tenv_init(&t);
	add_ds(&t, "sink", "127.0.0.1", srv.port, TLS_MODE_NONE);
	tmsg_init(&tm, &t, "app@example.org", one_rcpt, 1, sample, strlen(sample));
	memset(&w, 0, sizeof(w));
	r = relay_start(&t.rt, &t.user, &tm.m, msgbody_size(tm.body), "192.0.2.1",
	    on_relay_done, &w);
	ck_assert(!relay_dot_sent(r));
	while (!w.done && !relay_dot_sent(r))
		event_base_loop(t.base, EVLOOP_ONCE);
	ck_assert(!w.done);                   /* the sink holds its reply for 3 s */
	run_until_done(&t, &w, 60);
	ck_assert(w.rres.ok);
	ck_assert_int_eq(count_delivered(srv.dir), 1);
	msgbody_free(tm.body);
	tenv_free(&t);
}
END_TEST

/* ======================================================================== */

static Suite *
relay_suite(void)
{
	Suite *s = suite_create("relay");
	TCase *tc;

	tc = tcase_create("msgbody");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_add_test(tc, test_msgbody_memory);
	tcase_add_test(tc, test_msgbody_spills_to_unlinked_file);
	tcase_add_test(tc, test_msgbody_bad_tmp_dir);
	suite_add_tcase(s, tc);

	tc = tcase_create("delivery");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, test_relay_byte_identical_aiosmtpd);
	tcase_add_test(tc, test_relay_pipelined_smtp_sink);
	tcase_add_test(tc, test_relay_unterminated_and_empty);
	tcase_add_test(tc, test_relay_10mb_from_temp_file);
	suite_add_tcase(s, tc);

	tc = tcase_create("failover");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_failover_connect_refused);
	tcase_add_test(tc, test_failover_rcpt_451);
	tcase_add_test(tc, test_failover_disconnect_at_dot);
	tcase_add_test(tc, test_failover_disconnect_at_data);
	tcase_add_test(tc, test_all_down_451);
	tcase_add_test(tc, test_no_downstream_451);
	tcase_add_test(tc, test_all_550_bounces);
	tcase_add_test(tc, test_perm_and_temp_defers);
	tcase_add_test(tc, test_perm_text_masks_account);
	tcase_add_test(tc, test_perm_text_masks_secret_at_cut);
	tcase_add_test(tc, test_throttle_reply);
	tcase_add_test(tc, test_throttle_5xx_defers);
	tcase_add_test(tc, test_quota_skip_and_exhaustion);
	tcase_add_test(tc, test_last_resort_down_or_throttled);
	tcase_add_test(tc, test_round_robin_selector);
	tcase_add_test(tc, test_tries_each_address);
	suite_add_tcase(s, tc);

	tc = tcase_create("auth");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_auth_plain);
	tcase_add_test(tc, test_auth_login);
	tcase_add_test(tc, test_auth_mechanism_from_config);
	tcase_add_test(tc, test_auth_none);
	tcase_add_test(tc, test_no_token_skips_downstream);
	tcase_add_test(tc, test_auth_rejected_defers);
	tcase_add_test(tc, test_no_credentials_without_starttls);
	tcase_add_test(tc, test_no_credentials_on_implicit_plain);
	tcase_add_test(tc, test_auth_not_offered);
	suite_add_tcase(s, tc);

	tc = tcase_create("protocol");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_reply_timeout);
	tcase_add_test(tc, test_dot_failure_drops_unsent_end);
	tcase_add_test(tc, test_greeting_rejected);
	tcase_add_test(tc, test_helo_fallback);
	tcase_add_test(tc, test_refuses_crlf_in_command);
	tcase_add_test(tc, test_probe);
	tcase_add_test(tc, test_resolve_failure);
	tcase_add_test(tc, test_cancel);
	tcase_add_test(tc, test_cancel_while_resolving);
	suite_add_tcase(s, tc);

	tc = tcase_create("tls");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_starttls_auth);
	tcase_add_test(tc, test_starttls_wrong_name_fails_over);
	tcase_add_test(tc, test_implicit_tls);
	tcase_add_test(tc, test_implicit_tls_against_plain_server);
	suite_add_tcase(s, tc);

	tc = tcase_create("replies");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_reply_glued_to_354_is_unsolicited);
	tcase_add_test(tc, test_reply_glued_to_ehlo_is_unsolicited);
	tcase_add_test(tc, test_pipelined_refused_recipient);
	tcase_add_test(tc, test_relay_deadline);
	tcase_add_test(tc, test_8bit_skips_downstream_without_8bitmime);
	tcase_add_test(tc, test_size_limit_skips_and_refuses);
	tcase_add_test(tc, test_dot_sent);
	suite_add_tcase(s, tc);

	tc = tcase_create("cache");
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_cache_container);
	tcase_add_test(tc, test_cache_reuses_session);
	tcase_add_test(tc, test_cache_dead_session_reconnects);
	tcase_add_test(tc, test_cache_idle_timeout);
	tcase_add_test(tc, test_early_connect);
	tcase_add_test(tc, test_early_connect_cancelled);
	tcase_add_test(tc, test_early_connect_failure_not_counted);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(relay_suite());
	int failed;

	signal(SIGPIPE, SIG_IGN);
	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
