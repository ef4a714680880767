/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_NETMASK_H
#define SMTPMUX_NETMASK_H

#include <stdbool.h>
#include <stddef.h>

/*
 * IPv4 and IPv6 networks in CIDR notation, and the most specific one that
 * contains a client address (the `clients:` section). Pure functions.
 *
 * IPv4-mapped IPv6 addresses ("::ffff:192.0.2.1", what a dual-stack
 * listener reports for an IPv4 client) are taken as the IPv4 address they
 * carry, and so is a mapped network ("::ffff:192.0.2.0/120"), so that one
 * `clients:` entry covers a client however the socket saw it.
 */

struct netmask {
	int family;                      /* AF_INET or AF_INET6 */
	unsigned char addr[16];          /* network address, host bits zero */
	unsigned prefix;                 /* 0-32 or 0-128 */
};

/*
 * Parses "ADDR/PREFIX" or a bare "ADDR" (one host). Refuses host bits set
 * ("192.168.1.7/24": which one was meant?) and a prefix out of range.
 * Returns 0, or -1 with the reason in why.
 */
int netmask_parse(const char *text, struct netmask *out, char *why, size_t whylen);

/* Parses a numeric client address (no prefix) as a /32 or /128. */
int netmask_parse_addr(const char *text, struct netmask *out);

/* True when the network covers every address of its family (/0). */
bool netmask_is_everything(const struct netmask *net);

bool netmask_equal(const struct netmask *a, const struct netmask *b);

/* True when net contains the host addr (a /32 or /128). */
bool netmask_contains(const struct netmask *net, const struct netmask *addr);

/*
 * The index of the most specific network (longest prefix) among
 * nets[0..n) that contains addr, or -1 when none does.
 */
long netmask_best(const struct netmask *nets, size_t n, const struct netmask *addr);

#endif
