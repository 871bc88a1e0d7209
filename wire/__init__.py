"""Relay's sans-IO protocol core, shared by the broker and every Python client.

Frames, the length-prefixed CBOR codec, the connection state machine and the error
codes. Nothing here does I/O or imports trio.
"""

from .codec import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, decode_body, encode_deliver, encode_frame, encode_frames
from .connection import TRANSITIONS, Connection, Role, State
from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .frames import (
    FRAME_TYPES,
    PROTOCOL_VERSION,
    Ack,
    Bye,
    Cleanup,
    CleanupResult,
    Deliver,
    Drained,
    Error,
    Frame,
    Hello,
    Ping,
    Pong,
    Pull,
    Receipt,
    RecipientResult,
    Send,
    Stats,
    StatsResult,
    Status,
    Welcome,
    is_valid_mailbox_id,
    is_valid_message_id,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FRAME_TYPES",
    "PROTOCOL_VERSION",
    "TRANSITIONS",
    "Ack",
    "Bye",
    "Cleanup",
    "CleanupResult",
    "Connection",
    "Deliver",
    "Drained",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "Hello",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "Pull",
    "Receipt",
    "RecipientResult",
    "RemoteProtocolError",
    "Role",
    "Send",
    "State",
    "Stats",
    "StatsResult",
    "Status",
    "Welcome",
    "decode_body",
    "encode_deliver",
    "encode_frame",
    "encode_frames",
    "is_valid_mailbox_id",
    "is_valid_message_id",
]
