# SPDX-License-Identifier: MIT
"""Throwaway test certificates, made with certtool at test time (never committed)."""

import os
import ssl
import subprocess


def _certtool(*args):
    subprocess.run(["certtool", *args], check=True, capture_output=True)


def _template(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class TestCA:
    """A CA in dirpath that issues server certificates for given names."""

    def __init__(self, dirpath, name="smtpmux test CA"):
        self.dir = dirpath
        os.makedirs(dirpath, exist_ok=True)
        self.key = os.path.join(dirpath, "ca.key")
        self.cert = os.path.join(dirpath, "ca.pem")
        tmpl = os.path.join(dirpath, "ca.tmpl")
        _template(tmpl, ['cn = "%s"' % name, "ca", "cert_signing_key", "expiration_days = 2"])
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", self.key)
        _certtool("--generate-self-signed", "--load-privkey", self.key, "--template", tmpl,
                  "--outfile", self.cert)

    def issue(self, stem, dns_names=(), ips=(), client=False):
        """Returns (cert, key) paths for a server certificate (a client's
        with client=True)."""
        key = os.path.join(self.dir, stem + ".key")
        cert = os.path.join(self.dir, stem + ".pem")
        tmpl = os.path.join(self.dir, stem + ".tmpl")
        names = list(dns_names) or ["localhost"]
        lines = ['cn = "%s"' % names[0], "tls_www_client" if client else "tls_www_server",
                 "encryption_key", "signing_key", "expiration_days = 2"]
        lines += ['dns_name = "%s"' % n for n in names]
        lines += ['ip_address = "%s"' % ip for ip in ips]
        _template(tmpl, lines)
        _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", key)
        _certtool("--generate-certificate", "--load-privkey", key, "--load-ca-certificate", self.cert,
                  "--load-ca-privkey", self.key, "--template", tmpl, "--outfile", cert)
        return cert, key

    def client_context(self):
        """An ssl context that trusts only this CA (clients of smtpmuxd)."""
        ctx = ssl.create_default_context(cafile=self.cert)
        ctx.check_hostname = False
        return ctx

    def server_context(self, cert, key):
        """An ssl context for a TLS downstream (aiosmtpd)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx


def peer_cert_fingerprint(sock):
    """SHA-256 of the certificate the server presented."""
    import hashlib
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def file_fingerprint(pem_path):
    import hashlib
    with open(pem_path) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    return hashlib.sha256(der).hexdigest()
