/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_LOG_H
#define SMTPMUX_LOG_H

#include <sys/types.h>

/*
 * One line per event. In the foreground lines go to stderr with a
 * timestamp; detached, to syslog with the mail facility; with a log file
 * configured, to that file (reopened on SIGUSR1 for logrotate).
 * Callers write Postfix-like key=value text and never passwords or bodies.
 */

enum log_level { LOG_LEVEL_ERR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

enum log_target { LOG_TO_STDERR, LOG_TO_SYSLOG, LOG_TO_FILE };

/* ident is the syslog identity and the stderr prefix ("smtpmuxd"). */
int log_open(const char *ident, enum log_target target, const char *file);
/* Reopens the log file after rotation; a no-op for stderr and syslog. The
 * file is never opened through a symlink, and must be a regular file. */
int log_reopen(void);
/* Hands the open log file to uid (workers reopen it once they dropped
 * root), through its descriptor; refused (EPERM) for a file with more than
 * one link. A no-op without a log file. */
int log_chown(uid_t uid);
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Tags the following lines with the process role, e.g. "worker[3]". */
void log_set_role(const char *role);
void log_close(void);

void log_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Routes libevent's internal warnings into the log. */
void log_hook_libevent(void);

/*
 * Copies src into dst (size dstlen) for logging: control characters and
 * non-ASCII bytes become '?', so a client cannot forge log lines.
 */
const char *log_sanitize(char *dst, size_t dstlen, const char *src, size_t srclen);

#endif
