/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_T_FREED_WATCH_H
#define SMTPMUX_T_FREED_WATCH_H

#include <stddef.h>

/*
 * Watches every block libevent frees for a secret, to show that buffers
 * which held AUTH data are wiped before their memory goes back to malloc.
 * freed_watch_install() must run before libevent allocates anything (at
 * the top of main); it installs libevent memory functions that only look.
 */
void freed_watch_install(void);

/* Starts counting the freed blocks that contain secret (copied; NULL stops). */
void freed_watch_secret(const char *secret);

/* How many freed blocks held the secret since freed_watch_secret(). */
unsigned freed_watch_hits(void);

#endif
