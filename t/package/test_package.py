# SPDX-License-Identifier: MIT
"""The Debian package, end to end, as an administrator uses it (root only).

Builds the source package from `make dist` and the .debs from it with
contrib/debian/build-deb, checks them with lintian, installs them on this
machine (with port 2525 taken and no users configured: nothing starts, and
the administrator is told why), starts the daemon through its SysV init
script, relays a message to a test downstream, reloads a changed (and then
a broken) config, rotates the log, stops, and purges. Another test runs
the daemon the way the installed systemd unit would (its commands,
capability bounding set, NoNewPrivileges and UMask), since systemd is not
PID 1 here.

Whatever happens, each test leaves the machine as it found it: the package
purged, the smtpmux account and its files gone, no smtpmuxd left running.
Runs of this file on one machine take turns (a lock in /run/lock).
"""

import fcntl
import glob
import gzip
import shlex
import socket
import tarfile
import json
import os
import pwd
import grp
import re
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from harness import Downstream, free_port, read_banner, send, wait_until

BUILDDIR = os.environ["BUILDDIR"]
SRCDIR = os.environ["SRCDIR"]
DAEMON = "/usr/sbin/smtpmuxd"
PACKAGES = ("smtpmux", "smtpmux-dev")
POLICY = "/usr/sbin/policy-rc.d"
NOT_CONFIGURED = 6
INIT = "/etc/init.d/smtpmuxd"
UNIT = "/lib/systemd/system/smtpmuxd.service"
LOGROTATE = "/etc/logrotate.d/smtpmuxd"
CONF = "/etc/smtpmux/smtpmux.yaml"
RUNDIR = "/run/smtpmux"
PIDFILE = RUNDIR + "/smtpmuxd.pid"
LOGDIR = "/var/log/smtpmux"
LOG = LOGDIR + "/smtpmuxd.log"
SPOOL = "/var/spool/smtpmux"
USER = "smtpmux"
GECOS = "smtpmux relay"          # what the package's postinst gives the account
LOCK = "/run/lock/smtpmux-package-test.lock"
LOCK_TIMEOUT = 900


def run(*cmd, check=True, timeout=120, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL, **kw)
    if check and res.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s%s" % (" ".join(cmd), res.returncode, res.stdout, res.stderr))
    return res


def dpkg(*args, check=True):
    """dpkg, waiting out another dpkg/apt run holding the lock."""
    deadline = time.monotonic() + 300
    while True:
        res = run("dpkg", *args, check=False, timeout=300)
        if (res.returncode == 0 or time.monotonic() > deadline or
                not re.search(r"lock was locked|locked by another", res.stderr)):
            break
        time.sleep(1)
    if check and res.returncode != 0:
        raise AssertionError("dpkg %s failed (%d):\n%s%s" % (" ".join(args), res.returncode, res.stdout, res.stderr))
    return res


def package_installed(name="smtpmux"):
    """True if dpkg knows the package in any state but not-installed/purged."""
    res = run("dpkg-query", "-W", "-f=${db:Status-Status}", name, check=False)
    return res.returncode == 0 and res.stdout.strip() not in ("", "not-installed")


def account(name=USER):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def alive(pid):
    """A zombie has exited: init reaps it when it gets round to it."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def daemon_pids():
    """Every live process running the installed smtpmuxd (and only that one:
    daemons other tests run from build trees are not ours)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            exe = os.readlink("/proc/%s/exe" % entry)
        except OSError:
            continue
        if (exe == DAEMON or exe == DAEMON + " (deleted)") and alive(int(entry)):
            pids.append(int(entry))
    return pids


def children(pid):
    with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


def workers_of(pid):
    """The children but the queue runner (process name smtpmux-queue)."""
    def name(p):
        try:
            with open("/proc/%d/comm" % p) as f:
                return f.read().strip()
        except OSError:
            return None
    return [p for p in children(pid) if name(p) != "smtpmux-queue"]


def proc_status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError as e:
        return "(%s)" % e


def write_config(config):
    # JSON is YAML; keep the package's ownership and mode.
    with open(CONF, "w") as f:
        json.dump(config, f)


def unit_command(unit, line):
    """An Exec line of the unit as a command that runs with the privileges
    the unit gives it ($$ is a dollar sign; ${CONFIG} from Environment=)."""
    env = dict(re.findall(r"(\w+)=(\S*)", unit["Environment"][0]))
    line = line.replace("${CONFIG}", env["CONFIG"]).replace("$DAEMON_OPTS", "").replace("$$", "$")
    caps = unit["CapabilityBoundingSet"][0].split()
    groups = unit.get("SupplementaryGroups", [""])[0].split()
    return (["setpriv", "--bounding-set", "-all," + ",".join("+" + c[4:].lower() for c in caps),
             "--no-new-privs"] + (["--groups", ",".join(groups)] if groups else []) +
            shlex.split(line))


def parse_unit(path):
    """The [Service] section as {key: [values]} (keys may repeat)."""
    keys, section = {}, None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]":
                key, _, value = line.partition("=")
                keys.setdefault(key, []).append(value)
    return keys


@unittest.skipUnless(os.geteuid() == 0 and shutil.which("dpkg-buildpackage") and os.path.exists("/etc/debian_version"),
                     "needs root on Debian with dpkg-buildpackage (make deps)")
class DebianPackageTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.lock = open(LOCK, "w")
        cls.addClassCleanup(cls.lock.close)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(cls.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError("another package test has held %s for %d s" % (LOCK, LOCK_TIMEOUT))
                time.sleep(1)
        if any(package_installed(p) for p in PACKAGES):
            raise unittest.SkipTest("smtpmux is installed on this machine already; not touching it")
        # An account the package made (a crashed run's leftover) is fine: the
        # cleanup removes it.
        acct = account()
        if acct is not None and acct.pw_gecos.split(",")[0] != GECOS:
            raise unittest.SkipTest("this machine has its own %s account; a purge would delete it" % USER)
        cls.out = tempfile.mkdtemp(prefix="smtpmux-deb-")
        cls.addClassCleanup(shutil.rmtree, cls.out, ignore_errors=True)
        run("make", "-s", "-C", BUILDDIR, "dist", timeout=300)
        tarball = os.path.join(BUILDDIR, "smtpmux-%s.tar.gz" % cls.version())
        # Out of the build tree: distcheck wants it as distclean left it.
        cls.tarball = shutil.move(tarball, tempfile.mkdtemp(prefix="smtpmux-dist-"))
        cls.addClassCleanup(shutil.rmtree, os.path.dirname(cls.tarball), ignore_errors=True)
        env = dict(os.environ)
        env.pop("DEB_BUILD_OPTIONS", None)       # the unit tests run in the build
        # What `make check` hands its tests (CI runs these under it): its
        # command-line variables in MAKEFLAGS. The build must not run them.
        env["MAKEFLAGS"] = "TEST_LOGS=t/package/run-package-tests.log"
        run(os.path.join(SRCDIR, "contrib/debian/build-deb"), cls.tarball, cls.out, timeout=600, env=env)
        cls.debs = []
        for name in PACKAGES:
            debs = glob.glob(os.path.join(cls.out, "%s_*.deb" % name))
            assert len(debs) == 1, debs
            cls.debs.append(debs[0])
        cls.deb = cls.debs[0]

    @staticmethod
    def version():
        with open(os.path.join(BUILDDIR, "GNUmakefile")) as f:
            return re.search(r"^PACKAGE_VERSION = (\S+)$", f.read(), re.M).group(1)

    def setUp(self):
        # First registered, so it runs last: after every other cleanup.
        self.addCleanup(self.restore_machine)

    def restore_machine(self):
        """Stops, kills, purges and deletes whatever a test left behind."""
        if os.path.exists(INIT):
            run(INIT, "stop", check=False, timeout=120)
        pids = daemon_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        installed = [p for p in PACKAGES if package_installed(p)]
        if installed:
            dpkg("--purge", *installed, check=False)
        acct = account()
        if acct is not None and acct.pw_gecos.split(",")[0] == GECOS:
            run("userdel", USER, check=False)
        try:
            if grp.getgrnam(USER).gr_mem == []:
                run("groupdel", USER, check=False)
        except KeyError:
            pass
        for path in ("/etc/smtpmux", RUNDIR, LOGDIR, SPOOL):
            shutil.rmtree(path, ignore_errors=True)
        self.assertEqual(daemon_pids(), [], "smtpmuxd processes survived the cleanup")

    def install(self):
        """Installs both packages; returns dpkg's output."""
        res = dpkg("-i", *self.debs)
        # As installed no users are configured: nothing may run.
        self.assertEqual(daemon_pids(), [])
        return res.stdout + res.stderr

    def allow_smtpmuxd_starts(self):
        """A policy-rc.d that lets maintainer scripts start smtpmuxd (only),
        as on a machine without one; the machine's own comes back after."""
        saved = None
        if os.path.lexists(POLICY):
            saved = POLICY + ".smtpmux-test"
            os.rename(POLICY, saved)
        self.addCleanup(self.restore_policy, saved)
        with open(POLICY, "w") as f:
            f.write('#!/bin/sh\n[ "$1" = smtpmuxd ] && exit 0\nexit 101\n')
        os.chmod(POLICY, 0o755)

    @staticmethod
    def restore_policy(saved):
        os.unlink(POLICY)
        if saved is not None:
            os.rename(saved, POLICY)

    def diagnostics(self):
        return "\n--- %s:\n%s" % (LOG, read(LOG))

    def config(self, port, ds, hostname):
        return {
            "listen": ["127.0.0.1:%d" % port],
            "hostname": hostname,
            "workers": 2,
            "allow_insecure_auth": True,
            "log_file": LOG,
            "users": [{"email": "app@example.com", "password": "pkg-secret",
                       # A bare name: found in the compiled-in selector folder,
                       # which must be where the package put the selectors.
                       "selector_algo_path": "round_robin",
                       "downstreams": [{"addr": ds.addr, "tls": "none"}]}],
        }

    def wait_banner(self, port, hostname, what):
        try:
            wait_until(lambda: (read_banner(port) or "").startswith("220 " + hostname), what=what)
        except AssertionError as e:
            raise AssertionError(str(e) + self.diagnostics()) from None

    def check_workers(self, master):
        """The master is root; its workers run as smtpmux, groups dropped."""
        smtpmux = account()
        self.assertEqual(proc_status(master)["Uid"].split(), ["0"] * 4)
        workers = children(master)
        self.assertTrue(workers, "no workers")

        def dropped(pid):
            try:
                return proc_status(pid)["Uid"].split() == [str(smtpmux.pw_uid)] * 4
            except OSError:
                return True              # gone: not ours to judge
        # One greeting means one worker is ready: a child forked a moment
        # ago (another worker, the queue runner) is still root until its
        # set-up drops its privileges.
        wait_until(lambda: all(dropped(w) for w in workers), what="every child to drop root")
        for w in workers:
            st = proc_status(w)
            self.assertEqual({int(u) for u in st["Uid"].split()}, {smtpmux.pw_uid}, st)
            self.assertEqual({int(g) for g in st["Gid"].split()}, {smtpmux.pw_gid}, st)
            self.assertEqual([int(g) for g in st["Groups"].split()], [smtpmux.pw_gid], st)
        return workers

    def rotate_log(self, master, ds, port):
        """What the installed logrotate entry does, then a message that the
        workers must log to the new file."""
        conf = read(LOGROTATE)
        self.assertIn(LOGDIR + "/*.log", conf)
        create = re.search(r"^\s*create\s+(\d+)\s+(\S+)\s+(\S+)\s*$", conf, re.M)
        script = re.search(r"postrotate\n(.*?)\n\s*endscript", conf, re.S).group(1)
        os.rename(LOG, LOG + ".1")
        self.assertEqual(create.group(3), "adm")           # Debian's log readers
        if create:
            fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
            os.fchmod(fd, int(create.group(1), 8))
            os.fchown(fd, pwd.getpwnam(create.group(2)).pw_uid, grp.getgrnam(create.group(3)).gr_gid)
            os.close(fd)
        run("sh", "-c", script)

        def reopened():
            for pid in [master] + children(master):
                targets = []
                for fd in os.listdir("/proc/%d/fd" % pid):
                    try:
                        targets.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
                    except OSError:
                        pass
                if LOG not in targets or LOG + ".1" in targets:
                    return False
            return True
        wait_until(reopened, what="every process to reopen %s" % LOG)
        before = ds.handler.count()
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)
        self.assertEqual(ds.handler.count(), before + 1)
        wait_until(lambda: "status=sent" in read(LOG), what="a delivery logged to the new " + LOG)

    def test_lintian_is_clean(self):
        """Source and binary packages, every tag shown (-I -E --pedantic):
        none but the overridden ones, and every override still needed."""
        changes = sorted(glob.glob(os.path.join(self.out, "*.changes")))
        self.assertEqual(len(changes), 2, changes)         # source, and amd64 (or so)
        res = run("lintian", "-I", "-E", "--pedantic", *changes, check=False, timeout=600)
        out = res.stdout + res.stderr
        self.assertEqual(res.returncode, 0, out)
        tags = [l for l in res.stdout.splitlines() if re.match(r"[EWIPXCO]: ", l)]
        self.assertEqual(tags, [])

    def test_source_package(self):
        """3.0 (quilt) with the release tarball as orig.tar.gz and a watch
        file; the binaries were built from it, with the unit tests run, and
        every file the builds leave is kept."""
        version = self.version()
        dsc = os.path.join(self.out, "smtpmux_%s-1.dsc" % version)
        with open(dsc) as f:
            self.assertRegex(f.read(), r"(?m)^Format: 3\.0 \(quilt\)$")
        with open(self.tarball, "rb") as a, open(os.path.join(self.out, "smtpmux_%s.orig.tar.gz" % version), "rb") as b:
            self.assertEqual(a.read(), b.read())
        with tarfile.open(os.path.join(self.out, "smtpmux_%s-1.debian.tar.xz" % version)) as t:
            names = t.getnames()
        for name in ("debian/watch", "debian/control", "debian/rules", "debian/source/format",
                     "debian/smtpmux.smtpmuxd.init", "debian/smtpmux.smtpmuxd.service"):
            self.assertIn(name, names)
        for pattern in ("*_source.changes", "*_source.buildinfo", "*.source.build",
                        "smtpmux_*_*.changes", "smtpmux_*_*.buildinfo", "*.binary.build"):
            self.assertTrue(glob.glob(os.path.join(self.out, pattern)), pattern)
        # NEWS's newest entry is the version packaged (dated once released).
        with open(os.path.join(SRCDIR, "NEWS")) as f:
            self.assertRegex(f.readline(), r"^smtpmux %s \((unreleased|\d{4}-\d\d-\d\d)\)$"
                             % re.escape(version))
        log = read(glob.glob(os.path.join(self.out, "*.binary.build"))[0])
        # dpkg-source -x of the .dsc, then the build: the unit suites ran.
        self.assertIn("check-unit", log)
        self.assertRegex(log, r"(?m)^PASS: t/check_config$")
        self.assertRegex(log, r"(?m)^# FAIL: +0$")
        # Only the unit suites: never the suite of a make that called the build.
        ran = re.findall(r"(?m)^(?:PASS|FAIL|SKIP|ERROR|XFAIL|XPASS): (\S+)$", log)
        self.assertTrue(ran and all(re.fullmatch(r"t/check_\w+", t) for t in ran), ran)
        # With DEB_BUILD_OPTIONS=nocheck they do not (dry run of the rule).
        src = os.path.join(tempfile.mkdtemp(prefix="smtpmux-src-"), "src")
        self.addCleanup(shutil.rmtree, os.path.dirname(src), ignore_errors=True)
        run("dpkg-source", "-x", dsc, src)
        for opts, runs in (("", True), ("nocheck", False)):
            res = run("make", "-n", "-f", "debian/rules", "override_dh_auto_test", "MAKE=true",
                      cwd=src, env=dict(os.environ, DEB_BUILD_OPTIONS=opts))
            self.assertEqual("check-unit" in res.stdout, runs, (opts, res.stdout))

    def test_install_unconfigured(self):
        """As installed no users are configured: the install succeeds even
        with port 2525 taken, nothing starts, and the administrator is
        told why and where to begin."""
        self.allow_smtpmuxd_starts()
        taken = socket.socket()
        self.addCleanup(taken.close)
        try:
            taken.bind(("127.0.0.1", 2525))
            taken.listen()
        except OSError:
            pass                                  # taken by someone else: as good
        out = self.install()
        self.assertEqual(run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "smtpmux").stdout.strip(), "ii")
        self.assertRegex(out, r"Not starting SMTP relay smtpmuxd: %s: no users defined" % CONF)
        self.assertIn("README.Debian", out)
        self.assertEqual(daemon_pids(), [])
        # The init script, asked by the administrator, says the same.
        res = run(INIT, "start")
        self.assertIn("no users defined", res.stdout + res.stderr)
        self.assertEqual(daemon_pids(), [])
        self.assertEqual(run(INIT, "status", check=False).returncode, 3)
        res = run(INIT, "configtest", check=False)
        self.assertEqual(res.returncode, NOT_CONFIGURED, res.stderr)
        self.assertIn("no users defined", res.stderr)
        # systemd would skip the start (ExecCondition fails), not fail it.
        unit = parse_unit(UNIT)
        res = run(*unit_command(unit, unit["ExecCondition"][0]), check=False)
        self.assertEqual(res.returncode, NOT_CONFIGURED, res.stdout + res.stderr)
        self.assertIn("no users defined", res.stderr)
        # Where to begin, and the example selector.
        doc = "/usr/share/doc/smtpmux/"
        readme = doc + "README.Debian"
        with (open(readme) if os.path.exists(readme) else gzip.open(readme + ".gz", "rt")) as f:
            self.assertIn("Replace `users: []`", f.read())
        self.assertTrue(os.path.exists(doc + "examples/by_domain.c"))
        self.assertIn("ca-certificates", run("dpkg-query", "-W", "-f=${Recommends}", "smtpmux").stdout)
        # A reinstall (postinst configure with the old version) keeps the
        # administrator's owner and mode of the config.
        os.chmod(CONF, 0o600)
        self.install()
        self.assertEqual(os.stat(CONF).st_mode & 0o777, 0o600)

    def test_man_pages_show_debian_paths(self):
        self.install()
        pages = {}
        for path in ("/usr/share/man/man8/smtpmuxd.8.gz", "/usr/share/man/man5/smtpmux.yaml.5.gz",
                     "/usr/share/man/man3/smtpmux-selector.3.gz"):
            with gzip.open(path, "rt") as f:
                pages[path] = f.read()
            # (An administrator's own selector may well live in /usr/local.)
            self.assertIsNone(re.search(r"/usr/local(?!/lib/smtpmux/by_domain\.so)", pages[path]), path)
            self.assertIsNone(re.search(r"@[a-z_A-Z]+@", pages[path]), path)
        smtpmuxd = pages["/usr/share/man/man8/smtpmuxd.8.gz"]
        for path in (PIDFILE, "/etc/smtpmux/smtpmux.yaml", "/etc/default/smtpmuxd",
                     "/etc/init.d/smtpmuxd", "/var/log/smtpmux/", "/usr/lib/smtpmux/",
                     "/run/smtpmux/smtpmuxd.state"):
            self.assertIn(path, smtpmuxd)
        self.assertIn("/usr/lib/smtpmux", pages["/usr/share/man/man5/smtpmux.yaml.5.gz"])
        self.assertIn("/usr/lib/smtpmux", pages["/usr/share/man/man3/smtpmux-selector.3.gz"])

    def test_install_run_reload_stop_purge(self):
        self.install()

        # The system user, and the config as a conffile the workers cannot read
        # but the smtpmux group may (it holds passwords).
        smtpmux = account()
        self.assertIsNotNone(smtpmux)
        self.assertLess(smtpmux.pw_uid, 1000)
        st = os.stat(CONF)
        self.assertEqual(st.st_mode & 0o777, 0o640)
        self.assertEqual((st.st_uid, st.st_gid), (0, smtpmux.pw_gid))
        conffiles = run("dpkg-query", "-W", "-f=${Conffiles}", "smtpmux").stdout.split()
        for path in (CONF, INIT, "/etc/default/smtpmuxd", LOGROTATE):
            self.assertIn(path, conffiles)
        self.assertTrue(os.path.exists(UNIT))
        self.assertTrue(os.access(INIT, os.X_OK))
        # The queue's spool: the workers' user's, private.
        st = os.stat(SPOOL)
        self.assertEqual(st.st_mode & 0o777, 0o750)
        self.assertEqual((st.st_uid, st.st_gid), (smtpmux.pw_uid, smtpmux.pw_gid))
        # The .pc names the folder the package put the selectors in.
        selectors = {os.path.dirname(p) for p in run("dpkg", "-L", "smtpmux").stdout.split()
                     if p.endswith("/round_robin.so")}
        self.assertEqual(len(selectors), 1, selectors)
        res = run("pkg-config", "--variable=selectordir", "smtpmux")
        self.assertEqual({res.stdout.strip()}, selectors)

        ds = Downstream().start()
        self.addCleanup(ds.stop)
        port = free_port()
        config = self.config(port, ds, "first.test")
        write_config(config)
        run(INIT, "start")
        self.wait_banner(port, "first.test", "daemon via the init script")
        self.assertEqual(run(INIT, "start").returncode, 0)       # already running
        with open(PIDFILE) as f:
            master = int(f.read())
        self.check_workers(master)
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)
        self.assertEqual(ds.handler.count(), 1)
        self.assertEqual(os.stat(LOG).st_uid, smtpmux.pw_uid)

        # reload: a changed config is applied, by the same master.
        config["hostname"] = "second.test"
        write_config(config)
        run(INIT, "reload")
        self.wait_banner(port, "second.test", "the reloaded config")
        wait_until(lambda: len(workers_of(master)) == 2, what="the old workers to retire")
        self.check_workers(master)
        self.assertEqual(run(INIT, "status", check=False).returncode, 0)

        # A broken config is refused, and the running one stays.
        with open(CONF, "a") as f:
            f.write("\nlisten: [\n")
        res = run(INIT, "reload", check=False)
        self.assertNotEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn(CONF, res.stdout + res.stderr)
        self.assertNotEqual(run(INIT, "restart", check=False).returncode, 0)
        self.assertTrue(alive(master))
        self.assertTrue((read_banner(port) or "").startswith("220 second.test"))
        write_config(config)

        self.rotate_log(master, ds, port)

        run(INIT, "stop")
        wait_until(lambda: not daemon_pids(), what="the daemon and its workers to exit")
        self.assertNotEqual(run(INIT, "status", check=False).returncode, 0)

        res = dpkg("--purge", *PACKAGES)
        for path in ("/etc/smtpmux", DAEMON, INIT, UNIT, LOGDIR, RUNDIR, SPOOL):
            self.assertFalse(os.path.exists(path), path)
        # As README.Debian says: purge keeps the system account (and says
        # nothing about it going wrong).
        self.assertIsNotNone(account())
        self.assertEqual(grp.getgrnam(USER).gr_gid, account().pw_gid)
        self.assertIsNone(re.search(r"(?i)deluser|delgroup|warning|error", res.stdout + res.stderr),
                          res.stdout + res.stderr)
        for doc in ("README", "contrib/debian/smtpmux.README.Debian"):
            text = " ".join(read(os.path.join(SRCDIR, doc)).split())
            self.assertTrue("keeps the smtpmux system account" in text, doc)

    def test_systemd_unit(self):
        """The unit is checked by systemd-analyze, and its commands run with
        the privileges it gives them."""
        self.install()
        unit = parse_unit(UNIT)
        if shutil.which("systemd-analyze"):
            res = run("systemd-analyze", "verify", UNIT, check=False)
            self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
            # Anything else it says is a problem (bar man(1) being absent).
            said = [l for l in res.stderr.splitlines() if "Command 'man " not in l]
            self.assertEqual(said, [], res.stderr)
        # The master must start as root (it binds, then drops to `user:`).
        self.assertNotIn("User", unit)
        self.assertEqual(unit["NoNewPrivileges"], ["yes"])
        self.assertEqual(unit["ProtectSystem"], ["strict"])
        self.assertEqual(unit["PrivateTmp"], ["yes"])
        self.assertIn(RUNDIR, unit["ReadWritePaths"][0].split())
        self.assertEqual(unit["RuntimeDirectory"], ["smtpmux"])
        caps = unit["CapabilityBoundingSet"][0].split()
        self.assertIn("CAP_NET_BIND_SERVICE", caps)
        self.assertLessEqual(set(caps), {"CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID",
                                         "CAP_KILL", "CAP_CHOWN"})
        self.assertEqual(len(unit["ExecStartPre"]), 1)
        self.assertIn(" -t ", unit["ExecStartPre"][0] + " ")
        self.assertIn(" -t ", unit["ExecReload"][0] + " ")
        self.assertEqual(unit["ExecReload"][-1], "/bin/kill -HUP $MAINPID")
        self.assertIn("-p " + unit["PIDFile"][0], unit["ExecStart"][0])

        def command(line):
            return unit_command(unit, line)

        umask = int(unit["UMask"][0], 8)

        def start():
            os.makedirs(RUNDIR, mode=int(unit.get("RuntimeDirectoryMode", ["0755"])[0], 8), exist_ok=True)
            run(*command(unit["ExecCondition"][0]))       # 0: configured, go on
            run(*command(unit["ExecStartPre"][0]))
            run(*command(unit["ExecStart"][0]), preexec_fn=lambda: os.umask(umask))

        def stop(master):
            os.kill(master, getattr(signal, unit.get("KillSignal", ["SIGTERM"])[0]))
            wait_until(lambda: not daemon_pids(), what="the daemon and its workers to exit")

        ds = Downstream().start()
        self.addCleanup(ds.stop)
        port = free_port()
        config = self.config(port, ds, "first.test")
        write_config(config)
        start()
        self.wait_banner(port, "first.test", "daemon as the unit starts it")
        with open(PIDFILE) as f:
            master = int(f.read())
        bounding = int(proc_status(master)["CapEff"], 16)
        self.assertEqual(bounding, int(proc_status(master)["CapBnd"], 16))
        # The default state file is where the unit keeps things writable.
        writable = unit["ReadWritePaths"][0].split() + ["/run/" + d for d in unit["RuntimeDirectory"]]
        state = "/run/smtpmux/smtpmuxd.state"
        self.assertTrue(os.path.exists(state))
        self.assertIn(os.path.dirname(state), writable)
        self.assertIn(ds.addr, run(DAEMON, "-s", "status", "-c", CONF).stdout)
        old = self.check_workers(master)
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)

        # A restart before any rotation: the master, without
        # CAP_DAC_OVERRIDE, opens the log file it created and handed to the
        # workers' user.
        stop(master)
        start()
        self.wait_banner(port, "first.test", "daemon restarted before any log rotation")
        with open(PIDFILE) as f:
            master = int(f.read())
        old = self.check_workers(master)
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)

        # ExecReload: the check, then SIGHUP. The master must be able to
        # retire workers that run as another user (CAP_KILL).
        config["hostname"] = "second.test"
        write_config(config)
        run(*command(unit["ExecReload"][0]))
        os.kill(master, signal.SIGHUP)
        self.wait_banner(port, "second.test", "the reloaded config")
        try:
            wait_until(lambda: not any(alive(w) for w in old), what="the old workers to retire")
        except AssertionError as e:
            raise AssertionError(str(e) + self.diagnostics()) from None
        self.check_workers(master)
        self.rotate_log(master, ds, port)
        stop(master)

        # A restart: the master opens the log file its workers own (it has
        # no CAP_DAC_OVERRIDE).
        start()
        self.wait_banner(port, "second.test", "daemon restarted as the unit does")
        with open(PIDFILE) as f:
            master = int(f.read())
        self.assertEqual(send(port, "app@example.com", "pkg-secret")[0], 250)
        stop(master)
        self.assertEqual(ds.handler.count(), 4)
        self.assertNotRegex(read(LOG), r"warning:|error:", self.diagnostics())


if __name__ == "__main__":
    unittest.main()
