/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SECRET_FILE_H
#define SMTPMUX_SECRET_FILE_H

#include <stddef.h>

/*
 * Secrets kept outside the configuration (`password_file:`, `pass_file:`,
 * and an OAuth downstream's `client_secret_file:` and `refresh_token_file:`),
 * so that the configuration itself can be world-readable. The file holds
 * the secret on one line; one trailing newline (LF or CR LF) is dropped.
 * These calls block on the disk: the master and the token helper use
 * them, never a worker.
 */

/* The longest secret: what SASL PLAIN and LOGIN can carry (AUTH_FIELD_MAX). */
#define SECRET_MAX 255

/*
 * Reads the secret named name into a new string (wipe and free it). A
 * relative name is taken from $CREDENTIALS_DIRECTORY when it is set
 * (systemd's LoadCredential=), else from the configuration's folder. NULL
 * with the reason in why: the file is missing or unreadable, empty, longer
 * than SECRET_MAX, or holds more than one line or a NUL.
 */
char *secret_file_read(const char *name, const char *config_dir, char *why, size_t whylen);

/* The same for a file already named by its path, holding at most max octets
 * (an OAuth refresh token is longer than a password). */
char *secret_file_read_path(const char *path, size_t max, char *why, size_t whylen);

/*
 * Replaces path with value and a line end, atomically: a new file in the
 * same folder, mode 0600, written and synced, renamed over path, and the
 * folder synced; a crash leaves the old file or the new one. Returns 0, or
 * -1 with why (the folder must be writable by the process).
 */
int secret_file_replace(const char *path, const char *value, char *why, size_t whylen);

#endif
