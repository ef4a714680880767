/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "harden.h"
#include "health.h"
#include "instance.h"
#include "log.h"
#include "master.h"
#include "pidfile.h"
#include "privdrop.h"
#include "prober.h"
#include "queue_stats.h"
#include "runner.h"
#include "spool.h"
#include "tls.h"
#include "token_helper.h"
#include "token_table.h"
#include "worker.h"

/*
 * The master process. It stays root (when started as root) for one
 * reason: binding ports below 1024 that a reload adds. It never parses
 * client input; only its children, which drop privileges right after
 * fork, talk to the network.
 *
 * Signal handlers only set flags. All signals the master acts on stay
 * blocked except inside ppoll(), so a signal can never slip in between
 * checking the flags and going to sleep.
 */

#define LISTEN_BACKLOG 511
#define MAX_CHILDREN (2 * HEALTH_MAX_WORKER_SLOTS)  /* two generations during a reload */
#define STATE_SAVE_MS 1000              /* the state file is a copy this fresh */
#define CRASH_DEATHS 6                  /* more than 5 deaths ... */
#define CRASH_WINDOW_MS 10000           /* ... within 10 s is a crash loop */
#define CRASH_RESPAWN_DELAY_MS 1000
#define KILL_GRACE_MS 10000             /* after shutdown_timeout, before SIGKILL */
#define CLIENT_TABLE_ENTRIES 8192       /* client addresses tracked at once */

enum child_kind { CHILD_WORKER, CHILD_PROBER, CHILD_TOKENS, CHILD_RUNNER };

/* Every kind of child; a helper has its own named in-flight slot. */
static const struct child_kind_info {
	const char *name;
	bool helper;
	enum health_helper slot;         /* helpers only */
} child_kinds[] = {
	[CHILD_WORKER] = { "worker", false, 0 },
	[CHILD_PROBER] = { "prober", true, HEALTH_HELPER_PROBER },
	[CHILD_TOKENS] = { "token helper", true, HEALTH_HELPER_TOKENS },
	[CHILD_RUNNER] = { "queue runner", true, HEALTH_HELPER_RUNNER },
};

struct child {
	pid_t pid;                       /* 0: free entry */
	enum child_kind kind;
	unsigned slot;
	unsigned generation;
	bool stopping;                   /* sent the stop or retire signal */
	bool retiring;                   /* the retire signal only */
	int64_t kill_at_ms;              /* SIGKILL if still alive then (stopping only) */
};

struct master {
	const struct master_options *opt;
	struct config *cfg;
	struct health *health;
	struct client_table *clients;    /* per client address, shared with the workers */
	struct accept_room *room;        /* which workers have room, shared */
	struct token_table *tokens;      /* NULL until a configuration uses OAuth */
	char *state_file;                /* as started: a reload cannot move it */
	struct instance *instance;       /* the state file's lock and status socket */
	int64_t save_at_ms;              /* next copy to the state file */
	bool save_failing;               /* logged once until it works again */
	struct queue_stats *qstats;      /* queue figures, next to the state file */
	struct privdrop priv;
	int *listen_fds;                 /* parallel to cfg->listen; NULL once stopping */
	size_t n_listen_fds;
	unsigned generation;
	struct child children[MAX_CHILDREN];
	int64_t deaths_ms[CRASH_DEATHS]; /* ring of unexpected child deaths */
	unsigned deaths_next;
	int64_t respawn_after_ms;        /* crash-loop throttle */
	bool throttle_logged;
	bool stopping;
	pid_t pid;
	sigset_t child_mask;             /* the mask before the master blocked signals */
};

/* The one exception to "state lives in a context": what a handler can set. */
static volatile sig_atomic_t got_reload, got_stop, got_child, got_reopen;

static void
master_on_signal(int sig)
{
	switch (sig) {
	case SIGHUP: got_reload = 1; break;
	case SIGCHLD: got_child = 1; break;
	case SIGUSR1: got_reopen = 1; break;
	case SIGUSR2: break;             /* only workers act on it */
	default: got_stop = 1; break;
	}
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *
child_kind_name(const struct child *c)
{
	return child_kinds[c->kind].name;
}

/* --- listeners ---------------------------------------------------------- */

static bool
same_address(const struct listen_cfg *a, const struct listen_cfg *b)
{
	if (a->ss.ss_family != b->ss.ss_family)
		return false;
	if (a->ss.ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)&a->ss, *y = (const void *)&b->ss;

		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	if (a->ss.ss_family == AF_INET6) {
		const struct sockaddr_in6 *x = (const void *)&a->ss, *y = (const void *)&b->ss;

		return x->sin6_port == y->sin6_port && x->sin6_scope_id == y->sin6_scope_id &&
		    memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
	}
	return a->sslen == b->sslen && memcmp(&a->ss, &b->ss, a->sslen) == 0;
}

static int
listener_open(const struct listen_cfg *lc, char *err, size_t errlen)
{
	int fd, on = 1;

	fd = socket(lc->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		goto fail;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) < 0)
		goto fail;
	/* A v6 listener must not grab the v4 port that another entry binds. */
	if (lc->ss.ss_family == AF_INET6 &&
	    setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof(on)) < 0)
		goto fail;
	if (bind(fd, (const struct sockaddr *)&lc->ss, lc->sslen) < 0 ||
	    listen(fd, LISTEN_BACKLOG) < 0)
		goto fail;
	return fd;
fail:
	snprintf(err, errlen, "cannot listen on %s: %s", lc->text, strerror(errno));
	if (fd >= 0)
		close(fd);
	return -1;
}

static bool
fd_in(int fd, const int *fds, size_t n)
{
	size_t i;

	for (i = 0; fds != NULL && i < n; i++)
		if (fds[i] == fd)
			return true;
	return false;
}

/* A listener of the old configuration with the same address, or -1. */
static int
listener_find(const struct config *old, const int *old_fds, const struct listen_cfg *lc)
{
	size_t i;

	for (i = 0; old != NULL && i < old->n_listen; i++)
		if (same_address(&old->listen[i], lc))
			return old_fds[i];
	return -1;
}

/*
 * Sockets for every listener of cfg: the old socket when the address did
 * not change (connections keep queueing on it during a reload), a new one
 * otherwise. On failure closes only what it opened.
 */
static int *
listeners_open(const struct config *cfg, const struct config *old, const int *old_fds,
    char *err, size_t errlen)
{
	int *fds = calloc(cfg->n_listen ? cfg->n_listen : 1, sizeof(*fds));
	size_t i, j;

	if (fds == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	for (i = 0; i < cfg->n_listen; i++) {
		for (j = 0; j < i; j++)
			if (same_address(&cfg->listen[j], &cfg->listen[i]))
				break;
		if (j < i) {
			snprintf(err, errlen, "cannot listen on %s: address listed twice",
			    cfg->listen[i].text);
			break;
		}
		fds[i] = listener_find(old, old_fds, &cfg->listen[i]);
		if (fds[i] < 0)
			fds[i] = listener_open(&cfg->listen[i], err, errlen);
		if (fds[i] < 0)
			break;
	}
	if (i == cfg->n_listen)
		return fds;
	while (i-- > 0)
		if (!fd_in(fds[i], old_fds, old ? old->n_listen : 0))
			close(fds[i]);
	free(fds);
	return NULL;
}

/* Closes the old sockets that the new set does not reuse. */
static void
listeners_close_unused(const int *old_fds, size_t n_old, const int *keep, size_t n_keep)
{
	size_t i;

	for (i = 0; old_fds != NULL && i < n_old; i++)
		if (!fd_in(old_fds[i], keep, n_keep))
			close(old_fds[i]);
}

static void
listeners_format(const struct config *cfg, char *buf, size_t len)
{
	size_t i, used = 0;

	buf[0] = '\0';
	for (i = 0; i < cfg->n_listen && used < len; i++) {
		const struct listen_cfg *lc = &cfg->listen[i];
		bool v6 = strchr(lc->host, ':') != NULL;
		int n = snprintf(buf + used, len - used, "%s%s%s%s:%s", i ? "," : "",
		    v6 ? "[" : "", lc->host, v6 ? "]" : "", lc->port);

		if (n < 0)
			break;
		used += (size_t)n;
	}
}

/* --- children ----------------------------------------------------------- */

static bool
slot_in_use(const struct master *m, unsigned slot)
{
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0 && m->children[i].slot == slot)
			return true;
	return false;
}

/* A free worker slot, or the helper's own: -1 when none is free. */
static int
slot_alloc(const struct master *m, enum child_kind kind)
{
	unsigned slot;

	if (child_kinds[kind].helper)
		return (int)health_helper_slot(child_kinds[kind].slot);
	for (slot = 0; slot < HEALTH_WORKER_SLOTS; slot++)
		if (!slot_in_use(m, slot))
			return (int)slot;
	return -1;
}

static struct child *
child_entry_free(struct master *m)
{
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid == 0)
			return &m->children[i];
	return NULL;
}

static unsigned
children_count(const struct master *m, enum child_kind kind)
{
	unsigned n = 0;
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++) {
		const struct child *c = &m->children[i];

		if (c->pid > 0 && c->kind == kind && !c->stopping && c->generation == m->generation)
			n++;
	}
	return n;
}

static bool
children_alive(const struct master *m)
{
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0)
			return true;
	return false;
}

/* Any helper of that kind, even one still stopping: the next prober needs
 * its port, the next token helper must be the only writer of the tokens,
 * and two queue runners at once would deliver the same messages. */
static bool
helper_alive(const struct master *m, enum child_kind kind)
{
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0 && m->children[i].kind == kind)
			return true;
	return false;
}

/* In a child: signal handling back to the defaults, the master's flags
 * unused. Signals stay blocked until the child is ready for them. */
static void
child_reset_signals(void)
{
	static const int sigs[] = { SIGHUP, SIGINT, SIGTERM, SIGQUIT, SIGCHLD, SIGUSR1,
	    SIGUSR2 };
	struct sigaction sa;
	size_t i;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_DFL;
	sigemptyset(&sa.sa_mask);
	for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaction(sigs[i], &sa, NULL);
}

static int
run_worker(struct master *m, unsigned slot)
{
	struct worker_params p = {
		.cfg = m->cfg,
		.health = m->health,
		.clients = m->clients,
		.room = m->room,
		.tokens = m->tokens,
		.qstats = m->qstats,
		.listen_fds = m->listen_fds,
		.slot = slot,
		.generation = m->generation,
		.master_pid = m->pid,
		.priv = &m->priv,
		.sigmask = &m->child_mask,
	};

	return worker_run(&p);
}

static int
prober_run(struct master *m)
{
	return prober_main(m->cfg, m->health, m->tokens, m->qstats);
}

static int
token_helper_run(struct master *m)
{
	return token_helper_main(m->cfg, m->tokens);
}

static int
runner_run(struct master *m)
{
	struct runner_params p = {
		.cfg = m->cfg,
		.health = m->health,
		.stats = m->qstats,
		.tokens = m->tokens,
		.slot = health_helper_slot(HEALTH_HELPER_RUNNER),
		.master_pid = m->pid,
	};

	return runner_main(&p);
}

/* The prober, the token helper or the queue runner, in the child right
 * after fork. */
static int
run_helper(struct master *m, const char *role, int (*helper_main)(struct master *))
{
	struct sigaction sa;
	size_t i;
	int status;

	log_set_role(role);
	/* A helper serves no SMTP: it must not keep the ports open. */
	for (i = 0; i < m->n_listen_fds; i++)
		close(m->listen_fds[i]);
	memset(&sa, 0, sizeof(sa));
	sigemptyset(&sa.sa_mask);
	sa.sa_handler = SIG_IGN;
	sigaction(SIGHUP, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	if (privdrop_apply(&m->priv) < 0) {
		config_free(m->cfg);
		return SMTPMUXD_EXIT_RUNTIME;
	}
	/* Signals stay blocked: the helper lets in those it handles. */
	status = helper_main(m);
	config_free(m->cfg);
	return status;
}

static int
run_child(struct master *m, enum child_kind kind, unsigned slot)
{
	switch (kind) {
	case CHILD_PROBER: return run_helper(m, "prober", prober_run);
	case CHILD_TOKENS: return run_helper(m, "oauth", token_helper_run);
	case CHILD_RUNNER: return run_helper(m, "queue", runner_run);
	default: return run_worker(m, slot);
	}
}

static void
master_spawn(struct master *m, enum child_kind kind)
{
	struct child *c = child_entry_free(m);
	int slot = slot_alloc(m, kind);
	pid_t pid;

	if (c == NULL || slot < 0) {
		log_err("cannot start a %s: no free worker slot", child_kinds[kind].name);
		m->respawn_after_ms = now_ms() + CRASH_RESPAWN_DELAY_MS;
		return;
	}
	fflush(NULL);
	pid = fork();
	if (pid < 0) {
		log_err("fork: %s", strerror(errno));
		m->respawn_after_ms = now_ms() + CRASH_RESPAWN_DELAY_MS;
		return;
	}
	if (pid == 0) {
		/* Before anything else: no child keeps the master's writable view. */
		health_after_fork(m->health);
		queue_stats_after_fork(m->qstats);
		token_table_after_fork(m->tokens, kind == CHILD_TOKENS);
		child_reset_signals();
		exit(run_child(m, kind, (unsigned)slot));
	}
	memset(c, 0, sizeof(*c));
	c->pid = pid;
	c->kind = kind;
	c->slot = (unsigned)slot;
	c->generation = m->generation;
	log_debug("%s pid=%ld slot=%d generation=%u started", child_kind_name(c), (long)pid,
	    slot, m->generation);
}

static bool
crash_looping(const struct master *m, int64_t now)
{
	/* The oldest of the last CRASH_DEATHS deaths is recent: too many. */
	int64_t oldest = m->deaths_ms[m->deaths_next % CRASH_DEATHS];

	return oldest != 0 && now - oldest < CRASH_WINDOW_MS;
}

/* Brings the current generation up to strength, throttled in a crash loop. */
static void
master_maintain(struct master *m)
{
	int64_t now = now_ms();
	bool throttled = crash_looping(m, now);

	if (m->stopping || now < m->respawn_after_ms)
		return;
	if (throttled && !m->throttle_logged)
		log_warn("children are crashing repeatedly: respawning one per second");
	m->throttle_logged = throttled;
	while (children_count(m, CHILD_WORKER) < m->cfg->workers) {
		master_spawn(m, CHILD_WORKER);
		if (throttled || now < m->respawn_after_ms)
			break;
	}
	if (prober_needed(m->cfg) && !helper_alive(m, CHILD_PROBER) && now >= m->respawn_after_ms)
		master_spawn(m, CHILD_PROBER);
	if (token_table_needed(m->cfg) && !helper_alive(m, CHILD_TOKENS) &&
	    now >= m->respawn_after_ms)
		master_spawn(m, CHILD_TOKENS);
	if (m->cfg->queue.enabled && !helper_alive(m, CHILD_RUNNER) && now >= m->respawn_after_ms)
		master_spawn(m, CHILD_RUNNER);
	if (throttled && m->respawn_after_ms <= now)
		m->respawn_after_ms = now + CRASH_RESPAWN_DELAY_MS;
}

/* A child that cannot be signalled (EPERM: the master lost CAP_KILL under
 * a sandbox) would otherwise never stop, silently. ESRCH is a child that
 * already exited and is about to be reaped. */
static void
child_signal(const struct child *c, int sig)
{
	if (kill(c->pid, sig) < 0 && errno != ESRCH)
		log_err("cannot send signal %d to %s pid=%ld: %s", sig, child_kind_name(c),
		    (long)c->pid, strerror(errno));
}

/* A stopping worker has shutdown_timeout for its sessions, then its relays
 * already past the final dot may run up to relay_deadline more. */
static void
child_stop(struct child *c, const struct limits_cfg *lim, int64_t now)
{
	if (c->stopping && !c->retiring)
		return;
	c->stopping = true;
	c->retiring = false;
	c->kill_at_ms = now + ((int64_t)lim->shutdown_timeout + lim->relay_deadline) * 1000 +
	    KILL_GRACE_MS;
	child_signal(c, WORKER_STOP_SIGNAL);
}

/* An old worker after a reload: its sessions may run for shutdown_timeout,
 * then it stops as above. */
static void
child_retire(struct child *c, const struct limits_cfg *lim, int64_t now)
{
	if (c->stopping)
		return;
	if (c->kind != CHILD_WORKER) {
		child_stop(c, lim, now);
		return;
	}
	c->stopping = true;
	c->retiring = true;
	c->kill_at_ms = now + (2 * (int64_t)lim->shutdown_timeout + lim->relay_deadline) * 1000 +
	    KILL_GRACE_MS;
	child_signal(c, WORKER_RETIRE_SIGNAL);
}

/* Retires the children of generations before `generation`. */
static void
children_retire_older(struct master *m, unsigned generation, const struct limits_cfg *lim)
{
	int64_t now = now_ms();
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0 && m->children[i].generation < generation)
			child_retire(&m->children[i], lim, now);
}

static void
children_signal(struct master *m, int sig)
{
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0)
			child_signal(&m->children[i], sig);
}

/* Children that outlived their stop deadline. */
static void
children_kill_overdue(struct master *m)
{
	int64_t now = now_ms();
	size_t i;

	for (i = 0; i < MAX_CHILDREN; i++) {
		struct child *c = &m->children[i];

		if (c->pid > 0 && c->stopping && c->kill_at_ms != 0 && now >= c->kill_at_ms) {
			log_warn("%s pid=%ld slot=%u did not stop in time: killing it",
			    child_kind_name(c), (long)c->pid, c->slot);
			child_signal(c, SIGKILL);
			c->kill_at_ms = 0;
		}
	}
}

static void
describe_status(int status, char *buf, size_t len)
{
	if (WIFEXITED(status))
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(buf, len, "killed by signal %d (%s)", WTERMSIG(status),
		    strsignal(WTERMSIG(status)));
	else
		snprintf(buf, len, "ended with wait status %#x", (unsigned)status);
}

static void
child_exited(struct master *m, struct child *c, int status)
{
	bool expected = m->stopping || c->stopping || c->generation != m->generation;
	bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
	unsigned slot = c->slot;
	char what[96];

	describe_status(status, what, sizeof(what));
	if (!expected) {
		log_err("%s pid=%ld slot=%u %s", child_kind_name(c), (long)c->pid, slot, what);
		m->deaths_ms[m->deaths_next++ % CRASH_DEATHS] = now_ms();
	} else if (clean) {
		log_info("%s pid=%ld slot=%u generation=%u stopped", child_kind_name(c),
		    (long)c->pid, slot, c->generation);
	} else {
		log_warn("%s pid=%ld slot=%u generation=%u %s", child_kind_name(c),
		    (long)c->pid, slot, c->generation, what);
	}
	c->pid = 0;
	/* The prober's slot may already belong to its successor. */
	if (!slot_in_use(m, slot)) {
		health_worker_gone(m->health, slot);
		client_table_worker_gone(m->clients, slot);
		accept_room_set(m->room, slot, false);
	}
}

static void
master_reap(struct master *m)
{
	pid_t pid;
	int status;
	size_t i;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (i = 0; i < MAX_CHILDREN; i++)
			if (m->children[i].pid == pid)
				break;
		if (i < MAX_CHILDREN)
			child_exited(m, &m->children[i], status);
	}
}

/* --- logging ------------------------------------------------------------ */

static bool
same_string(const char *a, const char *b)
{
	return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* Workers reopen the log file on SIGUSR1 too, after dropping root: like
 * nginx, hand the file to their user. */
static void
log_file_chown(const struct privdrop *priv, const struct config *cfg)
{
	if (priv->enabled && log_chown(priv->uid) < 0)
		log_warn("cannot hand log file %s to user %s: %s", cfg->log_file, priv->user,
		    strerror(errno));
}

/* A log file wins; else stderr in the foreground, syslog (mail) detached. */
static int
master_open_log(const struct master *m, const struct config *cfg, const struct privdrop *priv)
{
	int r;

	if (cfg->log_file == NULL || *cfg->log_file == '\0')
		return log_open("smtpmuxd", m->opt->foreground ? LOG_TO_STDERR : LOG_TO_SYSLOG,
		    NULL);
	r = log_open("smtpmuxd", LOG_TO_FILE, cfg->log_file);
	if (r == 0)
		log_file_chown(priv, cfg);
	return r;
}

/* --- the queue ---------------------------------------------------------- */

/* The spool folder, owned by the workers' user, before any child needs it. */
static int
queue_prepare(const struct config *cfg, const struct privdrop *priv, char *err, size_t errlen)
{
	if (!cfg->queue.enabled)
		return 0;
	return spool_prepare(cfg->queue.dir, priv->enabled, priv->uid, priv->gid, err, errlen);
}

static void
queue_stats_open(struct master *m)
{
	m->qstats = queue_stats_create();
	if (m->qstats == NULL)
		log_warn("cannot map the queue figures: %s (they will not be shown)",
		    strerror(errno));
}

/* --- reload ------------------------------------------------------------- */

/* What the children of cfg will run as. */
static int
master_privdrop_prepare(const struct master *m, struct privdrop *priv,
    const struct config *cfg, char *err, size_t errlen)
{
	if (privdrop_prepare(priv, cfg, m->opt->user, err, errlen) < 0)
		return -1;
	priv->core_dumps = m->opt->allow_core;
	return 0;
}

/*
 * Everything that can fail happens before anything changes: a reload
 * either switches completely to the new configuration or leaves the
 * running one untouched.
 */
static struct config *
reload_prepare(struct master *m, struct privdrop *priv, int **fds, char *err, size_t errlen)
{
	struct config *cfg = config_load(m->opt->config_path, err, errlen);
	char again[256];

	if (cfg == NULL)
		return NULL;
	if (config_has_users(cfg, err, errlen) < 0 ||
	    master_privdrop_prepare(m, priv, cfg, err, errlen) < 0 ||
	    queue_prepare(cfg, priv, err, errlen) < 0 ||
	    health_bind(m->health, cfg, err, errlen) < 0 ||
	    token_table_bind(&m->tokens, cfg, err, errlen) < 0 ||
	    (*fds = listeners_open(cfg, m->cfg, m->listen_fds, err, errlen)) == NULL) {
		/* The segment may now name the rejected configuration's records
		 * as current (status hides the others) and show its limits: bind
		 * the running one again. Its records all exist, so this holds. */
		if (health_bind(m->health, m->cfg, again, sizeof(again)) < 0)
			log_err("state file: %s", again);
		if (token_table_bind(&m->tokens, m->cfg, again, sizeof(again)) < 0)
			log_err("token table: %s", again);
		config_free(cfg);
		return NULL;
	}
	return cfg;
}

static void
master_reload(struct master *m)
{
	struct config *old = m->cfg, *cfg;
	struct privdrop priv;
	int *fds = NULL;
	char err[1024];

	cfg = reload_prepare(m, &priv, &fds, err, sizeof(err));
	if (cfg == NULL) {
		log_err("reload failed, keeping current configuration: %s", err);
		return;
	}
	if (!same_string(old->log_file, cfg->log_file) && master_open_log(m, cfg, &priv) < 0)
		log_err("cannot open log file %s: %s", cfg->log_file, strerror(errno));
	if (!same_string(old->state_file, cfg->state_file))
		log_warn("state_file changed to %s: a restart is needed to use it",
		    cfg->state_file);
	if (old->queue.enabled && !same_string(old->queue.dir, cfg->queue.dir))
		log_warn("queue.dir changed to %s: messages still in %s wait until it is set "
		    "back", cfg->queue.dir, old->queue.dir);
	privdrop_check_config_mode(cfg);
	listeners_close_unused(m->listen_fds, m->n_listen_fds, fds, cfg->n_listen);
	free(m->listen_fds);
	m->listen_fds = fds;
	m->n_listen_fds = cfg->n_listen;
	m->cfg = cfg;
	m->priv = priv;
	m->generation++;
	/* New workers first, so someone always accepts; then the old ones
	 * finish their sessions under their own shutdown_timeout. */
	m->respawn_after_ms = 0;
	master_maintain(m);
	children_retire_older(m, m->generation, &old->limits);
	config_free(old);
	log_info("reload: generation=%u workers=%u config=%s", m->generation, cfg->workers,
	    cfg->path);
}

/* --- stop --------------------------------------------------------------- */

static void
master_stop(struct master *m)
{
	int64_t now = now_ms();
	size_t i;

	if (m->stopping) {
		log_warn("stop requested again: killing the remaining children");
		children_signal(m, SIGKILL);
		return;
	}
	m->stopping = true;
	log_info("stopping: waiting up to %u s for sessions to finish",
	    m->cfg->limits.shutdown_timeout);
	/* The children keep their own copies until they finish. */
	listeners_close_unused(m->listen_fds, m->n_listen_fds, NULL, 0);
	free(m->listen_fds);
	m->listen_fds = NULL;
	m->n_listen_fds = 0;
	for (i = 0; i < MAX_CHILDREN; i++)
		if (m->children[i].pid > 0)
			child_stop(&m->children[i], &m->cfg->limits, now);
}

/* --- main loop ---------------------------------------------------------- */

static void
master_handle_signals(struct master *m)
{
	/* Stop first: a terminal's SIGINT also reaches the prober, whose exit
	 * is then expected. */
	if (got_stop) {
		got_stop = 0;
		master_stop(m);
	}
	if (got_child) {
		got_child = 0;
		master_reap(m);
	}
	if (got_reload) {
		got_reload = 0;
		if (!m->stopping)
			master_reload(m);
	}
	if (got_reopen) {
		got_reopen = 0;
		if (log_reopen() < 0)
			log_err("cannot reopen the log file: %s", strerror(errno));
		else
			log_file_chown(&m->priv, m->cfg);
		children_signal(m, SIGUSR1);
	}
}

/* How long to sleep: until the next state save, respawn or kill deadline. */
static void
master_next_wakeup(const struct master *m, struct timespec *ts)
{
	int64_t now = now_ms(), next = m->save_at_ms;
	size_t i;

	if (!m->stopping && m->respawn_after_ms > now && m->respawn_after_ms < next)
		next = m->respawn_after_ms;
	for (i = 0; i < MAX_CHILDREN; i++) {
		const struct child *c = &m->children[i];

		if (c->pid > 0 && c->stopping && c->kill_at_ms != 0 && c->kill_at_ms < next)
			next = c->kill_at_ms;
	}
	next = next > now ? next - now : 0;
	ts->tv_sec = (time_t)(next / 1000);
	ts->tv_nsec = (long)(next % 1000) * 1000000L + 1000000L;  /* round up */
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

/*
 * The state file is only a copy (health_save): written again when the
 * segments changed, and at once when someone truncated, replaced or
 * removed it. Failures are logged once until it works again.
 */
static void
master_save_state(struct master *m)
{
	const char *disturbed = NULL;
	int rc = health_save(m->health, m->state_file, &disturbed);

	m->save_at_ms = now_ms() + STATE_SAVE_MS;
	if (disturbed != NULL && !m->save_failing)
		log_warn("state file %s was %s: writing it again", m->state_file, disturbed);
	if (rc < 0 && !m->save_failing)
		log_err("cannot write state file %s: %s", m->state_file, strerror(errno));
	else if (rc == 0 && m->save_failing)
		log_info("state file %s written again", m->state_file);
	m->save_failing = rc < 0;
}

/* Status readers: root, the master's user, the workers' user and group. */
static void
master_serve_readers(const struct master *m)
{
	struct instance_access access = {
		.self_uid = geteuid(),
		.service_uid = m->priv.enabled ? m->priv.uid : geteuid(),
		.service_gid = m->priv.enabled ? m->priv.gid : getegid(),
	};

	struct instance_extras extras = {
		.queue_fd = queue_stats_fd(m->qstats),
		.token_fd = token_table_fd(m->tokens),
	};

	instance_serve(m->instance, m->health, &extras, &access);
}

static void
master_loop(struct master *m)
{
	struct pollfd readers = { instance_fd(m->instance), POLLIN, 0 };
	struct timespec ts;

	for (;;) {
		master_handle_signals(m);
		if (m->stopping && !children_alive(m))
			return;
		children_kill_overdue(m);
		master_maintain(m);
		if (now_ms() >= m->save_at_ms)
			master_save_state(m);
		master_next_wakeup(m, &ts);
		/* Signals are let in only while sleeping here. */
		readers.revents = 0;
		if (ppoll(&readers, 1, &ts, &m->child_mask) > 0 && (readers.revents & POLLIN))
			master_serve_readers(m);
	}
}

static int
master_block_signals(struct master *m)
{
	static const int sigs[] = { SIGHUP, SIGINT, SIGTERM, SIGQUIT, SIGCHLD, SIGUSR1,
	    SIGUSR2 };
	struct sigaction sa;
	sigset_t block;
	size_t i;

	sigemptyset(&block);
	for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaddset(&block, sigs[i]);
	if (sigprocmask(SIG_BLOCK, &block, &m->child_mask) < 0)
		return -1;
	memset(&sa, 0, sizeof(sa));
	sa.sa_mask = block;
	sa.sa_handler = master_on_signal;
	for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		if (sigaction(sigs[i], &sa, NULL) < 0)
			return -1;
	sa.sa_handler = SIG_IGN;
	return sigaction(SIGPIPE, &sa, NULL);
}

/* --- start-up ----------------------------------------------------------- */

/*
 * Forks; the parent waits until the daemon reports that it is running (or
 * failed) and exits with that status, so an init script sees start-up
 * errors. Returns in the daemon with *ready_fd to report on.
 */
static int
master_daemonize(int *ready_fd)
{
	int pipefd[2];
	unsigned char status = SMTPMUXD_EXIT_RUNTIME;
	pid_t pid;

	if (pipe(pipefd) < 0)
		return -1;
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		return -1;
	if (pid > 0) {
		close(pipefd[1]);
		while (read(pipefd[0], &status, 1) < 0 && errno == EINTR)
			;
		if (status != SMTPMUXD_EXIT_OK)
			fprintf(stderr, "smtpmuxd: start-up failed (exit status %d): "
			    "see the log\n", status);
		_exit(status);
	}
	close(pipefd[0]);
	*ready_fd = pipefd[1];
	if (setsid() < 0 || chdir("/") < 0)
		return -1;
	return 0;
}

static void
master_report(int *ready_fd, unsigned char status)
{
	if (*ready_fd < 0)
		return;
	(void)!write(*ready_fd, &status, 1);
	close(*ready_fd);
	*ready_fd = -1;
}

static int
stdio_to_devnull(void)
{
	int fd = open("/dev/null", O_RDWR);

	if (fd < 0)
		return -1;
	dup2(fd, STDIN_FILENO);
	dup2(fd, STDOUT_FILENO);
	dup2(fd, STDERR_FILENO);
	if (fd > STDERR_FILENO)
		close(fd);
	return 0;
}

/* The state file usually lives in a runtime directory that a fresh boot
 * has emptied (and, for a /usr/local build, under a var/run that may never
 * have existed): its missing parents are created, like mkdir -p. */
static void
state_dir_create(const char *path)
{
	char dir[4096];
	char *p;

	snprintf(dir, sizeof(dir), "%s", path);
	p = strrchr(dir, '/');
	if (p == NULL || p == dir)
		return;
	*p = '\0';
	for (p = dir + 1; ; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char c = *p;

		*p = '\0';
		if (mkdir(dir, 0755) < 0 && errno != EEXIST) {
			log_debug("mkdir %s: %s", dir, strerror(errno));
			return;
		}
		*p = c;
		if (c == '\0')
			return;
	}
}

/*
 * Earlier versions kept the OAuth token status in the file state_file.oauth
 * (now a sealed memfd). One left behind would only mislead: an older
 * `-s status` would show an ended run's tokens as current. Removed once the
 * state file is ours, so never from under a daemon that still uses it;
 * unlink() follows no symlink.
 */
static void
old_token_status_remove(const char *state_file)
{
	char path[PATH_MAX];

	if (snprintf(path, sizeof(path), "%s.oauth", state_file) < (int)sizeof(path) &&
	    unlink(path) == 0)
		log_info("removed %s, which an earlier version left", path);
}

/*
 * The state file claimed for this daemon alone, the shared state created
 * (with the counters the file kept) and bound to the configuration, and
 * the file written at once: whatever can fail fails at start-up.
 */
static int
master_state_open(struct master *m, char *err, size_t errlen)
{
	if ((m->state_file = strdup(m->cfg->state_file)) == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	state_dir_create(m->state_file);
	if ((m->instance = instance_claim(m->state_file, err, errlen)) == NULL)
		return -1;
	old_token_status_remove(m->state_file);
	if ((m->health = health_create(m->state_file)) == NULL) {
		snprintf(err, errlen, "cannot create the shared state: %s", strerror(errno));
		return -1;
	}
	if (health_bind(m->health, m->cfg, err, errlen) < 0 ||
	    token_table_bind(&m->tokens, m->cfg, err, errlen) < 0)
		return -1;
	if (health_save(m->health, m->state_file, NULL) < 0) {
		snprintf(err, errlen, "cannot write state file %s: %s", m->state_file,
		    strerror(errno));
		return -1;
	}
	m->save_at_ms = now_ms() + STATE_SAVE_MS;
	return 0;
}

/* Loads the configuration and takes every resource that can fail. */
static int
master_init(struct master *m, char *err, size_t errlen)
{
	m->cfg = config_load(m->opt->config_path, err, errlen);
	if (m->cfg == NULL)
		return SMTPMUXD_EXIT_CONFIG;
	if (config_has_users(m->cfg, err, errlen) < 0)
		return SMTPMUXD_EXIT_NOTCONFIGURED;
	if (master_privdrop_prepare(m, &m->priv, m->cfg, err, errlen) < 0)
		return SMTPMUXD_EXIT_CONFIG;
	privdrop_check_config_mode(m->cfg);
	if (m->opt->pidfile != NULL && pidfile_check(m->opt->pidfile, err, errlen) < 0)
		return SMTPMUXD_EXIT_RUNTIME;
	/* Ports first: a second instance started by mistake fails here. */
	m->listen_fds = listeners_open(m->cfg, NULL, NULL, err, errlen);
	if (m->listen_fds == NULL)
		return SMTPMUXD_EXIT_RUNTIME;
	m->n_listen_fds = m->cfg->n_listen;
	if (master_state_open(m, err, errlen) < 0)
		return SMTPMUXD_EXIT_RUNTIME;
	/* Anonymous shared memory: inherited by every worker, of every generation. */
	m->clients = client_table_create(CLIENT_TABLE_ENTRIES, HEALTH_MAX_WORKER_SLOTS);
	m->room = accept_room_create(HEALTH_MAX_WORKER_SLOTS);
	if (m->clients == NULL || m->room == NULL) {
		snprintf(err, errlen, "cannot map the shared client table: %s", strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	queue_stats_open(m);
	if (queue_prepare(m->cfg, &m->priv, err, errlen) < 0)
		return SMTPMUXD_EXIT_RUNTIME;
	return SMTPMUXD_EXIT_OK;
}

/* Detaches (unless -f), switches logging, writes the pidfile. */
static int
master_start(struct master *m, int *ready_fd, char *err, size_t errlen)
{
	if (!m->opt->foreground && master_daemonize(ready_fd) < 0) {
		snprintf(err, errlen, "cannot detach: %s", strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	m->pid = getpid();
	if (master_open_log(m, m->cfg, &m->priv) < 0) {
		snprintf(err, errlen, "cannot open log file %s: %s", m->cfg->log_file,
		    strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (!m->opt->foreground && stdio_to_devnull() < 0) {
		snprintf(err, errlen, "/dev/null: %s", strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (m->opt->pidfile != NULL && pidfile_write(m->opt->pidfile, err, errlen) < 0)
		return SMTPMUXD_EXIT_RUNTIME;
	if (master_block_signals(m) < 0) {
		snprintf(err, errlen, "signals: %s", strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	return SMTPMUXD_EXIT_OK;
}

static void
master_log_started(const struct master *m)
{
	char addrs[1024];

	listeners_format(m->cfg, addrs, sizeof(addrs));
	log_info("smtpmuxd %s started: generation=%u workers=%u listen=%s config=%s",
	    PACKAGE_VERSION, m->generation, m->cfg->workers, addrs, m->cfg->path);
}

static void
master_cleanup(struct master *m)
{
	listeners_close_unused(m->listen_fds, m->n_listen_fds, NULL, 0);
	free(m->listen_fds);
	if (m->health != NULL)
		health_destroy(m->health);
	client_table_destroy(m->clients);
	accept_room_destroy(m->room);
	token_table_destroy(m->tokens);
	instance_close(m->instance);
	free(m->state_file);
	queue_stats_destroy(m->qstats);
	if (m->cfg != NULL)
		config_free(m->cfg);
}

int
master_run(const struct master_options *opt)
{
	struct master m;
	char err[1024] = "";
	int ready_fd = -1;
	int status;

	memset(&m, 0, sizeof(m));
	m.opt = opt;
	m.generation = 1;
	/* Before the first secret is read. */
	if (harden_master(opt->allow_core) < 0)
		log_warn("cannot protect the master from core dumps and ptrace: %s",
		    strerror(errno));
	status = master_init(&m, err, sizeof(err));
	if (status == SMTPMUXD_EXIT_CONFIG || status == SMTPMUXD_EXIT_NOTCONFIGURED)
		fprintf(stderr, "%s\n", err);
	else if (status != SMTPMUXD_EXIT_OK)
		log_err("%s", err);
	if (status == SMTPMUXD_EXIT_OK) {
		status = master_start(&m, &ready_fd, err, sizeof(err));
		if (status != SMTPMUXD_EXIT_OK)
			log_err("%s", err);
	}
	master_report(&ready_fd, (unsigned char)status);
	if (status == SMTPMUXD_EXIT_OK) {
		master_log_started(&m);
		master_loop(&m);
		master_save_state(&m);           /* the children's last words */
		log_info("stopped");
	}
	if (opt->pidfile != NULL && m.pid != 0)
		pidfile_remove(opt->pidfile);
	master_cleanup(&m);
	return status;
}
