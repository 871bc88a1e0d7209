"""What the HTTP tests take from a running broker: its parts, and the funnel a SEND goes through."""

from __future__ import annotations

from collections.abc import Sequence

from broker.http import BrokerParts
from broker.server import Broker
from wire import Send


def parts_of(broker: Broker) -> BrokerParts:
    """The parts the broker gives its HTTP API."""
    return BrokerParts(
        config=broker.config,
        auth=broker.auth,
        router=broker.router,
        presence=broker.presence,
        stats=broker.stats,
        ws_port=broker.ws_port or broker.config.ws_port,
        ready=lambda: broker.ready,
    )


async def queue(broker: Broker, sender: str, sends: Sequence[Send]) -> None:
    """Queue SENDs as any transport does: route, then wake the online recipients."""
    routed = await broker.router.route(sender, sends)
    await broker.presence.wake(routed.wake)
