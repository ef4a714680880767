# SPDX-License-Identifier: MIT
"""Test harness: the real smtpmuxd, real SMTP servers as downstreams, real clients.

Everything listens on 127.0.0.1 on ports the kernel hands out, and every
process or server a test starts is stopped by the test's cleanup.
"""

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import unittest

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from fakesmtp import FakeDownstream

SRCDIR = os.environ.get("SRCDIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
BUILDDIR = os.environ.get("BUILDDIR", SRCDIR)
SMTPMUXD = os.path.join(BUILDDIR, "smtpmuxd", "smtpmuxd")
SELECTORS = os.path.join(BUILDDIR, "selectors")

# Generous upper bounds for readiness polling; a passing run never waits this long.
READY_TIMEOUT = 20.0


_handed_out = set()


def free_port():
    """A port nothing listens on right now (the kernel picks it), and one
    this process has not handed out before: the kernel may pick a closed
    port again at once, and a test asking for three must get three."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_until(predicate, timeout=READY_TIMEOUT, what="condition"):
    """Polls predicate until it is true; a readiness check, not a sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("timed out waiting for %s" % what)


def read_banner(port, timeout=2.0):
    """Returns the greeting line of the server on port, or None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return s.makefile("rb").readline().decode("ascii", "replace")
    except OSError:
        return None


# --- downstream SMTP servers (aiosmtpd) --------------------------------------

class RecordingHandler:
    """Stores every message; optional faults model provider failures."""

    def __init__(self, fault=None):
        self.fault = fault
        self.messages = []
        self.lock = threading.Lock()
        self.auth_seen = []
        self.rcpt_attempts = 0
        self.data_delay = 0.0       # seconds before answering the final dot
        self.data_started = threading.Event()
        self.hold_data = None       # a threading.Event the final dot's reply waits for
        self.rcpt_started = threading.Event()
        self.hold_rcpt = None       # a threading.Event each RCPT's reply waits for

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        with self.lock:
            self.rcpt_attempts += 1
        self.rcpt_started.set()
        if self.hold_rcpt is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hold_rcpt.wait, READY_TIMEOUT)
        if self.fault == "rcpt_451":
            return "451 4.3.0 Try again later"
        if self.fault == "throttle":
            return "451 4.7.0 Rate limit exceeded, slow down"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_started.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.hold_data is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.hold_data.wait, READY_TIMEOUT)
        if self.fault == "drop_data":
            # The provider vanishes before answering the final dot.
            server.transport.abort()
            return "421 4.4.2 gone"
        if self.fault == "reject_550":
            return "550 5.7.1 Message rejected"
        if self.fault == "quota_550":
            return "550 5.4.5 Daily user sending quota exceeded"
        with self.lock:
            self.messages.append({
                "from": envelope.mail_from,
                "rcpts": list(envelope.rcpt_tos),
                "data": envelope.original_content,
                "tls": session.ssl is not None,
            })
        return "250 2.0.0 OK stored"

    def count(self):
        with self.lock:
            return len(self.messages)


class Downstream:
    """An aiosmtpd server on a free loopback port."""

    def __init__(self, fault=None, auth=None, tls_context=None, require_starttls=False):
        self.handler = RecordingHandler(fault)
        self.port = free_port()
        kwargs = {}
        if auth is not None:
            user, password = auth

            def authenticator(server, session, envelope, mechanism, data):
                ok = data.login == user.encode() and data.password == password.encode()
                self.handler.auth_seen.append((mechanism, data.login, session.ssl is not None))
                return AuthResult(success=ok)

            kwargs.update(authenticator=authenticator, auth_require_tls=tls_context is not None,
                          auth_required=True)
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=require_starttls)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=READY_TIMEOUT, **kwargs)

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    @property
    def messages(self):
        return self.handler.messages

    def start(self):
        self.controller.start()
        return self

    def stop(self):
        self.controller.stop()


# --- the daemon ---------------------------------------------------------------

def user_entry(email, password, downstreams, selector="round_robin.so"):
    return {
        "email": email,
        "password": password,
        "selector_algo_path": selector,
        "downstreams": downstreams,
    }


def plain_downstream(ds, **extra):
    entry = {"addr": getattr(ds, "addr", ds), "tls": "none"}
    entry.update(extra)
    return entry


class Daemon:
    """smtpmuxd in the foreground with a generated config (JSON is YAML)."""

    def __init__(self, tmpdir, config, env=None):
        self.tmpdir = tmpdir
        self.port = free_port()
        self.config = dict(config)
        self.config.setdefault("listen", ["127.0.0.1:%d" % self.port])
        self.config.setdefault("workers", 2)
        self.config.setdefault("hostname", "smtpmux.test")
        self.config.setdefault("state_file", os.path.join(tmpdir, "smtpmuxd.state"))
        queue = self.config.setdefault("queue", {})
        if isinstance(queue, dict):
            queue.setdefault("dir", os.path.join(tmpdir, "queue"))
        # Run as root, the workers and the queue runner are `nobody`: they
        # must reach the spool inside this folder (as in /var/spool).
        os.chmod(tmpdir, 0o711)
        self.config_path = os.path.join(tmpdir, "smtpmux.yaml")
        self.log_path = os.path.join(tmpdir, "smtpmuxd.log")
        # valgrind opens a report per process, also in a child that an
        # unprivileged helper forks (a token_command before its exec):
        # a folder every user may add to.
        self.vg_dir = os.path.join(tmpdir, "vg")
        if os.environ.get("SMTPMUX_VALGRIND") and not os.path.isdir(self.vg_dir):
            os.mkdir(self.vg_dir)
            os.chmod(self.vg_dir, 0o1733)
        self.env = dict(os.environ, SMTPMUX_SELECTOR_PATH=SELECTORS)
        self.env.pop("USE_INSECURE_AUTH", None)
        if env:
            self.env.update(env)
        self.proc = None
        self.args = []              # more command-line options
        self.popen = {}             # more subprocess.Popen arguments
        self.write_config(self.config)

    def write_config(self, config=None, text=None):
        with open(self.config_path, "w") as f:
            f.write(text if text is not None else json.dumps(config, indent=2) + "\n")

    def command(self):
        cmd = [SMTPMUXD, "-f", "-c", self.config_path] + self.args
        if os.environ.get("SMTPMUX_VALGRIND"):
            # Children that exec a system program (a token_command) are not ours to check.
            # --vgdb=no: no FIFOs in /tmp, where one a process of a reused pid
            # left behind (another user's) makes valgrind exit 1 at once.
            cmd = ["valgrind", "--quiet", "--vgdb=no", "--trace-children=yes",
                   "--trace-children-skip=/bin/*,/usr/bin/*,/usr/local/bin/*", "--leak-check=full",
                   "--suppressions=%s" % os.path.join(SRCDIR, "t", "valgrind.supp"),
                   "--errors-for-leak-kinds=definite", "--error-exitcode=99",
                   "--log-file=%s/smtpmuxd.vg.%%p" % self.vg_dir] + cmd
        return cmd

    def valgrind_reports(self):
        """What valgrind said about the processes of this daemon, if it ran them."""
        text = ""
        for name in sorted(os.listdir(self.vg_dir)) if os.path.isdir(self.vg_dir) else []:
            with open(os.path.join(self.vg_dir, name), errors="replace") as f:
                text += "\n%s:\n%s" % (name, f.read())
        return text

    def start(self, timeout=READY_TIMEOUT):
        """timeout: for a configuration that is slow to check (a costly
        password hash is computed once at load, slower still under valgrind)."""
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     **self.popen)
        wait_until(lambda: self.proc.poll() is not None or
                   (read_banner(self.port) or "").startswith("220"),
                   timeout, what="smtpmuxd to greet on port %d" % self.port)
        if self.proc.poll() is not None:
            raise AssertionError("smtpmuxd exited with %s:\n%s%s" % (self.proc.returncode, self.log_text(),
                                                                      self.valgrind_reports()))
        # Until the queue runner has named itself it looks like a worker.
        if self.config.get("queue", {}).get("enabled", True) and self.config.get("users"):
            wait_until(lambda: self.proc.poll() is not None or self.runner() is not None,
                       timeout, what="the queue runner to start")
        return self

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_log(self, needle, count=1, timeout=READY_TIMEOUT):
        return wait_until(lambda: self.log_text().count(needle) >= count, timeout,
                          "log line %r" % needle)

    def children(self):
        path = "/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)
        with open(path) as f:
            return [int(p) for p in f.read().split()]

    def runner(self):
        """The queue runner's pid (its process name says so), or None."""
        for pid in self.children():
            if process_name(pid) == "smtpmux-queue":
                return pid
        return None

    def workers(self):
        """The children that are not the queue runner (nor the prober, which
        only runs with probe_interval or status_listen)."""
        return [p for p in self.children() if process_name(p) != "smtpmux-queue"]

    def reload(self, config=None, text=None):
        """SIGHUP with a new config; returns once the master has acted on it."""
        before_ok = self.log_text().count("reload: generation=")
        before_bad = self.log_text().count("reload failed")
        self.write_config(config, text)
        self.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: self.log_text().count("reload: generation=") > before_ok or
                   self.log_text().count("reload failed") > before_bad,
                   what="reload to finish")
        return self.log_text().count("reload failed") == before_bad

    def status(self):
        """The table of `smtpmuxd -s status`."""
        res = subprocess.run([SMTPMUXD, "-s", "status", "-c", self.config_path], env=self.env,
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise AssertionError("smtpmuxd -s status: %s" % res.stderr)
        return res.stdout

    # Columns of `smtpmuxd -s status` whose values are aligned right.
    STATUS_NUMBERS = ("FAILS", "FLIGHT", "LAT(ms)", "ATTEMPTS", "SENT", "FAILED")

    def status_cell(self, name, heading):
        """One cell of the status table: the row named name, the column headed
        heading. A number ends where its heading ends, a text starts where its
        heading starts; never split at blanks: a DOWNSTREAM cell ("addr user")
        has one."""
        lines = self.status().splitlines()
        spans = [m.span() for m in re.finditer(r"\S+", lines[0])]
        i = [lines[0][a:b] for a, b in spans].index(heading)
        if heading in self.STATUS_NUMBERS:
            lo, hi = spans[i - 1][1], spans[i][1]
        else:
            lo, hi = spans[i][0], spans[i + 1][0] if i + 1 < len(spans) else None
        for line in lines[1:]:
            if line.split(None, 1)[0] == name:
                return line[lo:hi].strip()
        raise AssertionError("no status row for %s" % name)

    def stop(self, sig=signal.SIGTERM, timeout=READY_TIMEOUT):
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None and not self.log.closed:
                self.log.close()              # it was signalled by the test itself
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("smtpmuxd did not stop on %s" % sig)
        finally:
            self.log.close()


def process_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


# --- clients -----------------------------------------------------------------

def make_message(subject="test", body="Hello.\r\n", sender="app@example.com", to="rcpt@example.org"):
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: %s\r\nMessage-ID: <%s@smtpmux.test>\r\n\r\n%s"
            % (sender, to, subject, subject.replace(" ", "."), body)).encode()


def send(port, user, password, rcpts=("rcpt@example.org",), msg=None, sender="app@example.com",
         starttls=False, ssl_context=None, implicit=False):
    """Sends one message with smtplib; returns the final reply (code, text)."""
    msg = msg if msg is not None else make_message()
    if implicit:
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=60, context=ssl_context)
    else:
        client = smtplib.SMTP("127.0.0.1", port, timeout=60)
    try:
        client.ehlo("client.test")
        if starttls:
            client.starttls(context=ssl_context)
            client.ehlo("client.test")
        if user is not None:
            client.login(user, password)
        client.mail(sender)
        for r in rcpts:
            code, text = client.rcpt(r)
            if code >= 400:
                return code, text
        code, text = client.data(msg)
        return code, text
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


def swaks(port, *args):
    """Runs swaks against the daemon; returns (exit status, transcript)."""
    cmd = ["swaks", "--server", "127.0.0.1:%d" % port, "--silent", "0", "--hide-informational"] + list(args)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return res.returncode, res.stdout + res.stderr


class DaemonTestCase(unittest.TestCase):
    """Creates a temp dir per test and stops everything the test started."""

    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="smtpmux-it-")
        self.tmpdir = self._tmp.name
        self.addCleanup(self._tmp.cleanup)

    def downstream(self, **kwargs):
        ds = Downstream(**kwargs).start()
        self.addCleanup(ds.stop)
        return ds

    def fake(self, **kwargs):
        """A scripted raw-socket downstream (fakesmtp.FakeDownstream), started."""
        f = FakeDownstream(free_port(), **kwargs).start()
        self.addCleanup(f.stop)
        return f

    def assertArrived(self, ds, *msgs):
        """ds (a Downstream, or a list of them) stored exactly msgs, in any
        order, each byte for byte after the one Received: trace header the
        relay adds."""
        got = []
        for m in [m for one in (ds if isinstance(ds, list) else [ds]) for m in one.messages]:
            data = m["data"]
            self.assertTrue(data.startswith(b"Received: "), data[:200])
            got.append(data[data.index(b"\r\nFrom: ") + 2:])
        self.assertEqual(sorted(got), sorted(msgs))

    def forget_aborted_reports(self, d=None):
        """Under valgrind, a deliberate abort() leaves a report of that process
        (what its threads held is "lost": nothing runs its clean-up); with d,
        also the reports of the processes its master saw killed by signal 6."""
        killed = set(re.findall(r"pid=(\d+) slot=\d+ killed by signal 6", d.log_text())) if d else set()
        vg_dir = os.path.join(self.tmpdir, "vg")
        for name in os.listdir(vg_dir) if os.path.isdir(vg_dir) else []:
            path = os.path.join(vg_dir, name)
            if ".vg." not in name:
                continue
            with open(path, errors="replace") as f:
                aborted = "SIGABRT" in f.read()
            if aborted or name.rsplit(".", 1)[1] in killed:
                os.unlink(path)

    def daemon(self, config, env=None, start=True):
        d = Daemon(self.tmpdir, config, env)
        self.addCleanup(self._stop_daemon, d)
        return d.start() if start else d

    def _stop_daemon(self, d):
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        if d.proc is not None:
            # A sanitizer build (./configure --enable-sanitizers) reports to
            # stderr, which is this log, from the master and every worker.
            self.assertNotRegex(d.log_text(), r"ERROR: \w+Sanitizer|runtime error:")
        if os.environ.get("SMTPMUX_VALGRIND") and os.path.isdir(d.vg_dir):
            for name in os.listdir(d.vg_dir):
                if ".vg." in name:
                    with open(os.path.join(d.vg_dir, name)) as f:
                        report = f.read()
                    # --quiet: only errors are reported; any leak record or
                    # memory error fails the test.
                    self.assertNotRegex(report, r"are (definitely|indirectly|possibly) lost|"
                                        r"Invalid (read|write|free)|uninitialised|"
                                        r"Mismatched free|overlap", name)
