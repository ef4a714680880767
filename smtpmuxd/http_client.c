/* SPDX-License-Identifier: MIT */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "auth.h"
#include "http_client.h"

/*
 * The usual glue between curl's multi-socket API and an event loop: curl
 * tells on_socket() which sockets to watch and on_timer_change() when to
 * call back; each libevent callback hands the event to
 * curl_multi_socket_action() and then collects finished transfers.
 * Nothing is called from inside a curl callback but bookkeeping.
 */

#define BODY_MAX (64 * 1024)             /* a token response is a few KiB */
#define CONNECT_TIMEOUT_MAX 10

struct watch {                           /* one socket curl waits on */
	struct http_client *hc;
	struct event *ev;
	struct watch *next, **prev;
};

struct http_client {
	struct event_base *base;
	CURLM *multi;
	struct event *timer;
	struct watch *watches;
	struct http_request *reqs;
};

struct http_request {
	struct http_client *hc;
	CURL *easy;
	struct curl_slist *headers;
	char *body;
	size_t body_len;
	bool too_big;
	char errbuf[CURL_ERROR_SIZE];
	http_done_fn done;
	void *arg;
	struct http_request *next, **prev;
};

/* --- requests ------------------------------------------------------------ */

static void
request_unlink(struct http_request *req)
{
	*req->prev = req->next;
	if (req->next != NULL)
		req->next->prev = req->prev;
}

/* The body may hold tokens: wiped before it is freed. */
static void
request_free(struct http_request *req)
{
	request_unlink(req);
	if (req->easy != NULL) {
		curl_multi_remove_handle(req->hc->multi, req->easy);
		curl_easy_cleanup(req->easy);
	}
	curl_slist_free_all(req->headers);
	if (req->body != NULL) {
		auth_wipe(req->body, BODY_MAX);
		free(req->body);
	}
	free(req);
}

static size_t
on_body(char *data, size_t size, size_t n, void *arg)
{
	struct http_request *req = arg;
	size_t len = size * n;

	if (len > BODY_MAX - req->body_len) {
		req->too_big = true;
		return 0;                    /* curl aborts the transfer */
	}
	memcpy(req->body + req->body_len, data, len);
	req->body_len += len;
	return len;
}

static void
request_complete(struct http_request *req, CURLcode rc)
{
	struct http_response res;

	memset(&res, 0, sizeof(res));
	if (rc == CURLE_OK)
		curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &res.status);
	else
		res.error = req->too_big ? "response larger than 64 KiB" :
		    req->errbuf[0] != '\0' ? req->errbuf : curl_easy_strerror(rc);
	res.body = req->body;
	res.body_len = req->body_len;
	req->done(req->arg, &res);
	request_free(req);
}

/* Transfers that curl has finished, each reported once. */
static void
collect_done(struct http_client *hc)
{
	struct http_request *req;
	CURLMsg *msg;
	int left;

	while ((msg = curl_multi_info_read(hc->multi, &left)) != NULL) {
		if (msg->msg != CURLMSG_DONE)
			continue;
		req = NULL;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&req);
		if (req != NULL)
			request_complete(req, msg->data.result);
	}
}

/* --- curl's sockets and timer on libevent -------------------------------- */

static void
on_socket_event(evutil_socket_t fd, short kind, void *arg)
{
	struct http_client *hc = arg;
	int running;
	int flags = (kind & EV_READ ? CURL_CSELECT_IN : 0) | (kind & EV_WRITE ? CURL_CSELECT_OUT : 0);

	curl_multi_socket_action(hc->multi, fd, flags, &running);
	collect_done(hc);
}

static void
on_timeout(evutil_socket_t fd, short kind, void *arg)
{
	struct http_client *hc = arg;
	int running;

	(void)fd;
	(void)kind;
	curl_multi_socket_action(hc->multi, CURL_SOCKET_TIMEOUT, 0, &running);
	collect_done(hc);
}

static void
watch_free(struct watch *w)
{
	*w->prev = w->next;
	if (w->next != NULL)
		w->next->prev = w->prev;
	event_free(w->ev);
	free(w);
}

static struct watch *
watch_new(struct http_client *hc, curl_socket_t s)
{
	struct watch *w = calloc(1, sizeof(*w));

	if (w == NULL || (w->ev = event_new(hc->base, s, 0, on_socket_event, hc)) == NULL) {
		free(w);
		return NULL;
	}
	w->hc = hc;
	w->next = hc->watches;
	if (w->next != NULL)
		w->next->prev = &w->next;
	w->prev = &hc->watches;
	hc->watches = w;
	curl_multi_assign(hc->multi, s, w);
	return w;
}

static int
on_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
	struct http_client *hc = userp;
	struct watch *w = socketp;
	short kind = EV_PERSIST;

	(void)easy;
	if (what == CURL_POLL_REMOVE) {
		if (w != NULL) {
			curl_multi_assign(hc->multi, s, NULL);
			watch_free(w);
		}
		return 0;
	}
	if (w == NULL && (w = watch_new(hc, s)) == NULL)
		return -1;
	kind |= (what & CURL_POLL_IN ? EV_READ : 0) | (what & CURL_POLL_OUT ? EV_WRITE : 0);
	event_del(w->ev);
	event_assign(w->ev, hc->base, s, kind, on_socket_event, hc);
	return event_add(w->ev, NULL);
}

static int
on_timer_change(CURLM *multi, long timeout_ms, void *userp)
{
	struct http_client *hc = userp;
	struct timeval tv;

	(void)multi;
	if (timeout_ms < 0)
		return evtimer_del(hc->timer);
	tv.tv_sec = timeout_ms / 1000;
	tv.tv_usec = (timeout_ms % 1000) * 1000;
	return evtimer_add(hc->timer, &tv);
}

struct http_client *
http_client_new(struct event_base *base)
{
	struct http_client *hc = calloc(1, sizeof(*hc));

	if (hc == NULL)
		return NULL;
	hc->base = base;
	if ((hc->multi = curl_multi_init()) == NULL ||
	    (hc->timer = evtimer_new(base, on_timeout, hc)) == NULL) {
		http_client_free(hc);
		return NULL;
	}
	curl_multi_setopt(hc->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
	curl_multi_setopt(hc->multi, CURLMOPT_SOCKETDATA, hc);
	curl_multi_setopt(hc->multi, CURLMOPT_TIMERFUNCTION, on_timer_change);
	curl_multi_setopt(hc->multi, CURLMOPT_TIMERDATA, hc);
	return hc;
}

void
http_client_free(struct http_client *hc)
{
	if (hc == NULL)
		return;
	while (hc->reqs != NULL)
		request_free(hc->reqs);
	if (hc->multi != NULL)
		curl_multi_cleanup(hc->multi);
	while (hc->watches != NULL)
		watch_free(hc->watches);
	if (hc->timer != NULL)
		event_free(hc->timer);
	free(hc);
}

/* --- one POST -------------------------------------------------------------- */

static bool
request_setup(struct http_request *req, const char *url, const char *ca_file,
    unsigned timeout_s, const char *form, size_t form_len)
{
	CURL *e = req->easy;
	bool ok = true;

	req->headers = curl_slist_append(NULL,
	    "Content-Type: application/x-www-form-urlencoded");
	if (req->headers != NULL)
		req->headers = curl_slist_append(req->headers, "Accept: application/json");
	ok &= req->headers != NULL;
	ok &= curl_easy_setopt(e, CURLOPT_URL, url) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https") == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2) == CURLE_OK;
	if (ca_file != NULL)
		ok &= curl_easy_setopt(e, CURLOPT_CAINFO, ca_file) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_TIMEOUT, (long)timeout_s) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, (long)(timeout_s < CONNECT_TIMEOUT_MAX ?
	    timeout_s : CONNECT_TIMEOUT_MAX)) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_USERAGENT, "smtpmux/" PACKAGE_VERSION) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_HTTPHEADER, req->headers) == CURLE_OK;
	/* Not copied: the caller keeps (and wipes) the form, which holds secrets. */
	ok &= curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)form_len) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_POSTFIELDS, form) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_WRITEDATA, req) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, req->errbuf) == CURLE_OK;
	ok &= curl_easy_setopt(e, CURLOPT_PRIVATE, req) == CURLE_OK;
	return ok;
}

struct http_request *
http_post_form(struct http_client *hc, const char *url, const char *ca_file,
    unsigned timeout_s, const char *form, size_t form_len, http_done_fn done, void *arg)
{
	struct http_request *req = calloc(1, sizeof(*req));

	if (req == NULL)
		return NULL;
	req->hc = hc;
	req->done = done;
	req->arg = arg;
	req->next = hc->reqs;
	if (req->next != NULL)
		req->next->prev = &req->next;
	req->prev = &hc->reqs;
	hc->reqs = req;
	if ((req->body = malloc(BODY_MAX)) == NULL || (req->easy = curl_easy_init()) == NULL ||
	    !request_setup(req, url, ca_file, timeout_s, form, form_len) ||
	    curl_multi_add_handle(hc->multi, req->easy) != CURLM_OK) {
		request_free(req);
		return NULL;
	}
	return req;
}

void
http_request_cancel(struct http_request *req)
{
	if (req != NULL)
		request_free(req);
}
