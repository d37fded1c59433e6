// Failover as real v4 providers see it (driven by cluster-tests/tests/cluster_failover.rs, not
// part of scripts.json: it needs a cluster and a driver that kills a node).
//
// Env: HEARTH_NODE_URLS = "ws://n1,ws://n2,ws://n3" (n1 is the node that will be killed).
// Provider O on n1 makes n1 the owner; A on n2 and B on n3 edit through n1. After the kill O's
// reconnects go to n3 (as a balancer would send them) and the time until its edit reaches A is
// measured too. The script prints
// READY, waits for a line `KILLED <epoch ms of the kill>` on stdin (the driver SIGKILLs n1 first),
// then measures from the kill how long
// an edit made on n3 takes to reach n2 and back, counts the socket closes A and B saw, waits
// until every edit is acknowledged, and prints `RESULT {json}`.
import * as readline from "node:readline";
import { scenario, step, docName, v4Provider, v4Socket, waitSynced, waitText, waitFor, providerState } from "./lib.mjs";

const urls = (process.env.HEARTH_NODE_URLS ?? "").split(",").filter(Boolean);
// the providers' sockets name their node explicitly; this only satisfies the shared helpers
process.env.HEARTH_URL ??= urls[0];

function providerOn(url, name) {
  return v4Provider({ socket: v4Socket({ url }), name });
}

function closesSince(p, t0) {
  return p.socket.events.filter((e) => e.name === "socket.close" && e.t >= t0).length;
}

scenario(
  "failover",
  async () => {
    if (urls.length !== 3) throw new Error("HEARTH_NODE_URLS must name three nodes");
    const name = docName("failover");
    const o = providerOn(urls[0], name);
    await waitSynced(o, 10000, "O on n1");
    const a = providerOn(urls[1], name);
    const b = providerOn(urls[2], name);
    await waitSynced(a, 10000, "A on n2");
    await waitSynced(b, 10000, "B on n3");
    a.text.insert(0, "a0 ");
    await waitText([o, a, b], "a0 ", 10000, "A's edit reaches O and B");
    await waitFor(() => !a.hasUnsyncedChanges, 10000, "A's edit acknowledged", () => providerState(a));

    const lines = readline.createInterface({ input: process.stdin });
    // "KILLED <ms since the epoch when the driver sent the signal>": times count from the kill
    const killed = new Promise((resolve) =>
      lines.on("line", (l) => {
        const [word, at] = l.trim().split(/\s+/);
        if (word === "KILLED") resolve(Number(at) || Date.now());
      }),
    );
    console.log("READY");
    const t0 = await killed;
    // O's node is gone: like a balancer that skips a dead backend, its reconnects go to n3
    o.socket.configuration.url = urls[2];
    step("n1 killed");

    o.text.insert(o.text.length, "o1 ");
    const oBack = waitFor(() => a.text.toString().includes("o1"), 20000, "O's edit reaches A after the kill", () => `${providerState(o)} ${providerState(a)}`).then(() => Date.now() - t0);
    b.text.insert(b.text.length, "b1 ");
    await waitFor(() => a.text.toString().includes("b1"), 20000, "B's edit reaches A after the kill", () => `${providerState(a)} ${providerState(b)}`);
    const survivorMs = Date.now() - t0;
    const t1 = Date.now();
    a.text.insert(a.text.length, "a1 ");
    await waitFor(() => b.text.toString().includes("a1"), 20000, "A's edit reaches B", () => `${providerState(a)} ${providerState(b)}`);
    const reverseMs = Date.now() - t1;
    await waitFor(
      () => !a.hasUnsyncedChanges && !b.hasUnsyncedChanges && a.synced && b.synced,
      20000,
      "every edit acknowledged by the new owner",
      () => `${providerState(a)} ${providerState(b)}`,
    );
    const ackedMs = Date.now() - t0;
    const killedMs = await oBack;
    await waitFor(() => !o.hasUnsyncedChanges && o.synced, 20000, "O's edit acknowledged", () => providerState(o));
    await waitFor(
      () => o.text.toString() === a.text.toString() && a.text.toString() === b.text.toString(),
      20000,
      "everyone converges",
      () => [o, a, b].map((p) => JSON.stringify(p.text.toString())).join(" | "),
    );
    const text = a.text.toString();
    for (const m of ["a0", "o1", "b1", "a1"]) {
      if (!text.includes(m) || !b.text.toString().includes(m)) throw new Error(`${m} missing: ${providerState(a)} ${providerState(b)}`);
    }
    const result = {
      survivor_ms: survivorMs,
      reverse_ms: reverseMs,
      acked_ms: ackedMs,
      killed_ms: killedMs,
      a_closes: closesSince(a, t0),
      b_closes: closesSince(b, t0),
    };
    console.log(`RESULT ${JSON.stringify(result)}`);
    lines.close();
    o.destroy();
    a.destroy();
    b.destroy();
  },
  { timeoutMs: 60000 },
);
