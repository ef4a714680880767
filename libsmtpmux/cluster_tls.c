/* SPDX-License-Identifier: MIT */
/*
 * The TLS bridge under a rediss:// link (cluster_tls.h): a listening Unix
 * socket that takes hiredis' connection ("local"), and a conn.c connection
 * with TLS to Redis ("remote").
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cluster_tls.h"
#include "conn.h"

struct cluster_tls {
	struct event_base *base;
	int listen_fd;
	struct event *ev_accept;
	struct conn *local;              /* hiredis' end, once accepted */
	struct conn *remote;             /* Redis, TLS once ready */
	bool ready;                      /* the handshake is done */
	bool failed;                     /* fail was called */
	struct tls_client_ctx *tls;
	char *servername;
	cluster_tls_fail_fn fail;
	void *arg;
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

/* --- the listening socket */

static void
unlisten(struct cluster_tls *b)
{
	if (b->ev_accept != NULL) {
		event_free(b->ev_accept);
		b->ev_accept = NULL;
	}
	if (b->listen_fd >= 0) {
		close(b->listen_fd);
		b->listen_fd = -1;
	}
	if (b->path[0] != '\0') {
		unlink(b->path);
		b->path[0] = '\0';
	}
	if (b->dir[0] != '\0') {
		rmdir(b->dir);
		b->dir[0] = '\0';
	}
}

static int
listen_private(struct cluster_tls *b, const char *tmp_dir, char *why, size_t whylen)
{
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	int n;

	n = snprintf(b->dir, sizeof(b->dir), "%s/smtpmux-redis.XXXXXX", tmp_dir);
	if (n < 0 || (size_t)n + 3 > sizeof(sun.sun_path)) {
		b->dir[0] = '\0';
		snprintf(why, whylen, "TLS bridge: %s is too long a path for a Unix socket",
		    tmp_dir);
		return -1;
	}
	if (mkdtemp(b->dir) == NULL) {         /* mode 0700 */
		snprintf(why, whylen, "TLS bridge: cannot make a folder in %s: %s", tmp_dir,
		    strerror(errno));
		b->dir[0] = '\0';
		return -1;
	}
	/* Fits: checked above. */
	memcpy(b->path, b->dir, (size_t)n);
	memcpy(b->path + n, "/s", 3);
	memcpy(sun.sun_path, b->path, (size_t)n + 3);
	b->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (b->listen_fd < 0 || bind(b->listen_fd, (struct sockaddr *)&sun, sizeof(sun)) < 0 ||
	    listen(b->listen_fd, 1) < 0) {
		snprintf(why, whylen, "TLS bridge: cannot listen on %s: %s", b->path,
		    strerror(errno));
		return -1;
	}
	return 0;
}

/* --- carrying octets */

static void
carry(struct conn *from, struct conn *to)
{
	if (from == NULL || to == NULL || evbuffer_get_length(conn_input(from)) == 0)
		return;
	evbuffer_add_buffer(conn_output(to), conn_input(from));
	conn_flush(to);
}

static void
ignore_read(struct conn *c, void *arg)
{
	(void)c;
	(void)arg;
}

static void
ignore_error(struct conn *c, void *arg, enum conn_event ev, const char *detail)
{
	(void)c;
	(void)arg;
	(void)ev;
	(void)detail;
}

/* For hiredis' end while it is being closed: nothing it does matters. */
static const struct conn_cbs closing_cbs = {
	.on_read = ignore_read,
	.on_error = ignore_error,
};

/*
 * Closes both sides. What Redis had sent is first written to hiredis as
 * far as it goes without waiting (an error reply before Redis closes, say),
 * with callbacks that cannot come back here.
 */
static void
close_both(struct cluster_tls *b)
{
	struct conn *local = b->local, *remote = b->remote;

	b->local = b->remote = NULL;
	if (local != NULL) {
		conn_set_cbs(local, &closing_cbs, NULL);
		if (b->ready && remote != NULL)
			evbuffer_add_buffer(conn_output(local), conn_input(remote));
		conn_flush_now(local);
		conn_free(local);
	}
	conn_free(remote);
	unlisten(b);
}

/* The Redis side failed: the link hears why before hiredis sees the close. */
static void
remote_failed(struct cluster_tls *b, const char *why)
{
	char text[320];

	close_both(b);
	if (b->failed)
		return;
	b->failed = true;
	snprintf(text, sizeof(text), "TLS to %s: %s", b->servername, why);
	b->fail(b->arg, text);
}

static void
local_on_read(struct conn *c, void *arg)
{
	struct cluster_tls *b = arg;

	(void)c;
	if (b->ready)
		carry(b->local, b->remote);
}

/* hiredis closed its end (the link freed its context): nothing to report. */
static void
local_on_error(struct conn *c, void *arg, enum conn_event ev, const char *detail)
{
	(void)c;
	(void)ev;
	(void)detail;
	close_both(arg);
}

static const struct conn_cbs local_cbs = {
	.on_read = local_on_read,
	.on_error = local_on_error,
};

static void
remote_on_read(struct conn *c, void *arg)
{
	struct cluster_tls *b = arg;

	(void)c;
	carry(b->remote, b->local);
}

static void
remote_on_connected(struct conn *c, void *arg)
{
	struct cluster_tls *b = arg;

	if (conn_start_tls_client(c, b->tls, b->servername) < 0)
		remote_failed(b, "cannot start the TLS handshake");
}

static void
remote_on_tls_ready(struct conn *c, void *arg)
{
	struct cluster_tls *b = arg;

	conn_set_timeout(c, 0);          /* the link times its calls */
	b->ready = true;
	carry(b->local, b->remote);
	carry(b->remote, b->local);
}

static void
remote_on_error(struct conn *c, void *arg, enum conn_event ev, const char *detail)
{
	(void)c;
	remote_failed(arg, ev == CONN_EOF ? "Redis closed the connection" : detail);
}

static const struct conn_cbs remote_cbs = {
	.on_read = remote_on_read,
	.on_connected = remote_on_connected,
	.on_tls_ready = remote_on_tls_ready,
	.on_error = remote_on_error,
};

/* --- accepting hiredis */

static bool
from_this_process(int fd)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 &&
	    cred.pid == getpid();
}

static void
accept_cb(evutil_socket_t lfd, short what, void *arg)
{
	struct cluster_tls *b = arg;
	int fd;

	(void)what;
	fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;                  /* EAGAIN, or it gave up: wait for hiredis */
	if (!from_this_process(fd)) {
		close(fd);
		return;
	}
	unlisten(b);                     /* one connection, and nobody else's */
	if ((b->local = conn_accepted(b->base, fd, NULL, 0, &local_cbs, b)) == NULL) {
		close(fd);
		remote_failed(b, "out of memory");
		return;
	}
	carry(b->remote, b->local);
}

/* --- life cycle */

struct cluster_tls *
cluster_tls_new(struct event_base *base, const char *tmp_dir, const struct sockaddr *sa,
    socklen_t salen, struct tls_client_ctx *tls, const char *servername, unsigned timeout_ms,
    cluster_tls_fail_fn fail, void *arg, char *why, size_t whylen)
{
	struct cluster_tls *b = calloc(1, sizeof(*b));

	if (b == NULL) {
		snprintf(why, whylen, "out of memory");
		return NULL;
	}
	*b = (struct cluster_tls){ .base = base, .listen_fd = -1, .tls = tls, .fail = fail,
		.arg = arg };
	if ((b->servername = strdup(servername)) == NULL) {
		snprintf(why, whylen, "out of memory");
		goto fail;
	}
	if (listen_private(b, tmp_dir, why, whylen) < 0)
		goto fail;
	b->ev_accept = event_new(base, b->listen_fd, EV_READ | EV_PERSIST, accept_cb, b);
	if (b->ev_accept == NULL || event_add(b->ev_accept, NULL) < 0) {
		snprintf(why, whylen, "out of memory");
		goto fail;
	}
	b->remote = conn_connect(base, sa, salen, timeout_ms, &remote_cbs, b);
	if (b->remote == NULL) {
		snprintf(why, whylen, "TLS bridge: cannot make a socket: %s", strerror(errno));
		goto fail;
	}
	return b;
fail:
	cluster_tls_free(b);
	return NULL;
}

const char *
cluster_tls_path(const struct cluster_tls *b)
{
	return b->path;
}

void
cluster_tls_free(struct cluster_tls *b)
{
	if (b == NULL)
		return;
	conn_free(b->local);
	conn_free(b->remote);
	unlisten(b);
	free(b->servername);
	free(b);
}
