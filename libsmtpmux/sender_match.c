/* SPDX-License-Identifier: MIT */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "sender_match.h"
#include "smtp_parse.h"

#define NULL_SENDER "<>"
#define ANY_LOCAL "*@"
#define ANY_SUBDOMAIN "*."

/* The domain of a path: after its last '@' (a quoted local part may hold
 * one, a domain never does). NULL for the null sender. */
static const char *
domain_of(const char *path)
{
	const char *at = strrchr(path, '@');

	return at != NULL ? at + 1 : NULL;
}

/* A pattern's domain part must make "x@DOMAIN" a valid mailbox. */
static int
check_domain(const char *domain, char *why, size_t whylen)
{
	char probe[SMTP_PATH_MAX + 3];
	int n = snprintf(probe, sizeof(probe), "x@%s", domain);

	if (n < 0 || (size_t)n >= sizeof(probe) || !smtp_mailbox_valid(probe, (size_t)n)) {
		snprintf(why, whylen, "bad domain \"%.64s\"", domain);
		return -1;
	}
	return 0;
}

static int
misplaced_star(char *why, size_t whylen)
{
	snprintf(why, whylen, "\"*\" is only allowed as the whole local part "
	    "(\"*@example.org\") or before the domain (\"*@*.example.org\")");
	return -1;
}

int
sender_pattern_check(const char *pattern, char *why, size_t whylen)
{
	const char *domain;

	if (strcmp(pattern, NULL_SENDER) == 0)
		return 0;
	if (strncmp(pattern, ANY_LOCAL, 2) == 0) {
		domain = pattern + 2;
		if (strncmp(domain, ANY_SUBDOMAIN, 2) == 0)
			domain += 2;
		if (strchr(domain, '*') != NULL)
			return misplaced_star(why, whylen);
		return check_domain(domain, why, whylen);
	}
	if (strchr(pattern, '*') != NULL)
		return misplaced_star(why, whylen);
	if (!smtp_mailbox_valid(pattern, strlen(pattern))) {
		snprintf(why, whylen, "\"%.64s\" is not an address, \"*@domain\", "
		    "\"*@*.domain\" or \"<>\"", pattern);
		return -1;
	}
	return 0;
}

/* "sub.example.org" is under "example.org"; "badexample.org" is not. */
static bool
is_subdomain(const char *domain, const char *parent)
{
	size_t dl = strlen(domain), pl = strlen(parent);

	return dl > pl + 1 && domain[dl - pl - 1] == '.' &&
	    strcasecmp(domain + dl - pl, parent) == 0;
}

bool
sender_pattern_match(const char *pattern, const char *path)
{
	const char *domain = domain_of(path);

	if (strcmp(pattern, NULL_SENDER) == 0)
		return path[0] == '\0';
	if (domain == NULL)
		return false;
	if (strncmp(pattern, ANY_LOCAL ANY_SUBDOMAIN, 4) == 0)
		return is_subdomain(domain, pattern + 4);
	if (strncmp(pattern, ANY_LOCAL, 2) == 0)
		return strcasecmp(domain, pattern + 2) == 0;
	return strcasecmp(path, pattern) == 0;
}

bool
sender_allowed(char *const *patterns, size_t n, const char *path)
{
	if (n == 0)
		return true;
	for (size_t i = 0; i < n; i++)
		if (sender_pattern_match(patterns[i], path))
			return true;
	return false;
}
