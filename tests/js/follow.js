// Follow ids with the browser client under Node (fetch, so the long-poll transport),
// print each message as a JSON line, exit once `expect` messages came or after `seconds`.
//
//   node follow.js <megacomet.js> <base> <id,id> <expect> <seconds> [<options JSON>]
//
// options: the client's own (since, epoch: to resume), and "linger": ms to keep following
// after the expect-th message (a repeat then shows), after which the last line printed is
// {"cursors": {...}, "epochs": {...}}, the client's state (what a page keeps to resume).
// Lines on stdin: "offline" makes every fetch fail at once (as a browser offline does), until
// "online".
const MegaComet = require(process.argv[2]);
const [base, ids, expect, seconds] = [process.argv[3], process.argv[4].split(","),
                                      parseInt(process.argv[5], 10), parseFloat(process.argv[6])];
const options = process.argv[7] ? JSON.parse(process.argv[7]) : {};
const linger = options.linger || 0;
delete options.linger;

let offline = false;
const realFetch = globalThis.fetch;
globalThis.fetch = (...args) => offline ? Promise.reject(new TypeError("offline")) : realFetch(...args);
let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
  let end;
  while ((end = input.indexOf("\n")) >= 0) {
    const command = input.slice(0, end).trim();
    input = input.slice(end + 1);
    if (command === "offline") offline = true;
    if (command === "online") offline = false;
    console.error(command);
  }
});
process.stdin.on("end", () => {});

let got = 0;
function finish(code) {
  client.close();
  console.log(JSON.stringify({ cursors: client.cursors, epochs: client.epochs }));
  process.exit(code);
}
const client = new MegaComet(base, ids, Object.assign({
  transport: "auto",
  onmessage: (id, seq, data) => {
    console.log(JSON.stringify({id, seq, data, via: client.transport}));
    if (++got === expect) setTimeout(() => finish(0), linger);
  },
  onstatus: (state, via) => console.error(state + " " + via),
}, options));
setTimeout(() => finish(1), seconds * 1000);
