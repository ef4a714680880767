/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUXD_HELPER_DNS_H
#define SMTPMUXD_HELPER_DNS_H

#include <event2/dns.h>
#include <event2/event.h>

/*
 * The resolver of a helper child that connects to downstreams (the prober,
 * the queue runner); without a usable resolv.conf only numeric addresses
 * resolve (logged).
 */
struct evdns_base *helper_dns_create(struct event_base *base);

#endif
