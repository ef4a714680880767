/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_HARDEN_H
#define SMTPMUXD_HARDEN_H

#include <stdbool.h>

/*
 * What the daemon does to itself before it reads a secret. The master
 * holds every password of the configuration and every TLS key; whatever
 * it inherited or leaves behind is a way to them.
 */

/*
 * Closes every file descriptor inherited from whoever started the daemon
 * (a leaky shell, an init script, a supervisor), except standard input,
 * output and error, and the sockets systemd passes this very process
 * (LISTEN_PID, LISTEN_FDS), so none of them reaches a worker.
 */
void harden_close_inherited(void);

/*
 * The master: not dumpable (no core file, and no ptrace or /proc/PID/mem
 * access for processes of the same user, such as a compromised worker of a
 * daemon that does not run as root), and RLIMIT_CORE set to 0 so that
 * neither it nor its children write a core, unless allow_core (-D). Returns
 * 0, or -1 with errno.
 */
int harden_master(bool allow_core);

#endif
