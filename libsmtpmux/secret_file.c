/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "auth.h"
#include "fd_write.h"
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
check_secret(const char *path, const char *s, size_t len, size_t max, char *why,
    size_t whylen)
{
	if (len == 0)
		snprintf(why, whylen, "%s is empty", path);
	else if (len > max)
		snprintf(why, whylen, "%s: the secret is longer than %zu octets", path, max);
	else if (memchr(s, '\0', len) != NULL)
		snprintf(why, whylen, "%s holds a NUL octet", path);
	else if (memchr(s, '\n', len) != NULL || memchr(s, '\r', len) != NULL)
		snprintf(why, whylen, "%s holds more than one line", path);
	else
		return 0;
	return -1;
}

char *
secret_file_read_path(const char *path, size_t max, char *why, size_t whylen)
{
	size_t cap = max + 3;                   /* the secret, CR LF, one more */
	char *buf = malloc(cap), *secret = NULL;
	ssize_t n;
	size_t len;

	if (buf == NULL) {
		snprintf(why, whylen, "out of memory");
		return NULL;
	}
	if ((n = read_some(path, buf, cap, why, whylen)) >= 0) {
		len = (size_t)n;
		if (len > 0 && buf[len - 1] == '\n')
			len--;
		if (len > 0 && buf[len - 1] == '\r' && len < (size_t)n)
			len--;
		if (check_secret(path, buf, len, max, why, whylen) == 0) {
			if ((secret = malloc(len + 1)) != NULL) {
				memcpy(secret, buf, len);
				secret[len] = '\0';
			} else
				snprintf(why, whylen, "out of memory");
		}
	}
	auth_wipe(buf, cap);
	free(buf);
	return secret;
}

char *
secret_file_read(const char *name, const char *config_dir, char *why, size_t whylen)
{
	char path[PATH_MAX];

	if (name[0] == '/')
		snprintf(path, sizeof(path), "%s", name);
	else if ((size_t)snprintf(path, sizeof(path), "%s/%s", base_dir(config_dir), name) >=
	    sizeof(path)) {
		snprintf(why, whylen, "file name too long");
		return NULL;
	}
	return secret_file_read_path(path, SECRET_MAX, why, whylen);
}

/* The rename is durable only once the folder's entry is on disk too. */
static int
sync_folder(const char *path)
{
	char dir[PATH_MAX];
	char *slash;
	int fd, rc;

	snprintf(dir, sizeof(dir), "%s", path);
	slash = strrchr(dir, '/');
	if (slash == NULL)
		snprintf(dir, sizeof(dir), ".");
	else
		slash[slash == dir] = '\0';
	if ((fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)) < 0)
		return -1;
	rc = fsync(fd);
	close(fd);
	return rc;
}

int
secret_file_replace(const char *path, const char *value, char *why, size_t whylen)
{
	char tmp[PATH_MAX];
	int fd, saved;

	if (snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path) >= (int)sizeof(tmp)) {
		snprintf(why, whylen, "cannot write %s: name too long", path);
		return -1;
	}
	if ((fd = mkstemp(tmp)) < 0) {
		snprintf(why, whylen, "cannot write %s: %s", tmp, strerror(errno));
		return -1;
	}
	if (fchmod(fd, 0600) < 0 || fd_write_all(fd, value, strlen(value)) < 0 ||
	    fd_write_all(fd, "\n", 1) < 0 || fsync(fd) < 0) {
		saved = errno;
		close(fd);
		unlink(tmp);
		snprintf(why, whylen, "cannot write %s: %s", tmp, strerror(saved));
		return -1;
	}
	if (close(fd) < 0 || rename(tmp, path) < 0) {
		saved = errno;
		unlink(tmp);
		snprintf(why, whylen, "cannot replace %s: %s", path, strerror(saved));
		return -1;
	}
	if (sync_folder(path) < 0) {
		snprintf(why, whylen, "%s replaced, but its folder cannot be synced: %s", path,
		    strerror(errno));
		return -1;
	}
	return 0;
}
