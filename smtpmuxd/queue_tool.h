/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_QUEUE_TOOL_H
#define SMTPMUXD_QUEUE_TOOL_H

#include <stdbool.h>

/*
 * `smtpmuxd -s queue|flush|delete|hold|release`: the queue, seen and
 * handled through the spool folder itself, so it works whether or not the
 * daemon runs. Requests that the queue runner must carry out (flush,
 * delete) are files in ctl/ that it takes at once through inotify; the
 * tool waits until it has. Without a running runner, delete removes the
 * files itself and flush is left for the runner's start.
 */

/* Known -s commands other than status; *needs_arg: 1 required, 0 optional,
 * -1 none. */
bool queue_tool_known(const char *cmd, int *needs_arg);

/* Runs cmd (arg: an id, "all" for delete, or NULL) against the queue of
 * the configuration at config_path. Returns the exit status. */
int queue_tool_run(const char *config_path, const char *cmd, const char *arg);

#endif
