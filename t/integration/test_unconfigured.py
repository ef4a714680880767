# SPDX-License-Identifier: MIT
"""A configuration without users (the file as installed): smtpmuxd does not
run a relay, says why in one line, and exits 6, which LSB init scripts and
systemd report as "not configured"; a reload to such a file keeps the
running configuration."""

import json
import os
import subprocess

from harness import SMTPMUXD, DaemonTestCase, Downstream, free_port, plain_downstream, \
    read_banner, send, user_entry

NOT_CONFIGURED = 6
MESSAGE = ('no users defined, so there is nothing to relay: add the applications and their '
           'providers under "users:" (see smtpmux.yaml(5))')


class UnconfiguredTest(DaemonTestCase):

    def write(self, name, text):
        path = os.path.join(self.tmpdir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def no_users(self, port):
        return self.write("smtpmux.yaml", "listen: [\"127.0.0.1:%d\"]\nstate_file: %s\n"
                          "users: []\n" % (port, json.dumps(os.path.join(self.tmpdir, "state"))))

    def test_check_says_not_configured(self):
        path = self.no_users(free_port())
        res = subprocess.run([SMTPMUXD, "-t", "-c", path], capture_output=True, text=True, timeout=60)
        self.assertEqual(res.returncode, NOT_CONFIGURED, res.stderr)
        self.assertEqual(res.stderr, "%s: %s\n" % (path, MESSAGE))
        self.assertEqual(res.stdout, "")

    def test_start_does_not_listen(self):
        port = free_port()
        path = self.no_users(port)
        for mode in ("-f", None):         # in the foreground, and as a detached daemon
            cmd = [SMTPMUXD, "-c", path] + ([mode] if mode else [])
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            self.assertEqual(res.returncode, NOT_CONFIGURED, res.stderr)
            self.assertIn(MESSAGE, res.stderr)
            self.assertIsNone(read_banner(port))
            self.assertFalse(os.path.exists(os.path.join(self.tmpdir, "state")))

    def test_reload_to_no_users_keeps_running(self):
        ds = self.downstream()
        d = self.daemon({"allow_insecure_auth": True,
                         "users": [user_entry("app@example.com", "pw", [plain_downstream(ds)])]})
        config = dict(d.config, users=[])
        self.assertFalse(d.reload(config))
        self.assertIn("reload failed, keeping current configuration: %s: %s" % (d.config_path, MESSAGE),
                      d.log_text())
        self.assertEqual(send(d.port, "app@example.com", "pw")[0], 250)
        self.assertEqual(ds.handler.count(), 1)


if __name__ == "__main__":
    import unittest
    unittest.main()
