// Writes and reads documents the way a Hocuspocus deployment does, for the import and export
// tests (cluster-tests/tests/hocuspocus_import.rs).
//
// MODE=write  Starts the real @hocuspocus/server with its storage (SQLITE=FILE:
//             @hocuspocus/extension-sqlite; or PG_URL + TABLE: @hocuspocus/extension-database
//             on a `documents(name, data)`-style table), edits every document of NAMES through
//             real providers, waits until Hocuspocus has stored and unloaded them all, and
//             prints {name: content} as JSON on the last line of stdout.
// MODE=serve-read  The same server over the same storage, then reads NAMES back through
//             providers and prints {name: content}.
// MODE=read   Reads NAMES from the server at URL (Hearth) and prints {name: content}.
// MODE=files  Writes NAMES into OUT_DIR as Yjs v1 update files (no server): even-numbered
//             documents as `<encoded>.bin`, odd ones as `<encoded>.ystate`, plus one more
//             document as a v2 update (`v2-document.bin`, not in the output), and prints
//             {name: content}.
//
// NAMES is a JSON array of document names. Bounded by SCRIPT_TIMEOUT_MS (default 60000).

import { writeFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import WebSocket from "ws";
import * as Y from "yjs";
import { HocuspocusProvider, HocuspocusProviderWebsocket } from "@hocuspocus/provider";

const MODE = process.env.MODE;
const NAMES = JSON.parse(process.env.NAMES ?? "[]");
const TIMEOUT = Number(process.env.SCRIPT_TIMEOUT_MS ?? 60000);
setTimeout(() => {
  console.error(`hocuspocus.mjs: no result within ${TIMEOUT} ms`);
  process.exit(2);
}, TIMEOUT).unref();

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, cond, ms = 20000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** What a document holds, in a form two servers' copies can be compared by. */
function content(doc) {
  return {
    text: doc.getText("text").toString(),
    map: doc.getMap("map").toJSON(),
    xml: doc.getXmlFragment("default").toString(),
    list: doc.getArray("list").toJSON(),
  };
}

/** Edits `doc` the way editors do: inserts and deletions in text, map, XML and array. */
function edit(doc, name, i) {
  doc.transact(() => {
    const text = doc.getText("text");
    text.insert(0, `hello ${name} `.repeat(3 + i));
    text.delete(2, 3);
    if (name.startsWith("big")) text.insert(text.length, "x".repeat(200_000));
    const map = doc.getMap("map");
    map.set("index", i);
    map.set("name", name);
    map.set("nested", { a: [1, 2, { b: "c" }], ok: true });
    map.set("gone", "soon");
  });
  doc.transact(() => {
    doc.getMap("map").delete("gone");
    const frag = doc.getXmlFragment("default");
    const heading = new Y.XmlElement("heading");
    heading.setAttribute("level", "2");
    heading.insert(0, [new Y.XmlText(`Title of ${name}`)]);
    const para = new Y.XmlElement("paragraph");
    para.insert(0, [new Y.XmlText(`A paragraph in ${name}.`)]);
    frag.insert(0, [heading, para]);
    const list = doc.getArray("list");
    list.push(["one", 2, { three: 3 }, "four"]);
    list.delete(1, 1);
  });
}

/** Opens NAMES on the Hocuspocus endpoint `url`; returns {name: provider}. */
async function open(url) {
  const socket = new HocuspocusProviderWebsocket({ url, WebSocketPolyfill: WebSocket });
  const providers = {};
  for (const name of NAMES) {
    providers[name] = new HocuspocusProvider({ websocketProvider: socket, name, token: "t" });
    providers[name].attach();
  }
  await until("every document to sync", () => Object.values(providers).every((p) => p.synced));
  return { socket, providers };
}

async function close({ socket, providers }) {
  for (const p of Object.values(providers)) p.destroy();
  socket.destroy();
}

async function read(url) {
  const conn = await open(url);
  const out = {};
  for (const [name, p] of Object.entries(conn.providers)) out[name] = content(p.document);
  await close(conn);
  return out;
}

async function startServer() {
  const { Server } = await import("@hocuspocus/server");
  const extensions = [];
  let pool;
  if (process.env.SQLITE) {
    const { SQLite } = await import("@hocuspocus/extension-sqlite");
    extensions.push(new SQLite({ database: process.env.SQLITE }));
  } else {
    const { Database } = await import("@hocuspocus/extension-database");
    const pg = (await import("pg")).default;
    const table = process.env.TABLE ?? "documents";
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(table)) throw new Error(`bad TABLE ${table}`);
    pool = new pg.Pool({ connectionString: process.env.PG_URL, max: 2 });
    await pool.query(
      `CREATE TABLE IF NOT EXISTS ${table} (name varchar(255) NOT NULL PRIMARY KEY, data bytea NOT NULL)`,
    );
    extensions.push(
      new Database({
        fetch: async ({ documentName }) => {
          const r = await pool.query(`SELECT data FROM ${table} WHERE name = $1`, [documentName]);
          return r.rows[0]?.data ?? null;
        },
        store: async ({ documentName, state }) => {
          await pool.query(
            `INSERT INTO ${table} (name, data) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET data = excluded.data`,
            [documentName, state],
          );
        },
      }),
    );
  }
  const server = new Server({
    port: 0,
    address: "127.0.0.1",
    quiet: true,
    debounce: 50,
    maxDebounce: 200,
    extensions,
  });
  await server.listen();
  return { server, pool, url: `ws://127.0.0.1:${server.address.port}` };
}

async function main() {
  let result;
  if (MODE === "write") {
    const { server, pool, url } = await startServer();
    const conn = await open(url);
    NAMES.forEach((name, i) => edit(conn.providers[name].document, name, i));
    await until("every edit to be acknowledged", () =>
      Object.values(conn.providers).every((p) => !p.hasUnsyncedChanges),
    );
    result = {};
    for (const [name, p] of Object.entries(conn.providers)) result[name] = content(p.document);
    await close(conn);
    // Hocuspocus stores a document and unloads it once its last connection is gone
    await until("Hocuspocus to store and unload every document", () => server.hocuspocus.getDocumentsCount() === 0);
    await server.destroy();
    await pool?.end();
  } else if (MODE === "serve-read") {
    const { server, pool, url } = await startServer();
    result = await read(url);
    await server.destroy();
    await pool?.end();
  } else if (MODE === "read") {
    result = await read(process.env.URL);
  } else if (MODE === "files") {
    const dir = process.env.OUT_DIR;
    mkdirSync(dir, { recursive: true });
    result = {};
    NAMES.forEach((name, i) => {
      const doc = new Y.Doc();
      edit(doc, name, i);
      result[name] = content(doc);
      const file = encodeName(name);
      writeFileSync(join(dir, `${file}.${i % 2 === 0 ? "bin" : "ystate"}`), Y.encodeStateAsUpdate(doc));
    });
    const v2 = new Y.Doc();
    edit(v2, "v2-document", 0);
    writeFileSync(join(dir, "v2-document.bin"), Y.encodeStateAsUpdateV2(v2));
  } else {
    throw new Error(`unknown MODE ${MODE}`);
  }
  // exit only once the (possibly large) line is flushed: a pipe is written asynchronously
  process.stdout.write(JSON.stringify(result) + "\n", () => process.exit(0));
}

/** Hearth's file name for a document: percent-encoding of every byte but A-Z a-z 0-9 - _ . */
function encodeName(name) {
  let out = "";
  const bytes = new TextEncoder().encode(name);
  bytes.forEach((b, i) => {
    const c = String.fromCharCode(b);
    if (/[A-Za-z0-9_-]/.test(c) || (c === "." && i > 0)) out += c;
    else out += "%" + b.toString(16).toUpperCase().padStart(2, "0");
  });
  return out;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
