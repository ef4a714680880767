# SPDX-License-Identifier: MIT
"""OAuth 2.0 on loopback: a fake HTTPS token endpoint and an SMTP downstream
that accepts AUTH XOAUTH2 / OAUTHBEARER only with a token the endpoint issued
and that has not expired or been revoked.

Both share a TokenAuthority. Everything listens on 127.0.0.1; the endpoint's
certificate comes from the test's throwaway CA (certs.py).
"""

import base64
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from harness import READY_TIMEOUT, Downstream, RecordingHandler, free_port


class TokenAuthority:
    """The access tokens issued so far, each valid for `lifetime` seconds."""

    def __init__(self, lifetime=3600):
        self.lifetime = lifetime
        self.lock = threading.Lock()
        self.expiry = {}            # token -> time.monotonic() deadline
        self.issued = []            # (time.monotonic(), token), in order
        self.revoked = set()

    def issue(self, prefix="at"):
        token = "%s-%d-%s" % (prefix, len(self.issued) + 1, secrets.token_urlsafe(12))
        with self.lock:
            now = time.monotonic()
            self.expiry[token] = now + self.lifetime
            self.issued.append((now, token))
        return token

    def valid(self, token):
        with self.lock:
            deadline = self.expiry.get(token)
            return deadline is not None and token not in self.revoked and \
                time.monotonic() < deadline

    def revoke(self, token):
        with self.lock:
            self.revoked.add(token)

    def latest(self):
        with self.lock:
            return self.issued[-1][1] if self.issued else None

    def tokens(self):
        with self.lock:
            return [t for _, t in self.issued]


class TokenEndpoint:
    """POST /token with the refresh-token or client-credentials grant
    (RFC 6749 6 and 4.4). mode "ok" or "invalid_grant"; with rotate, each
    refresh-token grant returns a new refresh token and the old one stops
    working, as Microsoft's can."""

    def __init__(self, ca, authority, client_id="smtpmux-test-client",
                 client_secret="client-secret-XYZ", refresh_token="refresh-initial-ABC",
                 scope="https://mail.test/", rotate=False, mode="ok"):
        self.authority = authority
        self.client_id = client_id
        self.client_secret = client_secret
        self.refresh_token = refresh_token
        self.scope = scope
        self.rotate = rotate
        self.mode = mode
        self.lock = threading.Lock()
        self.requests = []          # the forms received, in order
        self.refresh_tokens = [refresh_token]
        self.port = free_port()
        cert, key = ca.issue("token-endpoint", dns_names=["localhost"], ips=["127.0.0.1"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as real endpoints: a refresh need not wait for a
            # TLS handshake (tokens here live a few seconds).
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode(),
                                             keep_blank_values=True, strict_parsing=True)
                form = {k: v[0] for k, v in form.items()}
                status, body = endpoint.answer(self.path, form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return "https://127.0.0.1:%d/token" % self.port

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def count(self):
        with self.lock:
            return len(self.requests)

    def secrets(self):
        """Everything that must never appear in a log."""
        with self.lock:
            return [self.client_secret] + list(self.refresh_tokens)

    def answer(self, path, form):
        with self.lock:
            self.requests.append(form)
            if path != "/token":
                return 404, {"error": "not_found"}
            if self.mode == "invalid_grant":
                return 400, {"error": "invalid_grant",
                             "error_description": "Token has been expired or revoked."}
            if form.get("client_id") != self.client_id or \
                    form.get("client_secret") != self.client_secret:
                return 401, {"error": "invalid_client"}
            if form.get("scope") != self.scope:
                return 400, {"error": "invalid_scope"}
            body = {"token_type": "Bearer", "expires_in": self.authority.lifetime}
            grant = form.get("grant_type")
            if grant == "refresh_token":
                if form.get("refresh_token") != self.refresh_token:
                    return 400, {"error": "invalid_grant",
                                 "error_description": "Token has been expired or revoked."}
                if self.rotate:
                    self.refresh_token = "refresh-%d-%s" % (len(self.refresh_tokens),
                                                            secrets.token_urlsafe(12))
                    self.refresh_tokens.append(self.refresh_token)
                    body["refresh_token"] = self.refresh_token
            elif grant != "client_credentials":
                return 400, {"error": "unsupported_grant_type"}
        body["access_token"] = self.authority.issue()
        return 200, body


class OAuthHandler(RecordingHandler):
    """AUTH XOAUTH2 and OAUTHBEARER against a TokenAuthority. A refused token
    gets the error continuation (334 + base64 JSON, RFC 7628 3.2.2); what
    the client answers to it is recorded, then 535."""

    def __init__(self, authority, user):
        super().__init__()
        self.authority = authority
        self.user = user
        self.attempts = []          # dicts: mech, user, token, ok, abort, host, port
        self.protocol_errors = []

    def _parse_xoauth2(self, raw):
        if not raw.endswith(b"\x01\x01"):
            raise ValueError("XOAUTH2 message does not end with ^A^A")
        fields = dict(f.split(b"=", 1) for f in raw[:-2].split(b"\x01"))
        return {"user": fields[b"user"].decode(), "auth": fields[b"auth"].decode()}

    def _parse_oauthbearer(self, raw):
        gs2, rest = raw.split(b"\x01", 1)
        if not gs2.startswith(b"n,a=") or not gs2.endswith(b","):
            raise ValueError("bad gs2 header %r" % gs2)
        user = gs2[4:-1].replace(b"=2C", b",").replace(b"=3D", b"=").decode()
        if not rest.endswith(b"\x01\x01"):
            raise ValueError("OAUTHBEARER message does not end with ^A^A")
        kv = dict(f.split(b"=", 1) for f in rest[:-2].split(b"\x01"))
        return {"user": user, "auth": kv[b"auth"].decode(), "host": kv[b"host"].decode(),
                "port": kv[b"port"].decode()}

    async def _auth(self, server, args, mech, parse, abort_expected):
        try:
            msg = parse(base64.b64decode(args[1], validate=True))
            scheme, token = msg["auth"].split(" ", 1)
            if scheme != "Bearer":
                raise ValueError("scheme %r" % scheme)
        except (IndexError, ValueError, KeyError) as e:
            self.protocol_errors.append("%s: %s" % (mech, e))
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad message")
        attempt = dict(msg, mech=mech, token=token, ok=False, abort=None)
        self.attempts.append(attempt)
        if msg["user"] == self.user and self.authority.valid(token):
            attempt["ok"] = True
            return AuthResult(success=True, auth_data=msg["user"])
        error = json.dumps({"status": "invalid_token", "schemes": "bearer",
                            "scope": "https://mail.test/"})
        attempt["abort"] = await server.challenge_auth(error)
        if attempt["abort"] != abort_expected:
            self.protocol_errors.append("%s: answered the error continuation with %r" %
                                        (mech, attempt["abort"]))
        return AuthResult(success=False, handled=False,
                          message="535 5.7.8 Username and Password not accepted")

    async def auth_XOAUTH2(self, server, args):
        return await self._auth(server, args, "XOAUTH2", self._parse_xoauth2, b"")

    async def auth_OAUTHBEARER(self, server, args):
        return await self._auth(server, args, "OAUTHBEARER", self._parse_oauthbearer, b"\x01")

    def accepted(self):
        return [a for a in self.attempts if a["ok"]]

    def refused(self):
        return [a for a in self.attempts if not a["ok"]]


class OAuthDownstream(Downstream):
    """An aiosmtpd server that requires AUTH with a valid token (no TLS:
    the daemon's config says `tls: none` for it explicitly)."""

    def __init__(self, authority, user, offer=("XOAUTH2", "OAUTHBEARER")):
        # Downstream's addr, messages, start and stop; its own handler and controller.
        self.handler = OAuthHandler(authority, user)
        self.port = free_port()
        exclude = [m for m in ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER") if m not in offer]
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=READY_TIMEOUT, auth_required=True,
                                     auth_require_tls=False, auth_exclude_mechanism=exclude)
