/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_HTTP_CLIENT_H
#define SMTPMUXD_HTTP_CLIENT_H

#include <stddef.h>

#include <event2/event.h>

/*
 * HTTPS POSTs from a libevent loop, with libcurl's multi interface driven
 * by curl_multi_socket_action(): curl says which sockets and timeout it
 * waits for, libevent watches them, nothing blocks (name resolution is
 * curl's threaded resolver). Used by the token helper only.
 *
 * Every request is HTTPS with the server's certificate and name verified,
 * against ca_file when given or the system store; redirects are not
 * followed. Proxies come from the usual environment (https_proxy,
 * no_proxy), as for curl(1).
 */

struct http_client;
struct http_request;

struct http_response {
	long status;                     /* HTTP status; 0 when none was received */
	const char *body;
	size_t body_len;
	const char *error;               /* transport failure (curl's text); NULL if none */
};

/* Called once per request, from the loop; res is valid during the call. */
typedef void (*http_done_fn)(void *arg, const struct http_response *res);

/* curl_global_init() must have been called. NULL on failure. */
struct http_client *http_client_new(struct event_base *base);
/* Cancels what is under way (no callbacks). */
void http_client_free(struct http_client *);

/*
 * POSTs form (application/x-www-form-urlencoded, kept by the caller until
 * done) to url within timeout_s seconds. NULL when it cannot start; then
 * done is never called.
 */
struct http_request *http_post_form(struct http_client *, const char *url,
    const char *ca_file, unsigned timeout_s, const char *form, size_t form_len,
    http_done_fn done, void *arg);

/* Aborts a request; done is not called. */
void http_request_cancel(struct http_request *);

#endif
