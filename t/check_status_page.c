/* SPDX-License-Identifier: MIT */
/*
 * The status page (status_page_render) as a pure function of a snapshot
 * made by hand: what it shows, how it escapes, when it shows the queue.
 * t/integration/test_status_page.py renders the served page in Chromium.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>

#include "status_page.h"

#define NOW ((time_t)1795000000)        /* 2026-11-18 ... UTC */

static struct status_downstream *
ds_set(struct status_downstream *d, const char *name, const char *addr, uint32_t state)
{
	memset(d, 0, sizeof(*d));
	snprintf(d->name, sizeof(d->name), "%s", name);
	snprintf(d->hs.addr, sizeof(d->hs.addr), "%s", addr);
	d->hs.view.state = state;
	return d;
}

/* The page as a NUL-terminated string; free() it. */
static char *
render(const struct status_snapshot *s)
{
	struct evbuffer *buf = evbuffer_new();
	size_t len;
	char *page;

	ck_assert_int_eq(status_page_render(buf, s), 0);
	len = evbuffer_get_length(buf);
	page = malloc(len + 1);
	evbuffer_remove(buf, page, len);
	page[len] = '\0';
	evbuffer_free(buf);
	return page;
}

#define ck_has(page, text) ck_assert_msg(strstr(page, text) != NULL, "missing: %s", text)
#define ck_lacks(page, text) ck_assert_msg(strstr(page, text) == NULL, "present: %s", text)
/* first occurs in page, and before second */
#define ck_before(page, first, second) \
	ck_assert_msg(strstr(page, first) != NULL && strstr(page, second) != NULL && \
	    strstr(page, first) < strstr(page, second), "%s not before %s", first, second)

/* The text of the element whose opening tag contains marker, up to '<'. */
static char *
text_after(const char *page, const char *marker, char *out, size_t len)
{
	const char *p = strstr(page, marker), *end;

	ck_assert_msg(p != NULL, "no %s", marker);
	p = strchr(p, '>') + 1;
	end = strchr(p, '<');
	snprintf(out, len, "%.*s", (int)(end - p), p);
	return out;
}

START_TEST(test_empty_page_is_self_contained)
{
	struct status_snapshot s = { .now = NOW, .hostname = "relay.test" };
	char *page = render(&s);

	ck_assert_msg(strncmp(page, "<!DOCTYPE html>\n<html lang=\"en\">", 32) == 0, "%s", page);
	ck_has(page, "<meta http-equiv=\"refresh\" content=\"10\"/>");
	ck_has(page, "<title>smtpmux status: relay.test</title>");
	ck_has(page, "<time>2026-11-18 ");
	ck_has(page, "No users are configured.");
	ck_has(page, "</html>\n");
	/* Nothing loaded from anywhere, no script, no queue section yet. */
	ck_lacks(page, "<script");
	ck_lacks(page, " src=");
	ck_lacks(page, " href=");
	ck_lacks(page, "url(");
	ck_lacks(page, "@import");
	ck_lacks(page, "id=\"queue\"");
	free(page);
}
END_TEST

START_TEST(test_states_and_figures)
{
	struct status_downstream ds[4];
	struct status_user users[2] = {
		{ .email = "a@example.org", .ds = ds, .n_ds = 3 },
		{ .email = "b@example.org", .ds = ds + 3, .n_ds = 1 },
	};
	struct status_snapshot s = { .now = NOW, .hostname = "h", .users = users, .n_users = 2 };
	char *page, text[128];

	ds_set(&ds[0], "ses", "email-smtp.eu-west-1.amazonaws.com:587", SMTPMUX_DS_UP);
	ds[0].hs.view.in_flight = 7;
	ds[0].hs.view.latency_ms = 412;
	ds[0].hs.view.successes = 1234;
	ds_set(&ds[1], "gmail", "smtp.gmail.com:587", SMTPMUX_DS_DOWN);
	ds[1].hs.view.consecutive_failures = 3;
	ds[1].hs.view.failures = 9;
	ds[1].hs.last_error_time = NOW - 5;
	snprintf(ds[1].hs.last_error, sizeof(ds[1].hs.last_error), "connect: Connection refused");
	ds_set(&ds[2], "backup", "mx.test:25", SMTPMUX_DS_HALF_OPEN);
	ds_set(&ds[3], "sendgrid", "smtp.sendgrid.net:465", SMTPMUX_DS_THROTTLED);
	page = render(&s);

	ck_has(page, "<section class=\"user\" id=\"user-1\">\n<h2>a@example.org</h2>");
	ck_has(page, "<section class=\"user\" id=\"user-2\">\n<h2>b@example.org</h2>");
	ck_before(page, "ses", "gmail");                                       /* config order */
	ck_has(page, "<tr class=\"downstream\" data-state=\"up\">");
	ck_has(page, "<span class=\"state st-up\">up</span>");
	ck_has(page, "<span class=\"state st-down\">down</span>");
	ck_has(page, "<span class=\"state st-half-open\">half-open</span>");
	ck_has(page, "<span class=\"state st-throttled\">throttled</span>");
	/* every state has its colour */
	ck_has(page, ".st-up{background:");
	ck_has(page, ".st-down{background:");
	ck_has(page, ".st-half-open{background:");
	ck_has(page, ".st-throttled{background:");
	ck_has(page, "<span class=\"addr\">email-smtp.eu-west-1.amazonaws.com:587</span>");
	ck_assert_str_eq(text_after(page, "data-field=\"in-flight\"", text, sizeof(text)), "7");
	ck_assert_str_eq(text_after(page, "data-field=\"latency\"", text, sizeof(text)), "412 ms");
	ck_assert_str_eq(text_after(page, "data-field=\"sent\"", text, sizeof(text)), "1234");
	ck_has(page, ">3 in a row, 9 in all</td>");
	ck_has(page, "<td class=\"err\"><time>2026-11-18 ");
	ck_has(page, "</time><br/>connect: Connection refused</td>");
	ck_has(page, "<td class=\"err\"><span class=\"none\">none</span></td>");
	free(page);
}
END_TEST

START_TEST(test_quota_bars)
{
	struct status_downstream ds[2];
	struct status_user user = { .email = "a@b", .ds = ds, .n_ds = 2 };
	struct status_snapshot s = { .now = NOW, .hostname = "h", .users = &user, .n_users = 1 };
	char *page;

	ds_set(&ds[0], "limited", "a:587", SMTPMUX_DS_UP);
	ds[0].hs.sent_minute = 3;
	ds[0].hs.limit_minute = 10;
	ds[0].hs.sent_hour = 85;
	ds[0].hs.limit_hour = 100;
	ds[0].hs.sent_day = 500;
	ds[0].hs.limit_day = 500;
	ds_set(&ds[1], "unlimited", "b:587", SMTPMUX_DS_UP);
	ds[1].hs.sent_day = 42;
	page = render(&s);

	ck_has(page, "<div class=\"window q-ok\" data-window=\"minute\" data-sent=\"3\" data-limit=\"10\">"
	    "<div class=\"bar\"><span style=\"width:30%\"></span></div>minute: 3 of 10</div>");
	ck_has(page, "<div class=\"window q-high\" data-window=\"hour\" data-sent=\"85\" data-limit=\"100\">"
	    "<div class=\"bar\"><span style=\"width:85%\"></span></div>hour: 85 of 100</div>");
	ck_has(page, "<div class=\"window q-full\" data-window=\"day\" data-sent=\"500\" data-limit=\"500\">"
	    "<div class=\"bar\"><span style=\"width:100%\"></span></div>day: 500 of 500</div>");
	ck_has(page, "<span class=\"none\">no limit</span> (42 today)");
	free(page);
}
END_TEST

/* A window that rolled over with more reserved than the limit (a reload
 * that lowered it) still draws a full bar, not a wider one. */
START_TEST(test_quota_bar_never_overflows)
{
	struct status_downstream ds;
	struct status_user user = { .email = "a@b", .ds = &ds, .n_ds = 1 };
	struct status_snapshot s = { .now = NOW, .hostname = "h", .users = &user, .n_users = 1 };
	char *page;

	ds_set(&ds, "x", "a:587", SMTPMUX_DS_UP);
	ds.hs.sent_day = 700;
	ds.hs.limit_day = 500;
	page = render(&s);
	ck_has(page, "q-full");
	ck_has(page, "width:100%");
	ck_lacks(page, "width:140%");
	free(page);
}
END_TEST

START_TEST(test_text_is_escaped)
{
	struct status_downstream ds;
	struct status_user user = { .ds = &ds, .n_ds = 1 };
	struct status_snapshot s = { .now = NOW, .users = &user, .n_users = 1 };
	char *page;

	snprintf(user.email, sizeof(user.email), "<script>alert(1)</script>&\"'@x");
	snprintf(s.hostname, sizeof(s.hostname), "h<i>");
	ds_set(&ds, "a<b>", "c&d:25", SMTPMUX_DS_DOWN);
	ds.hs.last_error_time = NOW;
	/* Control characters, invalid UTF-8 (a lone continuation byte, an
	 * overlong '/', a surrogate) and valid UTF-8 from a provider's reply. */
	snprintf(ds.hs.last_error, sizeof(ds.hs.last_error),
	    "550 bad\x01\x1b[31m \x80 \xc0\xaf \xed\xa0\x80 Gr\xc3\xbc\xc3\x9f\x65 \xe2\x9c\x93");
	page = render(&s);

	ck_has(page, "<h2>&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;&#39;@x</h2>");
	ck_has(page, "<title>smtpmux status: h&lt;i&gt;</title>");
	ck_has(page, "<span class=\"name\">a&lt;b&gt;</span>");
	ck_has(page, "<span class=\"addr\">c&amp;d:25</span>");
	ck_has(page, "550 bad  [31m \xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd "
	    "Gr\xc3\xbc\xc3\x9f\x65 \xe2\x9c\x93</td>");
	ck_lacks(page, "<script>");
	ck_lacks(page, "\x1b");
	free(page);
}
END_TEST

START_TEST(test_queue_summary_when_present)
{
	struct status_snapshot s = { .now = NOW, .hostname = "h" };
	char *page, text[64];

	s.queue = (struct status_queue_summary){ .present = true, .messages = 12, .bytes = 34567,
		.oldest_age = 7500, .delivered = 8, .bounced = 3, .expired = 2 };
	page = render(&s);
	ck_has(page, "<section id=\"queue\">\n<h2>Queue</h2>");
	ck_assert_str_eq(text_after(page, "data-field=\"messages\"", text, sizeof(text)), "12");
	ck_assert_str_eq(text_after(page, "data-field=\"bytes\"", text, sizeof(text)), "34567 octets");
	ck_assert_str_eq(text_after(page, "data-field=\"delivered\"", text, sizeof(text)), "8");
	ck_assert_str_eq(text_after(page, "data-field=\"bounced\"", text, sizeof(text)), "3");
	ck_assert_str_eq(text_after(page, "data-field=\"expired\"", text, sizeof(text)), "2");
	ck_assert_str_eq(text_after(page, "data-field=\"oldest\"", text, sizeof(text)), "2 h");
	/* before the users */
	ck_before(page, "id=\"queue\"", "<main>");
	free(page);

	s.queue = (struct status_queue_summary){ .present = true };
	page = render(&s);
	ck_has(page, "data-field=\"oldest\"><span class=\"none\">none</span>");
	free(page);
}
END_TEST

static Suite *
status_page_suite(void)
{
	Suite *s = suite_create("status_page");
	TCase *tc = tcase_create("render");

	tcase_add_test(tc, test_empty_page_is_self_contained);
	tcase_add_test(tc, test_states_and_figures);
	tcase_add_test(tc, test_quota_bars);
	tcase_add_test(tc, test_quota_bar_never_overflows);
	tcase_add_test(tc, test_text_is_escaped);
	tcase_add_test(tc, test_queue_summary_when_present);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr = srunner_create(status_page_suite());
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
