"""The app port: where the application publishes, and where operators look.

HTTP (``POST /pub/<id>``, ``POST /pub`` batches, ``/stats``, ``/metrics``,
``/health``) and the original's binary protocol share the port; the first
byte of a connection tells them apart.  A publish is answered once its
messages' homes have stored them (their ACKs), or with 503 after
CONFIRM_TIMEOUT without progress.  Browsers are refused here (but for the live
dashboard: ``GET /dashboard``, a static page, and its own reads of ``/stats``), and
with an app token so is every caller that does not show it, on the request head.
It never stores a message itself: ``routing`` sends each to its home.
"""

import base64
import collections
import hashlib
import hmac
import ipaddress
import json
import re
import time

from . import front
from . import protocols
from . import records
from . import shmqueue
from . import wire
from . import worker
from .httpconn import JSON, KEEP_ALIVE, TEXT
from .worker import BUSY, READING

CONFIRM_TIMEOUT = 3.0            # seconds a publish may wait for its home's ACK without progress
PIPELINE_MAX = 128               # pipelined publishes in flight per connection
IDEMPOTENCY_KEY_MAX = 128        # bytes of an Idempotency-Key (kept in Redis for the TTL)


class Publish:
    """A publishing request (one ``POST /pub/<id>`` or a ``POST /pub`` batch) whose answer
    is owed: it waits for the ACKs of its messages, and for the answers owed before it."""

    __slots__ = ("serial", "ident", "flags", "waiting", "published", "errors", "seq",
                 "subscribers", "unavailable")

    def __init__(self, serial, ident, flags, waiting):
        self.serial = serial     # its PUBs carry it, and so do their ACKs
        self.ident = ident       # a single POST /pub/<id>'s id; None for a batch
        self.flags = flags       # KEEP_ALIVE | HEAD_ONLY of this request
        self.waiting = waiting
        self.published = 0
        self.errors = []
        self.seq = 0
        self.subscribers = 0     # the subscribers its id had when stored (one id)
        self.unavailable = 0     # messages Redis did not confirm (cluster mode)


class AppPort:
    """One per worker: the APP_NEW, APP_HTTP and APP_BINARY protocols."""

    def __init__(self, w, http, router):
        self.w = w
        self.http = http
        self.router = router
        self.token = w.cfg.app_token.encode() if w.cfg.app_token else None
        self.hosts, self.any_ip = allowed_hosts(w.cfg)     # the Host check (DNS rebinding)
        # Publishes in flight, answered in request order: fd -> deque of Publish, and
        # (fd, serial) -> Publish for their ACKs.
        self.owed = {}
        self.publishes = {}
        # fd -> what came behind its publishes: (req, body, flags), or (HttpError, None, flags)
        self.held_back = {}
        self.frames_in = {}      # binary fd -> frames taken from it (logged when it closes)
        self.half_closed = set()  # binary fds told (EOF) that this worker is stopping

    def handlers(self):
        return {records.ACK: self.on_ack}

    def owes(self):
        return bool(self.owed)

    # -- a new connection: which protocol ----------------------------------------------

    def readable_new(self, fd):
        """The app port speaks HTTP or the binary protocol: the first byte tells."""
        w = self.w
        first = w.inbuf[fd][0]
        if first in (wire.FRAME_PUBLISH, wire.FRAME_PING):
            if self.token is not None:
                w.log("app: binary protocol refused (--app-token is set)", fd=fd)
                w.close(fd)
                return
            w.proto[fd] = protocols.APP_BINARY
            w.clear_deadline(fd)                  # a publisher link may idle for ever
            self.readable_binary(fd)
        elif 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:
            w.proto[fd] = protocols.APP_HTTP
            self.readable_http(fd)
        else:
            w.log("app: first byte 0x%02x is neither HTTP nor binary; closed" % first, fd=fd)
            w.close(fd)

    def timeout_reading(self, fd):
        self.w.close(fd)                          # headers too slow (or idle keep-alive)

    # -- HTTP ------------------------------------------------------------------------------

    def readable_http(self, fd):
        w = self.w
        if w.state[fd] == READING:
            self.http.serve(fd, self.check_caller, self.route, w.cfg.max_body,
                            refuse=self.refuse)
        if fd not in w.inbuf:
            w.read_again(fd)
        elif w.state[fd] != READING:
            # What is pipelined behind waits for answers, or the connection closes: leave the
            # rest in the socket (TCP holds the publisher back) until parsing goes on.
            w.stop_reading(fd)
        elif w.output_waiting(fd) <= worker.OUT_LIMIT:   # (over it, serve stopped: not read)
            if len(w.inbuf[fd]) > wire.MAX_HEAD + w.cfg.max_body:
                w.close(fd)                       # (a complete request is parsed before this)
            else:
                w.read_again(fd)

    def timeout_http(self, fd):
        if fd in self.owed:
            self.answer_unconfirmed(fd)
        else:
            self.w.close(fd)

    def closed_http(self, fd):
        for publish in self.owed.pop(fd, ()):
            del self.publishes[fd, publish.serial]
        self.held_back.pop(fd, None)

    def stop_http(self, fd):
        """Stopping: a connection still owed answers is kept (the drain waits for them)."""
        return fd in self.owed

    def drained(self, fd):
        self.http.resume(fd)

    def check_caller(self, req):
        """Only the Host names the app port is reached by (a page that rebinds its own name
        to this address gets 421); browsers may not use it; with --app-token, callers must
        show it.  A request without Host (HTTP/1.0; a browser always sends one) passes."""
        host = req.host
        if host is not None and host not in self.hosts and not (self.any_ip and
                                                                ip_literal(host)):
            raise wire.HttpError(421, "Host %s is not a name of this app port (see "
                                      "--app-server-name)" % repr(host[:80])[1:])
        if req.browser and not dashboard_read(req):
            raise wire.HttpError(403, "browser requests (Origin, Sec-Fetch-*) are refused here")
        if self.token is None or req.path in PUBLIC_PATHS:
            return
        scheme, _, credentials = (req.authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.token):
            raise wire.HttpError(401, "app token required")

    def route(self, fd, req, body):
        method, path = req.method, req.path
        is_publish = path == b"/pub" or path.startswith(b"/pub/")
        if fd in self.owed and not (is_publish and method == b"POST"):
            # answered once the publishes before it are
            self.hold_back(fd, (req, body, self.http.flags[fd]))
            return
        if path == b"/health":
            if method not in (b"GET", b"HEAD"):
                raise wire.HttpError(405, "method not allowed")
            alive = self.all_responsive()
            if alive and self.w.cfg.redis and not self.redis_reachable():
                self.http.respond(fd, 503, b"redis unreachable\n", TEXT)
                return
            self.http.respond(fd, 200 if alive else 503, b"ok\n" if alive else b"worker down\n",
                              TEXT)
            return
        if is_publish:
            if method != b"POST":
                raise wire.HttpError(405, "publish with POST")
            if path == b"/pub":
                self.publish_batch(fd, body)
                return
            ident = path[5:]
            if not wire.valid_id(ident):
                raise wire.HttpError(400, wire.ID_RULE)
            if len(body) > self.w.cfg.max_message:
                raise wire.HttpError(413, "message over %d bytes" % self.w.cfg.max_message)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise wire.HttpError(400, "message is not UTF-8") from None
            idempotency = req.idempotency_key or b""
            if len(idempotency) > IDEMPOTENCY_KEY_MAX:
                raise wire.HttpError(400, "Idempotency-Key over %d bytes" % IDEMPOTENCY_KEY_MAX)
            publish = self.begin(fd, ident, 1)
            self.router.publish(ident, body, fd, publish.serial, 0, idempotency)
            return
        if path == b"/presence" or path.startswith((b"/presence/", b"/info/")):
            self.http.respond(fd, 200, self.ask(method, path, body))
            return
        if method not in (b"GET", b"HEAD"):
            raise wire.HttpError(405, "method not allowed")
        if path == b"/stats":
            self.http.respond(fd, 200, json.dumps(self.stats_document()).encode())
        elif path == b"/dashboard":
            self.http.respond(fd, *dashboard_page())
        elif path == b"/metrics":
            self.http.respond(fd, 200, self.metrics_text().encode(),
                              b"text/plain; version=0.0.4; charset=utf-8")
        else:
            raise wire.HttpError(404, "no such path")

    def publish_batch(self, fd, body):
        publish = self.begin(fd, None, 0)
        max_message = self.w.cfg.max_message
        for number, line in enumerate(body.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                ident, data, idempotency = item["id"], item["data"], item.get("key", "")
                if not isinstance(ident, str) or not isinstance(data, str):
                    raise ValueError("id and data must be strings")
                if not isinstance(idempotency, str):
                    raise ValueError("key must be a string")
                idempotency = idempotency.encode()
                if len(idempotency) > IDEMPOTENCY_KEY_MAX:
                    raise ValueError("key over %d bytes" % IDEMPOTENCY_KEY_MAX)
                ident = ident.encode()
                if not wire.valid_id(ident):
                    raise ValueError("invalid id")
                data = data.encode("utf-8")
                if len(data) > max_message:
                    raise ValueError("message over %d bytes" % max_message)
            except (ValueError, KeyError, TypeError, UnicodeError, RecursionError) as e:
                publish.errors.append({"line": number, "error": error_text(e)})
                continue
            publish.waiting += 1
            self.router.publish(ident, data, fd, publish.serial, number, idempotency)
        if not publish.waiting:                   # every line was refused: nothing to wait for
            self.answer_ready(fd, resume=False)

    # -- answers owed: publishes in flight, in request order -------------------------------
    #
    # A publisher that pipelines requests gets them all on their way to their homes at once,
    # not one round trip to a home after the other; the answers still go out in request
    # order.  Anything else pipelined behind publishes (a GET, a refused request) is held
    # back until they are answered, and nothing more is parsed meanwhile.

    def begin(self, fd, ident, waiting):
        w = self.w
        publish = Publish(w.new_serial(fd), ident, self.http.flags[fd], waiting)
        owed = self.owed.get(fd)
        if owed is None:
            owed = self.owed[fd] = collections.deque()
            # The deadline is the head's: a request behind it is no progress of it (nor, in
            # on_ack, its ACKs), else a trickle of them would keep a dead home's request waiting.
            w.set_deadline(fd, CONFIRM_TIMEOUT)
        owed.append(publish)
        self.publishes[fd, publish.serial] = publish
        if self.parse_no_more(fd, owed):
            w.set_state(fd, BUSY)
        return publish

    def parse_no_more(self, fd, owed):
        """Must fd's next requests wait until answers go out? When its last request asked to
        close, something is held back, as many publishes as a connection may have are in
        flight, or records pile up for homes that do not take them (then each publisher has
        one request in flight, as binary publishers are not read)."""
        return (not owed[-1].flags & KEEP_ALIVE or fd in self.held_back
                or len(owed) >= PIPELINE_MAX or self.w.backlogged > worker.BACKLOG_PAUSE)

    def hold_back(self, fd, what):
        self.held_back[fd] = what
        self.w.set_state(fd, BUSY)

    def refuse(self, fd, error):
        """A refused request: answered (and the connection closed) in its turn."""
        if fd in self.owed:
            self.hold_back(fd, (error, None, self.http.flags[fd]))
        else:
            self.http.fail(fd, error.status, error.reason)

    def on_ack(self, src, record):
        fd, serial, stored, last, refused = records.read_ack(record)
        self.confirm(fd, serial, stored, last, refused, records.ack_subscribers(record))

    def confirm(self, fd, serial, stored, last, refused, subscribers, unavailable=()):
        """What became of some of a publish's messages: ``stored`` (the last of them seq
        ``last``), refused (the lines of those the id table had no room for), or not
        confirmed by Redis (``unavailable``: their lines; cluster mode)."""
        publish = self.publishes.get((fd, serial))
        if publish is None:
            return                                   # the publisher went away meanwhile
        head = self.owed[fd][0]
        if publish is head:
            self.w.set_deadline(fd, CONFIRM_TIMEOUT)  # progress: the wait starts again
        publish.waiting -= stored + len(refused) + len(unavailable)
        publish.published += stored
        if stored:
            publish.seq = last
            publish.subscribers += subscribers
        for line in refused:
            publish.errors.append({"line": line, "error": "id table full"})
        for line in unavailable:
            publish.unavailable += 1
            publish.errors.append({"line": line, "error": "redis unavailable: retry"})
        if not publish.waiting and publish is head:
            self.answer_ready(fd)

    def answer_ready(self, fd, resume=True):
        """Answer the publishes at the head of fd's queue that have all their ACKs; once none
        is owed, route what was held back behind them.  Then, unless called from within the
        request loop (``resume``), go on with the requests pipelined behind."""
        w, http = self.w, self.http
        owed = self.owed[fd]
        if owed and not owed[0].waiting:
            # One write for every answer ready (a pipelining publisher's are, mostly, at once).
            answers = []
            keep = True
            while keep and owed and not owed[0].waiting:
                publish = owed.popleft()
                del self.publishes[fd, publish.serial]
                http.flags[fd] = publish.flags
                # (what is held back behind it is owed an answer too, and closes if stopping)
                response, keep = http.answer(fd, *answer_of(publish),
                                             last=not owed and fd not in self.held_back)
                answers.append(response)
            http.send_response(fd, b"".join(answers), keep)
            if w.state[fd] != READING:
                # Its request said close, or the peer left: no more to say.  Nothing is owed
                # now: a connection CLOSING on a peer that does not read meets its deadline
                # as one that owes nothing (timeout_http closes it; it has no answer to give).
                self.closed_http(fd)
                return
            if owed:
                # respond() gave it a header timeout: the new head waits for its ACKs.
                w.set_deadline(fd, CONFIRM_TIMEOUT)
        if owed:
            if self.parse_no_more(fd, owed):
                w.set_state(fd, BUSY)
                return
            w.set_state(fd, READING)
        else:
            del self.owed[fd]
            held = self.held_back.pop(fd, None)
            if held is not None:
                w.set_state(fd, READING)
                req, body, http.flags[fd] = held     # its own flags: a HEAD gets no body
                if isinstance(req, wire.HttpError):
                    http.fail(fd, req.status, req.reason)
                    return
                try:
                    self.route(fd, req, body)
                except wire.HttpError as e:
                    http.fail(fd, e.status, e.reason)
                    return
        if resume:
            http.resume(fd)

    def answer_unconfirmed(self, fd):
        """No ACK came for CONFIRM_TIMEOUT: a home died after storing or before. Say so, for
        each request still owed an answer, and close (late ACKs must meet no next request)."""
        w, http = self.w, self.http
        owed = self.owed.pop(fd)
        self.held_back.pop(fd, None)
        for publish in owed:
            del self.publishes[fd, publish.serial]
        w.log("publish: %d messages not confirmed in %.0f s"
              % (sum(publish.waiting for publish in owed), CONFIRM_TIMEOUT), fd=fd)
        owed[-1].flags &= ~KEEP_ALIVE
        answers = []
        for publish in owed:
            http.flags[fd] = publish.flags
            answers.append(http.answer(fd, *answer_of(publish), last=publish is owed[-1])[0])
        # The deadline that brought us here is spent (another entry of it may still be in this
        # tick's bucket, and would close the connection before its answers are out): these
        # answers get their own, so a peer that does not read them is closed, later.
        w.set_deadline(fd, w.cfg.header_timeout)
        http.send_response(fd, b"".join(answers), False)

    # -- what the application can ask: GET /presence/<id>, POST /presence, GET /info/<id> ----

    def ask(self, method, path, body):
        """The answer's body.  Read from the ids' home partitions (any worker may read them:
        a hint, as ``Partition.peek`` is), O(1) per id, no record sent: the subscriber
        counts are what the holders reported at their last tick (``routing``)."""
        homes, workers, key_of = self.w.homes, self.w.region.workers, shmqueue.id_key
        if path == b"/presence":
            if method != b"POST":
                raise wire.HttpError(405, "POST the ids (GET /presence/<id> for one)")
            found = {}
            for ident in presence_ids(body):
                key = key_of(ident)
                found[ident.decode()] = homes[key % workers].subscribers(key)
            return json.dumps(found).encode()
        if method not in (b"GET", b"HEAD"):
            raise wire.HttpError(405, "method not allowed")
        ident = path[path.index(b"/", 1) + 1:]
        if not wire.valid_id(ident):
            raise wire.HttpError(400, wire.ID_RULE)
        key = key_of(ident)
        part = homes[key % workers]
        if path.startswith(b"/presence/"):
            return b'{"id": "%s", "subscribers": %d}' % (ident, part.subscribers(key))
        last, buffered, subscribers, epoch = part.info(key) or (0, 0, 0, 0)
        return (b'{"id": "%s", "last": %d, "buffered": %d, "subscribers": %d, "epoch": %d}'
                % (ident, last, buffered, subscribers, epoch))

    # -- the binary protocol -------------------------------------------------------------

    def readable_binary(self, fd):
        w = self.w
        if w.state[fd] != READING:
            return
        try:
            frames, used = wire.parse_frames(w.inbuf[fd], w.cfg.max_message)
        except wire.FrameError as e:
            for ident, message in e.frames:
                self.router.publish(ident, message, fd)
            self.frames_in[fd] = self.frames_in.get(fd, 0) + len(e.frames)
            w.log("app: binary protocol: %s; connection closed" % e, fd=fd)
            w.close(fd)
            return
        w.consumed(fd, used)
        for ident, message in frames:
            self.router.publish(ident, message, fd)
        self.frames_in[fd] = self.frames_in.get(fd, 0) + len(frames)
        if w.backlogged > worker.BACKLOG_PAUSE:
            w.pause_reading(fd)                   # back-pressure: read again once rings drain

    def binary_unconfirmed(self, fd):
        """Cluster mode: Redis did not confirm a frame of fd's.  The protocol has one way to
        say so: the connection closes (its publisher reconnects, and may publish again)."""
        w = self.w
        if w.state[fd] and w.proto[fd] == protocols.APP_BINARY:
            w.log("app: binary publisher closed: Redis did not confirm its messages", fd=fd)
            w.close(fd)

    def closed_binary(self, fd):
        w = self.w
        self.half_closed.discard(fd)
        w.log("app: binary publisher closed after %d frames%s" % (
            self.frames_in.pop(fd, 0), " (%d bytes unparsed)" % len(w.inbuf[fd])
            if fd in w.inbuf else ""), "info", fd=fd)

    def stop_binary(self, fd):
        """EOF tells the publisher to go elsewhere; what it sent before closing is still read."""
        if fd not in self.half_closed:
            self.half_closed.add(fd)
            worker.half_close(fd)
        return True

    # -- /health, /stats and /metrics --------------------------------------------------

    def redis_reachable(self):
        """Cluster mode: every live worker reaches Redis (each counts itself down or up)."""
        region = self.w.region
        return not any(region.stats(i).get("redis_down") for i in range(region.workers)
                       if region.stats(i).get("pid"))

    def all_responsive(self):
        w = self.w
        now_ms = time.time() * 1000
        return all(worker.responsive(w.region.stats(i).as_dict(), now_ms, w.cfg.worker_timeout)
                   for i in range(w.region.workers))

    def stats_document(self):
        w = self.w
        w.refresh_stats()
        workers = []
        totals = dict.fromkeys(shmqueue.COUNTER_FIELDS, 0)
        now_ms = time.time() * 1000
        for i in range(w.region.workers):
            block = w.region.stats(i).as_dict()
            row = {"index": i, "pid": block["pid"],
                   "responsive": worker.responsive(block, now_ms, w.cfg.worker_timeout),
                   "loop_age_ms": max(0, int(now_ms - block["heartbeat_ms"])) if block["pid"] else None,
                   "restarts": block["restarts"]}
            for name in shmqueue.COUNTER_FIELDS:
                row[name] = block[name]
                totals[name] += block[name]
            workers.append(row)
        return {"workers": workers, "totals": totals, "shm": w.region.totals(),
                "uptime_s": round(time.time() - w.cfg.started_at, 3)}

    def metrics_text(self):
        doc = self.stats_document()
        lines = []
        for name in shmqueue.COUNTER_FIELDS:
            gauge = name in ("connections", "subscribers", "rss_bytes", "redis_down")
            metric = "megacomet_" + name + ("" if gauge else "_total")
            lines.append("# TYPE %s %s" % (metric, "gauge" if gauge else "counter"))
            for row in doc["workers"]:
                lines.append('%s{worker="%d"} %d' % (metric, row["index"], row[name]))
        for name, value in doc["shm"].items():
            lines.append("# TYPE megacomet_shm_%s gauge" % name)
            lines.append("megacomet_shm_%s %d" % (name, value))
        lines.append("# TYPE megacomet_workers_alive gauge")
        lines.append("megacomet_workers_alive %d" % sum(1 for r in doc["workers"] if r["pid"]))
        lines.append("# TYPE megacomet_workers_responsive gauge")
        lines.append("megacomet_workers_responsive %d" % sum(r["responsive"] for r in doc["workers"]))
        lines.append("# TYPE megacomet_worker_restarts_total counter")
        for row in doc["workers"]:
            lines.append('megacomet_worker_restarts_total{worker="%d"} %d'
                         % (row["index"], row["restarts"]))
        lines.append("# TYPE megacomet_uptime_seconds gauge")
        lines.append("megacomet_uptime_seconds %s" % doc["uptime_s"])
        return "\n".join(lines) + "\n"


def allowed_hosts(cfg):
    """(the Host values the app port answers, does it answer any IP literal?): its address as
    in --app-host, with and without the port; localhost, 127.0.0.1 and [::1] when that is
    loopback (or a wildcard); every --app-server-name.  Bound to a wildcard (0.0.0.0, ::),
    it is reached by every address of the machine: any IP literal passes (a rebound name
    is a name, never a literal)."""
    host = cfg.app_host.lower()
    wildcard = host in ("", "0.0.0.0", "::")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    names = set(cfg.app_server_names or ())
    if not wildcard:
        names.add("[%s]" % host if ":" in host else host)
    if loopback or wildcard:
        names.update(("localhost", "127.0.0.1", "[::1]"))
    allowed = set()
    for name in names:
        allowed.add(name.encode())
        if not name.endswith("]") and ":" in name:
            continue                              # NAME:PORT given: as it is
        allowed.add(b"%s:%d" % (name.encode(), cfg.app_port))
    return frozenset(allowed), wildcard


def ip_literal(host):
    """Is a Host value an IP address (IPv4, or IPv6 in brackets), with or without a port?"""
    if host.startswith(b"["):
        address, _, port = host[1:].partition(b"]")
        if port and not (port[:1] == b":" and port[1:].isdigit()):
            return False
    else:
        address, _, port = host.partition(b":")
        if port and not port.isdigit():
            return False
    try:
        ipaddress.ip_address(address.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return b"%" not in address


NOT_CONFIRMED = b"not confirmed: a worker restarted; it may or may not have been stored\n"


RETRY_AFTER = b"Retry-After: 1\r\n"


def answer_of(publish):
    """(status, body, content type, headers) of a publish's answer, confirmed by its ACKs
    or not."""
    if publish.ident is not None:
        if publish.waiting:
            return 503, NOT_CONFIRMED, TEXT, b""
        if publish.seq:
            return 202, (b'{"id": "%s", "seq": %d, "subscribers": %d}'
                         % (publish.ident, publish.seq, publish.subscribers)), JSON, b""
        if publish.unavailable:
            return 503, REDIS_UNAVAILABLE, TEXT, RETRY_AFTER
        return 503, b"id table full\n", TEXT, b""
    publish.errors.sort(key=lambda error: error["line"])
    document = {"published": publish.published, "errors": publish.errors}
    if publish.waiting:
        document["unconfirmed"] = publish.waiting
    if publish.unavailable:
        return 503, json.dumps(document).encode(), JSON, RETRY_AFTER
    return 503 if publish.waiting else 202, json.dumps(document).encode(), JSON, b""


REDIS_UNAVAILABLE = (b"redis unavailable: not stored, or not confirmed stored; retry "
                     b"(with the same Idempotency-Key header, it is stored once)\n")


PRESENCE_MAX = 10000             # ids per POST /presence


def presence_ids(body):
    """The ids of a POST /presence: a JSON array of strings, or one id per line."""
    text = body.strip()
    if text.startswith(b"["):
        try:
            items = json.loads(text)
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise ValueError
            idents = [item.encode() for item in items]
        except (ValueError, RecursionError, UnicodeError):
            raise wire.HttpError(400, "a JSON array of ids (strings), or one id per line") from None
    else:
        idents = [line.strip() for line in text.split(b"\n")]
        idents = [ident for ident in idents if ident]
    if len(idents) > PRESENCE_MAX:
        raise wire.HttpError(413, "at most %d ids per request" % PRESENCE_MAX)
    for ident in idents:
        if not wire.valid_id(ident):
            raise wire.HttpError(400, "%s: %s" % (repr(ident[:40])[2:-1], wire.ID_RULE))
    return idents


def error_text(e):
    if isinstance(e, KeyError):
        return "missing %s" % e
    if isinstance(e, json.JSONDecodeError):
        return "invalid JSON"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return str(e)


# -- the live dashboard: GET /dashboard, a static page that reads GET /stats every second ----

PUBLIC_PATHS = (b"/health", b"/dashboard")    # answered without the app token (no data in them)
DASHBOARD_READS = (b"/dashboard", b"/stats")  # what a browser may GET here, on its user's word


def dashboard_read(req):
    """May this browser request pass the browser check?  Only a GET (or HEAD) of the dashboard
    or of /stats that the browser itself says was asked by its user (``Sec-Fetch-Site: none``:
    typed in, a bookmark) or by a page of this very origin (``same-origin``: the dashboard's own
    fetches), with no Origin or this port's own.  Another site's page (cross-site; same-site,
    such as the client port's) is refused as before, and so is any other request: a POST, a GET
    of /metrics.  A name rebound to this address is refused by the Host check before this, and
    /stats still needs the app token when there is one."""
    return (req.method in (b"GET", b"HEAD") and req.path in DASHBOARD_READS
            and req.fetch_site in (b"same-origin", b"none")
            and (req.origin is None or req.origin == b"http://" + (req.host or b"")))


DASHBOARD_HEADERS = (b"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"
                     b"X-Frame-Options: DENY\r\nReferrer-Policy: no-referrer\r\n")


def dashboard_page():
    """The (status, body, content type, headers) of GET /dashboard: the page from the package's
    static/, read on each request (a rare one: nothing is kept per worker), with a
    Content-Security-Policy that lets it run only its own inline script and style, and fetch
    from its own origin only."""
    page = front.static_file("dashboard.html")
    if page is None:
        return 404, b"no dashboard.html in this installation\n", TEXT, b""
    hashes = {}
    for tag in (b"script", b"style"):
        hashes[tag] = b" ".join(
            b"'sha256-%s'" % base64.b64encode(hashlib.sha256(block).digest())
            for block in re.findall(b"<%s>(.*?)</%s>" % (tag, tag), page, re.S)) or b"'none'"
    policy = (b"default-src 'none'; script-src %s; style-src %s; connect-src 'self'; "
              b"img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
              % (hashes[b"script"], hashes[b"style"]))
    return (200, page, b"text/html; charset=utf-8",
            DASHBOARD_HEADERS + b"Content-Security-Policy: %s\r\n" % policy)
