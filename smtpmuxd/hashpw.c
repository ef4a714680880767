/* SPDX-License-Identifier: MIT */
#include <crypt.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include "auth.h"
#include "hashpw.h"
#include "master.h"
#include "passwd.h"
#include "secret_file.h"

/* A line of at most SECRET_MAX octets plus its newline, one more to notice
 * a longer one. */
#define LINE_MAX_LEN (SECRET_MAX + 3)

/* Reads one line without its newline; -1 at end of input or when too long. */
static int
read_line(FILE *in, char *buf, size_t len)
{
	size_t n;

	if (fgets(buf, (int)len, in) == NULL)
		return -1;
	n = strlen(buf);
	if (n > 0 && buf[n - 1] == '\n')
		buf[--n] = '\0';
	else if (!feof(in))
		return -1;                   /* no newline within the limit */
	if (n > 0 && buf[n - 1] == '\r')
		buf[--n] = '\0';
	return 0;
}

/* Prompts on the terminal with echo off; the terminal is restored even
 * when reading fails. */
static int
read_hidden(const char *prompt, char *buf, size_t len)
{
	struct termios saved, quiet;
	int rc;

	if (tcgetattr(STDIN_FILENO, &saved) < 0)
		return -1;
	quiet = saved;
	quiet.c_lflag &= (tcflag_t)~(ECHO | ECHONL);
	quiet.c_lflag |= ICANON;
	/* Echo off before the prompt: what is typed after it is never shown. */
	if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet) < 0)
		return -1;
	fputs(prompt, stderr);
	fflush(stderr);
	rc = read_line(stdin, buf, len);
	tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
	fputc('\n', stderr);
	return rc;
}

static int
read_password(char *pw, size_t len)
{
	char again[LINE_MAX_LEN];
	bool same;

	if (!isatty(STDIN_FILENO))
		return read_line(stdin, pw, len);
	if (read_hidden("Password: ", pw, len) < 0 || read_hidden("Again: ", again, sizeof(again)) < 0) {
		auth_wipe(again, sizeof(again));
		return -1;
	}
	same = strcmp(pw, again) == 0;
	auth_wipe(again, sizeof(again));
	if (!same) {
		fprintf(stderr, "smtpmuxd: the passwords differ\n");
		return -2;
	}
	return 0;
}

int
hashpw_run(void)
{
	char pw[LINE_MAX_LEN], hash[CRYPT_OUTPUT_SIZE];
	int rc, status = SMTPMUXD_EXIT_USAGE;

	/* No copy of the password left behind in stdio's buffer. */
	setvbuf(stdin, NULL, _IONBF, 0);
	rc = read_password(pw, sizeof(pw));

	if (rc == -1)
		fprintf(stderr, "smtpmuxd: no password read (at most %d octets, on one line)\n",
		    SECRET_MAX);
	else if (rc == 0 && pw[0] == '\0')
		fprintf(stderr, "smtpmuxd: the password is empty\n");
	else if (rc == 0 && strlen(pw) > SECRET_MAX)
		fprintf(stderr, "smtpmuxd: the password is longer than %d octets\n", SECRET_MAX);
	else if (rc == 0 && passwd_hash_new(pw, hash, sizeof(hash)) < 0) {
		fprintf(stderr, "smtpmuxd: cannot hash the password: %s\n", strerror(errno));
		status = SMTPMUXD_EXIT_RUNTIME;
	} else if (rc == 0) {
		printf("%s\n", hash);
		status = fflush(stdout) == 0 ? SMTPMUXD_EXIT_OK : SMTPMUXD_EXIT_RUNTIME;
	}
	auth_wipe(pw, sizeof(pw));
	auth_wipe(hash, sizeof(hash));
	return status;
}
