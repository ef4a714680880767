# SPDX-License-Identifier: MIT
"""The upstream leg: replies matched to what was asked, PIPELINING, the relay
deadline, clients that hang up, relays past the final dot at stop and reload,
8BITMIME and SIZE per downstream, the connection cache and early connect.

Misbehaving downstreams are scripted raw-socket servers (fakesmtp); correct
ones are aiosmtpd. Every test checks what arrived where, not only the reply.
"""

import base64
import signal
import socket
import threading
import unittest

from fakesmtp import CLOSE
from harness import DaemonTestCase, make_message, plain_downstream, send, user_entry, wait_until

USER, PASSWORD = "app@example.com", "upstream-password"
AUTH_CAPS = ("PIPELINING", "8BITMIME", "AUTH PLAIN")


def config(downstreams, selector="failover.so", **extra):
    """One worker, so that a cached session is the one the next message finds."""
    c = {"allow_insecure_auth": True, "workers": 1,
         "users": [user_entry(USER, PASSWORD, downstreams, selector)]}
    c.update(extra)
    return c


def login_downstream(fake, name="A"):
    return plain_downstream(fake, name=name, user="relay-login", **{"pass": "relay-secret"})


def reply_line(f):
    """The last line of one (possibly multi-line) reply."""
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def open_transaction(port, rcpts=("rcpt@example.org",)):
    """A raw client, logged in, with MAIL and RCPT accepted."""
    token = base64.b64encode(("\0%s\0%s" % (USER, PASSWORD)).encode())
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    f = s.makefile("rb")
    steps = [(None, b"220"), (b"EHLO raw.test\r\n", b"250"), (b"AUTH PLAIN " + token + b"\r\n", b"235"),
             (b"MAIL FROM:<app@example.com>\r\n", b"250")]
    steps += [(b"RCPT TO:<%s>\r\n" % r.encode(), b"250") for r in rcpts]
    for cmd, want in steps:
        if cmd is not None:
            s.sendall(cmd)
        line = reply_line(f)
        assert line.startswith(want), (cmd, line)
    return s, f


def hang_up(s, f):
    """Closes the client's socket for real (the makefile object holds it too)."""
    f.close()
    s.close()


def send_data(s, f, msg):
    """DATA and the message, up to and including the final dot."""
    s.sendall(b"DATA\r\n")
    line = reply_line(f)
    assert line.startswith(b"354"), line
    s.sendall(msg + b".\r\n")


class UpstreamTestCase(DaemonTestCase):

    def assertArrived(self, got, msg):
        """Byte-identical, after the one Received: header the relay prepends."""
        self.assertTrue(got.startswith(b"Received: "), got[:80])
        self.assertEqual(got[got.index(b"\r\nFrom: ") + 2:], msg)


class RepliesTest(UpstreamTestCase):
    """Issue 9.5 and 12.2: every reply answers a command that was sent."""

    def test_reply_glued_to_354_is_not_taken_for_the_dot(self):
        a = self.fake()
        a.replies["DATA"] = b"354 go ahead\r\n250 2.0.0 fake ok\r\n"
        b = self.downstream()
        d = self.daemon(config([plain_downstream(a, name="A"), plain_downstream(b, name="B")]))
        msg = make_message("glued")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertEqual(a.messages(), [])
        self.assertFalse(a.seen["."].is_set())
        self.assertEqual(b.handler.count(), 1)
        self.assertArrived(b.messages[0]["data"], msg)
        log = d.log_text()
        self.assertIn("relay=A[%s] attempt=1 stage=dot status=deferred" % a.addr, log)
        self.assertIn("unsolicited reply from downstream: 250 fake ok", log)

    def unsolicited_case(self, fake, downstream):
        fake.replies["MAIL"] = b"550 5.7.1 sender refused\r\n"
        # The relay's own verdict: without the queue, which would take it.
        d = self.daemon(config([downstream], queue={"enabled": False}))
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 451, text)
        self.assertNotIn("RCPT", fake.verbs())
        self.assertEqual(fake.messages(), [])
        self.assertIn("unsolicited reply from downstream: 250", d.log_text())
        return d

    def test_reply_glued_to_the_greeting_is_unsolicited(self):
        a = self.fake(ehlo=("8BITMIME",), greeting=b"220 fake.test ESMTP\r\n250 2.0.0 hello\r\n")
        self.unsolicited_case(a, plain_downstream(a, name="A"))
        self.assertNotIn("MAIL", a.verbs())

    def test_reply_glued_to_ehlo_is_not_the_reply_to_mail(self):
        a = self.fake(ehlo=("8BITMIME",))
        a.replies["EHLO"] = a._ehlo_reply() + b"250 2.1.0 sender ok\r\n"
        self.unsolicited_case(a, plain_downstream(a, name="A"))

    def test_reply_glued_to_auth_is_not_the_reply_to_mail(self):
        a = self.fake(ehlo=("8BITMIME", "AUTH PLAIN"))
        a.replies["AUTH"] = b"235 2.7.0 ok\r\n250 2.1.0 sender ok\r\n"
        self.unsolicited_case(a, login_downstream(a))

    def test_envelope_is_pipelined(self):
        a = self.fake()
        a.batch_until_data = True      # no reply to MAIL or RCPT before DATA has arrived
        d = self.daemon(config([plain_downstream(a, name="A")], limits={"upstream_timeout": 5}))
        msg = make_message("pipelined")
        code, _ = send(d.port, USER, PASSWORD, rcpts=("r1@example.org", "r2@example.org"), msg=msg)
        self.assertEqual(code, 250)
        self.assertEqual(a.verbs()[:5], ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"])
        self.assertArrived(a.messages()[0], msg)

    def test_one_refused_recipient_moves_the_whole_message(self):
        a = self.fake()
        a.replies["RCPT"] = lambda session, line: (b"550 5.1.1 no such user\r\n" if b"r2@" in line
                                                   else b"250 2.1.5 Ok\r\n")
        b = self.downstream()
        d = self.daemon(config([plain_downstream(a, name="A"), plain_downstream(b, name="B")]))
        msg = make_message("all or nothing")
        code, _ = send(d.port, USER, PASSWORD, rcpts=("r1@example.org", "r2@example.org"), msg=msg)
        self.assertEqual(code, 250)
        self.assertFalse(a.seen["."].is_set())
        self.assertEqual(a.messages(), [])
        self.assertEqual(b.messages[0]["rcpts"], ["r1@example.org", "r2@example.org"])
        self.assertArrived(b.messages[0]["data"], msg)


class DeadlineTest(UpstreamTestCase):
    """Issue 9.6: one deadline for all attempts of a message."""

    def test_relay_deadline_cuts_a_silent_downstream_and_starts_no_other(self):
        a = self.fake(greeting=None)       # accepts, never greets
        b = self.downstream()
        d = self.daemon(config([plain_downstream(a, name="A"), plain_downstream(b, name="B")],
                               limits={"relay_deadline": 1}, queue={"enabled": False}))
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 451, text)
        self.assertEqual(b.handler.count(), 0)
        log = d.log_text()
        self.assertIn("relay deadline reached while waiting for greeting", log)
        self.assertRegex(log, r"relay=B\[%s\] attempt=2 stage=connect status=skipped "
                              r"delay=0\.000 tls=none \(0 relay deadline: \d+ ms left\)" % b.addr)


class HangupTest(UpstreamTestCase):
    """Issue 9.7: a client that hangs up while its message is relayed."""

    def test_hangup_before_the_dot_cancels_the_relay(self):
        a = self.fake()
        a.hold["RCPT"] = threading.Event()
        d = self.daemon(config([plain_downstream(a, name="A")]))
        s, f = open_transaction(d.port)
        send_data(s, f, make_message("hangup early"))
        wait_until(a.seen["RCPT"].is_set, what="the relay to reach the downstream")
        hang_up(s, f)
        d.wait_log("relay cancelled: client [127.0.0.1] hung up before the message was sent")
        a.hold["RCPT"].set()
        wait_until(lambda: a.sessions[-1].closed.is_set(), what="the attempt's connection to close")
        self.assertFalse(a.seen["."].is_set())
        self.assertEqual(a.messages(), [])
        self.assertIn("attempt=1 status=cancelled", d.log_text())

    def test_hangup_after_the_dot_lets_the_relay_finish(self):
        a = self.fake()
        a.hold["."] = threading.Event()
        d = self.daemon(config([plain_downstream(a, name="A")]))
        msg = make_message("hangup late")
        s, f = open_transaction(d.port)
        send_data(s, f, msg)
        wait_until(a.seen["."].is_set, what="the final dot to reach the downstream")
        hang_up(s, f)
        d.wait_log("client [127.0.0.1] hung up after the message was sent to the downstream")
        a.hold["."].set()
        d.wait_log("reply=250: the client had hung up; message delivered")
        self.assertEqual(len(a.messages()), 1)
        self.assertArrived(a.messages()[0], msg)
        self.assertNotIn("relay cancelled", d.log_text())


class StopAfterDotTest(UpstreamTestCase):
    """Issue 9.8: a relay past its final dot finishes at stop and reload."""

    def start_held(self):
        self.a = self.fake()
        self.a.hold["."] = threading.Event()
        d = self.daemon(config([plain_downstream(self.a, name="A")], limits={"shutdown_timeout": 1}))
        self.msg = make_message("past the dot")
        self.result = []
        t = threading.Thread(target=lambda: self.result.append(send(d.port, USER, PASSWORD, msg=self.msg)))
        t.start()
        self.addCleanup(t.join, 30)
        self.addCleanup(self.a.hold["."].set)
        wait_until(self.a.seen["."].is_set, what="the final dot to reach the downstream")
        return d, t

    def finish_held(self, d, t):
        d.wait_log("shutdown timeout: the message is with the downstream; waiting for its verdict")
        self.a.hold["."].set()
        t.join(30)
        self.assertEqual(self.result[0][0], 250)
        self.assertEqual(len(self.a.messages()), 1)
        self.assertArrived(self.a.messages()[0], self.msg)
        self.assertNotIn("disconnected", d.log_text())

    def test_sigterm_lets_a_relay_past_the_dot_finish(self):
        d, t = self.start_held()
        d.proc.send_signal(signal.SIGTERM)
        self.finish_held(d, t)
        self.assertEqual(d.proc.wait(30), 0)
        self.assertEqual(d.stop(), 0)

    def test_reload_lets_a_relay_past_the_dot_finish(self):
        d, t = self.start_held()
        self.assertTrue(d.reload(d.config))
        self.finish_held(d, t)
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)     # the new generation serves
        wait_until(lambda: len(self.a.messages()) == 2, what="the second message")

    def test_sigterm_before_the_dot_still_answers_421(self):
        a = self.fake()
        a.hold["RCPT"] = threading.Event()
        self.addCleanup(a.hold["RCPT"].set)
        # Without the queue (with it, test_queue.py: the message is queued).
        d = self.daemon(config([plain_downstream(a, name="A")], limits={"shutdown_timeout": 1},
                               queue={"enabled": False}))
        s, f = open_transaction(d.port)
        send_data(s, f, make_message("before the dot"))
        wait_until(a.seen["RCPT"].is_set, what="the relay to reach the downstream")
        d.proc.send_signal(signal.SIGTERM)
        self.assertTrue(reply_line(f).startswith(b"421 4.3.2"))
        self.assertEqual(d.proc.wait(30), 0)
        self.assertEqual(d.stop(), 0)
        self.assertEqual(a.messages(), [])
        self.assertIn("relay cancelled: shutdown timeout before the message was sent", d.log_text())
        hang_up(s, f)


class CapabilitiesTest(UpstreamTestCase):
    """Issue 9.14: 8BITMIME and SIZE decide per downstream, at no health cost."""

    def test_8bit_message_passes_over_a_downstream_without_8bitmime(self):
        a = self.fake(ehlo=("PIPELINING",))
        b = self.downstream()
        d = self.daemon(config([plain_downstream(a, name="A"), plain_downstream(b, name="B")]))
        msg = make_message("8bit", body="Gr\u00fc\u00dfe aus K\u00f6ln\r\n")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertNotIn("MAIL", a.verbs())
        self.assertArrived(b.messages[0]["data"], msg)
        log = d.log_text()
        self.assertIn("relay=A[%s] attempt=1 stage=mail status=skipped" % a.addr, log)
        self.assertIn("downstream does not offer 8BITMIME", log)
        self.assertEqual((d.status_cell("A", "STATE"), d.status_cell("A", "FAILED")), ("up", "0"))

    def test_size_limit_passes_over_a_smaller_downstream(self):
        a = self.fake(ehlo=("PIPELINING", "8BITMIME", "SIZE 1000"))
        b = self.downstream()
        d = self.daemon(config([plain_downstream(a, name="A"), plain_downstream(b, name="B")]))
        msg = make_message("big", body="x" * 76 + "\r\n" * 1 + ("y" * 76 + "\r\n") * 60)
        self.assertEqual(send(d.port, USER, PASSWORD, msg=msg)[0], 250)
        self.assertNotIn("MAIL", a.verbs())
        self.assertArrived(b.messages[0]["data"], msg)
        self.assertIn("exceeds the downstream's SIZE limit of 1000", d.log_text())
        self.assertEqual(d.status_cell("A", "FAILED"), "0")

    def test_8bit_message_no_downstream_can_take_is_refused(self):
        a = self.fake(ehlo=("PIPELINING",))
        d = self.daemon(config([plain_downstream(a, name="A")]))
        code, text = send(d.port, USER, PASSWORD, msg=make_message("8bit", body="\u00e9t\u00e9\r\n"))
        self.assertEqual(code, 554)
        self.assertIn(b"5.6.3 No downstream can take this message: downstream does not offer 8BITMIME",
                      text)
        self.assertNotIn("MAIL", a.verbs())
        self.assertEqual(d.status_cell("A", "FAILED"), "0")


class ConnectionCacheTest(UpstreamTestCase):
    """Issue 12.1: idle authenticated sessions are reused with RSET."""

    def send_three(self, d):
        msgs = [make_message("cached %d" % i) for i in range(3)]
        for m in msgs:
            self.assertEqual(send(d.port, USER, PASSWORD, msg=m)[0], 250)
        return msgs

    def test_sessions_are_reused_with_rset(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)]))
        msgs = self.send_three(d)
        self.assertEqual(len(a.sessions), 1)
        self.assertEqual(a.verbs().count("AUTH"), 1)
        self.assertEqual(a.verbs().count("RSET"), 2)
        for got, m in zip(a.messages(), msgs):
            self.assertArrived(got, m)
        self.assertIn("relay=A[%s] attempt=1 stage=dot status=sent conn_use=3 " % a.addr, d.log_text())
        self.assertEqual((d.status_cell("A", "ATTEMPTS"), d.status_cell("A", "SENT")), ("3", "3"))

    def test_disabled_cache_opens_one_session_per_message(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)], connection_cache={"enabled": False}))
        msgs = self.send_three(d)
        self.assertEqual(len(a.sessions), 3)
        self.assertEqual(a.verbs().count("AUTH"), 3)
        self.assertNotIn("RSET", a.verbs())
        wait_until(lambda: a.verbs().count("QUIT") == 3, what="each session's QUIT")
        for got, m in zip(a.messages(), msgs):
            self.assertArrived(got, m)

    def test_dead_cached_session_is_replaced_without_a_failure(self):
        a = self.fake(ehlo=AUTH_CAPS)
        a.replies["RSET"] = CLOSE          # the provider dropped the session while it was idle
        d = self.daemon(config([login_downstream(a)]))
        first, second = make_message("first"), make_message("second")
        self.assertEqual(send(d.port, USER, PASSWORD, msg=first)[0], 250)
        self.assertEqual(send(d.port, USER, PASSWORD, msg=second)[0], 250)
        self.assertEqual(len(a.sessions), 2)
        self.assertArrived(a.messages()[0], first)
        self.assertArrived(a.messages()[1], second)
        self.assertIn("reused session found dead", d.log_text())
        self.assertEqual([d.status_cell("A", h) for h in ("STATE", "ATTEMPTS", "SENT", "FAILED")],
                         ["up", "2", "2", "0"])

    def test_idle_session_gets_quit_after_idle_timeout(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)], connection_cache={"idle_timeout": 1}))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        wait_until(a.sessions[0].closed.is_set, what="the idle session to close")
        self.assertEqual(a.sessions[0].verbs()[-1], "QUIT")
        self.assertEqual(len(a.messages()), 1)

    def test_idle_sessions_get_quit_at_reload_and_stop(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)], connection_cache={"idle_timeout": 60}))
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertTrue(d.reload(d.config))
        wait_until(a.sessions[0].closed.is_set, what="the retired worker's QUIT")
        self.assertEqual(a.sessions[0].verbs()[-1], "QUIT")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(len(a.sessions), 2)      # the new worker logged in afresh
        self.assertEqual(d.stop(), 0)
        wait_until(a.sessions[1].closed.is_set, what="the stopped worker's QUIT")
        self.assertEqual(a.sessions[1].verbs()[-1], "QUIT")
        self.assertEqual(len(a.messages()), 2)

    def test_max_messages_closes_a_session(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)], connection_cache={"max_messages": 2}))
        self.send_three(d)
        self.assertEqual(len(a.sessions), 2)
        self.assertEqual([len(s.messages) for s in a.sessions], [2, 1])
        wait_until(a.sessions[0].closed.is_set, what="the full session to close")
        self.assertEqual(a.sessions[0].verbs()[-1], "QUIT")


class EarlyConnectTest(UpstreamTestCase):
    """Issue 12.3: the downstream session is ready when the final dot comes."""

    def test_logs_in_before_the_client_sends_data(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)]))
        s, f = open_transaction(d.port)
        self.addCleanup(hang_up, s, f)
        wait_until(a.seen["AUTH"].is_set, what="early login at the first RCPT")
        self.assertNotIn("MAIL", a.verbs())
        msg = make_message("early")
        send_data(s, f, msg)
        self.assertTrue(reply_line(f).startswith(b"250 2.0.0 Ok: queued as"))
        self.assertEqual(len(a.sessions), 1)
        self.assertArrived(a.messages()[0], msg)

    def test_unused_early_session_counts_no_attempt_and_is_kept(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)]))
        s, f = open_transaction(d.port)
        wait_until(a.seen["AUTH"].is_set, what="early login at the first RCPT")
        s.sendall(b"RSET\r\n")
        self.assertTrue(reply_line(f).startswith(b"250"))
        s.sendall(b"QUIT\r\n")
        self.assertTrue(reply_line(f).startswith(b"221"))
        hang_up(s, f)
        self.assertEqual(d.status_cell("A", "ATTEMPTS"), "0")
        self.assertEqual(send(d.port, USER, PASSWORD)[0], 250)
        self.assertEqual(len(a.sessions), 1)       # the kept session carried it
        self.assertEqual(d.status_cell("A", "ATTEMPTS"), "1")

    def test_client_hangup_after_rcpt_counts_no_attempt(self):
        a = self.fake(ehlo=AUTH_CAPS)
        d = self.daemon(config([login_downstream(a)]))
        s, f = open_transaction(d.port)
        wait_until(a.seen["AUTH"].is_set, what="early login at the first RCPT")
        hang_up(s, f)
        d.wait_log("disconnect from [127.0.0.1]")
        self.assertEqual(d.status_cell("A", "ATTEMPTS"), "0")
        self.assertEqual(d.status_cell("A", "FLIGHT"), "0")
        self.assertEqual(a.messages(), [])


if __name__ == "__main__":
    unittest.main()
