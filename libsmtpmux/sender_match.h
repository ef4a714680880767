/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SENDER_MATCH_H
#define SMTPMUX_SENDER_MATCH_H

#include <stdbool.h>
#include <stddef.h>

/*
 * `allowed_senders:` patterns, checked against the MAIL FROM path of an
 * application. Pure functions. A pattern is one of
 *
 *   alerts@example.org    exactly this address
 *   *@example.org         any local part at example.org (not subdomains)
 *   *@*.example.org       any local part at any subdomain of example.org
 *   <>                    the null sender (bounces); never implied
 *
 * Matching ignores case in the local part as well as in the domain: an
 * allow-list must not be bypassed by "Alerts@" where "alerts@" is listed,
 * and no provider hands out two mailboxes that differ only in case.
 */

/* Returns 0 when pattern is well formed, else -1 with the reason in why. */
int sender_pattern_check(const char *pattern, char *why, size_t whylen);

/* path as the parser gives it: without <>, "" for the null sender. */
bool sender_pattern_match(const char *pattern, const char *path);

/* True when any of patterns[0..n) matches; n == 0 means "no list": any. */
bool sender_allowed(char *const *patterns, size_t n, const char *path);

#endif
