"""A worker process, assembled: the loop, the routing, and a protocol for each byte.

This is the one place that knows every part: it builds the per-worker
objects (``routing.Router``, ``httpconn.Http``, ``subscriptions.Subscriptions``,
``front.FrontDoor``, ``longpoll.LongPoll``, ``streams.Streams``,
``appport.AppPort``), fills the loop's protocol table (indexed by
``protocols``), its record handlers and its hooks.  Adding a
transport means adding its module and a line here, not growing the loop.
"""

from . import appport
from . import front
from . import httpconn
from . import longpoll
from . import protocols
from . import routing
from . import streams
from . import subscriptions
from . import worker
from .worker import Protocol


def assemble(index, config, region, eventfds, ready_fd=None, standby_fd=None):
    w = worker.Worker(index, config, region, eventfds, ready_fd, standby_fd)
    router = routing.Router(w, protocols.CLIENT_HTTP)
    http = httpconn.Http(w)
    subs = subscriptions.Subscriptions(w, router)
    poll = longpoll.LongPoll(w, http, router, subs)
    stream = streams.Streams(w, router, subs, poll.common)
    door = front.FrontDoor(w, http, subs, poll, stream)
    app = appport.AppPort(w, http, router)

    table = [None] * protocols.COUNT
    table[protocols.CLIENT_HTTP] = Protocol("client", door.readable, door.timeout, door.drained,
                                            closed=door.closed)
    for proto in (protocols.POLL_JSON, protocols.POLL_JSONP, protocols.POLL_COMPAT):
        table[proto] = Protocol("client", poll.readable, poll.timeout, closed=poll.closed,
                                stop=poll.stop)
    table[protocols.SSE] = Protocol("client", stream.readable_sse, stream.timeout,
                                    closed=stream.closed, stop=stream.stop_sse)
    table[protocols.WS] = Protocol("client", stream.readable_ws, stream.timeout,
                                   closed=stream.closed, stop=stream.stop_ws)
    table[protocols.APP_NEW] = Protocol("app", app.readable_new, app.timeout_reading)
    table[protocols.APP_HTTP] = Protocol("app", app.readable_http, app.timeout_http, app.drained,
                                         closed=app.closed_http, stop=app.stop_http)
    table[protocols.APP_BINARY] = Protocol("app", app.readable_binary, app.timeout_reading,
                                           closed=app.closed_binary, stop=app.stop_binary)
    table[protocols.LINGER] = Protocol("lingering", w.linger_readable, w.close,
                                       stop=lambda fd: True)   # the drain waits for its FIN
    w.protocols = table
    w.linger_proto = protocols.LINGER
    # The subscription core decides what each subscription is owed; its transports encode.
    subs.transports = {protocols.POLL_JSON: poll, protocols.POLL_JSONP: poll,
                       protocols.SSE: stream, protocols.WS: stream}
    router.deliver_to = dict.fromkeys(subs.transports, subs.deliver)
    router.deliver_to[protocols.POLL_COMPAT] = poll.deliver_compat
    router.deliver_many = subs.deliver_many
    router.backlog = subs.backlog

    w.record_handlers = {**router.handlers(), **poll.handlers(), **app.handlers()}
    w.listen_on = [(config.host, config.port + i, protocols.CLIENT_HTTP, True)
                   for i in range(1 + config.compat_ports)]
    w.listen_on.append((config.app_host, config.app_port, protocols.APP_NEW, False))
    w.on_start = [router.start]
    w.before_sleep = [router.flush_acks]
    w.on_tick = [router.flush_acks, router.tick]
    w.owes = lambda: bool(router.acks) or app.owes()
    if config.redis:
        # Cluster mode: publishes go through Redis, and a home joins its ids' channels
        # before it answers for them (cluster; imported only here: one box needs no hiredis).
        from . import cluster
        node = cluster.ClusterNode(w, router, subs, app)
        router.cluster = node
        w.record_handlers.update(node.handlers())
        w.on_start.append(node.start)
        w.before_sleep.append(node.before_sleep)
        w.on_tick.append(node.tick)
    return w
