"""The connection state machine: every (role, state, frame) pair, and a whole conversation."""

from __future__ import annotations

import itertools

import pytest

from wire import (
    FRAME_TYPES,
    TRANSITIONS,
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
    Hello,
    KeyGet,
    KeyGetResult,
    KeyPut,
    KeyPutResult,
    KeyRecord,
    LocalProtocolError,
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
    encode_frame,
)

from .support import welcome

C, B = Role.CLIENT, Role.BROKER
HS, AU, OP, X = State.HANDSHAKE, State.AUTHENTICATING, State.OPEN, State.CLOSED

# The table as protocol.md states it, written out independently of wire/connection.py.
EXPECTED = {
    (C, HS, "hello"): AU,
    (B, AU, "welcome"): OP,
    **{
        (C, OP, t): OP
        for t in ("send", "ack", "status_ack", "pull", "ping", "stats", "cleanup", "key_put", "key_get", "refresh")
    },
    **{
        (B, OP, t): OP
        for t in (
            "receipt",
            "deliver",
            "status",
            "drained",
            "pong",
            "stats_result",
            "cleanup_result",
            "key_put_result",
            "key_get_result",
            "refreshed",
        )
    },
    (C, OP, "bye"): X,
}

KEY = KeyRecord(ik=bytes(32), kid="0123456789abcdef", ek=bytes(32), sig=bytes(64))

SAMPLES: dict[str, Frame] = {
    "hello": Hello(version=1, token="t"),
    "welcome": welcome(),
    "send": Send(id="m1", to=("bob",), body=b"hi"),
    "receipt": Receipt(id="m1", results={"bob": RecipientResult(Status.QUEUED)}),
    "deliver": Deliver(id="m1", sender="alice", sent_at=1, expires_at=2, attempt=1, body=b"hi"),
    "ack": Ack(ids=("m1",)),
    "status": StatusReport(seq=1, state=ReportState.DELIVERED, at=5, id="m1", recipient="bob"),
    "status_ack": StatusAck(seqs=(1,)),
    "pull": Pull(),
    "drained": Drained(pending=0),
    "ping": Ping(),
    "pong": Pong(),
    "error": Error(code=1001, message="x", close=True),
    "bye": Bye(),
    "stats": Stats(),
    "stats_result": StatsResult(stats={"connections": 1}),
    "cleanup": Cleanup(),
    "cleanup_result": CleanupResult(purged=0),
    "key_put": KeyPut(key=KEY),
    "key_put_result": KeyPutResult(kid=KEY.kid),
    "key_get": KeyGet(mailboxes=("bob",)),
    "key_get_result": KeyGetResult(keys={"bob": KEY}),
    "refresh": Refresh(token="t"),
    "refreshed": Refreshed(expires_in_s=60),
}
ERRORS = {
    "error_close": Error(code=int(ErrorCode.SHUTTING_DOWN), message="bye", close=True),
    "error_open": Error(code=int(ErrorCode.FORBIDDEN), message="no", close=False),
}


def expected_next(sender: Role, state: State, name: str, frame: Frame) -> State | None:
    """What protocol.md says: ERROR from the broker closes (close=true, any state but CLOSED) or
    keeps OPEN (close=false, OPEN only); everything else per the table."""
    if isinstance(frame, Error):
        if sender is not B or state is X:
            return None
        if frame.close:
            return X
        return OP if state is OP else None
    return EXPECTED.get((sender, state, name))


def test_transition_table_is_the_documented_one() -> None:
    assert {(r, s, cls.TYPE): nxt for (r, s, cls), nxt in TRANSITIONS.items()} == EXPECTED


def test_samples_cover_every_frame_type() -> None:
    assert set(SAMPLES) == set(FRAME_TYPES)


CASES = [
    (receiver, state, name, frame)
    for receiver, state, (name, frame) in itertools.product(
        Role, State, [*((n, f) for n, f in SAMPLES.items() if n != "error"), *ERRORS.items()]
    )
]


@pytest.mark.parametrize(
    ("receiver", "state", "name", "frame"),
    CASES,
    ids=[f"{r.value}-{s.value}-{n}" for r, s, n, _ in CASES],
)
def test_receive_accepts_exactly_the_table(receiver: Role, state: State, name: str, frame: Frame) -> None:
    conn = Connection(receiver)
    conn.state = state
    sender = B if receiver is C else C
    nxt = expected_next(sender, state, frame.TYPE, frame)
    if state is X:
        assert conn.receive_data(encode_frame(frame)) == []  # bytes after the end are ignored (protocol.md 5)
        assert conn.state is X
    elif nxt is None:
        with pytest.raises(RemoteProtocolError) as info:
            conn.receive_data(encode_frame(frame))
        assert info.value.code is ErrorCode.UNEXPECTED_FRAME
        assert conn.state is X
    else:
        assert conn.receive_data(encode_frame(frame)) == [frame]
        assert conn.state is nxt


@pytest.mark.parametrize(
    ("sender", "state", "name", "frame"),
    CASES,
    ids=[f"{r.value}-{s.value}-{n}" for r, s, n, _ in CASES],
)
def test_send_allows_exactly_the_table(sender: Role, state: State, name: str, frame: Frame) -> None:
    conn = Connection(sender)
    conn.state = state
    if isinstance(frame, Error) and frame.close:
        # A closing ERROR goes through send_error: the broker may always send one (even in
        # CLOSED, after the peer's violation); a client never sends ERROR and just closes.
        assert conn.send(frame) == (encode_frame(frame) if sender is B else b"")
        assert conn.state is X
        return
    nxt = expected_next(sender, state, frame.TYPE, frame)
    if state is X:
        assert conn.send(frame) == b""  # the connection is over: nothing more goes on the wire
        assert conn.state is X
    elif nxt is None:
        with pytest.raises(LocalProtocolError) as info:
            conn.send(frame)
        assert info.value.code is ErrorCode.UNEXPECTED_FRAME
        assert conn.state is state
    else:
        assert conn.send(frame) == encode_frame(frame)
        assert conn.state is nxt


def test_illegal_frame_after_legal_ones_in_one_chunk_closes() -> None:
    broker = Connection(B)
    data = encode_frame(SAMPLES["hello"]) + encode_frame(SAMPLES["send"])
    with pytest.raises(RemoteProtocolError) as info:
        broker.receive_data(data)
    assert info.value.code is ErrorCode.UNEXPECTED_FRAME
    assert broker.state is X


def test_codec_error_closes_the_connection() -> None:
    broker = Connection(B)
    with pytest.raises(RemoteProtocolError) as info:
        broker.receive_data(b"\xff\xff\xff\xff")
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert broker.state is X
    assert broker.receive_data(encode_frame(Ping())) == []


def test_broker_send_error_closes_with_an_error_frame_once() -> None:
    broker = Connection(B)
    data = broker.send_error(ErrorCode.HANDSHAKE_TIMEOUT, "no hello")
    assert broker.state is X
    client = Connection(C)
    assert client.receive_data(data) == [Error(code=1007, message="no hello", close=True)]
    assert client.state is X
    assert broker.send_error(ErrorCode.INTERNAL_ERROR, "again") == b""


def test_broker_can_report_the_violation_that_closed_it() -> None:
    broker = Connection(B)
    with pytest.raises(RemoteProtocolError) as info:
        broker.receive_data(encode_frame(SAMPLES["send"]))
    assert broker.state is X
    data = broker.send_error(info.value.code, info.value.message)
    client = Connection(C)
    (error,) = client.receive_data(data)
    assert error == Error(code=1003, message=info.value.message, close=True)
    assert broker.send_error(ErrorCode.INTERNAL_ERROR, "again") == b""


def test_client_send_error_just_closes() -> None:
    client = Connection(C)
    client.state = OP
    assert client.send_error(ErrorCode.MALFORMED_FRAME, "broker sent garbage") == b""
    assert client.state is X


def pump(src: Connection, dst: Connection, *frames: Frame) -> list[Frame]:
    data = b"".join(src.send(f) for f in frames)
    # deliver in two uneven pieces to exercise buffering across calls
    cut = len(data) // 3
    return dst.receive_data(data[:cut]) + dst.receive_data(data[cut:])


def test_happy_path_conversation() -> None:
    client, broker = Connection(C), Connection(B)
    assert pump(client, broker, SAMPLES["hello"]) == [SAMPLES["hello"]]
    assert client.state is broker.state is AU
    welcome = SAMPLES["welcome"]
    assert pump(broker, client, welcome) == [welcome]
    assert client.state is broker.state is OP
    client.max_frame_bytes = welcome.max_frame_bytes

    deliveries = [
        Deliver(id=f"m{i}", sender="bob", sent_at=1000, expires_at=2000, attempt=1, body=b"x") for i in range(3)
    ]
    got = pump(broker, client, *deliveries, Drained(pending=3))
    assert got == [*deliveries, Drained(pending=3)]
    assert pump(client, broker, Ack(ids=tuple(d.id for d in deliveries))) == [Ack(ids=("m0", "m1", "m2"))]

    send = Send(id="out1", to=("bob", "carol"), body=b"hello", ttl_s=60, notify=True)
    assert pump(client, broker, send) == [send]
    # A STATUS may come before the RECEIPT of its SEND (protocol.md section 9, rule 19).
    status = StatusReport(seq=10, state=ReportState.DELIVERED, at=1500, id="out1", recipient="bob")
    receipt = Receipt(
        id="out1",
        results={"bob": RecipientResult(Status.DELIVERED), "carol": RecipientResult(Status.REFUSED, 3001)},
    )
    assert pump(broker, client, status, receipt) == [status, receipt]
    assert pump(client, broker, StatusAck(seqs=(10,))) == [StatusAck(seqs=(10,))]
    assert pump(client, broker, Pull(), Ping()) == [Pull(), Ping()]
    assert pump(broker, client, Drained(pending=0), Pong()) == [Drained(pending=0), Pong()]
    assert pump(client, broker, Stats()) == [Stats()]
    forbidden = Error(code=int(ErrorCode.FORBIDDEN), message="operator only", close=False)
    assert pump(broker, client, forbidden) == [forbidden]
    assert client.state is broker.state is OP
    assert pump(client, broker, Bye()) == [Bye()]
    assert client.state is broker.state is X
    assert client.send(Ping()) == b""
    assert client.receive_data(encode_frame(Pong())) == []  # a straggler after BYE


def test_operator_conversation_and_takeover_error() -> None:
    client, broker = Connection(C), Connection(B)
    pump(client, broker, Hello(version=1, token="op", agent="relay-cli"))
    operator_welcome = welcome(session="s2", mailbox=None)
    assert pump(broker, client, operator_welcome) == [operator_welcome]
    assert pump(client, broker, Stats(), Cleanup()) == [Stats(), Cleanup()]
    results = [StatsResult(stats={"connections": 1, "inflight": 0}), CleanupResult(purged=7)]
    assert pump(broker, client, *results) == results
    shutdown = Error(code=int(ErrorCode.SHUTTING_DOWN), message="stopping", close=True)
    assert pump(broker, client, shutdown) == [shutdown]
    assert client.state is broker.state is X


MALFORMED = b"\x00\x00\x00\x01\xff"  # a lone break byte: not CBOR


def test_a_frame_in_the_wrong_state_before_a_malformed_one_is_reported_first() -> None:
    """Frames are judged in order, each decoded before its state is checked: the first bad frame decides."""
    conn = Connection(B)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data(encode_frame(Ping()) + MALFORMED)
    assert info.value.code == ErrorCode.UNEXPECTED_FRAME
    assert conn.state is X


def test_a_malformed_frame_in_the_wrong_state_is_malformed() -> None:
    """Decoding comes before the state check: a broken SEND before HELLO is 1001, an ill-typed one 1004."""
    for data, code in ((MALFORMED, ErrorCode.MALFORMED_FRAME), (_send_without_body(), ErrorCode.INVALID_FIELD)):
        conn = Connection(B)
        with pytest.raises(RemoteProtocolError) as info:
            conn.receive_data(data)
        assert info.value.code == code


def _send_without_body() -> bytes:
    import cbor2

    body = cbor2.dumps({"type": "send", "id": "m", "to": ["bob"]})
    return len(body).to_bytes(4, "big") + body


def test_a_broker_accepts_only_small_frames_before_welcome() -> None:
    """Until WELCOME, MAX_HELLO_FRAME_BYTES bounds what an unauthenticated peer can make the broker buffer."""
    from wire import MAX_HELLO_FRAME_BYTES

    conn = Connection(B, max_frame_bytes=1024 * 1024)
    with pytest.raises(RemoteProtocolError) as info:
        conn.receive_data((MAX_HELLO_FRAME_BYTES + 1).to_bytes(4, "big"))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    conn = Connection(B, max_frame_bytes=1024 * 1024)
    conn.receive_data(encode_frame(Hello(version=1, token="t" * 4096, agent="\U0001f600" * 256)))
    conn.send(welcome())
    assert conn.state is OP
    assert conn.receive_data(encode_frame(Send(id="m", to=("bob",), body=b"x" * 100_000)))  # the full limit now
    client = Connection(C, max_frame_bytes=1024 * 1024)  # a client has no such bound: it talks to its broker
    client.send(Hello(version=1, token="t"))
    assert client.receive_data(encode_frame(Error(code=1002, message="x" * 4096, close=True)))


def test_broker_error_messages_are_cut_to_fit_any_frame_limit() -> None:
    from wire import MAX_ERROR_MESSAGE_CHARS, decode_body

    conn = Connection(B)
    data = conn.send_error(ErrorCode.UNKNOWN_FRAME_TYPE, "\U0001f600" * 5000)
    frame = decode_body(data[4:])
    assert isinstance(frame, Error) and len(frame.message) == MAX_ERROR_MESSAGE_CHARS
    assert len(data) - 4 < 1024


# -------------------------------------------------------- the hot sends (send_send, send_receipts, send_delivers)

HOT = {
    "send": lambda conn, f: conn.send_send(f.id, f.to, f.body, f.ttl_s, notify=f.notify),
    # The batch sends take anything with the frame's fields, the frame itself included; [] in CLOSED.
    "receipt": lambda conn, f: b"".join(conn.send_receipts([f])),
    "deliver": lambda conn, f: b"".join(conn.send_delivers([f])),
    "status": lambda conn, f: b"".join(conn.send_statuses([f])),
}
HOT_CASES = list(itertools.product(Role, State, HOT))


@pytest.mark.parametrize(
    ("sender", "state", "name"), HOT_CASES, ids=[f"{r.value}-{s.value}-{n}" for r, s, n in HOT_CASES]
)
def test_hot_sends_allow_exactly_the_table(sender: Role, state: State, name: str) -> None:
    """Each hot send decides as send(frame) does: the bytes of the frame, b"" in CLOSED, else LocalProtocolError."""
    conn = Connection(sender)
    conn.state = state
    frame = SAMPLES[name]
    nxt = expected_next(sender, state, name, frame)
    if state is X:
        assert HOT[name](conn, frame) == b""
        assert conn.state is X
    elif nxt is None:
        with pytest.raises(LocalProtocolError) as info:
            HOT[name](conn, frame)
        assert info.value.code is ErrorCode.UNEXPECTED_FRAME
        assert conn.state is state
    else:
        assert HOT[name](conn, frame) == encode_frame(frame)
        assert conn.state is nxt


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize(
    "fields",
    [
        {"id": "m 1", "to": ("bob",), "body": b""},
        {"id": "m1", "to": (), "body": b""},
        {"id": "m1", "to": ("x" * 65,), "body": b""},
        {"id": "m1", "to": "bob", "body": b""},
        {"id": "m1", "to": ("bob",), "body": "text"},
        {"id": "m1", "to": ("bob",), "body": b"", "ttl_s": 0},
        {"id": "m1", "to": ("bob",), "body": b"", "notify": 1},
        {"id": "m1", "to": ("bob",), "body": b"", "notify": None},
    ],
)
def test_send_send_refuses_invalid_fields_in_every_state(state: State, fields: dict) -> None:
    """The fields are checked by SEND's own validator first (what Send(...) would refuse), whatever the state."""
    with pytest.raises(ValueError):
        Send(**fields)
    conn = Connection(C)
    conn.state = state
    with pytest.raises(ValueError):
        conn.send_send(**fields)
    assert conn.state is state
