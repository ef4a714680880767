/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_PRIVDROP_H
#define SMTPMUXD_PRIVDROP_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "config.h"

/*
 * Dropping root in the processes that talk to the network. The master
 * resolves the account once per configuration (so a bad `user:` fails the
 * start or the reload, not every worker); each child applies it right
 * after fork.
 */
struct privdrop {
	bool enabled;                    /* started as root and workers must drop */
	uid_t uid;
	gid_t gid;
	char user[64];                   /* for logs */
	char group[64];
	bool core_dumps;                 /* -D: children may dump core (the master never) */
};

/*
 * Decides what the children will run as: user_override (-u) or
 * cfg->run_user, and cfg->run_group or the user's primary group. As
 * non-root nothing is dropped. Refuses root unless cfg->run_as_root.
 * Returns 0, or -1 with one line in err.
 */
int privdrop_prepare(struct privdrop *pd, const struct config *cfg,
    const char *user_override, char *err, size_t errlen);

/*
 * In a child after fork: drops supplementary groups, sets gid and uid,
 * and checks that root cannot be regained. A child is as undumpable as the
 * master (harden_master) unless core_dumps, when it becomes dumpable again
 * so that a crash can be debugged. Returns 0, or -1 (logged): the child
 * must then exit.
 */
int privdrop_apply(const struct privdrop *pd);

/* Warns when the configuration file is readable by other users while it
 * holds passwords (rather than naming password_file / pass_file). */
void privdrop_check_config_mode(const struct config *cfg);

#endif
