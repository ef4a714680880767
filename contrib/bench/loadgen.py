# SPDX-License-Identifier: MIT
"""A small asyncio SMTP load generator for contrib/bench (stdlib only).

Sends MESSAGES messages of SIZE bytes over CONNS concurrent connections,
reusing each connection (RSET-free: one transaction after another), with
optional AUTH PLAIN; with --session-per-message every message gets its own
connection, EHLO and QUIT, as a relay without a connection cache does it.
Prints one JSON line: messages, seconds, msgs_per_s.
"""

import argparse
import asyncio
import base64
import json
import time


async def reply(reader):
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def expect(reader, codes):
    code, line = await reply(reader)
    if code not in codes:
        raise RuntimeError("unexpected reply: %r" % line)


async def session(args, count, body):
    reader, writer = await asyncio.open_connection(args.host, args.port)
    await expect(reader, (220,))
    writer.write(b"EHLO bench.test\r\n")
    await expect(reader, (250,))
    if args.user:
        token = base64.b64encode(b"\0" + args.user.encode() + b"\0" + args.password.encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        await expect(reader, (235,))
    for _ in range(count):
        writer.write(b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.org>\r\nDATA\r\n")
        await expect(reader, (250,))
        await expect(reader, (250,))
        await expect(reader, (354,))
        writer.write(body + b".\r\n")
        await expect(reader, (250,))
    writer.write(b"QUIT\r\n")
    await expect(reader, (221,))
    writer.close()
    await writer.wait_closed()


async def worker(args, count, body):
    if not args.session_per_message:
        await session(args, count, body)
        return
    for _ in range(count):
        await session(args, 1, body)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, default=20)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--session-per-message", action="store_true")
    args = p.parse_args()
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * max(1, args.size // len(line))
    per = [args.messages // args.conns + (1 if i < args.messages % args.conns else 0) for i in range(args.conns)]
    start = time.monotonic()
    await asyncio.gather(*(worker(args, n, body) for n in per))
    secs = time.monotonic() - start
    print(json.dumps({"messages": args.messages, "seconds": round(secs, 3),
                      "msgs_per_s": round(args.messages / secs, 1)}))


if __name__ == "__main__":
    asyncio.run(main())
