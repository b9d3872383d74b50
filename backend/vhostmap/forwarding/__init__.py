"""Forwarders: the consumers of krings that the datapath worker runs (link, sink, source, host bridge,
application sessions, the switch). They know `NetmapAdapter` and nothing below it."""
