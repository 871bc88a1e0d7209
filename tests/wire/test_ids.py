from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from wire import is_valid_mailbox_id, is_valid_message_id

MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,64}")
MAILBOX_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+\-]{0,63}")


@given(st.text(max_size=70) | st.from_regex(MESSAGE_ID, fullmatch=True))
def test_message_id_check_is_exactly_the_documented_pattern(text: str) -> None:
    assert is_valid_message_id(text) == (MESSAGE_ID.fullmatch(text) is not None)


@given(st.text(max_size=70) | st.from_regex(MAILBOX_ID, fullmatch=True))
def test_mailbox_id_check_is_exactly_the_documented_pattern(text: str) -> None:
    assert is_valid_mailbox_id(text) == (MAILBOX_ID.fullmatch(text) is not None)


def test_ids_must_be_text() -> None:
    assert not is_valid_message_id(b"abc")
    assert not is_valid_mailbox_id(7)
