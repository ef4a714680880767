/* SPDX-License-Identifier: MIT */
#include <gnutls/gnutls.h>

#include "buffer_wipe.h"

void
buffer_wipe_drain(struct evbuffer *buf, size_t len)
{
	size_t total = evbuffer_get_length(buf), done = 0;

	if (len > total)
		len = total;
	/* One chain at a time: its octets are contiguous and writable. */
	while (done < len) {
		struct evbuffer_ptr at;
		struct evbuffer_iovec v;
		size_t n;

		if (evbuffer_ptr_set(buf, &at, done, EVBUFFER_PTR_SET) < 0 ||
		    evbuffer_peek(buf, (ev_ssize_t)(len - done), &at, &v, 1) < 1 || v.iov_len == 0)
			break;
		n = v.iov_len < len - done ? v.iov_len : len - done;
		/* gnutls_memset: a plain memset before a free may be optimised away. */
		gnutls_memset(v.iov_base, 0, n);
		done += n;
	}
	evbuffer_drain(buf, len);
}

void
buffer_wipe_all(struct evbuffer *buf)
{
	buffer_wipe_drain(buf, evbuffer_get_length(buf));
}
