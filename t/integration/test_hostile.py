# SPDX-License-Identifier: MIT
"""Hostile clients against the real daemon: floods that never read, slow
drips, connection floods, password guessing, BDAT. Raw sockets on
127.0.0.1; what is checked is what the daemon costs and answers."""

import base64
import os
import re
import select
import signal
import socket
import time
import unittest

from harness import DaemonTestCase, make_message, plain_downstream, send, user_entry, wait_until

USER, PASSWORD = "app@example.com", "s3cret-password"
UNDER_VALGRIND = bool(os.environ.get("SMTPMUX_VALGRIND"))
# Sent before the daemon is known to have stopped reading (no reads on our
# side at all): far more than any socket buffers can take.
FLOOD_BYTES = 48 * 1024 * 1024
# A send that cannot go on for this long means the daemon stopped reading;
# it ends the flood, it is not what the test asserts.
STALL_SECONDS = 3.0


def plain_token(password):
    return base64.b64encode(("\0%s\0%s" % (USER, password)).encode()).decode()


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


class RawClient:
    """A socket the test drives byte by byte."""

    def __init__(self, port, timeout=30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def line(self):
        return self.file.readline().decode("ascii", "replace")

    def reply(self):
        """One whole (possibly multi-line) reply, as text."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        return "".join(lines)

    def cmd(self, text):
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        return self.reply()

    def closed_by_peer(self):
        """True once the daemon has closed: EOF (or a reset) on read."""
        try:
            return self.file.read() is not None
        except OSError:
            return True

    def close(self):
        self.file.close()
        self.sock.close()


class HostileTestCase(DaemonTestCase):

    def start(self, limits=None, auth=None, workers=1, extra=None):
        self.ds = self.downstream()
        config = {
            "allow_insecure_auth": True,
            "workers": workers,
            "users": [user_entry(USER, PASSWORD, [plain_downstream(self.ds, name="A")], "failover.so")],
        }
        if limits:
            config["limits"] = limits
        if auth:
            config["auth"] = auth
        config.update(extra or {})
        # In a sanitizer build, freed memory held in ASan's quarantine
        # would count as growth; other builds ignore the variable.
        env = {"ASAN_OPTIONS": ":".join(filter(None, [os.environ.get("ASAN_OPTIONS"),
                                                      "quarantine_size_mb=1"]))}
        return self.daemon(config, env=env)

    def client(self, port, timeout=30.0):
        c = RawClient(port, timeout)
        self.addCleanup(c.close)
        return c


class BackPressureTest(HostileTestCase):

    def flood(self, sock, chunk):
        """Sends chunk repeatedly without ever reading; returns the octets sent
        before FLOOD_BYTES or before the daemon stopped reading."""
        sock.setblocking(False)
        sent, pending = 0, memoryview(chunk)
        while sent < FLOOD_BYTES:
            try:
                n = sock.send(pending)
            except BlockingIOError:
                _, writable, _ = select.select([], [sock], [], STALL_SECONDS)
                if not writable:
                    break
                continue
            sent += n
            pending = pending[n:] if n < len(pending) else memoryview(chunk)
        return sent

    def test_pipelining_client_that_never_reads_costs_bounded_memory(self):
        d = self.start()
        [worker] = d.workers()
        warm = self.client(d.port)
        self.assertTrue(warm.line().startswith("220 "))
        self.assertTrue(warm.cmd("EHLO warm.test").startswith("250-"))
        self.assertTrue(warm.cmd("HELP").startswith("214 "))
        warm.cmd("QUIT")

        flooder = self.client(d.port)
        flooder.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.assertTrue(flooder.line().startswith("220 "))
        before = rss_kib(worker)
        # EHLO and HELP answer 13 and 6 octets with 150 and 80.
        chunk = b"NOOP\r\nEHLO flood.test\r\nHELP\r\n" * 2048
        sent = self.flood(flooder.sock, chunk)
        grown_mib = (rss_kib(worker) - before) / 1024.0
        print("flood: %d octets sent, worker RSS %d KiB -> +%.1f MiB" % (sent, before, grown_mib))

        # The daemon stopped reading long before the flood was over ...
        self.assertLess(sent, FLOOD_BYTES)
        # ... and the flood cost the worker a bounded amount of memory
        # (before: 48 MB of commands meant hundreds of MB of replies).
        if not UNDER_VALGRIND:
            self.assertLess(grown_mib, 8.0, "worker grew by %.1f MiB after %d octets" % (grown_mib, sent))
        d.wait_log("does not read its replies")
        # Everyone else is still served, by the same worker.
        other = self.client(d.port)
        self.assertTrue(other.line().startswith("220 "))
        self.assertEqual(other.cmd("NOOP"), "250 2.0.0 Ok\r\n")
        flooder.close()
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(self.ds.handler.count(), 1)


class SlowClientTest(HostileTestCase):
    """Postfix's per-record deadline idea: silence timeouts alone let a
    client that sends one octet now and then hold a session forever."""

    # Pacing of the attack: well inside command_timeout/data_timeout, so
    # only the new deadlines can end the session.
    DRIP_SECONDS = 0.5
    MAX_DRIPS = 40

    def drip(self, c, data):
        """Sends data one octet at a time until the daemon answers; returns
        (reply, octets sent)."""
        for i, octet in enumerate(data[:self.MAX_DRIPS]):
            c.sock.sendall(bytes([octet]))
            readable, _, _ = select.select([c.sock], [], [], self.DRIP_SECONDS)
            if readable:
                return c.line(), i + 1
        return None, self.MAX_DRIPS

    def test_command_line_dripped_one_octet_at_a_time_is_cut_off(self):
        d = self.start(limits={"command_timeout": 3, "command_deadline": 1})
        c = self.client(d.port)
        self.assertTrue(c.line().startswith("220 "))
        reply, sent = self.drip(c, b"NOOP " + b"x" * 100)
        self.assertIsNotNone(reply, "the session outlived %d octets, %.1f s apart" % (sent, self.DRIP_SECONDS))
        self.assertTrue(reply.startswith("421 4.4.2 "), reply)
        self.assertTrue(c.closed_by_peer())
        d.wait_log("command deadline (1 s) exceeded from [127.0.0.1]")

    def test_message_dripped_below_min_data_rate_is_cut_off(self):
        d = self.start(limits={"data_timeout": 2, "min_data_rate": 1000})
        c = self.client(d.port)
        self.assertTrue(c.line().startswith("220 "))
        self.assertTrue(c.cmd("EHLO drip.test").startswith("250"))
        self.assertTrue(c.cmd("AUTH PLAIN " + plain_token(PASSWORD)).startswith("235 "))
        self.assertTrue(c.cmd("MAIL FROM:<app@example.com>").startswith("250 "))
        self.assertTrue(c.cmd("RCPT TO:<rcpt@example.org>").startswith("250 "))
        self.assertTrue(c.cmd("DATA").startswith("354 "))
        reply, sent = self.drip(c, make_message("drip"))
        self.assertIsNotNone(reply, "DATA outlived %d octets, %.1f s apart" % (sent, self.DRIP_SECONDS))
        self.assertTrue(reply.startswith("421 4.4.2 "), reply)
        d.wait_log("DATA too slow from [127.0.0.1]")
        self.assertEqual(self.ds.handler.count(), 0)


class TwoWorkersTestCase(HostileTestCase):
    """One worker is stopped (SIGSTOP) while connections are made, so which
    worker takes each one is known: the kernel hands connections only to a
    worker that runs."""

    def workers(self, d):
        # The connection that saw the daemon greet (harness) must be gone,
        # or it would count in the limits below.
        wait_until(lambda: d.log_text().count(": connect from [") ==
                   d.log_text().count(": disconnect from ["), what="idle daemon")
        pids = d.workers()
        self.assertEqual(len(pids), 2)
        for pid in pids:
            self.addCleanup(self.resume, pid)
        # A worker still setting up has not said whether it has room: the
        # other would take it for full and refuse instead of leaving.
        for pid in pids:
            wait_until(lambda: self.listening(pid, d.port), what="worker %d to listen" % pid)
        return pids

    @staticmethod
    def listening(pid, port):
        """Whether the worker's event loop watches the listening socket of
        127.0.0.1:port (an epoll entry for it, in /proc/PID/fdinfo)."""
        inodes = set()
        with open("/proc/net/tcp") as f:
            for row in f.read().splitlines()[1:]:
                fields = row.split()
                if fields[1] == "0100007F:%04X" % port and fields[3] == "0A":
                    inodes.add(fields[9])
        fds = set()
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) in {"socket:[%s]" % i for i in inodes}:
                    fds.add(fd)
            except OSError:
                pass
        for fd in os.listdir("/proc/%d/fdinfo" % pid):
            try:
                with open("/proc/%d/fdinfo/%s" % (pid, fd)) as f:
                    info = f.read()
            except OSError:
                continue
            if any(re.search(r"(?m)^tfd:\s+%s\s" % n, info) for n in fds):
                return True
        return False

    @staticmethod
    def stopped(pid):
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(") ", 1)[1][0] == "T"

    def stop(self, pid):
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: self.stopped(pid), what="worker %d to stop" % pid)

    @staticmethod
    def resume(pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def greeted(self, d):
        c = self.client(d.port)
        return c, c.line()


class SharedLimitsTest(TwoWorkersTestCase):
    """Per-client-address limits hold across workers."""

    def test_max_sessions_per_ip_counts_all_workers(self):
        d = self.start(workers=2, limits={"max_sessions_per_ip": 3})
        a, b = self.workers(d)
        self.stop(b)
        for _ in range(2):
            self.assertTrue(self.greeted(d)[1].startswith("220 "))     # both in worker a
        self.resume(b)
        self.stop(a)
        third = self.greeted(d)[1]
        self.assertTrue(third.startswith("220 "), third)                # worker b: the third
        c, line = self.greeted(d)                                      # worker b: the fourth
        self.assertTrue(line.startswith("421 4.7.0 "), line)
        self.assertTrue(c.closed_by_peer())
        self.resume(a)
        d.wait_log("refused: 3 sessions from it (limits.max_sessions_per_ip)")

    def test_auth_failures_count_across_workers_and_lock_out(self):
        d = self.start(workers=2, auth={"max_failures": 3, "failure_delay": 0})
        a, b = self.workers(d)
        self.stop(b)
        c, line = self.greeted(d)                                      # worker a
        c.cmd("EHLO guess.test")
        for pw in ("guess-1", "guess-2"):
            self.assertTrue(c.cmd("AUTH PLAIN " + plain_token(pw)).startswith("535 5.7.8 "))
        self.resume(b)
        self.stop(a)
        c, line = self.greeted(d)                                      # worker b, a new connection
        c.cmd("EHLO guess.test")
        reply = c.cmd("AUTH PLAIN " + plain_token("guess-3"))
        self.assertTrue(reply.startswith("421 4.7.0 "), reply)
        self.assertTrue(c.closed_by_peer())
        self.resume(a)
        # Locked out everywhere, even with the right password.
        for _ in range(2):
            c, line = self.greeted(d)
            c.cmd("EHLO guess.test")
            self.assertTrue(c.cmd("AUTH PLAIN " + plain_token(PASSWORD)).startswith("421 4.7.0 "))
        d.wait_log("auth lockout client=[127.0.0.1] failures=3")
        self.assertEqual(d.log_text().count("auth lockout"), 1)
        self.assertNotIn("guess-", d.log_text())
        self.assertEqual(self.ds.handler.count(), 0)


class AcceptBalanceTest(TwoWorkersTestCase):
    """A worker at max_sessions leaves new connections to one with room."""

    def test_full_worker_leaves_connections_to_the_other(self):
        d = self.start(workers=2, limits={"max_sessions": 2})
        a, b = self.workers(d)
        self.stop(b)
        for _ in range(2):
            self.assertTrue(self.greeted(d)[1].startswith("220 "))     # worker a is full
        # Worker a must not take (and refuse) this one: worker b has room.
        waiting = self.client(d.port)
        self.resume(b)
        self.assertTrue(waiting.line().startswith("220 "))
        self.assertTrue(self.greeted(d)[1].startswith("220 "))         # b is full too
        # Every worker full: the next connections are refused, not left waiting.
        started = time.monotonic()
        for _ in range(20):
            c, line = self.greeted(d)
            self.assertTrue(line.startswith("421 4.3.2 "), line)
            c.close()
        elapsed = time.monotonic() - started
        # The refusals are reported in at most one line per second.
        d.wait_log("connection refused: every worker is full")
        lines = d.log_text().count("connection refused: every worker is full")
        self.assertLessEqual(lines, 2 * (2 + int(elapsed)))
        self.assertLess(lines, 20)


class ProtocolTest(HostileTestCase):

    def test_bdat_chunk_is_never_read_as_commands(self):
        d = self.start()
        c = self.client(d.port)
        self.assertTrue(c.line().startswith("220 "))
        self.assertNotIn("CHUNKING", c.cmd("EHLO chunky.test"))
        chunk = b"RSET\r\nNOOP\r\nHELP\r\nQUIT\r\n"
        c.sock.sendall(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        reply = c.line()
        self.assertTrue(reply.startswith("521 5.5.1 "), reply)
        # Closed at once: not one command of the chunk was answered.
        self.assertEqual(c.file.read(), b"")
        d.wait_log("BDAT without CHUNKING from [127.0.0.1]")


if __name__ == "__main__":
    unittest.main()
