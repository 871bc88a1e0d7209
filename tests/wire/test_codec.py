"""The length-prefixed CBOR codec: round trips, re-chunking, robustness on hostile bytes."""

from __future__ import annotations

import struct
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import (
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_TYPES,
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Connection,
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
    Role,
    Send,
    State,
    Stats,
    StatsResult,
    Status,
    StatusAck,
    StatusReport,
    Welcome,
    decode_body,
    encode_frame,
    encode_frames,
    receipt_bound_bytes,
)

from .support import welcome

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UINT = st.integers(0, 2**63 - 1)
POS = st.integers(1, 2**63 - 1)
MESSAGE_ID = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
MAILBOX = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}\Z")
TEXT = st.text(max_size=40)
BODY = st.binary(max_size=300)

result = st.one_of(
    st.sampled_from([Status.QUEUED, Status.DELIVERED, Status.DUPLICATE]).map(RecipientResult),
    st.integers(1000, 2**63 - 1).map(lambda code: RecipientResult(Status.REFUSED, code)),
)

KEY_RECORD = st.builds(
    KeyRecord,
    ik=st.binary(min_size=32, max_size=32),
    kid=MESSAGE_ID,
    ek=st.binary(min_size=32, max_size=32),
    sig=st.binary(min_size=64, max_size=64),
)

FRAMES: dict[type[Frame], st.SearchStrategy[Frame]] = {
    Hello: st.builds(
        Hello, version=POS, token=st.text(min_size=1, max_size=200), agent=st.none() | st.text(max_size=256)
    ),
    Welcome: st.builds(
        Welcome,
        version=POS,
        session=st.text(min_size=1, max_size=64),
        mailbox=st.none() | MAILBOX,
        pending=UINT,
        max_frame_bytes=st.integers(64, 2**63 - 1),
        max_inflight=POS,
        max_recipients=POS,
        default_ttl_s=POS,
        max_ttl_s=POS,
        keepalive_s=POS,
        expires_in_s=UINT,
    ),
    Refresh: st.builds(Refresh, token=st.text(min_size=1, max_size=4096)),
    Refreshed: st.builds(Refreshed, expires_in_s=UINT),
    Send: st.builds(
        Send,
        id=MESSAGE_ID,
        to=st.lists(TEXT, min_size=1, max_size=5).map(tuple),
        body=BODY,
        ttl_s=st.none() | POS,
        notify=st.booleans(),
    ),
    Receipt: st.builds(Receipt, id=MESSAGE_ID, results=st.dictionaries(TEXT, result, min_size=1, max_size=5)),
    Deliver: st.builds(Deliver, id=MESSAGE_ID, sender=MAILBOX, sent_at=UINT, expires_at=UINT, attempt=POS, body=BODY),
    Ack: st.builds(Ack, ids=st.lists(MESSAGE_ID, min_size=1, max_size=5).map(tuple)),
    StatusReport: st.one_of(
        st.builds(
            StatusReport,
            seq=POS,
            state=st.sampled_from([ReportState.DELIVERED, ReportState.EXPIRED]),
            at=UINT,
            id=MESSAGE_ID,
            recipient=MAILBOX,
        ),
        st.tuples(POS, POS, POS, UINT).map(
            lambda v: StatusReport(
                seq=max(v[0], v[1]), state=ReportState.OVERFLOW, at=v[3], count=v[2], first_seq=min(v[0], v[1])
            )
        ),
    ),
    StatusAck: st.builds(StatusAck, seqs=st.lists(POS, min_size=1, max_size=5).map(tuple)),
    Pull: st.just(Pull()),
    Drained: st.builds(Drained, pending=UINT),
    Ping: st.just(Ping()),
    Pong: st.just(Pong()),
    Error: st.builds(Error, code=st.integers(1000, 2**63 - 1), message=TEXT, close=st.booleans()),
    Bye: st.just(Bye()),
    Stats: st.just(Stats()),
    StatsResult: st.builds(StatsResult, stats=st.dictionaries(st.text(min_size=1, max_size=64), UINT, max_size=25)),
    Cleanup: st.just(Cleanup()),
    CleanupResult: st.builds(CleanupResult, purged=UINT),
    KeyPut: st.builds(KeyPut, key=KEY_RECORD),
    KeyPutResult: st.builds(KeyPutResult, kid=MESSAGE_ID, code=st.none() | st.integers(1000, 2**63 - 1)),
    KeyGet: st.builds(KeyGet, mailboxes=st.lists(TEXT, min_size=1, max_size=5).map(tuple)),
    KeyGetResult: st.builds(KeyGetResult, keys=st.dictionaries(MAILBOX, KEY_RECORD, max_size=4)),
}
ANY_FRAME = st.one_of(*FRAMES.values())


def test_strategies_cover_every_frame_type() -> None:
    assert set(FRAMES) == set(FRAME_TYPES.values())


@pytest.mark.parametrize("cls", list(FRAMES), ids=lambda c: c.TYPE)
@FAST
@given(data=st.data())
def test_every_frame_type_round_trips(cls: type[Frame], data: st.DataObject) -> None:
    frame = data.draw(FRAMES[cls])
    encoded = encode_frame(frame)
    assert struct.unpack(">I", encoded[:4])[0] == len(encoded) - 4
    assert decode_body(encoded[4:]) == frame
    assert FrameDecoder().feed(encoded) == [frame]
    assert encode_frame(decode_body(encoded[4:])) == encoded


@FAST
@given(frames=st.lists(ANY_FRAME, max_size=8), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_rechunked_stream_gives_the_same_frames(frames: list[Frame], cuts: list[int]) -> None:
    stream = encode_frames(frames)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    decoder = FrameDecoder()
    out: list[Frame] = []
    prev = 0
    for point in [*points, len(stream)]:
        out += decoder.feed(stream[prev:point])
        prev = point
    assert out == frames
    assert decoder.buffered_bytes == 0


def test_stream_fed_byte_by_byte_keeps_only_the_partial_frame() -> None:
    frames = [Ping(), Send(id="m1", to=("bob",), body=b"x" * 100), Drained(pending=2)]
    stream = encode_frames(frames)
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        assert decoder.buffered_bytes <= max(len(encode_frame(f)) for f in frames)
    assert out == frames


def _feed_only_protocol_errors(data: bytes, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
    decoder = FrameDecoder(max_frame_bytes)
    try:
        frames = decoder.feed(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        return
    for frame in frames:
        assert type(frame) in FRAME_TYPES.values()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    _feed_only_protocol_errors(data, max_frame_bytes=256)


@settings(max_examples=400, deadline=None)
@given(body=st.binary(max_size=120))
def test_arbitrary_body_with_a_correct_prefix_only_raises_protocol_errors(body: bytes) -> None:
    _feed_only_protocol_errors(struct.pack(">I", len(body)) + body)


@settings(max_examples=400, deadline=None)
@given(frame=ANY_FRAME, pos=st.integers(0, 10_000), byte=st.integers(0, 255), extra=st.binary(max_size=4))
def test_mutated_frames_only_raise_protocol_errors(frame: Frame, pos: int, byte: int, extra: bytes) -> None:
    body = bytearray(encode_frame(frame)[4:])
    body[pos % len(body)] = byte
    body += extra
    _feed_only_protocol_errors(struct.pack(">I", len(body)) + bytes(body))


@pytest.mark.parametrize("type_name", sorted(FRAME_TYPES))
def test_huge_declared_length_is_refused_from_the_prefix_alone(type_name: str) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1)[:3]) == []
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1)[3:])
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered_bytes <= 4


def test_huge_declared_length_after_a_valid_frame_is_refused_without_buffering() -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(encode_frame(Ping()) + b"\xff\xff\xff\xff" + b"\xa1" * 10)
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered_bytes < 32


def test_declared_length_equal_to_the_limit_is_accepted() -> None:
    frame = Send(id="m1", to=("bob",), body=b"x" * 100)
    encoded = encode_frame(frame)
    exact = len(encoded) - 4
    assert FrameDecoder(max_frame_bytes=exact).feed(encoded) == [frame]
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder(max_frame_bytes=exact - 1).feed(encoded[:4])
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE


def test_partial_frame_is_buffered_until_complete() -> None:
    encoded = encode_frame(Drained(pending=1))
    decoder = FrameDecoder()
    assert decoder.feed(encoded[:-1]) == []
    assert decoder.buffered_bytes == len(encoded) - 1
    assert decoder.feed(encoded[-1:]) == [Drained(pending=1)]
    assert decoder.buffered_bytes == 0


def test_frames_refuse_illegal_values_when_built() -> None:
    with pytest.raises(ValueError):
        Deliver(id="m1", sender="alice", sent_at=0, expires_at=0, attempt=0, body=b"")
    with pytest.raises(ValueError):
        Send(id="m 1", to=("bob",), body=b"")
    with pytest.raises(ValueError):
        RecipientResult(Status.REFUSED)
    with pytest.raises(ValueError):
        Drained(pending=True)


def test_optional_fields_absent_are_left_out_of_the_map() -> None:
    assert Send(id="m1", to=("b",), body=b"").to_wire() == {"type": "send", "id": "m1", "to": ("b",), "body": b""}
    operator = welcome(session="s", mailbox=None, max_frame_bytes=64)
    assert "mailbox" not in operator.to_wire()
    assert decode_body(encode_frame(operator)[4:]) == operator


@settings(max_examples=300)
@given(frame=st.one_of(FRAMES[Send], FRAMES[Receipt], FRAMES[Deliver], FRAMES[StatusReport]))
def test_hot_sends_are_byte_identical_to_the_frame_path(frame: Frame) -> None:
    """Connection.send_send (client), send_receipts, send_delivers and send_statuses (broker) skip the frame object."""
    client, broker = Connection(Role.CLIENT), Connection(Role.BROKER)
    client.state = broker.state = State.OPEN
    if isinstance(frame, Send):
        fast = client.send_send(frame.id, frame.to, frame.body, frame.ttl_s, notify=frame.notify)
        again = client.send_send(frame.id, list(frame.to), frame.body, frame.ttl_s, notify=frame.notify)
        assert again == fast  # to as a list
    elif isinstance(frame, Receipt):
        (fast,) = broker.send_receipts([frame])
        assert broker.send_receipts([frame, frame]) == [fast, fast]  # again (a cache must not change it)
    elif isinstance(frame, StatusReport):
        (fast,) = broker.send_statuses([frame])
        assert broker.send_statuses([frame, frame]) == [fast, fast]
    else:
        assert isinstance(frame, Deliver)
        (fast,) = broker.send_delivers([frame])
        assert broker.send_delivers([frame, frame]) == [fast, fast]
    assert fast == encode_frame(frame)


@pytest.mark.parametrize("type_value", [[1], {"a": 1}, 7, b"send", None, True, 1.5, "", "SEND"])
def test_a_type_that_is_not_a_frame_name_is_an_unknown_frame_type(type_value: Any) -> None:
    """Unhashable values (arrays, maps) included: a protocol error, never a crash."""
    body = cbor2.dumps({"type": type_value, "id": "m1"})
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert info.value.code == ErrorCode.UNKNOWN_FRAME_TYPE


def test_a_single_recipient_receipt_is_byte_identical_for_every_result() -> None:
    """send_receipts assembles one-recipient receipts from pieces: every status, a refusal, the longest name."""
    broker = Connection(Role.BROKER)
    broker.state = State.OPEN
    longest = "\U0001f600" * 64  # 64 code points, 256 bytes of UTF-8
    for result in [
        *(RecipientResult(s) for s in Status if s is not Status.REFUSED),
        RecipientResult(Status.REFUSED, 3006),
    ]:
        for rcpt in ("bob", "", longest):
            receipt = Receipt(id="m", results={rcpt: result})
            assert broker.send_receipts([receipt]) == [encode_frame(receipt)]


def test_a_batch_of_receipts_is_byte_identical_whatever_repeats_in_it() -> None:
    """send_receipts encodes a recipient's end of a receipt once per batch: a recipient again with another
    result, an equal result that is another object, a refusal, a whole-SEND refusal and several recipients
    between them must each still come out as encode_frame would make them."""
    broker = Connection(Role.BROKER)
    broker.state = State.OPEN
    queued, refused = RecipientResult(Status.QUEUED), RecipientResult(Status.REFUSED, 3006)
    batch = [
        Receipt(id="m1", results={"bob": queued}),
        Receipt(id="m2", results={"bob": queued}),
        Receipt(id="m3", results={"bob": RecipientResult(Status.DELIVERED)}),
        Receipt(id="m4", results={"bob": RecipientResult(Status.QUEUED)}),
        Receipt(id="m5", results={"bob": refused}),
        Receipt(id="m6", results={"bob": RecipientResult(Status.REFUSED, 3007)}),
        Receipt(id="m7", code=int(ErrorCode.TOO_MANY_RECIPIENTS)),
        Receipt(id="m8", results={"bob": queued, "carol": refused}),
        Receipt(id="m9", results={"carol": queued}),
        Receipt(id="m10", results={"bob": queued}),
    ]
    assert broker.send_receipts(batch) == [encode_frame(r) for r in batch]


@settings(max_examples=100)
@given(batch=st.lists(FRAMES[Receipt], max_size=8))
def test_any_batch_of_receipts_is_byte_identical_to_the_frame_path(batch: list[Receipt]) -> None:
    broker = Connection(Role.BROKER)
    broker.state = State.OPEN
    assert broker.send_receipts(batch) == [encode_frame(r) for r in batch]


def test_a_recipient_longer_than_64_code_points_cannot_be_sent_or_echoed() -> None:
    """Length counts code points: 64 four-byte characters pass, a 65th is an invalid field both ways."""
    ok = "\U0001f600" * 64
    assert Send(id="m", to=[ok], body=b"").to == (ok,)
    for frame in (
        {"type": "send", "id": "m", "to": [ok + "x"], "body": b""},
        {"type": "receipt", "id": "m", "results": {ok + "x": {"status": "refused", "code": 3006}}},
    ):
        body = cbor2.dumps(frame)
        with pytest.raises(RemoteProtocolError) as info:
            FrameDecoder().feed(struct.pack(">I", len(body)) + body)
        assert info.value.code == ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(
    "fields",
    [{}, {"results": {"bob": {"status": "queued"}}, "code": 3004}, {"code": 999}, {"code": "3004"}, {"code": None}],
)
def test_a_receipt_needs_exactly_one_of_results_and_code(fields: dict[str, Any]) -> None:
    body = cbor2.dumps({"type": "receipt", "id": "m", **fields})
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_a_whole_send_refusal_round_trips() -> None:
    receipt = Receipt(id="m", code=int(ErrorCode.TOO_MANY_RECIPIENTS))
    data = encode_frame(receipt)
    broker = Connection(Role.BROKER)
    broker.state = State.OPEN
    assert [data] == broker.send_receipts([receipt])
    assert FrameDecoder().feed(data) == [receipt]


@settings(max_examples=200)
@given(frame=ANY_FRAME)
def test_a_key_that_is_not_text_is_malformed_in_every_frame_type(frame: Frame) -> None:
    """Unknown text keys are ignored, but a non-text key refuses the frame, through the stream decoder too."""
    body = cbor2.dumps({**frame.to_wire(), 1: "x"})
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert info.value.code == ErrorCode.MALFORMED_FRAME


@given(st.integers(64, 2**24))
def test_max_recipients_within_is_the_inverse_of_the_receipt_bound(max_frame_bytes: int) -> None:
    from wire import max_recipients_within, receipt_bound_bytes

    n = max_recipients_within(max_frame_bytes)
    assert n == 0 or receipt_bound_bytes(n) <= max_frame_bytes
    assert receipt_bound_bytes(n + 1) > max_frame_bytes


@pytest.mark.parametrize(
    "m",
    [
        {"type": "send", "id": "m", "to": ["bob"], "body": b"", "ttl_s": None},
        {"type": "receipt", "id": "m", "results": {"bob": {"status": "queued", "code": None}}},
        {"type": "receipt", "id": "m", "code": None},
        {"type": "deliver", "id": "m", "from": "alice", "sent_at": None, "expires_at": 1, "attempt": 1, "body": b""},
        {"type": "ack", "ids": None},
    ],
)
def test_a_null_field_is_refused_not_taken_as_absent(m: dict[str, Any]) -> None:
    body = cbor2.dumps(m)
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_decoded_frames_hold_tuples_and_fresh_maps() -> None:
    """The trusted path builds what the constructor would: tuples for arrays, a map per receipt (none shared)."""
    send = Send.from_wire({"type": "send", "id": "m", "to": ["bob"], "body": b""})
    ack = Ack.from_wire({"type": "ack", "ids": ["m"]})
    assert type(send.to) is tuple and type(ack.ids) is tuple
    refusal = {"type": "receipt", "id": "m", "code": 3004}
    assert Receipt.from_wire(refusal).results is not Receipt.from_wire(refusal).results
    result = RecipientResult(Status.QUEUED)
    assert result.to_wire() is not result.to_wire()


# -------------------------------------------------------- SEND notify, STATUS, STATUS_ACK


def test_a_send_without_notify_is_byte_identical_to_one_from_before_notify() -> None:
    """notify is written only when true: absent and false are the same SEND, and the same bytes."""
    before = cbor2.dumps({"type": "send", "id": "m1", "to": ["bob"], "body": b"hi"})
    assert encode_frame(Send(id="m1", to=("bob",), body=b"hi"))[4:] == before
    assert encode_frame(Send(id="m1", to=("bob",), body=b"hi", notify=False))[4:] == before
    explicit_false = cbor2.dumps({"type": "send", "id": "m1", "to": ["bob"], "body": b"hi", "notify": False})
    assert decode_body(explicit_false) == Send(id="m1", to=("bob",), body=b"hi")
    assert decode_body(before).notify is False
    with_notify = Send(id="m1", to=("bob",), body=b"hi", notify=True)
    assert with_notify.to_wire() == {"type": "send", "id": "m1", "to": ("bob",), "body": b"hi", "notify": True}
    assert decode_body(encode_frame(with_notify)[4:]).notify is True


@pytest.mark.parametrize("value", [None, 0, 1, "true", [True], 1.0])
def test_send_notify_must_be_a_boolean(value: Any) -> None:
    body = cbor2.dumps({"type": "send", "id": "m1", "to": ["bob"], "body": b"", "notify": value})
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is ErrorCode.INVALID_FIELD
    if value is not None:
        with pytest.raises(ValueError):
            Send(id="m1", to=("bob",), body=b"", notify=value)


def test_status_states_are_not_receipt_results() -> None:
    """The two "delivered"s are different words in different frames: ReportState is not Status."""
    assert ReportState.DELIVERED == Status.DELIVERED == "delivered"  # the same text on the wire ...
    assert ReportState.DELIVERED is not Status.DELIVERED  # ... but not the same thing
    assert [s.value for s in ReportState] == ["delivered", "expired", "overflow"]
    with pytest.raises(ValueError):
        StatusReport(seq=1, state=Status.DELIVERED, at=0, id="m1", recipient="bob")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StatusReport(seq=1, state="delivered", at=0, id="m1", recipient="bob")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"seq": 0, "state": ReportState.DELIVERED, "at": 0, "id": "m1", "recipient": "bob"},
        {"seq": 1, "state": ReportState.DELIVERED, "at": -1, "id": "m1", "recipient": "bob"},
        {"seq": 1, "state": ReportState.DELIVERED, "at": 0, "recipient": "bob"},
        {"seq": 1, "state": ReportState.EXPIRED, "at": 0, "id": "m1"},
        {"seq": 1, "state": ReportState.EXPIRED, "at": 0, "id": "m1", "recipient": "-bob"},
        {"seq": 1, "state": ReportState.EXPIRED, "at": 0, "id": "m 1", "recipient": "bob"},
        {"seq": 1, "state": ReportState.DELIVERED, "at": 0, "id": "m1", "recipient": "bob", "count": 1},
        {"seq": 1, "state": ReportState.DELIVERED, "at": 0, "id": "m1", "recipient": "bob", "first_seq": 1},
        {"seq": 1, "state": ReportState.OVERFLOW, "at": 0, "first_seq": 1},
        {"seq": 1, "state": ReportState.OVERFLOW, "at": 0, "count": 1},
        {"seq": 1, "state": ReportState.OVERFLOW, "at": 0, "count": 0, "first_seq": 1},
        {"seq": 1, "state": ReportState.OVERFLOW, "at": 0, "count": 1, "first_seq": 2},
        {"seq": 2, "state": ReportState.OVERFLOW, "at": 0, "count": 1, "first_seq": 1, "id": "m1"},
        {"seq": 2, "state": ReportState.OVERFLOW, "at": 0, "count": 1, "first_seq": 1, "recipient": "bob"},
        {"seq": True, "state": ReportState.DELIVERED, "at": 0, "id": "m1", "recipient": "bob"},
    ],
)
def test_an_illegal_status_cannot_be_built_or_decoded(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StatusReport(**fields)
    body = cbor2.dumps(
        {"type": "status", **{k: v.value if isinstance(v, ReportState) else v for k, v in fields.items()}}
    )
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_status_fields_on_the_wire_follow_the_state() -> None:
    delivered = StatusReport(seq=7, state=ReportState.DELIVERED, at=3, id="m1", recipient="bob")
    assert delivered.to_wire() == {
        "type": "status",
        "seq": 7,
        "state": "delivered",
        "at": 3,
        "id": "m1",
        "recipient": "bob",
    }
    overflow = StatusReport(seq=9, state=ReportState.OVERFLOW, at=4, count=12, first_seq=8)
    assert overflow.to_wire() == {"type": "status", "seq": 9, "state": "overflow", "at": 4, "count": 12, "first_seq": 8}
    assert decode_body(encode_frame(overflow)[4:]) == overflow
    assert decode_body(encode_frame(delivered)[4:]).state is ReportState.DELIVERED


@pytest.mark.parametrize("seqs", [(), [], (0,), (1, 0), ("1",), (True,), (2**63,), 5])
def test_an_illegal_status_ack_cannot_be_built_or_decoded(seqs: Any) -> None:
    with pytest.raises(ValueError):
        StatusAck(seqs=seqs)
    body = cbor2.dumps({"type": "status_ack", "seqs": list(seqs) if isinstance(seqs, tuple | list) else seqs})
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_status_ack_keeps_its_seqs_as_a_tuple() -> None:
    assert StatusAck(seqs=[3, 1, 3]).seqs == (3, 1, 3)  # repeats and any order: unknown and repeated seqs are ignored
    assert decode_body(cbor2.dumps({"type": "status_ack", "seqs": [1, 2**53 - 1]})) == StatusAck(seqs=(1, 2**53 - 1))


# ---------------------------------------------------------------- key directory frames

RECORD = {"ik": b"\x01" * 32, "kid": "0123456789abcdef", "ek": b"\x02" * 32, "sig": b"\x03" * 64}


@pytest.mark.parametrize(
    "change",
    [
        {"ik": b"\x01" * 31},
        {"ik": b"\x01" * 33},
        {"ik": "01" * 32},
        {"ek": b""},
        {"ek": b"\x02" * 64},
        {"sig": b"\x03" * 63},
        {"sig": b"\x03" * 65},
        {"kid": ""},
        {"kid": "a b"},
        {"kid": "k" * 65},
        {"kid": "caf\u00e9"},
        {"kid": 7},
        {"ik": None},
        {"sig": None},
    ],
)
def test_a_key_record_of_the_wrong_shape_cannot_be_built_or_decoded(change: dict[str, Any]) -> None:
    record = {k: v for k, v in {**RECORD, **change}.items() if v is not None}
    with pytest.raises(ValueError):
        KeyRecord.from_map(record)
    for frame in ({"type": "key_put", "key": record}, {"type": "key_get_result", "keys": {"bob": record}}):
        with pytest.raises(RemoteProtocolError) as info:
            decode_body(cbor2.dumps(frame))
        assert info.value.code is ErrorCode.INVALID_FIELD


def test_a_key_record_ignores_unknown_keys_and_keeps_its_field_order() -> None:
    record = KeyRecord.from_map({"x": [1], **RECORD})
    assert list(record.to_map()) == ["ik", "kid", "ek", "sig"]
    frame = decode_body(cbor2.dumps({"type": "key_put", "key": {"sig": RECORD["sig"], "x": 1, **RECORD}}))
    assert frame == KeyPut(key=KeyRecord(**RECORD))


@pytest.mark.parametrize("key", [None, [], "k", b"k" * 160, {"ik": b"\x01" * 32}])
def test_key_put_needs_a_key_record(key: Any) -> None:
    m: dict[str, Any] = {"type": "key_put"}
    if key is not None:
        m["key"] = key
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(cbor2.dumps(m))
    assert info.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize("mailboxes", [(), [], "bob", ("bob", 7), ("b" * 65,), (b"bob",), None])
def test_an_illegal_key_get_cannot_be_built_or_decoded(mailboxes: Any) -> None:
    with pytest.raises(ValueError):
        KeyGet(mailboxes=mailboxes)
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(cbor2.dumps({"type": "key_get", "mailboxes": mailboxes}))
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_key_get_takes_any_short_text_and_repeats() -> None:
    names = ("", "bob", "bob", "not a mailbox!", "\U0001f680" * 64)
    frame = decode_body(cbor2.dumps({"type": "key_get", "mailboxes": list(names)}))
    assert frame == KeyGet(mailboxes=names)
    assert type(frame.mailboxes) is tuple  # type: ignore[attr-defined]


@pytest.mark.parametrize("mailbox", ["", "-bob", "b" * 65, "a b"])
def test_key_get_result_is_keyed_by_mailbox_ids(mailbox: str) -> None:
    with pytest.raises(ValueError):
        KeyGetResult(keys={mailbox: KeyRecord(**RECORD)})
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(cbor2.dumps({"type": "key_get_result", "keys": {mailbox: RECORD}}))
    assert info.value.code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize("fields", [{}, {"kid": "k k"}, {"kid": "k", "code": 999}, {"kid": "k", "code": "3009"}])
def test_an_illegal_key_put_result_cannot_be_decoded(fields: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(cbor2.dumps({"type": "key_put_result", **fields}))
    assert info.value.code is ErrorCode.INVALID_FIELD


def test_the_largest_key_get_result_fits_the_receipt_bound() -> None:
    """Every KEY_GET_RESULT a broker allowing max_recipients elements per KEY_GET sends fits its frame limit."""
    record = KeyRecord(ik=bytes(32), kid="~" * 64, ek=bytes(32), sig=bytes(64))
    for n in (1, 3, 100, 3718):
        keys = {f"{i:0>64}": record for i in range(n)}
        assert len(encode_frame(KeyGetResult(keys=keys))) - 4 <= receipt_bound_bytes(n)
