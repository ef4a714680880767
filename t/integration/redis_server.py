# SPDX-License-Identifier: MIT
"""A real redis-server for the cluster tests, and a small RESP client.

The server listens on a free loopback port in a temporary folder, keeps
nothing on disk (--save "" --appendonly no), and is always stopped by the
test that started it.
"""

import os
import signal
import socket
import ssl
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


def command(port, *args, timeout=5.0, tls=None, password=None):
    """One command on a fresh connection; returns the decoded reply.
    tls: an ssl context for a TLS-only server."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if tls is not None:
            s = tls.wrap_socket(s, server_hostname="127.0.0.1")
        with s.makefile("rb") as f:
            if password:
                s.sendall(_encode(["AUTH", password]))
                _read(f)
            s.sendall(_encode(args))
            return _read(f)
    finally:
        s.close()


class RedisServer:
    """tls: a certs.TestCA; the server then listens with TLS only, with a
    certificate for 127.0.0.1 from that CA, and with auth_clients asks the
    clients for one too (the test's own client presents one)."""

    def __init__(self, tmpdir, port=None, password=None, tls=None, auth_clients=False):
        self.dir = os.path.join(tmpdir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.tls = tls
        self.auth_clients = auth_clients
        self.proc = None
        self.ssl = None
        if tls is not None:
            self.cert, self.key = tls.issue("redis", ["localhost"], ["127.0.0.1"])
            self.ssl = ssl.create_default_context(cafile=tls.cert)
            if auth_clients:
                self.ssl.load_cert_chain(*tls.issue("redis-client", ["client"], client=True))

    @property
    def url(self):
        auth = ":%s@" % self.password if self.password else ""
        return "%s://%s127.0.0.1:%d/0" % ("rediss" if self.tls else "redis", auth, self.port)

    def start(self):
        args = [REDIS_SERVER, "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", self.dir,
                "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log")]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.cert,
                     "--tls-key-file", self.key, "--tls-ca-cert-file", self.tls.cert,
                     "--tls-auth-clients", "yes" if self.auth_clients else "no"]
        else:
            args += ["--port", str(self.port)]
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
        return command(self.port, *args, tls=self.ssl, password=self.password)

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
