/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_HASHPW_H
#define SMTPMUXD_HASHPW_H

/*
 * smtpmuxd -H: reads a password (from the terminal without echo, asked
 * twice; or the first line of a pipe) and prints its yescrypt hash for a
 * user's `password:` or `password_file:`. Returns an exit status.
 */
int hashpw_run(void);

#endif
