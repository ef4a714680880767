# SPDX-License-Identifier: MIT
"""`make deps GOAL...` installs what the goals need, and building never
brings an MTA or a test tool (contrib/install-deps --list shows the plan
without installing anything)."""

import os
import re
import subprocess
import unittest

from harness import BUILDDIR, SRCDIR

INSTALL_DEPS = os.path.join(SRCDIR, "contrib", "install-deps")
MTAS = {"postfix", "exim4", "exim4-daemon-light", "exim4-daemon-heavy", "opensmtpd", "sendmail",
        "nullmailer", "msmtp-mta", "dma"}
TEST_TOOLS = {"chromium", "redis-server", "valgrind", "swaks", "lintian", "python3-aiosmtpd"}


def plan(*goals, ci=False):
    """{list name: [packages]} that install-deps would install."""
    env = dict(os.environ)
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    out = subprocess.run([INSTALL_DEPS, "--list", *goals], capture_output=True, text=True,
                         env=env, check=True, timeout=60).stdout
    lists = {}
    for line in out.splitlines():
        name, _, rest = line.partition(":")
        lists[name] = rest.split()
    return lists


def build_depends():
    with open(os.path.join(SRCDIR, "contrib", "debian", "control")) as f:
        text = f.read()
    field = re.search(r"^Build-Depends:(.*?)^\S", text, re.M | re.S).group(1)
    return {re.match(r"\s*([\w.+-]+)", dep).group(1) for dep in field.split(",") if dep.strip()}


class DepsTest(unittest.TestCase):

    def test_building_brings_no_mta_or_test_tool(self):
        for goals in ((), ("deps",), ("deps", "run"), ("deps", "deb"), ("deps", "install"), ("all",)):
            lists = plan(*goals)
            # The build part is exactly Build-Depends (apt-get build-dep).
            self.assertIn("contrib/debian/control", " ".join(lists.pop("build")))
            wanted = {p for packages in lists.values() for p in packages}
            self.assertFalse(wanted & MTAS, goals)
            if "run" not in goals:
                self.assertEqual(wanted, set(), goals)
        self.assertFalse(build_depends() & (MTAS | TEST_TOOLS))

    def test_goals_pick_their_lists(self):
        self.assertEqual(set(plan("deps", "run")), {"build", "demo"})
        self.assertEqual(set(plan("deps", "check")), {"build", "test"})
        # CI runs `make deps check` with CI=true: the package tests run there.
        self.assertEqual(set(plan("deps", "check", ci=True)), {"build", "test", "package"})
        self.assertEqual(set(plan("deps", "check-package")), {"build", "test", "package"})
        self.assertEqual(set(plan("deps", "fuzz")), {"build", "fuzz"})
        self.assertEqual(set(plan("deps", "bench")), {"build", "bench"})
        self.assertEqual(set(plan("deps", "bench-load")), {"build", "bench"})
        test = plan("check")["test"]
        for tool in ("postfix", "chromium", "redis-server", "python3-aiosmtpd", "valgrind"):
            self.assertIn(tool, test)
        self.assertNotIn("linux-perf", test)             # bench only
        self.assertNotIn("clang", test)                  # make fuzz only
        self.assertIn("lintian", plan("check-package")["package"])

    def test_make_passes_the_other_goals(self):
        for makefile in ("Makefile", "GNUmakefile"):
            path = os.path.join(BUILDDIR if makefile == "GNUmakefile" else SRCDIR, makefile)
            # MAKE=true: print the recursive makes too, without running them.
            # -o: GNU make remakes its makefiles even under -n; the build
            # tree must not be reconfigured (with MAKE=true) by a test.
            keep = [a for f in ("GNUmakefile", "GNUmakefile.in", "configure", "config.status",
                                "aclocal.m4", "Makefile") for a in ("-o", f)]
            res = subprocess.run(["make", "-n", *keep, "-f", path, "deps", "check", "MAKE=true"],
                                 capture_output=True,
                                 text=True, cwd=SRCDIR, timeout=60)
            self.assertRegex(res.stdout, r"install-deps deps check\b", makefile)


if __name__ == "__main__":
    unittest.main()
