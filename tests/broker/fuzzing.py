"""What a broker must answer to arbitrary bytes, decided by the protocol's own code; and the fuzz inputs.

The oracle is the sans-IO core itself: a broker-side :class:`wire.Connection` fed the same bytes says which
frames complete, which ERROR code the first bad one gets (length prefix, CBOR, type, fields, state: the one
rule, protocol.md 2.1-2.4 and 5), and whether bytes of an unfinished frame are left; the broker's
:class:`broker.auth.Authenticator` with its secret judges a HELLO's token. :func:`judge` adds what the
session does with the frames that complete (HELLO's version and token, BYE, a KEY_GET over
``max_recipients``) and how the transport can cut the bytes (TCP may deliver them in several reads,
a WebSocket message is one read and must end at a frame boundary, protocol.md 2.5), and returns every
ending the protocol allows: usually exactly one.

The inputs: every golden vector of ``tests/vectors/valid.json`` and ``invalid.json`` mutated byte by byte
(:func:`vector_mutations`), and frames hypothesis builds from the protocol's field names with values of every
CBOR type (:func:`frame_strategy`), valid ones often enough that many pipeline on one connection.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
from hypothesis import strategies as st

from broker.auth import Authenticator, AuthError
from broker.websocket import PREWELCOME_READ_BYTES
from wire import (
    FRAME_TYPES,
    Bye,
    Connection,
    ErrorCode,
    Frame,
    Hello,
    KeyGet,
    Refresh,
    RemoteProtocolError,
    Role,
    Welcome,
    encode_frame,
)

VECTORS = Path(__file__).resolve().parents[1] / "vectors"

OPEN = "open"
"""Ending: the connection stays usable (every frame complete, valid, and none ends the session)."""
EOF = "eof"
"""Ending: the broker closes without a closing ERROR (after BYE, or after our EOF mid-frame)."""
WELCOME = "welcome"
"""Ending (before the handshake): the HELLO is accepted with WELCOME."""

Ending = int | str
"""A closing ERROR's code, or one of OPEN, EOF, WELCOME."""

_PREFIX = struct.Struct(">I")
_UPGRADE_BYTES = 1024
"""At most what a WebSocket upgrade request and frame header of the fuzz clients take of the pre-WELCOME budget."""


@dataclass(frozen=True)
class Verdict:
    """What the broker may do with one input: ``endings`` (any one of them), after answering ``frames``."""

    endings: frozenset[Ending]
    frames: tuple[Frame, ...]
    """The frames the broker acts on before the ending (it MAY drop those read together with a bad one)."""
    partial: bool
    """Bytes of an unfinished frame are left: the sender must end its side (TCP) for the broker to close."""


def _whole_messages(data: bytes) -> bool:
    """Whether ``data``, as one WebSocket message, ends exactly at a frame boundary (protocol.md 2.5)."""
    pos = 0
    while pos + 4 <= len(data):
        pos += 4 + _PREFIX.unpack_from(data, pos)[0]
    return pos == len(data) and len(data) >= 4


class Oracle:
    """The broker's answers as the protocol decides them, for one broker configuration."""

    def __init__(self, auth: Authenticator, *, max_frame_bytes: int, max_recipients: int) -> None:
        self.auth = auth
        self.max_frame_bytes = max_frame_bytes
        self.max_recipients = max_recipients

    def connection(self, *, opened: bool) -> Connection:
        """A broker-side Connection: fresh, or OPEN (a HELLO received and WELCOME sent) when ``opened``."""
        conn = Connection(Role.BROKER, max_frame_bytes=self.max_frame_bytes)
        if opened:
            conn.receive_data(encode_frame(Hello(version=1, token="t")))
            conn.send(
                Welcome(
                    version=1, session="s", mailbox="m", pending=0, max_frame_bytes=self.max_frame_bytes,
                    max_inflight=1, max_recipients=self.max_recipients, default_ttl_s=1, max_ttl_s=1, keepalive_s=1,
                    expires_in_s=60,
                )
            )  # fmt: skip
        return conn

    def hello_ending(self, hello: Hello) -> Ending:
        """What the broker answers a HELLO that passed the codec: version (1006), then the token (section 4)."""
        if hello.version != 1:
            return int(ErrorCode.UNSUPPORTED_VERSION)
        try:
            self.auth.verify(hello.token)
        except AuthError as exc:
            return int(exc.code)
        return WELCOME

    def judge(self, data: bytes, *, opened: bool, websocket: bool) -> Verdict:
        """Every ending the broker may give ``data`` sent at once on a connection (OPEN if ``opened``)."""
        return self._judge(data, opened=opened, websocket=websocket, budget=True)

    def _judge(self, data: bytes, *, opened: bool, websocket: bool, budget: bool) -> Verdict:
        if budget and websocket and not opened and len(data) > PREWELCOME_READ_BYTES - _UPGRADE_BYTES:
            # The broker reads at most this much of a WebSocket before WELCOME (protocol.md 2.5): a longer first
            # message never arrives, and the session ends at the handshake timeout. Near the line it depends on
            # the upgrade request's size: either.
            timeout = int(ErrorCode.HANDSHAKE_TIMEOUT)
            if len(data) > PREWELCOME_READ_BYTES:
                return Verdict(frozenset({timeout}), (), False)
            near = self._judge(data, opened=False, websocket=True, budget=False)
            return Verdict(near.endings | {timeout}, near.frames, False)
        if websocket and not _whole_messages(data):
            return Verdict(frozenset({int(ErrorCode.MALFORMED_FRAME)}), (), False)
        conn = self.connection(opened=opened)
        error: int | None = None
        try:
            frames = conn.receive_data(data)
        except RemoteProtocolError as exc:
            frames, error = exc.frames_before, int(exc.code)
        partial = error is None and conn._decoder.buffered_bytes > 0
        # Where the session stops acting on frames of its own accord, and how.
        stop: Ending | None = None
        acted: list[Frame] = []
        for frame in frames:
            if not opened:  # the state table admits one HELLO first and nothing after it before WELCOME
                stop = self.hello_ending(frame)  # type: ignore[arg-type]
                acted.append(frame)
                break
            acted.append(frame)
            if type(frame) is Bye:
                stop = EOF
                break
            if type(frame) is KeyGet and len(frame.mailboxes) > self.max_recipients:
                stop = int(ErrorCode.INVALID_FIELD)
                break
            if type(frame) is Refresh:
                # Judged as a HELLO's token (2001, 2002); a valid one is never the session's own (the lanes' tokens
                # are not among the fuzz inputs), so TOKEN_MISMATCH. Either way the session ends (rule 22).
                ending = self.hello_ending(Hello(version=1, token=frame.token))
                stop = int(ErrorCode.TOKEN_MISMATCH) if ending == WELCOME else ending
                break
        if error is not None:
            endings: set[Ending] = {error}
            # On TCP the bytes may arrive in several reads: a frame before the bad one may then be acted on
            # first. One WebSocket message is one read, judged whole (its frames before the bad one are dropped).
            if stop is not None and not websocket:
                endings.add(stop)
            return Verdict(frozenset(endings), tuple(acted), False)
        if stop is not None:
            return Verdict(frozenset({stop}), tuple(acted), partial and stop == WELCOME)
        return Verdict(frozenset({EOF if partial else OPEN}), tuple(acted), partial)


# ---------------------------------------------------------------- the golden vectors, mutated


def golden_vectors() -> list[tuple[str, bytes]]:
    """Every vector of valid.json and invalid.json: (name, wire bytes)."""
    out = []
    for name in ("valid.json", "invalid.json"):
        for v in json.loads((VECTORS / name).read_text()):
            out.append((v["name"], bytes.fromhex(v["hex"])))
    return out


_LONG_VECTOR_HEAD = 512
_LONG_VECTOR_TAIL = 64


def positions(data: bytes) -> range | list[int]:
    """The byte positions of a vector that are mutated: all of them, or the head and tail of a long one
    (the middle of a 70,000-byte body is opaque bytes: any value there is the same case)."""
    n = len(data)
    if n <= _LONG_VECTOR_HEAD + _LONG_VECTOR_TAIL:
        return range(n)
    return [*range(_LONG_VECTOR_HEAD), *range(n - _LONG_VECTOR_TAIL, n)]


def vector_mutations(*, stride: int, every_kind: bool, seed: int) -> Iterator[tuple[str, bytes]]:
    """Each vector with each mutated position replaced, and cut short there: (name@position=value, bytes).

    The replacements: the low bit flipped, the high bit flipped, 0x00, 0xff, a random other value.
    ``stride`` 1 mutates every position (see :func:`positions`), ``stride`` k one in k (a different one in
    each vector); ``every_kind`` tries all five replacements at each, else one, in turn."""
    rng = random.Random(seed)
    for vi, (name, data) in enumerate(golden_vectors()):
        for i in positions(data):
            if (i + vi) % stride:
                continue
            old = data[i]
            choices = (old ^ 0x01, old ^ 0x80, 0x00, 0xFF, rng.randrange(256))
            for k in range(5) if every_kind else ((i // stride + vi) % 5,):
                new = choices[k]
                if new != old:
                    yield f"{name}@{i}={new:02x}", data[:i] + bytes([new]) + data[i + 1 :]
            if i:
                yield f"{name}[:{i}]", data[:i]


# ---------------------------------------------------------------- hypothesis: frames from field names

_FIELDS = sorted({f for cls in FRAME_TYPES.values() for f in cls.__dataclass_fields__} | {"type"})
"""Every field name any frame has (what a mutated frame most likely holds)."""

_ID_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_ids = st.text(_ID_CHARS, min_size=1, max_size=8)
_mailboxes = st.sampled_from(["bob", "fz-x", "nobody", "a" * 64, "a" * 65, "", " bad", "al\u00e9"])
_scalars = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.sampled_from([0, 1, 2, 60, 2**53, 2**63 - 1, 2**63]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    _ids,
)
_values = st.one_of(
    _scalars,
    st.lists(st.one_of(_mailboxes, _ids, _scalars), max_size=4),
    st.dictionaries(st.one_of(_mailboxes, st.text(max_size=4)), _scalars, max_size=3),
)
_FRAME_NAMES = sorted(FRAME_TYPES)


def _field(name: str) -> st.SearchStrategy[Any]:
    """Values for one field: mostly right for the protocol's frames, sometimes anything."""
    right: dict[str, st.SearchStrategy[Any]] = {
        "id": _ids,
        "to": st.lists(_mailboxes, min_size=1, max_size=3),
        "body": st.binary(max_size=64),
        "ids": st.lists(_ids, min_size=1, max_size=3),
        "seqs": st.lists(st.integers(0, 2**53), min_size=1, max_size=3),
        "mailboxes": st.lists(_mailboxes, min_size=1, max_size=3),
        "ttl_s": st.integers(0, 10),
        "notify": st.booleans(),
        "version": st.sampled_from([1, 1, 1, 0, 2]),
        "token": st.text(max_size=16),
    }
    base = right.get(name)
    return _values if base is None else st.one_of(base, base, base, _values)


@st.composite
def _frame_map(draw: st.DrawFn) -> dict[Any, Any]:
    """A CBOR map that is nearly a client's frame: a type (usually a known one) and some fields."""
    kind = draw(st.one_of(st.sampled_from(["send", "send", "ack", "ping", "pull", "status_ack", "key_get"]),
                          st.sampled_from(_FRAME_NAMES), st.text(max_size=8), _scalars))  # fmt: skip
    m: dict[Any, Any] = {"type": kind}
    cls = FRAME_TYPES.get(kind) if isinstance(kind, str) else None
    names = list(cls.__dataclass_fields__) if cls is not None else []
    for name in names:
        if draw(st.integers(0, 9)) > 0:  # usually present
            m[name] = draw(_field(name))
    for _ in range(draw(st.integers(0, 1))):
        extra = draw(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6), st.integers(-3, 3)))
        m[extra] = draw(_field(extra) if isinstance(extra, str) else _values)
    return m


@st.composite
def frame_strategy(draw: st.DrawFn) -> bytes:
    """The wire bytes of one fuzz frame: a near-frame map with its right prefix (mostly), or a wrong prefix,
    or random bytes."""
    how = draw(st.integers(0, 19))
    if how == 0:
        return draw(st.binary(min_size=1, max_size=24))
    body = cbor2.dumps(draw(_frame_map()))
    if how == 1:
        return _PREFIX.pack(draw(st.integers(0, 2**32 - 1))) + body
    if how == 2:
        cut = draw(st.integers(0, len(body)))
        return _PREFIX.pack(len(body)) + body[:cut] + body[cut + 1 :]
    return _PREFIX.pack(len(body)) + body
