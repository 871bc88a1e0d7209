"""Transition aliases: the transports live in :mod:`wire.transport` and :mod:`wire.websocket` now.

Kept importable until ``broker.server``, ``broker.session``, ``broker.http`` and
``broker.cli`` import from there (``first_os_error`` from :mod:`broker.listeners`); then
this module is deleted. Nothing here has behaviour of its own.
"""

from __future__ import annotations

from typing import Protocol

import trio

from wire.transport import RECEIVE_CHUNK_BYTES, TransportClosed
from wire.transport import StreamTransport as _StreamTransport
from wire.transport import Transport as _Transport

from .listeners import first_os_error

__all__ = ["RECEIVE_CHUNK_BYTES", "StreamTransport", "Transport", "TransportClosed", "first_os_error"]


class Transport(_Transport, Protocol):
    """Transition alias: :class:`wire.transport.Transport` plus the old names both transports still have."""

    byte_stream: bool

    async def send_frames(self, frames: list[bytes]) -> None: ...

    def try_send(self, data: bytes) -> int: ...

    def open_limit(self, max_frame_bytes: int) -> None: ...


class StreamTransport(_StreamTransport):
    """Transition alias: :class:`wire.transport.StreamTransport` with the broker's ``linger=True``."""

    __slots__ = ()

    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream, linger=True)
