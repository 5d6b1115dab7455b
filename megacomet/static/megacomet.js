/* MegaComet browser client: follow one or more ids and never miss a message.
 *
 *   const mc = new MegaComet("http://push.example.com:8000", ["alice", "room1"], {
 *     onmessage: (id, seq, data) => { ... },
 *     onstatus: (state, transport) => { ... },   // "open" | "retrying" | "closed"
 *     transport: "auto",                          // or "websocket", "eventsource", "poll"
 *     query: "exp=...&sig=...",                   // a signed subscription, if the server wants one
 *     since: 0, epoch: null,                      // resume: a cursor and the epoch it counts in
 *   });
 *   mc.close();
 *
 * It tries WebSocket, then EventSource, then long-polling (fetch, or JSONP
 * script tags where fetch is missing), keeps the last seq of every id, and
 * resumes from it after every reconnect, so nothing is lost or delivered twice
 * while the server keeps the message (its --queue-ttl). It also keeps the server's
 * epoch and sends it back: a server started again numbers from 1, and then sends
 * everything it holds, which is taken, not dropped as old. While the server is
 * down it retries with exponential backoff and jitter (0.5 s to 30 s).
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
    this.cursors = {};                                   // id -> last seq received
    for (var i = 0; i < ids.length; i++) this.cursors[ids[i]] = this.options.since || 0;
    this.epoch = this.options.epoch ? Number(this.options.epoch) : null;   // the run they count in
    this.order = this.options.transport && this.options.transport !== "auto"
      ? [this.options.transport] : TRANSPORTS.filter(available);
    this.which = 0;                                      // index in order of the transport in use
    this.failures = 0;                                   // in a row, for the backoff
    this.closed = false;
    this.transport = null;
    this._connect();
  }

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

  // The server's epoch, from an answer, a frame or the stream's epoch event, before their
  // messages.  Another run than the one the cursors count in: it was started again, numbers
  // from 1, and (told our epoch) has sent everything it holds, so every cursor starts over.
  MegaComet.prototype._epoch = function (epoch) {
    if (typeof epoch !== "number" || epoch === this.epoch) return;     // an older server: none
    if (this.epoch !== null) for (var id in this.cursors) this.cursors[id] = 0;
    this.epoch = epoch;
  };

  // Every message from every transport comes through here: the cursor drops repeats.
  MegaComet.prototype._deliver = function (id, seq, data) {
    if (!(id in this.cursors)) return;
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

  MegaComet.prototype._path = function (kind) {
    var query = "since=" + encodeURIComponent(this._since());
    if (this.epoch !== null) query += "&epoch=" + this.epoch;
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
      self._epoch(m.epoch);
      self._deliver(m.id, m.seq, m.data);
    };
    ws.onclose = function () { if (self.stop) self._retry(opened); };
    this.stop = function () { self.stop = null; ws.close(); };
  };

  MegaComet.prototype._eventsource = function () {
    var self = this, opened = false;
    // A reconnect of our own (not EventSource's) so that since carries every id's cursor, and
    // the epoch (which an EventSource's own reconnect, with Last-Event-ID, would not update).
    var es = new EventSource(this.base + this._path("sse"));
    es.onopen = function () { opened = true; self.failures = 0; self._status("open"); };
    es.addEventListener("epoch", function (event) { self._epoch(parseInt(event.data, 10)); });
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
    this.stop = function () { live = false; self.stop = null; };
    var done = function (doc) {
      if (!live) return;
      self._epoch(doc.epoch);
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
      fetch(url, { cache: "no-store" }).then(function (response) {
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
