// One node of a Hocuspocus 4.7 cluster with @hocuspocus/extension-redis, the way Hocuspocus
// scales out; used to measure the same failover Hearth's cluster tests measure (driven by
// cluster-tests/tests/cluster_failover.rs, not part of scripts.json).
//
// Env:
//   REF_PORT    port to listen on (default 0 = any free port)
//   REDIS_PORT  the Redis every node shares (127.0.0.1)
// Every token is accepted; there is no database (each node keeps the documents its clients
// use in memory and exchanges updates with the other nodes through Redis).
// Prints "LISTENING 127.0.0.1:PORT" on stdout once ready. Loopback only.

import { Server } from "@hocuspocus/server";
import { Redis } from "@hocuspocus/extension-redis";

const PORT = Number(process.env.REF_PORT ?? 0);
const REDIS_PORT = Number(process.env.REDIS_PORT ?? 6379);

const server = new Server({
  port: PORT,
  address: "127.0.0.1",
  quiet: true,
  stopOnSignals: true,
  extensions: [new Redis({ host: "127.0.0.1", port: REDIS_PORT })],
});

await server.listen();
console.log(`LISTENING 127.0.0.1:${server.address.port}`);
