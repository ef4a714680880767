/* SPDX-License-Identifier: MIT */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "argv_split.h"

struct splitter {
	const char *p;
	char *word;                      /* the word being built */
	size_t len;
	bool in_word;                    /* "" makes a word even though it is empty */
	char **argv;
	size_t argc;
};

static bool
blank(char c)
{
	return c == ' ' || c == '\t';
}

static int
end_word(struct splitter *s)
{
	char *copy;

	if (!s->in_word)
		return 0;
	s->word[s->len] = '\0';
	if ((copy = strdup(s->word)) == NULL)
		return -1;
	s->argv[s->argc++] = copy;
	s->len = 0;
	s->in_word = false;
	return 0;
}

/* After an opening quote: up to the closing one. */
static const char *
quoted(struct splitter *s, char quote)
{
	for (s->p++; *s->p != quote; s->p++) {
		if (*s->p == '\0')
			return quote == '\'' ? "unterminated ' quote" : "unterminated \" quote";
		if (quote == '"' && *s->p == '\\' && (s->p[1] == '"' || s->p[1] == '\\'))
			s->p++;
		s->word[s->len++] = *s->p;
	}
	s->p++;
	s->in_word = true;
	return NULL;
}

static const char *
split(struct splitter *s)
{
	const char *why;

	while (*s->p != '\0') {
		char c = *s->p;

		if ((unsigned char)c < 0x20 && c != '\t')
			return "control character in the command";
		if (blank(c)) {
			if (end_word(s) < 0)
				return "out of memory";
			s->p++;
		} else if (c == '\'' || c == '"') {
			if ((why = quoted(s, c)) != NULL)
				return why;
		} else {
			if (c == '\\' && *++s->p == '\0')
				return "backslash at the end of the command";
			s->word[s->len++] = *s->p++;
			s->in_word = true;
		}
	}
	if (end_word(s) < 0)
		return "out of memory";
	return s->argc == 0 ? "empty command" : NULL;
}

char **
argv_split(const char *line, char *why, size_t whylen)
{
	size_t len = strlen(line);
	struct splitter s = { .p = line };
	const char *err = "out of memory";

	/* at most one word per two characters, plus the NULL */
	s.argv = calloc(len / 2 + 2, sizeof(*s.argv));
	s.word = malloc(len + 1);
	if (s.argv != NULL && s.word != NULL && (err = split(&s)) == NULL) {
		free(s.word);
		return s.argv;
	}
	snprintf(why, whylen, "%s", err);
	free(s.word);
	argv_free(s.argv);
	return NULL;
}

void
argv_free(char **argv)
{
	if (argv == NULL)
		return;
	for (char **a = argv; *a != NULL; a++)
		free(*a);
	free(argv);
}

size_t
argv_count(char *const *argv)
{
	size_t n = 0;

	while (argv != NULL && argv[n] != NULL)
		n++;
	return n;
}
