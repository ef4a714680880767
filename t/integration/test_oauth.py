# SPDX-License-Identifier: MIT
"""OAuth 2.0 to downstreams: XOAUTH2 and OAUTHBEARER with tokens that the
token helper gets from a (fake, HTTPS) token endpoint or a token_command,
refreshes ahead of expiry, refreshes when a server refuses one, and never
writes to a log."""

import os
import pwd
import re
import signal
import stat
import subprocess
import time
import urllib.request

from certs import TestCA
from harness import (SMTPMUXD, DaemonTestCase, free_port, make_message, plain_downstream,
                     send, user_entry, wait_until)
from oauth_servers import OAuthDownstream, TokenAuthority, TokenEndpoint

USER, PASSWORD = "app@example.com", "app-password-123"
MAILBOX = "me@mail.test"
# Under valgrind a token request takes seconds (a TLS handshake in the
# helper): a token must then live longer than a few requests.
SLOW = bool(os.environ.get("SMTPMUX_VALGRIND"))


def lifetime(seconds):
    return seconds * 10 if SLOW else seconds


# As root, the tests name the workers' (and the token helper's) account,
# rather than depend on whether the smtpmux account exists right now.
RUN_USER = "nobody" if os.geteuid() == 0 else None


def helper_uid_gid():
    """Whom smtpmuxd runs its token helper as: the workers' user."""
    if RUN_USER is None:
        return os.geteuid(), os.getegid()
    pw = pwd.getpwnam(RUN_USER)
    return pw.pw_uid, pw.pw_gid


class OAuthTestCase(DaemonTestCase):

    def setUp(self):
        super().setUp()
        self.ca = TestCA(os.path.join(self.tmpdir, "ca"))
        # The helper runs unprivileged: its files live in a folder it owns.
        self.oauth_dir = os.path.join(self.tmpdir, "oauth")
        os.mkdir(self.oauth_dir, 0o700)
        os.chmod(self.tmpdir, 0o711)
        if os.environ.get("SMTPMUX_VALGRIND"):
            # valgrind writes one log per process here, also for the token
            # helper's commands, which it forks once unprivileged.
            os.chmod(self.tmpdir, 0o1777)
        self.uid, self.gid = helper_uid_gid()
        os.chown(self.oauth_dir, self.uid, self.gid)

    # --- fixtures

    def secret_file(self, name, content, mode=0o600):
        path = os.path.join(self.oauth_dir, name)
        with open(path, "w") as f:
            f.write(content + "\n")
        os.chmod(path, mode)
        os.chown(path, self.uid, self.gid)
        return path

    def script(self, name, text):
        path = self.secret_file(name, "#!/bin/sh\n" + text, 0o755)
        return path

    def endpoint(self, authority, **kwargs):
        ep = TokenEndpoint(self.ca, authority, **kwargs).start()
        self.addCleanup(ep.stop)
        self.secrets_to_hide = getattr(self, "secrets_to_hide", []) + [ep]
        return ep

    def oauth_downstream(self, authority, **kwargs):
        ds = OAuthDownstream(authority, MAILBOX, **kwargs).start()
        self.addCleanup(ds.stop)
        return ds

    def oauth2_entry(self, ds, ep, name="oauth", auth="xoauth2", grant="refresh_token", **extra):
        oauth2 = {"token_url": ep.url, "client_id": ep.client_id, "scope": ep.scope,
                  "ca": self.ca.cert}
        if grant == "client_credentials":
            oauth2["grant"] = grant
            oauth2["client_secret"] = ep.client_secret
        else:
            oauth2["client_secret_file"] = self.secret_file("client.secret", ep.client_secret)
            oauth2["refresh_token_file"] = self.secret_file("refresh.token", ep.refresh_token)
        entry = {"name": name, "addr": ds.addr, "tls": "none", "user": MAILBOX, "auth": auth,
                 "oauth2": oauth2}
        entry.update(extra)
        return entry

    def start(self, downstreams, env=None, **top):
        # Without the connection cache (and early connect) every message
        # logs in afresh: each one shows which token it used.
        config = {"allow_insecure_auth": True, "connection_cache": {"enabled": False},
                  "users": [user_entry(USER, PASSWORD, downstreams, "failover.so")]}
        if RUN_USER is not None:
            config["user"] = RUN_USER
        config.update(top)
        # Proxies from the environment would take loopback requests elsewhere.
        env = dict(env or {}, https_proxy="", HTTPS_PROXY="", all_proxy="", ALL_PROXY="")
        return self.daemon(config, env=env)

    def status(self, d):
        res = subprocess.run([SMTPMUXD, "-s", "status", "-c", d.config_path], env=d.env,
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(res.returncode, 0, res.stderr)
        return res.stdout

    def oauth_row(self, d, name="oauth"):
        out = self.status(d)
        self.assertIn("OAUTH TOKENS", out)
        rows = [l for l in out.split("OAUTH TOKENS", 1)[1].splitlines() if l.startswith(name + " ")]
        self.assertEqual(len(rows), 1, out)
        return rows[0]

    def send_one(self, d, subject):
        msg = make_message(subject)
        code, text = send(d.port, USER, PASSWORD, msg=msg)
        return code, msg

    def arrived(self, ds):
        """The messages ds received, less the one Received: line the relay adds."""
        out = []
        for m in ds.messages:
            self.assertTrue(m["data"].startswith(b"Received: "))
            out.append(m["data"][m["data"].index(b"\r\nFrom: ") + 2:])
        return out

    def assert_no_secrets(self, d, authority, extra=()):
        """No token, refresh token or client secret in the log or the status."""
        seen = d.log_text() + self.status(d)
        hidden = list(authority.tokens()) + list(extra)
        for ep in getattr(self, "secrets_to_hide", []):
            hidden += ep.secrets()
        self.assertTrue(hidden)
        for secret in hidden:
            self.assertNotIn(secret, seen)


class MechanismTest(OAuthTestCase):

    def test_xoauth2_with_the_refresh_token_grant(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep, auth="xoauth2")])
        d.wait_log("oauth downstream=oauth: new token")
        sent = [self.send_one(d, "xoauth2 %d" % i) for i in range(2)]
        self.assertEqual([code for code, _ in sent], [250, 250])
        self.assertEqual(self.arrived(ds), [msg for _, msg in sent])
        self.assertEqual([(a["mech"], a["user"], a["token"]) for a in ds.handler.attempts],
                         [("XOAUTH2", MAILBOX, authority.latest())] * 2)
        self.assertEqual(ep.count(), 1)             # one token serves both messages
        form = ep.requests[0]
        self.assertEqual(form, {"grant_type": "refresh_token", "refresh_token": ep.refresh_token,
                                "client_id": ep.client_id, "client_secret": ep.client_secret,
                                "scope": ep.scope})
        row = self.oauth_row(d)
        self.assertRegex(row, r"127\.0\.0\.1:\d+ me@mail\.test\s+refresh_token\s+valid\s+"
                         r"\d{4}-\d\d-\d\dT\S+Z\s+\d{4}-\d\d-\d\dT\S+Z\s+1\s+0\s+-$")
        self.assertEqual(ds.handler.protocol_errors, [])
        self.assert_no_secrets(d, authority)

    def test_the_queue_runner_logs_in_with_the_token(self):
        """A message delivered from the queue (mode: always) logs in with the
        token the helper obtained, as a worker's delivery does."""
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep, auth="xoauth2")],
                       queue={"mode": "always", "min_backoff": 1, "max_backoff": 1})
        d.wait_log("oauth downstream=oauth: new token")
        code, msg = self.send_one(d, "from the queue")
        self.assertEqual(code, 250)
        wait_until(lambda: ds.messages, what="delivery from the queue")
        self.assertEqual(self.arrived(ds), [msg])
        self.assertEqual([(a["mech"], a["user"], a["token"]) for a in ds.handler.attempts],
                         [("XOAUTH2", MAILBOX, authority.latest())])
        d.wait_log("status=sent queued=yes")       # the runner logs it once it has the 250
        self.assert_no_secrets(d, authority)

    def test_oauthbearer_with_client_credentials(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep, auth="oauthbearer", grant="client_credentials")])
        d.wait_log("oauth downstream=oauth: new token")
        code, msg = self.send_one(d, "oauthbearer")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(ds), [msg])
        attempt = ds.handler.attempts[0]
        self.assertEqual((attempt["mech"], attempt["user"], attempt["host"], attempt["port"]),
                         ("OAUTHBEARER", MAILBOX, "127.0.0.1", str(ds.port)))
        self.assertEqual(ep.requests[0], {"grant_type": "client_credentials",
                                          "client_id": ep.client_id,
                                          "client_secret": ep.client_secret, "scope": ep.scope})
        self.assertRegex(self.oauth_row(d), r"client_credentials\s+valid")
        self.assert_no_secrets(d, authority)

    def test_auto_uses_what_the_server_offers(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority, offer=("OAUTHBEARER",))
        d = self.start([self.oauth2_entry(ds, ep, auth="auto")])
        d.wait_log("oauth downstream=oauth: new token")
        self.assertEqual(self.send_one(d, "auto")[0], 250)
        self.assertEqual([a["mech"] for a in ds.handler.attempts], ["OAUTHBEARER"])


    def test_cached_session_needs_no_new_token(self):
        # A session kept logged in by the connection cache carries on after
        # its token was revoked: tokens only matter at AUTH.
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep)], workers=1,
                       connection_cache={"enabled": True, "early_connect": False})
        d.wait_log("oauth downstream=oauth: new token")
        self.assertEqual(self.send_one(d, "first")[0], 250)
        authority.revoke(authority.latest())
        code, msg = self.send_one(d, "over the kept session")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(ds)[-1], msg)
        self.assertEqual([a["ok"] for a in ds.handler.attempts], [True])
        self.assertIn("conn_use=2", d.log_text())
        self.assertEqual(ep.count(), 1)


class RefreshTest(OAuthTestCase):

    def test_refreshed_before_expiry(self):
        # 3-second tokens; messages keep coming over several lifetimes and the
        # downstream accepts only tokens that have not expired.
        authority = TokenAuthority(lifetime=lifetime(3))
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep)])
        d.wait_log("oauth downstream=oauth: new token")
        codes = []
        deadline = time.monotonic() + 10 * authority.lifetime
        wanted = 3 if SLOW else 5
        while len(authority.tokens()) < wanted:
            codes.append(self.send_one(d, "refresh %d" % len(codes))[0])
            self.assertLess(time.monotonic(), deadline, "tokens are not being refreshed")
        self.assertEqual(set(codes), {250})
        self.assertEqual(ds.handler.refused(), [])
        self.assertEqual(len(ds.messages), len(codes))
        tokens_used = {a["token"] for a in ds.handler.attempts}
        self.assertGreaterEqual(len(tokens_used), wanted - 1)
        # each token was obtained before the one in use expired
        issued = [t for t, _ in authority.issued]
        for before, after in zip(issued, issued[1:]):
            self.assertLess(after - before, authority.lifetime)
        self.assertNotIn("expired", d.log_text())
        self.assert_no_secrets(d, authority)

    def test_rotated_refresh_token_survives_a_restart(self):
        authority = TokenAuthority(lifetime=lifetime(2))
        ep = self.endpoint(authority, rotate=True)
        ds = self.oauth_downstream(authority)
        entry = self.oauth2_entry(ds, ep)
        path = entry["oauth2"]["refresh_token_file"]
        d = self.start([entry])
        d.wait_log("new refresh token saved to %s" % path, count=2)
        d.stop()
        with open(path) as f:
            saved = f.read().strip()
        self.assertEqual(saved, ep.refresh_token)       # the latest; the old ones are dead
        self.assertNotEqual(saved, ep.refresh_tokens[0])
        st = os.stat(path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.oauth_dir)), ["client.secret", "refresh.token"])
        before = ep.count()
        tokens_logged = d.log_text().count("oauth downstream=oauth: new token")
        # The same configuration and state file, on a new port; the log is shared.
        d2 = self.daemon({k: v for k, v in d.config.items() if k != "listen"}, env=d.env)
        d2.wait_log("oauth downstream=oauth: new token", count=tokens_logged + 1)
        self.assertEqual(ep.requests[before]["refresh_token"], saved)
        self.assertEqual(self.send_one(d2, "after restart")[0], 250)
        self.assertEqual(len(ds.messages), 1)
        self.assertNotIn("invalid_grant", d2.log_text())
        self.assert_no_secrets(d2, authority)

    def test_reload_restarts_the_helper_with_new_settings(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        other = self.endpoint(authority, client_id="second-client")
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep)])
        d.wait_log("oauth downstream=oauth: new token")
        config = dict(d.config)
        config["users"] = [user_entry(USER, PASSWORD, [self.oauth2_entry(ds, other)],
                                      "failover.so")]
        self.assertTrue(d.reload(config))
        d.wait_log("oauth downstream=oauth: new token", count=2)
        self.assertEqual(other.count(), 1)
        self.assertEqual(ep.count(), 1)
        self.assertEqual(self.send_one(d, "after reload")[0], 250)
        self.assertEqual(ds.handler.attempts[-1]["token"], authority.latest())

    def test_helper_respawned_keeps_the_token(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep)])
        d.wait_log("oauth downstream=oauth: new token")
        found = re.search(r"smtpmuxd\[(\d+)\]: oauth: keeping OAuth tokens", d.log_text())
        helper = int(found.group(1))
        self.assertIn(helper, d.children())
        os.kill(helper, signal.SIGKILL)
        d.wait_log("token helper pid=%d slot=" % helper)
        d.wait_log("keeping OAuth tokens for 1 downstream account(s)", count=2)
        self.assertEqual(self.send_one(d, "after respawn")[0], 250)
        self.assertEqual(ep.count(), 1)          # the token in the table was kept


class FailureTest(OAuthTestCase):

    def test_invalid_grant_skips_the_downstream(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority, mode="invalid_grant")
        ds = self.oauth_downstream(authority)
        backup = self.downstream()
        status_port = free_port()
        d = self.start([self.oauth2_entry(ds, ep), plain_downstream(backup, name="backup")],
                       status_listen="127.0.0.1:%d" % status_port)
        d.wait_log("oauth downstream=oauth: token endpoint: HTTP 400 invalid_grant")
        code, msg = self.send_one(d, "skipped")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(backup), [msg])
        self.assertEqual(ds.handler.attempts, [])     # never even tried
        self.assertRegex(d.log_text(), r"relay=oauth\[127\.0\.0\.1:\d+\] attempt=1 stage=auth "
                         r"status=skipped .*no OAuth token: token endpoint: HTTP 400 "
                         r"invalid_grant \(Token has been expired or revoked\.\)")
        self.assertRegex(self.oauth_row(d), r"refresh_token\s+none\s+-\s+-\s+0\s+\d+\s+\S+Z "
                         r"token endpoint: HTTP 400 invalid_grant")
        metrics = wait_until(lambda: self.metrics(status_port), what="/metrics")
        self.assertRegex(metrics, r'smtpmux_oauth_token_valid\{downstream="oauth",'
                         r'addr="127\.0\.0\.1:\d+",user="me@mail\.test"\} 0')
        self.assertRegex(metrics, r'smtpmux_oauth_token_error_info\{downstream="oauth",.*'
                         r'error="token endpoint: HTTP 400 invalid_grant')
        self.assert_no_secrets(d, authority)

    def metrics(self, port):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    def revoked_forces_one_refresh(self, auth, mech, abort):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        backup = self.downstream()
        d = self.start([self.oauth2_entry(ds, ep, auth=auth),
                        plain_downstream(backup, name="backup")])
        d.wait_log("oauth downstream=oauth: new token")
        first = authority.latest()
        authority.revoke(first)
        code, msg = self.send_one(d, "revoked")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(backup), [msg])   # failed over
        refused = ds.handler.refused()
        self.assertEqual([(a["mech"], a["token"], a["abort"]) for a in refused],
                         [(mech, first, abort)])
        self.assertEqual(ds.handler.protocol_errors, [])
        d.wait_log("oauth downstream=oauth: new token", count=2)
        code, msg = self.send_one(d, "new token")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(ds), [msg])
        self.assertEqual(ds.handler.accepted()[-1]["token"], authority.latest())
        self.assertEqual(ep.count(), 2)                # exactly one forced refresh
        self.assertRegex(d.log_text(), r"stage=auth status=\w+ .*\(535 5\.7\.8 .*\(%s: "
                         r"status=invalid_token schemes=bearer" % mech)
        self.assertRegex(self.oauth_row(d), r"valid\s+\S+\s+\S+\s+2\s+0\s+-$")
        self.assert_no_secrets(d, authority)

    def test_revoked_token_xoauth2(self):
        self.revoked_forces_one_refresh("xoauth2", "XOAUTH2", b"")

    def test_revoked_token_oauthbearer(self):
        self.revoked_forces_one_refresh("oauthbearer", "OAUTHBEARER", b"\x01")


class SharedStatusTest(OAuthTestCase):
    """The tokens' status is a sealed memfd handed to -s status, not a file
    next to the state file that anyone able to write it could truncate
    under every process that maps it (each would die of SIGBUS)."""

    VALID_ROW = (r"127\.0\.0\.1:\d+ me@mail\.test\s+refresh_token\s+valid\s+"
                 r"\d{4}-\d\d-\d\dT\S+Z\s+\d{4}-\d\d-\d\dT\S+Z\s+1\s+0\s+-$")

    def metrics(self, port):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as r:
            return r.read().decode()

    def test_an_emptied_token_status_file_harms_nobody(self):
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        status_port = free_port()
        d = self.start([self.oauth2_entry(ds, ep)], status_listen="127.0.0.1:%d" % status_port)
        d.wait_log("oauth downstream=oauth: new token")
        # Where the status used to be: an empty file there now (which
        # truncated the file every process mapped) ...
        open(d.config["state_file"] + ".oauth", "w").close()
        # ... and the master (which binds the slots again), the prober
        # (/metrics) and the workers all carry on.
        self.assertTrue(d.reload(d.config))
        code, msg = self.send_one(d, "after the truncation")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(ds), [msg])
        self.assertRegex(self.oauth_row(d), self.VALID_ROW)
        self.assertRegex(self.metrics(status_port),
                         r'smtpmux_oauth_token_valid\{downstream="oauth",.*\} 1')
        self.assertIsNone(d.proc.poll(), d.log_text())
        self.assertNotIn("killed by signal", d.log_text())

    def test_a_stale_token_status_file_is_removed_at_start(self):
        # One an earlier version left: an older -s status would show it as
        # current. The status itself never comes from a file any more.
        stale = os.path.join(self.tmpdir, "smtpmuxd.state.oauth")
        with open(stale, "w") as f:
            f.write("left by an earlier version\n")
        authority = TokenAuthority()
        ep = self.endpoint(authority)
        ds = self.oauth_downstream(authority)
        d = self.start([self.oauth2_entry(ds, ep)])
        self.assertEqual(d.config["state_file"] + ".oauth", stale)
        d.wait_log("removed %s, which an earlier version left" % stale)
        d.wait_log("oauth downstream=oauth: new token")
        self.assertFalse(os.path.exists(stale))
        self.assertRegex(self.oauth_row(d), self.VALID_ROW)
        self.assertEqual(self.send_one(d, "no file")[0], 250)


class CommandTest(OAuthTestCase):

    def test_token_command(self):
        authority = TokenAuthority()
        token = authority.issue("cmd")
        argv_file = os.path.join(self.oauth_dir, "argv")
        script = self.script("get-token", 'for a in "$@"; do echo "[$a]"; done > %s\n'
                             'echo %s\n' % (argv_file, token))
        ds = self.oauth_downstream(authority)
        d = self.start([{"name": "oauth", "addr": ds.addr, "tls": "none", "user": MAILBOX,
                         "token_command": "/bin/sh %s 'an account' plain\\ word \"q\\\"x\""
                         % script}])
        d.wait_log("oauth downstream=oauth: new token, valid for 300 s")
        with open(argv_file) as f:
            self.assertEqual(f.read(), "[an account]\n[plain word]\n[q\"x]\n")
        code, msg = self.send_one(d, "command")
        self.assertEqual(code, 250)
        self.assertEqual(self.arrived(ds), [msg])
        self.assertEqual([(a["mech"], a["token"]) for a in ds.handler.attempts],
                         [("XOAUTH2", token)])
        self.assertRegex(self.oauth_row(d), r"token_command\s+valid")
        self.assert_no_secrets(d, authority)

    def test_token_command_timeout(self):
        authority = TokenAuthority()
        pid_file = os.path.join(self.oauth_dir, "pid")
        script = self.script("slow", "echo $$ > %s\nexec sleep 60\n" % pid_file)
        ds = self.oauth_downstream(authority)
        backup = self.downstream()
        d = self.start([{"name": "oauth", "addr": ds.addr, "tls": "none", "user": MAILBOX,
                         "token_command": "/bin/sh " + script, "token_timeout": 1},
                        plain_downstream(backup, name="backup")])
        d.wait_log("oauth downstream=oauth: token_command: timed out after 1 s")
        with open(pid_file) as f:
            pid = int(f.read())
        wait_until(lambda: not os.path.exists("/proc/%d" % pid) or
                   open("/proc/%d/stat" % pid).read().split()[2] == "Z",
                   what="the command to be killed")
        self.assertEqual(self.send_one(d, "timeout")[0], 250)
        self.assertEqual(len(backup.messages), 1)
        self.assertEqual(ds.handler.attempts, [])
        self.assertIn("no OAuth token: token_command: timed out after 1 s", d.log_text())
