# SPDX-License-Identifier: MIT
"""Hostile clients against the real daemon: floods that never read, slow
drips, connection floods, password guessing, BDAT. Raw sockets on
127.0.0.1; what is checked is what the daemon costs and answers."""

import os
import select
import socket
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
        [worker] = d.children()
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


if __name__ == "__main__":
    unittest.main()
