/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "secret_file.h"

static const char *
base_dir(const char *config_dir)
{
	const char *creds = getenv("CREDENTIALS_DIRECTORY");

	return creds != NULL && creds[0] != '\0' ? creds : config_dir;
}

/* Reads at most len octets (one more than a secret may have). */
static ssize_t
read_some(const char *path, char *buf, size_t len, char *why, size_t whylen)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	size_t got = 0;
	ssize_t n = 0;

	if (fd < 0) {
		snprintf(why, whylen, "cannot open %s: %s", path, strerror(errno));
		return -1;
	}
	while (got < len && (n = read(fd, buf + got, len - got)) > 0)
		got += (size_t)n;
	if (n < 0)
		snprintf(why, whylen, "cannot read %s: %s", path, strerror(errno));
	close(fd);
	return n < 0 ? -1 : (ssize_t)got;
}

static int
check_secret(const char *path, const char *s, size_t len, char *why, size_t whylen)
{
	if (len == 0)
		snprintf(why, whylen, "%s is empty", path);
	else if (len > SECRET_MAX)
		snprintf(why, whylen, "%s: the secret is longer than %d octets", path, SECRET_MAX);
	else if (memchr(s, '\0', len) != NULL)
		snprintf(why, whylen, "%s holds a NUL octet", path);
	else if (memchr(s, '\n', len) != NULL || memchr(s, '\r', len) != NULL)
		snprintf(why, whylen, "%s holds more than one line", path);
	else
		return 0;
	return -1;
}

char *
secret_file_read(const char *name, const char *config_dir, char *why, size_t whylen)
{
	char path[PATH_MAX], buf[SECRET_MAX + 3];   /* the secret, CR LF, one more */
	char *secret = NULL;
	ssize_t n;
	size_t len;

	if (name[0] == '/')
		snprintf(path, sizeof(path), "%s", name);
	else if ((size_t)snprintf(path, sizeof(path), "%s/%s", base_dir(config_dir), name) >=
	    sizeof(path)) {
		snprintf(why, whylen, "file name too long");
		return NULL;
	}
	if ((n = read_some(path, buf, sizeof(buf), why, whylen)) < 0)
		return NULL;
	len = (size_t)n;
	if (len > 0 && buf[len - 1] == '\n')
		len--;
	if (len > 0 && buf[len - 1] == '\r' && len < (size_t)n)
		len--;
	if (check_secret(path, buf, len, why, whylen) == 0) {
		if ((secret = malloc(len + 1)) != NULL) {
			memcpy(secret, buf, len);
			secret[len] = '\0';
		} else
			snprintf(why, whylen, "out of memory");
	}
	auth_wipe(buf, sizeof(buf));
	return secret;
}
