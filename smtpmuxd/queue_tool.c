/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "master.h"
#include "queue_tool.h"
#include "spool.h"

#define REQUEST_WAIT_MS 10000
#define REQUEST_POLL_MS 20

static const struct {
	const char *name;
	int needs_arg;
} commands[] = {
	{ "queue", -1 }, { "flush", 0 }, { "delete", 1 }, { "hold", 1 }, { "release", 1 },
};

bool
queue_tool_known(const char *cmd, int *needs_arg)
{
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		if (strcmp(cmd, commands[i].name) == 0) {
			*needs_arg = commands[i].needs_arg;
			return true;
		}
	}
	return false;
}

/* --- listing */

struct listed {
	char id[SPOOL_ID_LEN + 1];
	struct spool_env env;
	bool ok, held;
	char err[160];
};

struct listing {
	struct spool *sp;
	struct listed *items;
	size_t n, cap;
};

static void
list_one(const char *name, bool bad, void *arg)
{
	struct listing *l = arg;
	struct listed *it;
	size_t hlen;
	bool state_err;
	int fd;

	if (bad)
		return;
	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 64;
		struct listed *grown = realloc(l->items, cap * sizeof(*grown));

		if (grown == NULL)
			return;
		l->items = grown;
		l->cap = cap;
	}
	it = &l->items[l->n++];
	memset(it, 0, sizeof(*it));
	snprintf(it->id, sizeof(it->id), "%s", name);
	fd = spool_read(l->sp, name, &it->env, &hlen, &state_err, it->err, sizeof(it->err));
	if (fd >= 0) {
		close(fd);
		it->ok = true;
		it->held = spool_is_held(l->sp, name);
	}
}

static int
by_arrival(const void *a, const void *b)
{
	const struct listed *x = a, *y = b;

	if (x->ok != y->ok)
		return x->ok ? -1 : 1;
	if (x->env.arrived != y->env.arrived)
		return x->env.arrived < y->env.arrived ? -1 : 1;
	return strcmp(x->id, y->id);
}

static const char *
next_cell(char *buf, size_t len, const struct listed *it, time_t now)
{
	if (it->held)
		return "held";
	if (it->env.next <= 0 || it->env.next <= (int64_t)now)
		return "due";
	snprintf(buf, len, "in %" PRId64 "s", it->env.next - (int64_t)now);
	return buf;
}

static void
print_item(const struct listed *it, time_t now)
{
	const struct spool_error *e = spool_env_last_error(&it->env);
	char user[64], from[80], rcpt[80], next[32], err[SPOOL_RELAY_MAX + SPOOL_ERROR_TEXT_MAX + 4];

	if (!it->ok) {
		printf("%-12s  (unreadable: %s)\n", it->id, it->err);
		return;
	}
	log_sanitize(user, sizeof(user), it->env.user, strlen(it->env.user));
	log_sanitize(from, sizeof(from), it->env.from, strlen(it->env.from));
	log_sanitize(rcpt, sizeof(rcpt), it->env.rcpts[0], strlen(it->env.rcpts[0]));
	if (e != NULL) {
		/* What a downstream said, and names from the configuration: printable
		 * ASCII only on a terminal. */
		char relay[SPOOL_RELAY_MAX + 1], text[SPOOL_ERROR_TEXT_MAX + 1];

		snprintf(err, sizeof(err), "%s: %s",
		    log_sanitize(relay, sizeof(relay), e->relay, strlen(e->relay)),
		    log_sanitize(text, sizeof(text), e->text, strlen(e->text)));
	}
	printf("%-12s  %-20s  <%s>  <%s>%s  %" PRIu64 "  %" PRId64 "s  %u  %s  %s\n", it->id,
	    user, from, rcpt, it->env.n_rcpts > 1 ? " +more" : "", it->env.size,
	    (int64_t)now - it->env.arrived, it->env.attempts, next_cell(next, sizeof(next), it, now),
	    e != NULL ? err : "-");
}

static int
list_queue(struct spool *sp)
{
	struct listing l = { sp, NULL, 0, 0 };
	time_t now = time(NULL);
	uint64_t bytes = 0;

	if (spool_scan(sp, list_one, &l) < 0) {
		fprintf(stderr, "smtpmuxd: cannot read %s/msg: %s\n", spool_path(sp), strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	qsort(l.items, l.n, sizeof(*l.items), by_arrival);
	printf("ID            USER  FROM  TO  SIZE  AGE  ATTEMPTS  NEXT  LAST ERROR\n");
	for (size_t i = 0; i < l.n; i++) {
		print_item(&l.items[i], now);
		bytes += l.items[i].env.size;
		spool_env_clear(&l.items[i].env);
	}
	printf("%zu message(s), %" PRIu64 " octets of message bodies%s\n", l.n, bytes,
	    spool_runner_active(sp) ? "" : " (no queue runner is running)");
	free(l.items);
	return SMTPMUXD_EXIT_OK;
}

/* --- changes */

static bool
message_exists(struct spool *sp, const char *id)
{
	struct spool_env env;
	char err[160];
	size_t hlen;
	bool state_err;
	int fd;

	memset(&env, 0, sizeof(env));
	fd = spool_read(sp, id, &env, &hlen, &state_err, err, sizeof(err));
	if (fd >= 0)
		close(fd);
	spool_env_clear(&env);
	return fd >= 0 || errno != ENOENT;
}

/* Waits until the runner has taken the request; false after the timeout. */
static bool
request_wait(struct spool *sp, const char *verb, const char *target)
{
	struct timespec nap = { 0, REQUEST_POLL_MS * 1000000L };

	for (int waited = 0; waited < REQUEST_WAIT_MS; waited += REQUEST_POLL_MS) {
		if (!spool_request_pending(sp, verb, target))
			return true;
		nanosleep(&nap, NULL);
	}
	return false;
}

static int
request_runner(struct spool *sp, const char *verb, const char *target)
{
	if (spool_request(sp, verb, target) < 0) {
		fprintf(stderr, "smtpmuxd: cannot write the request to %s/ctl: %s\n",
		    spool_path(sp), strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (!request_wait(sp, verb, target)) {
		fprintf(stderr, "smtpmuxd: the queue runner has not taken the request yet; "
		    "it will\n");
		return SMTPMUXD_EXIT_RUNTIME;
	}
	printf("%s %s: done\n", verb, target);
	return SMTPMUXD_EXIT_OK;
}

struct remover {
	struct spool *sp;
	unsigned removed;
};

static void
remove_listed(const char *name, bool bad, void *arg)
{
	struct remover *r = arg;

	if (!bad && spool_remove(r->sp, name) == 0)
		r->removed++;
}

/* No runner: the files are removed here. */
static int
delete_offline(struct spool *sp, const char *target)
{
	struct remover r = { sp, 0 };

	if (strcmp(target, "all") == 0)
		spool_scan(sp, remove_listed, &r);
	else if (spool_remove(sp, target) == 0)
		r.removed = 1;
	else {
		fprintf(stderr, "smtpmuxd: %s: %s\n", target, strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	printf("deleted %u message(s)\n", r.removed);
	return SMTPMUXD_EXIT_OK;
}

static int
flush_or_delete(struct spool *sp, const char *verb, const char *target)
{
	if (strcmp(target, "all") != 0 && !message_exists(sp, target)) {
		fprintf(stderr, "smtpmuxd: %s: no such message in the queue\n", target);
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (spool_runner_active(sp))
		return request_runner(sp, verb, target);
	if (strcmp(verb, "delete") == 0)
		return delete_offline(sp, target);
	if (spool_request(sp, verb, target) < 0) {
		fprintf(stderr, "smtpmuxd: %s/ctl: %s\n", spool_path(sp), strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	printf("no queue runner is running: the queue is flushed when smtpmuxd starts\n");
	return SMTPMUXD_EXIT_OK;
}

static int
hold_or_release(struct spool *sp, const char *id, bool hold)
{
	if (!message_exists(sp, id)) {
		fprintf(stderr, "smtpmuxd: %s: no such message in the queue\n", id);
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (spool_set_held(sp, id, hold) < 0) {
		fprintf(stderr, "smtpmuxd: %s: %s\n", id, strerror(errno));
		return SMTPMUXD_EXIT_RUNTIME;
	}
	printf("%s %s\n", id, hold ? "held" : "released");
	return SMTPMUXD_EXIT_OK;
}

static bool
target_valid(const char *cmd, const char *arg)
{
	if (arg == NULL)
		return strcmp(cmd, "queue") == 0 || strcmp(cmd, "flush") == 0;
	if (strcmp(arg, "all") == 0)
		return strcmp(cmd, "delete") == 0;
	return spool_id_valid(arg, strlen(arg));
}

int
queue_tool_run(const char *config_path, const char *cmd, const char *arg)
{
	char err[1024];
	struct config *cfg;
	struct spool *sp;
	int rc;

	if (!target_valid(cmd, arg)) {
		fprintf(stderr, "smtpmuxd: -s %s: %s is not a queue id%s\n", cmd, arg ? arg : "(none)",
		    strcmp(cmd, "delete") == 0 ? " or \"all\"" : "");
		return SMTPMUXD_EXIT_USAGE;
	}
	if ((cfg = config_load(config_path, err, sizeof(err))) == NULL) {
		fprintf(stderr, "%s\n", err);
		return SMTPMUXD_EXIT_CONFIG;
	}
	if ((sp = spool_open(cfg->queue.dir, err, sizeof(err))) == NULL) {
		fprintf(stderr, "smtpmuxd: %s\n", err);
		config_free(cfg);
		return SMTPMUXD_EXIT_RUNTIME;
	}
	if (strcmp(cmd, "queue") == 0)
		rc = list_queue(sp);
	else if (strcmp(cmd, "hold") == 0 || strcmp(cmd, "release") == 0)
		rc = hold_or_release(sp, arg, strcmp(cmd, "hold") == 0);
	else
		rc = flush_or_delete(sp, cmd, arg != NULL ? arg : "all");
	spool_close(sp);
	config_free(cfg);
	return rc;
}
