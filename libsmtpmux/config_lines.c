/* SPDX-License-Identifier: MIT */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "config_lines.h"

/* Deeper nesting is no configuration smtpmux knows; refuse it early. */
#define MAX_DEPTH 32
/*
 * Keys and values, aliases expanded. An alias copies its anchor's subtree,
 * so nested ones multiply: a "billion laughs" file of a few hundred octets
 * expands to gigabytes. Far more than any real configuration (a thousand
 * users with ten downstreams each is about 150000 fewer).
 */
#define MAX_NODES 100000

struct anchor {
	char *name;
	size_t node;
};

struct config_lines {
	struct config_node *nodes;
	size_t n_nodes;
	size_t cap_nodes;
	struct anchor *anchors;
	size_t n_anchors;
};

/* One open mapping or sequence while scanning. */
struct frame {
	size_t node;
	bool is_mapping;
	bool want_key;                   /* mappings: the next scalar is a key */
	char *key;                       /* mappings: the key awaiting its value */
	unsigned key_line;
	size_t next_index;               /* sequences */
};

struct scan {
	struct config_lines *cl;
	struct frame stack[MAX_DEPTH];
	size_t depth;
	bool have_root;
	unsigned errline;
	char *err;
	size_t errlen;
};

static int
scan_fail(struct scan *sc, unsigned line, const char *what)
{
	sc->errline = line;
	snprintf(sc->err, sc->errlen, "syntax error: %s", what);
	return -1;
}

/* "KEY: too large", for the node at path that would cross MAX_NODES. */
static int
scan_fail_size(struct scan *sc, unsigned line, const char *path, bool alias)
{
	sc->errline = line;
	snprintf(sc->err, sc->errlen, "%s: %s more than %d keys and values", *path ? path : "(top)",
	    alias ? "aliases expand the file to" : "the file has", MAX_NODES);
	return -1;
}

static size_t
node_add(struct config_lines *cl, char *path, char *key, enum config_node_kind kind,
    unsigned line, size_t parent)
{
	struct config_node *n;

	if (cl->n_nodes == cl->cap_nodes) {
		size_t cap = cl->cap_nodes ? cl->cap_nodes * 2 : 64;
		struct config_node *nodes = realloc(cl->nodes, cap * sizeof(*nodes));

		if (nodes == NULL)
			return CONFIG_NODE_NONE;
		cl->nodes = nodes;
		cl->cap_nodes = cap;
	}
	n = &cl->nodes[cl->n_nodes];
	memset(n, 0, sizeof(*n));
	n->path = path;
	n->key = key;
	n->kind = kind;
	n->line = line;
	n->parent = parent;
	return cl->n_nodes++;
}

static char *
path_join_key(const char *base, const char *key)
{
	size_t len = strlen(base) + strlen(key) + 2;
	char *p = malloc(len);

	if (p != NULL)
		snprintf(p, len, "%s%s%s", base, *base ? "." : "", key);
	return p;
}

static char *
path_join_index(const char *base, size_t index)
{
	size_t len = strlen(base) + 24;
	char *p = malloc(len);

	if (p != NULL)
		snprintf(p, len, "%s[%zu]", base, index);
	return p;
}

/*
 * Copies the anchored subtree under the alias's path, so that lookups and
 * params see what libcyaml sees.
 */
static int
alias_expand(struct scan *sc, size_t alias, size_t anchor)
{
	struct config_lines *cl = sc->cl;
	size_t first = anchor + 1, last = cl->nodes[anchor].end;
	size_t shift = alias - anchor;
	size_t base_len = strlen(cl->nodes[anchor].path);

	cl->nodes[alias].kind = cl->nodes[anchor].kind;
	if (cl->nodes[anchor].value != NULL &&
	    (cl->nodes[alias].value = strdup(cl->nodes[anchor].value)) == NULL)
		return -1;
	for (size_t i = first; i < last; i++) {
		const char *rest = cl->nodes[i].path + base_len;
		size_t len = strlen(cl->nodes[alias].path) + strlen(rest) + 1;
		char *path = malloc(len);
		char *key = NULL;
		size_t n;

		if (path == NULL)
			return -1;
		snprintf(path, len, "%s%s", cl->nodes[alias].path, rest);
		if (cl->nodes[i].key != NULL && (key = strdup(cl->nodes[i].key)) == NULL) {
			free(path);
			return -1;
		}
		n = node_add(cl, path, key, cl->nodes[i].kind, cl->nodes[i].line,
		    cl->nodes[i].parent + shift);
		if (n == CONFIG_NODE_NONE) {
			free(path);
			free(key);
			return -1;
		}
		cl->nodes[n].end = cl->nodes[i].end + shift;
		if (cl->nodes[i].value != NULL &&
		    (cl->nodes[n].value = strdup(cl->nodes[i].value)) == NULL)
			return -1;
	}
	return 0;
}

static int
anchor_add(struct config_lines *cl, const yaml_char_t *name, size_t node)
{
	struct anchor *a = realloc(cl->anchors, (cl->n_anchors + 1) * sizeof(*a));

	if (a == NULL)
		return -1;
	cl->anchors = a;
	/* A later anchor of the same name shadows an earlier one (YAML 1.2). */
	if ((a[cl->n_anchors].name = strdup((const char *)name)) == NULL)
		return -1;
	a[cl->n_anchors++].node = node;
	return 0;
}

static const struct anchor *
anchor_find(const struct config_lines *cl, const yaml_char_t *name)
{
	for (size_t i = cl->n_anchors; i > 0; i--)
		if (strcmp(cl->anchors[i - 1].name, (const char *)name) == 0)
			return &cl->anchors[i - 1];
	return NULL;
}

static enum config_node_kind
event_kind(const yaml_event_t *ev)
{
	switch (ev->type) {
	case YAML_MAPPING_START_EVENT:
		return CONFIG_NODE_MAPPING;
	case YAML_SEQUENCE_START_EVENT:
		return CONFIG_NODE_SEQUENCE;
	default:
		return CONFIG_NODE_SCALAR;
	}
}

static const yaml_char_t *
event_anchor(const yaml_event_t *ev)
{
	switch (ev->type) {
	case YAML_MAPPING_START_EVENT:
		return ev->data.mapping_start.anchor;
	case YAML_SEQUENCE_START_EVENT:
		return ev->data.sequence_start.anchor;
	case YAML_SCALAR_EVENT:
		return ev->data.scalar.anchor;
	default:
		return NULL;
	}
}

/* A scalar, collection start or alias: records it where it sits. */
static int
scan_node(struct scan *sc, const yaml_event_t *ev)
{
	struct config_lines *cl = sc->cl;
	unsigned line = (unsigned)ev->start_mark.line + 1;
	struct frame *f = sc->depth ? &sc->stack[sc->depth - 1] : NULL;
	char *path, *key = NULL;
	size_t parent = CONFIG_NODE_NONE, n;

	if (f == NULL) {
		if (sc->have_root)
			return scan_fail(sc, line, "only one YAML document is allowed");
		sc->have_root = true;
		path = strdup("");
	} else if (f->is_mapping && f->want_key) {
		if (ev->type != YAML_SCALAR_EVENT)
			return scan_fail(sc, line, "mapping keys must be plain strings");
		f->key = strdup((const char *)ev->data.scalar.value);
		if (f->key == NULL)
			return scan_fail(sc, line, "out of memory");
		f->key_line = line;
		f->want_key = false;
		return 0;
	} else if (f->is_mapping) {
		key = f->key;
		f->key = NULL;
		f->want_key = true;
		line = f->key_line;
		parent = f->node;
		path = path_join_key(cl->nodes[parent].path, key);
	} else {
		parent = f->node;
		path = path_join_index(cl->nodes[parent].path, f->next_index++);
	}
	if (path != NULL && cl->n_nodes >= MAX_NODES) {
		int rc = scan_fail_size(sc, line, path, false);

		free(path);
		free(key);
		return rc;
	}
	if (path == NULL || (n = node_add(cl, path, key, event_kind(ev), line, parent)) ==
	    CONFIG_NODE_NONE) {
		free(path);
		free(key);
		return scan_fail(sc, line, "out of memory");
	}
	if (event_anchor(ev) != NULL && anchor_add(cl, event_anchor(ev), n) == -1)
		return scan_fail(sc, line, "out of memory");

	switch (ev->type) {
	case YAML_SCALAR_EVENT:
		cl->nodes[n].value = strdup((const char *)ev->data.scalar.value);
		if (cl->nodes[n].value == NULL)
			return scan_fail(sc, line, "out of memory");
		cl->nodes[n].end = n + 1;
		return 0;
	case YAML_ALIAS_EVENT: {
		const struct anchor *a = anchor_find(cl, ev->data.alias.anchor);

		if (a == NULL)
			return scan_fail(sc, line, "alias to an unknown anchor");
		if (cl->nodes[a->node].end == 0)
			return scan_fail(sc, line, "alias inside its own anchor");
		if (cl->n_nodes + (cl->nodes[a->node].end - a->node - 1) > MAX_NODES)
			return scan_fail_size(sc, line, cl->nodes[n].path, true);
		if (alias_expand(sc, n, a->node) == -1)
			return scan_fail(sc, line, "out of memory");
		cl->nodes[n].end = cl->n_nodes;
		return 0;
	}
	default:
		if (sc->depth == MAX_DEPTH)
			return scan_fail(sc, line, "nested too deep");
		f = &sc->stack[sc->depth++];
		memset(f, 0, sizeof(*f));
		f->node = n;
		f->is_mapping = ev->type == YAML_MAPPING_START_EVENT;
		f->want_key = true;
		return 0;
	}
}

static void
scan_pop(struct scan *sc)
{
	struct frame *f = &sc->stack[--sc->depth];

	sc->cl->nodes[f->node].end = sc->cl->n_nodes;
	free(f->key);
	f->key = NULL;
}

/* libyaml's reader errors carry an offset only. */
static unsigned
line_of_offset(const char *data, size_t len, size_t offset)
{
	unsigned line = 1;

	for (size_t i = 0; i < offset && i < len; i++)
		if (data[i] == '\n')
			line++;
	return line;
}

static int
scan_parser_error(struct scan *sc, const yaml_parser_t *p, const char *data, size_t len)
{
	char what[256];
	unsigned line;

	if (p->error == YAML_MEMORY_ERROR)
		return scan_fail(sc, 1, "out of memory");
	if (p->error == YAML_READER_ERROR)
		line = line_of_offset(data, len, p->problem_offset);
	else
		line = (unsigned)p->problem_mark.line + 1;
	snprintf(what, sizeof(what), "%s%s%s", p->problem ? p->problem : "unknown error",
	    p->context ? " " : "", p->context ? p->context : "");
	return scan_fail(sc, line, what);
}

static int
scan_events(struct scan *sc, yaml_parser_t *parser, const char *data, size_t len)
{
	yaml_event_t ev;
	int rc = 0;

	for (;;) {
		if (!yaml_parser_parse(parser, &ev))
			return scan_parser_error(sc, parser, data, len);
		switch (ev.type) {
		case YAML_SCALAR_EVENT:
		case YAML_ALIAS_EVENT:
		case YAML_MAPPING_START_EVENT:
		case YAML_SEQUENCE_START_EVENT:
			rc = scan_node(sc, &ev);
			break;
		case YAML_MAPPING_END_EVENT:
		case YAML_SEQUENCE_END_EVENT:
			scan_pop(sc);
			break;
		default:
			break;
		}
		if (ev.type == YAML_STREAM_END_EVENT || rc == -1) {
			yaml_event_delete(&ev);
			return rc;
		}
		yaml_event_delete(&ev);
	}
}

struct config_lines *
config_lines_scan(const char *data, size_t len, unsigned *errline, char *err, size_t errlen)
{
	struct scan sc;
	yaml_parser_t parser;
	int rc;

	memset(&sc, 0, sizeof(sc));
	sc.err = err;
	sc.errlen = errlen;
	if ((sc.cl = calloc(1, sizeof(*sc.cl))) == NULL || !yaml_parser_initialize(&parser)) {
		free(sc.cl);
		*errline = 1;
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	yaml_parser_set_input_string(&parser, (const unsigned char *)data, len);
	rc = scan_events(&sc, &parser, data, len);
	yaml_parser_delete(&parser);
	while (sc.depth > 0)
		scan_pop(&sc);
	if (rc == -1) {
		*errline = sc.errline;
		config_lines_free(sc.cl);
		return NULL;
	}
	return sc.cl;
}

void
config_lines_free(struct config_lines *cl)
{
	if (cl == NULL)
		return;
	for (size_t i = 0; i < cl->n_nodes; i++) {
		free(cl->nodes[i].path);
		free(cl->nodes[i].key);
		free(cl->nodes[i].value);
	}
	for (size_t i = 0; i < cl->n_anchors; i++)
		free(cl->anchors[i].name);
	free(cl->anchors);
	free(cl->nodes);
	free(cl);
}

const struct config_node *
config_lines_get(const struct config_lines *cl, const char *path)
{
	for (size_t i = 0; i < cl->n_nodes; i++)
		if (strcmp(cl->nodes[i].path, path) == 0)
			return &cl->nodes[i];
	return NULL;
}

unsigned
config_lines_line(const struct config_lines *cl, const char *path)
{
	char *p = strdup(path);
	unsigned line = 1;

	while (p != NULL) {
		const struct config_node *n = config_lines_get(cl, p);
		char *cut;

		if (n != NULL) {
			line = n->line;
			break;
		}
		if (*p == '\0')
			break;
		/* Drops the last ".key" or "[i]". */
		cut = strrchr(p, '.');
		if (strrchr(p, '[') > cut)
			cut = strrchr(p, '[');
		*(cut ? cut : p) = '\0';
	}
	free(p);
	return line;
}

const struct config_node *
config_lines_child(const struct config_lines *cl, const struct config_node *parent,
    const struct config_node *prev)
{
	size_t pi = (size_t)(parent - cl->nodes);
	size_t i = prev ? prev->end : pi + 1;

	/* Each child's subtree ends where the next child starts. */
	return i < parent->end ? &cl->nodes[i] : NULL;
}
