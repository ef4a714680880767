/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <sys/mman.h>

#include "shared_anon.h"

void *
shared_anon_map(size_t size)
{
	void *p;

	if (size == 0) {
		errno = EINVAL;
		return NULL;
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

void
shared_anon_unmap(void *p, size_t size)
{
	if (p != NULL)
		munmap(p, size);
}
