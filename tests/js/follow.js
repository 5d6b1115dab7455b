// Follow ids with the browser client under Node (fetch, so the long-poll transport),
// print each message as a JSON line, exit once `expect` messages came or after `seconds`.
const MegaComet = require(process.argv[2]);
const [base, ids, expect, seconds] = [process.argv[3], process.argv[4].split(","),
                                      parseInt(process.argv[5], 10), parseFloat(process.argv[6])];
let got = 0;
const client = new MegaComet(base, ids, {
  transport: "auto",
  onmessage: (id, seq, data) => {
    console.log(JSON.stringify({id, seq, data, via: client.transport}));
    if (++got >= expect) { client.close(); process.exit(0); }
  },
  onstatus: (state, via) => console.error(state + " " + via),
});
setTimeout(() => { client.close(); process.exit(1); }, seconds * 1000);
