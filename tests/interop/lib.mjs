// Shared helpers for the interop scenario scripts.
//
// Every script calls `scenario(name, async (t) => { ... })`: it installs a global hard
// timeout, turns any uncaught exception / unhandled rejection into a failure, prints
// progress lines with elapsed time, and exits 0 on success / 1 on failure.
//
// Env:
//   HEARTH_URL          Hocuspocus endpoint, e.g. ws://127.0.0.1:PORT   (required by most scripts)
//   HEARTH_YWS_URL      y-websocket base URL, e.g. ws://127.0.0.1:PORT/y (document = next path segment)
//   SCRIPT_TIMEOUT_MS   global hard timeout per script (default 20000)

import WebSocket from "ws";
import * as Y from "yjs";
import * as encoding from "lib0/encoding";
import * as decoding from "lib0/decoding";
import { Awareness } from "y-protocols/awareness";
import { HocuspocusProvider, HocuspocusProviderWebsocket } from "@hocuspocus/provider";

export { WebSocket, Y, Awareness, HocuspocusProvider, HocuspocusProviderWebsocket };

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

const START = Date.now();
let currentScenario = "?";
let finished = false;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function elapsed() {
  return Date.now() - START;
}

export function step(msg) {
  console.log(`[${String(elapsed()).padStart(6)} ms] ${msg}`);
}

export function fail(msg, err) {
  if (finished) return;
  finished = true;
  console.error(`\nFAIL ${currentScenario}: ${msg}`);
  if (err && err.stack) console.error(err.stack);
  else if (err !== undefined) console.error(err);
  process.exit(1);
}

export function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === "") {
    if (fallback !== undefined) return fallback;
    fail(`environment variable ${name} is not set`);
  }
  return v;
}

export function envInt(name, fallback) {
  const v = Number(env(name, String(fallback)));
  if (!Number.isFinite(v)) fail(`environment variable ${name} is not a number`);
  return v;
}

export const HEARTH_URL = () => env("HEARTH_URL").replace(/\/+$/, "");
export const HEARTH_YWS_URL = () => env("HEARTH_YWS_URL").replace(/\/+$/, "");

/** Unique document names per run, so reruns against a long-lived server don't collide. */
const RUN_ID = `${process.pid.toString(36)}${Math.random().toString(36).slice(2, 6)}`;
export function docName(base) {
  return `${base}-${RUN_ID}`;
}

export class AssertionError extends Error {}

export function assert(cond, msg) {
  if (!cond) throw new AssertionError(`assertion failed: ${msg}`);
}

export function assertEq(actual, expected, msg) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new AssertionError(`assertion failed: ${msg}\n  expected: ${e}\n  actual:   ${a}`);
}

/**
 * Poll `predicate` every 10 ms until it returns a truthy value (returned), or throw
 * after `timeoutMs`. `what` describes the awaited condition; `detail` (optional function)
 * adds diagnostic state to the failure message.
 */
export async function waitFor(predicate, timeoutMs, what, detail) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await predicate();
    if (v) return v;
    if (Date.now() >= deadline) {
      let extra = "";
      if (detail) {
        try {
          extra = `\n  state: ${detail()}`;
        } catch (e) {
          extra = `\n  (detail failed: ${e})`;
        }
      }
      throw new AssertionError(`timed out after ${timeoutMs} ms waiting for: ${what}${extra}`);
    }
    await sleep(10);
  }
}

/** Assert that `predicate` stays falsy for `durationMs` (polling every 10 ms). */
export async function never(predicate, durationMs, what, detail) {
  const deadline = Date.now() + durationMs;
  while (Date.now() < deadline) {
    if (await predicate()) {
      const extra = detail ? `\n  state: ${detail()}` : "";
      throw new AssertionError(`unexpected: ${what}${extra}`);
    }
    await sleep(10);
  }
}

/**
 * Run a scenario. `fn` receives nothing; it throws to fail. Resolving = pass.
 * opts.timeoutMs overrides SCRIPT_TIMEOUT_MS (default 20000).
 */
export function scenario(name, fn, opts = {}) {
  currentScenario = name;
  const timeoutMs = opts.timeoutMs ?? envInt("SCRIPT_TIMEOUT_MS", 20000);
  setTimeout(() => fail(`global hard timeout of ${timeoutMs} ms exceeded`), timeoutMs);
  process.on("uncaughtException", (e) => fail("uncaught exception", e));
  process.on("unhandledRejection", (e) => fail("unhandled promise rejection", e));
  step(`scenario ${name} (HEARTH_URL=${process.env.HEARTH_URL ?? "-"} HEARTH_YWS_URL=${process.env.HEARTH_YWS_URL ?? "-"})`);
  Promise.resolve()
    .then(fn)
    .then(
      () => {
        if (finished) return;
        finished = true;
        step(`PASS ${name}`);
        process.exit(0);
      },
      (e) => fail(e instanceof AssertionError ? e.message : `error: ${e?.message ?? e}`, e instanceof AssertionError ? undefined : e),
    );
}

// ---------------------------------------------------------------------------
// Providers
// ---------------------------------------------------------------------------

/** Record provider / socket events with timestamps. */
function recordEvents(emitter, names, sink, prefix = "") {
  for (const n of names) {
    emitter.on(n, (data) => {
      const ev = { name: prefix + n, t: Date.now(), data };
      sink.push(ev);
    });
  }
}

export function summarizeEvents(events) {
  return events
    .map((e) => {
      let d = "";
      if (e.name.endsWith("close")) d = `(${e.data?.event?.code} ${JSON.stringify(e.data?.event?.reason)})`;
      else if (e.name.endsWith("authenticationFailed")) d = `(${JSON.stringify(e.data?.reason)})`;
      else if (e.name.endsWith("authenticated")) d = `(${JSON.stringify(e.data?.scope)})`;
      else if (e.name.endsWith("status")) d = `(${e.data?.status})`;
      else if (e.name.endsWith("stateless")) d = `(${JSON.stringify(e.data?.payload)})`;
      return `${e.name}${d}`;
    })
    .join(", ");
}

const SOCKET_EVENTS = ["open", "connect", "status", "close", "disconnect", "destroy"];
const PROVIDER_EVENTS = [
  "authenticated",
  "authenticationFailed",
  "synced",
  "close",
  "disconnect",
  "stateless",
  "destroy",
];

/** A v4 HocuspocusProviderWebsocket on HEARTH_URL (ws polyfill). `.events` records socket events. */
export function v4Socket(opts = {}) {
  const socket = new HocuspocusProviderWebsocket({
    url: HEARTH_URL(),
    WebSocketPolyfill: WebSocket,
    ...opts,
  });
  socket.events = [];
  recordEvents(socket, SOCKET_EVENTS, socket.events, "socket.");
  // every inbound frame, parsed (for wire-level assertions on real providers)
  socket.frames = [];
  socket.on("message", (ev) => {
    const bytes = new Uint8Array(ev.data);
    socket.frames.push({ t: Date.now(), bytes, ...parseHp(bytes) });
  });
  return socket;
}

/**
 * A v4 HocuspocusProvider attached to `socket` (a fresh v4Socket if omitted).
 * `.events` records provider events; `.text` is the Y.Text "t".
 */
export function v4Provider({ socket, name, token = "rw", document, awareness, attach = true, ...rest }) {
  const sock = socket ?? v4Socket();
  const provider = new HocuspocusProvider({
    websocketProvider: sock,
    name,
    token,
    document: document ?? new Y.Doc(),
    ...(awareness !== undefined ? { awareness } : {}),
    ...rest,
  });
  provider.events = [];
  recordEvents(provider, PROVIDER_EVENTS, provider.events);
  provider.socket = sock;
  provider.text = provider.document.getText("t");
  if (attach) provider.attach();
  return provider;
}

export function hasEvent(p, name, filter = () => true) {
  return p.events.some((e) => e.name === name && filter(e.data));
}

export function eventsOf(p, name) {
  return p.events.filter((e) => e.name === name);
}

export function providerState(p) {
  return JSON.stringify({
    name: p.configuration?.name,
    text: p.document.getText("t").toString(),
    synced: p.synced ?? p.isSynced,
    unsynced: p.unsyncedChanges,
    isAuthenticated: p.isAuthenticated,
    scope: p.authorizedScope,
    events: summarizeEvents(p.events ?? []),
    socketEvents: summarizeEvents(p.socket?.events ?? []),
  });
}

/** Wait for onAuthenticated + synced + !hasUnsyncedChanges. */
export async function waitSynced(p, timeoutMs = 5000, label = "provider") {
  await waitFor(
    () => p.isAuthenticated && p.synced && !p.hasUnsyncedChanges,
    timeoutMs,
    `${label} authenticated, synced and hasUnsyncedChanges=false`,
    () => providerState(p),
  );
}

/** Wait until the Y.Text "t" of every provider equals `expected`. */
export async function waitText(providers, expected, timeoutMs = 5000, what = "text converged") {
  await waitFor(
    () => providers.every((p) => p.document.getText("t").toString() === expected),
    timeoutMs,
    `${what}: all texts === ${JSON.stringify(expected)}`,
    () => providers.map((p) => JSON.stringify(p.document.getText("t").toString())).join(" | "),
  );
}

// ---------------------------------------------------------------------------
// lib0 encoding of Hocuspocus / y-websocket frames
// ---------------------------------------------------------------------------

export const T = {
  Sync: 0,
  Awareness: 1,
  Auth: 2,
  QueryAwareness: 3,
  SyncReply: 4,
  Stateless: 5,
  BroadcastStateless: 6,
  CLOSE: 7,
  SyncStatus: 8,
  Ping: 9,
  Pong: 10,
};

function build(fn) {
  const enc = encoding.createEncoder();
  fn(enc);
  return encoding.toUint8Array(enc);
}

function header(enc, addr, type) {
  encoding.writeVarString(enc, addr);
  encoding.writeVarUint(enc, type);
}

export const enc = {
  /** A 02 00 token [version] */
  auth: (addr, token, version) =>
    build((e) => {
      header(e, addr, T.Auth);
      encoding.writeVarUint(e, 0);
      encoding.writeVarString(e, token);
      if (version !== undefined) encoding.writeVarString(e, version);
    }),
  step1: (addr, sv) =>
    build((e) => {
      header(e, addr, T.Sync);
      encoding.writeVarUint(e, 0);
      encoding.writeVarUint8Array(e, sv);
    }),
  step2: (addr, update) =>
    build((e) => {
      header(e, addr, T.Sync);
      encoding.writeVarUint(e, 1);
      encoding.writeVarUint8Array(e, update);
    }),
  update: (addr, update) =>
    build((e) => {
      header(e, addr, T.Sync);
      encoding.writeVarUint(e, 2);
      encoding.writeVarUint8Array(e, update);
    }),
  /** entries: [{clientID, clock, state}] where state is a JS value (null = removal) */
  awareness: (addr, entries) =>
    build((e) => {
      header(e, addr, T.Awareness);
      encoding.writeVarUint8Array(e, encodeAwarenessEntries(entries));
    }),
  stateless: (addr, payload) =>
    build((e) => {
      header(e, addr, T.Stateless);
      encoding.writeVarString(e, payload);
    }),
  broadcastStateless: (addr, payload) =>
    build((e) => {
      header(e, addr, T.BroadcastStateless);
      encoding.writeVarString(e, payload);
    }),
  close: (addr) => build((e) => header(e, addr, T.CLOSE)),
  pong: () => Uint8Array.of(T.Pong),
  // plain y-websocket framing (no address)
  ywsStep1: (sv) =>
    build((e) => {
      encoding.writeVarUint(e, 0);
      encoding.writeVarUint(e, 0);
      encoding.writeVarUint8Array(e, sv);
    }),
};

export function encodeAwarenessEntries(entries) {
  return build((e) => {
    encoding.writeVarUint(e, entries.length);
    for (const { clientID, clock, state } of entries) {
      encoding.writeVarUint(e, clientID);
      encoding.writeVarUint(e, clock);
      encoding.writeVarString(e, JSON.stringify(state));
    }
  });
}

export function decodeAwarenessEntries(bytes) {
  const d = decoding.createDecoder(bytes);
  const n = decoding.readVarUint(d);
  const out = [];
  for (let i = 0; i < n; i++) {
    const clientID = decoding.readVarUint(d);
    const clock = decoding.readVarUint(d);
    const json = decoding.readVarString(d);
    out.push({ clientID, clock, json, state: JSON.parse(json) });
  }
  return out;
}

export function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(" ");
}

const SYNC_NAMES = ["step1", "step2", "update"];
const AUTH_NAMES = ["token", "denied", "authenticated"];

/** Parse a server→client Hocuspocus frame. Never throws: returns {kind:"unparsable"} instead. */
export function parseHp(bytes) {
  try {
    if (bytes.length === 1) return { kind: bytes[0] === T.Ping ? "ping" : "single-byte", byte: bytes[0] };
    const d = decoding.createDecoder(bytes);
    const addr = decoding.readVarString(d);
    const type = decoding.readVarUint(d);
    const f = { addr, type, kind: `type${type}` };
    switch (type) {
      case T.Sync: {
        f.sub = decoding.readVarUint(d);
        f.kind = SYNC_NAMES[f.sub] ?? `sync${f.sub}`;
        f.payload = decoding.readVarUint8Array(d);
        break;
      }
      case T.Awareness:
        f.kind = "awareness";
        f.entries = decodeAwarenessEntries(decoding.readVarUint8Array(d));
        break;
      case T.Auth:
        f.sub = decoding.readVarUint(d);
        f.kind = AUTH_NAMES[f.sub] ?? `auth${f.sub}`;
        if (f.sub === 1) f.reason = decoding.readVarString(d);
        if (f.sub === 2) f.scope = decoding.readVarString(d);
        break;
      case T.Stateless:
        f.kind = "stateless";
        f.payload = decoding.readVarString(d);
        break;
      case T.CLOSE:
        f.kind = "close";
        f.reason = decoding.hasContent(d) ? decoding.readVarString(d) : undefined;
        break;
      case T.SyncStatus:
        f.kind = "syncStatus";
        f.status = decoding.readVarUint(d);
        break;
      case T.QueryAwareness:
        f.kind = "queryAwareness";
        break;
      default:
        break;
    }
    return f;
  } catch (e) {
    return { kind: "unparsable", error: String(e) };
  }
}

/** Parse a server→client plain y-websocket frame. */
export function parseYws(bytes) {
  try {
    const d = decoding.createDecoder(bytes);
    const type = decoding.readVarUint(d);
    const f = { type, kind: `type${type}` };
    if (type === 0) {
      f.sub = decoding.readVarUint(d);
      f.kind = SYNC_NAMES[f.sub] ?? `sync${f.sub}`;
      f.payload = decoding.readVarUint8Array(d);
    } else if (type === 1) {
      f.kind = "awareness";
      f.entries = decodeAwarenessEntries(decoding.readVarUint8Array(d));
    } else if (type === 2) {
      f.kind = "auth";
    }
    return f;
  } catch (e) {
    return { kind: "unparsable", error: String(e) };
  }
}

export function describeFrame(f) {
  let s = f.kind;
  if (f.addr !== undefined) s = `${JSON.stringify(f.addr)} ${s}`;
  if (f.scope !== undefined) s += `(${JSON.stringify(f.scope)})`;
  if (f.reason !== undefined) s += `(${JSON.stringify(f.reason)})`;
  if (f.status !== undefined) s += `(${f.status})`;
  if (f.kind === "stateless") s += `(${JSON.stringify(f.payload)})`;
  if (f.entries) s += `(${f.entries.map((e) => `${e.clientID}@${e.clock}:${e.json}`).join(";")})`;
  return s;
}

// ---------------------------------------------------------------------------
// Raw ws client
// ---------------------------------------------------------------------------

/**
 * A raw `ws` client that records every inbound frame (parsed with `parser`),
 * asserts that every inbound frame is binary, and records the close code/reason.
 */
export class RawClient {
  constructor(url, { parser = parseHp, label = "raw" } = {}) {
    this.url = url;
    this.label = label;
    this.parser = parser;
    this.frames = []; // { t, bytes, ...parsed }
    this.textFrames = 0;
    this.closed = null; // { code, reason, t }
    this.openedAt = null;
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.on("message", (data, isBinary) => {
      if (!isBinary) this.textFrames += 1;
      const bytes = new Uint8Array(data);
      this.frames.push({ t: Date.now(), bytes, ...this.parser(bytes) });
    });
    this.ws.on("close", (code, reason) => {
      this.closed = { code, reason: reason.toString(), t: Date.now() };
    });
    this.ws.on("error", (e) => {
      this.error = e;
    });
  }

  static async open(url, opts = {}) {
    const c = new RawClient(url, opts);
    await waitFor(
      () => c.ws.readyState === WebSocket.OPEN || c.closed || c.error,
      5000,
      `${c.label}: websocket open to ${url}`,
    );
    if (c.ws.readyState !== WebSocket.OPEN) {
      throw new AssertionError(`${c.label}: could not open ${url}: ${c.error ?? JSON.stringify(c.closed)}`);
    }
    c.openedAt = Date.now();
    return c;
  }

  send(bytes) {
    this.ws.send(bytes, { binary: true });
  }

  /** Frames for `addr` (all frames if addr undefined). */
  framesFor(addr) {
    return addr === undefined ? this.frames : this.frames.filter((f) => f.addr === addr);
  }

  describe(addr) {
    const fr = this.framesFor(addr).map(describeFrame).join(" | ");
    return `${this.label} frames${addr !== undefined ? ` for ${JSON.stringify(addr)}` : ""}: [${fr}]${this.closed ? ` closed=${JSON.stringify(this.closed)}` : ""}${this.textFrames ? ` TEXT FRAMES=${this.textFrames}` : ""}`;
  }

  /** Wait for a frame matching `pred` at index >= `from`; returns the frame. */
  async waitFrame(pred, timeoutMs, what, from = 0) {
    return waitFor(
      () => this.frames.slice(from).find(pred),
      timeoutMs,
      `${this.label}: ${what}`,
      () => this.describe(),
    );
  }

  async waitClosed(timeoutMs, what = "socket closed by server") {
    return waitFor(() => this.closed, timeoutMs, `${this.label}: ${what}`, () => this.describe());
  }

  assertBinaryOnly() {
    assert(this.textFrames === 0, `${this.label}: server sent ${this.textFrames} text frame(s); only binary frames are allowed`);
  }

  close() {
    try {
      this.ws.close();
    } catch {
      /* ignore */
    }
  }
}

/** Open a raw client to HEARTH_URL and authenticate `addr` with `token` (v4-style Auth with version). */
export async function rawAuthed(addr, token = "rw", { version = "4.8.0", label = "raw" } = {}) {
  const c = await RawClient.open(HEARTH_URL(), { label });
  c.send(enc.auth(addr, token, version));
  await c.waitFrame((f) => f.addr === addr && (f.kind === "authenticated" || f.kind === "denied"), 5000, `auth answer for ${addr}`);
  return c;
}

/** Y.Doc with "t" containing `text` (fresh client ID). */
export function docWithText(text) {
  const d = new Y.Doc();
  if (text) d.getText("t").insert(0, text);
  return d;
}

export function textOfUpdate(update) {
  const d = new Y.Doc();
  Y.applyUpdate(d, update);
  return d.getText("t").toString();
}
