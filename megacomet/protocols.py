"""The protocol byte of a connection: which entry of the worker's protocol table handles it.

A connection's byte changes as it goes: a subscriber's connection reads
HTTP requests (CLIENT_HTTP), is held as a long-poll in one of three answer
formats, and reads requests again after a keep-alive answer; an app-port
connection starts undecided (APP_NEW) until its first byte says HTTP or the
binary protocol.  An EventSource (SSE) or WebSocket (WS) stream stays held for as long as it is
open.  A connection closed while its peer may still be sending lingers (LINGER)
until the peer closes too.  ``server.assemble`` fills the table; nothing else here.
"""

(CLIENT_HTTP, POLL_JSON, POLL_JSONP, POLL_COMPAT, APP_NEW, APP_HTTP, APP_BINARY, SSE,
 WS, LINGER) = range(10)
COUNT = 10
