/* SPDX-License-Identifier: MIT */
/*
 * Tests of the connection object, plain and TLS, over socketpairs and
 * 127.0.0.1 in one event loop. A throwaway PKI (two CAs, a server
 * certificate for mx.test and 127.0.0.1) is generated in-process into a
 * temporary directory before the suite runs and removed afterwards.
 */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "conn.h"
#include "freed_watch.h"
#include "tls.h"

#define SERVER_NAME "mx.test"
#define BULK_SIZE   (4u * 1024 * 1024)

/* --- throwaway PKI ------------------------------------------------------- */

static struct {
	char dir[64];
	char ca[128], ca_key[128], ca2[128], ca2_key[128], cert[128], key[128];
} pki;

static void
pki_must(int r, const char *what)
{
	if (r < 0) {
		fprintf(stderr, "test PKI: %s: %s\n", what, gnutls_strerror(r));
		exit(1);
	}
}

static void
pki_write(const char *path, const gnutls_datum_t *d)
{
	FILE *f = fopen(path, "w");

	if (f == NULL || fwrite(d->data, 1, d->size, f) != d->size || fclose(f) != 0) {
		perror(path);
		exit(1);
	}
}

static gnutls_x509_privkey_t
pki_key(const char *path)
{
	gnutls_x509_privkey_t key;
	gnutls_datum_t d;

	pki_must(gnutls_x509_privkey_init(&key), "privkey_init");
	pki_must(gnutls_x509_privkey_generate(key, GNUTLS_PK_ECDSA,
	    GNUTLS_CURVE_TO_BITS(GNUTLS_ECC_CURVE_SECP256R1), 0), "privkey_generate");
	pki_must(gnutls_x509_privkey_export2(key, GNUTLS_X509_FMT_PEM, &d), "privkey_export");
	pki_write(path, &d);
	gnutls_free(d.data);
	return key;
}

/* A CA when issuer is NULL (self-signed), else a server certificate. */
static gnutls_x509_crt_t
pki_cert(const char *path, const char *cn, unsigned char serial, gnutls_x509_privkey_t key,
    gnutls_x509_crt_t issuer, gnutls_x509_privkey_t issuer_key)
{
	static const unsigned char loopback[4] = { 127, 0, 0, 1 };
	unsigned char id[64];
	size_t idlen = sizeof(id);
	gnutls_x509_crt_t crt;
	gnutls_datum_t d;
	time_t now = time(NULL);

	pki_must(gnutls_x509_crt_init(&crt), "crt_init");
	pki_must(gnutls_x509_crt_set_version(crt, 3), "set_version");
	pki_must(gnutls_x509_crt_set_serial(crt, &serial, 1), "set_serial");
	pki_must(gnutls_x509_crt_set_activation_time(crt, now - 3600), "activation");
	pki_must(gnutls_x509_crt_set_expiration_time(crt, now + 7 * 86400), "expiration");
	pki_must(gnutls_x509_crt_set_dn_by_oid(crt, GNUTLS_OID_X520_COMMON_NAME, 0,
	    cn, strlen(cn)), "set_dn");
	pki_must(gnutls_x509_crt_set_key(crt, key), "set_key");
	pki_must(gnutls_x509_crt_get_key_id(crt, 0, id, &idlen), "get_key_id");
	pki_must(gnutls_x509_crt_set_subject_key_id(crt, id, idlen), "subject_key_id");
	if (issuer == NULL) {
		pki_must(gnutls_x509_crt_set_basic_constraints(crt, 1, -1), "basic_constraints");
		pki_must(gnutls_x509_crt_set_key_usage(crt,
		    GNUTLS_KEY_KEY_CERT_SIGN | GNUTLS_KEY_CRL_SIGN), "key_usage");
		issuer = crt;
		issuer_key = key;
	} else {
		pki_must(gnutls_x509_crt_set_basic_constraints(crt, 0, -1), "basic_constraints");
		pki_must(gnutls_x509_crt_set_key_usage(crt, GNUTLS_KEY_DIGITAL_SIGNATURE), "key_usage");
		pki_must(gnutls_x509_crt_set_key_purpose_oid(crt, GNUTLS_KP_TLS_WWW_SERVER, 0), "purpose");
		pki_must(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_DNSNAME,
		    cn, strlen(cn), GNUTLS_FSAN_APPEND), "san dns");
		pki_must(gnutls_x509_crt_set_subject_alt_name(crt, GNUTLS_SAN_IPADDRESS,
		    loopback, sizeof(loopback), GNUTLS_FSAN_APPEND), "san ip");
	}
	pki_must(gnutls_x509_crt_sign2(crt, issuer, issuer_key, GNUTLS_DIG_SHA256, 0), "sign");
	pki_must(gnutls_x509_crt_export2(crt, GNUTLS_X509_FMT_PEM, &d), "crt_export");
	pki_write(path, &d);
	gnutls_free(d.data);
	return crt;
}

static void
pki_create(void)
{
	gnutls_x509_privkey_t ca_key, ca2_key, key;
	gnutls_x509_crt_t ca, ca2, crt;

	snprintf(pki.dir, sizeof(pki.dir), "/tmp/check_conn.XXXXXX");
	if (mkdtemp(pki.dir) == NULL) {
		perror("mkdtemp");
		exit(1);
	}
	snprintf(pki.ca, sizeof(pki.ca), "%s/ca.pem", pki.dir);
	snprintf(pki.ca_key, sizeof(pki.ca_key), "%s/ca-key.pem", pki.dir);
	snprintf(pki.ca2, sizeof(pki.ca2), "%s/ca2.pem", pki.dir);
	snprintf(pki.ca2_key, sizeof(pki.ca2_key), "%s/ca2-key.pem", pki.dir);
	snprintf(pki.cert, sizeof(pki.cert), "%s/cert.pem", pki.dir);
	snprintf(pki.key, sizeof(pki.key), "%s/key.pem", pki.dir);

	ca_key = pki_key(pki.ca_key);
	ca = pki_cert(pki.ca, "smtpmux test CA", 1, ca_key, NULL, NULL);
	ca2_key = pki_key(pki.ca2_key);
	ca2 = pki_cert(pki.ca2, "smtpmux other CA", 2, ca2_key, NULL, NULL);
	key = pki_key(pki.key);
	crt = pki_cert(pki.cert, SERVER_NAME, 3, key, ca, ca_key);
	gnutls_x509_crt_deinit(crt);
	gnutls_x509_crt_deinit(ca2);
	gnutls_x509_crt_deinit(ca);
	gnutls_x509_privkey_deinit(key);
	gnutls_x509_privkey_deinit(ca2_key);
	gnutls_x509_privkey_deinit(ca_key);
}

static void
pki_remove(void)
{
	unlink(pki.ca);
	unlink(pki.ca_key);
	unlink(pki.ca2);
	unlink(pki.ca2_key);
	unlink(pki.cert);
	unlink(pki.key);
	rmdir(pki.dir);
}

static struct tls_server_ctx *
server_ctx(void)
{
	struct tls_server_ctx *ctx;
	char err[512] = "";

	ctx = tls_server_new(pki.cert, pki.key, NULL, err, sizeof(err));
	ck_assert_msg(ctx != NULL, "tls_server_new: %s", err);
	return ctx;
}

static struct tls_client_ctx *
client_ctx(const char *cafile, bool verify, const char *priority)
{
	struct tls_client_ctx *ctx;
	char err[512] = "";

	ctx = tls_client_new(cafile, verify, priority, err, sizeof(err));
	ck_assert_msg(ctx != NULL, "tls_client_new: %s", err);
	return ctx;
}

/* --- one end of a test connection ---------------------------------------- */

enum what { W_READ, W_FLUSHED, W_CONNECTED, W_TLS, W_ERROR, W_HANGUP };

struct side {
	struct event_base *base;
	struct conn *c;
	bool server;
	bool keep_input;                /* leave conn_input() to the hook */
	struct evbuffer *got;           /* everything read, unless keep_input */
	int reads, flushes, connects, tls_ready, errors, hangups;
	enum conn_event err;
	char detail[512];
	char tls_desc[96];
	void (*hook)(struct side *, enum what);
	struct side *other;
	void *data;
	int stage;
};

static void
side_event(struct side *s, enum what w)
{
	if (s->hook != NULL)
		s->hook(s, w);
}

static void
side_on_read(struct conn *c, void *arg)
{
	struct side *s = arg;

	ck_assert_ptr_eq(c, s->c);
	s->reads++;
	if (!s->keep_input)
		evbuffer_add_buffer(s->got, conn_input(c));
	side_event(s, W_READ);
}

static void
side_on_flushed(struct conn *c, void *arg)
{
	struct side *s = arg;

	ck_assert_uint_eq(conn_pending_output(c), 0);
	s->flushes++;
	side_event(s, W_FLUSHED);
}

static void
side_on_connected(struct conn *c, void *arg)
{
	struct side *s = arg;

	s->connects++;
	side_event(s, W_CONNECTED);
}

static void
side_on_tls_ready(struct conn *c, void *arg)
{
	struct side *s = arg;

	ck_assert(conn_is_tls(c));
	snprintf(s->tls_desc, sizeof(s->tls_desc), "%s", conn_tls_desc(c));
	s->tls_ready++;
	side_event(s, W_TLS);
}

/* Frees the connection from inside on_error, as owners do. */
static void
side_on_error(struct conn *c, void *arg, enum conn_event ev, const char *detail)
{
	struct side *s = arg;

	s->errors++;
	s->err = ev;
	snprintf(s->detail, sizeof(s->detail), "%s", detail);
	conn_free(c);
	s->c = NULL;
	side_event(s, W_ERROR);
}

static const struct conn_cbs side_cbs = {
	side_on_read, side_on_flushed, side_on_connected, side_on_tls_ready, side_on_error, NULL
};

static void
side_on_hangup(struct conn *c, void *arg)
{
	struct side *s = arg;

	ck_assert_ptr_eq(c, s->c);
	s->hangups++;
	side_event(s, W_HANGUP);
}

/* The same, for an owner that wants to hear of a hang-up while paused. */
static const struct conn_cbs side_hangup_cbs = {
	side_on_read, side_on_flushed, side_on_connected, side_on_tls_ready, side_on_error,
	side_on_hangup
};

static void
side_init(struct side *s, struct event_base *base, bool server,
    void (*hook)(struct side *, enum what))
{
	memset(s, 0, sizeof(*s));
	s->base = base;
	s->server = server;
	s->hook = hook;
	s->got = evbuffer_new();
	ck_assert_ptr_nonnull(s->got);
}

static void
side_fini(struct side *s)
{
	conn_free(s->c);
	s->c = NULL;
	evbuffer_free(s->got);
}

static bool
side_got(struct side *s, const char *text)
{
	size_t len = strlen(text);

	return evbuffer_get_length(s->got) == len &&
	    memcmp(evbuffer_pullup(s->got, (ev_ssize_t)len), text, len) == 0;
}

static void
stop(struct side *s)
{
	event_base_loopbreak(s->base);
}

static void
socket_pair(int sv[2], int bufsize)
{
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
	for (int i = 0; bufsize > 0 && i < 2; i++) {
		ck_assert_int_eq(setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &bufsize, sizeof(bufsize)), 0);
		ck_assert_int_eq(setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &bufsize, sizeof(bufsize)), 0);
	}
}

/* Connects two sides over a socketpair. */
static void
pair(struct side *srv, struct side *cli, int bufsize)
{
	int sv[2];

	socket_pair(sv, bufsize);
	srv->c = conn_new(srv->base, sv[0], &side_cbs, srv);
	cli->c = conn_new(cli->base, sv[1], &side_cbs, cli);
	ck_assert_ptr_nonnull(srv->c);
	ck_assert_ptr_nonnull(cli->c);
	srv->other = cli;
	cli->other = srv;
}

/* A side whose peer is a bare socket the test writes to itself. */
static int
pair_raw_sized(struct side *s, int bufsize)
{
	int sv[2];

	socket_pair(sv, bufsize);
	s->c = conn_new(s->base, sv[0], &side_cbs, s);
	ck_assert_ptr_nonnull(s->c);
	return sv[1];
}

static int
pair_raw(struct side *s)
{
	return pair_raw_sized(s, 0);
}

static void
watchdog(evutil_socket_t fd, short what, void *arg)
{
	ck_abort_msg("event loop watchdog expired");
}

/* Runs the loop until a hook calls stop(); the watchdog fails a hung test. */
static void
run(struct event_base *base)
{
	struct timeval tv = { 60, 0 };
	struct event *wd = evtimer_new(base, watchdog, NULL);

	ck_assert_ptr_nonnull(wd);
	evtimer_add(wd, &tv);
	ck_assert_int_eq(event_base_dispatch(base), 0);
	event_free(wd);
}

static double
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void
start_tls_pair(struct side *srv, struct side *cli, struct tls_server_ctx *sctx,
    struct tls_client_ctx *cctx, const char *name)
{
	ck_assert_int_eq(conn_start_tls_server(srv->c, sctx), 0);
	ck_assert_int_eq(conn_start_tls_client(cli->c, cctx, name), 0);
	ck_assert(!conn_is_tls(srv->c));
	ck_assert_str_eq(conn_tls_desc(cli->c), "");
}

/* --- plain ----------------------------------------------------------------- */

static void
echo_hook(struct side *s, enum what w)
{
	if (s->server && w == W_READ) {
		evbuffer_add_buffer(conn_output(s->c), s->got);
		conn_flush(s->c);
	}
	if (!s->server && w == W_READ && evbuffer_get_length(s->got) >= 7)
		stop(s);
}

START_TEST(plain_echo)
{
	struct event_base *base = event_base_new();
	struct side srv, cli;

	side_init(&srv, base, true, echo_hook);
	side_init(&cli, base, false, echo_hook);
	pair(&srv, &cli, 0);
	ck_assert_str_eq(conn_peer(srv.c), "");
	ck_assert(!conn_is_tls(cli.c));
	ck_assert_int_eq(conn_printf(cli.c, "%s\r\n", "hello"), 7);
	ck_assert_uint_eq(conn_pending_output(cli.c), 7);
	run(base);
	ck_assert(side_got(&cli, "hello\r\n"));
	ck_assert_int_eq(cli.flushes, 1);
	ck_assert_int_eq(srv.flushes, 1);
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	side_fini(&srv);
	side_fini(&cli);
	event_base_free(base);
}
END_TEST

/* Each direction carries its own pseudo-random stream. */
static unsigned char
pattern(size_t i, unsigned seed)
{
	uint32_t x = (uint32_t)i * 2654435761u + seed;

	return (unsigned char)(x >> 13 ^ x >> 24);
}

struct bulk {
	size_t rcvd;
};

static void
bulk_send(struct side *s)
{
	unsigned char *buf = malloc(BULK_SIZE);

	ck_assert_ptr_nonnull(buf);
	for (size_t i = 0; i < BULK_SIZE; i++)
		buf[i] = pattern(i, s->server ? 1 : 2);
	ck_assert_int_eq(evbuffer_add(conn_output(s->c), buf, BULK_SIZE), 0);
	free(buf);
	conn_flush(s->c);
}

static void
bulk_check(struct side *s)
{
	struct bulk *b = s->data;
	size_t n = evbuffer_get_length(s->got);
	const unsigned char *p = evbuffer_pullup(s->got, (ev_ssize_t)n);

	ck_assert_uint_le(b->rcvd + n, BULK_SIZE);
	for (size_t i = 0; i < n; i++)
		if (p[i] != pattern(b->rcvd + i, s->server ? 2 : 1))
			ck_abort_msg("byte %zu differs", b->rcvd + i);
	b->rcvd += n;
	evbuffer_drain(s->got, n);
}

static void
bulk_hook(struct side *s, enum what w)
{
	struct bulk *mine = s->data, *theirs = s->other->data;

	if (w == W_TLS)
		bulk_send(s);
	if (w == W_READ) {
		bulk_check(s);
		if (mine->rcvd == BULK_SIZE && theirs->rcvd == BULK_SIZE)
			stop(s);
	}
}

static void
bulk_transfer(bool tls, int bufsize)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = NULL;
	struct tls_client_ctx *cctx = NULL;
	struct bulk bs = { 0 }, bc = { 0 };
	struct side srv, cli;

	side_init(&srv, base, true, bulk_hook);
	side_init(&cli, base, false, bulk_hook);
	srv.data = &bs;
	cli.data = &bc;
	pair(&srv, &cli, bufsize);
	if (tls) {
		sctx = server_ctx();
		cctx = client_ctx(pki.ca, true, NULL);
		start_tls_pair(&srv, &cli, sctx, cctx, SERVER_NAME);
	} else {
		bulk_send(&srv);
		bulk_send(&cli);
	}
	run(base);
	ck_assert_uint_eq(bs.rcvd, BULK_SIZE);
	ck_assert_uint_eq(bc.rcvd, BULK_SIZE);
	ck_assert_int_eq(srv.flushes, 1);
	ck_assert_int_eq(cli.flushes, 1);
	ck_assert_int_gt(srv.reads, 1);
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	ck_assert_int_eq(srv.tls_ready + cli.tls_ready, tls ? 2 : 0);
	side_fini(&srv);
	side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}

/*
 * _i = 0: small socket buffers, so every large write is a partial one;
 * _i = 1: large ones, so more arrives at once than one event reads.
 */
static const int bulk_bufsize[] = { 4096, 1 << 20 };

START_TEST(plain_bulk)
{
	bulk_transfer(false, bulk_bufsize[_i]);
}
END_TEST

START_TEST(tls_bulk)
{
	bulk_transfer(true, bulk_bufsize[_i]);
}
END_TEST

/* A write to a closed peer fails as CONN_IO_ERROR, without SIGPIPE. */
static void
write_error_hook(struct side *s, enum what w)
{
	if (w == W_TLS && !s->server) {
		conn_free(s->c);
		s->c = NULL;
	}
	if (w == W_TLS && s->server)
		conn_pause_read(s->c);      /* so the EOF is not seen first */
	if (w == W_ERROR || (w == W_TLS && s->other->c == NULL && s->other->tls_ready))
		stop(s);
}

START_TEST(write_to_closed_peer)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = NULL;
	struct tls_client_ctx *cctx = NULL;
	struct side srv, cli;
	void (*old)(int) = signal(SIGPIPE, SIG_DFL);
	char big[65536];

	side_init(&srv, base, true, write_error_hook);
	side_init(&cli, base, false, write_error_hook);
	pair(&srv, &cli, 0);
	if (_i == 1) {
		sctx = server_ctx();
		cctx = client_ctx(pki.ca, true, NULL);
		start_tls_pair(&srv, &cli, sctx, cctx, SERVER_NAME);
		run(base);
		ck_assert_int_eq(srv.tls_ready + cli.tls_ready, 2);
	} else {
		conn_pause_read(srv.c);
		side_fini(&cli);
		cli.got = NULL;
	}
	memset(big, 'x', sizeof(big));
	for (int i = 0; i < 8; i++)
		evbuffer_add(conn_output(srv.c), big, sizeof(big));
	conn_flush(srv.c);
	run(base);
	ck_assert_int_eq(srv.err, CONN_IO_ERROR);
	ck_assert_msg(strncmp(srv.detail, "write: ", 7) == 0, "%s", srv.detail);
	signal(SIGPIPE, old);
	side_fini(&srv);
	if (cli.got != NULL)
		side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* Reading paused: nothing is delivered, not even EOF, until resumed. */
START_TEST(pause_resume_read)
{
	struct event_base *base = event_base_new();
	struct side s;
	int peer;

	side_init(&s, base, true, NULL);
	peer = pair_raw(&s);
	conn_set_timeout(s.c, 50);          /* a paused reader is not timed */
	ck_assert_int_eq(write(peer, "one\r\n", 5), 5);
	while (s.reads == 0)
		ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
	conn_pause_read(s.c);
	ck_assert_int_eq(write(peer, "two\r\n", 5), 5);
	close(peer);
	/* Three timeouts' worth of loop: neither data, EOF nor a timeout comes. */
	ck_assert_int_eq(event_base_loopexit(base, &(struct timeval){ 0, 150000 }), 0);
	ck_assert_int_eq(event_base_dispatch(base), 0);
	ck_assert_int_eq(s.reads, 1);
	ck_assert_int_eq(s.errors, 0);
	ck_assert(side_got(&s, "one\r\n"));

	conn_resume_read(s.c);
	while (s.errors == 0)
		ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
	ck_assert_int_eq(s.err, CONN_EOF);
	ck_assert(side_got(&s, "one\r\ntwo\r\n"));
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* Runs the loop for ms: long enough for anything that would happen. */
static void
settle(struct event_base *base, long ms)
{
	ck_assert_int_eq(event_base_loopexit(base, &(struct timeval){ ms / 1000, (ms % 1000) * 1000 }), 0);
	ck_assert_int_eq(event_base_dispatch(base), 0);
}

/* --- system calls: interest in the socket changes only when it must ----- */

#define ROUNDS 200

/* A conversation: the client sends a line, the server answers it in
 * three pieces (three flushes), the client sends the next line. */
static void
chat_hook(struct side *s, enum what w)
{
	char *line;

	if (w != W_READ)
		return;
	while ((line = evbuffer_readln(conn_input(s->c), NULL, EVBUFFER_EOL_CRLF)) != NULL) {
		free(line);
		if (s->server) {
			conn_printf(s->c, "250-one\r\n");
			conn_printf(s->c, "250-two\r\n");
			conn_printf(s->c, "250 three\r\n");
			continue;
		}
		if (++s->stage % 3 != 0)            /* the last of three lines */
			continue;
		if (s->stage / 3 >= ROUNDS)
			stop(s);
		else
			conn_printf(s->c, "NOOP\r\n");
	}
}

/*
 * Once both ends are set up, a conversation changes nothing in epoll: the
 * read interest stays armed and every reply goes out without asking for
 * write readiness (which used to be added and removed around each one).
 */
START_TEST(interest_kept_in_conversation)
{
	struct event_base *base = event_base_new();
	struct side srv, cli;
	unsigned long srv0, cli0;

	side_init(&srv, base, true, chat_hook);
	side_init(&cli, base, false, chat_hook);
	srv.keep_input = cli.keep_input = true;
	pair(&srv, &cli, 0);
	srv0 = conn_interest_changes(srv.c);
	cli0 = conn_interest_changes(cli.c);
	ck_assert_uint_le(srv0, 1);             /* the read interest, once */
	conn_printf(cli.c, "NOOP\r\n");
	run(base);
	ck_assert_int_eq(cli.stage, 3 * ROUNDS);
	ck_assert_int_ge(srv.reads, ROUNDS);
	ck_assert_uint_eq(conn_interest_changes(srv.c), srv0);
	ck_assert_uint_eq(conn_interest_changes(cli.c), cli0);
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	side_fini(&srv);
	side_fini(&cli);
	event_base_free(base);
}
END_TEST

/* Several flushes in one callback leave in one write: the peer finds all
 * of them in the socket at once, after a single loop pass. */
START_TEST(one_write_per_batch)
{
	struct event_base *base = event_base_new();
	struct side s;
	char buf[256];
	ssize_t n;
	int peer;

	side_init(&s, base, true, NULL);
	peer = pair_raw(&s);
	conn_printf(s.c, "250-one\r\n");
	conn_printf(s.c, "250-two\r\n");
	conn_printf(s.c, "250 three\r\n");
	/* Nothing is written inside the calls: callbacks come from the loop. */
	ck_assert_int_eq(recv(peer, buf, sizeof(buf), MSG_DONTWAIT), -1);
	ck_assert_int_eq(event_base_loop(base, EVLOOP_NONBLOCK), 0);
	n = recv(peer, buf, sizeof(buf), MSG_DONTWAIT);
	ck_assert_int_eq(n, 29);
	ck_assert_int_eq(memcmp(buf, "250-one\r\n250-two\r\n250 three\r\n", 29), 0);
	ck_assert_int_eq(s.flushes, 1);
	ck_assert_uint_eq(conn_interest_changes(s.c), 1);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* A socket that fills up is watched for room, and only then. */
START_TEST(write_interest_only_when_full)
{
	struct event_base *base = event_base_new();
	static char big[256 * 1024], sink[65536];
	struct side s;
	unsigned long before;
	int peer;

	side_init(&s, base, true, NULL);
	peer = pair_raw_sized(&s, 4096);
	before = conn_interest_changes(s.c);
	evbuffer_add(conn_output(s.c), big, sizeof(big));
	conn_flush(s.c);
	settle(base, 50);
	ck_assert_uint_gt(conn_pending_output(s.c), 0);
	ck_assert_uint_eq(conn_interest_changes(s.c), before + 1);   /* armed: full */
	while (conn_pending_output(s.c) > 0 || s.flushes == 0) {
		(void)recv(peer, sink, sizeof(sink), MSG_DONTWAIT);
		ck_assert_int_eq(event_base_loop(base, EVLOOP_NONBLOCK), 0);
	}
	ck_assert_uint_eq(conn_interest_changes(s.c), before + 2);   /* and disarmed */
	ck_assert_int_eq(s.errors, 0);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/*
 * A pause costs nothing while the peer waits for our answer; the read
 * interest goes only when the peer sends anyway, and what it sent is read
 * after the resume.
 */
START_TEST(pause_parks_only_when_peer_sends)
{
	struct event_base *base = event_base_new();
	struct side s;
	unsigned long base_changes;
	int peer;

	side_init(&s, base, true, NULL);
	peer = pair_raw(&s);
	base_changes = conn_interest_changes(s.c);
	conn_pause_read(s.c);
	conn_resume_read(s.c);
	conn_pause_read(s.c);
	settle(base, 20);
	ck_assert_uint_eq(conn_interest_changes(s.c), base_changes);
	ck_assert_int_eq(write(peer, "MAIL\r\n", 6), 6);
	settle(base, 20);
	ck_assert_int_eq(s.reads, 0);
	ck_assert_uint_eq(conn_interest_changes(s.c), base_changes + 1);
	conn_resume_read(s.c);
	while (s.reads == 0)
		ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
	ck_assert(side_got(&s, "MAIL\r\n"));
	ck_assert_uint_eq(conn_interest_changes(s.c), base_changes + 2);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* A peer that hangs up during a pause is told of (once), whether or not
 * it pipelined something first; without a pause it is an EOF as before. */
START_TEST(hangup_while_paused)
{
	struct event_base *base = event_base_new();
	struct side s;
	int sv[2];

	if ((event_base_get_features(base) & EV_FEATURE_EARLY_CLOSE) == 0) {
		event_base_free(base);
		return;                             /* no EPOLLRDHUP: nothing to watch */
	}
	for (int pipelined = 0; pipelined < 2; pipelined++) {
		side_init(&s, base, true, NULL);
		socket_pair(sv, 0);
		s.c = conn_new(base, sv[0], &side_hangup_cbs, &s);
		ck_assert_ptr_nonnull(s.c);
		conn_pause_read(s.c);
		if (pipelined)
			ck_assert_int_eq(write(sv[1], "QUIT\r\n", 6), 6);
		close(sv[1]);
		while (s.hangups == 0)
			ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
		settle(base, 20);
		ck_assert_int_eq(s.hangups, 1);
		ck_assert_int_eq(s.reads, 0);
		ck_assert_int_eq(s.errors, 0);
		conn_resume_read(s.c);
		while (s.errors == 0)
			ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
		ck_assert_int_eq(s.err, CONN_EOF);
		ck_assert_int_eq(s.hangups, 1);
		if (pipelined)
			ck_assert(side_got(&s, "QUIT\r\n"));
		else
			ck_assert_uint_eq(evbuffer_get_length(s.got), 0);
		side_fini(&s);
	}
	event_base_free(base);
}
END_TEST

/* An accepted socket is wrapped with the address accept gave. */
START_TEST(accepted_with_peer_address)
{
	struct event_base *base = event_base_new();
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(2525) };
	struct side s;
	int sv[2];

	side_init(&s, base, true, NULL);
	socket_pair(sv, 0);
	ck_assert_int_eq(evutil_make_socket_nonblocking(sv[0]), 0);
	inet_pton(AF_INET, "192.0.2.7", &sin.sin_addr);
	s.c = conn_accepted(base, sv[0], (struct sockaddr *)&sin, sizeof(sin), &side_cbs, &s);
	ck_assert_ptr_nonnull(s.c);
	ck_assert_str_eq(conn_peer(s.c), "192.0.2.7");
	close(sv[1]);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* Every line read is answered with 1000 octets, whatever is queued. */
static void
amplify_hook(struct side *s, enum what w)
{
	char reply[1000];
	char *line;

	if (w != W_READ)
		return;
	memset(reply, 'r', sizeof(reply));
	while ((line = evbuffer_readln(conn_input(s->c), NULL, EVBUFFER_EOL_CRLF)) != NULL) {
		free(line);
		s->stage++;
		evbuffer_add(conn_output(s->c), reply, sizeof(reply));
	}
	conn_flush(s->c);
}

/*
 * A peer that sends commands and never reads the replies: once the output
 * reaches the high mark the connection stops reading, and resumes (for
 * what is still buffered, then the socket) once the peer has read it down
 * to the low mark.
 */
START_TEST(output_high_water)
{
	struct event_base *base = event_base_new();
	char lines[300 * 3], sink[65536];
	struct side s;
	int peer, before;
	size_t drained = 0;

	for (size_t i = 0; i < sizeof(lines); i += 3)
		memcpy(lines + i, "x\r\n", 3);
	side_init(&s, base, true, amplify_hook);
	s.keep_input = true;
	peer = pair_raw_sized(&s, 8192);
	conn_set_limits(s.c, 0, 8192, 2048);
	ck_assert_int_eq(write(peer, lines, 3 * 100), 3 * 100);
	while (s.stage < 100)
		ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
	/* 100 KB of replies, far more than the socket buffers take. */
	ck_assert_int_eq(write(peer, lines, 3 * 200), 3 * 200);
	settle(base, 150);
	before = s.reads;
	ck_assert_int_eq(s.stage, 100);        /* the second batch was not read */
	ck_assert_uint_gt(conn_pending_output(s.c), 2048);
	ck_assert_uint_eq(evbuffer_get_length(conn_input(s.c)), 0);

	/* The peer reads: the second batch is taken once the replies drain. */
	while (s.stage < 300) {
		ssize_t n = recv(peer, sink, sizeof(sink), MSG_DONTWAIT);

		if (n > 0)
			drained += (size_t)n;
		ck_assert_int_eq(event_base_loop(base, EVLOOP_NONBLOCK), 0);
	}
	ck_assert_int_gt(s.reads, before);
	ck_assert_int_eq(s.errors, 0);
	ck_assert_uint_gt(drained, 0);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* At most in_max octets wait in conn_input(); reading resumes as soon as
 * the owner drains some, even outside the connection's callbacks. */
START_TEST(input_limit)
{
	struct event_base *base = event_base_new();
	char data[5000];
	size_t taken = 0;
	struct side s;
	int peer;

	memset(data, 'i', sizeof(data));
	side_init(&s, base, true, NULL);
	s.keep_input = true;
	peer = pair_raw(&s);
	conn_set_limits(s.c, 1000, 0, 0);
	ck_assert_int_eq(write(peer, data, sizeof(data)), (ssize_t)sizeof(data));
	while (taken < sizeof(data)) {
		struct evbuffer *in = conn_input(s.c);

		while (evbuffer_get_length(in) < 1000 && taken + evbuffer_get_length(in) < sizeof(data))
			ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
		settle(base, 50);
		ck_assert_uint_le(evbuffer_get_length(in), 1000);
		taken += evbuffer_get_length(in);
		evbuffer_drain(in, evbuffer_get_length(in));
	}
	ck_assert_uint_eq(taken, sizeof(data));
	ck_assert_int_eq(s.errors, 0);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/*
 * Input the owner never read (a client that sent AUTH and hung up, or
 * pipelined it after STARTTLS) is wiped before the connection's buffers go
 * back to malloc.
 */
START_TEST(unread_input_wiped)
{
	static const char line[] = "AUTH PLAIN AHVzZXIAc2VjcmV0LXBhc3N3b3Jk\r\n";
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct side s;
	int peer;

	for (int starttls = 0; starttls < 2; starttls++) {
		side_init(&s, base, true, NULL);
		s.keep_input = true;
		peer = pair_raw(&s);
		freed_watch_secret("c2VjcmV0LXBhc3N3");
		ck_assert_int_eq(write(peer, line, sizeof(line) - 1), (ssize_t)sizeof(line) - 1);
		while (s.reads == 0)
			ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
		ck_assert_uint_eq(evbuffer_get_length(conn_input(s.c)), sizeof(line) - 1);
		if (starttls) {
			ck_assert_int_eq(conn_start_tls_server(s.c, sctx), 0);
			ck_assert_uint_eq(evbuffer_get_length(conn_input(s.c)), 0);
			ck_assert_uint_eq(freed_watch_hits(), 0);
		}
		side_fini(&s);
		ck_assert_uint_eq(freed_watch_hits(), 0);
		freed_watch_secret(NULL);
		close(peer);
	}
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* --- TLS ------------------------------------------------------------------- */

static void
ping_hook(struct side *s, enum what w)
{
	if (!s->server && w == W_TLS)
		conn_printf(s->c, "ping\r\n");
	if (s->server && w == W_READ && side_got(s, "ping\r\n"))
		conn_printf(s->c, "pong\r\n");
	if (!s->server && w == W_READ && side_got(s, "pong\r\n"))
		stop(s);
	if (w == W_ERROR && (s->other->errors > 0 || s->other->c == NULL))
		stop(s);
}

struct tls_case {
	struct tls_server_ctx *sctx;
	struct tls_client_ctx *cctx;
	struct side srv, cli;
	struct event_base *base;
};

static void
tls_case_run(struct tls_case *t, const char *cafile, bool verify, const char *name)
{
	t->base = event_base_new();
	t->sctx = server_ctx();
	t->cctx = client_ctx(cafile, verify, NULL);
	side_init(&t->srv, t->base, true, ping_hook);
	side_init(&t->cli, t->base, false, ping_hook);
	pair(&t->srv, &t->cli, 0);
	start_tls_pair(&t->srv, &t->cli, t->sctx, t->cctx, name);
	run(t->base);
}

static void
tls_case_fini(struct tls_case *t)
{
	side_fini(&t->srv);
	side_fini(&t->cli);
	tls_client_free(t->cctx);
	tls_server_free(t->sctx);
	event_base_free(t->base);
}

static void
assert_tls_ok(struct tls_case *t)
{
	ck_assert_int_eq(t->srv.errors + t->cli.errors, 0);
	ck_assert_int_eq(t->srv.tls_ready, 1);
	ck_assert_int_eq(t->cli.tls_ready, 1);
	ck_assert(side_got(&t->cli, "pong\r\n"));
	ck_assert(conn_is_tls(t->cli.c));
	ck_assert_msg(strncmp(t->cli.tls_desc, "TLSv1.3 cipher=", 15) == 0, "%s", t->cli.tls_desc);
	ck_assert_str_eq(t->cli.tls_desc, t->srv.tls_desc);
	ck_assert_ptr_null(strstr(t->cli.tls_desc, "resumed"));
}

START_TEST(tls_verified)
{
	struct tls_case t;

	tls_case_run(&t, pki.ca, true, SERVER_NAME);
	assert_tls_ok(&t);
	tls_case_fini(&t);
}
END_TEST

/* An IP literal is verified against the IP SAN, and sends no SNI. */
START_TEST(tls_verified_ip)
{
	struct tls_case t;

	tls_case_run(&t, pki.ca, true, "127.0.0.1");
	assert_tls_ok(&t);
	tls_case_fini(&t);
}
END_TEST

static void
assert_verify_failed(struct tls_case *t, const char *why)
{
	ck_assert_int_eq(t->cli.tls_ready, 0);
	ck_assert_int_eq(t->cli.errors, 1);
	ck_assert_int_eq(t->cli.err, CONN_TLS_ERROR);
	ck_assert_msg(strncmp(t->cli.detail, "certificate verify failed: ", 27) == 0,
	    "%s", t->cli.detail);
	ck_assert_msg(strstr(t->cli.detail, why) != NULL, "%s", t->cli.detail);
	ck_assert_msg(t->cli.detail[strlen(t->cli.detail) - 1] == '.', "%s", t->cli.detail);
	/* The client tells the server why, with an alert. */
	ck_assert_int_eq(t->srv.errors, 1);
	ck_assert_int_eq(t->srv.err, CONN_TLS_ERROR);
	ck_assert_msg(strstr(t->srv.detail, "alert received") != NULL, "%s", t->srv.detail);
}

START_TEST(tls_wrong_name)
{
	struct tls_case t;

	tls_case_run(&t, pki.ca, true, "other.test");
	assert_verify_failed(&t, "does not match");
	tls_case_fini(&t);
}
END_TEST

START_TEST(tls_untrusted_ca)
{
	struct tls_case t;

	tls_case_run(&t, pki.ca2, true, SERVER_NAME);
	assert_verify_failed(&t, "NOT trusted");
	tls_case_fini(&t);
}
END_TEST

START_TEST(tls_no_verify)
{
	struct tls_case t;

	tls_case_run(&t, pki.ca2, false, "other.test");
	assert_tls_ok(&t);
	tls_case_fini(&t);
}
END_TEST

/*
 * STARTTLS command injection (CVE-2011-0411): "RSET" pipelined after
 * STARTTLS in clear must never reach the server as if sent under TLS.
 */
static void
inject_server_hook(struct side *s, enum what w)
{
	struct evbuffer *in = conn_input(s->c);
	char *line;

	if (w == W_READ && s->stage == 0) {
		line = evbuffer_readln(in, NULL, EVBUFFER_EOL_CRLF_STRICT);
		ck_assert_str_eq(line, "STARTTLS");
		free(line);
		/* The injected command is there, so the test exercises the discard. */
		ck_assert_uint_eq(evbuffer_get_length(in), 6);
		conn_printf(s->c, "220 ready\r\n");
		s->stage = 1;
	} else if (w == W_FLUSHED && s->stage == 1) {
		ck_assert_int_eq(conn_start_tls_server(s->c, s->data), 0);
		ck_assert_uint_eq(evbuffer_get_length(in), 0);
		s->stage = 2;
	} else if (w == W_READ && s->stage == 2) {
		ck_assert(s->tls_ready == 1);
		line = evbuffer_readln(in, NULL, EVBUFFER_EOL_CRLF_STRICT);
		if (line == NULL)
			return;
		ck_assert_str_eq(line, "EHLO client");
		free(line);
		ck_assert_uint_eq(evbuffer_get_length(in), 0);
		stop(s);
	}
	ck_assert_int_eq(s->errors, 0);
}

static void
inject_client_hook(struct side *s, enum what w)
{
	if (w == W_READ && s->stage == 0 && side_got(s, "220 ready\r\n")) {
		evbuffer_drain(s->got, evbuffer_get_length(s->got));
		ck_assert_int_eq(conn_start_tls_client(s->c, s->data, SERVER_NAME), 0);
		s->stage = 1;
	} else if (w == W_TLS) {
		conn_printf(s->c, "EHLO client\r\n");
	}
	ck_assert_int_eq(s->errors, 0);
}

START_TEST(starttls_command_injection)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct tls_client_ctx *cctx = client_ctx(pki.ca, true, NULL);
	struct side srv, cli;

	side_init(&srv, base, true, inject_server_hook);
	side_init(&cli, base, false, inject_client_hook);
	srv.keep_input = true;
	srv.data = sctx;
	cli.data = cctx;
	pair(&srv, &cli, 0);
	/* One write, so both lines arrive in one read. */
	conn_printf(cli.c, "STARTTLS\r\nRSET\r\n");
	run(base);
	ck_assert_int_eq(srv.stage, 2);
	ck_assert_int_eq(srv.tls_ready + cli.tls_ready, 2);
	side_fini(&srv);
	side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* Response injection: a reply sent in clear after the 220 is discarded. */
static void
respinject_server_hook(struct side *s, enum what w)
{
	if (w == W_READ && s->stage == 0 && side_got(s, "STARTTLS\r\n")) {
		conn_printf(s->c, "220 ready\r\n250 injected\r\n");
		s->stage = 1;
	} else if (w == W_FLUSHED && s->stage == 1) {
		evbuffer_drain(s->got, evbuffer_get_length(s->got));
		ck_assert_int_eq(conn_start_tls_server(s->c, s->data), 0);
		s->stage = 2;
	} else if (w == W_TLS) {
		conn_printf(s->c, "250 real\r\n");
	}
}

static void
respinject_client_hook(struct side *s, enum what w)
{
	struct evbuffer *in = conn_input(s->c);
	char *line;

	if (w == W_READ && s->stage == 0) {
		line = evbuffer_readln(in, NULL, EVBUFFER_EOL_CRLF_STRICT);
		ck_assert_str_eq(line, "220 ready");
		free(line);
		ck_assert_uint_eq(evbuffer_get_length(in), 14);
		ck_assert_int_eq(conn_start_tls_client(s->c, s->data, SERVER_NAME), 0);
		ck_assert_uint_eq(evbuffer_get_length(in), 0);
		s->stage = 1;
	} else if (w == W_READ && s->stage == 1) {
		line = evbuffer_readln(in, NULL, EVBUFFER_EOL_CRLF_STRICT);
		if (line == NULL)
			return;
		ck_assert_str_eq(line, "250 real");
		free(line);
		s->stage = 2;
		stop(s);
	}
	ck_assert_int_eq(s->errors, 0);
}

START_TEST(starttls_response_injection)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct tls_client_ctx *cctx = client_ctx(pki.ca, true, NULL);
	struct side srv, cli;

	side_init(&srv, base, true, respinject_server_hook);
	side_init(&cli, base, false, respinject_client_hook);
	cli.keep_input = true;
	srv.data = sctx;
	cli.data = cctx;
	pair(&srv, &cli, 0);
	conn_printf(cli.c, "STARTTLS\r\n");
	run(base);
	ck_assert_int_eq(cli.stage, 2);
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	side_fini(&srv);
	side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* STARTTLS must wait for the 220 to be flushed, or the 220 would go out encrypted. */
START_TEST(starttls_refused_with_pending_output)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct side s;
	int peer;

	side_init(&s, base, true, NULL);
	peer = pair_raw(&s);
	conn_printf(s.c, "220 ready\r\n");
	ck_assert_int_eq(conn_start_tls_server(s.c, sctx), -1);
	ck_assert(!conn_is_tls(s.c));
	close(peer);
	side_fini(&s);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

static void
stop_on_error(struct side *s, enum what w)
{
	if (w == W_ERROR)
		stop(s);
}

START_TEST(tls_garbage_instead_of_client_hello)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	static const char garbage[] = "EHLO garbage\r\n";
	struct side s;
	int peer;

	side_init(&s, base, true, stop_on_error);
	peer = pair_raw(&s);
	ck_assert_int_eq(conn_start_tls_server(s.c, sctx), 0);
	ck_assert_int_eq(write(peer, garbage, sizeof(garbage) - 1), (ssize_t)sizeof(garbage) - 1);
	run(base);
	ck_assert_int_eq(s.err, CONN_TLS_ERROR);
	ck_assert_int_eq(s.reads + s.tls_ready, 0);
	ck_assert_msg(strstr(s.detail, "TLS handshake failed") != NULL, "%s", s.detail);
	close(peer);
	side_fini(&s);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

static void
resume_hook(struct side *s, enum what w)
{
	if (s->server && w == W_TLS)
		conn_printf(s->c, "hi\r\n");
	/* Reading after the handshake is what brings a TLS 1.3 ticket in. */
	if (!s->server && w == W_READ && side_got(s, "hi\r\n"))
		stop(s);
	ck_assert_int_eq(s->errors, 0);
}

static void
resume_once(struct event_base *base, struct tls_server_ctx *sctx,
    struct tls_client_ctx *cctx, char cli_desc[96], char srv_desc[96])
{
	struct side srv, cli;

	side_init(&srv, base, true, resume_hook);
	side_init(&cli, base, false, resume_hook);
	pair(&srv, &cli, 0);
	start_tls_pair(&srv, &cli, sctx, cctx, SERVER_NAME);
	run(base);
	ck_assert(side_got(&cli, "hi\r\n"));
	memcpy(cli_desc, cli.tls_desc, 96);
	memcpy(srv_desc, srv.tls_desc, 96);
	side_fini(&srv);
	side_fini(&cli);
}

/* _i = 0: TLS 1.3 (tickets after the handshake); _i = 1: TLS 1.2 tickets. */
START_TEST(tls_resumption)
{
	static const char *const prio[] = { NULL, "NORMAL:-VERS-ALL:+VERS-TLS1.2" };
	static const char *const proto[] = { "TLSv1.3 ", "TLSv1.2 " };
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct tls_client_ctx *cctx = client_ctx(pki.ca, true, prio[_i]);
	char c1[96], s1[96], c2[96], s2[96];

	resume_once(base, sctx, cctx, c1, s1);
	resume_once(base, sctx, cctx, c2, s2);
	ck_assert_msg(strncmp(c1, proto[_i], 8) == 0, "%s", c1);
	ck_assert_msg(strstr(c1, "resumed") == NULL, "%s", c1);
	ck_assert_msg(strstr(c2, " resumed") != NULL, "%s", c2);
	ck_assert_msg(strstr(s2, " resumed") != NULL, "%s", s2);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* TLS reader paused and resumed after every read still gets every byte and the EOF. */
static void
tls_pause_hook(struct side *s, enum what w)
{
	if (s->server && w == W_TLS) {
		bulk_send(s);
	} else if (s->server && w == W_FLUSHED) {
		conn_free(s->c);            /* close_notify, then close */
		s->c = NULL;
	} else if (!s->server && w == W_READ) {
		bulk_check(s);
		conn_pause_read(s->c);
		s->stage++;
	} else if (!s->server && w == W_ERROR) {
		stop(s);
	}
}

static void
resume_later(evutil_socket_t fd, short what, void *arg)
{
	struct side *s = arg;

	if (s->c != NULL)
		conn_resume_read(s->c);
}

START_TEST(tls_pause_resume)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct tls_client_ctx *cctx = client_ctx(pki.ca, true, NULL);
	struct bulk bc = { 0 };
	struct side srv, cli;
	int resumed = 0;

	side_init(&srv, base, true, tls_pause_hook);
	side_init(&cli, base, false, tls_pause_hook);
	cli.data = &bc;
	pair(&srv, &cli, 8192);
	start_tls_pair(&srv, &cli, sctx, cctx, SERVER_NAME);
	while (cli.errors == 0) {
		ck_assert_int_eq(event_base_loop(base, EVLOOP_ONCE), 0);
		if (cli.stage > resumed) {
			resumed = cli.stage;
			ck_assert_int_eq(event_base_once(base, -1, EV_TIMEOUT, resume_later,
			    &cli, NULL), 0);
		}
	}
	ck_assert_uint_eq(bc.rcvd, BULK_SIZE);
	ck_assert_int_eq(cli.err, CONN_EOF);
	side_fini(&srv);
	side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* --- connect and timeouts --------------------------------------------------- */

static int
loopback_socket(struct sockaddr_in *sin, bool listening)
{
	socklen_t len = sizeof(*sin);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	ck_assert_int_ge(fd, 0);
	memset(sin, 0, sizeof(*sin));
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	ck_assert_int_eq(bind(fd, (struct sockaddr *)sin, sizeof(*sin)), 0);
	ck_assert_int_eq(getsockname(fd, (struct sockaddr *)sin, &len), 0);
	if (listening)
		ck_assert_int_eq(listen(fd, 8), 0);
	return fd;
}

/* A bound socket that does not listen answers SYN with RST, and holds the port. */
START_TEST(connect_refused)
{
	struct event_base *base = event_base_new();
	struct sockaddr_in sin;
	struct side s;
	char want[64];
	int fd = loopback_socket(&sin, false);

	side_init(&s, base, false, stop_on_error);
	s.c = conn_connect(base, (struct sockaddr *)&sin, sizeof(sin), 5000, &side_cbs, &s);
	ck_assert_ptr_nonnull(s.c);
	run(base);
	snprintf(want, sizeof(want), "connect to 127.0.0.1:%u: Connection refused",
	    ntohs(sin.sin_port));
	ck_assert_int_eq(s.err, CONN_IO_ERROR);
	ck_assert_str_eq(s.detail, want);
	ck_assert_int_eq(s.connects, 0);
	close(fd);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

struct accept_ctx {
	struct side *srv;
	int lfd;
};

static void
on_accept(evutil_socket_t lfd, short what, void *arg)
{
	struct accept_ctx *a = arg;
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);

	ck_assert_int_ge(fd, 0);
	a->srv->c = conn_new(a->srv->base, fd, &side_cbs, a->srv);
	ck_assert_ptr_nonnull(a->srv->c);
}

static void
connect_hook(struct side *s, enum what w)
{
	if (!s->server && w == W_CONNECTED)
		conn_printf(s->c, "hello\r\n");
	if (s->server && w == W_READ && side_got(s, "hello\r\n"))
		stop(s);
}

START_TEST(connect_loopback)
{
	struct event_base *base = event_base_new();
	struct sockaddr_in sin;
	struct accept_ctx a;
	struct event *ev;
	struct side srv, cli;

	side_init(&srv, base, true, connect_hook);
	side_init(&cli, base, false, connect_hook);
	a.srv = &srv;
	a.lfd = loopback_socket(&sin, true);
	ev = event_new(base, a.lfd, EV_READ, on_accept, &a);
	event_add(ev, NULL);
	cli.c = conn_connect(base, (struct sockaddr *)&sin, sizeof(sin), 5000, &side_cbs, &cli);
	ck_assert_ptr_nonnull(cli.c);
	ck_assert_str_eq(conn_peer(cli.c), "127.0.0.1");
	run(base);
	ck_assert_int_eq(cli.connects, 1);
	ck_assert_str_eq(conn_peer(srv.c), "127.0.0.1");
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	event_free(ev);
	close(a.lfd);
	side_fini(&srv);
	side_fini(&cli);
	event_base_free(base);
}
END_TEST

/*
 * A listener whose accept queue is full drops SYNs: the next connect
 * neither succeeds nor fails, and its own timeout must end it.
 */
static void
connect_timeout_hook(struct side *s, enum what w)
{
	/* The connect timeout stays on as the read timeout: not wanted here. */
	if (w == W_CONNECTED)
		conn_set_timeout(s->c, 0);
	stop(s);
}

START_TEST(connect_timeout)
{
	struct event_base *base = event_base_new();
	struct sockaddr_in sin;
	struct side s[4];
	char want[80];
	int lfd = loopback_socket(&sin, false), i;

	ck_assert_int_eq(listen(lfd, 0), 0);
	for (i = 0; i < 4; i++) {
		side_init(&s[i], base, false, connect_timeout_hook);
		s[i].c = conn_connect(base, (struct sockaddr *)&sin, sizeof(sin), 200,
		    &side_cbs, &s[i]);
		ck_assert_ptr_nonnull(s[i].c);
		run(base);
		if (s[i].errors > 0)
			break;
		ck_assert_int_eq(s[i].connects, 1);
	}
	ck_assert_msg(i < 4, "every connect succeeded");
	snprintf(want, sizeof(want), "connect to 127.0.0.1:%u timed out after 200 ms",
	    ntohs(sin.sin_port));
	ck_assert_int_eq(s[i].err, CONN_TIMEOUT);
	ck_assert_str_eq(s[i].detail, want);
	for (int j = 0; j <= i && j < 4; j++)
		side_fini(&s[j]);
	close(lfd);
	event_base_free(base);
}
END_TEST

START_TEST(read_timeout)
{
	struct event_base *base = event_base_new();
	struct side s;
	double t0, elapsed;
	int peer;

	side_init(&s, base, true, stop_on_error);
	peer = pair_raw(&s);
	conn_set_timeout(s.c, 100);
	t0 = now_ms();
	run(base);
	elapsed = now_ms() - t0;
	ck_assert_int_eq(s.err, CONN_TIMEOUT);
	ck_assert_str_eq(s.detail, "no input for 100 ms");
	ck_assert_msg(elapsed >= 95 && elapsed < 5000, "%.0f ms", elapsed);
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* Input restarts the timer; a peer that stalls mid-handshake times out too. */
static void
timeout_hook(struct side *s, enum what w)
{
	if (w == W_READ && side_got(s, "x")) {
		ck_assert_int_eq(conn_start_tls_server(s->c, s->data), 0);
		s->stage = 1;
	}
	if (w == W_ERROR)
		stop(s);
}

START_TEST(handshake_timeout)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct side s;
	int peer;

	side_init(&s, base, true, timeout_hook);
	s.data = sctx;
	peer = pair_raw(&s);
	conn_set_timeout(s.c, 100);
	ck_assert_int_eq(write(peer, "x", 1), 1);
	run(base);
	ck_assert_int_eq(s.stage, 1);
	ck_assert_int_eq(s.err, CONN_TIMEOUT);
	ck_assert_str_eq(s.detail, "TLS handshake timed out after 100 ms");
	close(peer);
	side_fini(&s);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

/* --- conn_free() from inside callbacks (meaningful under ASan/valgrind) --- */

static void
free_hook(struct side *s, enum what w)
{
	if (w == (enum what)s->stage) {
		conn_free(s->c);
		s->c = NULL;
		if (s->other == NULL || s->other->c == NULL)
			stop(s);
	}
}

/* Data and EOF arrive in one read: freed in on_read, the EOF is never told. */
START_TEST(free_in_on_read)
{
	struct event_base *base = event_base_new();
	struct side s;
	int peer;

	side_init(&s, base, true, free_hook);
	s.stage = W_READ;
	peer = pair_raw(&s);
	ck_assert_int_eq(write(peer, "data", 4), 4);
	close(peer);
	run(base);
	ck_assert_int_eq(s.reads, 1);
	ck_assert_int_eq(s.errors, 0);
	ck_assert(side_got(&s, "data"));
	side_fini(&s);
	event_base_free(base);
}
END_TEST

START_TEST(free_in_on_flushed)
{
	struct event_base *base = event_base_new();
	struct side s;
	char buf[8];
	int peer;

	side_init(&s, base, true, free_hook);
	s.stage = W_FLUSHED;
	peer = pair_raw(&s);
	conn_printf(s.c, "bye\r\n");
	run(base);
	ck_assert_int_eq(s.flushes, 1);
	ck_assert_int_eq(read(peer, buf, sizeof(buf)), 5);
	ck_assert_int_eq(read(peer, buf, sizeof(buf)), 0);    /* closed by conn_free */
	close(peer);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

START_TEST(free_in_on_tls_ready)
{
	struct event_base *base = event_base_new();
	struct tls_server_ctx *sctx = server_ctx();
	struct tls_client_ctx *cctx = client_ctx(pki.ca, true, NULL);
	struct side srv, cli;

	side_init(&srv, base, true, free_hook);
	side_init(&cli, base, false, free_hook);
	srv.stage = cli.stage = W_TLS;
	pair(&srv, &cli, 0);
	start_tls_pair(&srv, &cli, sctx, cctx, SERVER_NAME);
	run(base);
	ck_assert_int_eq(srv.tls_ready + cli.tls_ready, 2);
	ck_assert_int_eq(srv.errors + cli.errors, 0);
	side_fini(&srv);
	side_fini(&cli);
	tls_client_free(cctx);
	tls_server_free(sctx);
	event_base_free(base);
}
END_TEST

START_TEST(free_in_on_connected)
{
	struct event_base *base = event_base_new();
	struct sockaddr_in sin;
	struct side s;
	int lfd = loopback_socket(&sin, true);

	side_init(&s, base, false, free_hook);
	s.stage = W_CONNECTED;
	s.c = conn_connect(base, (struct sockaddr *)&sin, sizeof(sin), 5000, &side_cbs, &s);
	run(base);
	ck_assert_int_eq(s.connects, 1);
	ck_assert_int_eq(s.errors, 0);
	close(lfd);
	side_fini(&s);
	event_base_free(base);
}
END_TEST

/* --- credentials ------------------------------------------------------------ */

START_TEST(server_ctx_mismatched_key)
{
	char err[512] = "", want[512];

	ck_assert_ptr_null(tls_server_new(pki.cert, pki.ca_key, NULL, err, sizeof(err)));
	snprintf(want, sizeof(want), "cannot load certificate %s / key %s: ", pki.cert, pki.ca_key);
	ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "%s", err);
	ck_assert_msg(strstr(err, "mismatched key?") != NULL || strstr(err, "do not match") != NULL,
	    "%s", err);
}
END_TEST

START_TEST(server_ctx_missing_file)
{
	char err[512] = "", path[160];

	snprintf(path, sizeof(path), "%s/missing.pem", pki.dir);
	ck_assert_ptr_null(tls_server_new(path, pki.key, NULL, err, sizeof(err)));
	ck_assert_msg(strstr(err, path) != NULL, "%s", err);
	ck_assert_msg(strstr(err, "No such file or directory") != NULL, "%s", err);

	ck_assert_ptr_null(tls_server_new(pki.cert, path, NULL, err, sizeof(err)));
	ck_assert_msg(strstr(err, path) != NULL, "%s", err);
}
END_TEST

START_TEST(server_ctx_bad_priority)
{
	char err[512] = "";

	ck_assert_ptr_null(tls_server_new(pki.cert, pki.key, "NORMAL:+BOGUS", err, sizeof(err)));
	ck_assert_msg(strstr(err, "NORMAL:+BOGUS") != NULL, "%s", err);
	ck_assert_msg(strstr(err, "at position 7") != NULL, "%s", err);
}
END_TEST

START_TEST(client_ctx_files)
{
	struct tls_client_ctx *ctx;
	char err[512] = "", path[160];

	snprintf(path, sizeof(path), "%s/missing.pem", pki.dir);
	ck_assert_ptr_null(tls_client_new(path, true, NULL, err, sizeof(err)));
	ck_assert_msg(strstr(err, path) != NULL, "%s", err);
	/* A key file holds no CA certificate. */
	ck_assert_ptr_null(tls_client_new(pki.key, true, NULL, err, sizeof(err)));
	ck_assert_msg(strstr(err, pki.key) != NULL, "%s", err);
	/* No verification: the CA file is not even read. */
	ctx = tls_client_new(path, false, NULL, err, sizeof(err));
	ck_assert_ptr_nonnull(ctx);
	tls_client_free(ctx);
}
END_TEST

static Suite *
conn_suite(void)
{
	Suite *s = suite_create("conn");
	TCase *tc;

	tc = tcase_create("plain");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, plain_echo);
	tcase_add_loop_test(tc, plain_bulk, 0, 2);
	tcase_add_loop_test(tc, write_to_closed_peer, 0, 2);
	tcase_add_test(tc, pause_resume_read);
	tcase_add_test(tc, interest_kept_in_conversation);
	tcase_add_test(tc, one_write_per_batch);
	tcase_add_test(tc, write_interest_only_when_full);
	tcase_add_test(tc, pause_parks_only_when_peer_sends);
	tcase_add_test(tc, hangup_while_paused);
	tcase_add_test(tc, accepted_with_peer_address);
	tcase_add_test(tc, unread_input_wiped);
	tcase_add_test(tc, output_high_water);
	tcase_add_test(tc, input_limit);
	suite_add_tcase(s, tc);

	tc = tcase_create("tls");
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, tls_verified);
	tcase_add_test(tc, tls_verified_ip);
	tcase_add_test(tc, tls_wrong_name);
	tcase_add_test(tc, tls_untrusted_ca);
	tcase_add_test(tc, tls_no_verify);
	tcase_add_loop_test(tc, tls_bulk, 0, 2);
	tcase_add_test(tc, tls_pause_resume);
	tcase_add_test(tc, starttls_command_injection);
	tcase_add_test(tc, starttls_response_injection);
	tcase_add_test(tc, starttls_refused_with_pending_output);
	tcase_add_test(tc, tls_garbage_instead_of_client_hello);
	tcase_add_loop_test(tc, tls_resumption, 0, 2);
	suite_add_tcase(s, tc);

	tc = tcase_create("connect_timeout");
	tcase_add_test(tc, connect_refused);
	tcase_add_test(tc, connect_loopback);
	tcase_add_test(tc, connect_timeout);
	tcase_add_test(tc, read_timeout);
	tcase_add_test(tc, handshake_timeout);
	suite_add_tcase(s, tc);

	tc = tcase_create("free_in_callback");
	tcase_add_test(tc, free_in_on_read);
	tcase_add_test(tc, free_in_on_flushed);
	tcase_add_test(tc, free_in_on_tls_ready);
	tcase_add_test(tc, free_in_on_connected);
	suite_add_tcase(s, tc);

	tc = tcase_create("credentials");
	tcase_add_test(tc, server_ctx_mismatched_key);
	tcase_add_test(tc, server_ctx_missing_file);
	tcase_add_test(tc, server_ctx_bad_priority);
	tcase_add_test(tc, client_ctx_files);
	suite_add_tcase(s, tc);
	return s;
}

int
main(void)
{
	SRunner *sr;
	int failed;

	freed_watch_install();          /* before libevent allocates anything */
	/* conn never raises SIGPIPE itself; this guards the tests' raw writes. */
	signal(SIGPIPE, SIG_IGN);
	if (tls_global_init() < 0) {
		fprintf(stderr, "tls_global_init failed\n");
		return 1;
	}
	pki_create();
	sr = srunner_create(conn_suite());
	srunner_run_all(sr, CK_ENV);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	pki_remove();
	tls_global_deinit();
	return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
