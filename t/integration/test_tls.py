# SPDX-License-Identifier: MIT
"""TLS on both legs: STARTTLS and implicit TLS inbound, verified TLS downstream."""

import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import unittest

from certs import TestCA, file_fingerprint, peer_cert_fingerprint
from harness import (DaemonTestCase, free_port, make_message, plain_downstream, send, swaks,
                     user_entry, wait_until)

USER, PASSWORD = "app@example.com", "tls-password"


class InboundTLSTest(DaemonTestCase):

    def setUp(self):
        super().setUp()
        self.ca = TestCA(os.path.join(self.tmpdir, "ca"))
        self.cert, self.key = self.ca.issue("server", ["smtpmux.test"], ["127.0.0.1"])
        self.ds = self.downstream()
        self.implicit_port = free_port()
        self.open_port = free_port()
        self.port = free_port()
        self.d = self.daemon({
            "listen": ["127.0.0.1:%d tls=starttls require_tls" % self.port,
                       "127.0.0.1:%d tls=implicit" % self.implicit_port,
                       "127.0.0.1:%d tls=starttls" % self.open_port],
            "tls": {"cert": self.cert, "key": self.key},
            "users": [user_entry(USER, PASSWORD, [plain_downstream(self.ds)], "failover.so")],
        }, start=False)
        self.d.port = self.port
        self.d.start()

    def test_smtplib_starttls(self):
        code, _ = send(self.port, USER, PASSWORD, starttls=True, ssl_context=self.ca.client_context())
        self.assertEqual(code, 250)
        self.assertEqual(self.ds.handler.count(), 1)

    def test_smtplib_implicit_tls(self):
        msg = make_message("implicit")
        code, _ = send(self.implicit_port, USER, PASSWORD, implicit=True,
                       ssl_context=self.ca.client_context(), msg=msg)
        self.assertEqual(code, 250)
        self.assertEqual(self.ds.handler.count(), 1)
        got = self.ds.messages[0]["data"]
        self.assertEqual(got[got.index(b"\r\nFrom: ") + 2:], msg)

    def test_swaks_starttls_and_implicit(self):
        for args in (["--tls"], ["--tlsc"]):
            port = self.port if args == ["--tls"] else self.implicit_port
            status, out = swaks(port, *args, "--auth", "PLAIN", "--auth-user", USER,
                                "--auth-password", PASSWORD, "--to", "rcpt@example.org")
            self.assertEqual(status, 0, out)
        self.assertEqual(self.ds.handler.count(), 2)

    @unittest.skipUnless(shutil.which("curl"), "curl missing")
    def test_curl_smtps_and_ssl_reqd(self):
        msg = os.path.join(self.tmpdir, "msg.eml")
        with open(msg, "wb") as f:
            f.write(make_message("curl"))
        for url, extra in (("smtps://127.0.0.1:%d" % self.implicit_port, []),
                           ("smtp://127.0.0.1:%d" % self.port, ["--ssl-reqd"])):
            res = subprocess.run(["curl", "-sS", "--cacert", self.ca.cert, "--url", url, *extra,
                                  "--mail-from", "app@example.com", "--mail-rcpt", "rcpt@example.org",
                                  "--user", "%s:%s" % (USER, PASSWORD), "--upload-file", msg],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(self.ds.handler.count(), 2)

    def test_auth_before_starttls_refused_on_require_tls_listener(self):
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        self.addCleanup(client.close)
        client.ehlo("client.test")
        self.assertNotIn("auth", client.esmtp_features)
        self.assertIn("starttls", client.esmtp_features)
        code, text = client.docmd("AUTH", "PLAIN AGFwcEBleGFtcGxlLmNvbQB0bHMtcGFzc3dvcmQ=")
        self.assertEqual(code, 530)
        self.assertIn(b"5.7.0", text)
        code, text = client.mail("app@example.com")
        self.assertEqual(code, 530)

    def test_auth_not_advertised_without_tls(self):
        client = smtplib.SMTP("127.0.0.1", self.open_port, timeout=30)
        self.addCleanup(client.close)
        client.ehlo("client.test")
        self.assertNotIn("auth", client.esmtp_features)
        code, text = client.docmd("AUTH", "PLAIN AGFwcEBleGFtcGxlLmNvbQB0bHMtcGFzc3dvcmQ=")
        self.assertEqual(code, 538)
        self.assertIn(b"5.7.11", text)

    def test_starttls_command_injection_is_discarded(self):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.addCleanup(raw.close)
        f = raw.makefile("rb")
        self.assertTrue(f.readline().startswith(b"220"))
        raw.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        # One segment: STARTTLS and a pipelined command that must never run.
        raw.sendall(b"STARTTLS\r\nRSET\r\n")
        self.assertTrue(f.readline().startswith(b"220"))
        # A plaintext reply to RSET would now sit in the stream and break the
        # handshake; a successful handshake proves only one reply was sent.
        tls = self.ca.client_context().wrap_socket(raw, server_hostname="smtpmux.test")
        self.addCleanup(tls.close)
        tf = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        lines = []
        while True:
            line = tf.readline()
            lines.append(line)
            if line[3:4] == b" ":
                break
        self.assertTrue(lines[0].startswith(b"250"))
        self.assertNotIn(b"STARTTLS", b"".join(lines))
        tls.sendall(b"STARTTLS\r\n")
        self.assertTrue(tf.readline().startswith(b"554 5.5.1"))
        tls.sendall(b"QUIT\r\n")
        self.assertTrue(tf.readline().startswith(b"221"))
        # The session's command counts: RSET was never executed.
        wait_until(lambda: [l for l in self.d.log_text().splitlines()
                            if "disconnect from" in l and "starttls=" in l],
                   what="the session's disconnect line")
        [line] = [l for l in self.d.log_text().splitlines()
                  if "disconnect from" in l and "starttls=" in l]
        self.assertIn("ehlo=2", line)
        self.assertNotIn("rset", line)

    def test_garbage_instead_of_client_hello_closes(self):
        raw = socket.create_connection(("127.0.0.1", self.implicit_port), timeout=30)
        self.addCleanup(raw.close)
        raw.sendall(b"EHLO not-a-client-hello\r\n" * 4)
        raw.settimeout(30)
        data = b""
        while True:
            chunk = raw.recv(4096)
            if not chunk:
                break
            data += chunk
        self.assertNotIn(b"250", data)

    def test_sighup_with_new_certificate_is_presented(self):
        def presented():
            raw = socket.create_connection(("127.0.0.1", self.implicit_port), timeout=30)
            with self.ca.client_context().wrap_socket(raw, server_hostname="smtpmux.test") as s:
                return peer_cert_fingerprint(s)

        self.assertEqual(presented(), file_fingerprint(self.cert))
        new_cert, new_key = self.ca.issue("server2", ["smtpmux.test"], ["127.0.0.1"])
        config = dict(self.d.config, tls={"cert": new_cert, "key": new_key})
        self.assertTrue(self.d.reload(config))
        wait_until(lambda: presented() == file_fingerprint(new_cert), what="new certificate")
        # A broken certificate on reload keeps the current one.
        config = dict(self.d.config, tls={"cert": new_cert, "key": self.key})
        self.assertFalse(self.d.reload(config))
        self.assertEqual(presented(), file_fingerprint(new_cert))


class DownstreamTLSTest(DaemonTestCase):

    def setUp(self):
        super().setUp()
        self.ca = TestCA(os.path.join(self.tmpdir, "ca"))
        self.other_ca = TestCA(os.path.join(self.tmpdir, "other"), "untrusted CA")

    def tls_downstream(self, ca, names, ips=("127.0.0.1",), auth=("relay-user", "relay-pass")):
        cert, key = ca.issue("ds%d" % free_port(), names, ips)
        return self.downstream(tls_context=ca.server_context(cert, key), require_starttls=True,
                               auth=auth)

    def config(self, downstreams):
        return {"allow_insecure_auth": True,
                "users": [user_entry(USER, PASSWORD, downstreams, "failover.so")]}

    def ds_entry(self, ds, **extra):
        entry = {"addr": ds.addr, "user": "relay-user", "pass": "relay-pass", "tls": "starttls"}
        entry.update(extra)
        return entry

    def test_verified_starttls_with_tls_ca(self):
        good = self.tls_downstream(self.ca, ["relay.test"])
        d = self.daemon(self.config([self.ds_entry(good, tls_ca=self.ca.cert)]))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(good.handler.count(), 1)
        self.assertTrue(good.messages[0]["tls"])
        self.assertTrue(all(tls for _, _, tls in good.handler.auth_seen))

    def test_untrusted_certificate_fails_over(self):
        bad = self.tls_downstream(self.other_ca, ["relay.test"])
        good = self.tls_downstream(self.ca, ["relay.test"])
        d = self.daemon(self.config([self.ds_entry(bad, tls_ca=self.ca.cert, name="bad"),
                                     self.ds_entry(good, tls_ca=self.ca.cert, name="good")]))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(bad.handler.count(), 0)
        self.assertEqual(bad.handler.auth_seen, [])
        self.assertEqual(good.handler.count(), 1)
        self.assertRegex(d.log_text(), r"relay=bad.*stage=tls")

    def test_wrong_host_name_fails_over(self):
        wrong = self.tls_downstream(self.ca, ["elsewhere.test"], ips=())
        good = self.tls_downstream(self.ca, ["relay.test"])
        d = self.daemon(self.config([self.ds_entry(wrong, tls_ca=self.ca.cert, name="wrong"),
                                     self.ds_entry(good, tls_ca=self.ca.cert, name="good")]))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(wrong.handler.count(), 0)
        self.assertEqual(good.handler.count(), 1)

    def test_downstream_without_starttls_gets_no_credentials(self):
        plain = self.downstream(auth=("relay-user", "relay-pass"))
        good = self.tls_downstream(self.ca, ["relay.test"])
        d = self.daemon(self.config([self.ds_entry(plain, name="plain"),
                                     self.ds_entry(good, tls_ca=self.ca.cert, name="good")]))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(plain.handler.auth_seen, [])
        self.assertEqual(plain.handler.count(), 0)
        self.assertEqual(good.handler.count(), 1)

    def test_downstream_without_login_or_starttls_gets_no_mail_in_clear(self):
        # No user, no `tls:`: STARTTLS is still the default, and required.
        plain = self.downstream()
        config = self.config([{"addr": plain.addr, "name": "plain"}])
        config["queue"] = {"enabled": False}          # the relay's own verdict
        d = self.daemon(config)
        code, _ = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 451)
        self.assertEqual(plain.handler.count(), 0)
        self.assertEqual(plain.handler.rcpt_attempts, 0)
        log = d.log_text()
        self.assertIn("relay=plain[%s] attempt=1 stage=tls status=deferred" % plain.addr, log)
        self.assertIn("downstream does not offer STARTTLS", log)


if __name__ == "__main__":
    unittest.main()
