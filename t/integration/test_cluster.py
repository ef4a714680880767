# SPDX-License-Identifier: MIT
"""Several instances sharing quotas, health and rotation through Redis.

A real redis-server (redis_server.py) and two smtpmuxd instances with
their own ports, state files and logs, the downstreams real aiosmtpd
servers; what arrives there is what is checked.
"""

import copy
import os
import re
import signal
import subprocess
import time
import unittest

from certs import TestCA
from harness import (SMTPMUXD, Daemon, DaemonTestCase, free_port, make_message, plain_downstream,
                     send, user_entry, wait_until)
from redis_server import RedisServer

USER, PASSWORD = "app@example.com", "app-password"


class ClusterTestCase(DaemonTestCase):
    def redis(self, **kwargs):
        r = RedisServer(self.tmpdir, **kwargs).start()
        self.addCleanup(r.stop)
        return r

    def cluster(self, redis, **extra):
        c = {"redis": redis.url, "retry_interval": 1, "timeout_ms": 1000}
        c.update(extra)
        return c

    def instance(self, name, config):
        """One smtpmuxd of the cluster, in a folder of its own."""
        folder = os.path.join(self.tmpdir, name)
        os.makedirs(folder, exist_ok=True)
        # Its queue is in there: the workers' user must get through.
        os.chmod(self.tmpdir, 0o711)
        d = Daemon(folder, config)
        self.addCleanup(self._stop_instance, d, folder)
        return d.start()

    def _stop_instance(self, d, folder):
        saved = self.tmpdir
        self.tmpdir = folder              # where its valgrind reports are
        try:
            self._stop_daemon(d)
        finally:
            self.tmpdir = saved

    def wait_linked(self, *daemons):
        """Every worker of every daemon has its link to Redis up."""
        for d in daemons:
            wait_until(lambda: "link up in %d of %d workers" % (d.config["workers"], d.config["workers"])
                       in d.status(), what="the cluster link of %s" % d.config_path)

    def pair(self, redis, users, **cfg):
        base = {"allow_insecure_auth": True, "workers": 2, "users": users,
                "cluster": self.cluster(redis)}
        base.update(cfg)
        a = self.instance("a", copy.deepcopy(base))
        b = self.instance("b", copy.deepcopy(base))
        self.wait_linked(a, b)
        return a, b

    def send_to(self, daemon, i):
        return send(daemon.port, USER, PASSWORD, msg=make_message(subject="message %d" % i))

    def tool(self, daemon, *args):
        res = subprocess.run([SMTPMUXD, "-c", daemon.config_path] + list(args), env=daemon.env,
                             capture_output=True, text=True, timeout=60)
        return res.returncode, res.stdout + res.stderr

    def due_in(self, daemon, qid):
        """Seconds until the queued message qid's next attempt (`-s queue`)."""
        code, out = self.tool(daemon, "-s", "queue")
        self.assertEqual(code, 0, out)
        return int(re.search(r"\bin (-?\d+)s\b", out.split(qid)[1]).group(1))


class TestSharedQuota(ClusterTestCase):
    def test_max_per_hour_is_exact_across_instances(self):
        """30 messages sent alternately to two instances: a `max_per_hour: 10`
        downstream receives exactly 10 (each instance alone would let 10 through)."""
        redis = self.redis()
        ds = self.downstream()
        # Without the queue: the quota's verdict is the reply itself.
        a, b = self.pair(redis, [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=10)])],
                         queue={"enabled": False})
        codes = [self.send_to(a if i % 2 == 0 else b, i)[0] for i in range(30)]
        self.assertEqual(codes.count(250), 10, codes)
        self.assertEqual(codes.count(451), 20, codes)
        self.assertEqual(ds.handler.count(), 10)
        # The cluster's window holds them; each instance's own holds its share.
        key = "smtpmux:ds:{%s}:hour" % ds.addr
        self.assertEqual(redis.command("ZCARD", key), 10)

    def test_the_queue_runner_keeps_to_the_cluster_quota(self):
        """A message one instance queued because the cluster's window is full
        is not delivered by its queue runner's retries either: the runner
        asks the cluster as the workers do (its own window is empty)."""
        redis = self.redis()
        ds = self.downstream()
        a, b = self.pair(redis, [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=1)])],
                         queue={"min_backoff": 1, "max_backoff": 1})
        self.assertEqual(self.send_to(a, 0)[0], 250)
        self.assertEqual(ds.handler.count(), 1)
        code, text = self.send_to(b, 1)
        self.assertEqual(code, 250)
        self.assertIn(b"queued as", text)
        qid = text.split(b"queued as ")[1].split()[0].decode()
        # Due when the cluster's window has room (a's delivery leaves the
        # hour), not after min_backoff: b's own window is empty.
        self.assertAlmostEqual(self.due_in(b, qid), 3600, delta=5)
        # A retry now by b's runner is refused by the cluster's window too,
        # and waits for the same moment.
        code, out = self.tool(b, "-s", "flush", qid)
        self.assertEqual(code, 0, out)
        line = b.wait_log("id=%s deferred: next attempt in" % qid) and \
            re.search(r"id=%s deferred: next attempt in (\d+) s \(([^)]*)\)" % qid, b.log_text())
        self.assertEqual(line.group(2), "when a quota window reopens")
        self.assertAlmostEqual(int(line.group(1)), 3600, delta=5)
        self.assertEqual(ds.handler.count(), 1)
        self.assertEqual(redis.command("ZCARD", "smtpmux:ds:{%s}:hour" % ds.addr), 1)
        spooled = os.listdir(os.path.join(b.config["queue"]["dir"], "msg"))
        self.assertEqual(len([n for n in spooled if not n.endswith(".state")]), 1, spooled)

    def test_queued_by_the_cluster_quota_is_delivered_when_its_window_reopens(self):
        """Two a minute for both instances, four messages sent alternately:
        the two each instance queues behind the cluster's full window (its
        own holds one of two) are delivered the moment the cluster's window
        has room, not after min_backoff (300 s), and no 60 s see a third."""
        redis = self.redis()
        ds = self.downstream()
        arrivals = []
        data = ds.handler.handle_DATA

        async def timed(server, session, envelope):
            reply = await data(server, session, envelope)
            arrivals.append(time.time())
            return reply
        ds.handler.handle_DATA = timed
        a, b = self.pair(redis, [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_minute=2)])],
                         queue={"min_backoff": 300, "max_backoff": 300})
        replies = [self.send_to(a if i % 2 == 0 else b, i) for i in range(4)]
        self.assertEqual([c for c, _ in replies], [250] * 4, replies)
        self.assertEqual([b"deferred" in t for _, t in replies], [False, False, True, True], replies)
        queued = [(d, t.split(b"queued as ")[1].split()[0].decode())
                  for d, (_, t) in zip((a, b), replies[2:])]
        self.assertEqual(len(arrivals), 2)
        # Each scheduled for when the first delivery leaves the cluster's window.
        for d, qid in queued:
            self.assertLessEqual(self.due_in(d, qid), 61)
        wait_until(lambda: len(arrivals) == 4, timeout=120, what="the cluster's window to reopen")
        got = sorted(int(re.search(rb"Subject: message (\d+)", m["data"]).group(1))
                     for m in ds.messages)
        self.assertEqual(got, [0, 1, 2, 3])
        for i in (0, 1):
            # the cluster counts in milliseconds, the runner wakes on whole seconds
            self.assertGreater(arrivals[i + 2] - arrivals[i], 59.5, arrivals)
            # and soon after the reopening, long before min_backoff (300 s),
            # with room for a slow machine (valgrind, a loaded CI)
            self.assertLess(arrivals[i + 2] - arrivals[i], 60 + 30, arrivals)
        # A runner whose retry found the window full again (another instance
        # took the place first) waited for the cluster's next reopening too.
        for d in (a, b):
            self.assertNotIn("(backoff)", d.log_text())
        self.assertEqual(redis.command("ZCARD", "smtpmux:ds:{%s}:minute" % ds.addr), 2)


class TestSharedHealth(ClusterTestCase):
    def test_dead_downstream_found_by_one_is_skipped_by_the_other(self):
        redis = self.redis()
        ok = self.downstream()
        dead = "127.0.0.1:%d" % free_port()       # nothing listens there
        users = [user_entry(USER, PASSWORD, [plain_downstream(dead, name="dead"),
                                             plain_downstream(ok, name="ok")],
                            selector="failover")]
        a, b = self.pair(redis, users, health={"fail_threshold": 2, "cooldown": 600})
        for i in range(2):
            self.assertEqual(self.send_to(a, i)[0], 250)
        self.assertEqual(a.log_text().count("relay=dead["), 2)
        for i in range(2, 5):
            self.assertEqual(self.send_to(b, i)[0], 250)
        self.assertEqual(ok.handler.count(), 5)
        # b never tried it: another instance had found it dead.
        self.assertNotIn("relay=dead[", b.log_text())
        self.assertIn("attempts=1 status=sent", b.log_text())


class TestSharedRotation(ClusterTestCase):
    def test_round_robin_alternates_across_instances(self):
        redis = self.redis()
        d1, d2 = self.downstream(), self.downstream()
        users = [user_entry(USER, PASSWORD, [plain_downstream(d1), plain_downstream(d2)])]
        a, b = self.pair(redis, users)
        for i in range(10):
            self.assertEqual(self.send_to(a if i % 2 == 0 else b, i)[0], 250)

        def numbers(ds):
            return sorted(int(re.search(rb"Subject: message (\d+)", m["data"]).group(1))
                          for m in ds.messages)
        got = [numbers(d1), numbers(d2)]
        # One counter for both instances: strictly every other message.
        self.assertIn(got, ([[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]], [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]))


class TestRedisDown(ClusterTestCase):
    def test_killing_redis_loses_nothing_and_restarting_restores_sharing(self):
        redis = self.redis()
        ds = self.downstream()
        a, b = self.pair(redis, [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=10)])],
                         queue={"enabled": False})
        n = 0
        for _ in range(4):
            self.assertEqual(self.send_to(a if n % 2 == 0 else b, n)[0], 250)
            n += 1
        redis.kill()
        for d in (a, b):
            d.wait_log("cluster: link to %s lost" % redis.url)
        # Redis is gone: every message is still relayed, each instance
        # deciding alone.
        for _ in range(4):
            self.assertEqual(self.send_to(a if n % 2 == 0 else b, n)[0], 250)
            n += 1
        self.assertEqual(ds.handler.count(), 8)
        # Back, empty (no persistence): each instance counts its own 4 again.
        redis.start()
        self.wait_linked(a, b)
        for d in (a, b):
            d.wait_log("is back")
        codes = []
        for _ in range(6):
            codes.append(self.send_to(a if n % 2 == 0 else b, n)[0])
            n += 1
        self.assertEqual(codes.count(250), 2, codes)
        self.assertEqual(ds.handler.count(), 10)

    def test_a_stuck_redis_delays_a_message_by_one_timeout_at_most(self):
        redis = self.redis()
        ds = self.downstream()
        users = [user_entry(USER, PASSWORD, [plain_downstream(ds)])]
        a = self.instance("a", {"allow_insecure_auth": True, "workers": 1, "users": users,
                                "cluster": self.cluster(redis, timeout_ms=300)})
        self.wait_linked(a)
        redis.kill(signal.SIGSTOP)
        try:
            self.assertEqual(self.send_to(a, 0)[0], 250)
            a.wait_log("no answer within 300 ms")
            self.assertEqual(self.send_to(a, 1)[0], 250)
        finally:
            redis.kill(signal.SIGCONT)
        self.assertEqual(ds.handler.count(), 2)
        self.wait_linked(a)
        self.assertEqual(self.send_to(a, 2)[0], 250)
        self.assertEqual(ds.handler.count(), 3)


class TestTLS(ClusterTestCase):
    """rediss://: a redis-server that speaks only TLS, reached through the
    link's GnuTLS bridge."""

    def setUp(self):
        super().setUp()
        self.ca = TestCA(os.path.join(self.tmpdir, "ca"))

    def test_shared_quota_over_tls_is_exact_across_instances(self):
        redis = self.redis(tls=self.ca)
        ds = self.downstream()
        users = [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=4)])]
        # Where the bridges' private sockets are made (a /tmp for `nobody`).
        tmp = os.path.join(self.tmpdir, "tmp")
        os.makedirs(tmp)
        os.chmod(tmp, 0o1777)
        a, b = self.pair(redis, users, queue={"enabled": False}, tmp_dir=tmp,
                         cluster=self.cluster(redis, tls_ca=self.ca.cert))
        a.wait_log("cluster: connected to rediss://127.0.0.1:%d/0 (Redis " % redis.port)
        codes = [self.send_to(a if i % 2 == 0 else b, i)[0] for i in range(10)]
        self.assertEqual(codes.count(250), 4, codes)
        self.assertEqual(codes.count(451), 6, codes)
        self.assertEqual(ds.handler.count(), 4)
        self.assertEqual(redis.command("ZCARD", "smtpmux:ds:{%s}:hour" % ds.addr), 4)
        # Each socket went away once hiredis was connected to it.
        self.assertEqual(os.listdir(tmp), [])

    def test_untrusted_certificate_keeps_the_link_down_and_mail_flowing(self):
        redis = self.redis(tls=self.ca)
        other = TestCA(os.path.join(self.tmpdir, "other"), "untrusted CA")
        ds = self.downstream()
        users = [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=1)])]
        a = self.instance("a", {"allow_insecure_auth": True, "workers": 1, "users": users,
                                "queue": {"enabled": False},
                                "cluster": self.cluster(redis, tls_ca=other.cert)})
        a.wait_log("cluster: cannot reach %s (TLS to 127.0.0.1: certificate verify failed"
                   % redis.url)
        self.assertIn("link down in 0 of 1 workers", a.status())
        # Decided locally: the instance's own quota, nothing in Redis.
        self.assertEqual([self.send_to(a, i)[0] for i in range(2)], [250, 451])
        self.assertEqual(ds.handler.count(), 1)
        self.assertEqual(redis.command("DBSIZE"), 0)
        self.assertNotIn("cluster: connected", a.log_text())

    def test_client_certificate_for_tls_auth_clients(self):
        redis = self.redis(tls=self.ca, auth_clients=True)
        cert, key = self.ca.issue("smtpmux-client", ["smtpmux"], client=True)
        ds = self.downstream()
        users = [user_entry(USER, PASSWORD, [plain_downstream(ds, max_per_hour=5)])]
        a = self.instance("a", {"allow_insecure_auth": True, "workers": 1, "users": users,
                                "cluster": self.cluster(redis, tls_ca=self.ca.cert,
                                                        tls_cert=cert, tls_key=key)})
        self.wait_linked(a)
        self.assertEqual(self.send_to(a, 0)[0], 250)
        self.assertEqual(ds.handler.count(), 1)
        self.assertEqual(redis.command("ZCARD", "smtpmux:ds:{%s}:hour" % ds.addr), 1)


if __name__ == "__main__":
    unittest.main()
