/* SPDX-License-Identifier: MIT */
/*
 * The pure matchers behind `clients:` (netmask.c) and `allowed_senders:`
 * (sender_match.c).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "netmask.h"
#include "sender_match.h"

/* ---- networks ---- */

static struct netmask
net(const char *text)
{
	struct netmask m;
	char why[160] = "";

	ck_assert_msg(netmask_parse(text, &m, why, sizeof(why)) == 0, "%s: %s", text, why);
	return m;
}

static struct netmask
host(const char *text)
{
	struct netmask m;

	ck_assert_msg(netmask_parse_addr(text, &m) == 0, "%s", text);
	return m;
}

static bool
contains(const char *network, const char *addr)
{
	struct netmask n = net(network), a = host(addr);

	return netmask_contains(&n, &a);
}

static long
best(const struct netmask *nets, size_t n, const char *addr)
{
	struct netmask a = host(addr);

	return netmask_best(nets, n, &a);
}

static bool
everything(const char *network)
{
	struct netmask n = net(network);

	return netmask_is_everything(&n);
}

START_TEST(test_netmask_parse)
{
	struct netmask m = net("192.168.1.0/24");

	ck_assert_int_eq(m.family, AF_INET);
	ck_assert_uint_eq(m.prefix, 24);
	ck_assert(memcmp(m.addr, "\xc0\xa8\x01\x00", 4) == 0);
	m = net("10.1.2.3");
	ck_assert_uint_eq(m.prefix, 32);
	m = net("2001:db8::/32");
	ck_assert_int_eq(m.family, AF_INET6);
	ck_assert_uint_eq(m.prefix, 32);
	m = net("::1");
	ck_assert_uint_eq(m.prefix, 128);
	/* A mapped IPv4 network is the IPv4 network. */
	m = net("::ffff:192.168.0.0/112");
	ck_assert_int_eq(m.family, AF_INET);
	ck_assert_uint_eq(m.prefix, 16);
	{
		struct netmask a = net("2001:db8::/32"), b = net("2001:0DB8:0::/32"),
		    c = net("2001:db8::/33");

		ck_assert(netmask_equal(&a, &b));
		ck_assert(!netmask_equal(&a, &c));
	}
	ck_assert(everything("0.0.0.0/0"));
	ck_assert(everything("::/0"));
	ck_assert(everything("::ffff:0.0.0.0/96"));
	ck_assert(!everything("0.0.0.0/1"));
}
END_TEST

START_TEST(test_netmask_bad)
{
	static const struct { const char *text, *why; } cases[] = {
		{ "192.168.1.0/33", "bad prefix length \"33\" (0-32)" },
		{ "2001:db8::/129", "bad prefix length \"129\" (0-128)" },
		{ "192.168.1.0/", "bad prefix length \"\" (0-32)" },
		{ "192.168.1.0/+8", "bad prefix length \"+8\" (0-32)" },
		{ "192.168.1.0/ 8", "bad prefix length \" 8\" (0-32)" },
		{ "192.168.1.0/0x8", "bad prefix length \"0x8\" (0-32)" },
		{ "192.168.1.0/24/8", "bad prefix length \"24/8\" (0-32)" },
		{ "192.168.1/24", "\"192.168.1\" is not a numeric IPv4 or IPv6 address" },
		{ "lan/24", "\"lan\" is not a numeric IPv4 or IPv6 address" },
		{ "", "\"\" is not a numeric IPv4 or IPv6 address" },
		{ "/8", "\"\" is not a numeric IPv4 or IPv6 address" },
		{ "192.168.1.1/24", "host bits set after /24 (the network address, with the "
		  "last bits zero, is expected)" },
		{ "2001:db8::1/64", "host bits set after /64 (the network address, with the "
		  "last bits zero, is expected)" },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		struct netmask m;
		char why[160] = "";

		ck_assert_msg(netmask_parse(cases[i].text, &m, why, sizeof(why)) == -1, "%s",
		    cases[i].text);
		ck_assert_str_eq(why, cases[i].why);
	}
	{
		struct netmask m;

		ck_assert_int_eq(netmask_parse_addr("192.168.1.0/24", &m), -1);
		ck_assert_int_eq(netmask_parse_addr("", &m), -1);
	}
}
END_TEST

START_TEST(test_netmask_contains)
{
	ck_assert(contains("192.168.1.0/24", "192.168.1.0"));
	ck_assert(contains("192.168.1.0/24", "192.168.1.255"));
	ck_assert(!contains("192.168.1.0/24", "192.168.2.1"));
	ck_assert(!contains("192.168.1.0/24", "192.168.0.255"));
	/* Prefixes that do not end on an octet. */
	ck_assert(contains("10.0.0.0/9", "10.127.255.255"));
	ck_assert(!contains("10.0.0.0/9", "10.128.0.0"));
	ck_assert(contains("2001:db8:1::/48", "2001:db8:1:ffff::1"));
	ck_assert(!contains("2001:db8:1::/48", "2001:db8:2::1"));
	ck_assert(contains("192.0.2.25", "192.0.2.25"));
	ck_assert(!contains("192.0.2.25", "192.0.2.26"));
	ck_assert(contains("::1", "::1"));
	/* A dual-stack listener reports IPv4 clients as mapped addresses. */
	ck_assert(contains("192.168.1.0/24", "::ffff:192.168.1.9"));
	/* Families never mix. */
	ck_assert(!contains("2001:db8:1::/48", "192.168.1.9"));
	ck_assert(!contains("::/1", "10.0.0.1"));
}
END_TEST

/* The most specific network wins, whatever the order of the list. */
START_TEST(test_netmask_best)
{
	struct netmask nets[] = {
		net("10.0.0.0/8"), net("10.1.0.0/16"), net("10.1.2.0/24"), net("10.1.2.3"),
		net("fd00::/8"), net("fd00:1::/32"),
	};
	size_t n = sizeof(nets) / sizeof(nets[0]);
	struct netmask rev[sizeof(nets) / sizeof(nets[0])];

	for (size_t i = 0; i < n; i++)
		rev[i] = nets[n - 1 - i];
	ck_assert_int_eq(best(nets, n, "10.9.9.9"), 0);
	ck_assert_int_eq(best(nets, n, "10.1.9.9"), 1);
	ck_assert_int_eq(best(nets, n, "10.1.2.9"), 2);
	ck_assert_int_eq(best(nets, n, "10.1.2.3"), 3);
	ck_assert_int_eq(best(rev, n, "10.1.2.3"), 2);
	ck_assert_int_eq(best(rev, n, "10.1.9.9"), 4);
	ck_assert_int_eq(best(nets, n, "fd00:1::5"), 5);
	ck_assert_int_eq(best(nets, n, "fd00:2::5"), 4);
	ck_assert_int_eq(best(nets, n, "11.0.0.1"), -1);
	ck_assert_int_eq(best(nets, 0, "10.0.0.1"), -1);
}
END_TEST

/* ---- sender patterns ---- */

START_TEST(test_sender_pattern_check)
{
	static const char *const good[] = {
		"alerts@example.org", "*@example.org", "*@*.example.org", "<>",
		"\"odd local\"@example.org", "*@[192.0.2.1]",
	};
	static const struct { const char *pattern, *why; } bad[] = {
		{ "alerts*@example.org", "\"*\" is only allowed as the whole local part "
		  "(\"*@example.org\") or before the domain (\"*@*.example.org\")" },
		{ "*@ex*.org", "\"*\" is only allowed as the whole local part "
		  "(\"*@example.org\") or before the domain (\"*@*.example.org\")" },
		{ "*", "\"*\" is only allowed as the whole local part "
		  "(\"*@example.org\") or before the domain (\"*@*.example.org\")" },
		{ "*@", "bad domain \"\"" },
		{ "*@*.", "bad domain \"\"" },
		{ "*@exa mple.org", "bad domain \"exa mple.org\"" },
		{ "example.org", "\"example.org\" is not an address, \"*@domain\", "
		  "\"*@*.domain\" or \"<>\"" },
		{ "@example.org", "\"@example.org\" is not an address, \"*@domain\", "
		  "\"*@*.domain\" or \"<>\"" },
		{ "a@b@example.org", "\"a@b@example.org\" is not an address, \"*@domain\", "
		  "\"*@*.domain\" or \"<>\"" },
		{ "<a@example.org>", "\"<a@example.org>\" is not an address, \"*@domain\", "
		  "\"*@*.domain\" or \"<>\"" },
	};

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		char why[200] = "";

		ck_assert_msg(sender_pattern_check(good[i], why, sizeof(why)) == 0, "%s: %s",
		    good[i], why);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		char why[200] = "";

		ck_assert_msg(sender_pattern_check(bad[i].pattern, why, sizeof(why)) == -1, "%s",
		    bad[i].pattern);
		ck_assert_str_eq(why, bad[i].why);
	}
}
END_TEST

START_TEST(test_sender_pattern_match)
{
	static const struct { const char *pattern, *path; bool match; } cases[] = {
		{ "alerts@example.org", "alerts@example.org", true },
		{ "alerts@example.org", "ALERTS@Example.ORG", true },
		{ "alerts@example.org", "alerts@example.org.evil.example", false },
		{ "alerts@example.org", "xalerts@example.org", false },
		{ "alerts@example.org", "", false },
		{ "*@example.org", "anyone@example.org", true },
		{ "*@example.org", "\"quoted @ local\"@example.org", true },
		{ "*@example.org", "anyone@EXAMPLE.org", true },
		{ "*@example.org", "anyone@sub.example.org", false },
		{ "*@example.org", "anyone@badexample.org", false },
		{ "*@example.org", "\"x@example.org\"@evil.example", false },
		{ "*@example.org", "", false },
		{ "*@*.example.org", "a@sub.example.org", true },
		{ "*@*.example.org", "a@deep.sub.Example.org", true },
		{ "*@*.example.org", "a@example.org", false },
		{ "*@*.example.org", "a@badexample.org", false },
		{ "*@*.example.org", "a@.example.org", false },
		{ "<>", "", true },
		{ "<>", "a@example.org", false },
	};

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ck_assert_msg(sender_pattern_match(cases[i].pattern, cases[i].path) == cases[i].match,
		    "%s ~ <%s>", cases[i].pattern, cases[i].path);
}
END_TEST

START_TEST(test_sender_allowed)
{
	char *list[] = { (char *)"*@example.com", (char *)"alerts@example.org" };

	/* No list: any sender, the null sender too. */
	ck_assert(sender_allowed(NULL, 0, "anyone@anywhere.example"));
	ck_assert(sender_allowed(NULL, 0, ""));
	ck_assert(sender_allowed(list, 2, "x@example.com"));
	ck_assert(sender_allowed(list, 2, "alerts@example.org"));
	ck_assert(!sender_allowed(list, 2, "ceo@example.org"));
	/* A list means exactly what it says: <> only when listed. */
	ck_assert(!sender_allowed(list, 2, ""));
}
END_TEST

static Suite *
policy_suite(void)
{
	Suite *s = suite_create("policy");
	TCase *tc = tcase_create("matchers");

	tcase_add_test(tc, test_netmask_parse);
	tcase_add_test(tc, test_netmask_bad);
	tcase_add_test(tc, test_netmask_contains);
	tcase_add_test(tc, test_netmask_best);
	tcase_add_test(tc, test_sender_pattern_check);
	tcase_add_test(tc, test_sender_pattern_match);
	tcase_add_test(tc, test_sender_allowed);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(policy_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
