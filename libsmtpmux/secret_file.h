/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SECRET_FILE_H
#define SMTPMUX_SECRET_FILE_H

#include <stddef.h>

/*
 * Secrets kept outside the configuration (`password_file:`, `pass_file:`),
 * so that the configuration itself can be world-readable. A relative name
 * is taken from $CREDENTIALS_DIRECTORY when it is set (systemd's
 * LoadCredential=), else from the configuration's folder. The file holds
 * the secret on one line; one trailing newline (LF or CR LF) is dropped.
 */

/* The longest secret: what SASL PLAIN and LOGIN can carry (AUTH_FIELD_MAX). */
#define SECRET_MAX 255

/*
 * Reads the secret named name into a new string (wipe and free it). NULL
 * with the reason in why: the file is missing or unreadable, empty, longer
 * than SECRET_MAX, or holds more than one line or a NUL.
 */
char *secret_file_read(const char *name, const char *config_dir, char *why, size_t whylen);

#endif
