/* MegaComet browser client: follow one or more ids and never miss a message.
 *
 *   const mc = new MegaComet("http://push.example.com:8000", ["alice", "room1"], {
 *     onmessage: (id, seq, data) => { ... },
 *     onstatus: (state, transport) => { ... },   // "open" | "retrying" | "closed"
 *     transport: "auto",                          // or "websocket", "eventsource", "poll"
 *     query: "exp=...&sig=...",                   // a signed subscription, if the server wants one
 *     since: {alice: 4, room1: 9},                // resume: cursors (a number: every id's) ...
 *     epoch: {alice: 1767225600000},              // ... and the epochs they count in (likewise)
 *   });
 *   mc.cursors;   // {id: last seq received}     keep both to resume after a reload:
 *   mc.epochs;    // {id: its epoch}, once known  new MegaComet(..., {since: mc.cursors, epoch: mc.epochs})
 *   mc.close();
 *
 * It tries WebSocket, then EventSource, then long-polling (fetch, or JSONP
 * script tags where fetch is missing), keeps the last seq of every id, and
 * resumes from it after every reconnect, so nothing is lost or delivered twice
 * while the server keeps the message (its --queue-ttl). It also keeps every id's
 * epoch and sends it back: an id the server forgot and created again, or every id
 * after a full restart, numbers from 1 in a new epoch, and the server then sends
 * everything it holds for that id, which is taken (its cursor starts over), not
 * dropped as old. While the server is down it retries with exponential backoff
 * and jitter (0.5 s to 30 s).
 * No dependencies; it never touches the page beyond the callbacks it is given.
 */
(function (root) {
  "use strict";

  var TRANSPORTS = ["websocket", "eventsource", "poll"];

  function MegaComet(base, ids, options) {
    if (typeof ids === "string") ids = [ids];
    this.base = String(base).replace(/\/+$/, "");
    this.ids = ids.slice();
    this.options = options || {};
    this.cursors = Object.create(null);                  // id -> last seq received
    this.epochs = Object.create(null);                   // id -> the epoch its cursor counts in
    for (var i = 0; i < ids.length; i++) {
      var since = perId(this.options.since, ids[i]), epoch = perId(this.options.epoch, ids[i]);
      this.cursors[ids[i]] = since >= 0 ? Math.min(Math.floor(since), 4294967295) : 0;
      if (epoch > 0 && epoch <= 9007199254740991 && Math.floor(epoch) === epoch) {
        this.epochs[ids[i]] = epoch;                     // 0, none or not a whole number: none
      }
    }
    this.order = this.options.transport && this.options.transport !== "auto"
      ? [this.options.transport] : TRANSPORTS.filter(available);
    this.which = 0;                                      // index in order of the transport in use
    this.failures = 0;                                   // in a row, for the backoff
    this.closed = false;
    this.transport = null;
    this._connect();
  }

  // An option given for every id (a number) or per id ({id: number}): id's, as a number (NaN
  // when it has none).
  function perId(value, id) {
    if (value !== null && typeof value === "object") value = hasOwn(value, id) ? value[id] : null;
    return value === null || value === undefined || value === "" ? NaN : Number(value);
  }

  function hasOwn(object, key) { return Object.prototype.hasOwnProperty.call(object, key); }

  function available(name) {
    if (name === "websocket") return typeof WebSocket !== "undefined";
    if (name === "eventsource") return typeof EventSource !== "undefined";
    return true;
  }

  MegaComet.prototype.close = function () {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.stop) this.stop();
    this._status("closed");
  };

  MegaComet.prototype._status = function (state) {
    if (this.options.onstatus) this.options.onstatus(state, this.transport);
  };

  // An id's epoch, from an answer, a frame or the stream's epoch event, before their messages.
  // Another epoch than the one its cursor counts in: the id was created again (forgotten, or
  // the server started again), numbers from 1, and (told our epoch) the server has sent
  // everything it holds for it, so its cursor starts over.  0 (the server did not learn it in
  // time) or no number (an older server) is no epoch: the one kept stays.
  MegaComet.prototype._epoch = function (id, epoch) {
    if (typeof epoch !== "number" || !(epoch > 0) || !hasOwn(this.cursors, id)) return;
    var kept = this.epochs[id];
    if (kept === epoch) return;
    if (kept !== undefined) this.cursors[id] = 0;
    this.epochs[id] = epoch;
  };

  // The epochs of an answer or an epoch event: a number (one id) or {id: epoch} (several).
  MegaComet.prototype._epochs = function (epochs) {
    if (typeof epochs === "number") {
      if (this.ids.length === 1) this._epoch(this.ids[0], epochs);
    } else if (epochs !== null && typeof epochs === "object") {
      for (var id in epochs) if (hasOwn(epochs, id)) this._epoch(id, epochs[id]);
    }
  };

  // Every message from every transport comes through here: the cursor drops repeats.
  MegaComet.prototype._deliver = function (id, seq, data) {
    if (!hasOwn(this.cursors, id)) return;
    if (seq <= this.cursors[id]) return;                 // had it already (a resumed backlog)
    this.cursors[id] = seq;
    this.failures = 0;
    if (this.options.onmessage) this.options.onmessage(id, seq, data);
  };

  MegaComet.prototype._since = function () {
    if (this.ids.length === 1) return String(this.cursors[this.ids[0]]);
    var self = this;
    return this.ids.map(function (id) { return id + ":" + self.cursors[id]; }).join(",");
  };

  // epoch=E for one id, or id:E pairs for the ids whose epoch is known (one left out has none).
  MegaComet.prototype._epochQuery = function () {
    var self = this;
    var known = this.ids.filter(function (id) { return hasOwn(self.epochs, id); });
    if (!known.length) return "";
    if (this.ids.length === 1) return String(this.epochs[known[0]]);
    return known.map(function (id) { return id + ":" + self.epochs[id]; }).join(",");
  };

  MegaComet.prototype._path = function (kind) {
    var query = "since=" + encodeURIComponent(this._since());
    var epochs = this._epochQuery();
    if (epochs) query += "&epoch=" + encodeURIComponent(epochs);
    if (this.options.query) query += "&" + this.options.query;
    return "/" + kind + "/" + this.ids.join(",") + "?" + query;
  };

  // A transport ended: try again, soon after a connection that worked, then backing off
  // (0.5 s doubling to 30 s, with jitter so that clients do not all return at once).  A
  // transport that never opened gives way to the next one in the order.
  MegaComet.prototype._retry = function (opened) {
    if (this.closed) return;
    this.stop = null;
    if (!opened && this.failures === 0 && this.which + 1 < this.order.length) {
      this.which += 1;
      this._connect();
      return;
    }
    this.failures += 1;
    var delay = this.failures === 1 ? 250
      : Math.min(30000, 500 * Math.pow(2, Math.min(this.failures - 2, 6)));
    delay = delay / 2 + Math.random() * delay / 2;
    this._status("retrying");
    var self = this;
    this.timer = setTimeout(function () { self._connect(); }, delay);
  };

  MegaComet.prototype._connect = function () {
    if (this.closed) return;
    this.transport = this.order[this.which];
    this["_" + this.transport]();
  };

  MegaComet.prototype._websocket = function () {
    var self = this, opened = false;
    var ws = new WebSocket(this.base.replace(/^http/, "ws") + this._path("ws"));
    ws.onopen = function () { opened = true; self.failures = 0; self._status("open"); };
    ws.onmessage = function (event) {
      var m = JSON.parse(event.data);
      self._epoch(m.id, m.epoch);                        // the epoch of this frame's id
      self._deliver(m.id, m.seq, m.data);
    };
    ws.onclose = function () { if (self.stop) self._retry(opened); };
    this.stop = function () { self.stop = null; ws.close(); };
  };

  MegaComet.prototype._eventsource = function () {
    var self = this, opened = false;
    // Every reconnect is our own, never EventSource's (onerror closes it first): its own would
    // send Last-Event-ID on the URL it was opened with, whose epochs it cannot update.  Ours
    // carries every id's cursor and the epochs kept now.  So the server, when an id's epoch is
    // not the one we sent, has reset that cursor and sends that id's buffer from seq 1 after
    // the epoch event, on this stream: the event resets our cursor too, nothing to reopen.
    var es = new EventSource(this.base + this._path("sse"));
    es.onopen = function () { opened = true; self.failures = 0; self._status("open"); };
    es.addEventListener("epoch", function (event) {  // data: E (one id) or {"a": E, ...}
      var epochs;
      try { epochs = JSON.parse(event.data); } catch (e) { return; }
      self._epochs(epochs);
    });
    es.onmessage = function (event) {
      if (self.ids.length === 1) {
        self._deliver(self.ids[0], parseInt(event.lastEventId, 10), event.data);
      } else {
        var m = JSON.parse(event.data);
        self._deliver(m.id, m.seq, m.data);
      }
    };
    es.onerror = function () {
      es.close();
      if (self.stop) self._retry(opened);
    };
    this.stop = function () { self.stop = null; es.close(); };
  };

  MegaComet.prototype._poll = function () {
    var self = this, live = true;
    // close() ends the poll held on the server too (else it would keep the ids followed, and
    // one of the browser's few connections to the host busy, until the poll's timeout).
    var abort = typeof AbortController !== "undefined" ? new AbortController() : null;
    this.stop = function () { live = false; self.stop = null; if (abort) abort.abort(); };
    var done = function (doc) {
      if (!live) return;
      self._epochs(doc.epoch);                           // E, or {id: E} for several ids
      if (self.ids.length === 1) {
        for (var i = 0; i < doc.messages.length; i++) {
          self._deliver(self.ids[0], doc.messages[i].seq, doc.messages[i].data);
        }
      } else {
        for (var j = 0; j < doc.messages.length; j++) {
          self._deliver(doc.messages[j].id, doc.messages[j].seq, doc.messages[j].data);
        }
      }
      self.failures = 0;
      self.polled = true;                                // poll works here: never fall back
      self._status("open");
      self._poll();                                      // at once: the next long-poll
    };
    var failed = function () { if (live) self._retry(self.failures > 0 || self.polled); };
    var url = this.base + this._path("sub");
    if (typeof fetch !== "undefined") {
      var init = { cache: "no-store" };
      if (abort) init.signal = abort.signal;
      fetch(url, init).then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      }).then(done, failed);
    } else {
      jsonp(url, done, failed);
    }
  };

  // Long-polling where fetch is missing: a script tag per poll, answered as callback(...).
  var jsonpCount = 0;
  function jsonp(url, done, failed) {
    var name = "__megacomet" + (++jsonpCount);
    var script = document.createElement("script");
    var finish = function () {
      delete root[name];
      if (script.parentNode) script.parentNode.removeChild(script);
    };
    root[name] = function (doc) { finish(); done(doc); };
    script.onerror = function () { finish(); failed(); };
    script.src = url + "&callback=" + name;
    document.head.appendChild(script);
  }

  MegaComet.TRANSPORTS = TRANSPORTS;
  if (typeof module !== "undefined" && module.exports) module.exports = MegaComet;
  else root.MegaComet = MegaComet;
})(typeof window !== "undefined" ? window : globalThis);
