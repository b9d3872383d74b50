"""vhostmap_guest: netmap-style rings over a VM's own virtio-net device, from guest userspace."""
