/* SPDX-License-Identifier: MIT */
#include <check.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "selector_host.h"

/* Where the build put the selectors, the test plug-ins and the example. */
#define SEL_DIR BUILDDIR "/selectors"
#define TSEL_DIR BUILDDIR "/t/selectors"
#define EXAMPLE_DIR BUILDDIR "/contrib/selector-example"
#define DEFAULT_PATH SEL_DIR "::" TSEL_DIR ":" EXAMPLE_DIR

#define MAX_DS 8

static char err[512];

static void
setup(void)
{
	setenv("SMTPMUX_SELECTOR_PATH", DEFAULT_PATH, 1);
	err[0] = '\0';
}

static struct selector_inst *
load_p(const char *path, const char *dir,
    const struct smtpmux_selector_param *params, size_t n_params)
{
	struct selector_inst *sel;

	sel = selector_load(path, dir, params, n_params, NULL, err, sizeof(err));
	ck_assert_msg(sel != NULL, "%s: %s", path, err);
	return sel;
}

static struct selector_inst *
load(const char *path)
{
	return load_p(path, NULL, NULL, 0);
}

/* Loading must fail with exactly this message. */
static void
load_fails(const char *path, const char *dir,
    const struct smtpmux_selector_param *params, size_t n_params,
    const char *expect)
{
	char *resolved = (char *)"untouched";

	ck_assert_ptr_null(selector_load(path, dir, params, n_params, &resolved,
	    err, sizeof(err)));
	ck_assert_ptr_null(resolved);
	ck_assert_str_eq(err, expect);
}

static void
load_fails_prefix(const char *path, const char *dir, const char *expect_prefix)
{
	ck_assert_ptr_null(selector_load(path, dir, NULL, 0, NULL, err,
	    sizeof(err)));
	ck_assert_msg(strncmp(err, expect_prefix, strlen(expect_prefix)) == 0,
	    "'%s' does not start with '%s'", err, expect_prefix);
}

/* Loads path and checks which file it found. */
static void
resolves_to(const char *path, const char *dir, const char *expect_file,
    const char *expect_name)
{
	struct selector_inst *sel;
	char *resolved = NULL;

	sel = selector_load(path, dir, NULL, 0, &resolved, err, sizeof(err));
	ck_assert_msg(sel != NULL, "%s: %s", path, err);
	ck_assert_str_eq(resolved, expect_file);
	ck_assert_str_eq(selector_name(sel), expect_name);
	free(resolved);
	selector_free(sel);
}

static void
views(struct smtpmux_downstream_view *ds, size_t n)
{
	static const char *names[MAX_DS] = { "ds0", "ds1", "ds2", "ds3", "ds4",
	    "ds5", "ds6", "ds7" };
	size_t i;

	memset(ds, 0, n * sizeof(*ds));
	for (i = 0; i < n; i++) {
		ds[i].name = names[i];
		ds[i].addr = "127.0.0.1:25";
		ds[i].weight = 1;
		ds[i].quota_left = -1;
		ds[i].available = 1;
	}
}

static struct smtpmux_envelope
envelope(uint64_t sequence)
{
	static const char *const rcpts[] = { "bob@example.org" };
	struct smtpmux_envelope env = {
		.user = "app@example.net", .mail_from = "app@example.net",
		.rcpts = rcpts, .n_rcpts = 1, .size = 1000,
		.client_addr = "127.0.0.1", .sequence = sequence,
	};

	return env;
}

/* Runs the selector through the host for message seq; checks all are listed. */
static size_t
order_for(struct selector_inst *sel, const struct smtpmux_downstream_view *ds,
    size_t n, uint64_t seq, size_t *order)
{
	struct smtpmux_envelope env = envelope(seq);
	size_t k = selector_order(sel, &env, ds, n, order);

	ck_assert_uint_eq(k, n);
	return k;
}

static void
assert_order(const size_t *order, const size_t *expect, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		ck_assert_msg(order[i] == expect[i], "order[%zu] = %zu, want %zu",
		    i, order[i], expect[i]);
}

/* How often each downstream comes first over count messages from seq0. */
static void
count_firsts(struct selector_inst *sel,
    const struct smtpmux_downstream_view *ds, size_t n, uint64_t seq0,
    uint64_t count, uint64_t *firsts)
{
	size_t order[MAX_DS];
	uint64_t s;

	memset(firsts, 0, n * sizeof(*firsts));
	for (s = seq0; s < seq0 + count; s++) {
		order_for(sel, ds, n, s, order);
		firsts[order[0]]++;
	}
}

static void
assert_share(uint64_t got, uint64_t total, double want, double tolerance)
{
	double share = (double)got / (double)total;

	ck_assert_msg(share >= want - tolerance && share <= want + tolerance,
	    "share %.4f, want %.4f +- %.4f", share, want, tolerance);
}

/* --- loading and path resolution */

START_TEST(test_load_bundled)
{
	static const char *names[] = { "failover", "round_robin", "weighted",
	    "least_loaded", "quota" };
	char file[PATH_MAX];
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(file, sizeof(file), SEL_DIR "/%s.so", names[i]);
		resolves_to(names[i], NULL, file, names[i]);
	}
}
END_TEST

START_TEST(test_resolve_prototype_path)
{
	/* The prototype's config names "selectors/round_robin.so". */
	resolves_to("selectors/round_robin.so", "/nonexistent",
	    SEL_DIR "/round_robin.so", "round_robin");
	/* An env directory joined with the whole relative path. */
	setenv("SMTPMUX_SELECTOR_PATH", BUILDDIR, 1);
	resolves_to("selectors/weighted.so", NULL, SEL_DIR "/weighted.so",
	    "weighted");
	resolves_to("selectors/weighted", NULL, SEL_DIR "/weighted.so",
	    "weighted");
}
END_TEST

START_TEST(test_resolve_config_dir)
{
	unsetenv("SMTPMUX_SELECTOR_PATH");
	resolves_to("selectors/scripted.so", BUILDDIR "/t",
	    TSEL_DIR "/scripted.so", "scripted");
	resolves_to("scripted", TSEL_DIR, TSEL_DIR "/scripted.so", "scripted");
}
END_TEST

START_TEST(test_resolve_absolute)
{
	resolves_to(SEL_DIR "/failover.so", "/nonexistent",
	    SEL_DIR "/failover.so", "failover");
	resolves_to(SEL_DIR "/failover", NULL, SEL_DIR "/failover.so",
	    "failover");
}
END_TEST

/* config dir, then SMTPMUX_SELECTOR_PATH in its order, then PKGLIBDIR. */
START_TEST(test_resolve_precedence)
{
	char dir[] = "/tmp/check_selector.XXXXXX", link[PATH_MAX];

	ck_assert_ptr_nonnull(mkdtemp(dir));
	snprintf(link, sizeof(link), "%s/round_robin.so", dir);
	ck_assert_int_eq(symlink(TSEL_DIR "/scripted.so", link), 0);

	setenv("SMTPMUX_SELECTOR_PATH", SEL_DIR, 1);
	resolves_to("round_robin", dir, link, "scripted");
	resolves_to("round_robin", NULL, SEL_DIR "/round_robin.so",
	    "round_robin");
	setenv("SMTPMUX_SELECTOR_PATH", dir, 1);
	resolves_to("round_robin", SEL_DIR, SEL_DIR "/round_robin.so",
	    "round_robin");
	resolves_to("round_robin", NULL, link, "scripted");

	ck_assert_int_eq(unlink(link), 0);
	ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

START_TEST(test_not_found)
{
	setenv("SMTPMUX_SELECTOR_PATH", "/nonexistent/a::/nonexistent/b", 1);
	load_fails("nosuch", "/etc/nonexistent", NULL, 0,
	    "cannot load selector 'nosuch': not found in /etc/nonexistent, "
	    "/nonexistent/a, /nonexistent/b, " PKGLIBDIR);
	unsetenv("SMTPMUX_SELECTOR_PATH");
	load_fails("sub/nosuch.so", NULL, NULL, 0,
	    "cannot load selector 'sub/nosuch.so': not found in " PKGLIBDIR);
	load_fails("", NULL, NULL, 0, "selector path is empty");
}
END_TEST

START_TEST(test_not_loadable)
{
	/* dlopen() names the file and the reason. */
	load_fails_prefix("/nonexistent/x.so", NULL, "cannot load selector "
	    "'/nonexistent/x.so': /nonexistent/x.so: ");
	ck_assert_ptr_nonnull(strstr(err, "No such file"));
	load_fails_prefix("t/check_selector.c", SRCDIR, "cannot load selector "
	    "'t/check_selector.c': " SRCDIR "/t/check_selector.c: ");
}
END_TEST

START_TEST(test_bad_abi)
{
	load_fails("bad_abi", NULL, NULL, 0, "selector " TSEL_DIR
	    "/bad_abi.so: ABI version 999, this smtpmuxd supports 1");
}
END_TEST

START_TEST(test_no_symbol)
{
	load_fails("no_symbol.so", NULL, NULL, 0, "selector " TSEL_DIR
	    "/no_symbol.so: no symbol 'smtpmux_selector' (not an smtpmux "
	    "selector?)");
}
END_TEST

START_TEST(test_struct_too_small)
{
	char expect[256];

	snprintf(expect, sizeof(expect), "selector " TSEL_DIR "/incomplete.so: "
	    "struct_size 8, ABI version 1 needs at least %zu",
	    offsetof(struct smtpmux_selector, fini) + sizeof(void *));
	load_fails("incomplete", NULL, NULL, 0, expect);
}
END_TEST

START_TEST(test_init_fails)
{
	const struct smtpmux_selector_param fail[] = { { "fail", "no thanks" } };
	const struct smtpmux_selector_param bad[] = { { "order", "1,x" } };

	load_fails("scripted", NULL, fail, 1, "selector " TSEL_DIR
	    "/scripted.so: init failed: no thanks");
	load_fails("scripted", NULL, bad, 1, "selector " TSEL_DIR
	    "/scripted.so: init failed: bad order '1,x'");
}
END_TEST

START_TEST(test_unknown_param)
{
	static const char *names[] = { "failover", "round_robin", "weighted",
	    "least_loaded", "quota" };
	const struct smtpmux_selector_param p[] = { { "x", "1" } };
	char expect[PATH_MAX + 64];
	size_t i;

	for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
		snprintf(expect, sizeof(expect), "selector " SEL_DIR "/%s.so: "
		    "init failed: unknown parameter 'x'", names[i]);
		load_fails(names[i], NULL, p, 1, expect);
	}
}
END_TEST

START_TEST(test_quota_bad_param)
{
	static const char *bad[] = { "lots", "-1", "", "2147483648", "12x" };
	char expect[PATH_MAX + 128];
	struct smtpmux_selector_param p = { "unlimited_weight", NULL };
	size_t i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		p.value = bad[i];
		snprintf(expect, sizeof(expect), "selector " SEL_DIR "/quota.so: "
		    "init failed: unlimited_weight: expected 'max' or a whole "
		    "number up to 2147483647, got '%s'", bad[i]);
		load_fails("quota", NULL, &p, 1, expect);
	}
}
END_TEST

/* --- the host's policy on every selector's answer */

START_TEST(test_order_drops_bad_indices)
{
	const struct smtpmux_selector_param p[] = { { "order", "2,7,2,0" } };
	struct smtpmux_downstream_view ds[4];
	struct smtpmux_envelope env = envelope(0);
	struct selector_inst *sel = load_p("scripted", NULL, p, 1);
	size_t order[4], k;

	views(ds, 4);
	k = selector_order(sel, &env, ds, 4, order);
	ck_assert_uint_eq(k, 2);
	ck_assert_uint_eq(order[0], 2);
	ck_assert_uint_eq(order[1], 0);
	ck_assert_uint_eq(selector_order(sel, &env, ds, 0, order), 0);
	selector_free(sel);
}
END_TEST

START_TEST(test_order_demotes_unavailable)
{
	const struct smtpmux_selector_param p[] = { { "order", "3,0,1,2" } };
	const size_t expect[] = { 3, 1, 0, 2 };
	struct smtpmux_downstream_view ds[4];
	struct smtpmux_envelope env = envelope(0);
	struct selector_inst *sel = load_p("scripted", NULL, p, 1);
	size_t order[4];

	views(ds, 4);
	ds[0].available = 0;
	ds[0].state = SMTPMUX_DS_DOWN;
	ds[2].available = 0;
	ds[2].state = SMTPMUX_DS_THROTTLED;
	ck_assert_uint_eq(selector_order(sel, &env, ds, 4, order), 4);
	assert_order(order, expect, 4);
	selector_free(sel);
}
END_TEST

/* --- the bundled selectors */

START_TEST(test_failover)
{
	const size_t in_order[] = { 0, 1, 2 }, demoted[] = { 1, 2, 0 };
	struct smtpmux_downstream_view ds[3];
	struct selector_inst *sel = load("failover");
	size_t order[3];
	uint64_t s;

	views(ds, 3);
	for (s = 0; s < 5; s++) {
		order_for(sel, ds, 3, s, order);
		assert_order(order, in_order, 3);
	}
	ds[0].available = 0;
	order_for(sel, ds, 3, 0, order);
	assert_order(order, demoted, 3);
	selector_free(sel);
}
END_TEST

START_TEST(test_round_robin)
{
	struct smtpmux_downstream_view ds[3];
	struct selector_inst *sel = load("round_robin");
	size_t order[3], i;
	uint64_t s;

	views(ds, 3);
	for (s = 0; s < 9; s++) {
		order_for(sel, ds, 3, s, order);
		for (i = 0; i < 3; i++)
			ck_assert_uint_eq(order[i], (s + i) % 3);
	}
	selector_free(sel);
}
END_TEST

/* A dead downstream's turns are shared by the live ones, not given to its successor. */
START_TEST(test_round_robin_skips_unavailable)
{
	const size_t even[] = { 0, 2, 1 }, odd[] = { 2, 0, 1 };
	struct smtpmux_downstream_view ds[3];
	struct selector_inst *sel = load("round_robin");
	size_t order[3];
	uint64_t s;

	views(ds, 3);
	ds[1].available = 0;
	for (s = 100; s < 110; s++) {
		order_for(sel, ds, 3, s, order);
		assert_order(order, s % 2 == 0 ? even : odd, 3);
	}
	selector_free(sel);
}
END_TEST

START_TEST(test_weighted_exact)
{
	const size_t b_first[] = { 1, 0 };
	struct smtpmux_downstream_view ds[2];
	struct selector_inst *sel = load("weighted");
	uint64_t firsts[2], s;
	size_t order[2];
	const char *pattern = "AABA";

	views(ds, 2);
	ds[0].weight = 3;
	/* Smooth, as nginx: A A B A, not A A A B. */
	for (s = 0; s < 8; s++) {
		order_for(sel, ds, 2, s, order);
		ck_assert_uint_eq(order[0], (size_t)(pattern[s % 4] - 'A'));
	}
	order_for(sel, ds, 2, 2, order);
	assert_order(order, b_first, 2);
	/* Exact over any 400 consecutive messages. */
	count_firsts(sel, ds, 2, 12345, 400, firsts);
	ck_assert_uint_eq(firsts[0], 300);
	ck_assert_uint_eq(firsts[1], 100);
	/* Same schedule once reduced by the gcd. */
	ds[0].weight = 300;
	ds[1].weight = 100;
	count_firsts(sel, ds, 2, 7, 400, firsts);
	ck_assert_uint_eq(firsts[0], 300);
	ck_assert_uint_eq(firsts[1], 100);
	selector_free(sel);
}
END_TEST

START_TEST(test_weighted_mixes)
{
	struct smtpmux_downstream_view ds[4];
	struct selector_inst *sel = load("weighted");
	const size_t rest[] = { 2, 0, 3 };
	uint64_t firsts[4];
	size_t order[4], i;

	views(ds, 4);
	ds[0].weight = 2;
	ds[1].weight = 3;
	ds[2].weight = 5;
	ds[3].weight = 0;
	count_firsts(sel, ds, 4, 1, 1000, firsts);
	ck_assert_uint_eq(firsts[0], 200);
	ck_assert_uint_eq(firsts[1], 300);
	ck_assert_uint_eq(firsts[2], 500);
	ck_assert_uint_eq(firsts[3], 0);
	/* After the first: descending weight, weight 0 last. */
	for (i = 0; i < 10; i++) {
		order_for(sel, ds, 4, i, order);
		if (order[0] == 1)
			break;
	}
	assert_order(order + 1, rest, 3);

	/* Sums too big to replay: proportional over many messages. */
	ds[0].weight = 7001;
	ds[1].weight = 2999;
	ds[2].weight = 1;
	count_firsts(sel, ds, 3, 0, 100000, firsts);
	assert_share(firsts[0], 100000, 7001.0 / 10001, 0.005);
	assert_share(firsts[1], 100000, 2999.0 / 10001, 0.005);
	ck_assert_uint_le(firsts[2], 100000 / 10001 * 2);
	selector_free(sel);
}
END_TEST

/* Healthy downstreams keep their ratio when another one is down. */
START_TEST(test_weighted_unavailable)
{
	struct smtpmux_downstream_view ds[3];
	struct selector_inst *sel = load("weighted");
	uint64_t firsts[3];

	views(ds, 3);
	ds[0].weight = 3;
	ds[1].weight = 1;
	ds[2].weight = 4;
	ds[2].available = 0;
	count_firsts(sel, ds, 3, 0, 400, firsts);
	ck_assert_uint_eq(firsts[0], 300);
	ck_assert_uint_eq(firsts[1], 100);
	ck_assert_uint_eq(firsts[2], 0);
	/* None available: the weights decide alone. */
	ds[0].available = ds[1].available = 0;
	count_firsts(sel, ds, 3, 0, 800, firsts);
	ck_assert_uint_eq(firsts[0], 300);
	ck_assert_uint_eq(firsts[1], 100);
	ck_assert_uint_eq(firsts[2], 400);
	selector_free(sel);
}
END_TEST

START_TEST(test_least_loaded)
{
	const size_t by_load[] = { 3, 2, 1, 0 }, in_order[] = { 0, 1, 2, 3 };
	struct smtpmux_downstream_view ds[4];
	struct selector_inst *sel = load("least_loaded");
	size_t order[4];

	views(ds, 4);
	order_for(sel, ds, 4, 0, order);
	assert_order(order, in_order, 4);
	ds[0].in_flight = 3;
	ds[0].latency_ms = 10;
	ds[1].in_flight = 1;
	ds[1].latency_ms = 50;
	ds[2].in_flight = 1;
	ds[2].latency_ms = 20;
	ds[3].in_flight = 0;
	ds[3].latency_ms = 900;
	order_for(sel, ds, 4, 7, order);
	assert_order(order, by_load, 4);
	selector_free(sel);
}
END_TEST

static void
with_quota(struct smtpmux_downstream_view *v, int32_t left, uint32_t limit)
{
	v->quota_left = left;
	v->quota_limit = limit;
	v->available = left > 0;
}

START_TEST(test_quota_proportions)
{
	struct smtpmux_downstream_view ds[2];
	struct selector_inst *sel = load("quota");
	uint64_t firsts[2], s;
	size_t order[2];

	views(ds, 2);
	with_quota(&ds[0], 100, 500);
	with_quota(&ds[1], 400, 500);
	count_firsts(sel, ds, 2, 0, 10000, firsts);
	assert_share(firsts[0], 10000, 0.2, 0.01);
	/* Short runs are spread too: no long streaks. */
	count_firsts(sel, ds, 2, 5000, 50, firsts);
	assert_share(firsts[0], 50, 0.2, 0.06);
	/* The other follows. */
	for (s = 0; s < 20; s++) {
		order_for(sel, ds, 2, s, order);
		ck_assert_uint_eq(order[1], 1 - order[0]);
	}
	selector_free(sel);
}
END_TEST

START_TEST(test_quota_unlimited_and_exhausted)
{
	const struct smtpmux_selector_param zero[] = {
		{ "unlimited_weight", "0" } };
	const struct smtpmux_selector_param fixed[] = {
		{ "unlimited_weight", "100" } };
	struct smtpmux_downstream_view ds[4];
	struct selector_inst *sel = load("quota"), *sel0, *sel100;
	uint64_t firsts[4];
	size_t order[4];

	views(ds, 4);
	/* ds0 unlimited, ds1 100 left, ds2 300 left, ds3 spent. */
	with_quota(&ds[1], 100, 1000);
	with_quota(&ds[2], 300, 1000);
	with_quota(&ds[3], 0, 1000);
	/* Default: an unlimited downstream weighs as the roomiest plan. */
	count_firsts(sel, ds, 4, 0, 70000, firsts);
	assert_share(firsts[0], 70000, 3.0 / 7, 0.005);
	assert_share(firsts[1], 70000, 1.0 / 7, 0.005);
	assert_share(firsts[2], 70000, 3.0 / 7, 0.005);
	ck_assert_uint_eq(firsts[3], 0);

	/* Two users of one .so keep their own parameters. */
	sel0 = load_p("quota", NULL, zero, 1);
	sel100 = load_p("quota", NULL, fixed, 1);
	count_firsts(sel0, ds, 4, 0, 4000, firsts);
	ck_assert_uint_eq(firsts[0], 0);
	assert_share(firsts[1], 4000, 0.25, 0.01);
	order_for(sel0, ds, 4, 0, order);
	ck_assert_uint_eq(order[3], 3);
	count_firsts(sel100, ds, 4, 0, 50000, firsts);
	assert_share(firsts[0], 50000, 0.2, 0.005);
	assert_share(firsts[2], 50000, 0.6, 0.005);

	/* All quotas spent: the overflow takes the mail. */
	with_quota(&ds[1], 0, 1000);
	with_quota(&ds[2], 0, 1000);
	count_firsts(sel0, ds, 4, 0, 10, firsts);
	ck_assert_uint_eq(firsts[0], 10);
	selector_free(sel0);
	selector_free(sel100);
	selector_free(sel);
}
END_TEST

/* --- the documented example */

START_TEST(test_example_by_domain)
{
	static const char *const rcpts[] = { "Bob@Example.ORG", "x@b.com" };
	const size_t matched[] = { 1, 0, 2 }, in_order[] = { 0, 1, 2 };
	struct smtpmux_downstream_view ds[3];
	struct smtpmux_envelope env = envelope(0);
	struct selector_inst *sel = load("by_domain");
	size_t order[3];

	views(ds, 3);
	ds[0].name = "a.net";
	ds[1].name = "example.org";
	ds[2].name = "b.com";
	env.rcpts = rcpts;
	ck_assert_uint_eq(selector_order(sel, &env, ds, 3, order), 3);
	assert_order(order, matched, 3);
	env.n_rcpts = 0;
	ck_assert_uint_eq(selector_order(sel, &env, ds, 3, order), 3);
	assert_order(order, in_order, 3);
	selector_free(sel);
}
END_TEST

static char *
slurp(const char *file)
{
	FILE *fp = fopen(file, "r");
	char *buf;
	long len;

	ck_assert_msg(fp != NULL, "%s: %s", file, strerror(errno));
	ck_assert_int_eq(fseek(fp, 0, SEEK_END), 0);
	len = ftell(fp);
	rewind(fp);
	buf = calloc(1, (size_t)len + 1);
	ck_assert_ptr_nonnull(buf);
	ck_assert_uint_eq(fread(buf, 1, (size_t)len, fp), (size_t)len);
	fclose(fp);
	return buf;
}

/* Undoes the roff escapes the man page uses in its code examples. */
static void
roff_unescape(char *s)
{
	static const struct { const char *esc, *text; } map[] = {
		{ "\\-", "-" }, { "\\(aq", "'" }, { "\\(dq", "\"" }, { "\\e", "\\" },
		{ "\\&", "" }, { "\\(ti", "~" }, { "\\(ha", "^" },
	};
	char *out = s;
	size_t i, len;

	while (*s != '\0') {
		for (i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
			len = strlen(map[i].esc);
			if (strncmp(s, map[i].esc, len) == 0)
				break;
		}
		if (i == sizeof(map) / sizeof(map[0])) {
			*out++ = *s++;
			continue;
		}
		len = strlen(map[i].text);
		memcpy(out, map[i].text, len);
		out += len;
		s += strlen(map[i].esc);
	}
	*out = '\0';
}

/* The man page shows contrib/selector-example/by_domain.c verbatim. */
START_TEST(test_man_example_is_by_domain_c)
{
	const char *marker = ".\\\" example: contrib/selector-example/by_domain.c\n.EX\n";
	char *man = slurp(SRCDIR "/man/smtpmux-selector.3");
	char *code = slurp(SRCDIR "/contrib/selector-example/by_domain.c");
	char *start, *end;

	start = strstr(man, marker);
	ck_assert_msg(start != NULL, "example marker missing from the man page");
	start += strlen(marker);
	end = strstr(start, "\n.EE\n");
	ck_assert_ptr_nonnull(end);
	end[1] = '\0';
	roff_unescape(start);
	ck_assert_str_eq(start, code);
	free(man);
	free(code);
}
END_TEST

static Suite *
selector_suite(void)
{
	Suite *s = suite_create("selector");
	TCase *tc;

	tc = tcase_create("load");
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, test_load_bundled);
	tcase_add_test(tc, test_resolve_prototype_path);
	tcase_add_test(tc, test_resolve_config_dir);
	tcase_add_test(tc, test_resolve_absolute);
	tcase_add_test(tc, test_resolve_precedence);
	tcase_add_test(tc, test_not_found);
	tcase_add_test(tc, test_not_loadable);
	tcase_add_test(tc, test_bad_abi);
	tcase_add_test(tc, test_no_symbol);
	tcase_add_test(tc, test_struct_too_small);
	tcase_add_test(tc, test_init_fails);
	tcase_add_test(tc, test_unknown_param);
	tcase_add_test(tc, test_quota_bad_param);
	suite_add_tcase(s, tc);

	tc = tcase_create("order");
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, test_order_drops_bad_indices);
	tcase_add_test(tc, test_order_demotes_unavailable);
	suite_add_tcase(s, tc);

	tc = tcase_create("bundled");
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, test_failover);
	tcase_add_test(tc, test_round_robin);
	tcase_add_test(tc, test_round_robin_skips_unavailable);
	tcase_add_test(tc, test_weighted_exact);
	tcase_add_test(tc, test_weighted_mixes);
	tcase_add_test(tc, test_weighted_unavailable);
	tcase_add_test(tc, test_least_loaded);
	tcase_add_test(tc, test_quota_proportions);
	tcase_add_test(tc, test_quota_unlimited_and_exhausted);
	suite_add_tcase(s, tc);

	tc = tcase_create("example");
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, test_example_by_domain);
	tcase_add_test(tc, test_man_example_is_by_domain_c);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(selector_suite());
	int failed;

	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
