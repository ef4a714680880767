/* SPDX-License-Identifier: MIT */
#ifndef SMTPMUX_CONFIG_LINES_H
#define SMTPMUX_CONFIG_LINES_H

#include <stddef.h>

/*
 * A libyaml event pass over the configuration, run before libcyaml loads
 * it. libcyaml says which key is wrong but not reliably where; this pass
 * records every node under its key path ("users[0].downstreams[1].addr")
 * with its line, so that config.c can report "FILE:LINE: KEY: ...". It
 * also keeps scalar values, which gives config.c the free-form
 * `selector.params` maps that a libcyaml schema cannot describe.
 * Aliases are expanded (their nodes carry the anchor's lines).
 */

enum config_node_kind {
	CONFIG_NODE_SCALAR,
	CONFIG_NODE_MAPPING,
	CONFIG_NODE_SEQUENCE
};

struct config_node {
	char *path;                      /* "" for the document root */
	char *key;                       /* mapping key; NULL for list entries and the root */
	char *value;                     /* scalars only */
	enum config_node_kind kind;
	unsigned line;                   /* 1-based: the key's line for mapping values */
	size_t parent;                   /* index of the parent; CONFIG_NODE_NONE for the root */
	size_t end;                      /* one past the last descendant's index */
};

#define CONFIG_NODE_NONE ((size_t)-1)

struct config_lines;

/*
 * Parses one YAML document from data. On a syntax error returns NULL,
 * *errline is its line and err reads "syntax error: ..."; for a file that
 * has, or whose aliases expand to, too many keys and values, it reads
 * "KEY: ...".
 */
struct config_lines *config_lines_scan(const char *data, size_t len,
    unsigned *errline, char *err, size_t errlen);
void config_lines_free(struct config_lines *);

/* The node at path, or NULL. */
const struct config_node *config_lines_get(const struct config_lines *, const char *path);

/*
 * The line of path, or of its nearest ancestor that the file has (a
 * missing key is reported where its parent is); 1 for an empty document.
 */
unsigned config_lines_line(const struct config_lines *, const char *path);

/* Iterates the children of parent: pass prev NULL for the first. */
const struct config_node *config_lines_child(const struct config_lines *,
    const struct config_node *parent, const struct config_node *prev);

#endif
