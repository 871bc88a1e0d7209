"""The local SQLite store: de-duplication by id, durability settings, and both export formats."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from client import Delivery, LocalStore

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
