/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_SMTP_LIMITS_H
#define SMTPMUX_SMTP_LIMITS_H

#include <stdint.h>

/*
 * The arithmetic of the session's defences against slow and guessing
 * clients, as pure functions.
 */

/*
 * A DATA transfer's deadline after a read (Postfix's per-record deadline
 * with smtpd_min_data_rate): the time that was left when the read came,
 * plus what its octets are worth at min_rate octets per second, never more
 * than cap. All times in milliseconds. A client trickling its message
 * slower than min_rate runs out of time; a faster one never does.
 */
uint64_t smtp_data_deadline_ms(uint64_t left_ms, uint64_t octets, unsigned min_rate,
    uint64_t cap_ms);

/*
 * The wait before the reply to a failed AUTH that is the `failures`-th of
 * its window: base_s for the first, doubling with each one after, at most
 * 32 times base_s. In milliseconds; 0 when base_s is 0.
 */
uint64_t smtp_auth_delay_ms(unsigned failures, unsigned base_s);

#endif
