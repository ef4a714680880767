# SPDX-License-Identifier: MIT
"""A scripted SMTP server on raw sockets, for downstreams that misbehave.

aiosmtpd plays a correct provider; this one says exactly what a test
scripts, byte for byte, including replies nobody asked for, replies held
back until the test lets them go, and connections dropped mid-way. It
records every command line and message of every connection, and signals
each verb it sees, so that tests wait on events, never on sleeps.

Run as a script (for the C unit tests), it serves until killed and writes
each connection's transcript to DIR/session.N as it goes: every command
line, "MESSAGE <octets>" and the message, and "CLOSED" at the end.

    python3 fakesmtp.py PORT DIR [VERB=REPLY ...] [ehlo=CAP,CAP] [greeting=TEXT]

REPLY uses Python escapes (\\r\\n); an empty REPLY means no reply, and
"close" drops the connection instead.
"""

import os

import collections
import socket
import sys
import threading

# A reply that closes the connection instead of answering.
CLOSE = object()

DEFAULT_REPLIES = {
    "HELO": b"250 fake.test\r\n",
    "MAIL": b"250 2.1.0 Ok\r\n",
    "RCPT": b"250 2.1.5 Ok\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ".": b"250 2.0.0 Ok: queued\r\n",
    "RSET": b"250 2.0.0 Ok\r\n",
    "NOOP": b"250 2.0.0 Ok\r\n",
    "AUTH": b"235 2.7.0 Authentication successful\r\n",
    "QUIT": b"221 2.0.0 Bye\r\n",
}


def unstuff(data):
    """The message as sent, without SMTP's dot-stuffing."""
    lines = data.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class Session:
    """One connection: what the client sent, and whether it is over."""

    def __init__(self, index):
        self.index = index
        self.commands = []          # command lines, without CRLF
        self.messages = []          # message contents, unstuffed
        self.closed = threading.Event()

    def verbs(self):
        return [c.split(b" ")[0].upper().decode("ascii", "replace") for c in self.commands]


class FakeDownstream:
    """A scripted SMTP server on a free 127.0.0.1 port.

    replies: verb -> bytes (or a function (session, line) -> bytes; None
    answers nothing, CLOSE drops the connection); "." is the end of data.
    hold: verb -> threading.Event that must be set before that reply goes.
    seen: verb -> threading.Event set when the verb (or ".") arrives.
    greeting: None never greets. ehlo: the capabilities announced.
    batch_until_data: MAIL and RCPT replies are held until DATA arrives,
    as a server that relies on PIPELINING could; a client that waits for
    each reply never gets one.
    """

    def __init__(self, port, ehlo=("PIPELINING", "8BITMIME"), greeting=b"220 fake.test ESMTP\r\n",
                 transcripts=None):
        self.port = port
        self.transcripts = transcripts
        self.greeting = greeting
        self.ehlo = list(ehlo)
        self.replies = dict(DEFAULT_REPLIES)
        self.hold = {}
        self.seen = collections.defaultdict(threading.Event)
        self.batch_until_data = False
        self.sessions = []
        self.lock = threading.Lock()
        self._socks = []
        self._threads = []
        self._listener = None
        self._stopping = False

    @property
    def addr(self):
        return "127.0.0.1:%d" % self.port

    def messages(self):
        with self.lock:
            return [m for s in self.sessions for m in s.messages]

    def verbs(self):
        with self.lock:
            return [v for s in self.sessions for v in s.verbs()]

    def start(self):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self):
        self._stopping = True
        for ev in self.hold.values():
            ev.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self.lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(10)

    def _accept(self):
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self.lock:
                session = Session(len(self.sessions))
                self.sessions.append(session)
                self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock, session), daemon=True)
            t.start()
            self._threads.append(t)

    def _ehlo_reply(self):
        lines = ["fake.test"] + self.ehlo
        return "".join("250%s%s\r\n" % ("-" if i + 1 < len(lines) else " ", l)
                       for i, l in enumerate(lines)).encode()

    def _reply(self, session, verb, line):
        ev = self.hold.get(verb)
        if ev is not None:
            ev.wait(30)
        r = self._ehlo_reply() if verb == "EHLO" and "EHLO" not in self.replies else \
            self.replies.get(verb, b"500 5.5.2 Command unrecognized\r\n")
        if callable(r):
            r = r(session, line)
        return r

    def _note(self, session, data):
        """Appends to the connection's transcript file, if there is one."""
        if self.transcripts is None:
            return
        with open(os.path.join(self.transcripts, "session.%d" % session.index), "ab") as f:
            f.write(data)

    def _serve(self, sock, session):
        try:
            self._converse(sock, session)
        except OSError:
            pass
        finally:
            sock.close()
            self._note(session, b"CLOSED\r\n")
            session.closed.set()

    def _converse(self, sock, session):
        if self.greeting is not None:
            sock.sendall(self.greeting)
        buf = b""
        in_data = False
        batched = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while True:
                if in_data:
                    if buf.startswith(b".\r\n"):
                        end, body = 0, b""
                    else:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        body = buf[:end + 2]
                        end += 2
                    buf = buf[end + 3:]
                    in_data = False
                    with self.lock:
                        session.messages.append(unstuff(body))
                    self._note(session, b"MESSAGE %d\r\n" % len(body) + unstuff(body))
                    verb, line = ".", b"."
                else:
                    line, sep, rest = buf.partition(b"\r\n")
                    if not sep:
                        break
                    buf = rest
                    with self.lock:
                        session.commands.append(line)
                    self._note(session, line + b"\r\n")
                    verb = line.split(b" ")[0].upper().decode("ascii", "replace")
                self.seen[verb].set()
                r = self._reply(session, verb, line)
                if r is CLOSE:
                    return
                if verb == "DATA" and r and r.startswith(b"354"):
                    in_data = True
                if self.batch_until_data and verb in ("MAIL", "RCPT"):
                    batched += r or b""
                    continue
                if batched:
                    r, batched = batched + (r or b""), b""
                if r:
                    sock.sendall(r)
                if verb == "QUIT":
                    return


def _main(argv):
    port, folder = int(argv[1]), argv[2]
    fake = FakeDownstream(port, transcripts=folder)
    for arg in argv[3:]:
        key, _, value = arg.partition("=")
        if key == "ehlo":
            fake.ehlo = [c for c in value.split(",") if c]
        elif key == "greeting":
            fake.greeting = value.encode().decode("unicode_escape").encode("latin-1") or None
        elif value == "close":
            fake.replies[key] = CLOSE
        else:
            fake.replies[key] = value.encode().decode("unicode_escape").encode("latin-1") or None
    fake.start()
    threading.Event().wait()            # until killed


if __name__ == "__main__":
    _main(sys.argv)
