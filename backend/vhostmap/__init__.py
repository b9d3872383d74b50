"""vhostmap: netmap for virtual machines.

A vhost-user virtio-net backend whose ports are netmap adapters: virtqueues in guest memory are synced onto
netmap rings whose buffers come from one shared-memory allocator, and ports meet in a VALE-style switch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vhostmap")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
