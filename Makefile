# SPDX-License-Identifier: MIT
#
# Bootstrap shim. A fresh checkout has no configure script yet; this file
# lets the README's commands (`make deps run`, `make deps check`) work
# there: `deps` installs the Debian packages that the other goals on the
# command line need (contrib/install-deps: the build dependencies always,
# the test tools only for check...), and every other target generates
# configure, runs it, and re-invokes make. Once
# ./configure has run, GNU make reads the generated GNUmakefile instead
# of this file (GNUmakefile.am is the real build description).

CONFIGURE_FLAGS ?=
.NOTPARALLEL:
.DEFAULT_GOAL := all

deps:
	$(SHELL) contrib/install-deps $(MAKECMDGOALS)

Makefile: ;

configure: configure.ac GNUmakefile.am
	autoreconf -fi

GNUmakefile: configure
	./configure $(CONFIGURE_FLAGS)

%: GNUmakefile
	$(MAKE) -f GNUmakefile $@

all: GNUmakefile
	$(MAKE) -f GNUmakefile $@

.PHONY: deps all
