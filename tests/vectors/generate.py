"""Regenerate valid.json and invalid.json (the JSON files are the source of truth).

Run from the repository root: ``.venv/bin/python tests/vectors/generate.py``. Canonical
vectors are produced by ``wire.encode_frame``; the others are assembled by hand from raw
CBOR pieces. Every invalid vector's ``error`` is what ``FrameDecoder()`` raises, and the
script refuses to write a vector the decoder does not treat as its entry says.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import cbor2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from wire import (
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Deliver,
    Drained,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    KeyRecord,
    Ping,
    Pong,
    Pull,
    Receipt,
    RecipientResult,
    Refresh,
    Refreshed,
    RemoteProtocolError,
    ReportState,
    Send,
    Stats,
    StatsResult,
    Status,
    StatusAck,
    StatusReport,
    Welcome,
    encode_frame,
)

HERE = Path(__file__).resolve().parent
TOKEN = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
MSG_ID = "01J9ZKQ8V6X3M4N5P6Q7R8S9T0"
UUID_ID = "9f1c2e3d4b5a69788796a5b4c3d2e1f0"
# A key record of the right shape (the decoder does not verify signatures; signed ones are in e2e.json).
IK = bytes(range(32))
EK = bytes(range(32, 64))
SIG = bytes(range(64, 128))
KID = "5f3a9c0e12ab34cd"
RECORD = KeyRecord(ik=IK, kid=KID, ek=EK, sig=SIG)


# ---------------------------------------------------------------- raw CBOR pieces


def head(major: int, value: int, width: int | None = None) -> bytes:
    """A CBOR head; ``width`` forces 0 (inline), 1, 2, 4 or 8 argument bytes."""
    if width is None:
        return _shortest_head(major, value)
    if width == 0:
        assert value < 24
        return bytes([major << 5 | value])
    ai = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes([major << 5 | ai]) + value.to_bytes(width, "big")


def _shortest_head(major: int, value: int) -> bytes:
    for width, limit in ((0, 24), (1, 2**8), (2, 2**16), (4, 2**32), (8, 2**64)):
        if value < limit:
            return head(major, value, width)
    raise ValueError(value)


def u(value: int, width: int | None = None) -> bytes:
    return head(0, value, width)


def t(text: str, width: int | None = None) -> bytes:
    raw = text.encode()
    return head(3, len(raw), width) + raw


def b(raw: bytes, width: int | None = None) -> bytes:
    return head(2, len(raw), width) + raw


def m(*pairs: bytes, width: int | None = None) -> bytes:
    """A definite map; ``pairs`` are key, value, key, value ... already encoded."""
    assert len(pairs) % 2 == 0
    return head(5, len(pairs) // 2, width) + b"".join(pairs)


def a(*items: bytes, width: int | None = None) -> bytes:
    return head(4, len(items), width) + b"".join(items)


def c(value: Any) -> bytes:
    return cbor2.dumps(value)


def wire(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# ---------------------------------------------------------------- JSON form


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


VALID: list[dict[str, Any]] = []
INVALID: list[dict[str, Any]] = []


def valid(name: str, description: str, frame: Frame, raw_body: bytes | None = None) -> None:
    data = encode_frame(frame) if raw_body is None else wire(raw_body)
    (decoded,) = FrameDecoder().feed(data)
    assert decoded == frame, (name, decoded, frame)
    VALID.append(
        {
            "name": name,
            "description": description,
            "canonical": data == encode_frame(frame),
            "hex": data.hex(),
            "frame": to_json(frame.to_wire()),
        }
    )


def invalid(name: str, description: str, error: ErrorCode, body: bytes | None = None, raw: bytes | None = None) -> None:
    data = wire(body) if raw is None else raw
    try:
        FrameDecoder().feed(data)
    except RemoteProtocolError as exc:
        assert exc.code == error, (name, exc)
    else:
        raise AssertionError(f"{name}: decoded without error")
    INVALID.append({"name": name, "description": description, "hex": data.hex(), "error": int(error)})


# ---------------------------------------------------------------- valid vectors


def build_valid() -> None:
    valid("hello", "HELLO without the optional agent", Hello(version=1, token=TOKEN))
    valid("hello_agent", "HELLO with agent", Hello(version=1, token=TOKEN, agent="relay-py/0.1.0"))
    valid(
        "hello_agent_astral_256",
        "agent at its 256-character limit, counted in code points: 256 x U+1F680 (1024 UTF-8 bytes, 512 UTF-16 units)",
        Hello(version=1, token=TOKEN, agent="\U0001f680" * 256),
    )
    limits = {
        "pending": 3,
        "max_frame_bytes": 1048576,
        "max_inflight": 1024,
        "max_recipients": 100,
        "default_ttl_s": 604800,
        "max_ttl_s": 2592000,
        "keepalive_s": 60,
        "expires_in_s": 3659,
    }
    valid(
        "welcome",
        "WELCOME for a mailbox session with the default limits",
        Welcome(version=1, session="s-5f2a9c", mailbox="alice", **limits),
    )
    valid(
        "welcome_operator",
        "WELCOME for an operator session: no mailbox key",
        Welcome(version=1, session="s-op-1", **{**limits, "pending": 0}),
    )
    valid(
        "welcome_expiring",
        "WELCOME for a session whose token has less than a second left: expires_in_s 0 (rule 22)",
        Welcome(version=1, session="s-5f2a9d", mailbox="alice", **{**limits, "expires_in_s": 0}),
    )
    valid("refresh", "REFRESH with a new token for the session's identity (rule 22)", Refresh(token=TOKEN))
    valid(
        "refresh_token_4096",
        "REFRESH token at its 4096-character limit",
        Refresh(token="x" * 4096),
    )
    valid(
        "refreshed",
        "REFRESHED: the new token leaves the session an hour (and the leeway)",
        Refreshed(expires_in_s=3659),
    )
    valid("refreshed_zero", "REFRESHED expires_in_s 0: less than a second left", Refreshed(expires_in_s=0))
    valid(
        "send",
        "SEND to one recipient, default TTL, no notify (absent: false): the bytes a SEND had before notify existed",
        Send(id=MSG_ID, to=("bob",), body=b"hello bob"),
    )
    valid(
        "send_notify",
        "SEND with notify true: the sender asks for one STATUS per recipient the message is stored for",
        Send(id=MSG_ID, to=("bob",), body=b"hello bob", notify=True),
    )
    valid(
        "send_notify_ttl_multi",
        "SEND to two recipients with ttl_s and notify true (notify after ttl_s in the canonical order)",
        Send(id=UUID_ID, to=("bob", "carol@example.org"), body=b"hi all", ttl_s=3600, notify=True),
    )
    valid(
        "send_multi_ttl",
        "SEND to several recipients (one repeated, one not a valid mailbox id: both legal on the wire) with ttl_s",
        Send(id=UUID_ID, to=("bob", "carol@example.org", "bob", "-bad"), body=bytes(range(16)), ttl_s=3600),
    )
    valid("send_empty_body", "SEND with an empty body", Send(id="m1", to=("bob",), body=b""))
    valid(
        "send_body_300",
        "SEND with a 300-byte body (2-byte CBOR length)",
        Send(id="m300", to=("bob",), body=bytes(i % 251 for i in range(300))),
    )
    valid(
        "send_body_70000",
        "SEND with a 70,000-byte body (4-byte CBOR length)",
        Send(id="m70000", to=("bob",), body=bytes((i * 7) % 256 for i in range(70000))),
    )
    valid(
        "send_id_limits",
        "SEND whose id is 64 printable ASCII characters and whose recipient is a 64-character mailbox id",
        Send(
            id="!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~" + "0123456789ABCDEFGHIJKLMNOPQRSTUV",
            to=("a" + "._@+-" * 12 + "zzz",),
            body=b"x",
        ),
    )
    valid(
        "receipt_queued",
        "RECEIPT: one recipient, queued",
        Receipt(id=MSG_ID, results={"bob": RecipientResult(Status.QUEUED)}),
    )
    valid(
        "receipt_mixed",
        "RECEIPT with every status, refused ones with codes",
        Receipt(
            id=UUID_ID,
            results={
                "bob": RecipientResult(Status.DELIVERED),
                "carol@example.org": RecipientResult(Status.DUPLICATE),
                "-bad": RecipientResult(Status.REFUSED, int(ErrorCode.INVALID_RECIPIENT)),
                "dave": RecipientResult(Status.REFUSED, int(ErrorCode.MAILBOX_FULL)),
            },
        ),
    )
    valid(
        "receipt_refused_unknown_code",
        "RECEIPT with a refusal code this revision does not define: still valid",
        Receipt(id="m2", results={"bob": RecipientResult(Status.REFUSED, 3999)}),
    )
    valid(
        "receipt_whole_send_refused",
        "RECEIPT for a SEND refused as a whole (more than max_recipients recipients): code, no results",
        Receipt(id=MSG_ID, code=int(ErrorCode.TOO_MANY_RECIPIENTS)),
    )
    valid(
        "receipt_rate_limited",
        "RECEIPT for a SEND refused as a whole with 3010 RATE_LIMITED and a retry hint (retry_after_ms after code)",
        Receipt(id=MSG_ID, code=int(ErrorCode.RATE_LIMITED), retry_after_ms=250),
    )
    valid(
        "receipt_retry_after_zero",
        "RECEIPT whole-SEND code with retry_after_ms 0 (a uint; the reference broker sends at least 1)",
        Receipt(id="m3", code=int(ErrorCode.RATE_LIMITED), retry_after_ms=0),
    )
    valid(
        "receipt_whole_send_unknown_code",
        "RECEIPT refusing a SEND as a whole with a code this revision does not define: still valid",
        Receipt(id="m3", code=3999),
    )
    valid(
        "send_recipient_64_code_points",
        "SEND to a recipient of 64 four-byte code points (256 bytes): the longest allowed, refused 3006 by a broker",
        Send(id="m4", to=("\U0001f600" * 64,), body=b""),
    )
    valid(
        "receipt_key_64_code_points",
        "RECEIPT echoing a recipient of 64 four-byte code points, refused with 3006",
        Receipt(
            id="m4", results={"\U0001f600" * 64: RecipientResult(Status.REFUSED, int(ErrorCode.INVALID_RECIPIENT))}
        ),
    )
    valid(
        "deliver",
        "DELIVER, first attempt",
        Deliver(
            id=MSG_ID,
            sender="alice",
            sent_at=1732550400000,
            expires_at=1733155200000,
            attempt=1,
            body=b"hello bob",
        ),
    )
    valid(
        "deliver_redelivery_max_safe",
        "DELIVER, third attempt, expires_at = 2^53-1 (the largest integer JS clients accept)",
        Deliver(id="m3", sender="carol@example.org", sent_at=0, expires_at=2**53 - 1, attempt=3, body=b"\x00\xff"),
    )
    valid(
        "status_delivered",
        "STATUS delivered: bob's ACK of the message reached the broker at `at`",
        StatusReport(seq=1732550401234000, state=ReportState.DELIVERED, at=1732550401234, id=MSG_ID, recipient="bob"),
    )
    valid(
        "status_expired",
        "STATUS expired: the message expired un-ACKed for carol@example.org; at is its expires_at",
        StatusReport(
            seq=1733155200000000,
            state=ReportState.EXPIRED,
            at=1733155200000,
            id=UUID_ID,
            recipient="carol@example.org",
        ),
    )
    valid(
        "status_overflow",
        "STATUS overflow: 42 statuses were folded into it (not kept one by one); first_seq is the seq it was "
        "created with",
        StatusReport(
            seq=1732550409999001, state=ReportState.OVERFLOW, at=1732550409999, count=42, first_seq=1732550401000000
        ),
    )
    valid(
        "status_overflow_new",
        "STATUS overflow just created: count 1, first_seq = seq; seq 1 (small seqs are valid too)",
        StatusReport(seq=1, state=ReportState.OVERFLOW, at=0, count=1, first_seq=1),
    )
    valid(
        "status_max_safe_seq",
        "STATUS delivered with seq 2^53-1 (the largest integer JS clients accept) and a 64-character recipient",
        StatusReport(
            seq=2**53 - 1, state=ReportState.DELIVERED, at=2**53 - 1, id="m1", recipient="a" + "._@+-" * 12 + "zzz"
        ),
    )
    valid("status_ack", "STATUS_ACK of one status", StatusAck(seqs=(1732550401234000,)))
    valid(
        "status_ack_many",
        "STATUS_ACK of several statuses, any order, with 1 and 2^53-1",
        StatusAck(seqs=(1733155200000000, 1, 2**53 - 1)),
    )
    valid("ack", "ACK of one message", Ack(ids=(MSG_ID,)))
    valid("ack_many", "ACK of several messages", Ack(ids=(MSG_ID, UUID_ID, "m1")))
    valid("pull", "PULL", Pull())
    valid("drained", "DRAINED with nothing left un-ACKed", Drained(pending=0))
    valid("drained_pending", "DRAINED with 5 messages still un-ACKed", Drained(pending=5))
    valid("ping", "PING", Ping())
    valid("pong", "PONG", Pong())
    valid("bye", "BYE", Bye())
    valid("stats", "STATS", Stats())
    valid("cleanup", "CLEANUP", Cleanup())
    valid(
        "error_close",
        "ERROR that closes the connection",
        Error(code=int(ErrorCode.CONNECTED_ELSEWHERE), message="connected elsewhere", close=True),
    )
    valid(
        "error_not_closing",
        "ERROR that keeps the connection open",
        Error(code=int(ErrorCode.FORBIDDEN), message="stats needs an operator token", close=False),
    )
    valid(
        "error_bom_message",
        "ERROR whose message starts with U+FEFF: decoders must keep it (no BOM stripping)",
        Error(code=int(ErrorCode.INTERNAL_ERROR), message="\ufeffüñí", close=True),
    )
    valid("error_empty_message", "ERROR with an empty message", Error(code=1001, message="", close=True))
    valid(
        "error_rate_limited",
        "ERROR 4006 CONNECTION_RATE_LIMITED with a retry hint (retry_after_ms after close)",
        Error(
            code=int(ErrorCode.CONNECTION_RATE_LIMITED),
            message="connections from 198.51.100.7 come too fast; retry later",
            close=True,
            retry_after_ms=1500,
        ),
    )
    valid(
        "error_too_many_from_address",
        "ERROR 4007 TOO_MANY_CONNECTIONS_FROM_ADDRESS, without a retry hint",
        Error(code=int(ErrorCode.TOO_MANY_CONNECTIONS_FROM_ADDRESS), message="too many", close=True),
    )
    stats = {
        k: i * 1000 + 7
        for i, k in enumerate(
            "messages_total messages_deliverable messages_expired_unswept acknowledged_total online_users "
            "unique_recipients queued_bytes sent_total delivered_total redelivered_total expired_total "
            "duplicates_total refused_total refused_mailbox_full refused_mailbox_bytes_full refused_broker_full "
            "refused_too_many_recipients refused_id_conflict refused_invalid_recipient connections inflight "
            "tombstones store_round_trips store_available store_errors_total".split()
        )
    }
    valid("stats_result", "STATS_RESULT with every key protocol.md lists", StatsResult(stats=stats))
    valid("stats_result_empty", "STATS_RESULT with an empty map", StatsResult(stats={}))
    valid("cleanup_result", "CLEANUP_RESULT", CleanupResult(purged=42))
    valid("key_put", "KEY_PUT of a key record (ik, kid, ek, sig)", KeyPut(key=RECORD))
    valid(
        "key_put_long_kid",
        "KEY_PUT whose kid is any message id: 64 printable ASCII characters",
        KeyPut(key=KeyRecord(ik=IK, kid="~!" * 32, ek=EK, sig=SIG)),
    )
    valid("key_put_result", "KEY_PUT_RESULT: the record is stored", KeyPutResult(kid=KID))
    valid(
        "key_put_result_refused",
        "KEY_PUT_RESULT refused with 3009 INVALID_KEY (nothing stored)",
        KeyPutResult(kid=KID, code=int(ErrorCode.INVALID_KEY)),
    )
    valid("key_get", "KEY_GET of one mailbox", KeyGet(mailboxes=("bob",)))
    valid(
        "key_get_any_text",
        "KEY_GET with repeats, an empty element, one that is no mailbox id and a 64-code-point one",
        KeyGet(mailboxes=("bob", "carol", "bob", "", "not a mailbox", "\U0001f680" * 64)),
    )
    valid(
        "key_get_result",
        "KEY_GET_RESULT with two records",
        KeyGetResult(keys={"bob": RECORD, "carol@example.org": KeyRecord(ik=EK, kid="k2", ek=IK, sig=SIG[::-1])}),
    )
    valid("key_get_result_empty", "KEY_GET_RESULT: none of the mailboxes has a record", KeyGetResult(keys={}))

    # ---- non-canonical encodings that must still decode
    valid(
        "key_put_unknown_and_reordered",
        "KEY_PUT whose record has its keys in another order and an unknown key (ignored, not kept)",
        KeyPut(key=RECORD),
        m(
            t("type"),
            t("key_put"),
            t("key"),
            m(t("sig"), b(SIG), t("x-note"), t("hi"), t("ek"), b(EK), t("kid"), t(KID), t("ik"), b(IK)),
        ),
    )
    valid(
        "ping_unknown_keys",
        "PING with unknown keys of many kinds (ignored): nesting at the depth limit, floats, null, undefined, "
        "a simple value, integers beyond 2^53 and 2^63, non-text keys in a nested map",
        Ping(),
        m(
            t("type"),
            t("ping"),
            t("x-nested"),
            a(a(a(a()))),
            t("x-map"),
            m(u(1), t("one"), c(b"k"), c(None), c(-5), a(u(1))),
            t("x-floats"),
            a(bytes.fromhex("f93c00"), bytes.fromhex("fa7fc00000"), bytes.fromhex("fbfff0000000000000")),
            t("x-simple"),
            a(c(None), bytes.fromhex("f7"), bytes.fromhex("f0"), bytes.fromhex("f8ff")),
            t("x-big"),
            a(u(2**53), u(2**64 - 1), bytes.fromhex("3bffffffffffffffff")),
        ),
    )
    valid(
        "send_keys_reordered",
        "SEND with its keys in a different order (type last)",
        Send(id="m1", to=("bob",), body=b"hi", ttl_s=60),
        m(t("body"), b(b"hi"), t("ttl_s"), u(60), t("to"), a(t("bob")), t("id"), t("m1"), t("type"), t("send")),
    )
    valid(
        "send_notify_false",
        "SEND with notify false written out: the same SEND as one without notify (the encoder leaves it out)",
        Send(id="m1", to=("bob",), body=b"hi"),
        m(t("type"), t("send"), t("id"), t("m1"), t("to"), a(t("bob")), t("body"), b(b"hi"), t("notify"), c(False)),
    )
    valid(
        "status_keys_reordered_unknown_key",
        "STATUS with its keys in another order (type last) and an unknown key (ignored)",
        StatusReport(seq=9, state=ReportState.EXPIRED, at=8, id="m9", recipient="bob"),
        m(
            t("recipient"),
            t("bob"),
            t("x-reason"),
            t("ttl"),
            t("at"),
            u(8),
            t("id"),
            t("m9"),
            t("state"),
            t("expired"),
            t("seq"),
            u(9, 8),
            t("type"),
            t("status"),
        ),
    )
    valid(
        "drained_uint64_zero_padded",
        "DRAINED whose pending (5) uses an 8-byte integer argument",
        Drained(pending=5),
        m(t("type"), t("drained"), t("pending"), u(5, 8)),
    )
    valid(
        "deliver_wide_heads",
        "DELIVER with non-shortest heads everywhere: map (1-byte count), text lengths (1/2/4/8 bytes), "
        "integers (1/2/4/8 bytes), body length (4 bytes)",
        Deliver(id="m9", sender="alice", sent_at=1000, expires_at=2000, attempt=2, body=b"abc"),
        m(
            t("type", 1),
            t("deliver", 2),
            t("id", 4),
            t("m9", 8),
            t("from"),
            t("alice", 1),
            t("sent_at"),
            u(1000, 4),
            t("expires_at"),
            u(2000, 8),
            t("attempt"),
            u(2, 1),
            t("body"),
            b(b"abc", 4),
            width=1,
        ),
    )
    valid(
        "ack_wide_array",
        "ACK whose ids array has a 2-byte count",
        Ack(ids=("a", "b")),
        m(t("type"), t("ack"), t("ids"), a(t("a"), t("b"), width=2)),
    )
    valid(
        "receipt_result_extra_key",
        "RECEIPT whose result map carries an unknown key (ignored)",
        Receipt(id="m1", results={"bob": RecipientResult(Status.QUEUED)}),
        m(
            t("type"),
            t("receipt"),
            t("id"),
            t("m1"),
            t("results"),
            m(t("bob"), m(t("status"), t("queued"), t("x"), u(1))),
        ),
    )


# ---------------------------------------------------------------- invalid vectors

MAL = ErrorCode.MALFORMED_FRAME
INV = ErrorCode.INVALID_FIELD
UNK = ErrorCode.UNKNOWN_FRAME_TYPE
PING = (t("type"), t("ping"))


def drained(value: bytes) -> bytes:
    return m(t("type"), t("drained"), t("pending"), value)


def send(**fields: bytes) -> bytes:
    """A SEND map with ``fields`` replaced; an empty value drops the field."""
    base = {"id": t("m1"), "to": a(t("bob")), "body": b(b"hi")}
    base.update(fields)
    pairs = [t("type"), t("send")]
    for key, value in base.items():
        if value != b"":
            pairs += [t(key), value]
    return m(*pairs)


def deliver(**fields: bytes) -> bytes:
    base = {"id": t("m1"), "from": t("alice"), "sent_at": u(1), "expires_at": u(2), "attempt": u(1), "body": b(b"")}
    base.update(fields)
    pairs = [t("type"), t("deliver")]
    for key, value in base.items():
        if value != b"":
            pairs += [t(key), value]
    return m(*pairs)


def receipt(result: bytes) -> bytes:
    return m(t("type"), t("receipt"), t("id"), t("m1"), t("results"), m(t("bob"), result))


def status(**fields: bytes) -> bytes:
    """A STATUS map (delivered by default) with ``fields`` replaced; an empty value drops the field."""
    base = {"seq": u(5), "state": t("delivered"), "at": u(1000), "id": t("m1"), "recipient": t("bob")}
    base.update(fields)
    pairs = [t("type"), t("status")]
    for key, value in base.items():
        if value != b"":
            pairs += [t(key), value]
    return m(*pairs)


def overflow(**fields: bytes) -> bytes:
    """An overflow STATUS map with ``fields`` replaced; an empty value drops the field."""
    return status(**{"state": t("overflow"), "id": b"", "recipient": b"", "count": u(3), "first_seq": u(2), **fields})


def status_ack(seqs: bytes) -> bytes:
    return m(t("type"), t("status_ack"), t("seqs"), seqs)


def key_record(**fields: bytes) -> bytes:
    """A key record map with ``fields`` replaced; an empty value drops the field."""
    base = {"ik": b(IK), "kid": t(KID), "ek": b(EK), "sig": b(SIG)}
    base.update(fields)
    pairs: list[bytes] = []
    for key, value in base.items():
        if value != b"":
            pairs += [t(key), value]
    return m(*pairs)


def key_put(record: bytes) -> bytes:
    return m(t("type"), t("key_put"), t("key"), record)


def key_get(mailboxes: bytes) -> bytes:
    return m(t("type"), t("key_get"), t("mailboxes"), mailboxes)


def build_invalid() -> None:
    big = struct.pack(">I", 1048577)
    invalid(
        "too_large_prefix_only",
        "declared length 1,048,577 (> default limit); only the prefix is sent",
        ErrorCode.FRAME_TOO_LARGE,
        raw=big,
    )
    invalid(
        "too_large_max_prefix",
        "declared length 2^32-1; only the prefix is sent",
        ErrorCode.FRAME_TOO_LARGE,
        raw=b"\xff\xff\xff\xff",
    )
    invalid("empty_body", "declared length 0: no CBOR item", MAL, b"")
    invalid("not_cbor_break", "body is a lone break byte 0xff", MAL, b"\xff")
    invalid("not_cbor_reserved", "body uses reserved additional information 28", MAL, b"\x1c")
    invalid("truncated_map", "map declares 2 pairs, holds 1", MAL, b"\xa2" + t("type") + t("ping"))
    invalid("trailing_bytes", "a complete map followed by one more byte inside the frame", MAL, m(*PING) + b"\x00")
    invalid("two_items", "two complete maps in one frame", MAL, m(*PING) + m(*PING))
    invalid("array_not_map", "body is an array", MAL, a(t("type"), t("ping")))
    invalid("text_not_map", "body is a text string", MAL, t("ping"))
    invalid("int_key", "top-level map with an integer key", MAL, m(*PING, u(1), u(2)))
    invalid("bytes_key", "top-level map with a byte-string key", MAL, m(*PING, b(b"x"), u(2)))
    invalid("duplicate_type_key", "key 'type' twice", MAL, m(t("type"), t("ping"), t("type"), t("pong")))
    invalid(
        "duplicate_key_wide_head",
        "key 'x' twice, once with a non-shortest length",
        MAL,
        m(*PING, t("x"), u(1), t("x", 1), u(2)),
    )
    invalid(
        "duplicate_nested_key",
        "duplicate key inside a nested map of an unknown field",
        MAL,
        m(*PING, t("x"), m(t("k"), u(1), t("k"), u(2))),
    )
    invalid("indefinite_map", "indefinite-length top-level map", MAL, b"\xbf" + t("type") + t("ping") + b"\xff")
    invalid(
        "indefinite_bytes",
        "SEND body as an indefinite-length byte string",
        MAL,
        send(body=b"\x5f" + b(b"h") + b(b"i") + b"\xff"),
    )
    invalid(
        "indefinite_text",
        "indefinite-length text string as the type",
        MAL,
        m(t("type"), b"\x7f" + t("pi") + t("ng") + b"\xff"),
    )
    invalid("indefinite_array", "SEND to as an indefinite-length array", MAL, send(to=b"\x9f" + t("bob") + b"\xff"))
    invalid("tag_1_in_field", "tag 1 (epoch time) on DELIVER sent_at", MAL, deliver(sent_at=b"\xc1" + u(1)))
    invalid(
        "tag_55799_self_describe",
        "the whole body wrapped in tag 55799 (self-describe CBOR)",
        MAL,
        b"\xd9\xd9\xf7" + m(*PING),
    )
    invalid("tag_256_stringref", "tag 256 (stringref namespace) around the body", MAL, b"\xd9\x01\x00" + m(*PING))
    invalid("tag_2_bignum", "tag 2 bignum as DRAINED pending", MAL, drained(b"\xc2" + b(b"\x01")))
    invalid(
        "tag_in_unknown_field", "tag 32 (URI) in an unknown field", MAL, m(*PING, t("x"), b"\xd8\x20" + t("http://x"))
    )
    invalid("invalid_utf8", "text with invalid UTF-8 in an unknown field", MAL, m(*PING, t("x"), b"\x62\xc3\x28"))
    invalid(
        "utf8_surrogate",
        "text holding an encoded UTF-16 surrogate (ED A0 80)",
        MAL,
        m(*PING, t("x"), b"\x63\xed\xa0\x80"),
    )
    invalid(
        "simple_value_two_byte_small",
        "simple value 16 in the two-byte form (not well-formed)",
        MAL,
        m(*PING, t("x"), b"\xf8\x10"),
    )
    invalid(
        "nesting_too_deep",
        "an unknown field nested 5 levels below the top map",
        MAL,
        m(*PING, t("x"), a(a(a(a(u(0)))))),
    )
    invalid(
        "nesting_too_deep_empty", "an empty array 5 levels below the top map", MAL, m(*PING, t("x"), a(a(a(a(a())))))
    )
    invalid("unknown_type", "type 'subscribe'", UNK, m(t("type"), t("subscribe")))
    invalid("type_wrong_case", "type 'PING' (names are lower case)", UNK, m(t("type"), t("PING")))
    invalid("type_not_text", "type as a byte string", UNK, m(t("type"), b(b"ping")))
    invalid("missing_type", "no type key", UNK, m(t("pending"), u(0)))
    invalid("empty_map", "empty map", UNK, m())
    invalid("send_missing_body", "SEND without body", INV, send(body=b""))
    invalid("deliver_missing_attempt", "DELIVER without attempt", INV, deliver(attempt=b""))
    invalid(
        "welcome_missing_keepalive",
        "WELCOME without keepalive_s",
        INV,
        m(
            t("type"),
            t("welcome"),
            t("version"),
            u(1),
            t("session"),
            t("s"),
            t("pending"),
            u(0),
            t("max_frame_bytes"),
            u(1048576),
            t("max_inflight"),
            u(1),
            t("max_recipients"),
            u(1),
            t("default_ttl_s"),
            u(1),
            t("max_ttl_s"),
            u(1),
            t("expires_in_s"),
            u(3600),
        ),
    )
    invalid("hello_missing_token", "HELLO without token", INV, m(t("type"), t("hello"), t("version"), u(1)))
    invalid("refresh_missing_token", "REFRESH without token", INV, m(t("type"), t("refresh")))
    invalid("refresh_token_empty", "REFRESH token empty", INV, m(t("type"), t("refresh"), t("token"), t("")))
    invalid(
        "refresh_token_4097",
        "REFRESH token of 4097 characters",
        INV,
        m(t("type"), t("refresh"), t("token"), t("x" * 4097)),
    )
    invalid(
        "refresh_token_bytes", "REFRESH token as a byte string", INV, m(t("type"), t("refresh"), t("token"), b(b"x"))
    )
    invalid("refreshed_missing", "REFRESHED without expires_in_s", INV, m(t("type"), t("refreshed")))
    invalid(
        "refreshed_negative", "REFRESHED expires_in_s -1", INV, m(t("type"), t("refreshed"), t("expires_in_s"), c(-1))
    )
    invalid(
        "refreshed_null",
        "REFRESHED expires_in_s null",
        INV,
        m(t("type"), t("refreshed"), t("expires_in_s"), c(None)),
    )
    invalid(
        "welcome_missing_expires_in",
        "WELCOME without expires_in_s (rule 22)",
        INV,
        m(
            t("type"),
            t("welcome"),
            t("version"),
            u(1),
            t("session"),
            t("s"),
            t("pending"),
            u(0),
            t("max_frame_bytes"),
            u(1048576),
            t("max_inflight"),
            u(1),
            t("max_recipients"),
            u(1),
            t("default_ttl_s"),
            u(1),
            t("max_ttl_s"),
            u(1),
            t("keepalive_s"),
            u(1),
        ),
    )
    invalid("send_body_text", "SEND body as a text string", INV, send(body=t("hi")))
    invalid("send_to_text", "SEND to as a single text string instead of an array", INV, send(to=t("bob")))
    invalid("send_to_empty", "SEND with an empty to array", INV, send(to=a()))
    invalid("send_to_int", "SEND to holding an integer", INV, send(to=a(u(7))))
    invalid("send_ttl_zero", "SEND ttl_s 0", INV, send(ttl_s=u(0)))
    invalid("send_ttl_null", "SEND ttl_s null (absent is allowed, null is not)", INV, send(ttl_s=c(None)))
    invalid("send_ttl_float", "SEND ttl_s 60.0 (a float)", INV, send(ttl_s=bytes.fromhex("f95380")))
    invalid("send_id_space", "SEND id with a space", INV, send(id=t("m 1")))
    invalid("send_id_empty", "SEND id empty", INV, send(id=t("")))
    invalid("send_id_65", "SEND id of 65 characters", INV, send(id=t("x" * 65)))
    invalid("send_id_non_ascii", "SEND id with a non-ASCII character", INV, send(id=t("m\u00e9")))
    invalid("send_recipient_65", "SEND to a recipient of 65 characters", INV, send(to=a(t("b" * 65))))
    invalid(
        "send_recipient_65_code_points",
        "SEND to a recipient of 65 code points (64 four-byte ones and an ASCII one)",
        INV,
        send(to=a(t("bob"), t("\U0001f600" * 64 + "x"))),
    )
    invalid("drained_bool", "DRAINED pending true (a bool is not an integer)", INV, drained(c(True)))
    invalid("drained_negative", "DRAINED pending -1", INV, drained(c(-1)))
    invalid("drained_2_63", "DRAINED pending 2^63 (above 2^63-1)", INV, drained(u(2**63)))
    invalid("drained_2_64_minus_1", "DRAINED pending 2^64-1", INV, drained(u(2**64 - 1)))
    invalid("deliver_attempt_zero", "DELIVER attempt 0", INV, deliver(attempt=u(0)))
    invalid(
        "deliver_from_invalid", "DELIVER from not a mailbox id (leading dot)", INV, deliver(**{"from": t(".alice")})
    )
    invalid("deliver_from_too_long", "DELIVER from of 65 characters", INV, deliver(**{"from": t("a" * 65)}))
    invalid("send_notify_null", "SEND notify null (absent is allowed, null is not)", INV, send(notify=c(None)))
    invalid("send_notify_int", "SEND notify 1 (an integer is not a boolean)", INV, send(notify=u(1)))
    invalid("send_notify_text", "SEND notify 'true' (text is not a boolean)", INV, send(notify=t("true")))
    invalid("status_state_read", "STATUS state 'read' (not a state of this revision)", INV, status(state=t("read")))
    invalid(
        "status_state_receipt_result",
        "STATUS state 'queued' (a RECEIPT result, not a STATUS state)",
        INV,
        status(state=t("queued")),
    )
    invalid(
        "status_state_upper_case", "STATUS state 'DELIVERED' (states are lower case)", INV, status(state=t("DELIVERED"))
    )
    invalid("status_state_missing", "STATUS without state", INV, status(state=b""))
    invalid("status_seq_zero", "STATUS seq 0 (seqs start at 1)", INV, status(seq=u(0)))
    invalid("status_seq_missing", "STATUS without seq", INV, status(seq=b""))
    invalid("status_at_missing", "STATUS without at", INV, status(at=b""))
    invalid("status_at_negative", "STATUS at -1", INV, status(at=c(-1)))
    invalid("status_delivered_without_id", "STATUS delivered without id", INV, status(id=b""))
    invalid(
        "status_expired_without_recipient",
        "STATUS expired without recipient",
        INV,
        status(state=t("expired"), recipient=b""),
    )
    invalid("status_id_null", "STATUS delivered with id null", INV, status(id=c(None)))
    invalid("status_id_space", "STATUS id with a space (not a message id)", INV, status(id=t("m 1")))
    invalid(
        "status_recipient_invalid",
        "STATUS recipient not a mailbox id (leading dot): statuses name only recipients a message was stored for",
        INV,
        status(recipient=t(".bob")),
    )
    invalid("status_delivered_with_count", "STATUS delivered with a count", INV, status(count=u(1)))
    invalid(
        "status_expired_with_first_seq",
        "STATUS expired with a first_seq",
        INV,
        status(state=t("expired"), first_seq=u(5)),
    )
    invalid("status_overflow_without_count", "STATUS overflow without count", INV, overflow(count=b""))
    invalid("status_overflow_without_first_seq", "STATUS overflow without first_seq", INV, overflow(first_seq=b""))
    invalid("status_overflow_count_zero", "STATUS overflow count 0 (at least 1)", INV, overflow(count=u(0)))
    invalid("status_overflow_with_id", "STATUS overflow with an id", INV, overflow(id=t("m1")))
    invalid("status_overflow_with_recipient", "STATUS overflow with a recipient", INV, overflow(recipient=t("bob")))
    invalid(
        "status_overflow_first_seq_above_seq",
        "STATUS overflow whose first_seq (6) is above its seq (5)",
        INV,
        overflow(first_seq=u(6)),
    )
    invalid("status_ack_empty", "STATUS_ACK with no seqs", INV, status_ack(a()))
    invalid("status_ack_seq_zero", "STATUS_ACK naming seq 0", INV, status_ack(a(u(7), u(0))))
    invalid("status_ack_text_seq", "STATUS_ACK naming a seq as text", INV, status_ack(a(t("7"))))
    invalid("status_ack_not_array", "STATUS_ACK seqs as a single integer", INV, status_ack(u(7)))
    invalid("status_ack_missing", "STATUS_ACK without seqs", INV, m(t("type"), t("status_ack")))
    invalid("ack_empty", "ACK with no ids", INV, m(t("type"), t("ack"), t("ids"), a()))
    invalid("ack_bad_id", "ACK with an invalid id", INV, m(t("type"), t("ack"), t("ids"), a(t("ok"), t("not ok"))))
    invalid(
        "receipt_empty_results",
        "RECEIPT with no results",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("results"), m()),
    )
    invalid("receipt_refused_without_code", "result refused without code", INV, receipt(m(t("status"), t("refused"))))
    invalid(
        "receipt_no_results_no_code",
        "RECEIPT with neither results nor code",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1")),
    )
    invalid(
        "receipt_results_and_code",
        "RECEIPT with both results and a code",
        INV,
        m(
            t("type"),
            t("receipt"),
            t("id"),
            t("m1"),
            t("results"),
            m(t("bob"), m(t("status"), t("queued"))),
            t("code"),
            u(3004),
        ),
    )
    invalid(
        "receipt_empty_results_and_code",
        "RECEIPT with an empty results map and a code (results must be absent)",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("results"), m(), t("code"), u(3004)),
    )
    invalid(
        "receipt_whole_code_999",
        "RECEIPT code 999 (below 1000)",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), u(999)),
    )
    invalid(
        "receipt_retry_after_with_results",
        "RECEIPT with results and retry_after_ms (it goes only with a whole-SEND code)",
        INV,
        m(
            t("type"), t("receipt"), t("id"), t("m1"), t("results"), m(t("bob"), m(t("status"), t("queued"))),
            t("retry_after_ms"), u(5),
        ),
    )  # fmt: skip
    invalid(
        "receipt_retry_after_null",
        "RECEIPT retry_after_ms null",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), u(3010), t("retry_after_ms"), c(None)),
    )
    invalid(
        "receipt_retry_after_text",
        "RECEIPT retry_after_ms as text",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), u(3010), t("retry_after_ms"), t("5")),
    )
    invalid(
        "receipt_retry_after_negative",
        "RECEIPT retry_after_ms -1",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), u(3010), t("retry_after_ms"), c(-1)),
    )
    invalid(
        "receipt_retry_after_float",
        "RECEIPT retry_after_ms 1.5 (a float is not a uint)",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), u(3010), t("retry_after_ms"), c(1.5)),
    )
    invalid(
        "receipt_whole_code_null",
        "RECEIPT code null",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("code"), c(None)),
    )
    invalid(
        "receipt_key_65_code_points",
        "RECEIPT keyed by a recipient of 65 code points",
        INV,
        m(
            t("type"),
            t("receipt"),
            t("id"),
            t("m1"),
            t("results"),
            m(t("x" * 65), m(t("status"), t("refused"), t("code"), u(3006))),
        ),
    )
    invalid(
        "receipt_queued_with_code",
        "result queued with a code",
        INV,
        receipt(m(t("status"), t("queued"), t("code"), u(3001))),
    )
    invalid("receipt_unknown_status", "result status 'lost'", INV, receipt(m(t("status"), t("lost"))))
    invalid(
        "receipt_code_below_1000", "refusal code 999", INV, receipt(m(t("status"), t("refused"), t("code"), u(999)))
    )
    invalid("receipt_result_not_map", "result is a text string", INV, receipt(t("queued")))
    invalid(
        "receipt_int_recipient",
        "results keyed by an integer",
        INV,
        m(t("type"), t("receipt"), t("id"), t("m1"), t("results"), m(u(1), m(t("status"), t("queued")))),
    )
    invalid(
        "hello_version_zero", "HELLO version 0", INV, m(t("type"), t("hello"), t("version"), u(0), t("token"), t("x"))
    )
    invalid(
        "hello_token_empty", "HELLO token empty", INV, m(t("type"), t("hello"), t("version"), u(1), t("token"), t(""))
    )
    invalid(
        "hello_token_4097",
        "HELLO token of 4097 characters",
        INV,
        m(t("type"), t("hello"), t("version"), u(1), t("token"), t("x" * 4097)),
    )
    invalid(
        "hello_agent_257_astral",
        "agent of 257 code points (U+1F680)",
        INV,
        m(t("type"), t("hello"), t("version"), u(1), t("token"), t("x"), t("agent"), t("\U0001f680" * 257)),
    )
    invalid(
        "welcome_small_frame_limit",
        "WELCOME max_frame_bytes 63 (minimum 64)",
        INV,
        m(
            t("type"),
            t("welcome"),
            t("version"),
            u(1),
            t("session"),
            t("s"),
            t("pending"),
            u(0),
            t("max_frame_bytes"),
            u(63),
            t("max_inflight"),
            u(1),
            t("max_recipients"),
            u(1),
            t("default_ttl_s"),
            u(1),
            t("max_ttl_s"),
            u(1),
            t("keepalive_s"),
            u(1),
            t("expires_in_s"),
            u(3600),
        ),
    )
    invalid(
        "welcome_mailbox_null",
        "WELCOME mailbox null (absent is allowed, null is not)",
        INV,
        m(
            t("type"),
            t("welcome"),
            t("version"),
            u(1),
            t("session"),
            t("s"),
            t("mailbox"),
            c(None),
            t("pending"),
            u(0),
            t("max_frame_bytes"),
            u(64),
            t("max_inflight"),
            u(1),
            t("max_recipients"),
            u(1),
            t("default_ttl_s"),
            u(1),
            t("max_ttl_s"),
            u(1),
            t("keepalive_s"),
            u(1),
            t("expires_in_s"),
            u(3600),
        ),
    )
    invalid(
        "error_close_int",
        "ERROR close 1 instead of a bool",
        INV,
        m(t("type"), t("error"), t("code"), u(1001), t("message"), t(""), t("close"), u(1)),
    )
    invalid(
        "error_retry_after_null",
        "ERROR retry_after_ms null",
        INV,
        m(
            t("type"), t("error"), t("code"), u(4006), t("message"), t(""), t("close"), c(True),
            t("retry_after_ms"), c(None),
        ),
    )  # fmt: skip
    invalid(
        "error_retry_after_negative",
        "ERROR retry_after_ms -5",
        INV,
        m(
            t("type"), t("error"), t("code"), u(4006), t("message"), t(""), t("close"), c(True),
            t("retry_after_ms"), c(-5),
        ),
    )  # fmt: skip
    invalid(
        "error_retry_after_bool",
        "ERROR retry_after_ms true",
        INV,
        m(
            t("type"), t("error"), t("code"), u(4006), t("message"), t(""), t("close"), c(True),
            t("retry_after_ms"), c(True),
        ),
    )  # fmt: skip
    invalid(
        "error_code_below_1000",
        "ERROR code 42",
        INV,
        m(t("type"), t("error"), t("code"), u(42), t("message"), t(""), t("close"), c(True)),
    )
    invalid(
        "stats_result_empty_key",
        "STATS_RESULT with an empty key",
        INV,
        m(t("type"), t("stats_result"), t("stats"), m(t(""), u(1))),
    )
    invalid(
        "stats_result_negative",
        "STATS_RESULT with a negative value",
        INV,
        m(t("type"), t("stats_result"), t("stats"), m(t("sent_total"), c(-1))),
    )
    invalid(
        "stats_result_int_key",
        "STATS_RESULT keyed by an integer",
        INV,
        m(t("type"), t("stats_result"), t("stats"), m(u(1), u(1))),
    )
    for name, description, record in (
        ("ik_short", "ik of 31 bytes", key_record(ik=b(IK[:31]))),
        ("ik_long", "ik of 33 bytes", key_record(ik=b(IK + b"\x00"))),
        ("ik_text", "ik as text", key_record(ik=t(IK.hex()))),
        ("ek_short", "ek of 31 bytes", key_record(ek=b(EK[:31]))),
        ("ek_long", "ek of 33 bytes", key_record(ek=b(EK + b"\x00"))),
        ("ek_empty", "ek empty", key_record(ek=b(b""))),
        ("sig_short", "sig of 63 bytes", key_record(sig=b(SIG[:63]))),
        ("sig_long", "sig of 65 bytes", key_record(sig=b(SIG + b"\x00"))),
        ("sig_array", "sig as an array of integers", key_record(sig=a(*(u(x) for x in SIG)))),
        ("kid_empty", "kid empty", key_record(kid=t(""))),
        ("kid_too_long", "kid of 65 characters", key_record(kid=t("k" * 65))),
        ("kid_space", "kid with a space", key_record(kid=t("k k"))),
        ("kid_non_ascii", "kid with a non-ASCII character", key_record(kid=t("k\u00e9"))),
        ("kid_bytes", "kid as bytes", key_record(kid=b(KID.encode()))),
        ("missing_ik", "record without ik", key_record(ik=b"")),
        ("missing_kid", "record without kid", key_record(kid=b"")),
        ("missing_ek", "record without ek", key_record(ek=b"")),
        ("missing_sig", "record without sig", key_record(sig=b"")),
        ("null_sig", "record with sig null", key_record(sig=c(None))),
    ):
        invalid(f"key_put_{name}", f"KEY_PUT: {description}", INV, key_put(record))
    invalid(
        "key_get_result_ik_short",
        "KEY_GET_RESULT holding a record whose ik is 31 bytes",
        INV,
        m(t("type"), t("key_get_result"), t("keys"), m(t("bob"), key_record(ik=b(IK[:31])))),
    )
    invalid("key_put_not_map", "KEY_PUT key as a byte string", INV, key_put(b(IK + EK)))
    invalid("key_put_null", "KEY_PUT key null", INV, key_put(c(None)))
    invalid("key_put_missing", "KEY_PUT without key", INV, m(t("type"), t("key_put")))
    invalid("key_get_empty", "KEY_GET with no mailboxes", INV, key_get(a()))
    invalid("key_get_not_array", "KEY_GET mailboxes as one text", INV, key_get(t("bob")))
    invalid("key_get_element_too_long", "KEY_GET with a 65-character element", INV, key_get(a(t("b" * 65))))
    invalid("key_get_element_int", "KEY_GET with an integer element", INV, key_get(a(t("bob"), u(7))))
    invalid("key_get_missing", "KEY_GET without mailboxes", INV, m(t("type"), t("key_get")))
    invalid(
        "key_get_result_bad_mailbox",
        "KEY_GET_RESULT keyed by something that is not a mailbox id",
        INV,
        m(t("type"), t("key_get_result"), t("keys"), m(t("-bob"), key_record())),
    )
    invalid(
        "key_get_result_not_map",
        "KEY_GET_RESULT keys as an array",
        INV,
        m(t("type"), t("key_get_result"), t("keys"), a(key_record())),
    )
    invalid("key_get_result_missing", "KEY_GET_RESULT without keys", INV, m(t("type"), t("key_get_result")))
    invalid(
        "key_put_result_code_low",
        "KEY_PUT_RESULT with code 999",
        INV,
        m(t("type"), t("key_put_result"), t("kid"), t(KID), t("code"), u(999)),
    )
    invalid(
        "key_put_result_bad_kid",
        "KEY_PUT_RESULT kid with a space",
        INV,
        m(t("type"), t("key_put_result"), t("kid"), t("k k")),
    )
    invalid(
        "cleanup_result_text",
        "CLEANUP_RESULT purged as text",
        INV,
        m(t("type"), t("cleanup_result"), t("purged"), t("3")),
    )


def main() -> None:
    build_valid()
    build_invalid()
    for name, data in (("valid.json", VALID), ("invalid.json", INVALID)):
        names = [v["name"] for v in data]
        assert len(names) == len(set(names)), "duplicate vector names"
        (HERE / name).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(data)} vectors to {name}")


if __name__ == "__main__":
    main()
