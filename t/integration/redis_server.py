# SPDX-License-Identifier: MIT
"""A real redis-server for the cluster tests, and a small RESP client.

The server listens on a free loopback port in a temporary folder, keeps
nothing on disk (--save "" --appendonly no), and is always stopped by the
test that started it.
"""

import os
import signal
import socket
import subprocess
import time

from harness import READY_TIMEOUT, free_port, wait_until

REDIS_SERVER = "/usr/bin/redis-server"


class RespError(Exception):
    pass


def _encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _read(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise RespError("unexpected reply %r" % line)


def command(port, *args, timeout=5.0):
    """One command on a fresh connection; returns the decoded reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(_encode(args))
        return _read(s.makefile("rb"))


class RedisServer:
    def __init__(self, tmpdir, port=None, password=None):
        self.dir = os.path.join(tmpdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.proc = None

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "redis://%s127.0.0.1:%d/0" % (auth, self.port)

    def start(self):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(lambda: self.proc.poll() is not None or self.ping(), what="redis-server")
        if self.proc.poll() is not None:
            raise AssertionError("redis-server exited with %s" % self.proc.returncode)
        return self

    def ping(self):
        try:
            return self.command("PING") == "PONG"
        except (OSError, RespError):
            return False

    def command(self, *args):
        if self.password:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                s.sendall(_encode(["AUTH", self.password]) + _encode(args))
                f = s.makefile("rb")
                _read(f)
                return _read(f)
        return command(self.port, *args)

    def kill(self, sig=signal.SIGKILL):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(READY_TIMEOUT)

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(READY_TIMEOUT)
