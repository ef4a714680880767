/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_FROM_REWRITE_H
#define SMTPMUX_FROM_REWRITE_H

#include <stdbool.h>
#include <stddef.h>

/*
 * `rewrite_from:` for one delivery attempt: a streaming transformer of the
 * message (unstuffed octets, CRLF line ends, as msgbody stores them) that
 * replaces the address of every From: field of the header section, and
 * nothing else:
 *
 *   - only the header section (up to the first empty line, or the first
 *     line that is not a header field) is looked at; a "From:" line in the
 *     body or in an attached message is left alone;
 *   - folded fields are handled; the display name, comments, encoded words
 *     and the folding are kept byte for byte, only the address changes
 *     ("Alice <a@corp.example>" becomes "Alice <new@provider.example>",
 *     "a@corp.example (Alice)" becomes "new@provider.example (Alice)");
 *   - a From that names several mailboxes or a group keeps the first
 *     mailbox's display name only; one that cannot be parsed becomes
 *     "From: new@provider.example";
 *   - the original From field body goes into a Reply-To: field, added at
 *     the end of the header section, unless the message has a Reply-To:
 *     already or the From did not change;
 *   - every other octet passes through unchanged.
 *
 * Any chunking of the input gives the same output; the body is passed on
 * as it comes, so a message kept in a temporary file is never held in
 * memory. A DKIM signature that covers From (they all do) no longer
 * verifies after the rewrite.
 */

/* A From field longer than this (folded) is replaced by "From: ADDR". */
#define FROM_REWRITE_FIELD_MAX 4096

typedef void from_rewrite_emit_fn(void *arg, const char *data, size_t len);

struct from_rewrite;

/* addr: the new address (a valid mailbox, at most SMTP_PATH_MAX octets).
 * Output goes to emit(arg, ...). NULL when out of memory or addr too long. */
struct from_rewrite *from_rewrite_new(const char *addr, from_rewrite_emit_fn *emit, void *arg);

/* Feeds the next octets of the message. */
void from_rewrite_feed(struct from_rewrite *fr, const char *in, size_t len);

/* The message is complete: emits whatever is still held back. */
void from_rewrite_finish(struct from_rewrite *fr);

void from_rewrite_free(struct from_rewrite *fr);

/*
 * The rewrite of one field body (the octets after "From:", folding and the
 * final line end included) into out; returns its length. outlen must be at
 * least len + strlen(addr) + 3. Exposed for the unit tests.
 */
size_t from_rewrite_field_body(const char *body, size_t len, const char *addr,
    char *out, size_t outlen);

#endif
