"""
The daemon's Unix socket: binding or inheriting it, peers (SO_PEERCRED) and who may
do what, per-connection limits, the request wire, and the op table with its handlers.
What a client meets. server.py knows no scheduler: the daemon hands it a handler
(handlers.py, which works on refresh/'s scheduler).
"""
