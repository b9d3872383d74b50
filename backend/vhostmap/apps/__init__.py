"""Applications above the daemon's control socket: the netmap client library and pkt-gen."""
