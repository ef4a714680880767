/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <event2/event.h>

#include "auth.h"
#include "token_command.h"

#define OUTPUT_MAX (64 * 1024)           /* a token, or a JSON token response */

struct command_run {
	pid_t pid;
	int fd;                              /* its standard output; -1 at EOF */
	struct event *ev_out;
	struct event *ev_timer;
	char *out;
	size_t len;
	unsigned timeout_s;
	bool timed_out, too_much;
	command_done_fn done;
	void *arg;
};

/* --- the child --------------------------------------------------------- */

/* What the helper ignores or blocks must not be inherited by the command. */
static void
child_reset_signals(void)
{
	static const int ignored[] = { SIGPIPE, SIGHUP, SIGINT };
	sigset_t none;

	for (size_t i = 0; i < sizeof(ignored) / sizeof(ignored[0]); i++)
		signal(ignored[i], SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
}

static void
child_close_others(void)
{
	if (close_range(3, ~0U, 0) == 0)
		return;
	for (int fd = 3; fd < 1024; fd++)
		close(fd);
}

static void __attribute__((noreturn))
child_exec(char *const argv[], int out_fd)
{
	int null = open("/dev/null", O_RDWR);

	setpgid(0, 0);
	child_reset_signals();
	if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(out_fd, STDOUT_FILENO) < 0 ||
	    dup2(null, STDERR_FILENO) < 0)
		_exit(126);
	child_close_others();
	execvp(argv[0], argv);
	_exit(127);
}

/* --- the helper's side ------------------------------------------------- */

static void
kill_group(struct command_run *run)
{
	if (kill(-run->pid, SIGKILL) < 0 && errno == ESRCH)
		kill(run->pid, SIGKILL);
}

static void
close_output(struct command_run *run)
{
	if (run->fd < 0)
		return;
	if (run->ev_out != NULL)
		event_del(run->ev_out);
	close(run->fd);
	run->fd = -1;
}

/* Whatever the pipe holds now; EOF closes it. */
static void
read_output(struct command_run *run)
{
	for (;;) {
		ssize_t n;

		if (run->len == OUTPUT_MAX) {
			run->too_much = true;
			kill_group(run);
			close_output(run);
			return;
		}
		n = read(run->fd, run->out + run->len, OUTPUT_MAX - run->len);
		if (n > 0) {
			run->len += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
			close_output(run);
		return;
	}
}

static void
on_output(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	read_output(arg);
}

static void
on_timeout(evutil_socket_t fd, short what, void *arg)
{
	struct command_run *run = arg;

	(void)fd;
	(void)what;
	run->timed_out = true;
	kill_group(run);
}

static void
run_free(struct command_run *run)
{
	close_output(run);
	if (run->ev_out != NULL)
		event_free(run->ev_out);
	if (run->ev_timer != NULL)
		event_free(run->ev_timer);
	if (run->out != NULL) {
		auth_wipe(run->out, OUTPUT_MAX);
		free(run->out);
	}
	free(run);
}

static const char *
describe(const struct command_run *run, int status, char *buf, size_t len)
{
	if (run->timed_out)
		snprintf(buf, len, "timed out after %u s", run->timeout_s);
	else if (run->too_much)
		snprintf(buf, len, "printed more than %d KiB", OUTPUT_MAX / 1024);
	else if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
		snprintf(buf, len, "could not be run (exit status 127)");
	else if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
		snprintf(buf, len, "exited with status %d", WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		snprintf(buf, len, "killed by signal %d", WTERMSIG(status));
	else
		return NULL;
	return buf;
}

void
command_reap(struct command_run *run)
{
	char buf[64];
	const char *why;
	int status;
	pid_t r;

	while ((r = waitpid(run->pid, &status, WNOHANG)) < 0 && errno == EINTR)
		;
	if (r != run->pid)
		return;
	/* A grandchild may hold the pipe open: take what is there now. */
	if (run->fd >= 0)
		read_output(run);
	why = describe(run, status, buf, sizeof(buf));
	run->done(run->arg, run->out, run->len, why);
	run_free(run);
}

struct command_run *
command_start(struct event_base *base, char *const argv[], unsigned timeout_s,
    command_done_fn done, void *arg)
{
	struct command_run *run = calloc(1, sizeof(*run));
	struct timeval tv = { (time_t)timeout_s, 0 };
	int pipefd[2] = { -1, -1 };

	if (run == NULL)
		return NULL;
	run->fd = -1;
	run->timeout_s = timeout_s;
	run->done = done;
	run->arg = arg;
	if ((run->out = malloc(OUTPUT_MAX)) == NULL || pipe2(pipefd, O_CLOEXEC) < 0)
		goto fail;
	run->pid = fork();
	if (run->pid == 0)
		child_exec(argv, pipefd[1]);
	close(pipefd[1]);
	run->fd = pipefd[0];
	if (run->pid < 0)
		goto fail;
	setpgid(run->pid, run->pid);         /* whichever of the two runs first */
	if (fcntl(run->fd, F_SETFL, O_NONBLOCK) < 0 ||
	    (run->ev_out = event_new(base, run->fd, EV_READ | EV_PERSIST, on_output, run)) == NULL ||
	    (run->ev_timer = evtimer_new(base, on_timeout, run)) == NULL ||
	    event_add(run->ev_out, NULL) < 0 || evtimer_add(run->ev_timer, &tv) < 0) {
		command_cancel(run);
		return NULL;
	}
	return run;
fail:
	if (pipefd[0] >= 0 && run->fd < 0)
		close(pipefd[0]);
	run_free(run);
	return NULL;
}

void
command_cancel(struct command_run *run)
{
	if (run == NULL)
		return;
	if (run->pid > 0) {
		kill_group(run);
		while (waitpid(run->pid, NULL, 0) < 0 && errno == EINTR)
			;
	}
	run_free(run);
}
