"""The golden vectors in tests/vectors/ against the Python codec (the JS suite reads the same files)."""

from __future__ import annotations

import pytest

from wire import FRAME_TYPES, ErrorCode, FrameDecoder, RemoteProtocolError, decode_body, encode_frame

from .support import from_json, load_vectors, plain

VALID = load_vectors("valid.json")
INVALID = load_vectors("invalid.json")


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_decodes_to_its_frame(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    frames = FrameDecoder().feed(data)
    assert len(frames) == 1
    assert plain(frames[0].to_wire()) == from_json(vector["frame"])
    assert decode_body(data[4:]) == frames[0]


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_canonical_vector_is_what_the_encoder_writes(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    (frame,) = FrameDecoder().feed(data)
    assert (encode_frame(frame) == data) is vector["canonical"]


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_is_refused_with_its_code(vector: dict) -> None:
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(bytes.fromhex(vector["hex"]))
    assert info.value.code == vector["error"]
    assert isinstance(info.value.code, ErrorCode)


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_is_refused_when_fed_byte_by_byte(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        for i in range(len(data)):
            assert decoder.feed(data[i : i + 1]) == []
    assert info.value.code == vector["error"]


def test_vectors_cover_every_frame_type_and_both_kinds() -> None:
    assert {v["frame"]["type"] for v in VALID} == set(FRAME_TYPES)
    assert any(v["canonical"] for v in VALID)
    assert any(not v["canonical"] for v in VALID)
    codes = {v["error"] for v in INVALID}
    for code in (ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE, ErrorCode.INVALID_FIELD):
        assert code in codes
    assert ErrorCode.UNKNOWN_FRAME_TYPE in codes


def test_vector_names_are_unique_and_fields_complete() -> None:
    valid_keys = {"name", "description", "hex", "frame", "canonical"}
    invalid_keys = {"name", "description", "hex", "error"}
    for vectors, keys in ((VALID, valid_keys), (INVALID, invalid_keys)):
        assert len({v["name"] for v in vectors}) == len(vectors)
        for v in vectors:
            assert set(v) == keys
            assert v["hex"] == v["hex"].lower()
