# SPDX-License-Identifier: MIT
#
# Bootstrap shim. A fresh checkout has no configure script yet; this file
# lets the README's commands (`make deps run`, `make deps check`) work
# there: `deps` installs the Debian build and test dependencies, and every
# other target generates configure, runs it, and re-invokes make. Once
# ./configure has run, GNU make reads the generated GNUmakefile instead
# of this file (GNUmakefile.am is the real build description).

CONFIGURE_FLAGS ?=
.NOTPARALLEL:
.DEFAULT_GOAL := all

deps:
	$(SHELL) contrib/install-deps

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
