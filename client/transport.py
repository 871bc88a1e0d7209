"""Client transports: how the client opens the byte stream to a broker, whatever carries it.

Theory of operation. :func:`open_transport` is an async context manager: it parses the
URL (or takes an :class:`Endpoint`), picks the opener registered for its scheme in
``OPENERS`` and yields a connected :class:`wire.transport.Transport`, closed when the
block ends. The transports themselves are shared with the broker:

- ``tcp``: :class:`wire.transport.StreamTransport` over ``trio.open_tcp_stream`` (with
  its one ``os.write`` fast path, ``send_some_nowait``);
- ``tls``: the same over a ``trio.SSLStream`` (no fast path);
- ``ws`` and ``wss``: :class:`wire.websocket.WebSocketTransport` over trio-websocket's
  ``wrap_client_stream`` (public API) on a TCP or TLS stream opened here; its reader task
  lives in the context manager's nursery, which is why opening is a context manager. Frames
  are packed into binary messages (protocol.md 2.5): at most 1,028 bytes per message until
  the caller passes WELCOME's ``max_frame_bytes`` to ``transport.set_peer_limit``.

TLS (``tls://``, ``wss://``): the certificate is verified against the system's trust store,
or against the CAs of the ``ssl_context`` given (:func:`client_ssl_context` makes one from a
CA file), and must name the URL's host. The handshake is done before anything else, so every
TLS failure is a :class:`TLSFailed` naming its :class:`~client.errors.TLSReason` (wrong host
name, untrusted CA, expired, not TLS at all, ...), never a raw ``ssl`` error.

Every failure to connect (refused, no upgrade, HTTP error, TLS, timeout) raises
:class:`TransportClosed` on entry, with the URL in the message. Tests replace or wrap an
opener through ``OPENERS`` (or ``open_client(transport_factory=...)``, which takes the
endpoint only).
"""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from wire import DEFAULT_MAX_FRAME_BYTES
from wire.transport import StreamTransport, Transport, TransportClosed
from wire.websocket import WebSocketTransport

from .errors import TLSReason

__all__ = [
    "DEFAULT_PORTS",
    "OPENERS",
    "RECEIVE_CHUNK_BYTES",
    "WS_MAX_MESSAGE_BYTES",
    "Endpoint",
    "Opener",
    "TLSFailed",
    "Transport",
    "TransportClosed",
    "client_ssl_context",
    "open_tcp",
    "open_tls",
    "open_transport",
    "open_ws",
    "parse_url",
]

RECEIVE_CHUNK_BYTES = 256 * 1024
"""Bytes asked of the kernel per read: a whole burst of deliveries per syscall under load."""
DEFAULT_PORTS = {"tcp": 7700, "ws": 7781, "tls": 8700, "wss": 8781}
"""Port used when a URL names none, per scheme (protocol.md, Default ports)."""
DEFAULT_PATHS = {"ws": "/relay", "wss": "/relay"}
TLS_SCHEMES = frozenset({"tls", "wss"})
WS_CONNECT_TIMEOUT_S = 10.0
"""Longest the TCP connect plus the WebSocket upgrade may take."""
WS_DISCONNECT_TIMEOUT_S = 2.0
"""Longest closing spends on the WebSocket closing handshake."""
WS_MAX_MESSAGE_BYTES = 64 * DEFAULT_MAX_FRAME_BYTES + 4096 + 4
"""The largest WebSocket message the client accepts: fixed before WELCOME says the broker's
``max_frame_bytes``, so it covers the largest a broker may announce (64 MiB, the figure
proposed as config's upper bound) plus the client's receive slack and the 4-byte prefix.
The client's decoder still applies WELCOME's own limit to every frame."""
WS_RECEIVE_BYTES = 256 * 1024
"""Bytes per socket read for trio-websocket (its default is 4 KiB)."""
_REJECT_BODY_CHARS = 1024
"""Characters of a refused handshake's HTTP body quoted in the error."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed broker URL."""

    scheme: str
    host: str
    port: int
    path: str = ""

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.path}"


def parse_url(url: str) -> Endpoint:
    """``tcp://host[:port]`` (default port 7700), ``tls://host[:port]`` (8700), ``ws://host[:port][/path]`` (7781,
    /relay) or ``wss://host[:port][/path]`` (8781, /relay). Raises ValueError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid broker URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"invalid broker URL {url!r}: the scheme must be one of {', '.join(sorted(DEFAULT_PORTS))}")
    if not parts.hostname:
        raise ValueError(f"invalid broker URL {url!r}: no host (expected e.g. tcp://127.0.0.1:7700)")
    if scheme in ("tcp", "tls") and parts.path not in ("", "/"):
        raise ValueError(f"invalid broker URL {url!r}: a {scheme} URL has no path")
    path = parts.path or DEFAULT_PATHS.get(scheme, "")
    return Endpoint(scheme, parts.hostname, port if port is not None else DEFAULT_PORTS[scheme], path)


Opener = Callable[[Endpoint, ssl.SSLContext | None], AbstractAsyncContextManager[Transport]]
"""Opens a connected transport for an endpoint, over TLS with the SSL context given (None: the system's trust
store) for tls:// and wss:// (an async context manager; TransportClosed on entry)."""


class TLSFailed(TransportClosed):
    """The TLS connection could not be set up; ``reason`` (a :class:`~client.errors.TLSReason`) says why."""

    def __init__(self, reason: TLSReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def client_ssl_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client SSL context that verifies the broker's certificate and host name: against the CAs in ``ca_file``
    (PEM) only, or the system's trust store without one. Raises ValueError if ``ca_file`` cannot be loaded."""
    try:
        return ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot load the CA file {ca_file}: {why}") from None


_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 27})
"""OpenSSL verify codes for a chain that ends at no trusted CA: unable to get issuer certificate (2, 20),
self-signed (18, 19), unable to verify the leaf (21), certificate not trusted (27)."""
_VERIFY_REASONS = {62: TLSReason.HOSTNAME_MISMATCH, 64: TLSReason.HOSTNAME_MISMATCH, 10: TLSReason.EXPIRED}
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE"})
"""OpenSSL reasons for an answer that is not TLS at all (a plain port)."""


def tls_failure(endpoint: Endpoint, exc: BaseException) -> TLSFailed | None:
    """The TLSFailed for an exception whose cause chain holds an ``ssl`` error, or None if none does."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    failed = f"cannot connect to {endpoint} over TLS"
    if isinstance(cause, ssl.SSLCertVerificationError):
        code, why = cause.verify_code, cause.verify_message
        if code == 9:
            return TLSFailed(TLSReason.NOT_YET_VALID, f"{failed}: the broker's certificate is not valid yet ({why})")
        if (reason := _VERIFY_REASONS.get(code)) is TLSReason.EXPIRED:
            return TLSFailed(reason, f"{failed}: the broker's certificate has expired ({why})")
        if reason is TLSReason.HOSTNAME_MISMATCH:
            return TLSFailed(reason, f"{failed}: the broker's certificate is not valid for {endpoint.host} ({why})")
        if code in _UNTRUSTED:
            return TLSFailed(
                TLSReason.UNTRUSTED,
                f"{failed}: the broker's certificate is not signed by a trusted CA ({why}); give the CA that issued "
                "it (relay --ca-file, open_client(ca_file=...))",
            )
        return TLSFailed(TLSReason.CERTIFICATE, f"{failed}: the broker's certificate was refused ({why})")
    if cause.reason in _NOT_TLS:
        return TLSFailed(
            TLSReason.NOT_TLS, f"{failed}: the server does not answer TLS on this port ({cause.reason}); a plain port?"
        )
    return TLSFailed(TLSReason.HANDSHAKE, f"{failed}: the TLS handshake failed ({cause.reason or cause})")


async def _open_stream(
    endpoint: Endpoint, ssl_context: ssl.SSLContext | None
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """A TCP stream to ``endpoint``, over TLS (handshake done) for tls:// and wss:// with ``ssl_context`` (None:
    the system's trust store). Raises TransportClosed, TLSFailed for any TLS failure."""
    try:
        tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    except OSError as exc:
        raise TransportClosed(f"cannot connect to {endpoint}: {exc.strerror or exc}") from None
    if endpoint.scheme not in TLS_SCHEMES:
        return tcp
    context = ssl_context if ssl_context is not None else client_ssl_context()
    stream = trio.SSLStream(tcp, context, server_hostname=endpoint.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        failure = tls_failure(endpoint, exc)
        if failure is None:  # the broker closed the connection during the handshake
            failure = TLSFailed(TLSReason.HANDSHAKE, f"cannot connect to {endpoint} over TLS: the connection closed")
        raise failure from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


@asynccontextmanager
async def open_tcp(endpoint: Endpoint, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Transport]:
    """Connect over TCP (trio turns Nagle off: frames are already batched per write), over TLS for a tls://
    endpoint (``ssl_context``: None verifies against the system's trust store). Raises TransportClosed (TLSFailed
    for a TLS failure)."""
    stream = await _open_stream(endpoint, ssl_context)
    transport = StreamTransport(stream, receive_bytes=RECEIVE_CHUNK_BYTES)
    try:
        yield transport
    finally:
        await transport.aclose()


open_tls = open_tcp
"""A tls:// endpoint's opener: :func:`open_tcp`, which wraps the stream in TLS for that scheme."""


@asynccontextmanager
async def open_ws(endpoint: Endpoint, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Transport]:
    """Connect (over TLS for wss://, as :func:`open_tcp`) and upgrade to a WebSocket at ``endpoint.path`` (e.g.
    /relay). Raises TransportClosed on entry (TLSFailed for a TLS failure).

    The connect deadline is this function's own cancel scope around the whole context, lifted
    once the upgrade is done (trio-websocket's client waits for an upgrade answer without a bound
    of its own). The TLS handshake is done before the upgrade starts, so its failures are told as
    such (trio-websocket, left to do it, waits for ever on a failed one).
    """
    entered = False
    with trio.CancelScope(deadline=trio.current_time() + WS_CONNECT_TIMEOUT_S) as deadline:
        try:
            async with _websocket(endpoint, ssl_context) as ws:
                entered = True
                deadline.deadline = math.inf
                transport = WebSocketTransport(ws)
                try:
                    yield transport
                finally:
                    await transport.aclose()
        except Exception as exc:
            if entered:
                raise
            raise _connect_error(endpoint, exc) from None
    if deadline.cancelled_caught:
        raise TransportClosed(f"cannot connect to {endpoint}: no WebSocket upgrade within {WS_CONNECT_TIMEOUT_S:g} s")


@asynccontextmanager
async def _websocket(endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket over a stream from :func:`_open_stream`, its reader task in this context's nursery;
    closed (bounded) when the block ends. The body's exception comes out as itself, not in a group."""
    stream = await _open_stream(endpoint, ssl_context)
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                f"{host}:{endpoint.port}",
                endpoint.path,
                max_message_size=WS_MAX_MESSAGE_BYTES,
                receive_buffer_size=WS_RECEIVE_BYTES,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(WS_DISCONNECT_TIMEOUT_S) as closing:
                    closing.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        inner = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)] or list(group.exceptions)
        raise inner[0] from None
    finally:
        await trio.aclose_forcefully(stream)


def _connect_error(endpoint: Endpoint, exc: Exception) -> TransportClosed:
    """What went wrong before the WebSocket was open, said once."""
    failed = f"cannot connect to {endpoint}"
    if isinstance(exc, TransportClosed):
        return exc
    if isinstance(exc, ConnectionRejected):
        body = (exc.body or b"").decode("utf-8", "replace").strip()[:_REJECT_BODY_CHARS]
        http = f"HTTP {exc.status_code}: {body}" if body else f"HTTP {exc.status_code}"
        return TransportClosed(f"{failed}: WebSocket upgrade refused ({http})")
    if isinstance(exc, ConnectionTimeout):
        return TransportClosed(f"{failed}: no WebSocket upgrade within {WS_CONNECT_TIMEOUT_S:g} s")
    if isinstance(exc, (HandshakeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)):
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        return TransportClosed(f"{failed}: {reason or type(cause).__name__}")
    # The answer was not an HTTP upgrade at all (trio-websocket lets h11's error out).
    return TransportClosed(f"{failed}: not a WebSocket server ({type(exc).__name__}: {exc})")


OPENERS: dict[str, Opener] = {"tcp": open_tcp, "tls": open_tls, "ws": open_ws, "wss": open_ws}
"""Transport opener per URL scheme (tests may replace one)."""


@asynccontextmanager
async def open_transport(
    endpoint: Endpoint | str, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Transport]:
    """A connected transport for ``endpoint`` (a URL or a parsed :class:`Endpoint`), closed when the block ends.

    ``ssl_context`` is used for tls:// and wss:// (None: verify against the system's trust store). Raises
    TransportClosed on entry if it cannot connect (TLSFailed, naming the reason, for a TLS failure), ValueError
    for an invalid URL or a scheme without an opener.
    """
    if isinstance(endpoint, str):
        endpoint = parse_url(endpoint)
    opener = OPENERS.get(endpoint.scheme)
    if opener is None:
        raise ValueError(f"the {endpoint.scheme}:// transport is not available in this client build")
    async with opener(endpoint, ssl_context) as transport:
        yield transport
