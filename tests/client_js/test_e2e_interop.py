"""End-to-end encryption across the two implementations, with fresh random keys on both sides: envelopes sealed
by the JS core (client/js/e2e.js, under Node, with non-extractable WebCrypto keys) open in wire/e2e.py, and
envelopes sealed by wire/e2e.py open in the JS core; key records made by each verify in the other (for their
own mailbox only); fingerprints and safety numbers agree; a failing envelope gives the same reason in both.
The golden vectors (tests/vectors/e2e.json) pin fixed bytes; this test checks what fixed inputs cannot: keys
made by each side's own generator. The JS half is tests/client_js/e2e_interop.mjs, one JSON line each way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import trio

from wire import e2e

from ..conftest import require_service

SCRIPT = Path(__file__).with_name("e2e_interop.mjs")
JS_DIR = Path(__file__).resolve().parents[2] / "client" / "js"
TIMEOUT_S = 60
"""Node's start and a few dozen WebCrypto operations: well under a second here."""
BODIES = [
    (b"", 256),
    (b"hello from python's side", 256),
    (os.urandom(255), 256),
    (os.urandom(256), 256),
    ("\u00e9t\u00e9 \u2603 \U0001f600".encode(), 1),
    (os.urandom(3000), 1024),
]
"""(body, pad_block): empty, short, pad_block - 1 and pad_block bytes, non-ASCII text with no padding, a long one."""


def _record_json(record: e2e.KeyRecord) -> dict[str, str]:
    return {"ik": record.ik.hex(), "kid": record.kid, "ek": record.ek.hex(), "sig": record.sig.hex()}


def _record(d: dict[str, str]) -> e2e.KeyRecord:
    return e2e.KeyRecord(
        ik=bytes.fromhex(d["ik"]), kid=d["kid"], ek=bytes.fromhex(d["ek"]), sig=bytes.fromhex(d["sig"])
    )


class _Device:
    """A Python mailbox's keys, made fresh."""

    def __init__(self, mailbox: str) -> None:
        self.mailbox = mailbox
        self.identity = e2e.Identity.generate()
        self.ek = e2e.EncryptionKey.generate()
        self.record = e2e.make_key_record(mailbox, self.identity, self.ek)

    def open(self, body: bytes, *, sender: str, msg_id: str, sender_ik: bytes) -> bytes:
        return e2e.open_envelope(
            body, sender=sender, msg_id=msg_id, me=self.mailbox, sender_ik=sender_ik, my_keys={self.ek.kid: self.ek}
        )


class _Node:
    """The JS half as a child process: one JSON line to it, one line back, per step."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.buffer = b""

    async def ask(self, message: dict[str, Any]) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        await self.process.stdin.send_all(json.dumps(message).encode() + b"\n")
        while b"\n" not in self.buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, "node exited early (its stderr is in the test output)"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


async def test_js_and_python_seal_and_open_each_others_envelopes() -> None:
    node = shutil.which("node")
    require_service(
        node is not None and (JS_DIR / "node_modules" / "@hpke" / "core").exists(), "node and client/js's npm ci"
    )
    assert node is not None
    bob, carol = _Device("bob"), _Device("carol")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            # check=True: the nursery raises if node exits with an error (its stderr goes to the test's output).
            run = partial(
                trio.run_process, [node, str(SCRIPT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=True
            )
            process: trio.Process = await nursery.start(run)
            js = _Node(process)
            first = await js.ask(
                {
                    "records": {d.mailbox: _record_json(d.record) for d in (bob, carol)},
                    "bodies": [{"body": body.hex(), "padBlock": pad_block} for body, pad_block in BODIES],
                }
            )

            # JS -> Python: alice's record verifies here, Python's verified there, each for its own mailbox only.
            assert first["verified"] == {"bob": True, "bob@elsewhere": False, "carol": True, "carol@elsewhere": False}
            alice = _record(first["record"])
            assert e2e.verify_key_record("alice", alice)
            assert not e2e.verify_key_record("bob", alice)
            assert alice.kid == e2e.key_id(alice.ek)
            for i, ((body, _pad_block), envelope_hex) in enumerate(zip(BODIES, first["envelopes"], strict=True)):
                envelope = bytes.fromhex(envelope_hex)
                peeked = e2e.peek(envelope)
                assert (peeked.sender, peeked.to, peeked.ik, dict(peeked.kids)) == (
                    "alice",
                    ("bob", "carol"),
                    alice.ik,
                    {"bob": bob.ek.kid, "carol": carol.ek.kid},
                )
                for device in (bob, carol):
                    assert device.open(envelope, sender="alice", msg_id=f"js-{i}", sender_ik=alice.ik) == body
            assert first["fingerprint"] == e2e.fingerprint("alice", alice.ik)
            for device in (bob, carol):
                number = e2e.safety_number(device.mailbox, device.identity.public, "alice", alice.ik)
                assert first["safetyNumbers"][device.mailbox] == number

            # Python -> JS: sealed by bob to alice (JS) and carol (Python); the same envelope opens on both sides.
            messages, expected = [], []
            for i, (body, pad_block) in enumerate(BODIES):
                envelope = e2e.seal(
                    sender="bob",
                    msg_id=f"py-{i}",
                    recipients=[("alice", alice), ("carol", carol.record)],
                    identity=bob.identity,
                    body=body,
                    pad_block=pad_block,
                )
                assert carol.open(envelope, sender="bob", msg_id=f"py-{i}", sender_ik=bob.identity.public) == body
                messages.append(
                    {"sender": "bob", "senderIk": bob.identity.public.hex(), "msgId": f"py-{i}", "body": envelope.hex()}
                )
                expected.append({"body": body.hex()})
            # Refusals of envelopes made in Python, opened in JS: the reasons of docs/e2e.md.
            to_carol = e2e.seal(
                sender="bob", msg_id="py-x", recipients=[("carol", carol.record)], identity=bob.identity, body=b"x"
            )
            to_alice = e2e.seal(
                sender="bob", msg_id="py-y", recipients=[("alice", alice)], identity=bob.identity, body=b"y"
            )
            tampered = bytearray(to_alice)
            tampered[-1] ^= 1  # in sig
            refusals = [
                ({"msgId": "py-x", "body": to_carol.hex()}, "not_for_me"),
                ({"msgId": "py-z", "body": to_alice.hex()}, "mismatch"),
                ({"msgId": "py-y", "body": bytes(tampered).hex()}, "bad_signature"),
                ({"msgId": "py-y", "body": to_alice.hex(), "senderIk": carol.identity.public.hex()}, "key_changed"),
                ({"msgId": "py-y", "body": b"hello in the clear".hex()}, "plaintext"),
            ]
            for fields, reason in refusals:
                messages.append({"sender": "bob", "senderIk": bob.identity.public.hex(), **fields})
                expected.append({"reason": reason})
            second = await js.ask({"messages": messages})
            assert process.stdin is not None
            await process.stdin.aclose()  # node's last read ends, and so does node
            assert second["opened"] == expected
