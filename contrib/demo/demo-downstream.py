# SPDX-License-Identifier: MIT
"""A demo downstream provider for `make run`: a real SMTP server (aiosmtpd)
on 127.0.0.1 that prints a one-line summary of every message it accepts."""

import asyncio
import sys

from aiosmtpd.controller import Controller


class PrintingHandler:
    def __init__(self, name):
        self.name = name

    async def handle_DATA(self, server, session, envelope):
        subject = b""
        for line in envelope.original_content.split(b"\r\n"):
            if line.lower().startswith(b"subject:"):
                subject = line[8:].strip()
                break
        print("[%s] accepted from=<%s> to=%s size=%d subject=%s" % (
            self.name, envelope.mail_from, ",".join(envelope.rcpt_tos),
            len(envelope.original_content), subject.decode("utf-8", "replace")), flush=True)
        return "250 2.0.0 OK: accepted by %s" % self.name


def main():
    name, port = sys.argv[1], int(sys.argv[2])
    controller = Controller(PrintingHandler(name), hostname="127.0.0.1", port=port)
    controller.start()
    print("[%s] demo downstream listening on 127.0.0.1:%d" % (name, port), flush=True)
    try:
        asyncio.new_event_loop().run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
