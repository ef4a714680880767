/* SPDX-License-Identifier: MIT */
#include "helper_dns.h"
#include "log.h"

struct evdns_base *
helper_dns_create(struct event_base *base)
{
	struct evdns_base *dns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS);

	if (dns == NULL) {
		log_warn("no usable resolv.conf; only numeric addresses will resolve");
		dns = evdns_base_new(base, 0);
	}
	return dns;
}
