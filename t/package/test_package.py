# SPDX-License-Identifier: MIT
"""The Debian package, end to end, as an administrator uses it (root only).

Builds the .deb from `make dist`, installs it on this machine, starts the
daemon through its SysV init script, relays a message to a test
downstream, reloads a changed config, stops, and purges.
"""

import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import unittest

from harness import Downstream, free_port, read_banner, send, wait_until

BUILDDIR = os.environ["BUILDDIR"]
SRCDIR = os.environ["SRCDIR"]
INIT = "/etc/init.d/smtpmuxd"
CONF = "/etc/smtpmux/smtpmux.yaml"
PIDFILE = "/run/smtpmux/smtpmuxd.pid"


def run(*cmd, check=True, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s%s" % (" ".join(cmd), res.returncode, res.stdout, res.stderr))
    return res


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("dpkg-buildpackage"),
                     "needs root and dpkg-buildpackage (Debian)")
class DebianPackageTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        if run("dpkg-query", "-W", "smtpmux", check=False).returncode == 0:
            raise unittest.SkipTest("smtpmux is installed on this machine already; not touching it")
        cls.out = tempfile.mkdtemp(prefix="smtpmux-deb-")
        run("make", "-s", "-C", BUILDDIR, "dist")
        tarball = sorted(glob.glob(os.path.join(BUILDDIR, "smtpmux-*.tar.gz")))[-1]
        run(os.path.join(SRCDIR, "contrib/debian/build-deb"), tarball, cls.out)
        cls.deb = glob.glob(os.path.join(cls.out, "smtpmux_*.deb"))[0]

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.out, ignore_errors=True)

    def tearDown(self):
        if os.path.exists(INIT):
            run(INIT, "stop", check=False)
        run("dpkg", "--purge", "smtpmux", check=False)

    def test_lintian_is_clean(self):
        res = run("lintian", "--fail-on", "error,warning", self.deb, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)

    def test_install_run_reload_stop_purge(self):
        run("dpkg", "-i", self.deb)
        # The system user and the config's permissions (it holds passwords).
        pwd.getpwnam("smtpmux")
        st = os.stat(CONF)
        self.assertEqual(st.st_mode & 0o777, 0o640)
        self.assertEqual((st.st_uid, st.st_gid), (0, pwd.getpwnam("smtpmux").pw_gid))
        self.assertTrue(os.path.exists("/lib/systemd/system/smtpmuxd.service"))
        self.assertTrue(os.access(INIT, os.X_OK))

        ds = Downstream().start()
        self.addCleanup(ds.stop)
        port = free_port()
        config = {
            "listen": ["127.0.0.1:%d" % port],
            "hostname": "first.test",
            "workers": 2,
            "allow_insecure_auth": True,
            "users": [{"email": "app@example.com", "password": "pkg-secret",
                       "selector_algo_path": "round_robin",
                       "downstreams": [{"addr": ds.addr, "tls": "none"}]}],
        }
        with open(CONF, "w") as f:
            json.dump(config, f)
        run(INIT, "start")
        wait_until(lambda: (read_banner(port) or "").startswith("220 first.test"), what="daemon via init script")
        master = int(open(PIDFILE).read())
        workers = [int(p) for p in open("/proc/%d/task/%d/children" % (master, master)).read().split()]
        self.assertTrue(workers)
        smtpmux_uid = pwd.getpwnam("smtpmux").pw_uid
        for w in workers:
            with open("/proc/%d/status" % w) as f:
                uids = [line.split()[1:] for line in f if line.startswith("Uid:")][0]
            self.assertEqual({int(u) for u in uids}, {smtpmux_uid})
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)
        self.assertEqual(ds.handler.count(), 1)

        config["hostname"] = "second.test"
        with open(CONF, "w") as f:
            json.dump(config, f)
        run(INIT, "reload")
        wait_until(lambda: (read_banner(port) or "").startswith("220 second.test"), what="reloaded config")
        self.assertEqual(run(INIT, "status", check=False).returncode, 0)

        run(INIT, "stop")
        wait_until(lambda: not os.path.exists("/proc/%d" % master), what="daemon to exit")
        self.assertNotEqual(run(INIT, "status", check=False).returncode, 0)

        run("dpkg", "--purge", "smtpmux")
        self.assertFalse(os.path.exists("/etc/smtpmux"))
        self.assertFalse(os.path.exists("/usr/sbin/smtpmuxd"))
        with self.assertRaises(KeyError):
            pwd.getpwnam("smtpmux")


if __name__ == "__main__":
    unittest.main()
