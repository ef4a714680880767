/* SPDX-License-Identifier: MIT */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "queue_sched.h"
#include "fd_write.h"
#include "spool_int.h"

/*
 * Every operation goes through folder descriptors opened once, with
 * O_NOFOLLOW on each name: the spool belongs to the unprivileged workers'
 * user, and the tools (root) must not be led elsewhere by a symlink
 * planted there.
 */

#define READ_FIRST (64 * 1024)           /* most headers fit; more is read if not */
#define STATE_MAX (64 * 1024)
#define LOCK_NAME "runner.lock"
#define STATE_SUFFIX ".state"
#define PUBLISH_TRIES 8

static const char *const sub_names[SPOOL_NSUB] = {
	"tmp", "msg", "hold", "ctl", "corrupt", "free"
};

const char *
spool_sub_name(enum spool_sub s)
{
	return (unsigned)s < SPOOL_NSUB ? sub_names[s] : "?";
}

static int
open_dir_at(int at, const char *name)
{
	return openat(at, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | O_NOFOLLOW);
}

struct spool *
spool_open(const char *dir, char *err, size_t errlen)
{
	struct spool *sp = calloc(1, sizeof(*sp));
	int i;

	if (sp == NULL || (sp->path = strdup(dir)) == NULL) {
		snprintf(err, errlen, "queue.dir %s: out of memory", dir);
		free(sp);
		return NULL;
	}
	for (i = 0; i < SPOOL_NSUB; i++)
		sp->fd[i] = -1;
	if ((sp->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0) {
		snprintf(err, errlen, "queue.dir %s: %s", dir, strerror(errno));
		spool_close(sp);
		return NULL;
	}
	for (i = 0; i < SPOOL_NSUB; i++) {
		if ((sp->fd[i] = open_dir_at(sp->dirfd, sub_names[i])) < 0) {
			snprintf(err, errlen, "queue.dir %s/%s: %s", dir, sub_names[i], strerror(errno));
			spool_close(sp);
			return NULL;
		}
	}
	return sp;
}

void
spool_close(struct spool *sp)
{
	if (sp == NULL)
		return;
	for (int i = 0; i < SPOOL_NSUB; i++)
		if (sp->fd[i] >= 0)
			close(sp->fd[i]);
	if (sp->dirfd >= 0)
		close(sp->dirfd);
	free(sp->path);
	free(sp);
}

const char *
spool_path(const struct spool *sp)
{
	return sp->path;
}

/* --- preparing the folder (master) */

static int
mkdir_parents(const char *dir, char *err, size_t errlen)
{
	char path[4096];
	char *p;

	if ((size_t)snprintf(path, sizeof(path), "%s", dir) >= sizeof(path)) {
		snprintf(err, errlen, "queue.dir: path too long");
		return -1;
	}
	for (p = path + 1; (p = strchr(p, '/')) != NULL; p++) {
		*p = '\0';
		if (mkdir(path, 0755) < 0 && errno != EEXIST) {
			snprintf(err, errlen, "queue.dir: cannot create %s: %s", path, strerror(errno));
			return -1;
		}
		*p = '/';
	}
	return 0;
}

/* One folder, 0750, owned as asked; an existing one is taken in hand. */
static int
prepare_one(int at, const char *name, const char *shown, bool set_owner, uid_t uid,
    gid_t gid, char *err, size_t errlen)
{
	struct stat st;
	int fd;

	if (mkdirat(at, name, 0750) < 0 && errno != EEXIST)
		goto fail;
	if ((fd = open_dir_at(at, name)) < 0)
		goto fail;
	if (fstat(fd, &st) < 0 || (set_owner && (st.st_uid != uid || st.st_gid != gid) &&
	    fchown(fd, uid, gid) < 0) || ((st.st_mode & 07777) != 0750 && fchmod(fd, 0750) < 0)) {
		close(fd);
		goto fail;
	}
	return fd;
fail:
	snprintf(err, errlen, "queue.dir %s: %s%s", shown,
	    errno == ELOOP || errno == ENOTDIR ? "not a folder (symlink?): " : "",
	    strerror(errno));
	return -1;
}

/*
 * A folder the workers' user already owns, 0750, is left alone by a master
 * that may not look inside it (under systemd it runs without
 * CAP_DAC_OVERRIDE): the children create the subfolders as that user.
 */
static bool
already_given(const char *dir, uid_t uid, gid_t gid)
{
	struct stat st;

	return lstat(dir, &st) == 0 && S_ISDIR(st.st_mode) && st.st_uid == uid &&
	    st.st_gid == gid && (st.st_mode & 07777) == 0750;
}

int
spool_prepare(const char *dir, bool set_owner, uid_t uid, gid_t gid, char *err, size_t errlen)
{
	char shown[4200];
	int top, fd;

	if (dir[0] != '/') {
		snprintf(err, errlen, "queue.dir %s: not an absolute path", dir);
		return -1;
	}
	if (mkdir_parents(dir, err, errlen) < 0)
		return -1;
	if (mkdir(dir, 0750) < 0 && errno != EEXIST) {
		snprintf(err, errlen, "queue.dir %s: %s", dir, strerror(errno));
		return -1;
	}
	if (set_owner && already_given(dir, uid, gid))
		return 0;
	if ((top = prepare_one(AT_FDCWD, dir, dir, set_owner, uid, gid, err, errlen)) < 0)
		return -1;
	for (int i = 0; i < SPOOL_NSUB; i++) {
		snprintf(shown, sizeof(shown), "%s/%s", dir, sub_names[i]);
		if ((fd = prepare_one(top, sub_names[i], shown, set_owner, uid, gid, err,
		    errlen)) < 0) {
			close(top);
			return -1;
		}
		close(fd);
	}
	close(top);
	return 0;
}

/* --- committing */

/* Opens (creating) dir/name and locks it; -1 (errno) if either fails. */
static int
open_locked(int dir, const char *name, int flags, bool unlink_on_failure)
{
	int fd = openat(dir, name, flags | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
	int saved;

	if (fd < 0)
		return -1;
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		saved = errno;
		close(fd);
		if (unlink_on_failure)
			unlinkat(dir, name, 0);
		errno = saved;
		return -1;
	}
	return fd;
}

int
spool_tmp_create(struct spool *sp, const char *name)
{
	int fd = spool_reuse_take(sp, name);

	/* The lock says "being written" to spool_clean_tmp(). */
	return fd >= 0 ? fd : open_locked(sp->fd[SPOOL_TMP], name, O_WRONLY | O_EXCL, true);
}

void
spool_new_id(char id[SPOOL_ID_LEN + 1], uint64_t *rng)
{
	snprintf(id, SPOOL_ID_LEN + 1, "%012llX",
	    (unsigned long long)(queue_rand64(rng) & 0xffffffffffffULL));
}

/* The kernel's RENAME_NOREPLACE, or link() and unlink() where the
 * filesystem lacks it. */
int
spool_rename_noreplace(int from_dir, const char *from, int to_dir, const char *to)
{
	if (renameat2(from_dir, from, to_dir, to, RENAME_NOREPLACE) == 0)
		return 0;
	if (errno != EINVAL && errno != ENOSYS)
		return -1;
	if (linkat(from_dir, from, to_dir, to, 0) < 0)
		return -1;
	unlinkat(from_dir, from, 0);
	return 0;
}

int
spool_publish(struct spool *sp, const char *tmpname, char id[SPOOL_ID_LEN + 1], uint64_t *rng)
{
	for (int i = 0; i < PUBLISH_TRIES; i++) {
		if (spool_rename_noreplace(sp->fd[SPOOL_TMP], tmpname, sp->fd[SPOOL_MSG], id) == 0)
			return 0;
		if (errno != EEXIST)
			return -1;
		spool_new_id(id, rng);
	}
	errno = EEXIST;
	return -1;
}

void
spool_unpublish(struct spool *sp, const char *id)
{
	unlinkat(sp->fd[SPOOL_MSG], id, 0);
}

void
spool_tmp_remove(struct spool *sp, const char *name)
{
	unlinkat(sp->fd[SPOOL_TMP], name, 0);
}

int
spool_sync(struct spool *sp)
{
	return fsync(sp->fd[SPOOL_MSG]);
}

/* --- reading */

static ssize_t
read_at_most(int fd, char *buf, size_t len, off_t off)
{
	size_t got = 0;
	ssize_t n;

	while (got < len) {
		n = pread(fd, buf + got, len - got, off + (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/* Reads and parses the header; a header longer than READ_FIRST is read again
 * whole (up to SPOOL_HEADER_MAX). */
static int
read_header(int fd, off_t file_size, struct spool_env *env, size_t *header_len,
    char *err, size_t errlen)
{
	size_t want = file_size < READ_FIRST ? (size_t)file_size : READ_FIRST;
	char *buf;
	ssize_t n;
	int rc;

	for (;;) {
		if ((buf = malloc(want + 1)) == NULL) {
			snprintf(err, errlen, "out of memory");
			errno = ENOMEM;
			return -1;
		}
		if ((n = read_at_most(fd, buf, want, 0)) < 0) {
			snprintf(err, errlen, "read: %s", strerror(errno));
			free(buf);
			return -1;
		}
		rc = spool_parse_message(buf, (size_t)n, env, header_len, err, errlen);
		free(buf);
		if (rc == 0 || (size_t)n < want || want >= SPOOL_HEADER_MAX ||
		    (off_t)want >= file_size)
			break;
		want = file_size < SPOOL_HEADER_MAX ? (size_t)file_size : SPOOL_HEADER_MAX;
	}
	if (rc < 0)
		errno = EINVAL;
	return rc;
}

static void
read_state(struct spool *sp, const char *id, struct spool_env *env, bool *state_err)
{
	char name[SPOOL_ID_LEN + sizeof(STATE_SUFFIX)], err[160];
	char *buf;
	ssize_t n;
	int fd;

	*state_err = false;
	snprintf(name, sizeof(name), "%s" STATE_SUFFIX, id);
	fd = openat(sp->fd[SPOOL_MSG], name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		*state_err = errno != ENOENT;
		return;
	}
	if ((buf = malloc(STATE_MAX)) == NULL || (n = read_at_most(fd, buf, STATE_MAX, 0)) < 0 ||
	    spool_parse_state(buf, (size_t)n, env, err, sizeof(err)) < 0)
		*state_err = true;
	free(buf);
	close(fd);
}

int
spool_read(struct spool *sp, const char *id, struct spool_env *env, size_t *header_len,
    bool *state_err, char *err, size_t errlen)
{
	struct stat st;
	int fd, saved;

	*state_err = false;
	fd = openat(sp->fd[SPOOL_MSG], id, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		snprintf(err, errlen, "open: %s", strerror(errno));
		return -1;
	}
	if (fstat(fd, &st) < 0) {
		snprintf(err, errlen, "stat: %s", strerror(errno));
		goto fail;
	}
	if (!S_ISREG(st.st_mode)) {
		snprintf(err, errlen, "not a regular file");
		errno = EINVAL;
		goto fail;
	}
	if (read_header(fd, st.st_size, env, header_len, err, errlen) < 0)
		goto fail;
	if ((uint64_t)st.st_size != *header_len + env->size) {
		snprintf(err, errlen, "%lld octets of body, the header says %llu",
		    (long long)(st.st_size - (off_t)*header_len), (unsigned long long)env->size);
		spool_env_clear(env);
		errno = EINVAL;
		goto fail;
	}
	read_state(sp, id, env, state_err);
	return fd;
fail:
	saved = errno;
	close(fd);
	errno = saved;
	return -1;
}

int
spool_each_entry(struct spool *sp, enum spool_sub sub, void (*fn)(const char *name, void *arg),
    void *arg)
{
	int fd = openat(sp->fd[sub], ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	struct dirent *de;
	DIR *d;

	if (fd < 0)
		return -1;
	if ((d = fdopendir(fd)) == NULL) {
		close(fd);
		return -1;
	}
	while ((de = readdir(d)) != NULL)
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
			fn(de->d_name, arg);
	closedir(d);
	return 0;
}

static bool
is_state_name(const char *name)
{
	return strlen(name) == SPOOL_ID_LEN + strlen(STATE_SUFFIX) &&
	    spool_id_valid(name, SPOOL_ID_LEN) &&
	    strcmp(name + SPOOL_ID_LEN, STATE_SUFFIX) == 0;
}

struct scan_ctx {
	void (*fn)(const char *name, bool bad, void *arg);
	void *arg;
};

static void
scan_one(const char *name, void *arg)
{
	struct scan_ctx *sc = arg;

	if (spool_id_valid(name, strlen(name)))
		sc->fn(name, false, sc->arg);
	else if (!is_state_name(name))
		sc->fn(name, true, sc->arg);
}

int
spool_scan(struct spool *sp, void (*fn)(const char *name, bool bad, void *arg), void *arg)
{
	struct scan_ctx sc = { fn, arg };

	return spool_each_entry(sp, SPOOL_MSG, scan_one, &sc);
}

/* --- the runner's updates */

/*
 * Not fsync()ed: a state lost to a power cut only brings the message back
 * sooner, with fewer attempts counted; never lost or doubled.
 */
int
spool_write_state(struct spool *sp, const char *id, const struct spool_env *env)
{
	char tmp[SPOOL_ID_LEN + 16], name[SPOOL_ID_LEN + sizeof(STATE_SUFFIX)];
	char *text;
	size_t len;
	int fd, rc, saved;

	if (spool_format_state(env, &text, &len) < 0)
		return -1;
	snprintf(tmp, sizeof(tmp), "%s" STATE_SUFFIX ".tmp", id);
	snprintf(name, sizeof(name), "%s" STATE_SUFFIX, id);
	fd = openat(sp->fd[SPOOL_TMP], tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
	    0600);
	if (fd < 0) {
		free(text);
		return -1;
	}
	rc = fd_write_all(fd, text, len);
	saved = errno;
	free(text);
	if (close(fd) < 0 && rc == 0) {
		rc = -1;
		saved = errno;
	}
	if (rc == 0 && renameat(sp->fd[SPOOL_TMP], tmp, sp->fd[SPOOL_MSG], name) < 0) {
		rc = -1;
		saved = errno;
	}
	if (rc < 0) {
		unlinkat(sp->fd[SPOOL_TMP], tmp, 0);
		errno = saved;
	}
	return rc;
}

void
spool_remove_marks(struct spool *sp, const char *id)
{
	char name[SPOOL_ID_LEN + sizeof(STATE_SUFFIX)];

	snprintf(name, sizeof(name), "%s" STATE_SUFFIX, id);
	unlinkat(sp->fd[SPOOL_MSG], name, 0);
	unlinkat(sp->fd[SPOOL_HOLD], id, 0);
}

int
spool_remove(struct spool *sp, const char *id)
{
	int rc = unlinkat(sp->fd[SPOOL_MSG], id, 0), saved = errno;

	spool_remove_marks(sp, id);
	errno = saved;
	return rc;
}

int
spool_move_aside(struct spool *sp, const char *name)
{
	char state[300], dest[320];

	/* A stamp keeps an earlier file of the same name that was moved aside. */
	snprintf(dest, sizeof(dest), "%.250s.%lld", name, (long long)time(NULL));
	if (renameat(sp->fd[SPOOL_MSG], name, sp->fd[SPOOL_CORRUPT], dest) < 0)
		return -1;
	if (spool_id_valid(name, strlen(name))) {
		snprintf(state, sizeof(state), "%s" STATE_SUFFIX, name);
		snprintf(dest, sizeof(dest), "%s" STATE_SUFFIX ".%lld", name, (long long)time(NULL));
		renameat(sp->fd[SPOOL_MSG], state, sp->fd[SPOOL_CORRUPT], dest);
	}
	return 0;
}

struct clean_ctx {
	struct spool *sp;
	time_t now;
	unsigned min_age;
	unsigned removed;
};

static void
clean_tmp_one(const char *name, void *arg)
{
	struct clean_ctx *cc = arg;
	int dir = cc->sp->fd[SPOOL_TMP], fd;
	struct stat st;

	if (fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
	    cc->now - st.st_mtime < (time_t)cc->min_age)
		return;
	if (!S_ISREG(st.st_mode)) {
		if (unlinkat(dir, name, 0) == 0)
			cc->removed++;
		return;
	}
	fd = openat(dir, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	if (fd < 0)
		return;
	/* Locked: its writer is still at work. */
	if (flock(fd, LOCK_EX | LOCK_NB) == 0 && unlinkat(dir, name, 0) == 0)
		cc->removed++;
	close(fd);
}

unsigned
spool_clean_tmp(struct spool *sp, time_t now, unsigned min_age)
{
	struct clean_ctx cc = { sp, now, min_age, 0 };

	spool_each_entry(sp, SPOOL_TMP, clean_tmp_one, &cc);
	return cc.removed;
}

static void
clean_state_one(const char *name, void *arg)
{
	struct clean_ctx *cc = arg;
	char id[SPOOL_ID_LEN + 1];
	struct stat st;

	if (!is_state_name(name))
		return;
	snprintf(id, sizeof(id), "%.*s", SPOOL_ID_LEN, name);
	if (fstatat(cc->sp->fd[SPOOL_MSG], id, &st, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT &&
	    unlinkat(cc->sp->fd[SPOOL_MSG], name, 0) == 0)
		cc->removed++;
}

unsigned
spool_clean_states(struct spool *sp)
{
	struct clean_ctx cc = { sp, 0, 0, 0 };

	spool_each_entry(sp, SPOOL_MSG, clean_state_one, &cc);
	return cc.removed;
}

/* --- hold marks and requests */

bool
spool_is_held(struct spool *sp, const char *id)
{
	struct stat st;

	return fstatat(sp->fd[SPOOL_HOLD], id, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

static int
touch(int dir, const char *name)
{
	int fd = openat(dir, name, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);

	if (fd < 0)
		return -1;
	close(fd);
	return 0;
}

int
spool_set_held(struct spool *sp, const char *id, bool held)
{
	if (held)
		return touch(sp->fd[SPOOL_HOLD], id);
	if (unlinkat(sp->fd[SPOOL_HOLD], id, 0) < 0 && errno != ENOENT)
		return -1;
	return 0;
}

static int
request_name(char *buf, size_t len, const char *verb, const char *target)
{
	if ((strcmp(verb, "flush") != 0 && strcmp(verb, "delete") != 0) ||
	    (strcmp(target, "all") != 0 && !spool_id_valid(target, strlen(target)))) {
		errno = EINVAL;
		return -1;
	}
	snprintf(buf, len, "%s.%s", verb, target);
	return 0;
}

int
spool_request(struct spool *sp, const char *verb, const char *target)
{
	char name[64];

	if (request_name(name, sizeof(name), verb, target) < 0)
		return -1;
	return touch(sp->fd[SPOOL_CTL], name);
}

bool
spool_request_pending(struct spool *sp, const char *verb, const char *target)
{
	char name[64];
	struct stat st;

	return request_name(name, sizeof(name), verb, target) == 0 &&
	    fstatat(sp->fd[SPOOL_CTL], name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

struct take_ctx {
	struct spool *sp;
	void (*fn)(const char *verb, const char *target, void *arg);
	void *arg;
};

static void
take_one(const char *name, void *arg)
{
	struct take_ctx *tc = arg;
	const char *dot = strchr(name, '.');
	char verb[16], check[64];

	if (dot != NULL && (size_t)(dot - name) < sizeof(verb)) {
		snprintf(verb, sizeof(verb), "%.*s", (int)(dot - name), name);
		if (request_name(check, sizeof(check), verb, dot + 1) == 0)
			tc->fn(verb, dot + 1, tc->arg);
	}
	/* Taken, or garbage: either way it is gone. */
	unlinkat(tc->sp->fd[SPOOL_CTL], name, 0);
}

void
spool_take_requests(struct spool *sp,
    void (*fn)(const char *verb, const char *target, void *arg), void *arg)
{
	struct take_ctx tc = { sp, fn, arg };

	spool_each_entry(sp, SPOOL_CTL, take_one, &tc);
}

int
spool_lock_runner(struct spool *sp)
{
	return open_locked(sp->dirfd, LOCK_NAME, O_RDWR, false);
}

bool
spool_runner_active(struct spool *sp)
{
	int fd = openat(sp->dirfd, LOCK_NAME, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	bool active;

	if (fd < 0)
		return false;
	active = flock(fd, LOCK_SH | LOCK_NB) < 0 && errno == EWOULDBLOCK;
	close(fd);
	return active;
}
