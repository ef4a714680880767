/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "self_pid.h"

/*
 * Logging is process-wide by nature (syslog itself is), so its small state
 * lives here rather than in every context struct.
 *
 * The pid in every line comes from self_pid()'s cache, not a getpid() per
 * line. syslog's LOG_PID would ask the kernel on every line, so the syslog
 * identity carries the pid itself, "smtpmuxd[PID]" - byte for byte what
 * LOG_PID writes - and is renewed by the first line after a fork.
 */
static struct {
	enum log_target target;
	enum log_level level;
	char ident[32];
	char role[32];
	char *file;
	FILE *fp;
	pid_t ident_pid;                 /* the pid in syslog_ident; 0: not opened */
	char syslog_ident[48];           /* "ident[pid]"; openlog keeps the pointer */
	time_t stamp_sec;                /* the second stamp[] was formatted for */
	char stamp[32];
	/* "ident[pid]: role: ", built when the pid or the role changed; 0 in
	 * prefix_pid: to be built. */
	pid_t prefix_pid;
	size_t prefix_len;
	char prefix[96];
} log_state = { .target = LOG_TO_STDERR, .level = LOG_LEVEL_INFO, .ident = "smtpmuxd" };

/* The pid for this line; a syslog identity of another process is renewed. */
static pid_t
log_pid(void)
{
	pid_t pid = self_pid();

	if (log_state.target == LOG_TO_SYSLOG && pid != log_state.ident_pid) {
		snprintf(log_state.syslog_ident, sizeof(log_state.syslog_ident), "%s[%ld]",
		    log_state.ident, (long)pid);
		closelog();
		openlog(log_state.syslog_ident, LOG_NDELAY, LOG_MAIL);
		log_state.ident_pid = pid;
	}
	return pid;
}

int
log_open(const char *ident, enum log_target target, const char *file)
{
	snprintf(log_state.ident, sizeof(log_state.ident), "%s", ident);
	log_state.prefix_pid = 0;
	log_state.target = target;
	log_state.ident_pid = 0;
	if (target == LOG_TO_SYSLOG)
		log_pid();                   /* opens the log as "ident[pid]" */
	if (target == LOG_TO_FILE) {
		free(log_state.file);
		log_state.file = strdup(file);
		if (log_state.file == NULL)
			return -1;
		return log_reopen();
	}
	return 0;
}

#define LOG_OPEN_FLAGS (O_WRONLY | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK)

int
log_reopen(void)
{
	struct stat st;
	FILE *fp;
	int fd;

	if (log_state.target != LOG_TO_FILE)
		return 0;
	/* Mail logs name people: never world-readable. A file created here is
	 * 0660 whatever the umask: it is handed to the workers' user
	 * (log_chown), and a master restarted without CAP_DAC_OVERRIDE (the
	 * systemd unit) must still open it, through its group. Never through
	 * a symlink, never a FIFO or a device: whoever can write the folder
	 * (the workers' user, say) must not choose what root appends to or
	 * hands over (log_chown). */
	fd = open(log_state.file, LOG_OPEN_FLAGS | O_CREAT | O_EXCL, 0660);
	if (fd >= 0)
		(void)fchmod(fd, 0660);
	else if (errno == EEXIST)
		fd = open(log_state.file, LOG_OPEN_FLAGS);
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		errno = EINVAL;
		return -1;
	}
	fp = fdopen(fd, "a");
	if (fp == NULL) {
		close(fd);
		return -1;
	}
	setvbuf(fp, NULL, _IOLBF, 0);
	if (log_state.fp != NULL)
		fclose(log_state.fp);
	log_state.fp = fp;
	return 0;
}

int
log_chown(uid_t uid)
{
	struct stat st;
	int fd;

	if (log_state.target != LOG_TO_FILE || log_state.fp == NULL)
		return 0;
	fd = fileno(log_state.fp);
	if (fstat(fd, &st) < 0)
		return -1;
	/* A second link may be another file's name (/etc/shadow, hard-linked
	 * into the log folder): only a file that is nothing else is given. */
	if (!S_ISREG(st.st_mode) || st.st_nlink != 1) {
		errno = EPERM;
		return -1;
	}
	return st.st_uid == uid ? 0 : fchown(fd, uid, (gid_t)-1);
}

void
log_set_level(enum log_level level)
{
	log_state.level = level;
}

enum log_level
log_get_level(void)
{
	return log_state.level;
}

void
log_set_role(const char *role)
{
	snprintf(log_state.role, sizeof(log_state.role), "%s", role);
	log_state.prefix_pid = 0;
}

void
log_close(void)
{
	if (log_state.target == LOG_TO_SYSLOG)
		closelog();
	if (log_state.fp != NULL)
		fclose(log_state.fp);
	log_state.fp = NULL;
	free(log_state.file);
	log_state.file = NULL;
}

/* The line's prefix after the time stamp; formatted again only after a
 * fork or a change of identity or role. */
static const char *
log_prefix(size_t *len)
{
	pid_t pid = log_pid();

	if (pid != log_state.prefix_pid) {
		int n = snprintf(log_state.prefix, sizeof(log_state.prefix), "%s[%ld]: %s%s",
		    log_state.ident, (long)pid, log_state.role, log_state.role[0] ? ": " : "");

		log_state.prefix_len = n < 0 ? 0 : (size_t)n < sizeof(log_state.prefix) ?
		    (size_t)n : sizeof(log_state.prefix) - 1;
		log_state.prefix_pid = pid;
	}
	*len = log_state.prefix_len;
	return log_state.prefix;
}

/* "YYYY-mm-ddTHH:MM:SS.mmm " into p (LOG_STAMP_LEN octets, no NUL). */
#define LOG_STAMP_LEN 24

static void
log_stamp(char *p)
{
	struct timespec ts;
	struct tm tm;
	long ms;

	clock_gettime(CLOCK_REALTIME, &ts);
	/* A busy worker logs many lines a second: one strftime per second. */
	if (ts.tv_sec != log_state.stamp_sec || log_state.stamp[0] == '\0') {
		localtime_r(&ts.tv_sec, &tm);
		if (strftime(log_state.stamp, sizeof(log_state.stamp), "%Y-%m-%dT%H:%M:%S",
		    &tm) != LOG_STAMP_LEN - 5)
			snprintf(log_state.stamp, sizeof(log_state.stamp), "%019lld",
			    (long long)ts.tv_sec);
		log_state.stamp_sec = ts.tv_sec;
	}
	ms = ts.tv_nsec / 1000000L;
	memcpy(p, log_state.stamp, LOG_STAMP_LEN - 5);
	p[LOG_STAMP_LEN - 5] = '.';
	p[LOG_STAMP_LEN - 4] = (char)('0' + ms / 100);
	p[LOG_STAMP_LEN - 3] = (char)('0' + ms / 10 % 10);
	p[LOG_STAMP_LEN - 2] = (char)('0' + ms % 10);
	p[LOG_STAMP_LEN - 1] = ' ';
}

/* The text of a line: what the caller formatted, cut as before at 2047. */
#define LOG_MSG_MAX 2048

static void __attribute__((format(printf, 2, 0)))
log_vwrite(enum log_level level, const char *fmt, va_list ap)
{
	static const int prio[] = { LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG };
	static const char *const tag[] = { "error: ", "warning: ", "", "debug: " };
	char line[LOG_STAMP_LEN + sizeof(log_state.prefix) + 16 + LOG_MSG_MAX];
	const char *prefix;
	size_t len, n;
	FILE *out;
	int saved = errno, m;

	if (level > log_state.level)
		return;
	if (log_state.target == LOG_TO_SYSLOG) {
		char msg[LOG_MSG_MAX];

		vsnprintf(msg, sizeof(msg), fmt, ap);
		log_pid();                   /* after a fork: the child's identity */
		syslog(prio[level], "%s%s%s%s", log_state.role,
		    log_state.role[0] ? ": " : "", tag[level], msg);
		errno = saved;
		return;
	}
	out = log_state.target == LOG_TO_FILE && log_state.fp ? log_state.fp : stderr;
	/* The line is put together in one buffer and handed over in one call:
	 * the caller's format is the only one parsed. */
	log_stamp(line);
	len = LOG_STAMP_LEN;
	prefix = log_prefix(&n);
	memcpy(line + len, prefix, n);
	len += n;
	n = strlen(tag[level]);
	memcpy(line + len, tag[level], n);
	len += n;
	m = vsnprintf(line + len, LOG_MSG_MAX, fmt, ap);
	if (m > 0)
		len += (size_t)m < LOG_MSG_MAX ? (size_t)m : LOG_MSG_MAX - 1;
	line[len++] = '\n';
	fwrite(line, 1, len, out);
	errno = saved;
}

#define LOG_FN(name, level)                                    \
	void name(const char *fmt, ...)                        \
	{                                                      \
		va_list ap;                                    \
		va_start(ap, fmt);                             \
		log_vwrite(level, fmt, ap);                    \
		va_end(ap);                                    \
	}
LOG_FN(log_err, LOG_LEVEL_ERR)
LOG_FN(log_warn, LOG_LEVEL_WARN)
LOG_FN(log_info, LOG_LEVEL_INFO)
LOG_FN(log_debug, LOG_LEVEL_DEBUG)

static void
log_libevent_cb(int severity, const char *msg)
{
	if (severity >= EVENT_LOG_WARN)
		log_warn("libevent: %s", msg);
	else
		log_debug("libevent: %s", msg);
}

void
log_hook_libevent(void)
{
	event_set_log_callback(log_libevent_cb);
}

const char *
log_sanitize(char *dst, size_t dstlen, const char *src, size_t srclen)
{
	size_t i;

	if (dstlen == 0)
		return dst;
	for (i = 0; i < srclen && i + 1 < dstlen; i++) {
		unsigned char c = (unsigned char)src[i];
		dst[i] = (c < 0x20 || c >= 0x7f) ? '?' : (char)c;
	}
	dst[i] = '\0';
	return dst;
}
