"""The local SQLite store: de-duplication by (sender, id), the emitted flag, migration of the first schema,
durability settings, and both export formats."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import pytest

from client import Delivery, LocalStore
from client.localstore import SCHEMA_VERSION, SENT_NOTE

T0 = int(dt.datetime(2024, 5, 1, 14, 3, 7, tzinfo=dt.UTC).timestamp() * 1000)


def delivery(mid: str, body: bytes, *, sender: str = "alice", at: int = T0, attempt: int = 1) -> Delivery:
    return Delivery(mid, sender, at, at + 3_600_000, attempt, body)


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
        store.record_outgoing("bob", [("o", ["alice"], b"out")], sent_at=T0)
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
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        got = [(m.mailbox, m.direction, m.id, m.sender, json.dumps(list(m.recipients)), m.sent_at, m.expires_at,
                m.saved_at, m.body) for m in store.messages()]  # fmt: skip
        assert got == rows
        assert store.unemitted("bob") == []  # the first schema kept no record: counted as emitted
        # the new identity applies to the migrated rows
        assert store.save_incoming("bob", [delivery("z-1", b"from alice")]) == [False]
        assert store.save_incoming("bob", [delivery("z-1", b"from carol", sender="carol")]) == [True]
        assert [m.key for m in store.unemitted("bob")] == [("carol", "z-1")]
    with LocalStore(path) as again:  # opening a current store changes nothing
        assert again.count() == 5 and again._db.execute("PRAGMA user_version").fetchone()[0] == 2


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
        assert store.record_outgoing("alice", [("self", ["alice"], b"note")], sent_at=T0) == 1
        assert store.record_outgoing("alice", [("self", ["alice"], b"note")], sent_at=T0) == 0
        assert store.save_incoming("alice", [delivery("self", b"note")]) == [True]
        assert [(m.direction, m.id) for m in store.messages("alice")] == [("out", "self"), ("in", "self")]
        assert store.count("alice", direction="out") == 1


def test_markdown_export_is_a_conversation_log(tmp_path: Path) -> None:
    day2 = T0 + 24 * 3_600_000
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.save_incoming("bob", [delivery("m1", b"hi bob\nhow are you?")])
        store.record_outgoing("bob", [("m2", ["alice", "carol"], b"fine!")], sent_at=T0 + 2000)
        store.save_incoming("bob", [delivery("m3", b"\x00\xffbin", at=day2)])
        text = store.export_markdown(tz=dt.UTC)
    assert text == (
        "# Relay conversation log — bob\n"
        "\n"
        f"{SENT_NOTE}\n"
        "\n"
        "## 2024-05-01\n"
        "\n"
        "**alice** → bob · 14:03:07\n"
        "> hi bob\n"
        "> how are you?\n"
        "\n"
        "**bob** → alice, carol · 14:03:09\n"
        "> fine!\n"
        "\n"
        "## 2024-05-02\n"
        "\n"
        "**alice** → bob · 14:03:07\n"
        "> *(binary body, 5 bytes, shown as base64)*\n"
        "> `AP9iaW4=`\n"
    )


def test_json_export_lists_every_message(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        store.save_incoming("bob", [delivery("m1", "héllo".encode())])
        store.record_outgoing("bob", [("m2", ["alice"], b"\xfe")], sent_at=T0 + 1)
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
            },
            {
                "mailbox": "bob",
                "direction": "out",
                "id": "m2",
                "from": "bob",
                "to": ["alice"],
                "sent_at": T0 + 1,
                "expires_at": None,
                "body_base64": "/g==",
            },
        ],
    }


def test_empty_store_exports(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "s.sqlite3") as store:
        assert store.export_markdown() == "# Relay conversation log — no messages\n"
        assert json.loads(store.export_json())["messages"] == []
