# SPDX-License-Identifier: MIT
"""`make install DESTDIR=...` installs exactly the expected files."""

import os
import subprocess
import tempfile
import unittest

BUILDDIR = os.environ["BUILDDIR"]

EXPECTED = {
    "usr/sbin/smtpmuxd",
    "usr/lib/smtpmux/failover.so",
    "usr/lib/smtpmux/least_loaded.so",
    "usr/lib/smtpmux/quota.so",
    "usr/lib/smtpmux/round_robin.so",
    "usr/lib/smtpmux/weighted.so",
    "usr/include/smtpmux/selector.h",
    "usr/lib/pkgconfig/smtpmux.pc",
    "usr/share/man/man8/smtpmuxd.8",
    "usr/share/man/man5/smtpmux.yaml.5",
    "usr/share/man/man3/smtpmux-selector.3",
    "usr/share/doc/smtpmux/README",
    "usr/share/doc/smtpmux/NEWS",
    "usr/share/doc/smtpmux/LICENSE",
    "usr/share/doc/smtpmux/design.md",
    "etc/smtpmux/smtpmux.yaml",
}


class InstallTest(unittest.TestCase):

    def make(self, *args):
        res = subprocess.run(["make", "-s", "-C", BUILDDIR, *args], capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    def test_destdir_file_list(self):
        # The build dir was configured with its own prefix; install into a
        # DESTDIR with the layout a distribution uses.
        with tempfile.TemporaryDirectory() as dest:
            self.make("install", "DESTDIR=" + dest, "prefix=/usr", "sysconfdir=/etc")
            found = set()
            for root, _, files in os.walk(dest):
                for name in files:
                    found.add(os.path.relpath(os.path.join(root, name), dest))
            self.assertEqual(found, EXPECTED)
            self.assertTrue(os.access(os.path.join(dest, "usr/sbin/smtpmuxd"), os.X_OK))
            # The queue's spool folder (LOCALSTATEDIR/spool/smtpmux), private.
            spool = os.path.join(dest, "usr/var/spool/smtpmux")
            self.assertEqual(os.stat(spool).st_mode & 0o777, 0o750)
            # It will hold passwords; as installed it defines no users.
            conf = os.path.join(dest, "etc/smtpmux/smtpmux.yaml")
            self.assertEqual(os.stat(conf).st_mode & 0o777, 0o640)
            with open(conf) as f:
                self.assertRegex(f.read(), r"(?m)^users: \[\]$")
            # An existing config is never overwritten.
            with open(conf, "w") as f:
                f.write("# mine\n")
            self.make("install", "DESTDIR=" + dest, "prefix=/usr", "sysconfdir=/etc")
            with open(conf) as f:
                self.assertEqual(f.read(), "# mine\n")
            self.make("uninstall", "DESTDIR=" + dest, "prefix=/usr", "sysconfdir=/etc")
            left = [os.path.join(r, n) for r, _, fs in os.walk(dest) for n in fs]
            self.assertEqual([os.path.relpath(p, dest) for p in left], ["etc/smtpmux/smtpmux.yaml"])
            self.assertFalse(os.path.exists(spool))        # an empty spool goes too

    def test_selector_builds_out_of_tree_with_pkg_config(self):
        with tempfile.TemporaryDirectory() as dest:
            self.make("install", "DESTDIR=" + dest, "prefix=/usr", "sysconfdir=/etc")
            pc_dir = os.path.join(dest, "usr/lib/pkgconfig")
            env = dict(os.environ, PKG_CONFIG_PATH=pc_dir, PKG_CONFIG_SYSROOT_DIR=dest)
            cflags = subprocess.run(["pkg-config", "--cflags", "smtpmux"], env=env,
                                    capture_output=True, text=True, check=True).stdout.split()
            example = os.path.join(os.environ["SRCDIR"], "contrib/selector-example/by_domain.c")
            out = os.path.join(dest, "by_domain.so")
            res = subprocess.run(["cc", "-shared", *cflags, example, "-o", out],
                                 capture_output=True, text=True)
            self.assertEqual(res.returncode, 0, res.stderr)
            self.assertTrue(os.path.exists(out))
            # The .pc names the folder the selectors went to (which smtpmuxd
            # searches: PKGLIBDIR is the same make variable).
            selectordir = subprocess.run(["pkg-config", "--variable=selectordir", "smtpmux"], env=env,
                                         capture_output=True, text=True, check=True).stdout.strip()
            if selectordir.startswith(dest):
                selectordir = selectordir[len(dest):]
            self.assertEqual(selectordir, "/usr/lib/smtpmux")
            self.assertTrue(os.path.exists(os.path.join(dest, selectordir.lstrip("/"), "round_robin.so")))


if __name__ == "__main__":
    unittest.main()
