"""Where messages wait between SEND and ACK: the :class:`~.base.Store` interface and its implementations.

Theory of operation: the interface and its contract are in :mod:`broker.store.base`;
:mod:`broker.store.memory` is the embedded default and :mod:`broker.store.redis` the one
several nodes share. :func:`broker.backend.open_backend` makes the configured one (with
its presence), so nothing here imports a networked client.
"""
