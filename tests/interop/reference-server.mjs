// Reference server for validating the interop scripts: the real @hocuspocus/server (4.x)
// with the same "test extension" behaviours Hearth's `hearth-test-server` implements
// (see README.md), plus a minimal reference y-websocket server (same logic as
// y-websocket 1.x bin/utils.js / @y/websocket-server) on the path prefix /y/<room>.
//
// Env:
//   REF_PORT        port to listen on (default 0 = any free port)
//   REF_TIMEOUT_MS  Hocuspocus `timeout` option (pre-auth deadline AND idle timeout; default 2000)
//   REF_READY_FILE  if set, "127.0.0.1:PORT" is written there once listening
// Prints "LISTENING 127.0.0.1:PORT" on stdout once ready. Loopback only.

import { writeFileSync } from "node:fs";
import { Server } from "@hocuspocus/server";
import { WebSocketServer } from "ws";
import * as Y from "yjs";
import * as syncProtocol from "y-protocols/sync";
import * as awarenessProtocol from "y-protocols/awareness";
import * as encoding from "lib0/encoding";
import * as decoding from "lib0/decoding";

const PORT = Number(process.env.REF_PORT ?? 0);
const TIMEOUT_MS = Number(process.env.REF_TIMEOUT_MS ?? 2000);
const READY_FILE = process.env.REF_READY_FILE;
const SLOW_AUTH_MS = 500;

const log = (...a) => console.log(new Date().toISOString(), ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// Test behaviours (keep in sync with README.md "Test behaviours")
// ---------------------------------------------------------------------------

// HEARTH_AUTH_TOKENS="rw=read-write,ro=read-only,bad=deny,slow=read-write,*=deny"
const TOKENS = { rw: "read-write", ro: "read-only", bad: "deny", slow: "read-write" };

const store = new Map(); // documentName -> Uint8Array (persistence, like memory://)
const loadCounts = new Map(); // documentName -> number of onLoadDocument runs

const testExtension = {
  extensionName: "HearthTestExtension",

  async onAuthenticate({ token, connectionConfig, documentName }) {
    if (token === "slow") await sleep(SLOW_AUTH_MS);
    const scope = TOKENS[token] ?? "deny";
    log(`auth doc=${JSON.stringify(documentName)} token=${JSON.stringify(token)} -> ${scope}`);
    if (scope === "read-only") {
      connectionConfig.readOnly = true;
      return;
    }
    if (scope === "read-write") return;
    throw { reason: "permission-denied" };
  },

  async onLoadDocument({ documentName, document }) {
    loadCounts.set(documentName, (loadCounts.get(documentName) ?? 0) + 1);
    log(`load doc=${JSON.stringify(documentName)} (#${loadCounts.get(documentName)})`);
    if (documentName.startsWith("fail-load")) {
      throw { reason: "load-failed" };
    }
    const stored = store.get(documentName);
    if (stored) Y.applyUpdate(document, stored);
    return document;
  },

  async onStoreDocument({ documentName, document }) {
    log(`store doc=${JSON.stringify(documentName)}`);
    store.set(documentName, Y.encodeStateAsUpdate(document));
  },

  async afterUnloadDocument({ documentName }) {
    log(`unloaded doc=${JSON.stringify(documentName)}`);
  },

  async onStateless({ payload, connection, document, documentName }) {
    const instance = server.hocuspocus; // (onStateless payloads carry no `instance`)
    log(`stateless doc=${JSON.stringify(documentName)} payload=${JSON.stringify(payload)}`);
    try {
      if (payload.startsWith("echo:")) {
        connection.sendStateless(payload);
      } else if (payload.startsWith("bcast:")) {
        document.broadcastStateless(`all:${payload.slice("bcast:".length)}`);
      } else if (payload === "reset") {
        instance.closeConnections(documentName);
      } else if (payload.startsWith("direct:")) {
        const text = payload.slice("direct:".length);
        const direct = await instance.openDirectConnection(documentName, {});
        await direct.transact((doc) => {
          doc.getText("t").insert(0, text);
        });
        await direct.disconnect();
      } else if (payload === "loads") {
        connection.sendStateless(`loads:${loadCounts.get(documentName) ?? 0}`);
      }
    } catch (e) {
      console.error("onStateless test behaviour failed", e);
    }
  },
};

// ---------------------------------------------------------------------------
// Minimal reference y-websocket server (y-websocket 1.x bin/utils.js semantics)
// ---------------------------------------------------------------------------

const YWS_PREFIX = "/y/";
const ywsDocs = new Map(); // name -> { doc, awareness, conns: Map<ws, Set<clientID>> }

function ywsSend(conn, bytes) {
  if (conn.readyState !== 1) return;
  conn.send(bytes, { binary: true }, (err) => {
    if (err) conn.close();
  });
}

function ywsGetDoc(name) {
  let entry = ywsDocs.get(name);
  if (entry) return entry;
  const doc = new Y.Doc();
  doc.gc = true;
  const awareness = new awarenessProtocol.Awareness(doc);
  awareness.setLocalState(null);
  entry = { doc, awareness, conns: new Map() };
  awareness.on("update", ({ added, updated, removed }, origin) => {
    const changed = added.concat(updated, removed);
    if (origin !== null && entry.conns.has(origin)) {
      const ids = entry.conns.get(origin);
      added.forEach((id) => ids.add(id));
      removed.forEach((id) => ids.delete(id));
    }
    const enc = encoding.createEncoder();
    encoding.writeVarUint(enc, 1);
    encoding.writeVarUint8Array(enc, awarenessProtocol.encodeAwarenessUpdate(awareness, changed));
    const msg = encoding.toUint8Array(enc);
    entry.conns.forEach((_, c) => ywsSend(c, msg));
  });
  doc.on("update", (update) => {
    const enc = encoding.createEncoder();
    encoding.writeVarUint(enc, 0);
    syncProtocol.writeUpdate(enc, update);
    const msg = encoding.toUint8Array(enc);
    entry.conns.forEach((_, c) => ywsSend(c, msg));
  });
  ywsDocs.set(name, entry);
  return entry;
}

function ywsSetup(conn, name) {
  const entry = ywsGetDoc(name);
  entry.conns.set(conn, new Set());
  log(`yws connect doc=${JSON.stringify(name)}`);
  conn.on("message", (data) => {
    try {
      const bytes = new Uint8Array(data);
      const dec = decoding.createDecoder(bytes);
      const enc = encoding.createEncoder();
      const type = decoding.readVarUint(dec);
      if (type === 0) {
        encoding.writeVarUint(enc, 0);
        syncProtocol.readSyncMessage(dec, enc, entry.doc, conn);
        if (encoding.length(enc) > 1) ywsSend(conn, encoding.toUint8Array(enc));
      } else if (type === 1) {
        awarenessProtocol.applyAwarenessUpdate(entry.awareness, decoding.readVarUint8Array(dec), conn);
      }
    } catch (e) {
      console.error("yws message error", e);
    }
  });
  let pong = true;
  const ping = setInterval(() => {
    if (!pong) {
      conn.terminate();
      return;
    }
    pong = false;
    try {
      conn.ping();
    } catch {
      conn.terminate();
    }
  }, 30000);
  conn.on("pong", () => {
    pong = true;
  });
  conn.on("close", () => {
    clearInterval(ping);
    const ids = entry.conns.get(conn);
    entry.conns.delete(conn);
    if (ids) awarenessProtocol.removeAwarenessStates(entry.awareness, Array.from(ids), null);
    log(`yws close doc=${JSON.stringify(name)}`);
  });
  // server step1 immediately, then the awareness snapshot if any
  {
    const enc = encoding.createEncoder();
    encoding.writeVarUint(enc, 0);
    syncProtocol.writeSyncStep1(enc, entry.doc);
    ywsSend(conn, encoding.toUint8Array(enc));
  }
  const states = entry.awareness.getStates();
  if (states.size > 0) {
    const enc = encoding.createEncoder();
    encoding.writeVarUint(enc, 1);
    encoding.writeVarUint8Array(
      enc,
      awarenessProtocol.encodeAwarenessUpdate(entry.awareness, Array.from(states.keys())),
    );
    ywsSend(conn, encoding.toUint8Array(enc));
  }
}

// ---------------------------------------------------------------------------

const server = new Server({
  port: PORT,
  address: "127.0.0.1",
  quiet: true,
  stopOnSignals: true,
  timeout: TIMEOUT_MS,
  extensions: [testExtension],
});

// Route /y/<room> to the y-websocket server, everything else to Hocuspocus (any path).
const ywss = new WebSocketServer({ noServer: true });
const hocuspocusUpgrade = server.httpServer.listeners("upgrade");
server.httpServer.removeAllListeners("upgrade");
server.httpServer.on("upgrade", (request, socket, head) => {
  const url = request.url ?? "/";
  if (url.startsWith(YWS_PREFIX)) {
    const name = url.slice(YWS_PREFIX.length).split("?")[0];
    ywss.handleUpgrade(request, socket, head, (conn) => ywsSetup(conn, name));
    return;
  }
  for (const l of hocuspocusUpgrade) l.call(server.httpServer, request, socket, head);
});

await server.listen();
const addr = `127.0.0.1:${server.address.port}`;
if (READY_FILE) writeFileSync(READY_FILE, addr);
console.log(`LISTENING ${addr} (timeout ${TIMEOUT_MS} ms)`);
