"""ivshmem: the server side of QEMU's ivshmem-doorbell device (docs/specs/ivshmem-spec.rst): the protocol
(sans-IO) and the socket that serves one guest per port with a shared-memory fd and eventfds."""
