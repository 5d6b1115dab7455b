// The client's per-id epochs, without a server: fake WebSocket, EventSource and fetch record
// every URL the client opens and hand it what a test scripts, so each transport's handling of
// epochs (kept per id, sent back, a changed one resetting that id's cursor before the messages
// of its answer, 0 never kept) is checked exactly.  Run: node epochs.js <megacomet.js>; it
// prints "ok <n>" and exits 0, or throws.
"use strict";
const assert = require("assert");
const MegaComet = require(process.argv[2]);

let opened = [];                                     // every fake connection, in order

class FakeWebSocket {
  constructor(url) { this.url = url; this.closed = false; opened.push(this); }
  open() { this.onopen && this.onopen(); }
  frame(obj) { this.onmessage({ data: JSON.stringify(obj) }); }
  close() { if (!this.closed) { this.closed = true; this.onclose && this.onclose(); } }
  drop() { this.close(); }                           // the server went away
}

class FakeEventSource {
  constructor(url) { this.url = url; this.closed = false; this.listeners = {}; opened.push(this); }
  addEventListener(name, fn) { this.listeners[name] = fn; }
  open() { this.onopen && this.onopen(); }
  epoch(data) { this.listeners.epoch({ data: data }); }
  message(lastEventId, data) { this.onmessage({ lastEventId: String(lastEventId), data: data }); }
  close() { this.closed = true; }
  drop() { this.onerror && this.onerror(); }
}

let polls = [];                                      // pending fake fetches: {url, answer(doc)}
function fakeFetch(url, init) {
  return new Promise((resolve, reject) => {
    polls.push({
      url: url,
      signal: init && init.signal,
      answer: (doc) => resolve({ ok: true, status: 200, json: () => Promise.resolve(doc) }),
      fail: () => reject(new TypeError("fetch failed")),
    });
  });
}

globalThis.WebSocket = FakeWebSocket;
globalThis.EventSource = FakeEventSource;
globalThis.fetch = fakeFetch;

const flush = () => new Promise((resolve) => setImmediate(resolve));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function query(url) {
  const q = new URL(url, "http://x").searchParams;
  return { since: q.get("since"), epoch: q.get("epoch"), path: new URL(url, "http://x").pathname };
}

function client(ids, options) {
  const got = [];
  const mc = new MegaComet("http://h:1/", ids, Object.assign({
    onmessage: (id, seq, data) => got.push([id, seq, data]),
  }, options || {}));
  mc.got = got;
  return mc;
}

// A reconnect after a drop waits the backoff (its first: 125 to 250 ms): wait for it.
async function nextOpened(count) {
  for (let i = 0; i < 100 && opened.length < count; i++) await sleep(10);
  assert.strictEqual(opened.length, count, "the client's reconnect");
  return opened[count - 1];
}

const tests = [];
function test(name, fn) { tests.push([name, fn]); }

test("options: since and epoch as numbers apply to every id; no epoch, none sent", async () => {
  let mc = client(["a", "b"], { transport: "websocket", since: 4, epoch: 77 });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 4, b: 4 });
  assert.deepStrictEqual({ ...mc.epochs }, { a: 77, b: 77 });
  assert.deepStrictEqual(query(opened.at(-1).url),
                         { since: "a:4,b:4", epoch: "a:77,b:77", path: "/ws/a,b" });
  mc.close();
  mc = client(["a"], { transport: "websocket", since: 3, epoch: 77 });
  assert.deepStrictEqual(query(opened.at(-1).url), { since: "3", epoch: "77", path: "/ws/a" });
  mc.close();
  mc = client(["a"], { transport: "websocket" });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 0 });
  assert.deepStrictEqual({ ...mc.epochs }, {});
  assert.deepStrictEqual(query(opened.at(-1).url), { since: "0", epoch: null, path: "/ws/a" });
  mc.close();
});

test("options: per id objects; an id left out, or given epoch 0 or not a whole number, has none", async () => {
  const mc = client(["a", "b", "c"], {
    transport: "eventsource", since: { a: "5", b: 2 }, epoch: { a: "11", b: 0, c: 1.5, x: 9 } });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 5, b: 2, c: 0 });
  assert.deepStrictEqual({ ...mc.epochs }, { a: 11 });
  assert.deepStrictEqual(query(opened.at(-1).url),
                         { since: "a:5,b:2,c:0", epoch: "a:11", path: "/sse/a,b,c" });
  mc.close();
});

test("websocket: each frame's epoch is its id's; a changed one resets that id alone", async () => {
  const mc = client(["a", "b"], { transport: "websocket", since: { a: 3, b: 2 }, epoch: { a: 10, b: 20 } });
  const ws = opened.at(-1);
  ws.open();
  // a's epoch changed (the server reset its cursor and sends a's buffer from seq 1); b's not.
  ws.frame({ id: "a", seq: 1, data: "a1", epoch: 11 });
  ws.frame({ id: "b", seq: 2, data: "old b2", epoch: 20 });    // had it: dropped
  ws.frame({ id: "b", seq: 3, data: "b3", epoch: 20 });
  ws.frame({ id: "a", seq: 2, data: "a2", epoch: 11 });
  ws.frame({ id: "a", seq: 2, data: "a2 again", epoch: 11 });  // a repeat: dropped
  assert.deepStrictEqual(mc.got, [["a", 1, "a1"], ["b", 3, "b3"], ["a", 2, "a2"]]);
  assert.deepStrictEqual({ ...mc.epochs }, { a: 11, b: 20 });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 2, b: 3 });
  // An id with no epoch kept takes the first one it is told, and its cursor stands.
  ws.frame({ id: "zz", seq: 1, data: "not ours", epoch: 5 });   // not followed: ignored
  assert.deepStrictEqual({ ...mc.epochs }, { a: 11, b: 20 });
  ws.drop();
  const again = await nextOpened(opened.length + 1);
  assert.deepStrictEqual(query(again.url), { since: "a:2,b:3", epoch: "a:11,b:20", path: "/ws/a,b" });
  mc.close();
});

test("websocket: no epoch kept: the first one is taken, the cursor stands", async () => {
  const mc = client(["a"], { transport: "websocket", since: 2 });
  const ws = opened.at(-1);
  ws.open();
  ws.frame({ id: "a", seq: 3, data: "a3", epoch: 40 });
  assert.deepStrictEqual(mc.got, [["a", 3, "a3"]]);
  assert.deepStrictEqual({ ...mc.epochs }, { a: 40 });
  mc.close();
});

test("eventsource, one id: the epoch event's number; a new one resets before the messages", async () => {
  const mc = client(["a"], { transport: "eventsource" });
  let es = opened.at(-1);
  es.open();
  es.epoch("100");
  es.message(1, "a1");
  es.message(2, "a2");
  assert.deepStrictEqual({ ...mc.epochs }, { a: 100 });
  es.epoch("0");                                     // not known: nothing changes
  assert.deepStrictEqual({ ...mc.epochs }, { a: 100 });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 2 });
  es.drop();
  assert.ok(es.closed, "closed on error: EventSource must not reconnect by itself");
  es = await nextOpened(opened.length + 1);
  assert.deepStrictEqual(query(es.url), { since: "2", epoch: "100", path: "/sse/a" });
  es.open();
  es.epoch("101");                                   // a new epoch: everything from seq 1
  es.message(1, "new1");
  es.message(2, "new2");
  es.message(3, "new3");
  assert.deepStrictEqual(mc.got, [["a", 1, "a1"], ["a", 2, "a2"],
                                  ["a", 1, "new1"], ["a", 2, "new2"], ["a", 3, "new3"]]);
  assert.deepStrictEqual({ ...mc.epochs }, { a: 101 });
  mc.close();
});

test("eventsource, several ids: the epoch event's JSON; only a changed id is reset", async () => {
  const mc = client(["a", "b"], { transport: "eventsource", since: { a: 3, b: 4 }, epoch: { a: 10, b: 20 } });
  const es = opened.at(-1);
  es.open();
  es.epoch('{"a": 10, "b": 21}');
  assert.deepStrictEqual({ ...mc.cursors }, { a: 3, b: 0 });
  es.message("a:4,b:0", '{"id": "a", "seq": 4, "data": "a4"}');
  es.message("a:4,b:1", '{"id": "b", "seq": 1, "data": "b1"}');
  es.message("a:4,b:2", '{"id": "b", "seq": 2, "data": "b2"}');
  assert.deepStrictEqual(mc.got, [["a", 4, "a4"], ["b", 1, "b1"], ["b", 2, "b2"]]);
  assert.deepStrictEqual({ ...mc.epochs }, { a: 10, b: 21 });
  // Epoch 0 for an id (not known) keeps the one kept; an id not followed is ignored.
  es.epoch('{"a": 0, "b": 21, "zz": 3}');
  assert.deepStrictEqual({ ...mc.epochs }, { a: 10, b: 21 });
  assert.deepStrictEqual({ ...mc.cursors }, { a: 4, b: 2 });
  es.epoch("not json");                              // ignored, not thrown
  mc.close();
});

test("poll, one id: the answer's epoch; a changed one resets before its messages", async () => {
  const mc = client(["a"], { transport: "poll", since: 5, epoch: 10 });
  await flush();
  let poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "5", epoch: "10", path: "/sub/a" });
  poll.answer({ id: "a", messages: [{ seq: 1, data: "n1" }, { seq: 2, data: "n2" }], last: 2, epoch: 12 });
  await flush(); await flush();
  assert.deepStrictEqual(mc.got, [["a", 1, "n1"], ["a", 2, "n2"]]);
  poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "2", epoch: "12", path: "/sub/a" });
  poll.answer({ id: "a", messages: [], last: 2, epoch: 0 });   // not known: the kept one stays
  await flush(); await flush();
  poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "2", epoch: "12", path: "/sub/a" });
  mc.close();
  assert.ok(poll.signal && poll.signal.aborted, "close() aborts the poll held on the server");
  poll.answer({ id: "a", messages: [{ seq: 3, data: "late" }], last: 3, epoch: 12 });
  await flush(); await flush();
  assert.strictEqual(mc.got.length, 2, "nothing after close");
});

test("poll, several ids: {id: epoch}; each id on its own", async () => {
  const mc = client(["a", "b"], { transport: "poll", since: { a: 3, b: 4 }, epoch: { b: 20 } });
  await flush();
  let poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "a:3,b:4", epoch: "b:20", path: "/sub/a,b" });
  poll.answer({ messages: [{ id: "b", seq: 1, data: "b1" }, { id: "a", seq: 4, data: "a4" }],
                last: { a: 4, b: 1 }, epoch: { a: 10, b: 21 } });
  await flush(); await flush();
  assert.deepStrictEqual(mc.got, [["b", 1, "b1"], ["a", 4, "a4"]]);
  assert.deepStrictEqual({ ...mc.epochs }, { a: 10, b: 21 });
  poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "a:4,b:1", epoch: "a:10,b:21", path: "/sub/a,b" });
  poll.answer({ messages: [], last: { a: 4, b: 1 }, epoch: { a: 0, b: 0 } });
  await flush(); await flush();
  poll = polls.shift();
  assert.deepStrictEqual(query(poll.url), { since: "a:4,b:1", epoch: "a:10,b:21", path: "/sub/a,b" });
  // An answer with a's epoch changed: a starts over from 1, b goes on.
  poll.answer({ messages: [{ id: "a", seq: 1, data: "A1" }, { id: "b", seq: 2, data: "b2" }],
                last: { a: 1, b: 2 }, epoch: { a: 11, b: 21 } });
  await flush(); await flush();
  assert.deepStrictEqual(mc.got.slice(2), [["a", 1, "A1"], ["b", 2, "b2"]]);
  assert.deepStrictEqual({ ...mc.cursors }, { a: 1, b: 2 });
  mc.close();
});

test("resuming from mc.cursors and mc.epochs (a page's reload) sends them back", async () => {
  const first = client(["a", "b"], { transport: "websocket" });
  const ws = opened.at(-1);
  ws.open();
  ws.frame({ id: "a", seq: 1, data: "a1", epoch: 7 });
  ws.frame({ id: "b", seq: 1, data: "b1", epoch: 8 });
  first.close();
  const saved = JSON.parse(JSON.stringify({ since: first.cursors, epoch: first.epochs }));
  const second = client(["a", "b"], Object.assign({ transport: "websocket" }, saved));
  assert.deepStrictEqual(query(opened.at(-1).url), { since: "a:1,b:1", epoch: "a:7,b:8", path: "/ws/a,b" });
  second.close();
});

(async () => {
  for (const [name, fn] of tests) {
    opened = []; polls = [];
    try {
      await fn();
    } catch (e) {
      console.error("FAILED: " + name);
      throw e;
    }
  }
  console.log("ok " + tests.length);
  process.exit(0);
})().catch((e) => { console.error(e); process.exit(1); });
