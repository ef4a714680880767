# SPDX-License-Identifier: MIT
"""Issue 10: the prototype's USE_INSECURE_AUTH and `tls: may`, From rewriting,
clients by network, allowed senders, hashed passwords and secret files."""

import base64
import json
import os
import pty
import select
import smtplib
import socket
import subprocess
import unittest
import warnings

from certs import TestCA
from harness import (SELECTORS, SMTPMUXD, DaemonTestCase, Downstream, RecordingHandler, free_port,
                     make_message, plain_downstream, send, user_entry)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt  # Python 3.11: libxcrypt's crypt(3), to check what -H prints

USER, PASSWORD = "app@example.com", "app-password"
PLAINTEXT_WARNING = "config: credentials may be sent without TLS to: "


class SenderRecorder(RecordingHandler):
    """Also records the MAIL FROM of every attempt, failed ones included."""

    def __init__(self, fault=None):
        super().__init__(fault)
        self.mail_froms = []

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_froms.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"


def received_prefix_stripped(data):
    """The message as the client sent it: smtpmuxd's Received header removed."""
    assert data.startswith(b"Received: from "), data[:80]
    end = data.index(b"\r\n")
    while data[end + 2:end + 3] == b"\t":
        end = data.index(b"\r\n", end + 2)
    return data[end + 2:]


def check_config(path):
    """smtpmuxd -t, with this build's selectors and no $CREDENTIALS_DIRECTORY."""
    env = dict(os.environ, SMTPMUX_SELECTOR_PATH=SELECTORS)
    env.pop("CREDENTIALS_DIRECTORY", None)
    return subprocess.run([SMTPMUXD, "-t", "-c", path], capture_output=True, text=True, env=env)


class PolicyTestCase(DaemonTestCase):

    def recording_downstream(self, **kwargs):
        fault = kwargs.pop("fault", None)
        ds = Downstream(**kwargs)
        ds.handler = SenderRecorder(fault)
        ds.controller.handler = ds.handler
        ds.start()
        self.addCleanup(ds.stop)
        return ds

    def write(self, name, text, mode=0o600):
        path = os.path.join(self.tmpdir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path


# --- 1. USE_INSECURE_AUTH as the prototype meant it, and tls: may -------------

PROTOTYPE_USERS = """users:
  - email: "test@user.com"
    password: "password123"
    selector_algo_path: "selectors/round_robin.so"
    downstreams:
      - addr: "127.0.0.1:{a}"
        user: "any"
        pass: "any"
      - addr: "127.0.0.1:{b}"
        user: "any"
        pass: "any"
"""


class PrototypeQuickStartTest(PolicyTestCase):
    """The Go prototype's quick start: its config file (users, email,
    password, selector_algo_path, downstreams, addr, user, pass; no tls
    keys), USE_INSECURE_AUTH=true, and two plain MailHog-style downstreams
    that offer AUTH PLAIN without TLS."""

    def start_prototype(self, env, extra="", queue=True):
        self.a = self.downstream(auth=("any", "any"))
        self.b = self.downstream(auth=("any", "any"))
        d = self.daemon({"users": []}, env=env, start=False)
        # Only what the test harness needs is added (a free port, a private
        # state file and queue folder); the prototype's part is its text as
        # it was.
        if not queue:
            d.config["queue"]["enabled"] = False      # the relay's own verdict
        plumbing = {k: d.config[k] for k in ("listen", "workers", "hostname", "state_file",
                                             "queue")}
        d.write_config(text=PROTOTYPE_USERS.format(a=self.a.port, b=self.b.port) + extra +
                       "".join("%s: %s\n" % (k, json.dumps(v)) for k, v in plumbing.items()))
        return d.start()

    def test_quick_start_relays_round_robin(self):
        d = self.start_prototype({"USE_INSECURE_AUTH": "true"})
        sent = []
        for i in range(4):
            msg = make_message("proto %d" % i, sender="test@user.com")
            sent.append(msg)
            code, text = send(d.port, "test@user.com", "password123", msg=msg,
                              sender="test@user.com")
            self.assertEqual(code, 250, text)
        self.assertEqual(self.a.handler.count(), 2)
        self.assertEqual(self.b.handler.count(), 2)
        # Round robin: the two take turns.
        got_a = [received_prefix_stripped(m["data"]) for m in self.a.messages]
        got_b = [received_prefix_stripped(m["data"]) for m in self.b.messages]
        self.assertIn(got_a, ([sent[0], sent[2]], [sent[1], sent[3]]))
        self.assertEqual(sorted(got_a + got_b), sorted(sent))
        # The credentials went in clear, as the prototype sent them (once
        # per session: the connection cache may carry both messages).
        for ds in (self.a, self.b):
            self.assertTrue(ds.handler.auth_seen)
            self.assertEqual(set(ds.handler.auth_seen), {("PLAIN", b"any", False)})
            self.assertFalse(any(m["tls"] for m in ds.messages))
        log = d.log_text()
        self.assertEqual(log.count(PLAINTEXT_WARNING), 1, log)
        self.assertIn("downstream=127.0.0.1:%d tls=may, user=test@user.com downstream="
                      "127.0.0.1:%d tls=may" % (self.a.port, self.b.port), log)
        # ...and again at every reload.
        with open(d.config_path) as f:
            self.assertTrue(d.reload(text=f.read()))
        self.assertEqual(d.log_text().count(PLAINTEXT_WARNING), 2)

    def test_without_the_variable_credentials_stay_off_plaintext(self):
        # allow_insecure_auth: the inbound half only; downstreams keep
        # requiring STARTTLS.
        d = self.start_prototype(None, extra="allow_insecure_auth: true\n", queue=False)
        code, _ = send(d.port, "test@user.com", "password123")
        self.assertEqual(code, 451)
        self.assertEqual(self.a.handler.count() + self.b.handler.count(), 0)
        self.assertEqual(self.a.handler.auth_seen + self.b.handler.auth_seen, [])
        self.assertNotIn(PLAINTEXT_WARNING, d.log_text())
        self.assertIn("downstream does not offer STARTTLS", d.log_text())


class TLSMayTest(PolicyTestCase):

    def setUp(self):
        super().setUp()
        self.ca = TestCA(os.path.join(self.tmpdir, "ca"))

    def tls_downstream(self, ca, auth=("relay-user", "relay-pass")):
        cert, key = ca.issue("ds%d" % free_port(), ["relay.test"], ["127.0.0.1"])
        # auth_require_tls: credentials sent before STARTTLS would be refused.
        return self.downstream(tls_context=ca.server_context(cert, key), require_starttls=True,
                               auth=auth)

    def config(self, *downstreams):
        # Without the queue: these tests look at the relay's own verdict.
        return {"allow_insecure_auth": True, "queue": {"enabled": False},
                "users": [user_entry(USER, PASSWORD, list(downstreams), "failover.so")]}

    def test_may_uses_starttls_when_offered(self):
        ds = self.tls_downstream(self.ca)
        d = self.daemon(self.config({"addr": ds.addr, "tls": "may", "tls_ca": self.ca.cert,
                                     "user": "relay-user", "pass": "relay-pass"}))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(ds.handler.count(), 1)
        self.assertTrue(ds.messages[0]["tls"])
        self.assertEqual(ds.handler.auth_seen, [("PLAIN", b"relay-user", True)])

    def test_may_verifies_the_certificate(self):
        # Offered STARTTLS with a certificate nobody vouches for: a failed
        # attempt, never a quiet fall back to plain text.
        other = TestCA(os.path.join(self.tmpdir, "other"), "untrusted CA")
        bad = self.tls_downstream(other)
        d = self.daemon(self.config({"addr": bad.addr, "tls": "may", "tls_ca": self.ca.cert,
                                     "user": "relay-user", "pass": "relay-pass"}))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 451)
        self.assertEqual(bad.handler.count(), 0)
        self.assertEqual(bad.handler.auth_seen, [])
        self.assertRegex(d.log_text(), r"stage=tls status=deferred")

    def test_default_without_credentials_never_in_clear(self):
        # No login, no tls key, no USE_INSECURE_AUTH: STARTTLS is required,
        # so a plain server gets nothing, not even the envelope.
        plain = self.recording_downstream()
        d = self.daemon(self.config({"addr": plain.addr}))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 451)
        self.assertEqual(plain.handler.count(), 0)
        self.assertEqual(plain.handler.mail_froms, [])


# --- 2. rewrite_from ------------------------------------------------------------

FOLDED_FROM = (b'From: "Alerts from the =?UTF-8?Q?b=C3=BCro?= monitoring system"\r\n'
               b' <alerts@corp.example> (ops)\r\n')


def message_with(from_field, body, extra=b""):
    return (b"Subject: disk full\r\n" + from_field + b"To: <ops@example.org>\r\n" + extra +
            b"Message-ID: <m1@corp.example>\r\n\r\n" + body)


class RewriteFromTest(PolicyTestCase):

    def start(self, downstreams, **extra):
        config = {"allow_insecure_auth": True,
                  "users": [user_entry(USER, PASSWORD, downstreams, "failover.so")]}
        config.update(extra)
        return self.daemon(config)

    def test_failover_uses_each_downstreams_own_setting(self):
        a = self.recording_downstream(auth=("a-acct@provider-a.example", "pa"), fault="rcpt_451")
        b = self.recording_downstream(auth=("b-login", "pb"))
        d = self.start([
            plain_downstream(a, name="A", user="a-acct@provider-a.example", rewrite_from="user",
                             **{"pass": "pa"}),
            plain_downstream(b, name="B", user="b-login", rewrite_from="me@provider-b.example",
                             **{"pass": "pb"}),
        ])
        body = b"From: this line is body text and stays.\r\n"
        msg = message_with(FOLDED_FROM, body)
        code, _ = send(d.port, USER, PASSWORD, msg=msg, sender="alerts@corp.example")
        self.assertEqual(code, 250)
        # A (its login) failed at RCPT; B (an address) took the message.
        self.assertEqual(a.handler.mail_froms, ["a-acct@provider-a.example"])
        self.assertEqual(b.handler.mail_froms, ["me@provider-b.example"])
        self.assertEqual(b.handler.count(), 1)
        want = (b"Subject: disk full\r\n"
                b'From: "Alerts from the =?UTF-8?Q?b=C3=BCro?= monitoring system"\r\n'
                b" <me@provider-b.example> (ops)\r\n"
                b"To: <ops@example.org>\r\n"
                b"Message-ID: <m1@corp.example>\r\n"
                b'Reply-To: "Alerts from the =?UTF-8?Q?b=C3=BCro?= monitoring system"\r\n'
                b" <alerts@corp.example> (ops)\r\n"
                b"\r\n" + body)
        self.assertEqual(received_prefix_stripped(b.messages[0]["data"]), want)
        # The log still names the app's sender.
        self.assertIn("from=<alerts@corp.example>", d.log_text())

    def test_big_message_from_temp_file(self):
        ds = self.recording_downstream()
        d = self.start([plain_downstream(ds, rewrite_from="relay@provider.example")],
                       limits={"memory_threshold": 4096})
        line = b"x" * 76 + b"\r\n"
        body = line * 40000                        # 3.1 MB, kept in a temporary file
        msg = message_with(b"From: Alice <alice@corp.example>\r\n", body,
                           extra=b"Reply-To: <help@corp.example>\r\n")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        got = received_prefix_stripped(ds.messages[0]["data"])
        # The app's own Reply-To is kept; nothing else changes.
        self.assertEqual(got, msg.replace(b"alice@corp.example", b"relay@provider.example", 1))
        self.assertEqual(ds.handler.mail_froms, ["relay@provider.example"])

    def test_null_sender_and_other_downstreams_untouched(self):
        plain = self.recording_downstream(fault="rcpt_451")
        rewriting = self.recording_downstream()
        d = self.start([plain_downstream(plain, name="plain"),
                        plain_downstream(rewriting, name="rw", rewrite_from="me@provider.example")])
        msg = message_with(b"From: <alice@corp.example>\r\n", b"bounce\r\n")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg, sender="<>")[0], 250)
        # The attempt without rewrite_from saw the sender as the app sent it.
        self.assertEqual(plain.handler.mail_froms, ["<>"])
        # A bounce stays a bounce; the header From is still the account's.
        self.assertEqual(rewriting.handler.mail_froms, ["<>"])
        self.assertIn(b"\r\nFrom: <me@provider.example>\r\n", rewriting.messages[0]["data"])

    def test_reused_session_rewrites_per_message(self):
        # Two users share one provider account (one cached session), each
        # with its own rewrite_from: every message gets its own.
        ds = self.recording_downstream(auth=("acct@provider.example", "pw"))
        account = dict(user="acct@provider.example", **{"pass": "pw"})
        d = self.daemon({"allow_insecure_auth": True, "workers": 1,
                         "connection_cache": {"idle_timeout": 300}, "users": [
            user_entry(USER, PASSWORD, [plain_downstream(ds, rewrite_from="user", **account)]),
            user_entry("other@example.com", "other-pw",
                       [plain_downstream(ds, rewrite_from="team@provider.example", **account)]),
        ]})
        msg = message_with(b"From: App <app@corp.example>\r\n", b"x\r\n")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertEqual(send(d.port, "other@example.com", "other-pw", msg=msg)[0], 250)
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertEqual(len(ds.handler.auth_seen), 1)          # one session for all three
        self.assertEqual(ds.handler.mail_froms, ["acct@provider.example", "team@provider.example",
                                                 "acct@provider.example"])
        froms = [received_prefix_stripped(m["data"]).split(b"\r\n")[1] for m in ds.messages]
        self.assertEqual(froms, [b"From: App <acct@provider.example>",
                                 b"From: App <team@provider.example>",
                                 b"From: App <acct@provider.example>"])

    def test_without_rewrite_byte_identical(self):
        ds = self.recording_downstream()
        d = self.start([plain_downstream(ds)])
        msg = message_with(FOLDED_FROM, b"body\r\n")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertEqual(received_prefix_stripped(ds.messages[0]["data"]), msg)
        self.assertEqual(ds.handler.mail_froms, ["app@example.com"])


# --- 3. clients by network ------------------------------------------------------

class ClientsTest(PolicyTestCase):

    def setUp(self):
        super().setUp()
        self.app_ds = self.recording_downstream()
        self.cron_ds = self.recording_downstream()
        self.host_ds = self.recording_downstream()

    def start(self, clients, listen=None):
        config = {
            "allow_insecure_auth": True,
            "users": [user_entry(USER, PASSWORD, [plain_downstream(self.app_ds)]),
                      user_entry("cron@example.com", "unused-pw", [plain_downstream(self.cron_ds)]),
                      user_entry("host@example.com", "unused-pw", [plain_downstream(self.host_ds)])],
            "clients": clients,
        }
        if listen is None:
            return self.daemon(config)
        # The harness waits for the greeting on the IPv4 port.
        port = free_port()
        config["listen"] = ["127.0.0.1:%d" % port, listen]
        d = self.daemon(config, start=False)
        d.port = port
        return d.start()

    def send_without_auth(self, port, host="127.0.0.1", sender="cron@box.example"):
        client = smtplib.SMTP(host, port, timeout=60)
        try:
            client.ehlo("box.example")
            code, text = client.mail(sender)
            if code != 250:
                return code, text
            client.rcpt("root@example.org")
            return client.data(make_message("cron job", sender=sender))
        finally:
            client.quit()

    def test_network_sends_without_auth_as_its_user(self):
        d = self.start([{"network": "127.0.0.0/8", "user": "cron@example.com"}])
        code, _ = self.send_without_auth(d.port)
        self.assertEqual(code, 250)
        self.assertEqual(self.cron_ds.handler.count(), 1)
        self.assertEqual(self.app_ds.handler.count(), 0)
        data = self.cron_ds.messages[0]["data"]
        self.assertEqual(received_prefix_stripped(data), make_message("cron job",
                                                                      sender="cron@box.example"))
        self.assertIn(b" with ESMTP id ", data)
        self.assertIn("network=127.0.0.0/8 user=cron@example.com", d.log_text())
        # Logging in still works, and then the login decides.
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(self.app_ds.handler.count(), 1)

    def test_most_specific_network_wins(self):
        d = self.start([{"network": "127.0.0.0/8", "user": "cron@example.com"},
                        {"network": "127.0.0.1", "user": "host@example.com"},
                        {"network": "127.0.0.0/16", "user": "cron@example.com"}])
        self.assertEqual(self.send_without_auth(d.port)[0], 250)
        self.assertEqual(self.host_ds.handler.count(), 1)
        self.assertEqual(self.cron_ds.handler.count(), 0)

    def test_ipv6_network(self):
        port6 = free_port()
        self.start([{"network": "::1/128", "user": "host@example.com"},
                    {"network": "127.0.0.0/8", "user": "cron@example.com"}],
                   listen="[::1]:%d" % port6)
        self.assertEqual(self.send_without_auth(port6, host="::1")[0], 250)
        self.assertEqual(self.host_ds.handler.count(), 1)
        self.assertEqual(self.cron_ds.handler.count(), 0)

    def test_everyone_else_still_needs_auth(self):
        d = self.start([{"network": "10.0.0.0/8", "user": "cron@example.com"}])
        code, text = self.send_without_auth(d.port)
        self.assertEqual(code, 530, text)
        self.assertEqual(self.cron_ds.handler.count() + self.app_ds.handler.count(), 0)

    def test_check_refuses_networks_that_cover_everything(self):
        for i, network in enumerate(("0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96")):
            path = self.write("every%d.yaml" % i,
                              "users:\n  - email: cron@example.com\n    password: pw\n"
                              "    downstreams: [{addr: \"127.0.0.1:25\", tls: none}]\n"
                              "clients:\n  - user: cron@example.com\n"
                              "    network: \"%s\"\n" % network)
            res = check_config(path)
            self.assertEqual(res.returncode, 1)
            self.assertEqual(res.stderr, '%s:7: clients[0].network: "%s" covers every address: '
                             "sending without AUTH is for the hosts of a local network\n"
                             % (path, network))


# --- 4. allowed senders -------------------------------------------------------

class AllowedSendersTest(PolicyTestCase):

    def test_sender_outside_the_list_is_refused(self):
        ds = self.recording_downstream()
        entry = user_entry(USER, PASSWORD, [plain_downstream(ds)])
        entry["allowed_senders"] = ["*@example.com", "alerts@example.org"]
        d = self.daemon({"allow_insecure_auth": True, "users": [entry]})
        for sender in ("ceo@example.org", "x@sub.example.com", "<>"):
            with self.subTest(sender=sender):
                client = smtplib.SMTP("127.0.0.1", d.port, timeout=60)
                client.login(USER, PASSWORD)
                code, text = client.mail(sender)
                self.assertEqual((code, text), (553, b"5.7.1 Sender address not allowed for this user"))
                client.quit()
        for sender in ("anyone@example.com", "Alerts@Example.org"):
            self.assertEqual(send(d.port, USER, PASSWORD, sender=sender)[0], 250)
        self.assertEqual(ds.handler.mail_froms, ["anyone@example.com", "Alerts@Example.org"])
        self.assertIn("sender refused user=app@example.com from=<ceo@example.org>", d.log_text())

    def test_check_refuses_bad_patterns(self):
        path = self.write("bad.yaml", "users:\n  - email: a@example.com\n    password: pw\n"
                          "    allowed_senders:\n      - \"*@example.com\"\n      - \"*bob@example.com\"\n"
                          "    downstreams: [{addr: \"127.0.0.1:25\", tls: none}]\n")
        res = check_config(path)
        self.assertEqual(res.returncode, 1)
        self.assertTrue(res.stderr.startswith("%s:6: users[0].allowed_senders[1]: " % path), res.stderr)


# --- 5. hashed passwords and secret files ----------------------------------------

def hash_password(password, **kwargs):
    res = subprocess.run([SMTPMUXD, "-H"], input=password + "\n", capture_output=True,
                         text=True, **kwargs)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


class SecretsTest(PolicyTestCase):

    def test_hash_from_a_pipe(self):
        h = hash_password("correct horse battery")
        self.assertRegex(h, r"^\$y\$[./0-9A-Za-z]+\$[./0-9A-Za-z]+\$[./0-9A-Za-z]{43}$")
        self.assertEqual(crypt.crypt("correct horse battery", h), h)
        self.assertNotEqual(hash_password("correct horse battery"), h)   # a new salt each time
        for bad in ("", "x" * 256):
            res = subprocess.run([SMTPMUXD, "-H"], input=bad + "\n", capture_output=True, text=True)
            self.assertEqual(res.returncode, 2, res.stderr)
            self.assertEqual(res.stdout, "")

    def test_hash_from_a_terminal_without_echo(self):
        pid, fd = pty.fork()
        if pid == 0:
            os.execv(SMTPMUXD, [SMTPMUXD, "-H"])
        transcript = b""

        def read_more():
            nonlocal transcript
            ready, _, _ = select.select([fd], [], [], 20)
            self.assertTrue(ready, transcript)
            try:
                chunk = os.read(fd, 1024)
            except OSError:              # EIO: the child is gone
                chunk = b""
            transcript += chunk
            return chunk

        try:
            while b"Password: " not in transcript:
                self.assertTrue(read_more(), transcript)
            os.write(fd, b"tty secret\n")
            while b"Again: " not in transcript:
                self.assertTrue(read_more(), transcript)
            os.write(fd, b"tty secret\n")
            while read_more():
                pass
            _, status = os.waitpid(pid, 0)
        finally:
            os.close(fd)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0, transcript)
        self.assertNotIn(b"tty secret", transcript)
        h = transcript[transcript.index(b"$y$"):].split()[0].decode()
        self.assertEqual(crypt.crypt("tty secret", h), h)

    def test_files_hashes_and_the_cache(self):
        # A world-readable config, secrets in files named relative to
        # $CREDENTIALS_DIRECTORY (as systemd's LoadCredential= passes them).
        creds = os.path.join(self.tmpdir, "credentials")
        os.mkdir(creds, 0o700)
        with open(os.path.join(creds, "app.hash"), "w") as f:
            f.write(hash_password(PASSWORD) + "\n")
        with open(os.path.join(creds, "provider.pass"), "w") as f:
            f.write("provider-secret\n")
        ds = self.recording_downstream(auth=("relay@provider.example", "provider-secret"))
        d = self.daemon({
            "allow_insecure_auth": True, "workers": 1,
            "users": [{"email": USER, "password_file": "app.hash",
                       "downstreams": [plain_downstream(ds, user="relay@provider.example",
                                                        pass_file="provider.pass")]}],
        }, env={"CREDENTIALS_DIRECTORY": creds}, start=False)
        os.chmod(d.config_path, 0o644)
        d.start()
        for i in range(3):
            self.assertEqual(send(d.port, USER, PASSWORD, msg=make_message("n%d" % i))[0], 250)
        client = smtplib.SMTP("127.0.0.1", d.port, timeout=60)
        client.ehlo()
        client.user, client.password = USER, PASSWORD + "x"
        with self.assertRaises(smtplib.SMTPAuthenticationError):
            client.auth("PLAIN", client.auth_plain)
        client.quit()
        self.assertEqual(ds.handler.count(), 3)
        # AUTH once per session (the connection cache carries the others).
        self.assertTrue(ds.handler.auth_seen)
        self.assertEqual(set(ds.handler.auth_seen), {("PLAIN", b"relay@provider.example", False)})
        self.assertEqual(d.stop(), 0)
        log = d.log_text()
        # One yescrypt per worker for the right password, and one for the
        # wrong one; the other logins came from the cache.
        self.assertIn("password hashes: computed=2 cached=2", log)
        self.assertNotIn("readable by other users", log)
        self.assertNotIn("provider-secret", log)

    def test_inline_password_in_readable_config_warns(self):
        ds = self.recording_downstream()
        d = self.daemon({"allow_insecure_auth": True,
                         "users": [user_entry(USER, PASSWORD, [plain_downstream(ds)])]}, start=False)
        os.chmod(d.config_path, 0o644)
        d.start()
        d.wait_log("is readable by other users but holds passwords")

    def test_check_names_file_line_and_key(self):
        good_hash = hash_password("pw")
        cases = [
            ("    password_file: no-such.pass\n", 3, "users[0].password_file",
             "cannot open %s/no-such.pass: No such file or directory" % self.tmpdir),
            ("    password: \"%s\"\n" % good_hash[:-3], 3, "users[0].password",
             "malformed $y$ password hash (make one with smtpmuxd -H)"),
            ("    password: \"%s\"\n    password_file: x\n" % good_hash, 4, "users[0].password_file",
             "use either password or password_file, not both"),
        ]
        for i, (lines, line, key, what) in enumerate(cases):
            with self.subTest(key=key):
                path = self.write("bad%d.yaml" % i, "users:\n  - email: a@example.com\n" + lines +
                                  "    downstreams: [{addr: \"127.0.0.1:25\", tls: none}]\n")
                res = check_config(path)
                self.assertEqual(res.returncode, 1)
                self.assertEqual(res.stderr, "%s:%d: %s: %s\n" % (path, line, key, what))
        # A downstream secret "file" that cannot be read.
        os.mkdir(os.path.join(self.tmpdir, "folder.pass"))
        path = self.write("bad-pass.yaml", "users:\n  - email: a@example.com\n    password: pw\n"
                          "    downstreams:\n      - addr: \"127.0.0.1:25\"\n        user: u\n"
                          "        pass_file: folder.pass\n")
        res = check_config(path)
        self.assertEqual(res.returncode, 1, res.stderr)
        self.assertEqual(res.stderr, "%s:7: users[0].downstreams[0].pass_file: cannot read "
                         "%s/folder.pass: Is a directory\n" % (path, self.tmpdir))


# sha512crypt with a million rounds: about 0.6 s of CPU per check here
# (15 s under valgrind; a yescrypt with raised cost does the same), so the
# other client's whole session fits many times into one check.
SLOW_ROUNDS = 1000000
SLOW_START = 120        # the configuration check computes the hash once too


@unittest.skipIf(os.environ.get("SMTPMUX_VALGRIND"),
                 "an order of two events a million hash rounds apart natively; valgrind slows "
                 "the daemon's code and the hash by different factors (the thread path is "
                 "still run under valgrind by every other hashed-password test)")
class SlowHashTest(PolicyTestCase):
    """A password hash is checked off the worker's event loop: while one
    client's check runs, the worker's other sessions go on."""

    def test_slow_check_holds_up_only_its_own_session(self):
        slow_user = "slow@example.com"
        slow_hash = crypt.crypt("the-right-one", crypt.mksalt(crypt.METHOD_SHA512, rounds=SLOW_ROUNDS))
        ds = self.recording_downstream()
        d = self.daemon({
            "allow_insecure_auth": True, "workers": 1,
            "auth": {"failure_delay": 0},          # the 535 as soon as the verdict is in
            "users": [user_entry(USER, PASSWORD, [plain_downstream(ds)]),
                      user_entry(slow_user, slow_hash, [plain_downstream(ds)])],
        }, start=False)
        d.start(timeout=SLOW_START)
        # Once before, so that the session below runs code the worker has
        # run already (valgrind translates code on its first run, slowly).
        warm = make_message("before")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=warm)[0], 250)
        with socket.create_connection(("127.0.0.1", d.port), timeout=60) as a:
            replies = a.makefile("rb")
            self.assertTrue(replies.readline().startswith(b"220 "))
            a.sendall(b"EHLO a.test\r\n")
            while not replies.readline().startswith(b"250 "):
                pass
            a.sendall(b"AUTH PLAIN %s\r\n" % base64.b64encode(b"\0%s\0wrong" % slow_user.encode()))
            # The same worker greets, authenticates and relays for another
            # client meanwhile; on the loop, the hash would hold all of it.
            msg = make_message("while a hash is checked")
            self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
            self.assertArrived(ds, warm, msg)
            ready, _, _ = select.select([a], [], [], 0)
            self.assertEqual(ready, [], "the slow check was answered before the other client was served")
            self.assertEqual(replies.readline(), b"535 5.7.8 Authentication credentials invalid\r\n")
            a.sendall(b"QUIT\r\n")
            self.assertTrue(replies.readline().startswith(b"221 "))
        self.assertEqual(d.stop(), 0)
        log = d.log_text()
        self.assertIn("auth failed user=%s" % slow_user, log)
        self.assertIn("password hashes: computed=1 cached=0", log)


if __name__ == "__main__":
    unittest.main()
