"""vhost-user: the protocol (sans-IO), the device state machine, guest memory, virtqueues, and the port that
makes one connection a netmap adapter. The package's API is what the daemon builds ports from; everything
above it knows a port only as a `NetmapAdapter` (docs/architecture.md, "The adapter seam")."""

from vhostmap.vhost_user.device import NetConfig
from vhostmap.vhost_user.port import PORT_RING_SLOTS, VhostUserPort
from vhostmap.vhost_user.server import Endpoint, SocketMode

__all__ = ["PORT_RING_SLOTS", "Endpoint", "NetConfig", "SocketMode", "VhostUserPort"]
