/* SPDX-License-Identifier: MIT */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "netmask.h"

#define V4_MAPPED_PREFIX 96

static const unsigned char v4_mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

static unsigned
family_bits(int family)
{
	return family == AF_INET ? 32 : 128;
}

/* "::ffff:a.b.c.d/N" (N >= 96) is the IPv4 network a.b.c.d/(N-96). */
static void
unmap_v4(struct netmask *m)
{
	if (m->family != AF_INET6 || m->prefix < V4_MAPPED_PREFIX ||
	    memcmp(m->addr, v4_mapped, sizeof(v4_mapped)) != 0)
		return;
	memmove(m->addr, m->addr + 12, 4);
	memset(m->addr + 4, 0, 12);
	m->family = AF_INET;
	m->prefix -= V4_MAPPED_PREFIX;
}

static int
parse_host(const char *text, size_t len, struct netmask *out)
{
	char buf[INET6_ADDRSTRLEN + 1];

	if (len == 0 || len >= sizeof(buf))
		return -1;
	memcpy(buf, text, len);
	buf[len] = '\0';
	memset(out, 0, sizeof(*out));
	if (inet_pton(AF_INET, buf, out->addr) == 1)
		out->family = AF_INET;
	else if (inet_pton(AF_INET6, buf, out->addr) == 1)
		out->family = AF_INET6;
	else
		return -1;
	out->prefix = family_bits(out->family);
	return 0;
}

/* Digits only: strtoul would take "+8", " 8" or "0x8". */
static int
parse_prefix(const char *s, unsigned max, unsigned *out)
{
	unsigned long v = 0;

	if (*s == '\0' || strlen(s) > 3)
		return -1;
	for (const char *p = s; *p != '\0'; p++) {
		if (*p < '0' || *p > '9')
			return -1;
		v = v * 10 + (unsigned long)(*p - '0');
	}
	if (v > max)
		return -1;
	*out = (unsigned)v;
	return 0;
}

static bool
host_bits_zero(const struct netmask *m)
{
	unsigned bits = family_bits(m->family);

	for (unsigned i = m->prefix; i < bits; i++)
		if (m->addr[i / 8] & (0x80u >> (i % 8)))
			return false;
	return true;
}

int
netmask_parse(const char *text, struct netmask *out, char *why, size_t whylen)
{
	const char *slash = strchr(text, '/');
	size_t hlen = slash != NULL ? (size_t)(slash - text) : strlen(text);

	if (parse_host(text, hlen, out) == -1) {
		snprintf(why, whylen, "\"%.*s\" is not a numeric IPv4 or IPv6 address",
		    (int)(hlen > 64 ? 64 : hlen), text);
		return -1;
	}
	if (slash != NULL && parse_prefix(slash + 1, family_bits(out->family), &out->prefix) == -1) {
		snprintf(why, whylen, "bad prefix length \"%.8s\" (0-%u)", slash + 1,
		    family_bits(out->family));
		return -1;
	}
	if (!host_bits_zero(out)) {
		snprintf(why, whylen, "host bits set after /%u (the network address, "
		    "with the last bits zero, is expected)", out->prefix);
		return -1;
	}
	unmap_v4(out);
	return 0;
}

int
netmask_parse_addr(const char *text, struct netmask *out)
{
	if (parse_host(text, strlen(text), out) == -1)
		return -1;
	unmap_v4(out);
	return 0;
}

bool
netmask_is_everything(const struct netmask *net)
{
	return net->prefix == 0;
}

bool
netmask_equal(const struct netmask *a, const struct netmask *b)
{
	return a->family == b->family && a->prefix == b->prefix &&
	    memcmp(a->addr, b->addr, sizeof(a->addr)) == 0;
}

bool
netmask_contains(const struct netmask *net, const struct netmask *addr)
{
	unsigned whole = net->prefix / 8, rest = net->prefix % 8;

	if (net->family != addr->family)
		return false;
	if (memcmp(net->addr, addr->addr, whole) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((net->addr[whole] ^ addr->addr[whole]) & (0xffu << (8 - rest)) & 0xffu) == 0;
}

long
netmask_best(const struct netmask *nets, size_t n, const struct netmask *addr)
{
	long best = -1;

	for (size_t i = 0; i < n; i++)
		if (netmask_contains(&nets[i], addr) &&
		    (best < 0 || nets[i].prefix > nets[best].prefix))
			best = (long)i;
	return best;
}
