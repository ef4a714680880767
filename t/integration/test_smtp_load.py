# SPDX-License-Identifier: MIT
"""smtp-load, the benchmarks' load generator (contrib/bench/load): what its
JSON report counts is what the server received.

These tests check the tool's correctness, never its speed: small runs
against aiosmtpd (which records every message), smtp-sink (which offers
PIPELINING and dumps each message to a file) and smtpmuxd itself.
"""

import json
import os
import subprocess

from certs import TestCA
from harness import BUILDDIR, DaemonTestCase, free_port, read_banner, user_entry, wait_until

SMTP_LOAD = os.path.join(BUILDDIR, "contrib", "bench", "smtp-load")
SMTP_SINK = "/usr/sbin/smtp-sink"
USER, PASSWORD = "load-user", "load-password"


class SmtpLoadTest(DaemonTestCase):

    def load(self, port, *args, status=0):
        """Runs smtp-load --json against port; returns its report."""
        res = subprocess.run([SMTP_LOAD, "--json", "--timeout", "30", *args, "127.0.0.1:%d" % port],
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(res.returncode, status, res.stdout + res.stderr)
        # a sanitizer build (./configure --enable-sanitizers) reports on stderr
        self.assertNotRegex(res.stderr, r"ERROR: \w+Sanitizer|runtime error:")
        report = json.loads(res.stdout)
        lat = report["latency_ms"]["message"]
        self.assertEqual(lat["count"], report["messages"])
        if lat["count"]:
            self.assertTrue(0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], lat)
        return report

    def sink(self, dump_dir, *flags):
        """smtp-sink on a free port, dumping each transaction into dump_dir."""
        port = free_port()
        os.makedirs(dump_dir)
        user = ["-u", "root"] if os.geteuid() == 0 else []
        proc = subprocess.Popen([SMTP_SINK, *user, *flags, "-d", os.path.join(dump_dir, "%M."),
                                 "127.0.0.1:%d" % port, "64"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.terminate)
        wait_until(lambda: (read_banner(port) or "").startswith("220"), what="smtp-sink")
        return port

    def test_counts_match_what_the_server_received(self):
        ds = self.downstream(auth=(USER, PASSWORD))
        report = self.load(ds.port, "-c", "3", "-n", "20", "-m", "4", "-s", "2000",
                           "-u", USER, "-p", PASSWORD)
        self.assertEqual((report["messages"], report["failed"]), (20, 0))
        self.assertEqual((report["sessions"], report["sessions_failed"]), (5, 0))
        self.assertEqual(report["latency_ms"]["session"]["count"], 5)
        self.assertEqual(report["errors"], {})
        # aiosmtpd stores a message before it answers the dot
        self.assertEqual(ds.handler.count(), 20)
        for m in ds.messages:
            self.assertEqual(len(m["data"]), 2000)
            self.assertEqual((m["from"], m["rcpts"]), ("load@example.com", ["sink@example.org"]))
            self.assertTrue(m["data"].startswith(b"From: <load@example.com>\r\n"))
            self.assertTrue(m["data"].endswith(b"x\r\n"))
        # one AUTH per session
        self.assertEqual([(mech, user) for mech, user, _ in ds.handler.auth_seen],
                         [("PLAIN", USER.encode())] * 5)

    def test_auth_login_several_recipients(self):
        ds = self.downstream(auth=(USER, PASSWORD))
        env = dict(os.environ, SMTP_LOAD_PASSWORD=PASSWORD)
        res = subprocess.run([SMTP_LOAD, "--json", "-n", "4", "-r", "3", "-a", "login", "-u", USER,
                              "--from", "app@example.com", "--to", "to@example.net",
                              "127.0.0.1:%d" % ds.port],
                             capture_output=True, text=True, timeout=120, env=env)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertNotRegex(res.stderr, r"ERROR: \w+Sanitizer|runtime error:")
        self.assertEqual(json.loads(res.stdout)["messages"], 4)
        self.assertEqual(ds.handler.count(), 4)
        for m in ds.messages:
            self.assertEqual(m["from"], "app@example.com")
            self.assertEqual(m["rcpts"], ["1to@example.net", "2to@example.net", "3to@example.net"])
        self.assertEqual({mech for mech, _, _ in ds.handler.auth_seen}, {"LOGIN"})

    def test_refusals_are_counted_by_reply_code(self):
        ds = self.downstream(fault="reject_550")
        report = self.load(ds.port, "-c", "2", "-n", "6", "-m", "3", status=1)
        self.assertEqual((report["messages"], report["failed"]), (0, 6))
        # a refused message does not fail its session
        self.assertEqual((report["sessions"], report["sessions_failed"]), (2, 0))
        self.assertEqual(report["errors"], {"550": 6})
        self.assertRegex(report["error_samples"]["550"], r"^dot: 550 5\.7\.1 Message rejected")
        self.assertEqual(ds.handler.count(), 0)

    def test_refused_auth_fails_the_sessions(self):
        port = self.sink(os.path.join(self.tmpdir, "dumps"), "-f", "AUTH")
        report = self.load(port, "-c", "2", "-n", "4", "-m", "2", "-u", USER, "-p", PASSWORD, status=1)
        # each session fails its first message; the rest go to later sessions
        self.assertEqual((report["messages"], report["failed"]), (0, 4))
        self.assertEqual((report["sessions"], report["sessions_failed"]), (0, 4))
        self.assertEqual(report["errors"], {"500": 4})
        self.assertRegex(report["error_samples"]["500"], r"^auth: 500 5\.3\.0 ")

    def test_nothing_listening(self):
        report = self.load(free_port(), "-c", "2", "-n", "3", status=1)
        self.assertEqual((report["messages"], report["failed"]), (0, 3))
        self.assertEqual(report["errors"], {"connect": 3})

    def test_starttls_without_and_with_verification(self):
        ca = TestCA(os.path.join(self.tmpdir, "ca"))
        other = TestCA(os.path.join(self.tmpdir, "other"), "untrusted CA")
        cert, key = ca.issue("server", ["mx.test"], ["127.0.0.1"])
        ds = self.downstream(auth=(USER, PASSWORD), tls_context=ca.server_context(cert, key),
                             require_starttls=True)
        tls = ["--starttls", "-u", USER, "-p", PASSWORD, "-c", "2", "-n", "4", "-m", "2"]
        # by default the certificate is not checked (a benchmark's is throwaway)
        self.assertEqual(self.load(ds.port, *tls)["messages"], 4)
        self.assertEqual(self.load(ds.port, *tls, "--cafile", ca.cert, "--tls-name", "mx.test")["messages"], 4)
        self.assertEqual(ds.handler.count(), 8)
        self.assertTrue(all(m["tls"] for m in ds.messages))
        self.assertTrue(all(tls for _, _, tls in ds.handler.auth_seen))
        report = self.load(ds.port, *tls, "--cafile", other.cert, status=1)
        self.assertEqual((report["messages"], report["failed"]), (0, 4))
        self.assertEqual(list(report["errors"]), ["tls"])
        self.assertIn("certificate verify failed", report["error_samples"]["tls"])
        self.assertEqual(ds.handler.count(), 8)

    def test_pipelining_against_smtp_sink(self):
        dumps = os.path.join(self.tmpdir, "dumps")
        port = self.sink(dumps)
        report = self.load(port, "-P", "-c", "2", "-n", "30", "-m", "0", "-r", "2", "-s", "1500")
        self.assertEqual((report["messages"], report["failed"]), (30, 0))
        self.assertEqual((report["sessions"], report["sessions_pipelined"]), (2, 2))

        def complete():
            files = [os.path.join(dumps, f) for f in os.listdir(dumps)]
            texts = []
            for f in files:
                with open(f, "rb") as fh:
                    texts.append(fh.read())
            return len(files) == 30 and all(t.endswith(b"x\n\n") for t in texts) and texts

        for text in wait_until(complete, what="30 complete smtp-sink dumps"):
            self.assertEqual(text.count(b"\nX-Rcpt-Args: <"), 2, text[:400])
            # smtp-sink keeps LF line ends: 1500 octets less one CR per line
            message = text.split(b"\nSubject: smtp-load", 1)[1]
            self.assertGreater(len(message), 1000)

    def test_duration(self):
        ds = self.downstream()
        report = self.load(ds.port, "-c", "2", "-d", "1")
        self.assertGreater(report["messages"], 0)
        self.assertGreaterEqual(report["seconds"], 1.0)
        self.assertEqual(report["failed"], 0)
        self.assertEqual(ds.handler.count(), report["messages"])

    def test_implicit_tls_through_smtpmuxd(self):
        ca = TestCA(os.path.join(self.tmpdir, "ca"))
        cert, key = ca.issue("server", ["smtpmux.test"], ["127.0.0.1"])
        ds = self.downstream()
        port, plain_port = free_port(), free_port()
        d = self.daemon({
            # the plain listener only tells when the daemon is up
            "listen": ["127.0.0.1:%d tls=implicit" % port, "127.0.0.1:%d" % plain_port],
            "tls": {"cert": cert, "key": key},
            "users": [user_entry("app@example.com", PASSWORD,
                                 [{"addr": ds.addr, "tls": "none"}], "failover.so")],
        }, start=False)
        d.port = plain_port
        d.start()
        report = self.load(port, "--smtps", "--cafile", ca.cert, "-u", "app@example.com",
                           "-p", PASSWORD, "-c", "2", "-n", "6", "-m", "3")
        self.assertEqual((report["messages"], report["sessions"]), (6, 2))
        self.assertEqual(ds.handler.count(), 6)
