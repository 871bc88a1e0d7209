"""Several frames per WebSocket message (protocol.md 2.5), in a real Chromium against the real broker.

The browser client packs the frames it makes in one turn into messages of at most WELCOME's
``max_frame_bytes`` + 4 bytes; the broker takes them frame by frame and packs what it sends. Playwright's
``framesent`` / ``framereceived`` events show each binary message as the browser sent or got it, so the
tests read the messages' frame boundaries themselves rather than trusting either side's codec.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import pytest

from broker.server import Broker

from .helpers import WAIT_MS, base_url, from_trio, open_browser, open_page, run_in_browser, wait_inbox

pytestmark = pytest.mark.browser

MAX_FRAME_BYTES = 2048
"""Small, so that a burst needs several messages and the limit is seen at work."""
BURST = 120


def frame_count(message: bytes) -> int:
    """How many whole frames ``message`` holds; fails unless it ends exactly at a frame boundary."""
    count, at = 0, 0
    while at < len(message):
        assert len(message) - at >= 4, f"a message ends inside a prefix: {message.hex()}"
        (n,) = struct.unpack_from(">I", message, at)
        at += 4 + n
        count += 1
    assert at == len(message), "a message ends inside a frame"
    return count


class Recorder:
    """Every binary message of every WebSocket of a page, per socket, as (direction, frames, bytes)."""

    def __init__(self, page: Any) -> None:
        self.sockets: list[list[tuple[str, int, int]]] = []
        self.lock = threading.Lock()
        page.on("websocket", self.attach)

    def attach(self, ws: Any) -> None:
        log: list[tuple[str, int, int]] = []
        with self.lock:
            self.sockets.append(log)

        def record(direction: str, payload: str | bytes) -> None:
            assert isinstance(payload, bytes), f"a text message was {direction}"
            with self.lock:
                log.append((direction, frame_count(payload), len(payload)))

        ws.on("framesent", lambda payload: record("sent", payload))
        ws.on("framereceived", lambda payload: record("received", payload))

    def messages(self, socket: int, direction: str) -> list[tuple[int, int]]:
        """(frames, bytes) of each message of ``socket`` in ``direction`` ("sent" or "received"), in order."""
        with self.lock:
            return [(frames, size) for d, frames, size in self.sockets[socket] if d == direction]

    def wait_frames(self, page: Any, socket: int, *, sent: int, received: int) -> tuple[list[Any], list[Any]]:
        """Wait (Playwright reports frames asynchronously) until ``socket`` has seen these many frames each way."""
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            out, back = self.messages(socket, "sent"), self.messages(socket, "received")
            counts = (sum(f for f, _ in out), sum(f for f, _ in back))
            if counts == (sent, received):
                return out, back
            assert counts[0] <= sent and counts[1] <= received, f"frames sent, received: {counts}"
            assert time.monotonic() < deadline, f"frames sent, received: {counts}, wanted {(sent, received)}"
            page.wait_for_timeout(50)


# Records the id of every DELIVER in the order the page's client handles them (it saves each one first).
SAVE_ORDER = """
window.relayTestHooks = {
  saved: [],
  wrapStore (store) {
    const saved = this.saved
    return new Proxy(store, {
      get: (target, name) => name === 'saveIncoming'
        ? (msg) => { saved.push(msg.id); return target.saveIncoming(msg) }
        : target[name]?.bind?.(target) ?? target[name]
    })
  }
}
"""


def page_saves(page: Any) -> list[str]:
    saved: list[str] = page.evaluate("() => window.relayTestHooks.saved")
    return saved


BURST_SCRIPT = """
async ([token, count, waitMs]) => {
  const { RelayClient } = await import('/js/client.js')
  // No store: every send goes out at once; no e2e: exactly HELLO, the SENDs and BYE (no KEY_PUT, no KEY_GET).
  const client = new RelayClient({ url: window.relay.client.url, token, e2e: false })
  const errors = []
  client.addEventListener('error', (e) => errors.push(`${e.detail.code} ${e.detail.message}`))
  await new Promise((resolve) => { client.addEventListener('welcome', resolve, { once: true }); client.start() })
  // All in one turn: the client packs them.
  const sent = Array.from({ length: count }, (_, i) => client.sendMessage('sink', `burst ${i}`, { id: `burst-${i}` }))
  let timer
  const late = new Promise((resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no receipts; errors: ${errors.slice(0, 3)}`)), waitMs)
  })
  try {
    const receipts = await Promise.race([Promise.all(sent), late])
    return receipts.map((r) => r.results.sink.status)
  } finally {
    clearTimeout(timer)
    client.close()
  }
}
"""


async def test_a_burst_from_the_browser_goes_out_packed_and_every_send_is_answered_in_order(
    broker_factory: Any,
) -> None:
    async with broker_factory(max_frame_bytes=MAX_FRAME_BYTES, max_recipients=4) as broker:
        await _burst_scenario(broker)


async def _burst_scenario(broker: Broker) -> None:
    base = base_url(broker)
    page_token, burst_token, sink_token = (broker.auth.issue(m) for m in ("pager", "burster", "sink"))
    limit = MAX_FRAME_BYTES + 4

    def scenario() -> None:
        with open_browser() as browser:
            context = browser.new_context()
            page = open_page(context, base, page_token)
            recorder = Recorder(page)  # after the page's own client connected: socket 0 is the burst's
            statuses = page.evaluate(BURST_SCRIPT, [burst_token, BURST, WAIT_MS])
            assert statuses == ["queued"] * BURST
            assert from_trio(broker.store.pending, "sink", broker.clock()) == BURST

            # HELLO, the SENDs and BYE, each once; WELCOME, DRAINED and one RECEIPT per SEND.
            sent, received = recorder.wait_frames(page, 0, sent=1 + BURST + 1, received=2 + BURST)
            assert sent[0] == (1, sent[0][1]), "HELLO alone"
            assert len(sent) < BURST // 4, f"{len(sent)} messages for {BURST} SENDs: not packed"
            assert all(size <= limit for frames, size in sent if frames > 1), sent
            assert all(size <= limit for frames, size in received if frames > 1), received

            # The sink's page handles them all, in the order sent, whatever the broker's messages hold.
            sink = open_page(context, base, sink_token, hooks=SAVE_ORDER)
            wait_inbox(sink, BURST)
            assert page_saves(sink) == [f"burst-{i}" for i in range(BURST)]
            assert from_trio(broker.store.pending, "sink", broker.clock()) == 0
            sink.wait_for_function(f"document.querySelectorAll('.msg.in').length === {BURST}", timeout=WAIT_MS)

    await run_in_browser(scenario)
