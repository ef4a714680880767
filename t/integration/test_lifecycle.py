# SPDX-License-Identifier: MIT
"""Life cycle and trust: reload, stop, limits, the pidfile, the shared state
against a compromised worker and a mishandled state file, and the master's
hardening (inherited descriptors, core dumps, the log file)."""

import json
import os
import resource
import shutil
import signal
import smtplib
import socket
import base64
import subprocess
import threading
import unittest

from harness import (BUILDDIR, SMTPMUXD, Daemon, DaemonTestCase, free_port, make_message, plain_downstream,
                     read_banner, send, user_entry, wait_until)

USER, PASSWORD = "app@example.com", "lifecycle-password"
NOBODY = 65534


def one_user(ds, selector="failover.so", **extra):
    config = {"allow_insecure_auth": True, "workers": 1,
              "users": [user_entry(USER, PASSWORD, [plain_downstream(ds, name="A", **extra)],
                                   selector)]}
    return config


def send_ignoring_errors(port, results, **kwargs):
    try:
        results.append(send(port, USER, PASSWORD, **kwargs)[0])
    except (smtplib.SMTPException, OSError) as e:
        results.append(repr(e))


def as_user(uid, gid, groups=()):
    """A preexec_fn that runs the child as uid:gid."""
    def switch():
        os.setgroups(list(groups))
        os.setgid(gid)
        os.setuid(uid)
    return switch


def open_files(pid):
    """What the descriptors of a process name (those that stay open)."""
    names = []
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            names.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except FileNotFoundError:
            pass                    # closed meanwhile
    return names


def proc_ids(pid, which):
    """The real uid or gid (which: "Uid", "Gid") of a process."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(which + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for %d" % (which, pid))


def proc_owner(pid):
    """Who owns /proc/PID: root when the process is not dumpable."""
    return os.stat("/proc/%d/status" % pid).st_uid


def core_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max core file size"):
                return line.split()[4:6]
    raise AssertionError("no core limit for %d" % pid)


class SharedStateTest(DaemonTestCase):
    """The master must survive whatever a worker or an admin does to the state."""

    def test_a_compromised_worker_cannot_harm_the_master(self):
        a = self.downstream()
        hostile = os.path.join(BUILDDIR, "t", "selectors", "hostile.so")
        config = one_user(a)
        evil = user_entry("evil@example.com", PASSWORD, [plain_downstream(a, name="A")])
        del evil["selector_algo_path"]
        evil["selector"] = {"path": hostile}
        config["users"].append(evil)
        d = self.daemon(config)
        [worker] = d.workers()
        # The worker writes 0xff over all it can reach of the shared state,
        # tries to make the rest writable, and aborts.
        with self.assertRaises((smtplib.SMTPServerDisconnected, ConnectionError)):
            send(d.port, "evil@example.com", PASSWORD)
        d.wait_log("killed by signal 6")
        wait_until(lambda: d.proc.poll() is not None or
                   (len(d.workers()) == 1 and worker not in d.workers()),
                   what="the worker to be respawned")
        self.assertIsNone(d.proc.poll(), d.log_text())
        self.assertIsNotNone(d.status_cell("A", "STATE"))
        self.assertTrue(d.reload(d.config))
        msg = make_message("after the attack")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertArrived(a, msg)
        self.assertIsNone(d.proc.poll())
        self.forget_aborted_reports(d)

    def test_a_truncated_state_file_harms_nobody(self):
        a = self.downstream()
        d = self.daemon(one_user(a))
        state = d.config["state_file"]
        os.truncate(state, 0)
        msg = make_message("after truncation")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertArrived(a, msg)
        d.wait_log("state file %s was truncated: writing it again" % state)
        wait_until(lambda: os.path.getsize(state) > 0, what="the state file written again")
        self.assertIsNone(d.proc.poll())
        self.assertNotIn("killed by signal", d.log_text())
        self.assertEqual(d.status_cell("A", "SENT"), "1")

    def test_a_deleted_state_file_still_locks_out_a_second_daemon(self):
        a = self.downstream()
        d = self.daemon(one_user(a))
        state = d.config["state_file"]
        os.unlink(state)
        other = os.path.join(self.tmpdir, "other")
        os.mkdir(other)
        config = json.loads(json.dumps(d.config))
        config["listen"] = ["127.0.0.1:%d" % free_port()]
        second = Daemon(other, config)
        res = subprocess.run(second.command(), env=second.env, capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(res.returncode, 3, res.stderr)
        self.assertIn("state file %s is in use by another smtpmuxd (pid %d"
                      % (state, d.proc.pid), res.stderr)
        d.wait_log("state file %s was removed: writing it again" % state)
        msg = make_message("still here")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertArrived(a, msg)

    def test_a_killed_worker_gives_its_quota_back(self):
        a = self.downstream()
        a.handler.hold_rcpt = threading.Event()
        d = self.daemon(one_user(a, max_per_minute=100))
        results = []
        t = threading.Thread(target=send_ignoring_errors, args=(d.port, results))
        t.start()
        self.assertTrue(a.handler.rcpt_started.wait(30))
        self.assertEqual(d.status_cell("A", "MINUTE"), "1/100")
        [worker] = d.workers()
        os.kill(worker, signal.SIGKILL)
        t.join(60)
        wait_until(lambda: worker not in d.workers() and len(d.workers()) == 1,
                   what="the worker to be respawned")
        self.assertEqual((d.status_cell("A", "MINUTE"), d.status_cell("A", "FLIGHT")),
                         ("0/100", "0"))
        a.handler.hold_rcpt.set()
        msg = make_message("after the kill")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertArrived(a, msg)
        self.assertEqual(d.status_cell("A", "MINUTE"), "1/100")

    def test_status_for_root_and_the_workers_group_only(self):
        a = self.downstream()
        d = self.daemon(one_user(a))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        # A copy of the configuration every reader can read: the socket decides.
        readable = os.path.join(self.tmpdir, "readable")
        os.mkdir(readable)
        os.chmod(self.tmpdir, 0o711)
        os.chmod(readable, 0o755)
        config_copy = os.path.join(readable, "smtpmux.yaml")
        shutil.copy(d.config_path, config_copy)
        os.chmod(config_copy, 0o644)
        workers_gid = proc_ids(d.workers()[0], "Gid")
        if workers_gid == 0:
            self.skipTest("workers run as root")

        def status(**kwargs):
            return subprocess.run([SMTPMUXD, "-s", "status", "-c", config_copy], env=d.env,
                                  capture_output=True, text=True, timeout=60, **kwargs)

        self.assertIn("A ", status().stdout)
        member = status(preexec_fn=as_user(12345, 12345, (workers_gid,)))
        self.assertEqual(member.returncode, 0, member.stderr)
        self.assertRegex(member.stdout, r"(?m)^A\s.*\s1\s+0\s+-$")
        stranger = status(preexec_fn=as_user(12345, 12345))
        self.assertEqual(stranger.returncode, 3)
        self.assertIn("refused", stranger.stderr)
        self.assertEqual(stranger.stdout, "")

    def test_a_planted_state_file_is_not_believed(self):
        a = self.downstream()
        d = self.daemon(one_user(a))
        for i in range(2):
            self.assertEqual(send(d.port, USER, PASSWORD, msg=make_message("m %d" % i))[0], 250)
        wait_until(lambda: d.status_cell("A", "SENT") == "2", what="two deliveries counted")
        self.assertEqual(d.stop(), 0)
        state = d.config["state_file"]
        # Someone else's file with counts in it, where the state file goes.
        os.chown(state, NOBODY, NOBODY)
        config = dict(d.config)
        del config["listen"]
        d2 = self.daemon(config)
        d2.wait_log("state file %s ignored (owned by uid %d" % (state, NOBODY))
        self.assertEqual(d2.status_cell("A", "SENT"), "0")
        st = os.stat(state)
        self.assertEqual((st.st_uid, st.st_mode & 0o777), (os.geteuid(), 0o600))


class HardeningTest(DaemonTestCase):
    """What the master does to itself before it reads a secret."""

    def nobody_daemon(self, a, args=()):
        """A daemon started as nobody, in a folder of its own."""
        os.chmod(self.tmpdir, 0o711)
        home = os.path.join(self.tmpdir, "nobody")
        os.mkdir(home)
        os.chown(home, NOBODY, NOBODY)
        d = Daemon(home, one_user(a, max_per_minute=10))
        os.chown(d.config_path, NOBODY, NOBODY)
        # AddressSanitizer lowers the core limit itself unless told not to.
        d.env["ASAN_OPTIONS"] = ":".join(filter(None, [d.env.get("ASAN_OPTIONS"),
                                                       "disable_coredump=0"]))
        d.args = list(args)

        def drop():
            resource.setrlimit(resource.RLIMIT_CORE, (1 << 30, 1 << 30))
            as_user(NOBODY, NOBODY)()

        d.popen["preexec_fn"] = drop
        self.addCleanup(self._stop_daemon, d)
        return d.start()

    def test_inherited_descriptors_are_closed(self):
        a = self.downstream()
        leak = open(os.path.join(self.tmpdir, "secret-leak"), "w")
        self.addCleanup(leak.close)
        d = self.daemon(one_user(a), start=False)
        d.popen["pass_fds"] = (leak.fileno(),)
        d.start()
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        for pid in [d.proc.pid] + d.children():
            self.assertNotIn(leak.name, open_files(pid), "pid %d" % pid)

    def test_the_master_is_not_dumpable_and_dumps_no_core(self):
        a = self.downstream()
        d = self.nobody_daemon(a)
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        for pid in [d.proc.pid] + d.children():
            self.assertEqual(proc_owner(pid), 0, "pid %d is dumpable" % pid)
            self.assertEqual(core_limit(pid), ["0", "0"])

    def test_workers_dump_core_when_asked(self):
        a = self.downstream()
        d = self.nobody_daemon(a, ["-D"])
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(proc_owner(d.proc.pid), 0)          # the master never
        [worker] = d.workers()
        self.assertEqual(proc_owner(worker), NOBODY)
        self.assertEqual(core_limit(worker), [str(1 << 30)] * 2)

    def log_trap(self):
        """A root-only file that a log file name will point at."""
        target = os.path.join(self.tmpdir, "precious")
        with open(target, "w") as f:
            f.write("precious\n")
        os.chmod(target, 0o600)
        return target

    def test_a_log_file_symlink_is_not_followed(self):
        a = self.downstream()
        target, log = self.log_trap(), os.path.join(self.tmpdir, "mail.log")
        os.symlink(target, log)
        config = one_user(a)
        config["log_file"] = log
        d = self.daemon(config, start=False)
        res = subprocess.run(d.command(), env=d.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(res.returncode, 3, res.stderr)
        self.assertIn("cannot open log file %s" % log, res.stderr)
        st = os.stat(target)
        self.assertEqual(st.st_uid, 0)
        with open(target) as f:
            self.assertEqual(f.read(), "precious\n")

    def test_a_log_file_with_another_name_is_not_handed_over(self):
        a = self.downstream()
        target, log = self.log_trap(), os.path.join(self.tmpdir, "mail.log")
        os.link(target, log)
        config = one_user(a)
        config["log_file"] = log
        d = self.daemon(config)
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        with open(target) as f:
            self.assertIn("cannot hand log file %s to user" % log, f.read())
        self.assertEqual(os.stat(target).st_uid, 0)


class LifecycleTest(DaemonTestCase):
    """Reload, stop and limits, through the real daemon."""

    def test_a_session_that_spans_a_reload_sends_its_next_message(self):
        a = self.downstream()
        d = self.daemon(one_user(a), start=False)
        d.args = ["-d"]
        d.start()
        first, second = make_message("before the reload"), make_message("after the reload")
        client = smtplib.SMTP("127.0.0.1", d.port, timeout=60)
        self.addCleanup(client.close)
        client.ehlo("client.test")
        client.login(USER, PASSWORD)
        client.sendmail("app@example.com", ["rcpt@example.org"], first)
        self.assertTrue(d.reload(d.config))
        d.wait_log("retiring: generation=1 sessions=1")     # the old worker knows
        client.sendmail("app@example.com", ["rcpt@example.org"], second)
        self.assertArrived(a, first, second)
        client.quit()
        d.wait_log("worker pid=")                           # it leaves with its last client
        wait_until(lambda: len(d.workers()) == 1, what="the old worker to exit")

    def test_sigterm_during_a_transaction_still_answers_it(self):
        a = self.downstream()
        a.handler.hold_data = threading.Event()
        d = self.daemon(one_user(a), start=False)
        d.args = ["-d"]
        d.start()
        msg, results = make_message("in flight at SIGTERM"), []
        t = threading.Thread(target=send_ignoring_errors, args=(d.port, results),
                             kwargs={"msg": msg})
        t.start()
        self.assertTrue(a.handler.data_started.wait(30))
        d.proc.send_signal(signal.SIGTERM)
        d.wait_log("stopping: generation=1 sessions=1")     # the worker has the signal
        a.handler.hold_data.set()
        t.join(60)
        self.assertEqual(results, [250])
        self.assertArrived(a, msg)
        self.assertEqual(d.proc.wait(60), 0)
        d.log.close()

    def test_connection_beyond_max_sessions_gets_421(self):
        a = self.downstream()
        config = one_user(a)
        config["limits"] = {"max_sessions": 3}
        d = self.daemon(config)
        clients = []
        for i in range(3):
            c = smtplib.SMTP("127.0.0.1", d.port, timeout=60)
            self.addCleanup(c.close)
            self.assertEqual(c.ehlo("c%d.test" % i)[0], 250)
            clients.append(c)
        self.assertRegex(read_banner(d.port) or "", r"^421 4\.3\.2 ")
        msg = make_message("within the limit")
        clients[0].login(USER, PASSWORD)
        clients[0].sendmail("app@example.com", ["rcpt@example.org"], msg)
        self.assertArrived(a, msg)
        clients[1].quit()
        wait_until(lambda: (read_banner(d.port) or "").startswith("220"),
                   what="room for a new session")

    def test_the_pidfile_is_gone_after_stop(self):
        a = self.downstream()
        d = self.daemon(one_user(a), start=False)
        pidfile = os.path.join(self.tmpdir, "run", "smtpmuxd.pid")
        os.mkdir(os.path.dirname(pidfile))
        d.args = ["-p", pidfile]
        d.start()
        with open(pidfile) as f:
            self.assertEqual(int(f.read()), d.proc.pid)
        self.assertEqual(d.stop(), 0)
        self.assertFalse(os.path.exists(pidfile))

    def test_a_bare_lf_is_refused_and_nothing_is_relayed(self):
        a = self.downstream()
        d = self.daemon(one_user(a))
        token = base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode()).decode()
        transaction = b"MAIL FROM:<app@example.com>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n"
        smuggled = (make_message("smuggler") + b"line\n.\nMAIL FROM:<evil@example.com>\r\n"
                    b"RCPT TO:<victim@example.org>\r\nDATA\r\nforged\r\n.\r\n")
        clean = make_message("clean")
        with socket.create_connection(("127.0.0.1", d.port), timeout=60) as s:
            f = s.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if line[3:4] != b"-":
                        return line

            self.assertTrue(reply().startswith(b"220"))
            s.sendall(b"EHLO lf.test\r\n")
            self.assertTrue(reply().startswith(b"250"))
            s.sendall(("AUTH PLAIN %s\r\n" % token).encode())
            self.assertTrue(reply().startswith(b"235"))
            for body, expect in ((smuggled, b"550 5.5.2"), (clean + b".\r\n", b"250 ")):
                s.sendall(transaction)
                self.assertTrue(reply().startswith(b"250"))
                self.assertTrue(reply().startswith(b"250"))
                self.assertTrue(reply().startswith(b"354"))
                s.sendall(body)
                self.assertTrue(reply().startswith(expect))
            s.sendall(b"QUIT\r\n")
            self.assertTrue(reply().startswith(b"221"))
        self.assertArrived(a, clean)
        self.assertEqual(a.handler.rcpt_attempts, 1)


if __name__ == "__main__":
    unittest.main()
