/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sealed_memfd.h"

void
close_keep_errno(int fd)
{
	int saved = errno;

	if (fd >= 0)
		close(fd);
	errno = saved;
}

void
unmap_keep_errno(void *p, size_t size)
{
	int saved = errno;

	if (p != NULL && p != MAP_FAILED)
		munmap(p, size);
	errno = saved;
}

/* A second open file description of fd, read-only: what can be handed out. */
static int
reopen_readonly(int fd)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	return open(path, O_RDONLY | O_CLOEXEC);
}

int
sealed_memfd_make(const char *name, size_t size, unsigned seals, void **rw, void **ro)
{
	int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING), rofd = -1;
	void *w = MAP_FAILED, *r = MAP_FAILED;

	if (fd < 0)
		return -1;
	if (ftruncate(fd, (off_t)size) < 0 ||
	    (w = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)) == MAP_FAILED ||
	    (rofd = reopen_readonly(fd)) < 0 ||
	    (r = mmap(NULL, size, PROT_READ, MAP_SHARED, rofd, 0)) == MAP_FAILED ||
	    fchmod(fd, 0400) < 0 || fcntl(fd, F_ADD_SEALS, seals) < 0) {
		unmap_keep_errno(w, size);
		unmap_keep_errno(r, size);
		close_keep_errno(rofd);
		close_keep_errno(fd);
		return -1;
	}
	close(fd);
	*rw = w;
	*ro = r;
	return rofd;
}

void *
sealed_memfd_map_foreign(int fd, size_t size)
{
	struct stat st;
	int seals = fcntl(fd, F_GET_SEALS);
	void *p;

	if (fstat(fd, &st) < 0)
		return NULL;
	if (!S_ISREG(st.st_mode) || st.st_size != (off_t)size || seals < 0 ||
	    !(seals & F_SEAL_SHRINK)) {
		errno = EPROTO;
		return NULL;
	}
	p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
	return p == MAP_FAILED ? NULL : p;
}
