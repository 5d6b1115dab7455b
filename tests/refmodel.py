"""A reference model of MegaComet's documented subscription semantics: pure Python, no sockets.

The harness (tests/test_model.py, tools/model_check.py) does the I/O against a live server and
tells the model what it sent, when, and what came back; the model says whether every answer
is one the documented semantics allow, and keeps the clients' cursors the way a client that
follows the rules does (README: keep ``last`` and ``epoch`` per id, send them back, reset an
id's cursor when an answer shows another epoch for it).

What the model knows and what it does not
-----------------------------------------
Timing near the TTL is fuzzy (expiry runs 4 times a second, on a shared box), so every fact is
an interval of time: a request is sent at ``t0`` and its answer read at ``t1``, and the server
acted at some instant in between.  A message is *surely buffered* from its publish's answer
until ``ttl - slack`` after it was sent, and *possibly buffered* until ``ttl + slack + tick``
after its answer.  A subscriber surely keeps its ids alive once it is surely registered (a
poll held for longer than ``reg_delay``, a stream ``reg_delay`` after its head) until it ends,
and possibly for ``linger`` after.  A SIGKILL, SIGSTOP or reload is a *chaos window*: during
it and for ``chaos_tail`` after, anything may still be settling.

Each id is a history of *lives*: a life begins when the id is created (by a publish or a
subscription) and ends when it is forgotten; a life has one epoch, different from every other
life's, and seqs 1, 2, 3, ... .  What the model cannot see (whether an id was forgotten
between two sightings, which seq a batch message got, whether an unconfirmed publish was
stored, which epoch a life has before any answer shows it) it keeps as a small set of
*possible worlds*, each a concrete assignment of publishes to lives and seqs, with the
epochs seen so far.  Every observation keeps the worlds it is consistent with; when none is
left, the server did something no world allows: that is a violation, explained from the
world that was the model's best guess, and the id is retired (the harness moves on to a
fresh one, so one defect is reported once, not as a cascade).

Invariants checked (per id, in every world):
- seqs of one life are exactly consecutive: a confirmed publish gets the next seq, or 1 in a
  new life, and a new life (a new epoch) only when the id could have been forgotten; when it
  surely was forgotten, the next publish or subscription starts a new life;
- an answer shows the epoch of the id's life at that time, never one of an earlier life;
- the cursor rule: the effective since is 0 when the epoch sent is not the id's, or the since
  is beyond the id's last seq, else the since sent;
- a poll answers with every message that was surely buffered after the effective since, of
  every one of its ids; nothing at or below it; in seq order; ``last`` the newest seq it
  delivered for the id, else the since asked with or a later seq when nothing surely
  buffered lies between (anything up to the id's last seq when the cursor was reset); a
  held poll is woken by a message published while it waits;
- a stream sends what was surely buffered after the effective since, then every message
  published while it is open, each once, in seq order; the SSE ``epoch`` event comes before
  any message, and a several-ids event's cursor never passes a message not yet sent;
- answers name only the client's own ids and its own JSONP callback, and carry only data
  published to the id named;
- a subscription is refused (503, SSE ``event: error``, WS close 1013) only if it names an
  id that may not exist yet;
- per client: nothing delivered twice (within one epoch kept).
"""

import json
import re
from dataclasses import dataclass

INF = float("inf")


@dataclass
class Config:
    ttl: float                   # --queue-ttl
    max_queued: int = 64         # --max-queued
    max_ids: int = 64            # --max-ids
    slack: float = 0.5           # around the TTL: expiry is checked 4 times a second
    tick: float = 0.25           # the workers' housekeeping period
    reg_delay: float = 1.0       # a subscription is surely registered this long after it began
    linger: float = 1.0          # an id may outlive its last subscriber by this much
    chaos_tail: float = 2.0      # after a chaos window, things may still be settling
    stream_grace: float = 2.0    # a message published while a stream is open arrives within this
    wake_grace: float = 1.0      # a held poll is woken within this of a publish's answer
    max_worlds: int = 48         # more possible worlds than this: stop checking the id
    epoch_pairs: bool = True     # clients send epoch=a:E1,b:E2 (False: one number, or none)


class Violation:
    def __init__(self, category, ident, message, history=()):
        self.category = category
        self.ident = ident
        self.message = message
        self.history = list(history)

    def signature(self):
        """The message without its numbers and ids: what counts as 'the same violation'."""
        text = self.message.replace(self.ident or "\0", "ID")
        text = re.sub(r"/(sub|sse|ws)/\S+", r"/\1/…", text)
        text = re.sub(r"\(Last-Event-ID: [^)]*\)", "(Last-Event-ID: …)", text)
        text = re.sub(r"'[^']*'", "'…'", text)
        return "%s: %s" % (self.category, re.sub(r"\d+(\.\d+)?", "N", text))

    def report(self, limit=40):
        lines = ["[%s] %s: %s" % (self.category, self.ident or "-", self.message)]
        if self.history:
            lines.append("  history of %s (times in s from the model's start):" % self.ident)
            lines += ["    " + h for h in self.history[-limit:]]
        return "\n".join(lines)

    def __repr__(self):
        return "Violation(%r, %r, %r)" % (self.category, self.ident, self.message)


class Failed(Exception):
    """One world (or candidate life) is inconsistent with an observation."""

    def __init__(self, category, message):
        super().__init__(message)
        self.category = category
        self.message = message


# -- facts: what happened, the same in every world ---------------------------------------

class Pub:
    """One message published to one id."""
    __slots__ = ("n", "ident", "data", "t0", "t1", "kind", "seq")

    def __init__(self, n, ident, data, t0, t1, kind, seq=None):
        self.n, self.ident, self.data, self.t0, self.t1 = n, ident, data, t0, t1
        self.kind = kind         # "ok": confirmed, seq known; "batch": confirmed, seq not told;
        self.seq = seq           # "unknown": may or may not have been stored

    @property
    def confirmed(self):
        return self.kind != "unknown"


class Sub:
    """One subscription's hold on one id: possibly from t0 to end (+linger), surely from
    sure_from to end (unless a chaos window cut it)."""
    __slots__ = ("t0", "end", "sure_from")

    def __init__(self, t0):
        self.t0, self.end, self.sure_from = t0, None, None


class Chaos:
    __slots__ = ("kind", "t0", "t1")

    def __init__(self, kind, t0):
        self.kind, self.t0, self.t1 = kind, t0, None


# -- worlds: one concrete guess at what the model cannot see ---------------------------

class Life:
    __slots__ = ("epoch", "seqs", "last", "created", "obs")

    def __init__(self, created):
        self.epoch = None        # None until an answer shows it
        self.seqs = {}           # seq -> Pub.n
        self.last = 0            # its newest seq
        self.created = created   # (a, b): the window of the event that created it
        self.obs = created       # the latest (a, b) at which it was seen

    def copy(self):
        life = Life(self.created)
        life.epoch, life.seqs, life.last, life.obs = self.epoch, dict(self.seqs), self.last, self.obs
        return life

    def seen(self, a, b):
        self.obs = (max(self.obs[0], a), max(self.obs[1], b))


class World:
    __slots__ = ("lives", "where", "story")

    def __init__(self):
        self.lives = []          # oldest first; the last is the current one
        self.where = {}          # Pub.n -> (life index, seq), for the publishes stored
        self.story = []          # the guesses this world made, for explanations

    def copy(self):
        w = World()
        w.lives = [life.copy() for life in self.lives]
        w.where = dict(self.where)
        w.story = list(self.story)
        return w

    def key(self):
        return (tuple((life.epoch, tuple(sorted(life.seqs.items()))) for life in self.lives),
                tuple(sorted(self.where.items())))

    def store(self, k, pub, seq, a, b):
        life = self.lives[k]
        life.seqs[seq] = pub.n
        life.last = max(life.last, seq)
        self.where[pub.n] = (k, seq)
        life.seen(a, b)


class IdState:
    def __init__(self, name):
        self.name = name
        self.pubs = []
        self.by_data = {}
        self.subs = []
        self.worlds = [World()]
        self.history = []
        self.retired = False


def covered(intervals, a, b):
    """Whether the union of the closed intervals covers [a, b]."""
    pos = a
    for lo, hi in sorted(intervals):
        if lo > pos:
            return False
        if hi > pos:
            pos = hi
            if pos >= b:
                return True
    return pos >= b


def uncovered_point(intervals, a, b):
    """A point of [a, b] that no interval covers, or None."""
    if a > b:
        return None
    pos = a
    for lo, hi in sorted(intervals):
        if lo > pos:
            return pos
        pos = max(pos, hi)
        if pos > b:
            return None
    return pos if pos <= b else None


# -- requests as the model's clients make them ------------------------------------------

class Request:
    """One subscription request of a client: what it sent for each id."""

    def __init__(self, client, ids, transport, t0):
        self.client = client
        self.ids = list(ids)
        self.transport = transport          # "poll", "sse", "ws"
        self.t0 = t0
        self.since = {}                     # id -> the cursor sent
        self.epoch = {}                     # id -> the epoch sent (absent: none)
        self.callback = None
        self.timeout = None
        self.path = None
        self.headers = []
        self.subs = {}                      # id -> Sub
        self.late_read = False              # its answer may have waited unread a while
        self.established = None             # streams: when its head came (and it was not refused)
        self.label = ""


class Client:
    """A client that follows the rules: it keeps ``last`` and ``epoch`` per id from every
    answer, sends them back, and resets an id's cursor when an answer shows another epoch
    than the one it kept.  ``use_epoch=False``: an older client that sends no epoch (it still
    keeps them, to see a reset)."""

    def __init__(self, model, name, use_epoch=True):
        self.model = model
        self.name = name
        self.use_epoch = use_epoch
        self.last = {}
        self.epoch = {}
        self.seen = {}           # id -> seqs received under the epoch kept
        self.callbacks = 0

    def forget(self, ident):
        self.last.pop(ident, None)
        self.epoch.pop(ident, None)
        self.seen.pop(ident, None)

    def _cursor_query(self, req, ids, pairs_with_zero, single_epoch):
        query = []
        for ident in ids:
            req.since[ident] = self.last.get(ident, 0)
            if self.use_epoch and ident in self.epoch:
                req.epoch[ident] = self.epoch[ident]
        if len(ids) == 1:
            query.append("since=%d" % req.since[ids[0]])
            if ids[0] in req.epoch:
                query.append("epoch=%d" % req.epoch[ids[0]])
            return query
        pairs = ["%s:%d" % (i, req.since[i]) for i in ids if req.since[i] or pairs_with_zero]
        if pairs:
            query.append("since=" + ",".join(pairs))
        if req.epoch:
            values = set(req.epoch.values())
            # A single number applies to every id: right when every id has that epoch, or
            # the ids without one have nothing to lose (cursor 0).
            if (single_epoch or not self.model.cfg.epoch_pairs) and len(values) == 1 and all(
                    i in req.epoch or req.since[i] == 0 for i in ids):
                value = values.pop()
                query.append("epoch=%d" % value)
                for i in ids:
                    req.epoch[i] = value
            elif self.model.cfg.epoch_pairs:
                query.append("epoch=" + ",".join("%s:%d" % (i, req.epoch[i])
                                                  for i in ids if i in req.epoch))
            else:
                req.epoch = {}
        return query

    def poll(self, ids, t0, timeout=1, callback=False, pairs_with_zero=False, single_epoch=False):
        req = Request(self, ids, "poll", t0)
        query = self._cursor_query(req, ids, pairs_with_zero, single_epoch)
        req.timeout = timeout
        query.append("timeout=%d" % timeout)
        if callback:
            self.callbacks += 1
            req.callback = "cb_%s_%d" % (self.name, self.callbacks)
            query.append("callback=" + req.callback)
        req.path = "/sub/%s?%s" % (",".join(ids), "&".join(query))
        self.model._subscribe(req)
        return req

    def stream(self, ids, transport, t0, last_event_id=False, pairs_with_zero=False,
               single_epoch=False):
        req = Request(self, ids, transport, t0)
        query = self._cursor_query(req, ids, pairs_with_zero, single_epoch)
        if transport == "sse" and last_event_id:
            since = [q for q in query if q.startswith("since=")]
            query = [q for q in query if not q.startswith("since=")]
            if len(ids) == 1:
                req.headers.append("Last-Event-ID: %d" % req.since[ids[0]])
            elif since:
                req.headers.append("Last-Event-ID: " + since[0][len("since="):])
        req.path = "/%s/%s%s" % ("sse" if transport == "sse" else "ws", ",".join(ids),
                                 "?" + "&".join(query) if query else "")
        self.model._subscribe(req)
        return req

    def take(self, ident, epoch, last, seqs, where):
        """Keep what an answer (or a stream) said of one id; a seq received twice under one
        epoch is a violation."""
        model = self.model
        if epoch:                                 # 0 is never an epoch: the one kept stays
            if self.epoch.get(ident) is not None and self.epoch[ident] != epoch:
                self.seen[ident] = set()          # another epoch: everything counts again
            self.epoch[ident] = epoch
        seen = self.seen.setdefault(ident, set())
        for seq in seqs:
            if seq in seen:
                model._violate("dup", ident, "%s: seq %d delivered to client %s twice under "
                               "epoch %s" % (where, seq, self.name, self.epoch.get(ident)))
                return
            seen.add(seq)
        if last is not None:
            self.last[ident] = last


# -- the model ----------------------------------------------------------------------

class Model:
    def __init__(self, cfg):
        self.cfg = cfg
        self.ids = {}
        self.chaos = []
        self.violations = []
        self.events = 0
        self.origin = None
        self.refusals = 0

    # -- bookkeeping ------------------------------------------------------------------

    def client(self, name, use_epoch=True):
        return Client(self, name, use_epoch)

    def state(self, ident):
        st = self.ids.get(ident)
        if st is None:
            st = self.ids[ident] = IdState(ident)
        return st

    def retired(self, ident):
        st = self.ids.get(ident)
        return st is not None and st.retired

    def _t(self, t):
        if self.origin is None:
            self.origin = t
        return "%.2f" % (t - self.origin)

    def _log(self, ident, text):
        st = self.state(ident)
        st.history.append(text)
        if len(st.history) > 200:
            del st.history[:50]

    def _violate(self, category, ident, message):
        history = self.ids[ident].history if ident in self.ids else ()
        self.violations.append(Violation(category, ident, message, history))
        if ident in self.ids:
            self.ids[ident].retired = True

    def chaos_begin(self, kind, t):
        c = Chaos(kind, t)
        self.chaos.append(c)
        self._t(t)
        return c

    def chaos_end(self, c, t):
        c.t1 = t

    def in_chaos(self, a, b):
        tail = self.cfg.chaos_tail
        return any(c.t0 <= b and (INF if c.t1 is None else c.t1) + tail >= a for c in self.chaos)

    # -- time rules ---------------------------------------------------------------------

    def _sure_intervals(self, st, w, k):
        """When life k of the id surely existed: a message of it surely buffered, or a
        subscriber surely registered (the id's, whichever life it is in)."""
        cfg = self.cfg
        out = []
        if k is not None and k < len(w.lives):
            for n in w.lives[k].seqs.values():
                p = st.pubs[n]
                if p.confirmed:
                    out.append((p.t1, p.t0 + cfg.ttl - cfg.slack))
        for s in st.subs:
            if s.sure_from is None:
                continue
            end = INF if s.end is None else s.end
            for c in self.chaos:
                if c.kind != "stop" and s.sure_from <= c.t0 < end:
                    end = c.t0                    # a kill or reload may have dropped it
            if end > s.sure_from:
                out.append((s.sure_from, end))
        return out

    def _possible_intervals(self, st, w, k):
        """When life k of the id possibly still existed."""
        cfg = self.cfg
        out = []
        if k is not None and k < len(w.lives):
            for n in w.lives[k].seqs.values():
                p = st.pubs[n]
                end = p.t1 + cfg.ttl + cfg.slack + cfg.tick
                if not p.confirmed:
                    end += cfg.chaos_tail
                out.append((p.t0, end))
        for s in st.subs:
            out.append((s.t0, (INF if s.end is None else s.end) + cfg.linger))
        for c in self.chaos:
            out.append((c.t0, (INF if c.t1 is None else c.t1) + cfg.chaos_tail))
        return out

    def _surely_buffered(self, st, w, k, p, a, b):
        """Message p (of life k) surely buffered throughout [a, b]: stored before a, not
        expired by b, and not pushed out by --max-queued newer ones by b."""
        cfg = self.cfg
        if not p.confirmed or p.t1 > a or b >= p.t0 + cfg.ttl - cfg.slack:
            return False
        seq = w.where[p.n][1]
        newer = sum(1 for s, n in w.lives[k].seqs.items() if s > seq and st.pubs[n].t0 <= b)
        return newer < cfg.max_queued

    def _candidates(self, st, w, a, b, observation):
        """(world, life index, how) for an event in [a, b]: the current life; a new one if
        the id could have been forgotten since the current life was last seen; for an
        observation, the previous life if the current one may have begun after it."""
        out = []
        if not w.lives:
            w2 = w.copy()
            w2.lives.append(Life((a, b)))
            return [(w2, 0, "first")], None, None
        k = len(w.lives) - 1
        cur = w.lives[k]
        gone = uncovered_point(self._possible_intervals(st, w, k), cur.obs[1], a)
        if gone is None:
            out.append((w.copy(), k, "same"))
        if observation and a < cur.created[1]:
            # Seen before the current life began (the answers of overlapping requests are
            # read in the order they were sent, not made): the previous life, or a life that
            # began and ended in between (a subscriber's, with no message).
            if k > 0:
                out.append((w.copy(), k - 1, "previous"))
            w2 = w.copy()
            w2.lives.insert(k, Life((a, b)))
            w2.where = {n: (j + (j >= k), q) for n, (j, q) in w2.where.items()}
            out.append((w2, k, "between"))
        gap = uncovered_point(self._sure_intervals(st, w, k), cur.obs[0], b)
        if gap is not None:
            w2 = w.copy()
            w2.lives.append(Life((a, b)))
            w2.story.append("forgotten near %s" % self._t(gap))
            out.append((w2, k + 1, "new"))
        return out, gone, gap

    def _explain(self, st, failures, gone, gap, w):
        """One message for a violation: the best guess's reason, and why no other life fits."""
        category, message = failures[0][1].category, failures[0][1].message
        for how, f in failures:
            if how in ("same", "first"):
                category, message = f.category, f.message
                break
        notes = []
        if w.lives:
            cur = w.lives[-1]
            if gap is None:
                notes.append("no new life possible: the id was surely alive from its last "
                             "sighting at %s on" % self._t(cur.obs[0]))
            if gone is not None:
                notes.append("surely forgotten at %s (epoch %s, last seq %d)"
                             % (self._t(gone), cur.epoch, cur.last))
        if len(self.ids[st.name].worlds) > 1:
            notes.append("%d possible worlds, none fits" % len(self.ids[st.name].worlds))
        if notes:
            message += " [" + "; ".join(notes) + "]"
        return category, message

    def _apply(self, st, a, b, observation, fn):
        """Run fn(world, life index, how) -> world or raise Failed, over every candidate of
        every world; keep what survives; a violation if nothing does."""
        survivors = []
        failures = []
        first = None
        for w in st.worlds:
            cands, gone, gap = self._candidates(st, w, a, b, observation)
            if first is None:
                first = (gone, gap, w)
            for w2, k, how in cands:
                try:
                    survivors.append(fn(w2, k, how))
                except Failed as f:
                    failures.append((how, f))
        if not survivors:
            if not failures:
                failures = [("same", Failed("model", "no life possible"))]
            category, message = self._explain(st, failures, *first)
            self._violate(category, st.name, message)
            return False
        unique = {}
        for w in survivors:
            unique.setdefault(w.key(), w)
        st.worlds = list(unique.values())
        if len(st.worlds) > self.cfg.max_worlds:
            self._log(st.name, "(too many possible worlds: no longer checked)")
            st.retired = True
        return True

    # -- publishing ----------------------------------------------------------------------

    def _pub(self, ident, data, t0, t1, kind, seq=None):
        st = self.state(ident)
        p = Pub(len(st.pubs), ident, data, t0, t1, kind, seq)
        st.pubs.append(p)
        st.by_data[data] = p
        return st, p

    def published(self, ident, data, t0, t1, status, body):
        """A single publish, POST /pub/<id>: 202 {"id", "seq"}, or 503."""
        self.events += 1
        self._t(t0)
        if status == 202:
            try:
                doc = json.loads(body)
                seq = doc["seq"]
                assert doc["id"] == ident and type(seq) is int and seq > 0
            except (ValueError, KeyError, AssertionError, TypeError):
                self._violate("format", ident, "publish answer %r" % body[:200])
                return None
            st, p = self._pub(ident, data, t0, t1, "ok", seq)
            self._log(ident, "%s-%s publish %r -> seq %d" % (self._t(t0), self._t(t1), data, seq))
            if not st.retired:
                self._store(st, p, t0, t1, seq)
            return seq
        if status == 503 and body.startswith(b"id table full"):
            self._log(ident, "%s publish %r refused: id table full" % (self._t(t0), data))
            self._pub(ident, data, t0, t1, "refused")
            self._check_publish_refusal(ident, t0, t1)
            return None
        if status is None or status == 503:
            st, p = self._pub(ident, data, t0, t1, "unknown")
            self._log(ident, "%s-%s publish %r: unconfirmed (%s)" % (self._t(t0), self._t(t1), data,
                                                                     status or body))
            if status is None and not self.in_chaos(t0, t1):
                self._violate("status", ident, "publish failed outside any chaos: %r" % (body,))
            elif status == 503 and not self.in_chaos(t0, t1):
                self._violate("status", ident, "publish unconfirmed (503) outside any chaos")
            if not st.retired:
                self._store(st, p, t0, t1, None, maybe=True)
            return None
        self._violate("status", ident, "publish answered %s %r" % (status, body[:200]))
        return None

    def published_batch(self, items, t0, t1, status, body):
        """POST /pub, newline-delimited {"id", "data"}: 202 {"published", "errors"}, or 503
        with "unconfirmed"."""
        self.events += 1
        self._t(t0)
        doc = None
        try:
            doc = json.loads(body) if status in (202, 503) else None
        except ValueError:
            pass
        refused_lines = set()
        unknown = status != 202
        if doc is not None:
            refused_lines = {e.get("line") for e in doc.get("errors", [])}
            for e in doc.get("errors", []):
                if "full" not in str(e.get("error")):
                    self._violate("status", items[0][0], "batch line refused: %r" % (e,))
            if status == 202 and doc.get("published") != len(items) - len(refused_lines):
                self._violate("format", items[0][0], "batch answer %r for %d lines"
                              % (doc, len(items)))
        elif status == 202:
            self._violate("format", items[0][0], "batch answer %r" % (body[:200],))
        if unknown and not self.in_chaos(t0, t1):
            self._violate("status", items[0][0], "batch answered %s %r outside any chaos"
                          % (status, body[:200]))
        first_of = set()
        for line, (ident, data) in enumerate(items, 1):
            if line in refused_lines:
                self._pub(ident, data, t0, t1, "refused")
                self._log(ident, "%s batch %r refused: id table full" % (self._t(t0), data))
                self._check_publish_refusal(ident, t0, t1)
                continue
            st, p = self._pub(ident, data, t0, t1, "unknown" if unknown else "batch")
            self._log(ident, "%s-%s batch publish %r%s" % (self._t(t0), self._t(t1), data,
                                                           " (unconfirmed)" if unknown else ""))
            if not st.retired:
                self._store(st, p, t0, t1, None, maybe=unknown, follows=ident in first_of)
            first_of.add(ident)

    def _check_publish_refusal(self, ident, t0, t1):
        st = self.state(ident)
        if not st.retired and self._surely_exists(st, t0, t1):
            self._violate("refusal", ident, "a publish to an id that surely existed was refused "
                          "(id table full)")

    def _store(self, st, p, t0, t1, seq, maybe=False, follows=False):
        """Publish p is stored (or, maybe=True, perhaps not) in the current life with the next
        seq, or as seq 1 of a new life; seq: what the server said, if it said."""
        kept = [w.copy() for w in st.worlds] if maybe else None

        def fn(w, k, how):
            if follows and how == "new":
                raise Failed("seq", "a batch's later line cannot begin a new life")
            life = w.lives[k]
            expect = life.last + 1
            if seq is not None and seq != expect:
                if how == "new":
                    raise Failed("seq", "seq %d, but a new life begins at 1" % seq)
                raise Failed("seq", "seq %d follows seq %d of the same life (epoch %s): "
                             "expected %d" % (seq, life.last, life.epoch, expect))
            w.store(k, p, expect, t0, t1)
            if how == "new":
                w.story.append("%r began a new life" % p.data)
            return w

        ok = self._apply(st, t0, t1, False, fn)
        if maybe:
            if not ok:                            # "not stored" always fits: no violation
                self.violations.pop()
                st.retired = False
                st.worlds = kept
                return
            unique = {w.key(): w for w in st.worlds}
            for w in kept:
                unique.setdefault(w.key(), w)
            st.worlds = list(unique.values())

    # -- subscriptions -----------------------------------------------------------------

    def _subscribe(self, req):
        self.events += 1
        self._t(req.t0)
        for ident in req.ids:
            st = self.state(ident)
            s = Sub(req.t0)
            st.subs.append(s)
            req.subs[ident] = s

    def _end_subs(self, req, t1, sure=False):
        for ident, s in req.subs.items():
            if s.end is None:
                s.end = t1
            if sure and s.sure_from is None and t1 - req.t0 > self.cfg.reg_delay + 0.1:
                s.sure_from = req.t0 + self.cfg.reg_delay

    def _surely_exists(self, st, a, b):
        """In every world, the id's current life surely existed throughout [a, b]."""
        for w in st.worlds:
            k = len(w.lives) - 1 if w.lives else None
            if k is None or not covered(self._sure_intervals(st, w, k), a, b):
                return False
        return True

    def _refused(self, req, t1, what):
        """A refused subscription: allowed only if one of its ids may not exist yet."""
        self.refusals += 1
        for s in req.subs.values():
            s.sure_from = None                    # it never held anything
        for ident in req.ids:
            self._log(ident, "%s-%s %s %s refused (%s)" % (self._t(req.t0), self._t(t1),
                                                         req.client.name, req.label, what))
        live = [i for i in req.ids if not self.ids[i].retired]
        if live and all(self._surely_exists(self.ids[i], req.t0, t1) for i in live):
            self._violate("refusal", live[0], "%s refused (%s) though every one of its ids "
                          "surely existed: %s" % (req.path, what, ", ".join(live)))

    def table_bound(self, held_ids):
        """Subscribers hold this many distinct new ids and nothing was refused yet."""
        bound = 2 * self.cfg.max_ids + 16
        if held_ids > bound:
            self.violations.append(Violation(
                "refusal", None, "%d new ids held by subscribers and none refused: the table "
                "(--max-ids %d) never filled" % (held_ids, self.cfg.max_ids)))
            return False
        return True

    # -- long-polls ----------------------------------------------------------------------

    def poll_result(self, req, t1, status, body, error=None):
        """The answer to a poll (status None: the connection failed with ``error``)."""
        self.events += 1
        chaos = self.in_chaos(req.t0, t1)
        what = "%s poll %s" % (req.client.name, req.path)
        req.label = "poll"
        if status is None:
            self._end_subs(req, t1)
            for ident in req.ids:
                self._log(ident, "%s-%s %s: failed (%s)" % (self._t(req.t0), self._t(t1), what, error))
            if not chaos:
                self._violate("status", req.ids[0], "%s failed outside any chaos: %s" % (what, error))
            return
        if status == 503:
            self._end_subs(req, t1)
            self._refused(req, t1, "503")
            return
        if status != 200:
            self._end_subs(req, t1)
            self._violate("status", req.ids[0], "%s answered %s %r" % (what, status, body[:300]))
            return
        # Held throughout (so keeping its ids) only if the answer was read as it came.
        self._end_subs(req, t1, sure=not chaos and not req.late_read)
        try:
            answer = self._parse_poll(req, body)
        except Failed as f:
            for ident in req.ids:
                self._log(ident, "%s-%s %s -> %r" % (self._t(req.t0), self._t(t1), what, body[:300]))
            self._violate(f.category, req.ids[0], "%s: %s" % (what, f.message))
            return
        for ident in req.ids:
            self._log(ident, "%s-%s %s -> %s" % (self._t(req.t0), self._t(t1), what,
                                                 body[:400].decode(errors="replace")))
        timed_out = t1 - req.t0 >= req.timeout - 0.05
        empty = not any(answer[i][2] for i in req.ids)
        for ident in req.ids:
            epoch, last, msgs = answer[ident]
            st = self.ids[ident]
            if st.retired:
                continue
            self._poll_one(req, st, t1, epoch, last, msgs, chaos, timed_out, empty)
        for ident in req.ids:
            epoch, last, msgs = answer[ident]
            if not self.ids[ident].retired:
                req.client.take(ident, epoch, last, [s for s, _ in msgs], what)

    def _parse_poll(self, req, body):
        """{id: (epoch, last, [(seq, Pub)])} from a JSON or JSONP answer; Failed if it is
        malformed or names what is not the client's."""
        text = body.decode("utf-8", errors="replace")
        m = re.fullmatch(r"/\*\*/([A-Za-z_$][A-Za-z0-9_$.]*)\((.*)\);", text, re.S)
        if req.callback is None:
            if m or text.startswith("/**/"):
                raise Failed("foreign", "a JSON poll answered as JSONP (callback %r): another "
                             "request's callback" % (m.group(1) if m else text[:40]))
        else:
            if not m:
                raise Failed("format", "JSONP expected, got %r" % text[:120])
            if m.group(1) != req.callback:
                raise Failed("foreign", "JSONP callback %r, not its own %r"
                             % (m.group(1), req.callback))
            text = m.group(2)
        try:
            doc = json.loads(text)
        except ValueError:
            raise Failed("format", "not JSON: %r" % text[:120])
        out = {}
        several = len(req.ids) > 1
        try:
            if not several:
                ident = req.ids[0]
                if doc.get("id") != ident:
                    raise Failed("foreign", "answer for id %r, not %r" % (doc.get("id"), ident))
                items = [(ident, m["seq"], m["data"]) for m in doc["messages"]]
                lasts, epochs = {ident: doc["last"]}, {ident: doc.get("epoch")}
            else:
                items = [(m["id"], m["seq"], m["data"]) for m in doc["messages"]]
                lasts = doc["last"]
                epochs = doc.get("epoch")
                if not isinstance(lasts, dict) or set(lasts) != set(req.ids):
                    raise Failed("foreign", "last %r: not exactly its ids %s" % (lasts, req.ids))
                if not isinstance(epochs, dict):
                    self._format_note("several ids: epoch %r is not an {id: epoch} map" % (epochs,))
                    epochs = {i: epochs for i in req.ids}
                elif set(epochs) != set(req.ids):
                    raise Failed("foreign", "epoch %r: not exactly its ids %s" % (epochs, req.ids))
        except (KeyError, TypeError, AttributeError) as e:
            raise Failed("format", "missing or malformed field %s in %r" % (e, text[:200]))
        for ident in req.ids:
            e, last = epochs[ident], lasts[ident]
            if type(e) is not int or type(last) is not int or e < 0 or last < 0:
                raise Failed("format", "epoch %r / last %r of %s" % (e, last, ident))
            out[ident] = (e, last, [])
        for ident, seq, data in items:
            if ident not in out:
                raise Failed("foreign", "a message of id %r, not one of %s" % (ident, req.ids))
            p = self.ids[ident].by_data.get(data)
            if p is None or type(seq) is not int:
                raise Failed("foreign", "message %r (seq %r) was never published to %s"
                             % (data, seq, ident))
            out[ident][2].append((seq, p))
        return out

    def _format_note(self, message):
        """A format divergence seen on every answer: reported once."""
        if not any(v.category == "format" and v.message == message for v in self.violations):
            self.violations.append(Violation("format", None, message))

    def _cursor_effs(self, req, ident, life, epoch, a, st):
        """The effective sinces the server may have used: 0 when the epoch sent is not the
        id's or the since is above its last seq (which lies between what was stored before
        the request and what is stored now)."""
        s = req.since[ident]
        sent = req.epoch.get(ident)
        if sent is not None and sent != epoch:
            return [0], True
        last_lo = max([q for q, n in life.seqs.items()
                       if st.pubs[n].confirmed and st.pubs[n].t1 <= a], default=0)
        if s > life.last:
            return [0], True
        if s <= last_lo:
            return [s], False
        return [s, 0], None

    def _poll_one(self, req, st, t1, epoch, last, msgs, chaos, timed_out, empty):
        a, b = req.t0, t1
        ident = st.name
        s = req.since[ident]
        sent = req.epoch.get(ident)
        quiet = not msgs and last == s
        if epoch == 0:
            # The home did not answer in time and the client gave no epoch (or 0).
            if sent not in (None, 0) or not quiet or not (timed_out or chaos):
                self._violate("epoch", ident, "%s: epoch 0 (unknown) though %s" % (
                    req.path, "the client sent epoch %s" % sent if sent not in (None, 0) else
                    "it is not a timeout answer (%d messages, last %d, since %d)"
                    % (len(msgs), last, s)))
            return
        echo = quiet and sent == epoch and (timed_out or chaos)
        seqs = [q for q, _ in msgs]

        def fn(w, k, how):
            life = w.lives[k]
            if life.epoch is None:
                for j, other in enumerate(w.lives):
                    if j != k and other.epoch == epoch:
                        raise Failed("epoch", "epoch %d was the id's in an earlier life (seqs "
                                     "restarted without a new epoch)" % epoch
                                     if j < k else "epoch %d belongs to a later life" % epoch)
                life.epoch = epoch
            elif life.epoch != epoch:
                raise Failed("epoch", "answer shows epoch %d; the id's life is epoch %d (seq "
                             "up to %d)" % (epoch, life.epoch, life.last))
            effs, _ = self._cursor_effs(req, ident, life, epoch, a, st)
            failure = None
            for eff in effs:
                try:
                    self._check_poll_messages(st, w, k, req, eff, epoch, last, msgs, seqs, a, b,
                                              chaos, empty)
                    life.seen(a, b)
                    return w
                except Failed as f:
                    failure = failure or f
            raise failure

        before = st.worlds
        if not self._apply(st, a, b, True, fn) and echo:
            # A timeout answer that echoes the client's own epoch and since: the home did
            # not answer in time.  Not a sighting of the id.
            self.violations.pop()
            st.retired = False
            st.worlds = before
            self._log(ident, "    (taken as an echo of the client's own cursor)")

    def _check_poll_messages(self, st, w, k, req, eff, epoch, last, msgs, seqs, a, b, chaos, empty):
        life = w.lives[k]
        s = req.since[st.name]
        reset = eff != s or (req.epoch.get(st.name) is not None and req.epoch[st.name] != epoch)
        if any(x >= y for x, y in zip(seqs, seqs[1:])):
            raise Failed("order", "seqs %s not in increasing order" % seqs)
        for seq, p in msgs:
            if seq <= eff:
                raise Failed("dup", "seq %d at or below the effective since %d" % (seq, eff))
            self._check_placed(w, k, p, seq)
        have = set(seqs)
        timeout_answer = not msgs and last == s
        if not (chaos and timeout_answer):
            for q, n in sorted(life.seqs.items()):
                if q > eff and q not in have and self._surely_buffered(st, w, k, st.pubs[n], a, b):
                    raise Failed("skip", "seq %d (%r) was surely buffered after the effective "
                                 "since %d but is not in the answer (got %s)"
                                 % (q, st.pubs[n].data, eff, seqs or "none"))
        if msgs:
            if last != seqs[-1]:
                raise Failed("last", "last %d, but the newest seq delivered is %d" % (last, seqs[-1]))
        elif not reset:
            # An answer without messages reports the since asked with, or a later seq when what
            # lies between is no longer buffered (README): the skip check above has made sure
            # nothing surely buffered lies there.
            if last < s:
                raise Failed("last", "last %d below the since asked with (%d), the cursor not "
                             "reset" % (last, s))
        elif last > life.last:
            raise Failed("last", "last %d above the id's last seq %d" % (last, life.last))
        if last > life.last:
            raise Failed("last", "last %d above the id's last seq %d" % (last, life.last))
        if empty and not chaos:
            for q, n in sorted(life.seqs.items()):
                p = st.pubs[n]
                if (q > eff and p.confirmed and p.t0 >= a and p.t1 <= b
                        and p.t1 + self.cfg.wake_grace < a + req.timeout):
                    raise Failed("held", "held poll not woken: seq %d (%r) was published "
                                 "%.2f s into its %d s wait" % (q, p.data, p.t1 - a, req.timeout))

    def _check_placed(self, w, k, p, seq):
        where = w.where.get(p.n)
        if where is None:
            raise Failed("seq", "%r (%s) arrived though the model has it %s"
                         % (p.data, p.kind, "refused" if p.kind == "refused" else "not stored"))
        if where[0] != k:
            raise Failed("epoch", "%r arrived under epoch %s, but it was published in another "
                         "life of the id (epoch %s)" % (p.data, w.lives[k].epoch,
                                                        w.lives[where[0]].epoch))
        if where[1] != seq:
            raise Failed("seq", "%r arrived as seq %d but was published as seq %d"
                         % (p.data, seq, where[1]))

    # -- streams ----------------------------------------------------------------------

    def stream_established(self, req, t_head, refused):
        """The stream's head came at t_head (and, unless refused, it holds its ids from now)."""
        if not refused:
            req.established = t_head
            for s in req.subs.values():
                s.sure_from = t_head + self.cfg.reg_delay

    def stream_result(self, req, t_head, events, t_end, end):
        """A stream's whole life: events [(t, kind, payload)] as read, and how it ended:
        "client" (closed by the harness after reading), "server" (closed by the server:
        payload the WS close code, or None), or "error" (a socket error or timeout)."""
        self.events += 1
        req.label = req.transport
        what = "%s %s %s%s" % (req.client.name, req.transport.upper(), req.path,
                               " (%s)" % "; ".join(req.headers) if req.headers else "")
        chaos = self.in_chaos(req.t0, t_end)
        self._end_subs(req, t_end)
        for ident in req.ids:
            self._log(ident, "%s-%s %s -> %s; ended by %s" % (
                self._t(req.t0), self._t(t_end), what, summarize(events), end))
        try:
            parsed = self._parse_stream(req, events)
        except Failed as f:
            self._violate(f.category, req.ids[0], "%s: %s" % (what, f.message))
            return
        if parsed["refused"]:
            if any(parsed["msgs"][i] for i in req.ids):
                self._violate("stream", req.ids[0], "%s: refused after sending messages" % what)
            self._refused(req, t_end, parsed["refused"])
            return
        if end[0] == "server" and not chaos:
            self._violate("stream", req.ids[0], "%s: closed by the server (%s) outside any chaos"
                          % (what, end[1]))
            return
        if end[0] == "error" and not chaos:
            self._violate("stream", req.ids[0], "%s: %s outside any chaos" % (what, end[1]))
            return
        whole = end[0] == "client" and not chaos
        for ident in req.ids:
            st = self.ids[ident]
            if not st.retired:
                self._stream_one(req, st, t_head, t_end, parsed, whole, chaos)
        for ident in req.ids:
            if self.ids[ident].retired:
                continue
            epoch = parsed["epoch"].get(ident)
            seqs = [q for q, _, _ in parsed["msgs"][ident]]
            last = parsed["cursor"].get(ident)
            if seqs:
                last = seqs[-1] if last is None else last
            elif epoch is not None and req.client.epoch.get(ident) not in (None, epoch):
                last = 0 if last is None else last
            req.client.take(ident, epoch, last, seqs, what)

    def _parse_stream(self, req, events):
        several = len(req.ids) > 1
        out = {"epoch": {}, "msgs": {i: [] for i in req.ids}, "refused": None, "cursor": {},
               "cursors": []}
        for t, kind, payload in events:
            if kind == "error":
                out["refused"] = "SSE event: error"
            elif kind == "close" and payload == 1013:
                out["refused"] = "WS close 1013"
        if out["refused"]:
            for t, kind, payload in events:
                if kind in ("message", "frame"):
                    out["msgs"][req.ids[0]].append(payload)
            return out
        if req.transport == "ws":
            for t, kind, payload in events:
                if kind == "close":
                    if payload == 1013:
                        out["refused"] = "WS close 1013"
                    continue
                try:
                    doc = json.loads(payload)
                    ident, seq, data, epoch = doc["id"], doc["seq"], doc["data"], doc["epoch"]
                except (ValueError, KeyError, TypeError):
                    raise Failed("format", "WS frame %r" % payload[:200])
                self._stream_msg(out, req, ident, seq, data, epoch, t)
            return out
        saw_retry = False
        for t, kind, payload in events:
            if kind == "retry":
                saw_retry = True
            elif kind == "error":
                out["refused"] = "SSE event: error"
            elif kind == "epoch":
                if out["epoch"] and any(out["msgs"].values()):
                    raise Failed("stream", "a second epoch event after messages")
                try:
                    value = json.loads(payload)
                except ValueError:
                    raise Failed("format", "epoch event data %r" % payload)
                if several and not isinstance(value, dict):
                    self._format_note("SSE of several ids: epoch event %r is not an {id: epoch} "
                                      "map" % (value,))
                    value = {i: value for i in req.ids}
                if not several:
                    value = {req.ids[0]: value}
                if set(value) != set(req.ids) or not all(type(v) is int for v in value.values()):
                    raise Failed("foreign", "epoch event %r: not exactly its ids" % (payload,))
                out["epoch"] = value
            elif kind == "message":
                event_id, data = payload
                if not out["epoch"]:
                    raise Failed("stream", "a message before the epoch event")
                if not saw_retry:
                    raise Failed("stream", "no retry: hint before the first message")
                if several:
                    try:
                        doc = json.loads(data)
                        ident, seq, text = doc["id"], doc["seq"], doc["data"]
                    except (ValueError, KeyError, TypeError):
                        raise Failed("format", "SSE data %r" % data[:200])
                    cursor = {}
                    for pair in event_id.split(","):
                        name, _, value = pair.rpartition(":")
                        if not value.isdigit():
                            raise Failed("format", "SSE id: %r" % event_id)
                        cursor[name] = int(value)
                    if set(cursor) != set(req.ids):
                        raise Failed("foreign", "SSE id: %r names other ids than %s"
                                     % (event_id, req.ids))
                    if cursor.get(ident) != seq:
                        raise Failed("stream", "SSE id: %r, but the message is %s seq %s"
                                     % (event_id, ident, seq))
                    out["cursors"].append((t, cursor, ident, seq))
                    out["cursor"] = cursor
                else:
                    ident, text = req.ids[0], data
                    if not event_id.isdigit():
                        raise Failed("format", "SSE id: %r" % event_id)
                    seq = int(event_id)
                    out["cursor"] = {ident: seq}
                self._stream_msg(out, req, ident, seq, text, out["epoch"].get(ident), t)
        return out

    def _stream_msg(self, out, req, ident, seq, data, epoch, t):
        if ident not in out["msgs"]:
            raise Failed("foreign", "a message of id %r, not one of %s" % (ident, req.ids))
        p = self.ids[ident].by_data.get(data)
        if p is None or type(seq) is not int:
            raise Failed("foreign", "message %r (seq %r) was never published to %s"
                         % (data, seq, ident))
        if type(epoch) is not int or epoch <= 0:
            raise Failed("format", "message of %s with epoch %r" % (ident, epoch))
        known = out["epoch"].setdefault(ident, epoch)
        if known != epoch:
            raise Failed("epoch", "epoch %d then %d on one stream of %s" % (known, epoch, ident))
        out["msgs"][ident].append((seq, p, t))

    def _stream_one(self, req, st, t_head, t_end, parsed, whole, chaos):
        ident = st.name
        cfg = self.cfg
        a = req.t0
        epoch = parsed["epoch"].get(ident)
        msgs = parsed["msgs"][ident]
        seqs = [q for q, _, _ in msgs]
        est = req.established if req.established is not None else t_head
        # What was surely buffered when it subscribed (at most reg_delay after its head).
        b_backlog = est + cfg.reg_delay
        cursors = [(t, c) for t, c, i, q in parsed["cursors"]]

        def fn(w, k, how):
            life = w.lives[k]
            if epoch is not None:
                if life.epoch is None:
                    for j, other in enumerate(w.lives):
                        if j != k and other.epoch == epoch:
                            raise Failed("epoch", "epoch %d was the id's in another life "
                                         "(seqs restarted without a new epoch)" % epoch)
                    life.epoch = epoch
                elif life.epoch != epoch:
                    raise Failed("epoch", "stream shows epoch %d; the id's life is epoch %d "
                                 "(seq up to %d)" % (epoch, life.epoch, life.last))
            e = epoch if epoch is not None else life.epoch
            effs, _ = self._cursor_effs(req, ident, life, e if e is not None else
                                        req.epoch.get(ident), a, st)
            failure = None
            for eff in effs:
                try:
                    self._check_stream(st, w, k, req, eff, msgs, seqs, a, b_backlog, t_end,
                                       whole, chaos, cursors)
                    life.seen(a, max(a, min(t_end, b_backlog)))
                    return w
                except Failed as f:
                    failure = failure or f
            raise failure

        self._apply(st, a, max(a, min(t_end, b_backlog)), True, fn)

    def _check_stream(self, st, w, k, req, eff, msgs, seqs, a, b_backlog, t_end, whole, chaos,
                      cursors):
        life = w.lives[k]
        ident = st.name
        if any(x >= y for x, y in zip(seqs, seqs[1:])):
            raise Failed("dup" if len(set(seqs)) < len(seqs) else "order",
                         "seqs %s: not each once in increasing order" % seqs)
        for seq, p, _ in msgs:
            if seq <= eff:
                raise Failed("dup", "seq %d at or below the effective since %d" % (seq, eff))
            self._check_placed(w, k, p, seq)
        have = set(seqs)
        required = []
        for q, n in sorted(life.seqs.items()):
            p = st.pubs[n]
            if q <= eff or q in have:
                continue
            if self._surely_buffered(st, w, k, p, a, min(b_backlog, t_end)):
                required.append((q, p, "surely buffered when it subscribed"))
            elif (whole and p.confirmed and p.t0 >= a and p.t1 + self.cfg.stream_grace <= t_end):
                required.append((q, p, "published while it was open, %.2f s before it closed"
                                 % (t_end - p.t1)))
        if required and not chaos:
            q, p, why = required[0]
            raise Failed("skip", "seq %d (%r) never arrived: %s (got %s after effective since %d)"
                         % (q, p.data, why, seqs or "none", eff))
        # A several-ids SSE event's cursor must not pass what this stream has not sent yet.
        for t, cursor in cursors:
            v = cursor.get(ident)
            sent = [q for q, _, tq in msgs if tq <= t]
            base = max([eff] + sent)
            if v is None or v <= base:
                continue
            if v > life.last:
                raise Failed("last", "SSE cursor %s:%d above the id's last seq %d"
                             % (ident, v, life.last))
            for q, n in life.seqs.items():
                if base < q <= v and self._surely_buffered(st, w, k, st.pubs[n], a, t):
                    raise Failed("skip", "SSE cursor %s:%d passes seq %d, buffered and not sent"
                                 % (ident, v, q))


def summarize(events, limit=12):
    parts = []
    for t, kind, payload in events[:limit]:
        if kind == "message":
            parts.append("[%s] %s" % (payload[0], payload[1][:60]))
        elif kind in ("frame",):
            parts.append(payload[:80])
        else:
            parts.append("%s %s" % (kind, "" if payload is None else str(payload)[:60]))
    if len(events) > limit:
        parts.append("... %d more" % (len(events) - limit))
    return "; ".join(parts) or "nothing"
