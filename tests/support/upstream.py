#!/usr/bin/python3
"""A scriptable upstream smart host for the tests, on aiosmtpd (Debian python3-aiosmtpd).

Every message is written to OUT/NNNN.eml (bytes as received, dot-unstuffed) with
OUT/NNNN.json (envelope, options, TLS). Per-recipient replies, greylisting and STARTTLS
are set from the command line. Prints "READY <port>" once listening.
"""
import argparse
import asyncio
import json
import os
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Handler:
    def __init__(self, out, replies, greylist, data_reply, data_delay=0.0, serial=False):
        self.out = out
        self.data_delay = data_delay
        # A saturated server: one message's delay at a time, the others wait their turn.
        self.serial = asyncio.Lock() if serial else None
        self.replies = replies
        self.greylist = greylist
        self.data_reply = data_reply
        self.seen = set()
        self.lock = threading.Lock()
        # Restarted on the same OUT (a smart host back from an outage): numbering goes
        # on after what the earlier run wrote, so nothing is overwritten.
        self.count = len([n for n in os.listdir(out) if n.endswith(".eml")])

    def log(self, entry):
        with self.lock, open(os.path.join(self.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.replies.get(address.lower())
        if reply is None and self.greylist:
            key = (envelope.mail_from, address.lower())
            if key not in self.seen:
                self.seen.add(key)
                reply = "451 4.7.1 Greylisted, please try again later"
        self.log({"event": "rcpt", "from": envelope.mail_from, "to": address, "reply": reply or "250"})
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_QUIT(self, server, session, envelope):
        self.log({"event": "quit", "peer": session.peer[0]})
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.count += 1
            n = self.count
        base = os.path.join(self.out, "%04d" % n)
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content)
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": envelope.mail_options,
            "rcpt_tos": envelope.rcpt_tos,
            "rcpt_options": envelope.rcpt_options,
            "tls": session.ssl is not None,
            "peer": session.peer[0],
            "auth": session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None,
        }
        with open(base + ".json", "w") as f:
            json.dump(meta, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        # Kept from the final dot on, as a real server does; a slow answer after that
        # is where a client that gives up too early delivers twice.
        if self.serial is not None:
            async with self.serial:
                await asyncio.sleep(self.data_delay)
        elif self.data_delay:
            await asyncio.sleep(self.data_delay)
        return self.data_reply


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reply", action="append", default=[], help="address=CODE text")
    p.add_argument("--greylist", action="store_true")
    p.add_argument("--data-reply", default="250 2.0.0 Ok: queued")
    p.add_argument("--data-delay", type=float, default=0.0, help="seconds before the reply to the final dot")
    p.add_argument("--serial", action="store_true", help="one --data-delay at a time across sessions")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--no-smtputf8", action="store_true")
    p.add_argument("--auth", help="require AUTH with USER:PASS")
    p.add_argument("--data-size-limit", type=int, default=33554432, help="octets (aiosmtpd's default: 32 MiB)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    replies = {}
    for r in args.reply:
        addr, _, text = r.partition("=")
        replies[addr.lower()] = text
    handler = Handler(args.out, replies, args.greylist, args.data_reply, args.data_delay, args.serial)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    auth = {}
    if args.auth:
        user, _, password = args.auth.partition(":")

        def authenticator(server, session, envelope, mechanism, data):
            ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == password
            handler.log({"event": "auth", "mechanism": mechanism, "ok": ok})
            # handled=False: let aiosmtpd send the 535 itself.
            return AuthResult(success=ok, handled=False, auth_data=data)

        auth = dict(authenticator=authenticator, auth_required=True, auth_require_tls=False)
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=args.port,
        tls_context=tls,
        require_starttls=False,
        enable_SMTPUTF8=not args.no_smtputf8,
        decode_data=False,
        ident="upstream.test ESMTP",
        data_size_limit=args.data_size_limit,
        **auth,
    )
    controller.start()
    print("READY %d" % args.port, flush=True)
    try:
        sys.stdin.read()
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
