/* SPDX-License-Identifier: MIT */
#include <sys/random.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "queue_sched.h"

unsigned
queue_backoff(const struct queue_cfg *q, unsigned attempts, double rnd)
{
	uint64_t delay = q->min_backoff;
	double jittered;

	for (unsigned i = 1; i < attempts && delay < q->max_backoff; i++)
		delay *= 2;
	if (delay > q->max_backoff)
		delay = q->max_backoff;
	if (rnd < 0 || rnd >= 1)
		rnd = 0.5;
	jittered = (double)delay * (0.75 + rnd / 2);
	if (jittered < q->min_backoff)
		return q->min_backoff;
	if (jittered > q->max_backoff)
		return q->max_backoff;
	return (unsigned)(jittered + 0.5);
}

int64_t
queue_next_attempt(const struct queue_cfg *q, int64_t arrived, unsigned attempts,
    int64_t now, int64_t quota_reopens, double rnd)
{
	int64_t next = quota_reopens > 0 ? quota_reopens :
	    now + (int64_t)queue_backoff(q, attempts, rnd);
	int64_t end = arrived + (int64_t)q->max_lifetime;

	if (next > end)
		next = end;
	return next > now ? next : now + 1;
}

bool
queue_expired(const struct queue_cfg *q, int64_t arrived, int64_t now)
{
	return now - arrived >= (int64_t)q->max_lifetime;
}

bool
queue_delay_warning_due(const struct queue_cfg *q, int64_t arrived, int64_t now, bool warned)
{
	return q->delay_warning > 0 && !warned && now - arrived >= (int64_t)q->delay_warning;
}

uint64_t
queue_rand64(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

double
queue_random(uint64_t *state)
{
	return (double)(queue_rand64(state) >> 11) / 9007199254740992.0;  /* 2^53 */
}

uint64_t
queue_random_seed(void)
{
	uint64_t s = 0;

	if (getrandom(&s, sizeof(s), GRND_NONBLOCK) != (ssize_t)sizeof(s))
		s = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	return s;
}
