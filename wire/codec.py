"""The length-prefixed CBOR codec.

Theory of operation: a frame on the wire is a 4-byte big-endian unsigned length N
followed by exactly N bytes holding one CBOR map with text keys. :class:`FrameDecoder`
takes bytes in arbitrary chunks and returns whole frames; it refuses a declared length
above its limit as soon as the 4 prefix bytes are in, before any body byte is read or
buffered. The body is decoded strictly: no tags, no indefinite lengths, no duplicate
keys, nesting at most ``MAX_DEPTH``, nothing after the item.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn, Protocol

import cbor2

from .errors import ErrorCode, RemoteProtocolError
from .frames import FRAME_TYPES, Frame, RecipientResult, ReportState, Status
from .limits import DEFAULT_MAX_FRAME_BYTES, MAX_DEPTH

__all__ = [
    "DeliverFields",
    "FrameDecoder",
    "ReceiptFields",
    "StatusFields",
    "decode_body",
    "decode_item",
    "encode_frame",
    "encode_frames",
]

_PREFIX = struct.Struct(">I")

# Tags that cbor2 decodes itself without consulting tag_hook: refuse each explicitly.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799)


def _refuse_tag(*_args: Any) -> NoReturn:
    raise ValueError("CBOR tags are not allowed")


_SEMANTIC = {tag: _refuse_tag for tag in _BUILTIN_TAGS}


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of one frame: length prefix plus CBOR body."""
    body = cbor2.dumps(frame.to_wire())
    return _PREFIX.pack(len(body)) + body


# ---------------------------------------------------------------- hot-path encoders
#
# SEND (client), RECEIPT and DELIVER (broker) are encoded once per message, so they skip
# the frame object and its to_wire() and give cbor2 the map straight away. Each is
# byte-identical to ``encode_frame`` of the same frame (a test holds them together), and
# each takes values that are valid already: nothing is checked here. They are called by
# ``Connection.send_send``, ``send_receipts``, ``send_delivers`` and ``send_statuses``, after the state table
# (once per batch for the broker's two: the loop over a batch is here, not one call per frame).


class DeliverFields(Protocol):
    """What a DELIVER is encoded from: a :class:`~wire.frames.Deliver`, or any record with its fields
    (the broker's stored messages)."""

    @property
    def id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def sent_at(self) -> int: ...
    @property
    def expires_at(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def body(self) -> bytes: ...


class ReceiptFields(Protocol):
    """What a RECEIPT is encoded from: a :class:`~wire.frames.Receipt`, or any record with its fields
    (the router's outcomes)."""

    @property
    def id(self) -> str: ...
    @property
    def results(self) -> Mapping[str, RecipientResult]: ...
    @property
    def code(self) -> int | None: ...
    @property
    def retry_after_ms(self) -> int | None: ...


class StatusFields(Protocol):
    """What a STATUS is encoded from: a :class:`~wire.frames.StatusReport`, or any record with its fields
    (the broker's held statuses). ``id`` and ``recipient`` are None exactly for OVERFLOW, ``count``
    and ``first_seq`` exactly for the others."""

    @property
    def seq(self) -> int: ...
    @property
    def state(self) -> ReportState: ...
    @property
    def at(self) -> int: ...
    @property
    def id(self) -> str | None: ...
    @property
    def recipient(self) -> str | None: ...
    @property
    def count(self) -> int | None: ...
    @property
    def first_seq(self) -> int | None: ...


def _encode_send(id: str, to: Sequence[str], body: bytes, ttl_s: int | None = None, notify: bool = False) -> bytes:
    """``encode_frame(Send(...))`` without building the frame: the client's sending hot path."""
    m: dict[str, Any] = {"type": "send", "id": id, "to": to, "body": body}
    if ttl_s is not None:
        m["ttl_s"] = ttl_s
    if notify:
        m["notify"] = True
    data = cbor2.dumps(m)
    return _PREFIX.pack(len(data)) + data


_RECEIPT_HEAD = b"\xa3" + cbor2.dumps("type") + cbor2.dumps("receipt") + cbor2.dumps("id")
"""A RECEIPT body up to the id: a three-key map (``type``, ``id``, ``results``), canonical key order."""
_RESULTS_OF_ONE = cbor2.dumps("results") + b"\xa1"
"""The ``results`` key and the head of a one-entry map."""
_PLAIN_RESULT_CBOR = {s: cbor2.dumps({"status": s.value}) for s in (Status.QUEUED, Status.DELIVERED, Status.DUPLICATE)}
"""The encoded result of each status without a code (three constants, not a cache)."""


def _results_of_one(rcpt: str, result: RecipientResult) -> bytes:
    """``"results": {rcpt: result}`` encoded: how a one-recipient RECEIPT body ends."""
    encoded = _PLAIN_RESULT_CBOR[result.status] if result.code is None else cbor2.dumps(result.to_wire())
    return _RESULTS_OF_ONE + cbor2.dumps(rcpt) + encoded


def _encode_receipts(receipts: Iterable[ReceiptFields]) -> list[bytes]:
    """``[encode_frame(Receipt(...)) for each]`` without building the frames: the broker's receipt hot path.

    A single-recipient receipt (the usual one) is assembled from constant pieces, its id
    encoded and its end (:func:`_results_of_one`), a third of the cost of encoding its
    nested map. A batch's receipts mostly answer SENDs to the same few recipients with the
    same (shared) results, so each recipient's end is encoded once per batch: ``ends``
    lives for this call only. With ``code`` (a SEND refused as a whole) ``results`` is
    empty and not encoded.
    """
    dumps, pack = cbor2.dumps, _PREFIX.pack
    ends: dict[str, tuple[RecipientResult, bytes]] = {}
    out: list[bytes] = []
    for r in receipts:
        results = r.results
        if r.code is not None:
            if r.retry_after_ms is None:
                data = dumps({"type": "receipt", "id": r.id, "code": r.code})
            else:
                data = dumps({"type": "receipt", "id": r.id, "code": r.code, "retry_after_ms": r.retry_after_ms})
        elif len(results) == 1:
            ((rcpt, result),) = results.items()
            end = ends.get(rcpt)
            if end is None or end[0] is not result:
                end = ends[rcpt] = (result, _results_of_one(rcpt, result))
            data = b"".join((_RECEIPT_HEAD, dumps(r.id), end[1]))
        else:
            data = dumps({"type": "receipt", "id": r.id, "results": {k: v.to_wire() for k, v in results.items()}})
        out.append(pack(len(data)) + data)
    return out


def _encode_delivers(messages: Iterable[DeliverFields]) -> list[bytes]:
    """``[encode_frame(Deliver(...)) for each]`` without building the frames: the broker's delivery hot path.

    A stored message's values are valid already: its id and body were validated when its
    SEND was decoded, and its sender is an authenticated mailbox id.
    """
    dumps, pack = cbor2.dumps, _PREFIX.pack
    out: list[bytes] = []
    for m in messages:
        data = dumps(
            {
                "type": "deliver",
                "id": m.id,
                "from": m.sender,
                "sent_at": m.sent_at,
                "expires_at": m.expires_at,
                "attempt": m.attempt,
                "body": m.body,
            }
        )
        out.append(pack(len(data)) + data)
    return out


def _encode_statuses(statuses: Iterable[StatusFields]) -> list[bytes]:
    """``[encode_frame(StatusReport(...)) for each]`` without building the frames: the broker's status path.

    A held status's values are valid already (the store made it from a stored message's id
    and recipient, or as the overflow record).
    """
    dumps, pack = cbor2.dumps, _PREFIX.pack
    overflow = ReportState.OVERFLOW
    out: list[bytes] = []
    for s in statuses:
        m: dict[str, Any] = {"type": "status", "seq": s.seq, "state": s.state.value, "at": s.at}
        if s.state is overflow:
            m["count"] = s.count
            m["first_seq"] = s.first_seq
        else:
            m["id"] = s.id
            m["recipient"] = s.recipient
        data = dumps(m)
        out.append(pack(len(data)) + data)
    return out


def encode_frames(frames: list[Frame]) -> bytes:
    """The wire bytes of several frames, back to back (what one write should carry)."""
    return b"".join([encode_frame(f) for f in frames])


def _strict_decoder(fp: io.BytesIO) -> cbor2.CBORDecoder:
    """A CBOR decoder with the protocol's rules: no tags, no indefinite lengths, no duplicate keys, bounded depth."""
    return cbor2.CBORDecoder(
        fp,
        tag_hook=_refuse_tag,
        semantic_decoders=_SEMANTIC,
        max_depth=MAX_DEPTH,
        allow_indefinite=False,
        allow_duplicate_keys=False,
    )


def decode_body(body: bytes) -> Frame:
    """Decode one frame body (without its prefix) into a frame.

    Raises RemoteProtocolError: MALFORMED_FRAME if it is not exactly one strict CBOR
    map with text keys, UNKNOWN_FRAME_TYPE, or INVALID_FIELD.
    """
    return _frame_from_item(decode_item(body))


def decode_item(data: bytes) -> Any:
    """Exactly one CBOR item under the protocol's strict rules (for CBOR bodies outside frames, e.g. HTTP).

    Raises RemoteProtocolError(MALFORMED_FRAME).
    """
    fp = io.BytesIO(data)
    try:
        item = _strict_decoder(fp).decode()
    except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, RecursionError, ...)
        raise _invalid_cbor(exc) from None
    if fp.tell() != len(data):
        raise _misfit(fp.tell(), len(data))
    return item


def _invalid_cbor(exc: Exception) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.MALFORMED_FRAME, f"invalid CBOR: {exc}")


def _misfit(stop: int, end: int) -> RemoteProtocolError:
    """The error for a CBOR item that ended at ``stop`` in a frame ending at ``end``."""
    why = "bytes after the CBOR item" if stop < end else "the CBOR item runs past the end of its frame"
    return RemoteProtocolError(ErrorCode.MALFORMED_FRAME, why)


def _frame_from_item(item: Any) -> Frame:
    """The frame a decoded CBOR item stands for; raises RemoteProtocolError.

    The one check path from item to frame, for :func:`decode_body` and :class:`FrameDecoder` alike.
    """
    if type(item) is not dict:
        raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "frame body must be a CBOR map")
    for key in item:
        if type(key) is not str:
            raise RemoteProtocolError(ErrorCode.MALFORMED_FRAME, "frame map keys must be text strings")
    type_name: Any = item.get("type")
    try:
        cls = FRAME_TYPES[type_name]  # the keys are text: any other value misses (KeyError, or TypeError if unhashable)
    except (KeyError, TypeError):
        shown = repr(type_name)
        if len(shown) > 64:  # it is the peer's text: quote a bounded part of it
            shown = shown[:61] + "..."
        raise RemoteProtocolError(ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type {shown}") from None
    return cls.from_wire(item)


_NO_INPUT = io.BytesIO(b"")


class FrameDecoder:
    """Turns a byte stream, in chunks of any size, into frames.

    After it raises, the stream is unusable (framing is lost): the caller must send
    ERROR and close.
    """

    __slots__ = ("_buf", "_decoder", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._decoder = _strict_decoder(_NO_INPUT)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete, in order.

        Raises RemoteProtocolError (FRAME_TOO_LARGE as soon as a prefix declares too
        much; otherwise as :func:`decode_body`), with the frames completed before the
        bad one in ``frames_before``.
        """
        frames: list[Frame] = []
        try:
            return self._feed(data, frames)
        except RemoteProtocolError as exc:
            exc.frames_before = frames
            raise

    def _feed(self, data: bytes, frames: list[Frame]) -> list[Frame]:
        whole = self._with_buffered(data)
        if whole is not None:
            try:
                pos = self._decode_frames(whole, frames)
            finally:
                self._decoder.fp = _NO_INPUT  # do not keep the chunk alive through the decoder
            self._keep_tail(whole, pos)
        return frames

    def _with_buffered(self, data: bytes) -> bytes | None:
        """``data`` after what is buffered, or None while the first frame is still arriving (and within the limit)."""
        if not self._buf:
            return data
        buf = self._buf
        buf += data
        if len(buf) < 4:
            return None
        (n,) = _PREFIX.unpack_from(buf, 0)
        if n <= self.max_frame_bytes and len(buf) - 4 < n:
            return None  # a large frame still arriving: no copy until it is whole
        return bytes(buf)

    def _decode_frames(self, data: bytes, frames: list[Frame]) -> int:
        """Append every whole frame in ``data`` to ``frames``; the offset where the unfinished rest starts."""
        limit = self.max_frame_bytes
        end = len(data)
        pos = 0
        fp: io.BytesIO | None = None
        decoder = self._decoder
        unpack, decode, append = _PREFIX.unpack_from, decoder.decode, frames.append
        while end - pos >= 4:
            (n,) = unpack(data, pos)
            if n > limit:
                raise RemoteProtocolError(
                    ErrorCode.FRAME_TOO_LARGE, f"declared frame length {n} exceeds the limit of {limit} bytes"
                )
            stop = pos + 4 + n
            if stop > end:
                break
            if fp is None:
                # One read-only view of the whole chunk for every frame in it: no copy per frame.
                fp = decoder.fp = io.BytesIO(data)
            fp.seek(pos + 4)
            try:
                item = decode()
            except Exception as exc:  # cbor2 raises several types (CBORDecodeError, ValueError, RecursionError, ...)
                raise _invalid_cbor(exc) from None
            pos = fp.tell()
            if pos != stop:
                raise _misfit(pos, stop)
            append(_frame_from_item(item))
        return pos

    def _keep_tail(self, data: bytes, pos: int) -> None:
        """Buffer ``data[pos:]``, the start of a frame still arriving."""
        if pos == len(data):
            self._buf.clear()
        elif pos or not self._buf:
            self._buf = bytearray(data[pos:])
