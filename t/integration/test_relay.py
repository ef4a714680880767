# SPDX-License-Identifier: MIT
"""The core path: authenticate, relay, fail over, reload, survive worker deaths."""

import base64
import json
import os
import signal
import socket
import smtplib
import subprocess
import threading
import unittest

from harness import (BUILDDIR, SMTPMUXD, Daemon, DaemonTestCase, free_port, make_message, plain_downstream, send,
                     swaks, user_entry, wait_until, read_banner)

USER, PASSWORD = "app@example.com", "s3cret-password"


class RelayTest(DaemonTestCase):

    def start_pair(self, fault_a=None, fault_b=None, selector="round_robin.so", extra=None):
        self.a = self.downstream(fault=fault_a)
        self.b = self.downstream(fault=fault_b)
        config = {
            "allow_insecure_auth": True,
            "users": [user_entry(USER, PASSWORD, [plain_downstream(self.a, name="A"),
                                                  plain_downstream(self.b, name="B")], selector)],
        }
        config.update(extra or {})
        return self.daemon(config)

    def test_round_robin_alternates(self):
        d = self.start_pair()
        for i in range(6):
            code, _ = send(d.port, USER, PASSWORD, msg=make_message("rr %d" % i))
            self.assertEqual(code, 250)
        self.assertEqual(self.a.handler.count(), 3)
        self.assertEqual(self.b.handler.count(), 3)
        # Strict alternation, across both workers: the sequence is shared.
        subjects_a = sorted(m["data"].split(b"Subject: ")[1].split(b"\r\n")[0] for m in self.a.messages)
        subjects_b = sorted(m["data"].split(b"Subject: ")[1].split(b"\r\n")[0] for m in self.b.messages)
        parity_a = {int(s.split()[1]) % 2 for s in subjects_a}
        parity_b = {int(s.split()[1]) % 2 for s in subjects_b}
        self.assertEqual(len(parity_a), 1)
        self.assertEqual(len(parity_b), 1)
        self.assertNotEqual(parity_a, parity_b)

    def test_queued_as_id_is_logged(self):
        d = self.start_pair(selector="failover.so")
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 250)
        self.assertIn(b"queued as", text)
        queue_id = text.split(b"queued as ")[1].split()[0].decode()
        d.wait_log("id=%s" % queue_id)
        log = d.log_text()
        self.assertIn("status=sent", log)
        self.assertNotIn(PASSWORD, log)

    def test_failover_when_first_is_down(self):
        dead = free_port()
        b = self.downstream()
        d = self.daemon({
            "allow_insecure_auth": True,
            "users": [user_entry(USER, PASSWORD, [plain_downstream("127.0.0.1:%d" % dead, name="dead"),
                                                  plain_downstream(b, name="B")], "failover.so")],
        })
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(b.handler.count(), 1)

    def test_failover_on_451_to_rcpt(self):
        d = self.start_pair(fault_a="rcpt_451", selector="failover.so")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(self.a.handler.count(), 0)
        self.assertEqual(self.b.handler.count(), 1)

    def test_failover_when_connection_drops_in_data(self):
        d = self.start_pair(fault_a="drop_data", selector="failover.so")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(self.b.handler.count(), 1)

    def test_all_down_gives_4xx_and_delivers_nothing(self):
        # Without the queue (test_queue.py has the default, queue on).
        d = self.start_pair(fault_a="rcpt_451", fault_b="rcpt_451", extra={"queue": {"enabled": False}})
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 451)
        self.assertIn(b"4.4.1", text)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 0)

    def test_all_reject_gives_5xx(self):
        d = self.start_pair(fault_a="reject_550", fault_b="reject_550")
        code, _ = send(d.port, USER, PASSWORD)
        self.assertEqual(code // 100, 5)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 0)
        self.assertEqual(d.log_text().count("stage=dot status=bounced"), 2)

    def test_mail_without_auth_is_refused(self):
        d = self.start_pair()
        client = smtplib.SMTP("127.0.0.1", d.port, timeout=30)
        self.addCleanup(client.close)
        client.ehlo("client.test")
        code, text = client.mail("app@example.com")
        self.assertEqual(code, 530)
        self.assertIn(b"5.7.0", text)

    def test_wrong_password_is_refused(self):
        d = self.start_pair()
        status, out = swaks(d.port, "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "wrong",
                            "--to", "rcpt@example.org")
        self.assertNotEqual(status, 0)
        self.assertIn("535", out)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 0)
        self.assertNotIn("wrong", d.log_text())

    def test_swaks_auth_login(self):
        d = self.start_pair()
        status, out = swaks(d.port, "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
                            "--to", "rcpt@example.org")
        self.assertEqual(status, 0, out)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 1)

    def test_ten_megabyte_message_arrives_identical(self):
        d = self.start_pair(selector="failover.so")
        line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
        body = line * (10 * 1024 * 1024 // len(line) + 1)
        msg = make_message("big") + body
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        got = self.a.messages[0]["data"]
        # The relay prepends one Received: trace header and changes nothing else.
        self.assertTrue(got.startswith(b"Received: "))
        self.assertEqual(got[got.index(b"\r\nFrom: ") + 2:], msg)

    def test_dot_lines_arrive_identical(self):
        d = self.start_pair(selector="failover.so")
        body = b"".join(b"." * (i % 5 + 1) + b" line %d\r\n" % i for i in range(500)) + b".\r\n..\r\n"
        msg = make_message("dots") + body
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        got = self.a.messages[0]["data"]
        self.assertEqual(got[got.index(b"\r\nFrom: ") + 2:], msg)

    def test_fifty_concurrent_clients(self):
        d = self.start_pair()
        results = []

        def client(i):
            results.append(send(d.port, USER, PASSWORD, msg=make_message("c %d" % i))[0])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(results, [250] * 50)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 50)
        self.assertEqual(self.a.handler.count(), 25)

    def test_reload_adds_downstream_without_failed_send(self):
        a = self.downstream()
        b = self.downstream()
        config = {"allow_insecure_auth": True,
                  "users": [user_entry(USER, PASSWORD, [plain_downstream(a, name="A")], "failover.so")]}
        d = self.daemon(config)
        stop = threading.Event()
        codes = []

        def loop():
            i = 0
            while not stop.is_set():
                try:
                    codes.append(send(d.port, USER, PASSWORD, msg=make_message("loop %d" % i))[0])
                except (smtplib.SMTPException, OSError) as e:
                    codes.append(repr(e))
                i += 1

        t = threading.Thread(target=loop)
        t.start()
        try:
            wait_until(lambda: len(codes) >= 3, what="client loop to send")
            config = json.loads(json.dumps(d.config))   # keeps listen and state_file
            config["users"][0]["downstreams"] = [plain_downstream(b, name="B"), plain_downstream(a, name="A")]
            self.assertTrue(d.reload(config))
            wait_until(lambda: b.handler.count() >= 3, what="new downstream to receive mail")
        finally:
            stop.set()
            t.join(60)
        self.assertTrue(codes)
        self.assertEqual([c for c in codes if c != 250], [])

    def test_reload_with_broken_config_keeps_serving(self):
        d = self.start_pair()
        with open(d.config_path) as f:
            good = f.read()
        self.assertFalse(d.reload(text=good.replace('"users"', '"usres"')))
        self.assertRegex(d.log_text(), r"reload failed.*smtpmux\.yaml:\d+")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)

    def crashing_daemon(self):
        """One worker whose selector calls abort() for crash@example.org."""
        a = self.downstream()
        scripted = os.path.join(BUILDDIR, "t", "selectors", "scripted.so")
        user = user_entry(USER, PASSWORD, [plain_downstream(a, name="A")], scripted)
        del user["selector_algo_path"]
        user["selector"] = {"path": scripted, "params": {"order": "0", "abort_rcpt": "crash@example.org"}}
        return a, self.daemon({"allow_insecure_auth": True, "workers": 1, "users": [user]})

    def test_crashing_selector_takes_down_only_its_worker(self):
        a, d = self.crashing_daemon()
        other = smtplib.SMTP("127.0.0.1", d.port, timeout=30)   # a session of the same worker
        self.addCleanup(other.close)
        other.ehlo("other.test")
        [worker] = d.workers()
        with self.assertRaises((smtplib.SMTPServerDisconnected, ConnectionError)):
            send(d.port, USER, PASSWORD, rcpts=("crash@example.org",))
        self.assertEqual(a.handler.count(), 0)
        d.wait_log("killed by signal 6")
        wait_until(lambda: len(d.workers()) == 1 and worker not in d.workers(), what="worker respawn")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(a.handler.count(), 1)
        with self.assertRaises((smtplib.SMTPServerDisconnected, ConnectionError)):
            other.noop()                      # it died with its worker, as documented
        self.forget_aborted_reports(d)

    def test_log_file_is_private_and_reopened_on_sigusr1(self):
        log = os.path.join(self.tmpdir, "mail.log")
        os.chmod(self.tmpdir, 0o711)          # as root, the workers run as nobody: like /var/log
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        d = self.start_pair(extra={"log_file": log})
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        wait_until(lambda: "status=sent" in read_text(log), what="delivery in the log file")
        self.assertEqual(os.stat(log).st_mode & 0o777, 0o660)
        os.rename(log, log + ".1")            # what logrotate does
        d.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: os.path.exists(log), what="log file reopened by the master")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=make_message("after rotation"))[0], 250)
        wait_until(lambda: "status=sent" in read_text(log), what="worker lines in the new file")
        self.assertEqual(os.stat(log).st_mode & 0o777, 0o660)
        with open(log + ".1") as f:
            self.assertEqual(f.read().count("attempts=1 status=sent"), 1)

    def test_crash_loop_is_throttled_and_recovers(self):
        a, d = self.crashing_daemon()
        for i in range(7):
            with self.assertRaises((smtplib.SMTPServerDisconnected, ConnectionError)):
                send(d.port, USER, PASSWORD, rcpts=("crash@example.org",))
        d.wait_log("children are crashing repeatedly: respawning one per second")
        self.assertEqual(d.proc.poll(), None)         # the master itself carries on
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(a.handler.count(), 1)
        self.forget_aborted_reports(d)

    def test_killed_worker_is_respawned(self):
        d = self.start_pair()
        # The first worker may greet before the master has forked the second.
        workers = wait_until(lambda: len(d.workers()) >= 2 and d.workers(),
                             what="both workers to be forked")
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: workers[0] not in d.workers() and len(d.workers()) == len(workers),
                   what="worker respawn")
        msgs = [make_message("after %d" % i) for i in range(4)]
        for msg in msgs:
            self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertArrived([self.a, self.b], *msgs)
        self.assertEqual((self.a.handler.count(), self.b.handler.count()), (2, 2))
        self.assertRegex(d.log_text(), r"killed by signal 9|signal 9")

    def test_sigterm_exits_zero(self):
        d = self.start_pair()
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(d.stop(), 0)

    def test_prototype_config_loads_unchanged(self):
        with open(os.path.join(self.tmpdir, "proto.yaml"), "w") as f:
            f.write('users:\n'
                    '  - email: "test@user.com"\n'
                    '    password: "password123"\n'
                    '    selector_algo_path: "selectors/round_robin.so"\n'
                    '    downstreams:\n'
                    '      - addr: "127.0.0.1:2526"\n'
                    '        user: "any"\n'
                    '        pass: "any"\n')
        from harness import SMTPMUXD, SELECTORS
        res = subprocess.run([SMTPMUXD, "-t", "-c", os.path.join(self.tmpdir, "proto.yaml")],
                             env=dict(os.environ, SMTPMUX_SELECTOR_PATH=os.path.dirname(SELECTORS)),
                             capture_output=True, text=True)
        self.assertEqual(res.returncode, 0, res.stderr)

    def test_broken_config_names_file_line_and_key(self):
        path = os.path.join(self.tmpdir, "bad.yaml")
        with open(path, "w") as f:
            f.write("users:\n  - email: a@b\n    password: x\n    downstreams:\n      - addr: \"nohost\"\n")
        from harness import SMTPMUXD
        res = subprocess.run([SMTPMUXD, "-t", "-c", path], capture_output=True, text=True)
        self.assertEqual(res.returncode, 1)
        self.assertIn("%s:5:" % path, res.stderr)
        self.assertIn("users[0].downstreams[0].addr", res.stderr)

    def half_closed_client(self, d, after_dot):
        """Sends a message, shuts its sending side once after_dot() returns,
        and reads what the server says until it closes."""
        token = base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode()).decode()
        script = ("EHLO half.test\r\nAUTH PLAIN %s\r\nMAIL FROM:<app@example.com>\r\n"
                  "RCPT TO:<rcpt@example.org>\r\nDATA\r\n" % token).encode()
        with socket.create_connection(("127.0.0.1", d.port), timeout=30) as s:
            f = s.makefile("rb")
            self.assertTrue(f.readline().startswith(b"220"))
            s.sendall(script)
            while not f.readline().startswith(b"354"):
                pass
            s.sendall(make_message("half-close") + b".\r\n")
            after_dot()
            s.shutdown(socket.SHUT_WR)        # no QUIT: done sending, still reading
            return f.read().decode()

    def test_client_that_half_closes_after_the_dot_hears_250(self):
        # The downstream holds its verdict until the client has half-closed:
        # a relay past its final dot runs to the end, and the client hears it.
        d = self.start_pair(selector="failover.so")
        self.a.handler.hold_data = threading.Event()
        self.addCleanup(self.a.handler.hold_data.set)
        rest = self.half_closed_client(d, lambda: wait_until(self.a.handler.data_started.is_set,
                                                             what="the dot at the downstream"))
        self.assertRegex(rest, r"^250 2\.0\.0 Ok: queued as \w+", d.log_text())
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 1)

    def test_client_that_half_closes_before_the_relay_sent_the_dot_hears_421(self):
        # Before the dot has gone out the message is taken back: the client
        # is told so, and nothing arrives anywhere (no duplicate on retry).
        d = self.start_pair(selector="failover.so")
        self.a.handler.hold_rcpt = threading.Event()
        self.addCleanup(self.a.handler.hold_rcpt.set)
        rest = self.half_closed_client(d, lambda: wait_until(self.a.handler.rcpt_started.is_set,
                                                             what="the RCPT at the downstream"))
        self.assertRegex(rest, r"^421 4\.4\.2 ", d.log_text())
        d.wait_log("hung up before the message was sent")
        self.a.handler.hold_rcpt.set()
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 0)

    def test_second_daemon_on_the_same_state_file_is_refused(self):
        d = self.start_pair()
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        other = os.path.join(self.tmpdir, "other")
        os.mkdir(other)
        config = json.loads(json.dumps(d.config))
        config["listen"] = ["127.0.0.1:%d" % free_port()]   # only the state file is shared
        second = Daemon(other, config)
        res = subprocess.run(second.command(), env=second.env, capture_output=True, text=True,
                             timeout=30)
        self.assertEqual(res.returncode, 3, res.stderr)
        self.assertIn("state file %s is in use" % d.config["state_file"], res.stderr)
        # The first daemon's shared state was left alone: its counts go on.
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        status = subprocess.run([SMTPMUXD, "-s", "status", "-c", d.config_path], env=d.env,
                                capture_output=True, text=True, timeout=30)
        table = status.stdout.split("\n\n")[0]              # the queue line follows
        sent = [int(line.split()[-3]) for line in table.splitlines()[1:]]
        self.assertEqual(sum(sent), 2, status.stdout)


def read_text(path):
    with open(path) as f:
        return f.read()


if __name__ == "__main__":
    unittest.main()
