"""TLS for the broker's listeners: the server certificate, its reload, and each connection's handshake.

Theory of operation. :class:`ServerTLS` loads ``tls_cert_file`` and ``tls_key_file`` into two
``ssl.SSLContext``\\ s made once per broker: one for the frame byte stream and the WebSocket
listeners (``tls://``, ``wss://``) and one for hypercorn's HTTPS listener (the same, plus ALPN
``http/1.1``). :meth:`ServerTLS.reload` calls ``load_cert_chain``
on the same contexts again: every handshake from then on presents the new certificate, and
connections already open keep theirs (an SSL object copies the certificate when it is made), so
nothing is dropped. A file that cannot be read or does not hold a matching certificate and key
keeps the old certificate and raises.

The tls and wss listeners are ``trio.SSLListener``\\ s over ``stream`` (made in
:func:`broker.listeners.open_listeners`), which accept without a handshake. :func:`accept_tls`
does it at the start of each connection's own task (never in the accept loop), bounded by
``handshake_timeout_s``: it peeks at the first byte, answers a plain client (one that does not
start with a TLS handshake record) in plain with what to use instead, and otherwise completes
the handshake explicitly (trio would do it lazily on first use). A failure or a timeout ends that
connection only, with one log line naming the peer and the reason, and never reaches a session
or the broker.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import trio

from wire.transport import StreamTransport, TransportClosed

from .config import BrokerConfig, ConfigError

__all__ = ["ServerTLS", "accept_tls", "peer_of"]

log = logging.getLogger(__name__)


class ServerTLS:
    """The broker's server-side TLS contexts over one certificate chain and key (PEM files).

    ``stream``: for ``tls://`` and ``wss://``; ``https``: for the HTTP listener (ALPN ``http/1.1``).
    TLS 1.2 at least. Raises ConfigError (naming the file and the cause) if the files cannot be loaded.
    """

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.stream = _server_context()
        self.https = _server_context()
        self.https.set_alpn_protocols(["http/1.1"])
        self.reload()

    @classmethod
    def from_config(cls, config: BrokerConfig) -> ServerTLS | None:
        """The contexts for ``config``'s certificate and key, or None if no TLS listener is configured.
        Raises ConfigError."""
        if not config.tls_listeners:
            return None
        assert config.tls_cert_file is not None and config.tls_key_file is not None  # config checks both are set
        return cls(config.tls_cert_file, config.tls_key_file)

    def reload(self) -> None:
        """Load the certificate chain and key from their files again into both contexts: new handshakes use
        them, open connections are untouched. Raises ConfigError and keeps the old ones if they cannot be loaded."""
        probe = _server_context()
        try:  # on a fresh context first, so a bad file leaves the live contexts as they were
            probe.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert_file} with key {self.key_file}: {_why(exc)}"
            ) from None
        for context in (self.stream, self.https):
            context.load_cert_chain(self.cert_file, self.key_file)


def _server_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _why(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)


def address_of(stream: trio.abc.Stream) -> str | None:
    """The IP address of a socket stream's peer (through TLS), as text, or None if it is not a socket (memory
    streams) or has gone (what the abuse limits key on, :mod:`broker.limits`)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        try:
            host: str = inner.socket.getpeername()[0]
        except OSError:
            return None
        return host
    return None


def peer_of(stream: trio.abc.Stream) -> str:
    """``host:port`` of a socket stream's peer (through TLS), or ``?`` if it is not a socket (memory streams)."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        try:
            host, port = inner.socket.getpeername()[:2]
        except OSError:
            return "?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "?"


TLS_HANDSHAKE_RECORD = 0x16
"""The first byte of every TLS connection: a handshake record (the ClientHello)."""
PLAIN_ANSWER_TIMEOUT_S = 1.0
"""Longest spent answering a plain client on a TLS port, and lingering so the answer is not lost to a reset."""


async def accept_tls(
    stream: trio.SSLStream[trio.abc.Stream], *, timeout_s: float, scheme: str, plain_answer: bytes
) -> trio.SSLStream[trio.abc.Stream] | None:
    """``stream`` (from a TLS listener, :func:`broker.listeners.open_listeners`) with its handshake done within
    ``timeout_s``; or None.

    The first byte is peeked at (over a socket): a connection that does not start with a TLS handshake record is
    a plain client on a TLS port, and gets ``plain_answer`` in plain (an ERROR frame saying to use tls://, or an
    HTTP 400 saying to use wss://) before it is closed. On a handshake failure (a refused certificate or
    protocol, the peer gone) or the timeout, logs one line and closes the stream. Returns None whenever the
    connection goes no further. Never raises (cancellation aside).
    """
    raw = stream.transport_stream
    reason = f"no TLS handshake within {timeout_s:g} s"
    with trio.move_on_after(timeout_s):
        if isinstance(raw, trio.SocketStream):
            try:
                first = await raw.socket.recv(1, socket.MSG_PEEK)
            except OSError:
                first = b""
            if not first:
                await trio.aclose_forcefully(raw)
                return None
            if first[0] != TLS_HANDSHAKE_RECORD:
                log.info("%s connection from %s is not TLS: answered in plain and closed", scheme, peer_of(raw))
                await _answer_plain(raw, plain_answer)
                return None
        try:
            await stream.do_handshake()
            return stream
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            reason = _why(cause) if isinstance(cause, OSError) else str(exc) or "the connection closed"
    log.info("%s TLS handshake from %s failed: %s", scheme, peer_of(raw), reason)
    await trio.aclose_forcefully(raw)
    return None


async def _answer_plain(stream: trio.abc.Stream, answer: bytes) -> None:
    """Write ``answer`` and close, draining what the client sent so the answer is not destroyed by a reset."""
    transport = StreamTransport(stream, linger=True)
    with trio.move_on_after(PLAIN_ANSWER_TIMEOUT_S):
        try:
            await transport.send_all(answer)
        except TransportClosed:
            pass
    await transport.aclose()
