/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "queue_sched.h"
#include "fd_write.h"
#include "spool.h"
#include "spool_writer.h"

/*
 * Threads: the loop thread submits jobs (pending list) and takes reports
 * (done list); the writer thread moves jobs from one list to the other.
 * Both lists are guarded by one mutex; a job's own fields belong to the
 * writer thread from submission until it is on the done list, except
 * `forgotten`, which only the loop thread ever touches.
 */

#define COPY_CHUNK (64 * 1024)
/*
 * fdatasync()s of a batch run this many at once (the writer thread and its
 * helpers): one at a time, each waits for its own flush of the device's
 * cache; side by side, the block layer merges their flushes, and a batch
 * costs about one (measured 5-10 times faster on a loaded disk).
 */
#define SYNC_HELPERS 3

struct spool_job {
	struct spool_job *next;
	/* input, filled by the loop thread */
	char *head;                      /* the spool header */
	size_t head_len;
	char *mem;                       /* the body, when it was in memory */
	int body_fd;                     /* else a dup of its file, -1 */
	uint64_t body_off, body_size;
	/* the writer thread's */
	int fd;
	char tmpname[48];
	bool published;
	struct spool_result res;
	/* the loop thread's */
	spool_done_fn done;
	void *arg;
	bool forgotten;
};

/* One round of fdatasync()s shared by the writer thread and the helpers. */
struct sync_round {
	pthread_mutex_t mu;
	pthread_cond_t go, done;
	struct spool_job **jobs;         /* this round's; valid while it runs */
	size_t n;
	atomic_size_t next;              /* the next job to take */
	size_t finished;                 /* jobs synced */
	unsigned active;                 /* helpers inside the round */
	unsigned long gen;               /* which round: a helper takes part once */
	bool stop;
	pthread_t helpers[SYNC_HELPERS];
	unsigned n_helpers;
};

struct spool_writer {
	struct spool *spool;
	struct queue_stats *stats;
	uint64_t max_size;
	struct event_base *base;
	struct event *ev_done;
	int pipe_rd, pipe_wr;
	pthread_t thread;
	bool thread_started;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	struct spool_job *pending, **pending_tail;
	struct spool_job *done, **done_tail;
	bool stopping;
	/* the writer thread's own */
	uint64_t rng;
	unsigned long seq;
	struct sync_round sync;
};

static void
job_free(struct spool_job *j)
{
	if (j->body_fd >= 0)
		close(j->body_fd);
	free(j->head);
	free(j->mem);
	free(j);
}

/* --- the writer thread */

static int
copy_body(int to, int from, uint64_t off, uint64_t size)
{
	char buf[COPY_CHUNK];
	ssize_t n;

	while (size > 0) {
		n = pread(from, buf, size < sizeof(buf) ? (size_t)size : sizeof(buf), (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO;         /* the body file is shorter than it said */
			return -1;
		}
		if (fd_write_all(to, buf, (size_t)n) < 0)
			return -1;
		off += (uint64_t)n;
		size -= (uint64_t)n;
	}
	return 0;
}

static void
job_fail(struct spool_job *j, const char *step)
{
	if (j->res.err == 0) {
		j->res.err = errno != 0 ? errno : EIO;
		j->res.step = step;
	}
}

static void
write_one(struct spool_writer *w, struct spool_job *j, uint64_t *batch_bytes)
{
	uint64_t total = j->head_len + j->body_size;

	if (w->max_size > 0 && queue_stats_bytes(w->stats) + *batch_bytes + total > w->max_size) {
		errno = EDQUOT;
		job_fail(j, "max_size");
		return;
	}
	snprintf(j->tmpname, sizeof(j->tmpname), "w%ld-%lu", (long)getpid(), w->seq++);
	if ((j->fd = spool_tmp_create(w->spool, j->tmpname)) < 0) {
		job_fail(j, "create");
		return;
	}
	if (fd_write_all(j->fd, j->head, j->head_len) < 0 ||
	    (j->mem != NULL ? fd_write_all(j->fd, j->mem, (size_t)j->body_size) :
	    copy_body(j->fd, j->body_fd, j->body_off, j->body_size)) < 0) {
		job_fail(j, "write");
		return;
	}
	*batch_bytes += total;
}

/* Undoes what a failed job left behind. */
static void
job_cleanup(struct spool_writer *w, struct spool_job *j)
{
	if (j->res.err != 0 && j->published)
		spool_unpublish(w->spool, j->res.id);
	else if (j->res.err != 0 && j->fd >= 0)
		spool_tmp_remove(w->spool, j->tmpname);
	if (j->fd >= 0)
		close(j->fd);             /* releases the lock, after the rename */
	j->fd = -1;
}

/* Takes jobs of the round until none is left; returns how many. */
static size_t
sync_some(struct spool_job **jobs, size_t n, atomic_size_t *next)
{
	size_t i, did = 0;

	while ((i = atomic_fetch_add(next, 1)) < n) {
		if (fdatasync(jobs[i]->fd) < 0)
			job_fail(jobs[i], "fsync");
		did++;
	}
	return did;
}

static void *
sync_helper_main(void *arg)
{
	struct sync_round *r = arg;
	unsigned long seen = 0;
	struct spool_job **jobs;
	size_t n, did;

	pthread_mutex_lock(&r->mu);
	for (;;) {
		while (r->gen == seen && !r->stop)
			pthread_cond_wait(&r->go, &r->mu);
		if (r->stop)
			break;
		seen = r->gen;
		jobs = r->jobs;
		n = r->n;
		r->active++;
		pthread_mutex_unlock(&r->mu);
		did = sync_some(jobs, n, &r->next);
		pthread_mutex_lock(&r->mu);
		r->finished += did;
		r->active--;
		pthread_cond_signal(&r->done);
	}
	pthread_mutex_unlock(&r->mu);
	return NULL;
}

/*
 * fdatasync()s every job of the batch still going, side by side. The round
 * ends when every job is synced and no helper is inside it any more, so a
 * late helper can never take a job of the next round for one of this one.
 */
static void
sync_batch(struct spool_writer *w, struct spool_job *batch)
{
	struct sync_round *r = &w->sync;
	struct spool_job *list[256], *j = batch;
	size_t n, did;

	while (j != NULL) {
		for (n = 0; j != NULL && n < sizeof(list) / sizeof(list[0]); j = j->next)
			if (j->res.err == 0)
				list[n++] = j;
		pthread_mutex_lock(&r->mu);
		r->jobs = list;
		r->n = n;
		atomic_store(&r->next, 0);
		r->finished = 0;
		r->gen++;
		pthread_cond_broadcast(&r->go);
		pthread_mutex_unlock(&r->mu);
		did = sync_some(list, n, &r->next);
		pthread_mutex_lock(&r->mu);
		r->finished += did;
		while (r->finished < n || r->active > 0)
			pthread_cond_wait(&r->done, &r->mu);
		pthread_mutex_unlock(&r->mu);
	}
}

static void
commit_batch(struct spool_writer *w, struct spool_job *batch)
{
	uint64_t bytes = 0;
	unsigned published = 0;
	struct spool_job *j;

	for (j = batch; j != NULL; j = j->next)
		write_one(w, j, &bytes);
	sync_batch(w, batch);
	for (j = batch; j != NULL; j = j->next) {
		if (j->res.err != 0)
			continue;
		if (spool_publish(w->spool, j->tmpname, j->res.id, &w->rng) < 0)
			job_fail(j, "rename");
		else {
			j->published = true;
			published++;
		}
	}
	/* One fsync of msg/ makes every rename of the batch durable. */
	if (published > 0 && spool_sync(w->spool) < 0)
		for (j = batch; j != NULL; j = j->next)
			if (j->published)
				job_fail(j, "fsync of msg/");
	for (j = batch; j != NULL; j = j->next) {
		job_cleanup(w, j);
		j->res.batch = published;
		if (j->res.err == 0)
			queue_stats_added(w->stats, j->head_len + j->body_size);
	}
}

static void *
writer_main(void *arg)
{
	struct spool_writer *w = arg;
	struct spool_job *batch, *last;
	char one = 1;

	for (;;) {
		pthread_mutex_lock(&w->mu);
		while (w->pending == NULL && !w->stopping)
			pthread_cond_wait(&w->cv, &w->mu);
		batch = w->pending;
		w->pending = NULL;
		w->pending_tail = &w->pending;
		pthread_mutex_unlock(&w->mu);
		if (batch == NULL)
			return NULL;             /* stopping, and nothing left to write */
		commit_batch(w, batch);
		for (last = batch; last->next != NULL; last = last->next)
			;
		pthread_mutex_lock(&w->mu);
		*w->done_tail = batch;
		w->done_tail = &last->next;
		pthread_mutex_unlock(&w->mu);
		/* A full pipe already holds a wake-up: EAGAIN is fine. */
		(void)!write(w->pipe_wr, &one, 1);
	}
}

/* --- the loop thread */

static void
on_done(evutil_socket_t fd, short what, void *arg)
{
	struct spool_writer *w = arg;
	struct spool_job *list, *next;
	char buf[256];

	while (read(w->pipe_rd, buf, sizeof(buf)) > 0)
		;
	pthread_mutex_lock(&w->mu);
	list = w->done;
	w->done = NULL;
	w->done_tail = &w->done;
	pthread_mutex_unlock(&w->mu);
	for (; list != NULL; list = next) {
		next = list->next;
		if (!list->forgotten)
			list->done(list->arg, &list->res);
		job_free(list);
	}
}

struct spool_writer *
spool_writer_new(struct event_base *base, const char *dir, struct queue_stats *stats,
    uint64_t max_size, char *err, size_t errlen)
{
	struct spool_writer *w = calloc(1, sizeof(*w));
	int fds[2];

	if (w == NULL) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	w->pipe_rd = w->pipe_wr = -1;
	w->pending_tail = &w->pending;
	w->done_tail = &w->done;
	w->stats = stats;
	w->max_size = max_size;
	w->base = base;
	w->rng = queue_random_seed();
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	pthread_mutex_init(&w->sync.mu, NULL);
	pthread_cond_init(&w->sync.go, NULL);
	pthread_cond_init(&w->sync.done, NULL);
	if ((w->spool = spool_open(dir, err, errlen)) == NULL)
		goto fail;
	if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0) {
		snprintf(err, errlen, "pipe: %s", strerror(errno));
		goto fail;
	}
	w->pipe_rd = fds[0];
	w->pipe_wr = fds[1];
	if ((w->ev_done = event_new(base, w->pipe_rd, EV_READ | EV_PERSIST, on_done, w)) == NULL ||
	    event_add(w->ev_done, NULL) < 0) {
		snprintf(err, errlen, "out of memory");
		goto fail;
	}
	if ((errno = pthread_create(&w->thread, NULL, writer_main, w)) != 0) {
		snprintf(err, errlen, "cannot start the spool writer thread: %s", strerror(errno));
		goto fail;
	}
	w->thread_started = true;
	/* Without helpers the writer syncs alone: slower, still correct. */
	while (w->sync.n_helpers < SYNC_HELPERS &&
	    pthread_create(&w->sync.helpers[w->sync.n_helpers], NULL, sync_helper_main,
	        &w->sync) == 0)
		w->sync.n_helpers++;
	return w;
fail:
	spool_writer_free(w);
	return NULL;
}

void
spool_writer_free(struct spool_writer *w)
{
	struct spool_job *j, *next;

	if (w == NULL)
		return;
	if (w->thread_started) {
		pthread_mutex_lock(&w->mu);
		w->stopping = true;
		pthread_cond_signal(&w->cv);
		pthread_mutex_unlock(&w->mu);
		pthread_join(w->thread, NULL);
	}
	pthread_mutex_lock(&w->sync.mu);
	w->sync.stop = true;
	pthread_cond_broadcast(&w->sync.go);
	pthread_mutex_unlock(&w->sync.mu);
	for (unsigned i = 0; i < w->sync.n_helpers; i++)
		pthread_join(w->sync.helpers[i], NULL);
	for (j = w->done; j != NULL; j = next) {
		next = j->next;
		job_free(j);
	}
	if (w->ev_done != NULL)
		event_free(w->ev_done);
	if (w->pipe_rd >= 0)
		close(w->pipe_rd);
	if (w->pipe_wr >= 0)
		close(w->pipe_wr);
	spool_close(w->spool);
	pthread_cond_destroy(&w->cv);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->sync.go);
	pthread_cond_destroy(&w->sync.done);
	pthread_mutex_destroy(&w->sync.mu);
	free(w);
}

/* The body as the thread will read it: a copy of memory, a dup of a file. */
static int
job_take_body(struct spool_job *j, struct msgbody *body)
{
	uint64_t off, got = 0;
	int fd = msgbody_file(body, &off);
	ssize_t n;

	j->body_size = msgbody_size(body);
	if (fd >= 0) {
		j->body_off = off;
		return (j->body_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0 ? -1 : 0;
	}
	if ((j->mem = malloc(j->body_size ? (size_t)j->body_size : 1)) == NULL)
		return -1;
	while (got < j->body_size) {
		n = msgbody_read(body, got, j->mem + got, (size_t)(j->body_size - got));
		if (n <= 0)
			return -1;
		got += (uint64_t)n;
	}
	return 0;
}

struct spool_job *
spool_writer_submit(struct spool_writer *w, const char *id, const struct spool_env *env,
    struct msgbody *body, spool_done_fn done, void *arg)
{
	struct spool_job *j = calloc(1, sizeof(*j));
	struct spool_env sized;

	if (j == NULL)
		return NULL;
	j->body_fd = -1;
	j->fd = -1;
	j->done = done;
	j->arg = arg;
	snprintf(j->res.id, sizeof(j->res.id), "%s", id);
	sized = *env;
	sized.size = msgbody_size(body);
	if (!spool_id_valid(id, strlen(id)) || job_take_body(j, body) < 0 ||
	    spool_format_message(&sized, &j->head, &j->head_len) < 0) {
		job_free(j);
		return NULL;
	}
	pthread_mutex_lock(&w->mu);
	*w->pending_tail = j;
	w->pending_tail = &j->next;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
	return j;
}

void
spool_job_forget(struct spool_job *j)
{
	if (j != NULL)
		j->forgotten = true;
}
