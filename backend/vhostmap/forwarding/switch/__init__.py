"""A VALE-style learning switch: the switch itself, its ports, its address table, and its two forwarders
(the compiled kernel's and the numpy/Python reference)."""

from vhostmap.forwarding.switch.port import SwitchPort, SwitchPortStats
from vhostmap.forwarding.switch.switch import MAX_PORTS, Switch
from vhostmap.forwarding.switch.table import (
    DEFAULT_AGING,
    DEFAULT_MAX_ADDRESSES,
    MAX_ADDRESSES_LIMIT,
    AddressTable,
    CompiledMacTable,
    MacTable,
)

__all__ = [
    "DEFAULT_AGING",
    "DEFAULT_MAX_ADDRESSES",
    "MAX_ADDRESSES_LIMIT",
    "MAX_PORTS",
    "AddressTable",
    "CompiledMacTable",
    "MacTable",
    "Switch",
    "SwitchPort",
    "SwitchPortStats",
]
