/* SPDX-License-Identifier: MIT */
#include "smtp_limits.h"

#define AUTH_DELAY_MAX_DOUBLINGS 5

uint64_t
smtp_data_deadline_ms(uint64_t left_ms, uint64_t octets, unsigned min_rate, uint64_t cap_ms)
{
	uint64_t earned;

	if (min_rate == 0 || left_ms >= cap_ms)
		return cap_ms;
	/* octets * 1000 cannot overflow for any read a session does; saturate anyway. */
	earned = octets > UINT64_MAX / 1000 ? UINT64_MAX : octets * 1000 / min_rate;
	return earned >= cap_ms - left_ms ? cap_ms : left_ms + earned;
}

uint64_t
smtp_auth_delay_ms(unsigned failures, unsigned base_s)
{
	unsigned doublings = failures > 1 ? failures - 1 : 0;

	if (doublings > AUTH_DELAY_MAX_DOUBLINGS)
		doublings = AUTH_DELAY_MAX_DOUBLINGS;
	return ((uint64_t)base_s * 1000) << doublings;
}
