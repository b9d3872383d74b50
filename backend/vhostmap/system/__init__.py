"""What the daemon asks of the host: CPUs, UNIX sockets and who may reach them."""
