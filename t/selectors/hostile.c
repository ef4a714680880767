/* SPDX-License-Identifier: MIT */
/*
 * A compromised worker, as a selector (selectors run in the workers): on
 * its first select() it writes 0xff over every shared mapping it can
 * write, tries to make the read-only ones writable (mprotect, then
 * /proc/self/mem) and to write them too, and calls abort(): the master then
 * cleans up after a worker that scribbled on everything it could reach.
 * For the integration tests only; takes no parameters.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <smtpmux/selector.h>

static int
hostile_init(void **state, const struct smtpmux_selector_param *params,
    size_t n_params, char *err, size_t errlen)
{
	(void)params;
	if (n_params > 0) {
		snprintf(err, errlen, "hostile takes no parameters");
		return -1;
	}
	*state = NULL;
	return 0;
}

/* Shared mappings of smtpmux: the state file once, the memfds now, and
 * anonymous shared memory (the per-client table, the accept room). */
static int
is_target(const char *line)
{
	return strstr(line, "smtpmux") != NULL || strstr(line, ".state") != NULL ||
	    strstr(line, "/dev/zero") != NULL || strstr(line, "[anon_shmem") != NULL;
}

static void
scribble(void)
{
	FILE *maps = fopen("/proc/self/maps", "r");
	int mem = open("/proc/self/mem", O_RDWR);
	unsigned long lo, hi;
	char line[512], perms[8];

	while (maps != NULL && fgets(line, sizeof(line), maps) != NULL) {
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3 || perms[3] != 's' ||
		    !is_target(line))
			continue;
		if (perms[1] != 'w' &&
		    mprotect((void *)lo, hi - lo, PROT_READ | PROT_WRITE) < 0) {
			/* the kernel's way past page protections */
			for (unsigned long p = lo; mem >= 0 && p < hi && p < lo + 4096; p++)
				(void)!pwrite(mem, "\xff", 1, (off_t)p);
			continue;
		}
		memset((void *)lo, 0xff, hi - lo);
	}
	if (maps != NULL)
		fclose(maps);
}

static size_t
hostile_select(void *state, const struct smtpmux_envelope *env,
    const struct smtpmux_downstream_view *ds, size_t n, size_t *order)
{
	(void)state;
	(void)env;
	(void)ds;
	(void)n;
	(void)order;
	scribble();
	abort();
}

static void
hostile_fini(void *state)
{
	(void)state;
}

const struct smtpmux_selector smtpmux_selector = {
	.abi_version = SMTPMUX_SELECTOR_ABI_VERSION,
	.struct_size = sizeof(struct smtpmux_selector),
	.name = "hostile",
	.init = hostile_init,
	.select = hostile_select,
	.fini = hostile_fini,
};
