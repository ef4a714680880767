# SPDX-License-Identifier: MIT
"""Shared health, circuit breaking, quotas, throttling and the status views."""

import os
import re
import signal
import smtplib
import threading
import unittest
import urllib.request

from harness import (DaemonTestCase, Downstream, free_port, make_message, plain_downstream,
                     send, user_entry, wait_until)

USER, PASSWORD = "app@example.com", "health-password"


def send_many(port, count, prefix="m"):
    """Sends count messages over one authenticated connection; returns the codes."""
    codes = []
    client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    try:
        client.ehlo("client.test")
        client.login(USER, PASSWORD)
        for i in range(count):
            client.mail("app@example.com")
            client.rcpt("rcpt@example.org")
            codes.append(client.data(make_message("%s %d" % (prefix, i)))[0])
    finally:
        client.quit()
    return codes


class HealthTest(DaemonTestCase):

    def make(self, downstreams, selector="failover.so", **extra):
        config = {"allow_insecure_auth": True,
                  "users": [user_entry(USER, PASSWORD, downstreams, selector)]}
        config.update(extra)
        return self.daemon(config)

    def status(self, d):
        return d.status()

    def test_quota_is_exact_across_eight_workers(self):
        a, b = self.downstream(), self.downstream()
        d = self.make([plain_downstream(a, name="A", max_per_minute=10), plain_downstream(b, name="B")],
                      workers=8)
        codes = []
        lock = threading.Lock()

        def client(i):
            code = send(d.port, USER, PASSWORD, msg=make_message("q %d" % i))[0]
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(codes, [250] * 25)
        self.assertEqual(a.handler.count(), 10)
        self.assertEqual(b.handler.count(), 15)
        self.assertRegex(self.status(d), r"A\b.*10/10")

    def test_circuit_opens_and_skips(self):
        # A cooldown no slow run can outlast: while the circuit is open,
        # A is not tried at all.
        a, b = self.downstream(fault="rcpt_451"), self.downstream()
        d = self.make([plain_downstream(a, name="A"), plain_downstream(b, name="B")],
                      workers=1, health={"fail_threshold": 3, "cooldown": 600})
        self.assertEqual(send_many(d.port, 3, "fail"), [250] * 3)
        self.assertEqual(a.handler.rcpt_attempts, 3)
        self.assertEqual(send_many(d.port, 3, "open"), [250] * 3)
        self.assertEqual(a.handler.rcpt_attempts, 3)
        self.assertEqual(b.handler.count(), 6)
        self.assertRegex(self.status(d), r"A\b.*down")

    def test_circuit_half_opens_and_closes(self):
        a, b = self.downstream(fault="rcpt_451"), self.downstream()
        d = self.make([plain_downstream(a, name="A"), plain_downstream(b, name="B")],
                      workers=1, health={"fail_threshold": 3, "cooldown": 1})
        self.assertEqual(send_many(d.port, 3, "fail"), [250] * 3)
        self.assertEqual(a.handler.rcpt_attempts, 3)
        # Once the cooldown has passed, the status says so, and A gets one
        # trial message (when the rotation puts it in front): it succeeds
        # and closes the circuit.
        wait_until(lambda: re.search(r"A\b.*half-open", self.status(d)), what="A to half-open")
        a.handler.fault = None
        wait_until(lambda: send(d.port, USER, PASSWORD)[0] == 250 and a.handler.count() == 1,
                   what="half-open trial to reach A")
        self.assertRegex(self.status(d), r"A\b.*up")
        self.assertEqual(send_many(d.port, 2, "closed"), [250, 250])
        self.assertEqual(a.handler.count(), 3)

    def test_throttle_reply_moves_traffic_on(self):
        for fault in ("throttle", "quota_550"):
            with self.subTest(fault=fault):
                a, b = self.downstream(fault=fault), self.downstream()
                d = self.make([plain_downstream(a, name="A"), plain_downstream(b, name="B")])
                self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
                self.assertEqual(b.handler.count(), 1)
                self.assertRegex(self.status(d), r"A\b.*throttled")
                # While throttled, A is not tried again.
                attempts = a.handler.rcpt_attempts
                self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
                self.assertEqual(a.handler.rcpt_attempts, attempts)
                d.stop()

    def test_weighted_three_to_one(self):
        a, b = self.downstream(), self.downstream()
        d = self.make([plain_downstream(a, name="A", weight=3), plain_downstream(b, name="B", weight=1)],
                      selector="weighted.so")
        self.assertEqual(send_many(d.port, 400), [250] * 400)
        self.assertTrue(285 <= a.handler.count() <= 315, a.handler.count())
        self.assertEqual(a.handler.count() + b.handler.count(), 400)

    def test_state_survives_sighup(self):
        a, b = self.downstream(fault="rcpt_451"), self.downstream()
        d = self.make([plain_downstream(a, name="A"), plain_downstream(b, name="B")],
                      health={"fail_threshold": 3, "cooldown": 600})
        send_many(d.port, 3)
        self.assertRegex(self.status(d), r"A\b.*down")
        self.assertTrue(d.reload(d.config))
        self.assertRegex(self.status(d), r"A\b.*down")
        attempts = a.handler.rcpt_attempts
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(a.handler.rcpt_attempts, attempts)

    def test_killed_worker_leaves_no_in_flight_leak(self):
        a = self.downstream()
        a.handler.data_delay = 30.0
        d = self.make([plain_downstream(a, name="A")], workers=1,
                      limits={"shutdown_timeout": 2})
        t = threading.Thread(target=lambda: self._send_ignoring_errors(d.port))
        t.start()
        self.assertTrue(a.handler.data_started.wait(30))
        self.assertEqual(self.column(d, "A", "FLIGHT"), "1")
        worker = d.workers()[0]
        os.kill(worker, signal.SIGKILL)
        t.join(60)
        wait_until(lambda: self.column(d, "A", "FLIGHT") == "0", what="in-flight count to drop")
        a.handler.data_delay = 0
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)

    def column(self, d, name, heading):
        return d.status_cell(name, heading)

    def _send_ignoring_errors(self, port):
        try:
            send(port, USER, PASSWORD)
        except (smtplib.SMTPException, OSError):
            pass

    def test_probe_finds_dead_and_recovered_downstream(self):
        a = Downstream()                      # its port is reserved; the server starts later
        b = self.downstream()
        d = self.make([plain_downstream(a, name="A", probe_interval=1), plain_downstream(b, name="B")],
                      health={"fail_threshold": 2, "cooldown": 1})
        wait_until(lambda: self.column(d, "A", "STATE") in ("down", "half-open"),
                   what="probes to open A's circuit")
        self.assertEqual(self.column(d, "A", "ATTEMPTS"), "0")   # no message was needed
        a.start()
        self.addCleanup(a.stop)
        wait_until(lambda: self.column(d, "A", "STATE") == "up", what="probes to close A's circuit")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual((a.handler.count(), b.handler.count()), (1, 0))

    def test_status_lists_every_downstream_and_metrics(self):
        a, b, c = self.downstream(), self.downstream(), self.downstream()
        metrics_port = free_port()
        d = self.make([plain_downstream(a, name="A"), plain_downstream(b, name="B", max_per_day=500),
                       plain_downstream(c, name="C")],
                      status_listen="127.0.0.1:%d" % metrics_port)
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        out = self.status(d)
        for name in ("A", "B", "C"):
            self.assertRegex(out, r"(?m)^\s*%s\b" % name)
        self.assertIn("/500", out)

        def scrape():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % metrics_port, timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return None

        text = wait_until(scrape, what="metrics endpoint")
        self.assertIn("# TYPE smtpmux_downstream_attempts_total counter", text)
        self.assertRegex(text, r'smtpmux_downstream_successes_total\{[^}]*downstream="A"[^}]*\} 1')


if __name__ == "__main__":
    unittest.main()
