/* SPDX-License-Identifier: MIT */
/*
 * The Redis connection (cluster_link.h). hiredis frees its context itself
 * when the server goes away (answering the pending callbacks NULL, then
 * calling the disconnect callback); this file frees it only from its own
 * timers or link_free(), never from inside a hiredis callback, and marks
 * the link down before anything is answered, so that nobody called back
 * can send on a dying connection.
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libevent.h>

#include "cluster_link.h"
#include "cluster_tls.h"
#include "log.h"

#define MIN_MAJOR 6                  /* scripts with TIME then writes; ACL users */
#define HANDSHAKE_MAX 12

enum link_state { LINK_DOWN, LINK_CONNECTING, LINK_UP };

struct link_req {
	struct link_req *next;           /* oldest first: Redis answers in order */
	struct cluster_link *link;
	link_reply_fn fn;
	void *arg;
	int64_t deadline_ms;
};

struct cluster_link {
	struct event_base *base;
	struct evdns_base *dns;
	const struct cluster_cfg *cfg;
	const char *tmp_dir;             /* where a rediss:// bridge listens */
	const struct link_hooks *hooks;
	void *arg;
	bool quiet;
	redisAsyncContext *ac;
	struct cluster_tls *tls;         /* rediss://: what ac is connected to */
	enum link_state state;
	bool ever_up;                    /* logging: "connected" or "back" */
	bool warned;                     /* the current outage was logged */
	struct link_req *head, *tail;
	unsigned pending;
	struct event *deadline;          /* the oldest call's */
	struct event *retry;
	struct event *drop;              /* frees the context from the loop */
	struct evdns_getaddrinfo_request *resolving;
	unsigned handshake_left;
	char sha[CLUSTER_SCRIPTS][41];
	char epoch[40];                  /* as last read; "" before */
	char new_epoch[40];              /* what this link proposes if there is none */
	bool epoch_changed;
	char server[64];
	char why[256];
};

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void link_connect(struct cluster_link *l);

/* --- state changes */

static void
schedule_retry(struct cluster_link *l)
{
	struct timeval tv = { (time_t)l->cfg->retry_interval, 0 };

	evtimer_add(l->retry, &tv);
}

/*
 * The link is down: say so once, and tell the owner. The context (if any)
 * is freed by hiredis or by the drop event, and pending calls are answered
 * NULL as that happens.
 */
static void
link_down(struct cluster_link *l, const char *why)
{
	bool was_up = l->state == LINK_UP;

	if (l->state == LINK_DOWN)
		return;
	l->state = LINK_DOWN;
	if (why != NULL)
		log_sanitize(l->why, sizeof(l->why), why, strlen(why));
	if (!l->quiet && !l->warned) {
		if (was_up)
			log_warn("cluster: link to %s lost (%s): deciding locally, quotas per "
			    "instance, until it is back", l->cfg->url.display, l->why);
		else
			log_warn("cluster: cannot reach %s (%s): deciding locally until it "
			    "answers", l->cfg->url.display, l->why);
		l->warned = true;
	}
	if (was_up && l->hooks != NULL && l->hooks->down != NULL)
		l->hooks->down(l->arg);
	schedule_retry(l);
}

/* Takes the link down and frees the context from the loop (we may be in a
 * hiredis callback now). */
static void
link_fail(struct cluster_link *l, const char *why)
{
	link_down(l, why);
	if (l->ac != NULL)
		event_active(l->drop, EV_TIMEOUT, 0);
}

static void
link_ready(struct cluster_link *l)
{
	l->state = LINK_UP;
	l->why[0] = '\0';
	if (!l->quiet) {
		if (!l->ever_up)
			log_info("cluster: connected to %s (%s)", l->cfg->url.display, l->server);
		else if (l->warned)
			log_info("cluster: link to %s is back (%s): sharing quotas, health and "
			    "rotation again", l->cfg->url.display, l->server);
	}
	l->ever_up = true;
	l->warned = false;
	if (l->hooks != NULL && l->hooks->up != NULL)
		l->hooks->up(l->arg, l->epoch_changed);
}

/* --- calls */

static void
deadline_arm(struct cluster_link *l)
{
	int64_t left;
	struct timeval tv;

	if (l->head == NULL) {
		evtimer_del(l->deadline);
		return;
	}
	left = l->head->deadline_ms - now_ms();
	if (left < 0)
		left = 0;
	tv.tv_sec = (time_t)(left / 1000);
	tv.tv_usec = (suseconds_t)(left % 1000) * 1000;
	evtimer_add(l->deadline, &tv);
}

static void
req_unlink(struct cluster_link *l, struct link_req *r)
{
	struct link_req **pp = &l->head, *prev = NULL;

	while (*pp != NULL && *pp != r) {
		prev = *pp;
		pp = &(*pp)->next;
	}
	if (*pp == NULL)
		return;
	*pp = r->next;
	if (l->tail == r)
		l->tail = prev;
	l->pending--;
}

static void
on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
	struct link_req *r = privdata;
	struct cluster_link *l = r->link;
	bool head = l->head == r;

	(void)ac;
	req_unlink(l, r);
	if (head)
		deadline_arm(l);
	if (reply == NULL)
		link_down(l, "connection lost");
	r->fn(r->arg, reply);
	free(r);
}

static int
send_argv(struct cluster_link *l, int argc, const char **argv, const size_t *lens,
    link_reply_fn fn, void *arg, unsigned timeout_ms)
{
	struct link_req *r;

	if (l->ac == NULL || (r = calloc(1, sizeof(*r))) == NULL)
		return -1;
	*r = (struct link_req){ .link = l, .fn = fn, .arg = arg,
		.deadline_ms = now_ms() + timeout_ms };
	if (redisAsyncCommandArgv(l->ac, on_reply, r, argc, argv, lens) != REDIS_OK) {
		free(r);
		return -1;
	}
	if (l->tail != NULL)
		l->tail->next = r;
	else
		l->head = r;
	l->tail = r;
	if (l->pending++ == 0)
		deadline_arm(l);
	return 0;
}

int
link_call(struct cluster_link *l, int argc, const char **argv, const size_t *lens,
    link_reply_fn fn, void *arg)
{
	if (l == NULL || l->state != LINK_UP)
		return -1;
	return send_argv(l, argc, argv, lens, fn, arg, l->cfg->timeout_ms);
}

int
link_script(struct cluster_link *l, enum cluster_script s, int numkeys, int argc,
    const char **argv, const size_t *lens, link_reply_fn fn, void *arg)
{
	const char *sv[3 + 32], **v = sv;
	size_t sn[3 + 32], *n = sn;
	char nk[16];
	int rc;

	if (l == NULL || l->state != LINK_UP || argc < 0 || s >= CLUSTER_SCRIPTS)
		return -1;
	if (argc > 32) {
		v = malloc((size_t)(argc + 3) * sizeof(*v));
		n = malloc((size_t)(argc + 3) * sizeof(*n));
		if (v == NULL || n == NULL) {
			free(v);
			free(n);
			return -1;
		}
	}
	snprintf(nk, sizeof(nk), "%d", numkeys);
	v[0] = "EVALSHA";
	v[1] = l->sha[s];
	v[2] = nk;
	n[0] = 7;
	n[1] = strlen(l->sha[s]);
	n[2] = strlen(nk);
	for (int i = 0; i < argc; i++) {
		v[3 + i] = argv[i];
		n[3 + i] = lens != NULL ? lens[i] : strlen(argv[i]);
	}
	rc = send_argv(l, argc + 3, v, n, fn, arg, l->cfg->timeout_ms);
	if (v != sv) {
		free(v);
		free(n);
	}
	return rc;
}

static void
deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct cluster_link *l = arg;
	char why[96];

	(void)fd;
	(void)what;
	if (l->head == NULL || now_ms() < l->head->deadline_ms) {
		deadline_arm(l);
		return;
	}
	snprintf(why, sizeof(why), "no answer within %u ms", l->state == LINK_UP ?
	    l->cfg->timeout_ms : l->cfg->connect_timeout_ms);
	link_down(l, why);
	if (l->ac != NULL) {
		redisAsyncContext *ac = l->ac;

		l->ac = NULL;
		redisAsyncFree(ac);      /* answers every pending call NULL */
	}
}

static void
drop_cb(evutil_socket_t fd, short what, void *arg)
{
	struct cluster_link *l = arg;
	redisAsyncContext *ac = l->ac;

	(void)fd;
	(void)what;
	l->ac = NULL;
	if (ac != NULL)
		redisAsyncFree(ac);
}

/* --- the handshake */

static bool
reply_ok(struct cluster_link *l, const redisReply *r, const char *what)
{
	char text[160];

	if (r != NULL && r->type != REDIS_REPLY_ERROR)
		return true;
	if (r == NULL)
		snprintf(text, sizeof(text), "%s: no answer", what);
	else
		snprintf(text, sizeof(text), "%s: %.*s", what, (int)(r->len < 120 ? r->len : 120),
		    r->str);
	link_fail(l, text);
	return false;
}

/* One handshake reply less; the last one brings the link up. */
static void
handshake_step(struct cluster_link *l)
{
	if (l->state == LINK_CONNECTING && --l->handshake_left == 0)
		link_ready(l);
}

static void
on_auth(void *arg, redisReply *r)
{
	if (reply_ok(arg, r, "AUTH"))
		handshake_step(arg);
}

static void
on_select(void *arg, redisReply *r)
{
	if (reply_ok(arg, r, "SELECT"))
		handshake_step(arg);
}

static void
on_set_epoch(void *arg, redisReply *r)
{
	if (reply_ok(arg, r, "SET epoch"))
		handshake_step(arg);
}

/* "redis_version:7.0.15" and, from Valkey, "valkey_version:8.0.1". */
static bool
info_field(const char *info, const char *key, char *out, size_t outlen)
{
	const char *p = strstr(info, key);

	if (p == NULL)
		return false;
	p += strlen(key);
	snprintf(out, outlen, "%.*s", (int)strcspn(p, "\r\n"), p);
	return true;
}

static void
on_info(void *arg, redisReply *r)
{
	struct cluster_link *l = arg;
	char version[32] = "", valkey[32] = "", why[128];

	if (!reply_ok(l, r, "INFO"))
		return;
	if (r->type != REDIS_REPLY_STRING) {
		link_fail(l, "INFO: unexpected reply");
		return;
	}
	info_field(r->str, "redis_version:", version, sizeof(version));
	if (info_field(r->str, "valkey_version:", valkey, sizeof(valkey)))
		snprintf(l->server, sizeof(l->server), "Valkey %s", valkey);
	else
		snprintf(l->server, sizeof(l->server), "Redis %s", version);
	if (atoi(version) < MIN_MAJOR) {
		snprintf(why, sizeof(why), "%s is too old: Redis %d or newer is needed",
		    l->server, MIN_MAJOR);
		link_fail(l, why);
		return;
	}
	handshake_step(l);
}

struct script_load {
	struct cluster_link *l;
	enum cluster_script s;
};

static void
on_script(void *arg, redisReply *r)
{
	struct script_load *sl = arg;
	struct cluster_link *l = sl->l;
	char what[48];

	snprintf(what, sizeof(what), "SCRIPT LOAD %s", cluster_script_name(sl->s));
	if (reply_ok(l, r, what)) {
		if (r->type == REDIS_REPLY_STRING && r->len == 40) {
			memcpy(l->sha[sl->s], r->str, 40);
			l->sha[sl->s][40] = '\0';
			handshake_step(l);
		} else {
			link_fail(l, "SCRIPT LOAD: unexpected reply");
		}
	}
	free(sl);
}

static void
on_epoch(void *arg, redisReply *r)
{
	struct cluster_link *l = arg;

	if (!reply_ok(l, r, "GET epoch"))
		return;
	if (r->type != REDIS_REPLY_STRING || r->len >= sizeof(l->epoch)) {
		link_fail(l, "the epoch key holds something else");
		return;
	}
	l->epoch_changed = l->epoch[0] != '\0' &&
	    (strlen(l->epoch) != r->len || memcmp(l->epoch, r->str, r->len) != 0);
	memcpy(l->epoch, r->str, r->len);
	l->epoch[r->len] = '\0';
	handshake_step(l);
}

static void
epoch_propose(struct cluster_link *l)
{
	unsigned char rnd[12];

	if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
		uint64_t t = (uint64_t)now_ms() ^ (uint64_t)(uintptr_t)l;

		memcpy(rnd, &t, sizeof(t));
		memset(rnd + sizeof(t), 0, sizeof(rnd) - sizeof(t));
	}
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(l->new_epoch + 2 * i, 3, "%02x", rnd[i]);
}

static void
handshake(struct cluster_link *l)
{
	const struct cluster_url *u = &l->cfg->url;
	unsigned timeout = l->cfg->connect_timeout_ms;
	char db[16], epoch_key[128];
	const char *argv[6];
	int rc = 0;

	l->handshake_left = 0;
	if (u->password != NULL) {
		int n = 0;

		argv[n++] = "AUTH";
		if (u->username != NULL)
			argv[n++] = u->username;
		argv[n++] = u->password;
		rc |= send_argv(l, n, argv, NULL, on_auth, l, timeout);
		l->handshake_left++;
	}
	if (u->db != 0) {
		snprintf(db, sizeof(db), "%u", u->db);
		argv[0] = "SELECT";
		argv[1] = db;
		rc |= send_argv(l, 2, argv, NULL, on_select, l, timeout);
		l->handshake_left++;
	}
	argv[0] = "INFO";
	argv[1] = "server";
	rc |= send_argv(l, 2, argv, NULL, on_info, l, timeout);
	l->handshake_left++;
	for (int s = 0; s < CLUSTER_SCRIPTS && rc == 0; s++) {
		struct script_load *sl = malloc(sizeof(*sl));

		if (sl == NULL) {
			rc = -1;
			break;
		}
		*sl = (struct script_load){ l, (enum cluster_script)s };
		argv[0] = "SCRIPT";
		argv[1] = "LOAD";
		argv[2] = cluster_script_source((enum cluster_script)s);
		if (send_argv(l, 3, argv, NULL, on_script, sl, timeout) < 0) {
			free(sl);
			rc = -1;
		}
		l->handshake_left++;
	}
	snprintf(epoch_key, sizeof(epoch_key), "%sepoch", l->cfg->key_prefix);
	epoch_propose(l);
	argv[0] = "SET";
	argv[1] = epoch_key;
	argv[2] = l->new_epoch;
	argv[3] = "NX";
	rc |= send_argv(l, 4, argv, NULL, on_set_epoch, l, timeout);
	l->handshake_left++;
	argv[0] = "GET";
	argv[1] = epoch_key;
	rc |= send_argv(l, 2, argv, NULL, on_epoch, l, timeout);
	l->handshake_left++;
	if (rc != 0)
		link_fail(l, "out of memory");
}

/* --- connecting */

static void
on_connect(const redisAsyncContext *ac, int status)
{
	struct cluster_link *l = ac->data;

	if (status == REDIS_OK)
		return;
	/* hiredis frees the context after this: the handshake's calls are
	 * answered NULL then. */
	l->ac = NULL;
	link_down(l, ac->errstr[0] ? ac->errstr : "cannot connect");
}

static void
on_disconnect(const redisAsyncContext *ac, int status)
{
	struct cluster_link *l = ac->data;

	(void)status;
	if (l->ac == ac)
		l->ac = NULL;
	link_down(l, ac->err ? ac->errstr : "connection closed");
}

/* The bridge's Redis side failed: its reason (a certificate, say) is the
 * one to log, not hiredis' "connection closed" that follows. */
static void
on_tls_failed(void *arg, const char *why)
{
	link_fail(arg, why);
}

static void
attach(struct cluster_link *l, redisAsyncContext *ac)
{
	if (ac == NULL || ac->err) {
		link_down(l, ac != NULL ? ac->errstr : "out of memory");
		if (ac != NULL)
			redisAsyncFree(ac);
		return;
	}
	ac->data = l;
	if (redisLibeventAttach(ac, l->base) != REDIS_OK) {
		redisAsyncFree(ac);
		link_down(l, "cannot watch the connection");
		return;
	}
	redisAsyncSetConnectCallback(ac, on_connect);
	redisAsyncSetDisconnectCallback(ac, on_disconnect);
	l->ac = ac;
	handshake(l);
}

/* rediss://: hiredis connects to a private bridge that does the TLS. */
static void
connect_tls(struct cluster_link *l, const struct sockaddr *sa, socklen_t salen)
{
	char why[256];

	cluster_tls_free(l->tls);
	l->tls = cluster_tls_new(l->base, l->tmp_dir, sa, salen, l->cfg->tls, l->cfg->url.host,
	    l->cfg->connect_timeout_ms, on_tls_failed, l, why, sizeof(why));
	if (l->tls == NULL) {
		link_down(l, why);
		return;
	}
	attach(l, redisAsyncConnectUnix(cluster_tls_path(l->tls)));
}

static void
connect_addr(struct cluster_link *l, const struct evutil_addrinfo *ai)
{
	char ip[INET6_ADDRSTRLEN];
	const void *a = ai->ai_family == AF_INET6 ?
	    (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr :
	    (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr;

	if (l->cfg->url.tls)
		connect_tls(l, ai->ai_addr, (socklen_t)ai->ai_addrlen);
	else if (inet_ntop(ai->ai_family, a, ip, sizeof(ip)) != NULL)
		attach(l, redisAsyncConnect(ip, atoi(l->cfg->url.port)));
	else
		link_down(l, "unexpected address");
}

static void
on_resolved(int result, struct evutil_addrinfo *res, void *arg)
{
	struct cluster_link *l = arg;

	l->resolving = NULL;
	if (result == EVUTIL_EAI_CANCEL) {
		if (res != NULL)
			evutil_freeaddrinfo(res);
		return;
	}
	if (result != 0 || res == NULL) {
		char why[160];

		snprintf(why, sizeof(why), "cannot resolve %s: %s", l->cfg->url.host,
		    result ? evutil_gai_strerror(result) : "no address");
		link_down(l, why);
	} else {
		connect_addr(l, res);
	}
	if (res != NULL)
		evutil_freeaddrinfo(res);
}

static bool
numeric_host(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];

	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Never blocks: hiredis gets a numeric address (a name would make it
 * call getaddrinfo()), or a socket path. */
static void
link_connect(struct cluster_link *l)
{
	const struct cluster_url *u = &l->cfg->url;
	struct evutil_addrinfo hints;

	if (l->state != LINK_DOWN || l->resolving != NULL)
		return;
	if (l->ac != NULL) {             /* the last one is still being freed */
		schedule_retry(l);
		return;
	}
	l->state = LINK_CONNECTING;
	l->epoch_changed = false;
	if (u->socket != NULL) {
		attach(l, redisAsyncConnectUnix(u->socket));
		return;
	}
	if (!u->tls && (numeric_host(u->host) || l->dns == NULL)) {
		attach(l, redisAsyncConnect(u->host, atoi(u->port)));
		return;
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	if (numeric_host(u->host) || l->dns == NULL) {
		struct evutil_addrinfo *res = NULL;
		int rc;

		/* An address is converted, never looked up (no DNS resolver:
		 * unit tests only). */
		hints.ai_flags = numeric_host(u->host) ? EVUTIL_AI_NUMERICHOST : 0;
		rc = evutil_getaddrinfo(u->host, u->port, &hints, &res);
		on_resolved(rc, res, l);
		return;
	}
	l->resolving = evdns_getaddrinfo(l->dns, u->host, u->port, &hints, on_resolved, l);
}

static void
retry_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	link_connect(arg);
}

/* --- life cycle */

struct cluster_link *
link_new(struct event_base *base, struct evdns_base *dns, const struct cluster_cfg *cfg,
    const char *tmp_dir, const struct link_hooks *hooks, void *arg, bool quiet)
{
	struct cluster_link *l = calloc(1, sizeof(*l));
	struct timeval now = { 0, 0 };

	if (l == NULL)
		return NULL;
	*l = (struct cluster_link){ .base = base, .dns = dns, .cfg = cfg, .tmp_dir = tmp_dir,
		.hooks = hooks,
		.arg = arg, .quiet = quiet, .state = LINK_DOWN };
	l->deadline = evtimer_new(base, deadline_cb, l);
	l->retry = evtimer_new(base, retry_cb, l);
	l->drop = event_new(base, -1, 0, drop_cb, l);
	if (l->deadline == NULL || l->retry == NULL || l->drop == NULL) {
		link_free(l);
		return NULL;
	}
	evtimer_add(l->retry, &now);
	return l;
}

void
link_free(struct cluster_link *l)
{
	if (l == NULL)
		return;
	l->quiet = true;
	l->hooks = NULL;
	l->state = LINK_DOWN;
	if (l->resolving != NULL)
		evdns_getaddrinfo_cancel(l->resolving);
	if (l->ac != NULL) {
		redisAsyncContext *ac = l->ac;

		l->ac = NULL;
		redisAsyncFree(ac);
	}
	cluster_tls_free(l->tls);
	if (l->deadline != NULL)
		event_free(l->deadline);
	if (l->retry != NULL)
		event_free(l->retry);
	if (l->drop != NULL)
		event_free(l->drop);
	free(l);
}

bool
link_is_up(const struct cluster_link *l)
{
	return l != NULL && l->state == LINK_UP;
}

unsigned
link_pending(const struct cluster_link *l)
{
	return l != NULL ? l->pending : 0;
}

const char *
link_server(const struct cluster_link *l)
{
	return l->server;
}

const char *
link_why(const struct cluster_link *l)
{
	return l->state == LINK_UP ? "" : l->why[0] ? l->why : "connecting";
}
