# SPDX-License-Identifier: MIT
"""The durable queue: fallback and always modes, the queue runner, quota-aware
deferral, crashes at any moment, notifications to senders, the queue tools."""

import asyncio
import email
import json
import os
import signal
import subprocess
import threading
import time
import unittest
import urllib.request

from harness import (SMTPMUXD, SELECTORS, DaemonTestCase, Daemon, Downstream, RecordingHandler, free_port,
                     make_message, plain_downstream, send, user_entry, wait_until)

USER, PASSWORD = "app@example.com", "queue-password"
SENDER = "app@example.com"
FAST = {"min_backoff": 1, "max_backoff": 1}


class QueueHandler(RecordingHandler):
    """Records when each message arrived; refuses chosen recipients."""

    def __init__(self):
        super().__init__()
        self.refuse = {}                 # recipient -> reply; "*" for all
        self.arrivals = []
        self.rcpt_delay = 0.0            # seconds before answering RCPT (before the dot)
        self.rcpt_started = threading.Event()
        self.sessions = 0                # EHLOs: one per session

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        with self.lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpt_started.set()
        if self.rcpt_delay:
            await asyncio.sleep(self.rcpt_delay)
        reply = self.refuse.get(address, self.refuse.get("*"))
        if reply is not None:
            return reply
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server, session, envelope):
        reply = await super().handle_DATA(server, session, envelope)
        with self.lock:
            self.arrivals.append(time.time())
        return reply


def subject_of(data):
    return email.message_from_bytes(data)["Subject"]


def body_after_received(data):
    """What the app sent: the relay prepends exactly one Received: header."""
    assert data.startswith(b"Received: ")
    return data[data.index(b"\r\nFrom: ") + 2:]


def queue_id(text):
    return text.split(b"queued as ")[1].split()[0].decode()


class QueueTest(DaemonTestCase):

    def ds(self, start=True):
        d = Downstream()
        d.handler = QueueHandler()
        d.controller.handler = d.handler
        if start:
            d.start()
        self.addCleanup(self._stop_quietly, d)
        return d

    @staticmethod
    def _stop_quietly(d):
        try:
            d.stop()
        except (AssertionError, RuntimeError):
            pass
        if not d.controller.loop.is_closed():         # never started
            d.controller.loop.close()

    def make(self, downstreams, queue=None, selector="failover.so", **extra):
        config = {"allow_insecure_auth": True,
                  "users": [user_entry(USER, PASSWORD, downstreams, selector)],
                  "queue": dict(FAST, **(queue or {}))}
        config.update(extra)
        return self.daemon(config)

    def spool(self, d, sub="msg"):
        path = os.path.join(d.config["queue"]["dir"], sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def queued_ids(self, d):
        return [n for n in self.spool(d) if not n.endswith(".state")]

    def tool(self, d, *args):
        res = subprocess.run([SMTPMUXD, "-c", d.config_path] + list(args), env=d.env,
                             capture_output=True, text=True, timeout=60)
        return res.returncode, res.stdout + res.stderr

    def wait_empty(self, d):
        wait_until(lambda: not self.queued_ids(d), what="the queue to empty")

    # --- fallback --------------------------------------------------------

    def test_all_down_queued_then_delivered_once_byte_identical(self):
        a = self.ds(start=False)
        d = self.make([plain_downstream(a, name="A")])
        msg = make_message("comes back", body="Line one.\r\n.dot line\r\n" + ("x" * 70 + "\r\n") * 100)
        code, text = send(d.port, USER, PASSWORD, msg=msg)
        self.assertEqual(code, 250)
        self.assertIn(b"queued as", text)
        self.assertIn(b"delivery deferred", text)
        qid = queue_id(text)
        self.assertEqual(self.queued_ids(d), [qid])     # on disk when the client heard 250
        self.assertRegex(d.log_text(), r"\w+: id=%s client=\[127\.0\.0\.1\] user=%s .*"
                                       r"status=queued mode=fallback" % (qid, USER))
        a.start()
        d.wait_log("queue: id=%s user=%s" % (qid, USER))
        self.wait_empty(d)
        self.assertEqual(a.handler.count(), 1)
        self.assertEqual(body_after_received(a.messages[0]["data"]), msg)
        self.assertIn("id %s" % qid, a.messages[0]["data"].decode().split("\r\nFrom: ")[0])
        self.assertRegex(d.log_text(), r"id=%s .*status=queued mode=fallback" % qid)
        self.assertRegex(d.log_text(), r"queue: id=%s user=.* status=sent queued=yes" % qid)
        self.assertEqual(a.handler.count(), 1)

    def test_runner_reuses_its_downstream_sessions(self):
        # One delivery at a time: each after the first goes over the
        # session the one before left logged in, as a worker's would.
        a = self.ds(start=False)
        d = self.make([plain_downstream(a, name="A")], queue={"max_concurrency": 1})
        for i in range(4):
            self.assertEqual(send(d.port, USER, PASSWORD, msg=make_message("reuse %d" % i))[0], 250)
        self.assertEqual(len(self.queued_ids(d)), 4)
        a.start()
        wait_until(lambda: a.handler.count() == 4, what="the four deliveries")
        self.wait_empty(d)
        self.assertEqual(a.handler.sessions, 1)

    def test_disabled_queue_keeps_451(self):
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A")], queue={"enabled": False})
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 451)
        self.assertIn(b"4.4.1", text)
        self.assertFalse(os.path.exists(d.config["queue"]["dir"]))
        self.assertNotIn("queue runner", d.log_text())
        self.assertEqual(a.handler.count(), 0)

    def test_permanent_refusal_stays_synchronous(self):
        a = self.ds()
        a.handler.refuse["*"] = "550 5.1.1 No such user"
        d = self.make([plain_downstream(a, name="A")])
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 550)
        self.assertEqual(self.queued_ids(d), [])

    def test_mode_always_acknowledges_from_disk_and_delivers_in_background(self):
        a = self.ds()
        a.handler.data_delay = 0.5          # the client does not wait for this
        d = self.make([plain_downstream(a, name="A")], queue={"mode": "always"})
        msgs = [make_message("always %d" % i) for i in range(5)]
        for m in msgs:
            code, text = send(d.port, USER, PASSWORD, msg=m)
            self.assertEqual(code, 250)
            self.assertNotIn(b"deferred", text)
        wait_until(lambda: a.handler.count() == 5, what="background deliveries")
        self.wait_empty(d)
        self.assertEqual(sorted(body_after_received(m["data"]) for m in a.messages), sorted(msgs))
        self.assertEqual(d.log_text().count("status=queued mode=always"), 5)
        self.assertEqual(d.log_text().count("status=sent queued=yes"), 5)

    # --- write failures --------------------------------------------------

    def test_max_size_answers_452(self):
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A")], queue={"max_size": 4000, "min_backoff": 3600,
                                                               "max_backoff": 3600})
        self.assertEqual(send(d.port, USER, PASSWORD, msg=make_message("small"))[0], 250)
        code, text = send(d.port, USER, PASSWORD, msg=make_message("big", body=("y" * 70 + "\r\n") * 80))
        self.assertEqual(code, 452)
        self.assertIn(b"4.3.1", text)
        self.assertEqual(len(self.queued_ids(d)), 1)
        self.assertEqual(self.spool(d, "tmp"), [])       # nothing half-written left
        self.assertIn("queue.max_size reached", d.log_text())

    def test_write_failure_answers_452(self):
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        # One worker, which greets only once it has prepared the spool, and
        # the runner's first scan, which follows its own preparing: neither
        # may set the folder's mode back after the chmod below.
        d = self.make([plain_downstream(a, name="A")], workers=1)
        d.wait_log(" octets in %s" % d.config["queue"]["dir"])
        tmp = os.path.join(d.config["queue"]["dir"], "tmp")
        os.chmod(tmp, 0o500)                 # the workers (nobody) can no longer write
        self.addCleanup(os.chmod, tmp, 0o750)
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 452, d.log_text())
        self.assertIn(b"4.3.1", text)
        self.assertEqual(self.queued_ids(d), [])
        self.assertRegex(d.log_text(), r"cannot queue the message: create: Permission denied")

    # --- quota-aware deferral --------------------------------------------

    def test_quota_burst_drains_at_the_quota_rate(self):
        # Two a minute, rolling (the default): no 60 s ever sees a third.
        a = self.ds()
        d = self.make([plain_downstream(a, name="A", max_per_minute=2)],
                      queue={"max_concurrency": 1})
        replies = [send(d.port, USER, PASSWORD, msg=make_message("burst %d" % i)) for i in range(5)]
        self.assertEqual([c for c, _ in replies], [250] * 5)
        deferred = [b"deferred" in t for _, t in replies]
        self.assertEqual(deferred, [False] * 2 + [True] * 3)
        last = queue_id(replies[4][1])
        # Each of the next two as soon as a delivery of the burst leaves the
        # window, oldest first; the last one waits for the first of those:
        # the configured rate, exactly.
        wait_until(lambda: a.handler.count() == 4, timeout=90, what="the quota window to roll")
        d.wait_log("id=%s deferred: next attempt in" % last)
        self.assertEqual(self.queued_ids(d), [last])
        got = [subject_of(m["data"]) for m in a.messages]
        self.assertEqual(got, ["burst %d" % i for i in range(4)])
        t = a.handler.arrivals
        for i in (0, 1):
            # quota cells hold whole seconds: a second's slack below
            self.assertGreater(t[i + 2] - t[i], 59, t)
            self.assertLess(t[i + 2] - t[i], 60 + 5, t)    # at the reopening, not later
        code, out = self.tool(d, "-s", "queue")
        self.assertEqual(code, 0, out)
        due_in = int(out.split(last)[1].split(" in ")[1].split("s")[0])
        self.assertAlmostEqual(time.time() + due_in, t[2] + 60, delta=2)
        # Woken by the window, not by blind retries every second (min_backoff
        # 1): a skip at most when a window reopens for one message, not two.
        runner_skips = [line for line in d.log_text().splitlines()
                        if "queue: id=" in line and "status=skipped" in line]
        self.assertLessEqual(len(runner_skips), 3, runner_skips)
        self.assertEqual(self.queued_ids(d), [last])
        self.assertEqual(a.handler.count(), 4)

    # --- crashes ---------------------------------------------------------

    def send_acked(self, port, count, prefix):
        acked = {}
        for i in range(count):
            m = make_message("%s %d" % (prefix, i))
            code, text = send(port, USER, PASSWORD, msg=m)
            self.assertEqual(code, 250)
            acked[subject_of(m)] = m
        return acked

    def assert_all_arrived(self, a, acked):
        def arrived():
            with a.handler.lock:
                return {subject_of(m["data"]) for m in a.messages}
        wait_until(lambda: set(acked) <= arrived(), timeout=60, what="every acknowledged message")
        for m in list(a.messages):
            s = subject_of(m["data"])
            if s in acked:
                self.assertEqual(body_after_received(m["data"]), acked[s])   # never half-written

    def test_runner_killed_during_deliveries(self):
        a = self.ds()
        a.handler.data_delay = 1.0
        d = self.make([plain_downstream(a, name="A")], queue={"mode": "always", "max_concurrency": 2})
        acked = self.send_acked(d.port, 6, "runner crash")
        self.assertTrue(a.handler.data_started.wait(30))
        runner = d.runner()
        os.kill(runner, signal.SIGKILL)
        wait_until(lambda: d.runner() not in (None, runner), what="a new queue runner")
        a.handler.data_delay = 0
        self.assert_all_arrived(a, acked)
        self.wait_empty(d)
        self.assertRegex(d.log_text(), r"queue runner pid=%d .*killed by signal 9" % runner)

    def test_worker_killed_while_clients_send(self):
        a = self.ds(start=False)
        d = self.make([plain_downstream(a, name="A")], workers=2)
        acked, lock, stop = {}, threading.Lock(), threading.Event()

        def client(n):
            i = 0
            while not stop.is_set():
                m = make_message("worker crash %d-%d" % (n, i))
                i += 1
                try:
                    code, _ = send(d.port, USER, PASSWORD, msg=m)
                except Exception:
                    continue
                if code == 250:
                    with lock:
                        acked[subject_of(m)] = m

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(acked) >= 8, what="messages queued")
            os.kill(d.workers()[0], signal.SIGKILL)
            wait_until(lambda: len(acked) >= 16, what="messages queued after the kill")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        a.start()
        self.assert_all_arrived(a, acked)
        self.wait_empty(d)

    def test_master_killed_then_restarted(self):
        a = self.ds()
        a.handler.data_delay = 1.0
        d = self.make([plain_downstream(a, name="A")], queue={"mode": "always", "max_concurrency": 1},
                      limits={"shutdown_timeout": 1})
        acked = self.send_acked(d.port, 4, "master crash")
        self.assertTrue(a.handler.data_started.wait(30))
        children = d.children()
        d.proc.kill()
        d.proc.wait()
        d.log.close()
        wait_until(lambda: not any(os.path.exists("/proc/%d" % p) for p in children),
                   what="the old children to stop")
        a.handler.data_delay = 0
        again = Daemon(self.tmpdir, d.config)
        again.port = d.port
        again.log_path = d.log_path + ".2"
        self.addCleanup(self._stop_daemon, again)
        again.start()
        self.assert_all_arrived(a, acked)
        self.wait_empty(again)

    def test_unfinished_and_corrupt_files_are_never_delivered(self):
        a = self.ds()
        config = {"allow_insecure_auth": True, "queue": dict(FAST),
                  "users": [user_entry(USER, PASSWORD, [plain_downstream(a, name="A")], "failover.so")]}
        d = Daemon(self.tmpdir, config)
        self.addCleanup(self._stop_daemon, d)
        qdir = d.config["queue"]["dir"]
        for sub in ("tmp", "msg", "hold", "ctl", "corrupt"):
            os.makedirs(os.path.join(qdir, sub))
        good = spool_file("AAAAAAAAAAA1", make_message("complete"))
        cut = good[:-10]                                  # a body cut short
        with open(os.path.join(qdir, "tmp", "w1-0"), "wb") as f:   # killed before its rename
            f.write(spool_file("AAAAAAAAAAA2", make_message("unfinished")))
        old = time.time() - 3600
        os.utime(os.path.join(qdir, "tmp", "w1-0"), (old, old))
        with open(os.path.join(qdir, "msg", "AAAAAAAAAAA1"), "wb") as f:
            f.write(good)
        with open(os.path.join(qdir, "msg", "AAAAAAAAAAA3"), "wb") as f:
            f.write(cut.replace(b"complete", b"cut short"))
        with open(os.path.join(qdir, "msg", "BBBBBBBBBBB4"), "wb") as f:
            f.write(b"SMTPMUX-SPOOL 9\nnonsense\n\n")
        d.start()
        wait_until(lambda: a.handler.count() == 1, what="the complete message")
        self.wait_empty(d)
        self.assertEqual(subject_of(a.messages[0]["data"]), "complete")
        self.assertEqual(self.spool(d, "tmp"), [])
        corrupt = self.spool(d, "corrupt")
        self.assertEqual(len(corrupt), 2, corrupt)
        self.assertRegex(d.log_text(), r"id=AAAAAAAAAAA3 malformed queue file .*octets of body")
        self.assertRegex(d.log_text(), r"id=BBBBBBBBBBB4 malformed queue file \(line 1: not a version 1")
        self.assertIn("removed 1 unfinished write(s)", d.log_text())
        self.assertEqual(a.handler.count(), 1)

    # --- shutting down during a relay ------------------------------------

    def send_in_background(self, d, msg):
        result = {}

        def client():
            try:
                result["reply"] = send(d.port, USER, PASSWORD, msg=msg)
            except Exception as e:          # noqa: BLE001 - recorded for the assertion
                result["error"] = e
        t = threading.Thread(target=client)
        t.start()
        self.addCleanup(t.join, 60)
        return t, result

    def restart(self, d):
        again = Daemon(self.tmpdir, d.config)
        again.port = d.port
        again.log_path = d.log_path + ".2"
        self.addCleanup(self._stop_daemon, again)
        return again.start()

    def test_stop_queues_a_relay_before_its_final_dot(self):
        a = self.ds()
        a.handler.rcpt_delay = 30.0
        d = self.make([plain_downstream(a, name="A")], limits={"shutdown_timeout": 1})
        msg = make_message("at shutdown")
        t, result = self.send_in_background(d, msg)
        self.assertTrue(a.handler.rcpt_started.wait(30))
        self.assertEqual(d.stop(), 0)
        t.join(60)
        code, text = result["reply"]
        self.assertEqual(code, 250, result)
        self.assertIn(b"the server is restarting", text)
        qid = queue_id(text)
        self.assertEqual(self.queued_ids(d), [qid])
        self.assertIn("id=%s shutting down before the final dot" % qid, d.log_text())
        a.handler.rcpt_delay = 0
        again = self.restart(d)
        wait_until(lambda: a.handler.count() == 1, what="the queued message")
        self.wait_empty(again)
        self.assertEqual(body_after_received(a.messages[0]["data"]), msg)

    def test_reload_queues_a_relay_of_a_retired_worker(self):
        a = self.ds()
        a.handler.rcpt_delay = 30.0
        d = self.make([plain_downstream(a, name="A")], limits={"shutdown_timeout": 1})
        t, result = self.send_in_background(d, make_message("at reload"))
        self.assertTrue(a.handler.rcpt_started.wait(30))
        a.handler.rcpt_delay = 0              # for the retry; the first RCPT still hangs
        self.assertTrue(d.reload(d.config))
        t.join(60)
        code, text = result["reply"]
        self.assertEqual(code, 250, result)
        wait_until(lambda: a.handler.count() == 1, what="delivery by the new queue runner")
        self.wait_empty(d)
        self.assertEqual(subject_of(a.messages[0]["data"]), "at reload")

    def test_stop_never_queues_a_relay_past_its_final_dot(self):
        a = self.ds()
        a.handler.data_delay = 3.0            # the dot is sent; its reply is slow
        d = self.make([plain_downstream(a, name="A")], limits={"shutdown_timeout": 1})
        t, result = self.send_in_background(d, make_message("past the dot"))
        self.assertTrue(a.handler.data_started.wait(30))
        self.assertEqual(d.stop(), 0)
        t.join(60)
        # The downstream may deliver it: queueing it too could deliver it twice.
        self.assertEqual(self.queued_ids(d), [])
        self.assertNotIn("status=queued", d.log_text())

    # --- the spool under systemd ---------------------------------------------

    @unittest.skipUnless(os.geteuid() == 0, "needs root")
    def test_master_without_dac_override_and_a_given_spool(self):
        # As the systemd unit runs it: root without CAP_DAC_OVERRIDE, the
        # spool created by the package and owned by the workers' user.
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        qdir = os.path.join(self.tmpdir, "spool")
        os.mkdir(qdir, 0o750)
        os.chown(qdir, 65534, 65534)
        config = {"allow_insecure_auth": True, "user": "nobody", "queue": dict(FAST, dir=qdir),
                  "users": [user_entry(USER, PASSWORD, [plain_downstream(a, name="A")], "failover.so")]}
        d = Daemon(self.tmpdir, config)
        plain = d.command
        d.command = lambda: ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + plain()
        self.addCleanup(self._stop_daemon, d)
        d.start()
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 250, text)
        self.assertIn(b"queued as", text)
        a.handler.refuse.clear()
        wait_until(lambda: a.handler.count() == 1, what="delivery from the queue")
        st = os.stat(os.path.join(qdir, "msg"))
        self.assertEqual((st.st_uid, st.st_mode & 0o777), (65534, 0o750))

    # --- the user's configuration changes ---------------------------------

    def queue_one_for_an_hour(self):
        """A message queued by a refusing downstream, its next try an hour away."""
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A")], queue={"min_backoff": 3600, "max_backoff": 3600})
        code, text = send(d.port, USER, PASSWORD)
        self.assertEqual(code, 250, text)
        return a, d, queue_id(text), json.loads(json.dumps(d.config))

    def reload_then_flush(self, d, config, qid):
        """Reloads; once the next runner has read the spool, flushes qid."""
        runner = d.runner()
        self.assertTrue(d.reload(config))
        wait_until(lambda: d.runner() not in (None, runner), what="the next queue runner")
        d.wait_log(" octets in %s" % d.config["queue"]["dir"], count=3)   # it has read the spool
        code, out = self.tool(d, "-s", "flush", qid)
        self.assertEqual(code, 0, out)

    def test_message_of_a_removed_user_is_kept(self):
        a, d, qid, config = self.queue_one_for_an_hour()
        runner = d.runner()
        config["users"][0]["email"] = "other@example.com"
        self.assertTrue(d.reload(config))
        d.wait_log("id=%s user=%s is not in the configuration: kept" % (qid, USER))
        self.assertNotEqual(d.runner(), runner)        # restarted with the new settings
        self.assertEqual(self.queued_ids(d), [qid])
        a.handler.refuse.clear()
        config["users"][0]["email"] = USER
        self.reload_then_flush(d, config, qid)
        wait_until(lambda: a.handler.count() == 1, what="the kept message")
        self.wait_empty(d)

    def test_message_whose_sender_is_no_longer_allowed_is_kept(self):
        # The runner checks allowed_senders again: the configuration may
        # have changed since MAIL FROM, and the file came from a worker.
        a, d, qid, config = self.queue_one_for_an_hour()
        a.handler.refuse.clear()
        config["users"][0]["allowed_senders"] = ["*@elsewhere.example"]
        self.assertTrue(d.reload(config))
        d.wait_log("id=%s user=%s from=<%s> is not in the user's allowed_senders: kept"
                   % (qid, USER, SENDER))
        code, out = self.tool(d, "-s", "flush")
        self.assertEqual(code, 0, out)
        config["users"][0]["allowed_senders"] = ["*@example.com"]
        self.reload_then_flush(d, config, qid)
        wait_until(lambda: a.handler.count() == 1, what="the kept message")
        self.wait_empty(d)
        self.assertEqual(a.handler.count(), 1)        # once: the first flush did not send it

    def test_rewrite_from_applies_to_a_queued_message(self):
        # The queue keeps what the app sent; the downstream that finally
        # takes it rewrites, as it would have without the queue.
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A", rewrite_from="relay@provider.example")])
        msg = (b"Subject: queued\r\nFrom: Alice <alice@corp.example>\r\nTo: <rcpt@example.org>\r\n"
               b"\r\nbody\r\n")
        code, text = send(d.port, USER, PASSWORD, msg=msg, sender="alice@corp.example")
        self.assertEqual(code, 250, text)
        qid = queue_id(text)
        with open(os.path.join(d.config["queue"]["dir"], "msg", qid), "rb") as f:
            self.assertIn(b"From: Alice <alice@corp.example>\r\n", f.read())
        a.handler.refuse.clear()
        wait_until(lambda: a.handler.count() == 1, what="delivery from the queue")
        got = a.messages[0]
        self.assertEqual(got["from"], "relay@provider.example")
        self.assertEqual(got["data"][got["data"].index(b"\r\nSubject: ") + 2:],
                         b"Subject: queued\r\nFrom: Alice <relay@provider.example>\r\n"
                         b"To: <rcpt@example.org>\r\nReply-To: Alice <alice@corp.example>\r\n\r\nbody\r\n")
        self.wait_empty(d)

    # --- giving up ---------------------------------------------------------

    def dsn_of(self, m):
        msg = email.message_from_bytes(m["data"])
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        parts = msg.get_payload()
        status = parts[1].as_string()
        headers = parts[2].get_payload() if parts[2].is_multipart() else parts[2].as_string()
        return msg, status, str(headers)

    def test_lifetime_expiry_sends_a_notification(self):
        a = self.ds()
        a.handler.refuse["rcpt@example.org"] = "451 4.7.0 Try again later"
        d = self.make([plain_downstream(a, name="A")], queue={"max_lifetime": 3, "delay_warning": 1})
        code, text = send(d.port, USER, PASSWORD, msg=make_message("too late"))
        qid = queue_id(text)
        wait_until(lambda: a.handler.count() == 2, what="the delay notice and the failure notice")
        self.wait_empty(d)
        delayed, failed = a.messages
        for m in (delayed, failed):
            self.assertEqual(m["from"], "<>")                     # MAIL FROM:<>
            self.assertEqual(m["rcpts"], [SENDER])
        msg, status, headers = self.dsn_of(delayed)
        self.assertIn("Action: delayed", status)
        self.assertIn("Will-Retry-Until:", status)
        msg, status, headers = self.dsn_of(failed)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertIn("Final-Recipient: rfc822; rcpt@example.org", status)
        self.assertIn("Action: failed", status)
        self.assertIn("Status: 4.4.7", status)
        self.assertIn("Diagnostic-Code: smtp; 451 4.7.0 Try again later", status)
        self.assertIn("X-Smtpmux-Queue-ID: %s" % qid, status)
        self.assertIn("Subject: too late", headers)
        self.assertRegex(d.log_text(), r"id=%s user=%s .*status=expired queued=yes" % (qid, USER))
        self.assertRegex(d.log_text(), r"id=%s sender non-delivery notification: \w+" % qid)

    def test_permanent_refusal_during_retry_bounces(self):
        a = self.ds()
        a.handler.refuse["rcpt@example.org"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A")])
        qid = queue_id(send(d.port, USER, PASSWORD, msg=make_message("refused later"))[1])
        a.handler.refuse["rcpt@example.org"] = "550 5.1.1 No such user here"
        wait_until(lambda: a.handler.count() == 1, what="the failure notice")
        self.wait_empty(d)
        msg, status, headers = self.dsn_of(a.messages[0])
        self.assertIn("Status: 5.1.1", status)
        self.assertIn("Diagnostic-Code: smtp; 550 5.1.1 No such user here", status)
        self.assertIn("Subject: refused later", headers)
        self.assertRegex(d.log_text(), r"queue: id=%s user=.* status=bounced queued=yes" % qid)

    def test_no_notification_for_null_sender_or_without_bounce(self):
        a = self.ds()
        a.handler.refuse["rcpt@example.org"] = "451 4.3.0 Try again later"
        d = self.make([plain_downstream(a, name="A")], queue={"max_lifetime": 1})
        qid = queue_id(send(d.port, USER, PASSWORD, sender="")[1])
        d.wait_log("id=%s no notification: the sender is <>" % qid)
        self.wait_empty(d)
        config = json.loads(json.dumps(d.config))
        config["queue"]["bounce"] = False
        self.assertTrue(d.reload(config))
        qid = queue_id(send(d.port, USER, PASSWORD)[1])
        d.wait_log("id=%s no notification: queue.bounce is off" % qid)
        self.wait_empty(d)
        self.assertEqual(a.handler.count(), 0)

    # --- tools and figures -------------------------------------------------

    def test_queue_tools(self):
        a = self.ds()
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        port = free_port()
        d = self.make([plain_downstream(a, name="A")], queue={"min_backoff": 3600, "max_backoff": 3600},
                      status_listen="127.0.0.1:%d" % port)
        ids = [queue_id(send(d.port, USER, PASSWORD, msg=make_message("tool %d" % i))[1]) for i in range(3)]
        code, out = self.tool(d, "-s", "queue")
        self.assertEqual(code, 0, out)
        for qid in ids:
            self.assertRegex(out, r"%s +%s +<%s> +<rcpt@example.org> +\d+ +\d+s +1 +in \d+s +A: 451 4.3.0"
                             % (qid, USER, SENDER))
        self.assertIn("3 message(s)", out)
        self.assertEqual(self.tool(d, "-s", "hold", ids[0])[0], 0)
        self.assertRegex(self.tool(d, "-s", "queue")[1], r"%s .* held " % ids[0])
        a.handler.refuse.clear()
        code, out = self.tool(d, "-s", "flush")
        self.assertEqual(code, 0, out)
        wait_until(lambda: a.handler.count() == 2, what="the flushed messages")
        # Held: not flushed (the others leave once the runner has their 250).
        wait_until(lambda: self.queued_ids(d) == [ids[0]], what="the delivered ones to leave")
        self.assertEqual(a.handler.count(), 2)
        self.assertEqual(self.tool(d, "-s", "release", ids[0])[0], 0)
        self.assertEqual(self.tool(d, "-s", "flush", ids[0])[0], 0)
        wait_until(lambda: a.handler.count() == 3, what="the released message")
        self.wait_empty(d)
        a.handler.refuse["*"] = "451 4.3.0 Try again later"
        more = [queue_id(send(d.port, USER, PASSWORD, msg=make_message("gone %d" % i))[1]) for i in range(3)]
        code, out = self.tool(d, "-s", "delete", more[0])
        self.assertEqual(code, 0, out)
        self.assertEqual(self.queued_ids(d), sorted(more[1:]))
        self.assertEqual(self.tool(d, "-s", "delete", "all")[0], 0)
        self.assertEqual(self.queued_ids(d), [])
        self.assertEqual(d.log_text().count("status=deleted"), 3)
        # Figures.
        code, out = self.tool(d, "-s", "status")
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"QUEUE +0 message\(s\), 0 octets.* queued 6, delivered 3, .*deleted 3")
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=30) as r:
            metrics = r.read().decode()
        self.assertIn("smtpmux_queue_messages 0\n", metrics)
        self.assertIn("smtpmux_queue_delivered_total 3\n", metrics)
        self.assertIn("smtpmux_queue_deleted_total 3\n", metrics)
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=30) as r:
            page = r.read().decode()
        self.assertRegex(page, r'<section id="queue">[\s\S]*data-field="messages">0<')
        # Mistakes are reported.
        self.assertEqual(self.tool(d, "-s", "hold", "not-an-id")[0], 2)
        self.assertEqual(self.tool(d, "-s", "delete")[0], 2)
        code, out = self.tool(d, "-s", "release", "0123456789AB")
        self.assertEqual(code, 3)
        self.assertIn("no such message", out)


def spool_file(qid, body, user=USER):
    """A message file as a spool writer writes it (spool_format.h)."""
    head = ("SMTPMUX-SPOOL 1\nuser %s\nclient 127.0.0.1\narrived %d\nfrom <%s>\nrcpt <rcpt@example.org>\n"
            "size %d\nattempts 0\nwarned 0\n\n" % (user, int(time.time()), SENDER, len(body)))
    return head.encode() + body


if __name__ == "__main__":
    unittest.main()
