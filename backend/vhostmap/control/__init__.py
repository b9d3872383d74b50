"""The daemon's control socket: the client side (CLI, applications, lab) and the daemon's server side."""
