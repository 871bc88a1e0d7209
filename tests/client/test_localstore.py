"""The local SQLite store: de-duplication by (sender, id), the emitted flag, per-recipient state of sent messages
and delivery statuses, migration of older schemas, durability settings, and both export formats."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from client import Delivery, LocalStore
from client.localstore import (
    SCHEMA_VERSION,
    SECURITY_NOTE,
    SENT_NOTE,
    Contact,
    RecipientState,
    SentMessage,
    StoredKey,
    StoredStatus,
)

T0 = int(dt.datetime(2024, 5, 1, 14, 3, 7, tzinfo=dt.UTC).timestamp() * 1000)


@dataclass(frozen=True)
class Notice:
    """A delivery status as the store takes it (the fields of ``wire.StatusReport``)."""

    seq: int
    state: str
    at: int
    id: str | None = None
    recipient: str | None = None
    count: int | None = None
    first_seq: int | None = None


def status(seq: int, state: str, mid: str, recipient: str, *, at: int = T0 + 60_000) -> Notice:
    return Notice(seq, state, at, mid, recipient)


def overflow(seq: int, count: int, *, first_seq: int | None = None, at: int = T0 + 90_000) -> Notice:
    return Notice(seq, "overflow", at, count=count, first_seq=seq if first_seq is None else first_seq)


def delivery(
    mid: str,
    body: bytes,
    *,
    sender: str = "alice",
    at: int = T0,
    attempt: int = 1,
    security: str = "e2e",
    error: str | None = None,
) -> Delivery:
    return Delivery(mid, sender, at, at + 3_600_000, attempt, body, security, error)


def test_saving_the_same_message_twice_keeps_one_copy(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.save_incoming("bob", [delivery("a", b"1"), delivery("b", b"2")]) == [True, True]
        assert store.save_incoming("bob", [delivery("b", b"2", attempt=2), delivery("c", b"3")]) == [False, True]
        assert [m.id for m in store.messages("bob")] == ["a", "b", "c"]
        # the same id for another mailbox in the same file is another message
        assert store.save_incoming("carol", [delivery("a", b"1")]) == [True]
        assert store.count() == 4 and store.mailboxes() == ["bob", "carol"]


def test_another_senders_message_with_a_reused_id_is_a_new_message(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.save_incoming("bob", [delivery("z-1", b"from alice", sender="alice")]) == [True]
        # alice's z-1 expired at the broker; carol may now use the id
        assert store.save_incoming("bob", [delivery("z-1", b"from carol", sender="carol", at=T0 + 5000)]) == [True]
        # a redelivery of either is still a copy, in any batch
        again = [delivery("z-1", b"from carol", sender="carol", attempt=2), delivery("z-1", b"from alice")]
        assert store.save_incoming("bob", again) == [False, False]
        assert [(m.sender, m.id, m.body) for m in store.messages("bob")] == [
            ("alice", "z-1", b"from alice"),
            ("carol", "z-1", b"from carol"),
        ]


def test_unemitted_messages_come_back_until_marked(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.save_incoming("bob", [delivery("a", b"1"), delivery("z", b"2"), delivery("z", b"3", sender="carol")])
        store.save_incoming("carol", [delivery("a", b"1")])
        store.record_outgoing("bob", [SentMessage("o", {"alice": "queued"}, b"out")], sent_at=T0)
        assert [m.key for m in store.unemitted("bob")] == [("alice", "a"), ("alice", "z"), ("carol", "z")]
        assert [m.key for m in store.unemitted("bob", limit=1)] == [("alice", "a")]
        assert store.mark_emitted("bob", [("alice", "a"), ("carol", "z"), ("carol", "nope")]) == 2
        assert store.mark_emitted("bob", [("alice", "a")]) == 0
        assert [m.key for m in store.unemitted("bob")] == [("alice", "z")]
        assert [m.key for m in store.unemitted("carol")] == [("alice", "a")]  # per mailbox
        assert [(m.id, m.emitted) for m in store.messages("bob", direction="in")] == [
            ("a", True),
            ("z", False),
            ("z", True),
        ]
    with LocalStore(tmp_path / "s.sqlite3") as again:  # durable
        assert [m.key for m in again.unemitted("bob")] == [("alice", "z")]


FIRST_SCHEMA = """
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,
    mailbox     TEXT    NOT NULL,
    direction   TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
    id          TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    recipients  TEXT    NOT NULL,
    sent_at     INTEGER NOT NULL,
    expires_at  INTEGER,
    saved_at    INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    UNIQUE (mailbox, direction, id)
);
CREATE INDEX messages_by_time ON messages (mailbox, sent_at);
"""
"""The schema before version 2, exactly as the first release created it (user_version 0)."""


def test_a_store_with_the_first_schema_is_migrated_in_place_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(FIRST_SCHEMA)
    rows = [
        ("bob", "in", "z-1", "alice", '["bob"]', T0, T0 + 1000, T0 + 10, b"from alice"),
        ("bob", "in", "m-2", "alice", '["bob"]', T0 + 1, T0 + 3_600_000, T0 + 11, b"\xff\x00"),
        ("bob", "out", "z-1", "bob", '["alice", "carol"]', T0 + 2, None, T0 + 2, b"reply"),
        ("carol", "in", "z-1", "alice", '["carol"]', T0 + 3, T0 + 1000, T0 + 12, b"to carol"),
    ]
    old.executemany(
        "INSERT INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    old.commit()
    assert old.execute("PRAGMA user_version").fetchone()[0] == 0
    old.close()

    with LocalStore(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        got = [(m.mailbox, m.direction, m.id, m.sender, json.dumps(list(m.recipients)), m.sent_at, m.expires_at,
                m.saved_at, m.body) for m in store.messages()]  # fmt: skip
        assert got == rows
        assert {(m.security, m.security_error) for m in store.messages()} == {("plaintext", None)}
        assert store.unemitted("bob") == []  # the first schema kept no record: counted as emitted
        # the new identity applies to the migrated rows
        assert store.save_incoming("bob", [delivery("z-1", b"from alice")]) == [False]
        assert store.save_incoming("bob", [delivery("z-1", b"from carol", sender="carol")]) == [True]
        assert [m.key for m in store.unemitted("bob")] == [("carol", "z-1")]
        # the sent message has a state per recipient: accepted, receipt word not kept, no status asked
        assert store.recipient_states() == [
            RecipientState("bob", "z-1", "alice", None, False, None, None, None),
            RecipientState("bob", "z-1", "carol", None, False, None, None, None),
        ]
    with LocalStore(path) as again:  # opening a current store changes nothing
        assert again.count() == 5 and again._db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert len(again.recipient_states()) == 2


SECOND_SCHEMA = """
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,
    mailbox     TEXT    NOT NULL,
    direction   TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
    id          TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    recipients  TEXT    NOT NULL,
    sent_at     INTEGER NOT NULL,
    expires_at  INTEGER,
    saved_at    INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    emitted     INTEGER NOT NULL DEFAULT 0 CHECK (emitted IN (0, 1)),
    UNIQUE (mailbox, direction, sender, id)
);
CREATE INDEX messages_by_time ON messages (mailbox, sent_at);
CREATE INDEX messages_unemitted ON messages (mailbox, seq) WHERE direction = 'in' AND emitted = 0;
PRAGMA user_version = 2;
"""
"""Schema version 2, exactly as that release created it: no per-recipient state of sent messages."""


def test_a_store_with_schema_2_gets_a_state_per_recipient_of_each_sent_message(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(SECOND_SCHEMA)
    old.executemany(
        "INSERT INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body,"
        " emitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("alice", "out", "m1", "alice", '["bob", "carol"]', T0, None, T0, b"to both", 0),
            ("alice", "in", "r1", "bob", '["alice"]', T0 + 1, T0 + 99, T0 + 1, b"reply", 0),
            ("dave", "out", "m1", "dave", '["alice"]', T0 + 2, None, T0 + 2, b"other mailbox", 0),
        ],
    )
    old.commit()
    old.close()

    with LocalStore(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert [(m.id, m.security) for m in store.messages()] == [("m1", "plaintext"), ("r1", "plaintext"),
                                                                  ("m1", "plaintext")]  # fmt: skip
        assert [m.key for m in store.unemitted("alice")] == [("bob", "r1")]  # schema 2's flags are kept
        assert [(s.mailbox, s.id, s.recipient, s.receipt, s.notify, s.state) for s in store.recipient_states()] == [
            ("alice", "m1", "bob", None, False, "queued"),
            ("alice", "m1", "carol", None, False, "queued"),
            ("dave", "m1", "alice", None, False, "queued"),
        ]
        assert store.unemitted_statuses("alice") == []
        # a status for a migrated message fills in its state
        assert store.save_statuses("alice", [status(7, "delivered", "m1", "carol")]) == [True]
        assert [s.state for s in store.recipient_states("alice", id="m1")] == ["queued", "delivered"]


def test_a_store_from_a_newer_client_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    with LocalStore(path) as store:
        store.save_incoming("bob", [delivery("a", b"1")])
        store._db.execute("PRAGMA user_version = 99")
    with pytest.raises(sqlite3.DatabaseError, match="schema version 99, newer than this client's"):
        LocalStore(path)
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    check.close()


def test_store_persists_and_uses_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "s.sqlite3"
    with LocalStore(path) as store:
        store.save_incoming("bob", [delivery("a", b"\xff\x00")])
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with LocalStore(path) as again:
        [m] = again.messages("bob")
        assert (m.direction, m.id, m.sender, m.recipients, m.body) == ("in", "a", "alice", ("bob",), b"\xff\x00")


def test_outgoing_and_incoming_with_the_same_id_are_both_kept(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.record_outgoing("alice", [SentMessage("self", {"alice": "delivered"}, b"note")], sent_at=T0) == 1
        assert store.record_outgoing("alice", [SentMessage("self", {"alice": "delivered"}, b"note")], sent_at=T0) == 0
        assert store.save_incoming("alice", [delivery("self", b"note")]) == [True]
        assert [(m.direction, m.id) for m in store.messages("alice")] == [("out", "self"), ("in", "self")]
        assert store.count("alice", direction="out") == 1


def test_markdown_export_is_a_conversation_log(tmp_path: Path) -> None:
    day2 = T0 + 24 * 3_600_000
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.save_incoming("bob", [delivery("m1", b"hi bob\nhow are you?")])
        store.record_outgoing(
            "bob",
            [SentMessage("m2", {"alice": "queued", "carol": "delivered", "dave": "queued"}, b"fine!", True, "e2e")],
            sent_at=T0 + 2000,
        )
        store.save_incoming("bob", [delivery("m3", b"\x00\xffbin", at=day2, security="plaintext")])
        store.record_outgoing("bob", [SentMessage("m4", {"alice": "duplicate"}, b"quiet")], sent_at=day2 + 1000)
        store.save_incoming("bob", [delivery("m5", b"", at=day2 + 4000, security="failed", error="bad_signature")])
        store.save_statuses("bob", [
            status(1, "delivered", "m2", "alice", at=T0 + 5000),
            status(2, "expired", "m2", "dave", at=day2),
            status(3, "delivered", "m9", "erin", at=day2 + 2000),  # a message not in this store
            overflow(4, 2, at=day2 + 3000),
        ])  # fmt: skip
        text = store.export_markdown(tz=dt.UTC)
    assert text == (
        "# Relay conversation log — bob\n"
        "\n"
        f"{SECURITY_NOTE}\n"
        "\n"
        f"{SENT_NOTE}\n"
        "\n"
        "*The relay could not keep 2 delivery statuses (too many were waiting while the mailbox was away; latest at"
        " 2024-05-02 14:03:10): some sent messages below may say queued although they were delivered or expired.*\n"
        "\n"
        "## 2024-05-01\n"
        "\n"
        "**alice** → bob · 14:03:07\n"
        "> hi bob\n"
        "> how are you?\n"
        "\n"
        "**bob** → alice, carol, dave · 14:03:09\n"
        "> fine!\n"
        "*delivered to alice 14:03:12 · sent to carol's open session"
        " · expired before dave got it 2024-05-02 14:03:07*\n"
        "\n"
        "## 2024-05-02\n"
        "\n"
        "**alice** → bob · 14:03:07 · unencrypted\n"
        "> *(binary body, 5 bytes, shown as base64)*\n"
        "> `AP9iaW4=`\n"
        "\n"
        "**bob** → alice · 14:03:08 · unencrypted\n"
        "> quiet\n"
        "*queued for alice (no status asked)*\n"
        "\n"
        "**alice** → bob · 14:03:11 · failed (bad_signature)\n"
        "> *(not shown: it did not open or verify on this device, so it may not be from alice)*\n"
        "\n"
        "## Delivery statuses of messages not in this log\n"
        "\n"
        "- bob → `m9`: delivered to erin 2024-05-02 14:03:09\n"
    )


def test_json_export_lists_every_message(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.save_incoming("bob", [delivery("m1", "héllo".encode())])
        store.record_outgoing("bob", [SentMessage("m2", {"alice": "queued", "carol": "delivered"}, b"\xfe", True)],
                              sent_at=T0 + 1)  # fmt: skip
        store.save_incoming("bob", [delivery("m3", b"", at=T0 + 2, security="failed", error="not_for_me")])
        store.save_statuses("bob", [status(5, "delivered", "m2", "alice"), status(6, "expired", "m7", "carol"),
                                    overflow(8, 3)])  # fmt: skip
        doc = json.loads(store.export_json())
    assert doc == {
        "format": "relay-local-store/1",
        "messages": [
            {
                "mailbox": "bob",
                "direction": "in",
                "id": "m1",
                "from": "alice",
                "to": ["bob"],
                "sent_at": T0,
                "expires_at": T0 + 3_600_000,
                "body": "héllo",
                "security": "e2e",
            },
            {
                "mailbox": "bob",
                "direction": "out",
                "id": "m2",
                "from": "bob",
                "to": ["alice", "carol"],
                "sent_at": T0 + 1,
                "expires_at": None,
                "notify": True,
                "delivery": {
                    "alice": {"state": "delivered", "at": T0 + 60_000, "receipt": "queued"},
                    "carol": {"state": "queued", "receipt": "delivered"},
                },
                "body_base64": "/g==",
                "security": "plaintext",
            },
            {
                "mailbox": "bob",
                "direction": "in",
                "id": "m3",
                "from": "alice",
                "to": ["bob"],
                "sent_at": T0 + 2,
                "expires_at": T0 + 2 + 3_600_000,
                "body": "",
                "security": "failed",
                "security_error": "not_for_me",
            },
        ],
        "other_statuses": [
            {"mailbox": "bob", "id": "m7", "recipient": "carol", "state": "expired", "at": T0 + 60_000, "receipt": None}
        ],
        "status_overflows": [{"mailbox": "bob", "first_seq": 8, "seq": 8, "count": 3, "at": T0 + 90_000}],
    }


def test_empty_store_exports(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.export_markdown() == "# Relay conversation log — no messages\n"
        assert json.loads(store.export_json()) == {
            "format": "relay-local-store/1",
            "messages": [],
            "other_statuses": [],
            "status_overflows": [],
        }


def test_a_status_is_saved_once_and_a_redelivered_one_is_not_new(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.record_outgoing("alice", [SentMessage("m1", {"bob": "queued", "carol": "delivered"}, b"hi", True)])
        assert store.save_statuses("alice", [status(10, "delivered", "m1", "bob")]) == [True]
        # redelivered (same seq), alone or in a batch with a new one, and twice in one batch
        again = [status(10, "delivered", "m1", "bob"), status(11, "expired", "m1", "carol")]
        assert store.save_statuses("alice", again) == [False, True]
        assert store.save_statuses("alice", [overflow(12, 4), overflow(12, 4)]) == [True, False]
        assert [(s.recipient, s.receipt, s.notify, s.status, s.status_at, s.status_seq, s.state)
                for s in store.recipient_states("alice")] == [
            ("bob", "queued", True, "delivered", T0 + 60_000, 10, "delivered"),
            ("carol", "delivered", True, "expired", T0 + 60_000, 11, "expired"),
        ]  # fmt: skip
        assert [(o.seq, o.count) for o in store.status_overflows("alice")] == [(12, 4)]
        assert store.recipient_states("carol") == [] and store.status_overflows("carol") == []
    with LocalStore(tmp_path / "s.sqlite3") as again_store:  # durable: a redelivery after a restart is still old
        assert again_store.save_statuses("alice", [status(10, "delivered", "m1", "bob"), overflow(12, 4)]) == [
            False,
            False,
        ]


def test_a_status_that_arrives_before_its_receipt_is_kept_when_the_receipt_is_recorded(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.save_statuses("alice", [status(3, "delivered", "early", "bob")]) == [True]
        [before] = store.recipient_states("alice", id="early")
        assert (before.receipt, before.notify, before.state) == (None, True, "delivered")
        assert store.messages() == []
        store.record_outgoing("alice", [SentMessage("early", {"bob": "delivered", "carol": "queued"}, b"x", True)])
        assert [(s.recipient, s.receipt, s.status, s.status_seq) for s in store.recipient_states("alice")] == [
            ("bob", "delivered", "delivered", 3),
            ("carol", "queued", None, None),
        ]
        # a resend's "duplicate" receipt does not overwrite the first receipt, nor the status
        store.record_outgoing("alice", [SentMessage("early", {"bob": "duplicate"}, b"x", True)])
        assert [(s.receipt, s.state) for s in store.recipient_states("alice", id="early")] == [
            ("delivered", "delivered"),
            ("queued", "queued"),
        ]
        assert json.loads(store.export_json())["other_statuses"] == []


def test_a_newer_status_replaces_an_older_one_and_an_older_one_changes_nothing(tmp_path: Path) -> None:
    # An id used again after its message expired: the later message's status has the larger seq.
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.save_statuses("alice", [status(20, "expired", "m1", "bob", at=T0)]) == [True]
        assert store.save_statuses("alice", [status(30, "delivered", "m1", "bob", at=T0 + 9)]) == [True]
        assert store.save_statuses("alice", [status(25, "expired", "m1", "bob", at=T0 + 5)]) == [False]
        [s] = store.recipient_states("alice")
        assert (s.status, s.status_at, s.status_seq) == ("delivered", T0 + 9, 30)


def test_unemitted_statuses_come_back_in_seq_order_until_marked(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.record_outgoing("alice", [SentMessage("m1", {"bob": "queued"}, b"hi", True)])
        store.save_statuses(
            "alice", [status(9, "delivered", "m1", "bob"), overflow(5, 2), status(7, "expired", "m2", "carol")]
        )
        store.save_statuses("dave", [status(8, "delivered", "d1", "alice")])
        [first, *_] = unemitted = store.unemitted_statuses("alice")
        assert first == StoredStatus("alice", 5, "overflow", T0 + 90_000, None, None, 2, 5, first.saved_at)
        assert [(s.seq, s.state, s.id, s.recipient, s.count) for s in unemitted] == [
            (5, "overflow", None, None, 2),
            (7, "expired", "m2", "carol", None),
            (9, "delivered", "m1", "bob", None),
        ]
        assert [s.seq for s in store.unemitted_statuses("alice", limit=2)] == [5, 7]
        assert store.mark_statuses_emitted("alice", [5, 9, 8, 99]) == 2  # 8 is dave's
        assert store.mark_statuses_emitted("alice", [5]) == 0
        assert [s.seq for s in store.unemitted_statuses("alice")] == [7]
        assert [s.seq for s in store.unemitted_statuses("dave")] == [8]
        # a newer status for a marked (id, recipient) is unemitted again
        store.save_statuses("alice", [status(12, "expired", "m1", "bob")])
        assert [s.seq for s in store.unemitted_statuses("alice")] == [7, 12]
        # marking the replaced seq does not mark the newer one
        assert store.mark_statuses_emitted("alice", [9]) == 0
    with LocalStore(tmp_path / "s.sqlite3") as again:  # durable
        assert [s.seq for s in again.unemitted_statuses("alice")] == [7, 12]


def test_an_overflow_record_is_kept_once_per_first_seq_so_its_counts_add_up(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        # record A (first_seq 100) saved with count 5, then grew to 6 before its STATUS_ACK arrived: renumbered
        assert store.save_statuses("alice", [overflow(100, 5)]) == [True]
        assert store.save_statuses("alice", [overflow(140, 6, first_seq=100, at=T0 + 95_000)]) == [True]
        assert store.save_statuses("alice", [overflow(120, 5, first_seq=100)]) == [False]  # an older copy
        # the ACK of 140 landed: the next fold makes a fresh record
        assert store.save_statuses("alice", [overflow(200, 1), overflow(200, 1)]) == [True, False]
        assert [(o.first_seq, o.seq, o.count, o.at) for o in store.status_overflows("alice")] == [
            (100, 140, 6, T0 + 95_000),
            (200, 200, 1, T0 + 90_000),
        ]
        assert sum(o.count or 0 for o in store.status_overflows("alice")) == 7  # exactly what the relay folded
        assert [s.seq for s in store.unemitted_statuses("alice")] == [140, 200]


def test_record_outgoing_counts_new_messages_and_keeps_each_recipients_receipt(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        sent = [
            SentMessage("a", {"bob": "queued"}, b"1", True),
            SentMessage("b", {"bob": "delivered", "carol": "duplicate"}, b"2"),
        ]
        assert store.record_outgoing("alice", sent, sent_at=T0) == 2
        assert store.record_outgoing("alice", sent[:1], sent_at=T0) == 0
        assert [(m.id, m.recipients) for m in store.messages("alice")] == [("a", ("bob",)), ("b", ("bob", "carol"))]
        assert [(s.id, s.recipient, s.receipt, s.notify) for s in store.recipient_states("alice")] == [
            ("a", "bob", "queued", True),
            ("b", "bob", "delivered", False),
            ("b", "carol", "duplicate", False),
        ]
        assert store.unemitted_statuses("alice") == []  # a receipt is not a status


THIRD_SCHEMA = """
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,
    mailbox     TEXT    NOT NULL,
    direction   TEXT    NOT NULL CHECK (direction IN ('in', 'out')),
    id          TEXT    NOT NULL,
    sender      TEXT    NOT NULL,
    recipients  TEXT    NOT NULL,
    sent_at     INTEGER NOT NULL,
    expires_at  INTEGER,
    saved_at    INTEGER NOT NULL,
    body        BLOB    NOT NULL,
    emitted     INTEGER NOT NULL DEFAULT 0 CHECK (emitted IN (0, 1)),
    UNIQUE (mailbox, direction, sender, id)
);
CREATE TABLE recipient_states (
    mailbox     TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    recipient   TEXT    NOT NULL,
    receipt     TEXT    CHECK (receipt IN ('queued', 'delivered', 'duplicate')),
    notify      INTEGER NOT NULL DEFAULT 0 CHECK (notify IN (0, 1)),
    status      TEXT    CHECK (status IN ('delivered', 'expired')),
    status_at   INTEGER,
    status_seq  INTEGER,
    saved_at    INTEGER NOT NULL,
    emitted     INTEGER NOT NULL DEFAULT 1 CHECK (emitted IN (0, 1)),
    PRIMARY KEY (mailbox, id, recipient)
) WITHOUT ROWID;
CREATE TABLE status_overflows (
    mailbox     TEXT    NOT NULL,
    first_seq   INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    count       INTEGER NOT NULL CHECK (count >= 1),
    at          INTEGER NOT NULL,
    saved_at    INTEGER NOT NULL,
    emitted     INTEGER NOT NULL DEFAULT 0 CHECK (emitted IN (0, 1)),
    PRIMARY KEY (mailbox, first_seq)
) WITHOUT ROWID;
CREATE INDEX messages_by_time ON messages (mailbox, sent_at);
CREATE INDEX messages_unemitted ON messages (mailbox, seq) WHERE direction = 'in' AND emitted = 0;
CREATE INDEX recipient_states_unemitted ON recipient_states (mailbox, status_seq) WHERE emitted = 0;
PRAGMA user_version = 3;
"""
"""Schema version 3, exactly as that release created it: no keys, contacts or message security."""


def test_a_store_with_schema_3_keeps_its_rows_as_plaintext_and_gets_key_tables(tmp_path: Path) -> None:
    path = tmp_path / "v3.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(THIRD_SCHEMA)
    old.executemany(
        "INSERT INTO messages (mailbox, direction, id, sender, recipients, sent_at, expires_at, saved_at, body,"
        " emitted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("alice", "out", "m1", "alice", '["bob"]', T0, None, T0, b"to bob", 0),
            ("alice", "in", "r1", "bob", '["alice"]', T0 + 1, T0 + 99, T0 + 1, b"reply", 0),
        ],
    )
    old.execute(
        "INSERT INTO recipient_states (mailbox, id, recipient, receipt, notify, saved_at) VALUES (?, ?, ?, ?, ?, ?)",
        ("alice", "m1", "bob", "queued", 1, T0),
    )
    old.commit()
    old.close()
    path.chmod(0o644)  # as an earlier client left it (the umask's mode)

    with LocalStore(path) as store:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == 4
        assert [(m.id, m.body, m.security, m.security_error, m.emitted) for m in store.messages()] == [
            ("m1", b"to bob", "plaintext", None, False),
            ("r1", b"reply", "plaintext", None, False),
        ]
        assert [(s.receipt, s.notify) for s in store.recipient_states()] == [("queued", True)]
        assert store.device_keys("alice") is None and store.contacts("alice") == []
        assert store.save_incoming("alice", [delivery("r2", b"sealed", sender="bob")]) == [True]
        assert {m.id: m.security for m in store.messages("alice")}["r2"] == "e2e"
    assert path.stat().st_mode & 0o777 == 0o600


def test_the_store_and_its_wal_and_shm_files_are_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "new" / "s.sqlite3"
    with LocalStore(path) as store:
        store.save_incoming("bob", [delivery("a", b"secret")])  # writes the WAL
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["s.sqlite3", "s.sqlite3-shm", "s.sqlite3-wal"]
        assert {p.name: p.stat().st_mode & 0o777 for p in path.parent.iterdir()} == dict.fromkeys(files, 0o600)
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_existing_wal_and_shm_files_are_made_0600_on_open(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    with LocalStore(path) as store:
        store.save_incoming("bob", [delivery("a", b"secret")])
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).chmod(0o644)
        with LocalStore(path):
            names = {suffix: path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")}
            modes = {suffix: name.stat().st_mode & 0o777 for suffix, name in names.items()}
    assert modes == {"": 0o600, "-wal": 0o600, "-shm": 0o600}


def test_device_keys_are_made_once_per_mailbox_and_rotation_retires_the_current_one(tmp_path: Path) -> None:
    seed, k1, k2 = b"s" * 32, b"1" * 32, b"2" * 32
    with LocalStore(tmp_path / "s.sqlite3") as store:
        first = store.create_device_keys("alice", seed, "kid-1", k1)
        assert (first.seed, first.current.kid, first.current.private, first.retired) == (seed, "kid-1", k1, ())
        # another process that made keys too finds the first ones
        again = store.create_device_keys("alice", b"x" * 32, "kid-x", b"x" * 32)
        assert (again.seed, again.current.kid, again.retired) == (seed, "kid-1", ())
        assert store.device_keys("bob") is None
        rotated = store.rotate_encryption_key("alice", "kid-2", k2)
        assert (rotated.seed, rotated.current.kid, rotated.current.private) == (seed, "kid-2", k2)
        assert [(k.kid, k.private) for k in rotated.retired] == [("kid-1", k1)]
        [retired] = rotated.retired
        assert retired.retired_at is not None and retired.retired_at >= rotated.current.created_at
        with pytest.raises(ValueError, match="kid-1"):
            store.rotate_encryption_key("alice", "kid-1", k1)
        with pytest.raises(KeyError):
            store.rotate_encryption_key("bob", "kid-3", k1)
        assert store.purge_retired_keys("alice", retired.retired_at) == 0  # not older than that
        assert store.purge_retired_keys("alice", retired.retired_at + 1) == 1
    with LocalStore(tmp_path / "s.sqlite3") as reopened:
        keys = reopened.device_keys("alice")
        assert (
            keys is not None
            and keys.retired == ()
            and keys.current == StoredKey("kid-2", k2, rotated.current.created_at, None)
        )


def test_a_pinned_key_stays_until_replaced_and_a_pending_one_waits_for_acceptance(tmp_path: Path) -> None:
    ik1, ik2, ik3 = b"1" * 32, b"2" * 32, b"3" * 32
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.pin_keys("alice", {"bob": ik1, "carol": ik1})
        [bob, carol] = store.contacts("alice")
        assert (bob.contact, bob.ik, bob.pending_ik, carol.contact) == ("bob", ik1, None, "carol")
        store.set_pending_keys("alice", {"bob": ik2, "carol": ik1, "dave": ik2})  # carol: same key; dave: no pin
        assert store.contacts("alice", ["bob", "carol", "dave"]) == [
            Contact("alice", "bob", ik1, bob.pinned_at, ik2, store.contacts("alice", ["bob"])[0].pending_at),
            carol,
        ]
        assert store.accept_pending_key("alice", "carol") is None  # nothing pending
        accepted = store.accept_pending_key("alice", "bob")
        assert accepted is not None and (accepted.ik, accepted.pending_ik, accepted.pending_at) == (ik2, None, None)
        store.pin_keys("alice", {"bob": ik3})  # a re-pin (accept_key through the client) replaces it
        assert store.contacts("alice", ["bob"])[0].ik == ik3
        assert store.contacts("bob") == [] and store.contacts("alice", []) == []
