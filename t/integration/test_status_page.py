# SPDX-License-Identifier: MIT
"""The status page on status_listen (GET /), as a browser shows it.

The real daemon relays through a real downstream while another one is
dead; the page is fetched over HTTP (its headers, well-formed as XML, no
secret in it) and rendered in Debian's headless Chromium, driven over the
DevTools protocol on a pipe (--remote-debugging-pipe, so only Python's
standard library is needed): the rendered DOM has each user's downstreams
with their state, the state's colour and the quota bar as computed by the
browser, and the page loaded nothing but itself.
"""

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import unittest
import urllib.request
import xml.etree.ElementTree as ET

from harness import READY_TIMEOUT, DaemonTestCase, free_port, make_message, plain_downstream, \
    send, user_entry, wait_until

CHROMIUM = shutil.which("chromium")
SECRETS = ("app-secret-1", "app-secret-2", "ds-secret-3", "ds-login-4")


class DevTools:
    """Headless Chromium and the DevTools protocol over its pipe: JSON
    messages ended by NUL, we write on its fd 3 and read its fd 4."""

    def __init__(self, profile):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        cmd = ("exec %s --headless --no-sandbox --disable-gpu --disable-background-networking "
               "--no-first-run --no-default-browser-check --remote-debugging-pipe "
               "--user-data-dir=%s about:blank 3<&%d 4>&%d"
               % (CHROMIUM, profile, to_chrome_r, from_chrome_w))
        # bash: dash takes only one-digit fds in redirections.
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_chrome_r, from_chrome_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id = 0
        self.pending = b""
        self.events = []

    def close(self):
        for fd in (self.to_chrome, self.from_chrome):
            os.close(fd)
        self.proc.terminate()
        try:
            self.proc.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _read_message(self, deadline):
        while b"\0" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise AssertionError("no answer from Chromium")
            chunk = os.read(self.from_chrome, 65536)
            if not chunk:
                raise AssertionError("Chromium closed its DevTools pipe")
            self.pending += chunk
        raw, self.pending = self.pending.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method, session=None, **params):
        """Sends a command; returns its result, keeping events for later."""
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError("%s: %s" % (method, reply["error"]))
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method):
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_message(deadline))

    def open(self, url):
        """Loads url in a new tab; returns the session to talk to it."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session)
        self.call("Network.enable", session)
        self.call("Page.navigate", session, url=url)
        self.wait_event("Page.loadEventFired")
        return session

    def evaluate(self, session, expression):
        res = self.call("Runtime.evaluate", session, expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise AssertionError("evaluation failed: %s" % res["exceptionDetails"])
        return res["result"]["value"]


# What the test reads from the rendered page, in the browser.
READ_PAGE = """JSON.stringify({
  scripts: document.scripts.length,
  refresh: (document.querySelector('meta[http-equiv="refresh"]') || {}).content,
  users: Array.from(document.querySelectorAll('section.user')).map(s => ({
    email: s.querySelector('h2').textContent,
    downstreams: Array.from(s.querySelectorAll('tr.downstream')).map(tr => {
      const state = tr.querySelector('.state');
      const bar = tr.querySelector('.window[data-window="day"] .bar');
      return {
        name: tr.querySelector('.name').textContent,
        addr: tr.querySelector('.addr').textContent,
        state: state.textContent,
        colour: getComputedStyle(state).backgroundColor,
        inFlight: tr.querySelector('[data-field="in-flight"]').textContent,
        error: tr.querySelector('.err').textContent,
        day: bar ? bar.querySelector('span').getBoundingClientRect().width /
                   bar.getBoundingClientRect().width : null,
        dayColour: bar ? getComputedStyle(bar.querySelector('span')).backgroundColor : null,
      };
    }),
  })),
  queue: document.getElementById('queue') !== null,
})"""


@unittest.skipUnless(CHROMIUM, "needs Debian's chromium (make deps check)")
class StatusPageTest(DaemonTestCase):

    def setUp(self):
        super().setUp()
        good = self.downstream()
        self.dead_port = free_port()               # nothing listens there
        self.status_port = free_port()
        dead = {"name": "dead", "addr": "127.0.0.1:%d" % self.dead_port, "tls": "none",
                "user": "ds-login-4", "pass": "ds-secret-3"}
        self.d = self.daemon({
            "allow_insecure_auth": True,
            "status_listen": "127.0.0.1:%d" % self.status_port,
            "health": {"fail_threshold": 1, "cooldown": 600},
            "users": [
                user_entry("app@example.com", "app-secret-1",
                           [dead, plain_downstream(good, name="good", max_per_day=5)],
                           selector="failover.so"),
                user_entry("other@example.com", "app-secret-2",
                           [plain_downstream(good, name="shared <good>", max_per_day=5)]),
            ]})
        # The dead one fails (its circuit opens), the good one takes it.
        self.assertEqual(send(self.d.port, "app@example.com", "app-secret-1")[0], 250)
        self.assertEqual(good.handler.count(), 1)
        self.url = "http://127.0.0.1:%d/" % self.status_port

    def fetch(self):
        def get():
            try:
                with urllib.request.urlopen(self.url, timeout=10) as r:
                    return r.status, dict(r.headers), r.read()
            except OSError:
                return None
        return wait_until(get, what="the status page")

    def test_page_over_http(self):
        status, headers, body = self.fetch()
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertIn("default-src 'none'", headers["Content-Security-Policy"])
        self.assertEqual(headers["Cache-Control"], "no-store")
        # Well-formed (XML), and never a password or a provider login.
        root = ET.fromstring(body)
        self.assertEqual(root.tag, "html")
        text = body.decode()
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        rows = root.findall(".//tr[@class='downstream']")
        self.assertEqual([r.get("data-state") for r in rows], ["down", "up", "up"])

    def test_rendered_in_chromium(self):
        self.fetch()                                   # the prober serves it
        profile = tempfile.mkdtemp(prefix="smtpmux-chromium-")
        self.addCleanup(shutil.rmtree, profile, ignore_errors=True)
        browser = DevTools(profile)
        self.addCleanup(browser.close)
        session = browser.open(self.url)
        page = json.loads(browser.evaluate(session, READ_PAGE))
        requests = [e["params"]["request"]["url"] for e in browser.events
                    if e.get("method") == "Network.requestWillBeSent"]
        self.assertEqual(requests, [self.url])          # nothing but the page itself
        self.assertEqual(page["scripts"], 0)
        self.assertEqual(page["refresh"], "10")
        self.assertTrue(page["queue"])                  # the queue's figures
        self.assertEqual([u["email"] for u in page["users"]], ["app@example.com", "other@example.com"])
        dead, good = page["users"][0]["downstreams"]
        shared, = page["users"][1]["downstreams"]
        self.assertEqual((dead["name"], dead["state"]), ("dead", "down"))
        self.assertEqual(dead["colour"], "rgb(198, 40, 40)")          # red
        self.assertEqual(dead["addr"], "127.0.0.1:%d" % self.dead_port)
        self.assertRegex(dead["error"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC.*(?i:refused)")
        self.assertIsNone(dead["day"])                  # no quota: no bar
        self.assertEqual((good["name"], good["state"]), ("good", "up"))
        self.assertEqual(good["colour"], "rgb(46, 125, 50)")           # green
        self.assertEqual(good["inFlight"], "0")
        self.assertAlmostEqual(good["day"], 1 / 5, places=2)          # 1 of 5 today
        self.assertEqual(good["dayColour"], "rgb(67, 160, 71)")
        # Another user's view of the same provider account: same counters.
        self.assertEqual(shared["name"], "shared <good>")
        self.assertAlmostEqual(shared["day"], 1 / 5, places=2)


class QueueSectionTest(DaemonTestCase):
    """The page's queue section shows the queue's figures as they are."""

    def queue_figures(self, url):
        def get():
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    return r.read()
            except OSError:
                return None
        root = ET.fromstring(wait_until(get, what="the status page"))
        section = root.find(".//section[@id='queue']")
        self.assertIsNotNone(section)
        return {dd.get("data-field"): "".join(dd.itertext()) for dd in section.iter("dd")}

    def test_queued_then_delivered(self):
        ds = self.downstream(fault="rcpt_451")           # refuses for now, temporarily
        status_port = free_port()
        d = self.daemon({"allow_insecure_auth": True,
                         "status_listen": "127.0.0.1:%d" % status_port,
                         "queue": {"min_backoff": 1, "max_backoff": 1},
                         "users": [user_entry("app@example.com", "app-secret-1",
                                              [plain_downstream(ds)])]})
        url = "http://127.0.0.1:%d/" % status_port
        msg = make_message(subject="waits")
        code, text = send(d.port, "app@example.com", "app-secret-1", msg=msg)
        self.assertEqual(code, 250)
        self.assertIn(b"queued as", text)
        got = self.queue_figures(url)
        self.assertEqual(got["messages"], "1")
        self.assertGreaterEqual(int(got["bytes"].split()[0]), len(msg))
        self.assertNotEqual(got["oldest"], "none")
        self.assertEqual((got["delivered"], got["bounced"], got["expired"]), ("0", "0", "0"))
        ds.handler.fault = None
        wait_until(lambda: self.queue_figures(url)["delivered"] == "1",
                   what="the page to count the delivery from the queue")
        got = self.queue_figures(url)
        self.assertEqual((got["messages"], got["bytes"], got["oldest"]), ("0", "0 octets", "none"))
        self.assertEqual(ds.handler.count(), 1)


if __name__ == "__main__":
    unittest.main()
