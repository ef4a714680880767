/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_ARGV_SPLIT_H
#define SMTPMUX_ARGV_SPLIT_H

#include <stddef.h>

/*
 * Splits a `token_command:` into the argument vector it is run with, with
 * no shell involved (smtpmux.yaml(5) documents the rules):
 *   - words are separated by spaces and tabs;
 *   - '...' keeps everything inside as it is;
 *   - "..." keeps everything inside except \" and \\, which stand for " and \;
 *   - outside quotes, a backslash keeps the next character as it is;
 *   - quoted and unquoted parts next to each other make one word, and ''
 *     or "" alone is an empty argument;
 *   - nothing else is special: no $VARIABLES, ~, wildcards, pipes or
 *     redirections (for those, write the command as `sh -c '...'`).
 * Pure.
 */

/* A NULL-terminated vector (free with argv_free), or NULL with why:
 * "empty command", "unterminated ' quote", "control character". */
char **argv_split(const char *line, char *why, size_t whylen);
void argv_free(char **argv);
size_t argv_count(char *const *argv);

#endif
