"""The daemon: its configuration, the datapath worker, the topology of ports and forwarders, and the process
that builds and runs them (``vhostmap serve``)."""
