"""
The daemon's Unix socket: binding or inheriting it, peers (SO_PEERCRED) and who may
do what, per-connection limits, the request wire and the op table with its handlers.
What a client meets; it never imports refresh/ (the daemon hands it a handler).
"""
