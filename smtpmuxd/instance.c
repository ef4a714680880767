/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <gnutls/crypto.h>

#include "instance.h"

#define NAME_PREFIX "smtpmuxd:"
#define HASHED_PREFIX "smtpmuxd#"      /* + SHA-256 of a path too long to spell out */
#define BACKLOG 16
#define SERVE_BATCH 16                 /* readers answered per wakeup */
#define FETCH_TIMEOUT_MS 5000
#define REPLY_SEGMENTS 'S'            /* then a byte of HAS_* bits, and the descriptors */
#define SEGMENTS_MAX 4                 /* health control, health live, [queue], [tokens] */
#define HAS_QUEUE 0x01
#define HAS_TOKENS 0x02
#define REPLY_REFUSED 'P'

struct instance {
	int fd;
};

/* --- the name */

/* The folder resolved (symlinks, "..") so that two spellings of one state
 * file name one lock; the file itself may not exist yet. */
static void
canonical_path(const char *path, char *out, size_t size)
{
	char dir[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(path, '/');

	if (slash == NULL || slash == path ||
	    (size_t)(slash - path) >= sizeof(dir)) {
		snprintf(out, size, "%s", path);
		return;
	}
	memcpy(dir, path, (size_t)(slash - path));
	dir[slash - path] = '\0';
	if (realpath(dir, real) == NULL)
		snprintf(out, size, "%s", path);
	else
		snprintf(out, size, "%s%s", strcmp(real, "/") == 0 ? "" : real, slash);
}

size_t
instance_name(const char *state_file, char *name, size_t size)
{
	char path[PATH_MAX + 1];
	unsigned char digest[32];
	size_t len, i;

	canonical_path(state_file, path, sizeof(path));
	name[0] = '\0';
	len = strlen(path);
	if (1 + strlen(NAME_PREFIX) + len <= size) {
		memcpy(name + 1, NAME_PREFIX, strlen(NAME_PREFIX));
		memcpy(name + 1 + strlen(NAME_PREFIX), path, len);
		return 1 + strlen(NAME_PREFIX) + len;
	}
	gnutls_hash_fast(GNUTLS_DIG_SHA256, path, len, digest);
	len = 1 + (size_t)snprintf(name + 1, size - 1, "%s", HASHED_PREFIX);
	for (i = 0; i < sizeof(digest) && len + 2 < size; i++, len += 2)
		snprintf(name + len, 3, "%02x", digest[i]);
	return len;
}

static socklen_t
name_addr(const char *state_file, struct sockaddr_un *sun)
{
	size_t len;

	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	len = instance_name(state_file, sun->sun_path, sizeof(sun->sun_path));
	return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len);
}

/* --- the master */

/* Who holds the name we could not bind, for the message. */
static void
describe_holder(const struct sockaddr_un *sun, socklen_t len, char *out, size_t size)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct ucred cred;
	socklen_t clen = sizeof(cred);

	if (fd >= 0 && connect(fd, (const struct sockaddr *)sun, len) == 0 &&
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0)
		snprintf(out, size, "another smtpmuxd (pid %ld, uid %u) or workers it left running",
		    (long)cred.pid, (unsigned)cred.uid);
	else
		snprintf(out, size, "another process (%s)", strerror(errno));
	if (fd >= 0)
		close(fd);
}

struct instance *
instance_claim(const char *state_file, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	socklen_t len = name_addr(state_file, &sun);
	struct instance *in = calloc(1, sizeof(*in));
	char holder[128];

	if (in == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	in->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (in->fd >= 0 && bind(in->fd, (struct sockaddr *)&sun, len) == 0 &&
	    listen(in->fd, BACKLOG) == 0)
		return in;
	if (errno == EADDRINUSE) {
		describe_holder(&sun, len, holder, sizeof(holder));
		snprintf(err, errlen, "state file %s is in use by %s", state_file, holder);
	} else
		snprintf(err, errlen, "cannot lock state file %s: %s", state_file, strerror(errno));
	if (in->fd >= 0)
		close(in->fd);
	free(in);
	return NULL;
}

int
instance_fd(const struct instance *in)
{
	return in->fd;
}

static bool
in_groups(int fd, gid_t gid)
{
	gid_t *groups = NULL;
	socklen_t len = 0;
	bool found = false;

	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, NULL, &len) < 0 && errno != ERANGE)
		return false;
	if (len == 0 || (groups = malloc(len)) == NULL)
		return false;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == 0)
		for (size_t i = 0; i < len / sizeof(gid_t); i++)
			found = found || groups[i] == gid;
	free(groups);
	return found;
}

static bool
reader_allowed(int fd, const struct instance_access *access)
{
	struct ucred cred;
	socklen_t len = sizeof(cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
		return false;
	return cred.uid == 0 || cred.uid == access->self_uid ||
	    cred.uid == access->service_uid || cred.gid == access->service_gid ||
	    in_groups(fd, access->service_gid);
}

/* One byte, and with REPLY_SEGMENTS which optional segments follow and
 * the n descriptors: the health segments', then those. */
static void
reply(int fd, char what, unsigned char has, const int *fds, size_t n)
{
	char cbuf[CMSG_SPACE(SEGMENTS_MAX * sizeof(int))];
	char bytes[2] = { what, (char)has };
	struct iovec iov = { bytes, fds != NULL ? 2 : 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	struct cmsghdr *cm;

	memset(cbuf, 0, sizeof(cbuf));
	if (fds != NULL) {
		msg.msg_control = cbuf;
		msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
		cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(n * sizeof(int));
		memcpy(CMSG_DATA(cm), fds, n * sizeof(int));
	}
	/* A fresh socket's buffer always has room for this: never waits. */
	(void)sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* The descriptors to hand over, in order, and the HAS_* bits saying which. */
static size_t
segments(const struct health *h, const struct instance_extras *x, int fds[SEGMENTS_MAX],
    unsigned char *has)
{
	size_t n = 2;

	health_export(h, &fds[0], &fds[1]);
	*has = 0;
	if (x != NULL && x->queue_fd >= 0) {
		fds[n++] = x->queue_fd;
		*has |= HAS_QUEUE;
	}
	if (x != NULL && x->token_fd >= 0) {
		fds[n++] = x->token_fd;
		*has |= HAS_TOKENS;
	}
	return n;
}

void
instance_serve(struct instance *in, const struct health *h, const struct instance_extras *x,
    const struct instance_access *access)
{
	int fds[SEGMENTS_MAX];
	unsigned char has;
	size_t n = segments(h, x, fds, &has);

	for (int i = 0; i < SERVE_BATCH; i++) {
		int fd = accept4(in->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);

		if (fd < 0)
			return;
		if (fds[0] >= 0 && fds[1] >= 0 && reader_allowed(fd, access))
			reply(fd, REPLY_SEGMENTS, has, fds, n);
		else
			reply(fd, REPLY_REFUSED, 0, NULL, 0);
		close(fd);
	}
}

void
instance_close(struct instance *in)
{
	if (in == NULL)
		return;
	close(in->fd);
	free(in);
}

/* --- the status reader */

static bool
server_trusted(int fd, uid_t service_uid, struct ucred *cred)
{
	socklen_t len = sizeof(*cred);

	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, cred, &len) < 0)
		return false;
	return cred->uid == 0 || cred->uid == geteuid() || cred->uid == service_uid;
}

/* Waits for the reply (its byte and HAS_* bits) and takes the descriptors
 * it carries, SEGMENTS_MAX at most. Returns how many, or -1. */
static int
fetch_reply(int fd, unsigned char reply[2], int fds[SEGMENTS_MAX])
{
	char cbuf[CMSG_SPACE(SEGMENTS_MAX * sizeof(int))];
	struct iovec iov = { reply, 2 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
		.msg_controllen = sizeof(cbuf) };
	struct pollfd p = { fd, POLLIN, 0 };
	struct cmsghdr *cm;
	ssize_t len;
	int n = 0;

	reply[0] = reply[1] = 0;
	if (poll(&p, 1, FETCH_TIMEOUT_MS) <= 0) {
		errno = ETIMEDOUT;
		return -1;
	}
	if ((len = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC)) < 1) {
		errno = len == 0 ? ECONNRESET : errno;
		return -1;
	}
	for (cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
		const int *got = (const int *)CMSG_DATA(cm);
		size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);

		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		for (size_t i = 0; i < k; i++)
			if (n < SEGMENTS_MAX)
				fds[n++] = got[i];
			else
				close(got[i]);
	}
	return n;
}

/* How many descriptors a REPLY_SEGMENTS answer with these bits carries. */
static int
segments_expected(unsigned char has)
{
	return 2 + !!(has & HAS_QUEUE) + !!(has & HAS_TOKENS);
}

/* The descriptors of a REPLY_SEGMENTS answer, after the server was checked;
 * *has: which optional ones came. */
static int
fetch_from(int fd, const char *state_file, uid_t service_uid, int fds[SEGMENTS_MAX],
    unsigned char *has, char *err, size_t errlen)
{
	struct ucred cred;
	unsigned char reply[2];
	int n;

	if (!server_trusted(fd, service_uid, &cred)) {
		snprintf(err, errlen, "the socket of state file %s belongs to uid %u, which is "
		    "not smtpmuxd's", state_file, (unsigned)cred.uid);
		errno = EACCES;
		return -1;
	}
	if ((n = fetch_reply(fd, reply, fds)) < 0) {
		snprintf(err, errlen, "smtpmuxd pid %ld (state file %s) did not answer: %s",
		    (long)cred.pid, state_file, strerror(errno));
		return -1;
	}
	*has = reply[1];
	if (reply[0] == REPLY_SEGMENTS && n == segments_expected(reply[1]))
		return 0;
	if (reply[0] == REPLY_SEGMENTS) {
		snprintf(err, errlen, "smtpmuxd pid %ld (state file %s) handed over %d segments "
		    "where this smtpmuxd expects %d: another version?", (long)cred.pid, state_file,
		    n, segments_expected(reply[1]));
		errno = EPROTO;
		return -1;
	}
	snprintf(err, errlen, "smtpmuxd (state file %s) refused: run this as root or as a "
	    "member of the workers' group", state_file);
	errno = EACCES;
	return -1;
}

/* Hands out what came: the optional descriptors in the order sent. */
static void
segments_take(const int fds[SEGMENTS_MAX], unsigned char has, int *ctl_fd, int *live_fd,
    struct instance_extras *x)
{
	int n = 2, queue_fd, token_fd;

	*ctl_fd = fds[0];
	*live_fd = fds[1];
	queue_fd = has & HAS_QUEUE ? fds[n++] : -1;
	token_fd = has & HAS_TOKENS ? fds[n++] : -1;
	if (x != NULL) {
		x->queue_fd = queue_fd;
		x->token_fd = token_fd;
		return;
	}
	if (queue_fd >= 0)
		close(queue_fd);
	if (token_fd >= 0)
		close(token_fd);
}

int
instance_fetch(const char *state_file, uid_t service_uid, int *ctl_fd, int *live_fd,
    struct instance_extras *x, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	socklen_t len = name_addr(state_file, &sun);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), rc, saved;
	int fds[SEGMENTS_MAX] = { -1, -1, -1, -1 };
	unsigned char has = 0;
	struct timeval tv = { FETCH_TIMEOUT_MS / 1000, 0 };

	*ctl_fd = *live_fd = -1;
	if (x != NULL)
		x->queue_fd = x->token_fd = -1;
	if (fd < 0) {
		snprintf(err, errlen, "socket: %s", strerror(errno));
		return -1;
	}
	/* A full backlog (workers of a killed master hold the socket, and
	 * nobody answers) would make connect() wait for ever. */
	(void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
	if (connect(fd, (struct sockaddr *)&sun, len) < 0) {
		saved = errno;
		snprintf(err, errlen, "no smtpmuxd is running with state file %s", state_file);
		close(fd);
		errno = saved;
		return -1;
	}
	rc = fetch_from(fd, state_file, service_uid, fds, &has, err, errlen);
	saved = errno;
	close(fd);
	if (rc < 0) {
		for (int i = 0; i < SEGMENTS_MAX; i++)
			if (fds[i] >= 0)
				close(fds[i]);
		errno = saved;
		return -1;
	}
	segments_take(fds, has, ctl_fd, live_fd, x);
	return 0;
}
