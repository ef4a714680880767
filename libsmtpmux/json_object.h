/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_JSON_OBJECT_H
#define SMTPMUX_JSON_OBJECT_H

#include <stddef.h>

/*
 * A strict JSON (RFC 8259) reader for what OAuth hands us: one object whose
 * members of interest are strings and numbers (a token endpoint's response,
 * the error of a SASL OAuth exchange). Pure: no I/O, no global state.
 *
 * The whole text is validated - UTF-8, escapes, number grammar, nothing
 * after the object - and members whose value is an array, an object, true,
 * false or null are checked and skipped (Microsoft's errors carry
 * "error_codes": [70000]). Nesting deeper than JSON_MAX_DEPTH is refused.
 */

#define JSON_MAX_DEPTH 16

enum json_type {
	JSON_STRING,                     /* value: the decoded string (UTF-8, no NUL) */
	JSON_NUMBER                      /* value: the number as written */
};

struct json_member {
	const char *key;                 /* decoded, NUL-terminated */
	enum json_type type;
	const char *value;               /* NUL-terminated */
	size_t len;
};

/* Returns 0 to go on, -1 to stop the parse (it then fails). */
typedef int (*json_member_fn)(const struct json_member *m, void *arg);

/*
 * Parses in[0..len) as exactly one object and calls fn for each top-level
 * string or number member, in order. Returns 0, or -1 with a short reason
 * in err ("expected ':' at offset 12"). Decoded strings live in a buffer
 * that is wiped and freed before returning: fn copies what it keeps.
 */
int json_object_parse(const char *in, size_t len, json_member_fn fn, void *arg,
    char *err, size_t errlen);

#endif
