"""The Relay broker: store-and-forward of messages between mailboxes.

Theory of operation, by module. ``server`` is lifecycle only: it opens the listeners
(``listeners``) and the store (``store``), builds the parts below once, runs a
``session.Session`` per connection and the HTTP API (``http``), and shuts down on a
deadline. A session does the handshake and dispatches frames, asking ``authz`` who may
send which; it writes through its ``outbox`` and delivers through ``delivery``. Every
SEND and ACK, from any transport, goes through ``router`` (pure planning plus one store
call per batch; it names whom to wake and wakes nobody). ``presence`` knows which
mailbox is held by which live session (claims with epochs that fence the store's
delivery state, takeover, wake, resync); ``stats`` keeps the counters and renders the
STATS map. A second node needs a shared store and a shared presence behind the same two
protocols (``store.base.Store``, ``presence.Presence``); nothing else changes.
"""

from __future__ import annotations
