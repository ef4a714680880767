/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "passwd.h"
#include "passwd_offload.h"

/*
 * Two threads per worker: a second check need not wait behind a slow one,
 * and a flood of wrong passwords costs at most two cores' worth per
 * worker, which the pending bound then turns into 454s.
 */
#define OFFLOAD_THREADS 2

/* One check. Between the queue and the done list it belongs to the one
 * thread that took it, which reads given and stored and writes match. */
struct job {
	struct job *next;
	uint64_t ticket;
	char *given;                     /* the password: wiped before free */
	char *stored;
	bool match;
};

/* Who waits for a ticket's verdict: loop side only, never seen by a
 * thread, so a cancelled caller leaves nothing a thread could reach. */
struct waiter {
	uint64_t ticket;
	passwd_offload_done_fn done;
	void *arg;
};

struct passwd_offload {
	/* The loop's side. */
	struct event_base *base;
	struct passwd_cache *cache;
	struct event *ev_wake;
	struct waiter waiters[PASSWD_OFFLOAD_MAX_PENDING];
	unsigned n_waiters;
	uint64_t last_ticket;
	pthread_t threads[OFFLOAD_THREADS];
	unsigned n_threads;

	/*
	 * Shared with the threads, under mu. Finished jobs come back through
	 * a pipe and a read event rather than event_active() from a thread:
	 * that needs libevent's locking (evthread_use_pthreads) turned on
	 * for every event of the worker, for the sake of one wake-up; a
	 * write(2) to a pipe is thread-safe as it is and keeps libevent
	 * single-threaded.
	 */
	pthread_mutex_t mu;
	pthread_cond_t more;             /* the queue is not empty, or stopping */
	struct job *queue_head, *queue_tail;
	struct job *done;
	bool stopping;
	int wake[2];                     /* [1] written by threads, [0] read by the loop */
};

static void
job_free(struct job *j)
{
	if (j == NULL)
		return;
	if (j->given != NULL) {
		auth_wipe(j->given, strlen(j->given));
		free(j->given);
	}
	free(j->stored);
	free(j);
}

static void
jobs_free(struct job *j)
{
	while (j != NULL) {
		struct job *next = j->next;

		job_free(j);
		j = next;
	}
}

/* ---- the threads ---- */

/* Called with mu held. */
static struct job *
queue_pop(struct passwd_offload *o)
{
	struct job *j = o->queue_head;

	if (j != NULL) {
		o->queue_head = j->next;
		if (o->queue_head == NULL)
			o->queue_tail = NULL;
		j->next = NULL;
	}
	return j;
}

static void *
hash_thread(void *arg)
{
	struct passwd_offload *o = arg;

	pthread_mutex_lock(&o->mu);
	for (;;) {
		struct job *j;

		while (!o->stopping && o->queue_head == NULL)
			pthread_cond_wait(&o->more, &o->mu);
		if (o->stopping)
			break;
		j = queue_pop(o);
		pthread_mutex_unlock(&o->mu);

		j->match = passwd_hash_matches(j->given, j->stored);

		pthread_mutex_lock(&o->mu);
		j->next = o->done;
		o->done = j;
		/* One byte per batch: the loop takes the whole list. A failed
		 * write is a full pipe, which already holds a wake-up (nothing
		 * is logged here: the threads touch nothing of the loop's). */
		if (j->next == NULL && write(o->wake[1], "d", 1) < 0)
			continue;
	}
	pthread_mutex_unlock(&o->mu);
	return NULL;
}

/* ---- the loop's side ---- */

static struct waiter *
waiter_find(struct passwd_offload *o, uint64_t ticket)
{
	for (unsigned i = 0; i < o->n_waiters; i++)
		if (o->waiters[i].ticket == ticket)
			return &o->waiters[i];
	return NULL;
}

static void
waiter_remove(struct passwd_offload *o, struct waiter *w)
{
	*w = o->waiters[--o->n_waiters];
}

static void
deliver(struct passwd_offload *o, struct job *j)
{
	struct waiter *found = waiter_find(o, j->ticket);
	struct waiter w;

	if (found == NULL) {             /* cancelled: nobody to tell */
		job_free(j);
		return;
	}
	w = *found;
	waiter_remove(o, found);
	passwd_cache_note(o->cache, j->given, j->stored, j->match);
	w.done(w.arg, w.ticket, j->match);
	job_free(j);
}

static void
wake_cb(evutil_socket_t fd, short what, void *arg)
{
	struct passwd_offload *o = arg;
	struct job *list, *next;
	char buf[64];

	/* Drained before the list is taken: a job added after this read
	 * writes a new byte, so none is left behind without a wake-up. */
	while (read(fd, buf, sizeof(buf)) > 0)
		continue;
	pthread_mutex_lock(&o->mu);
	list = o->done;
	o->done = NULL;
	pthread_mutex_unlock(&o->mu);
	for (; list != NULL; list = next) {
		next = list->next;
		deliver(o, list);
	}
}

/* The threads take no signals: the worker's handlers, and its blocking
 * of stop signals at exit, apply to its loop thread only. */
static int
threads_start(struct passwd_offload *o)
{
	sigset_t all, old;
	int err = 0;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	for (; o->n_threads < OFFLOAD_THREADS; o->n_threads++)
		if ((err = pthread_create(&o->threads[o->n_threads], NULL, hash_thread, o)) != 0)
			break;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	errno = err;
	return err == 0 ? 0 : -1;
}

struct passwd_offload *
passwd_offload_new(struct event_base *base, struct passwd_cache *cache)
{
	struct passwd_offload *o = calloc(1, sizeof(*o));

	if (o == NULL)
		return NULL;
	o->base = base;
	o->cache = cache;
	o->wake[0] = o->wake[1] = -1;
	pthread_mutex_init(&o->mu, NULL);
	pthread_cond_init(&o->more, NULL);
	if (pipe2(o->wake, O_NONBLOCK | O_CLOEXEC) < 0 ||
	    (o->ev_wake = event_new(base, o->wake[0], EV_READ | EV_PERSIST, wake_cb, o)) == NULL ||
	    event_add(o->ev_wake, NULL) < 0 || threads_start(o) < 0) {
		int err = errno != 0 ? errno : ENOMEM;

		passwd_offload_free(o);
		errno = err;
		return NULL;
	}
	return o;
}

uint64_t
passwd_offload_submit(struct passwd_offload *o, const char *given, const char *stored,
    passwd_offload_done_fn done, void *arg)
{
	struct job *j;

	if (o->n_waiters == PASSWD_OFFLOAD_MAX_PENDING)
		return 0;
	if ((j = calloc(1, sizeof(*j))) == NULL || (j->given = strdup(given)) == NULL ||
	    (j->stored = strdup(stored)) == NULL) {
		job_free(j);
		return 0;
	}
	j->ticket = ++o->last_ticket;
	o->waiters[o->n_waiters++] = (struct waiter){ j->ticket, done, arg };
	pthread_mutex_lock(&o->mu);
	if (o->queue_tail != NULL)
		o->queue_tail->next = j;
	else
		o->queue_head = j;
	o->queue_tail = j;
	pthread_cond_signal(&o->more);
	pthread_mutex_unlock(&o->mu);
	return j->ticket;
}

/* Called with mu held: the job of ticket if no thread took it yet. */
static struct job *
queue_unlink(struct passwd_offload *o, uint64_t ticket)
{
	struct job *prev = NULL;

	for (struct job *j = o->queue_head; j != NULL; prev = j, j = j->next) {
		if (j->ticket != ticket)
			continue;
		if (prev != NULL)
			prev->next = j->next;
		else
			o->queue_head = j->next;
		if (o->queue_tail == j)
			o->queue_tail = prev;
		return j;
	}
	return NULL;
}

void
passwd_offload_cancel(struct passwd_offload *o, uint64_t ticket)
{
	struct waiter *w = waiter_find(o, ticket);
	struct job *j;

	if (w == NULL)
		return;
	waiter_remove(o, w);
	/* A job already running finishes; deliver() then finds no waiter. */
	pthread_mutex_lock(&o->mu);
	j = queue_unlink(o, ticket);
	pthread_mutex_unlock(&o->mu);
	job_free(j);
}

unsigned
passwd_offload_pending(const struct passwd_offload *o)
{
	return o->n_waiters;
}

void
passwd_offload_free(struct passwd_offload *o)
{
	if (o == NULL)
		return;
	pthread_mutex_lock(&o->mu);
	o->stopping = true;
	pthread_cond_broadcast(&o->more);
	pthread_mutex_unlock(&o->mu);
	for (unsigned i = 0; i < o->n_threads; i++)
		pthread_join(o->threads[i], NULL);
	jobs_free(o->queue_head);
	jobs_free(o->done);
	if (o->ev_wake != NULL)
		event_free(o->ev_wake);
	for (int i = 0; i < 2; i++)
		if (o->wake[i] >= 0)
			close(o->wake[i]);
	pthread_cond_destroy(&o->more);
	pthread_mutex_destroy(&o->mu);
	free(o);
}
