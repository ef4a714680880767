/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_INSTANCE_H
#define SMTPMUXD_INSTANCE_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#include "health.h"

/*
 * One daemon per state file, and the way to its live state.
 *
 * The master binds a listening Unix socket in the abstract namespace named
 * after the state file's path ("@smtpmuxd:/run/smtpmux/smtpmuxd.state").
 * As long as that socket is open - in the master, or in workers still
 * finishing after their master was killed, which inherit it - no second
 * daemon can bind it, whatever happened to the state file itself: the lock
 * does not depend on any path existing. `smtpmuxd -s status` connects to it
 * and is handed read-only descriptors of the shared segments (the health
 * segments, and the queue figures and the OAuth token status when there
 * are some).
 *
 * Who may connect is checked by credentials (SO_PEERCRED, SO_PEERGROUPS),
 * since an abstract socket has no file mode: root, the daemon's own user,
 * the workers' user, and members of the workers' group. The client checks
 * in turn that the socket belongs to root, to itself or to the configured
 * `user:`, and maps nothing it did not check (health_attach).
 */

struct instance;

/* Who may read the live state (besides root): the master's euid, the
 * workers' uid and their group. */
struct instance_access {
	uid_t self_uid;
	uid_t service_uid;
	gid_t service_gid;
};

/* The optional segments, besides the health ones: a read-only descriptor
 * each, or -1 when the daemon has none. */
struct instance_extras {
	int queue_fd;                    /* the queue figures (queue_stats.h) */
	int token_fd;                    /* the OAuth token status (token_table.h) */
};

/*
 * Master: claims state_file for this process. NULL with a message in err
 * ("state file ... is in use by ...") when another process holds it, or on
 * error.
 */
struct instance *instance_claim(const char *state_file, char *err, size_t errlen);
/* The socket to poll for readers (POLLIN). */
int instance_fd(const struct instance *);
/* Answers the readers that are waiting, without blocking; x (or NULL):
 * the optional segments to hand over too. */
void instance_serve(struct instance *, const struct health *h,
    const struct instance_extras *x, const struct instance_access *access);
void instance_close(struct instance *);

/*
 * `-s status`: descriptors of the segments of the daemon that holds
 * state_file (*x, when x is not NULL: the optional ones; else they are
 * closed); service_uid is the configured `user:`'s (or (uid_t)-1).
 * Returns 0, or -1 with a message in err and errno: ECONNREFUSED (no
 * daemon), EACCES (refused, or the socket is not smtpmuxd's), ETIMEDOUT,
 * EPROTO (an answer of another version).
 */
int instance_fetch(const char *state_file, uid_t service_uid, int *ctl_fd, int *live_fd,
    struct instance_extras *x, char *err, size_t errlen);

/* The abstract socket name for state_file, NUL first, and its length;
 * exposed for the tests. */
size_t instance_name(const char *state_file, char *name, size_t size);

#endif
