// Idle keepalive (checklist 18, 30): providers that are open but idle (default awareness, no
// edits) are neither disconnected by the server nor reconnect on their own while the server's
// idle timeout is scaled down (Hearth test config: 3 s) and we observe for IDLE_OBSERVE_MS
// (default 10000). Covers a v4 provider (may receive app-level Ping 09 and must answer 0a)
// and a v3.4.4 provider (must never receive 09 — v3 throws on unknown types, which fails the
// script). Afterwards both still sync.
//
// EXPECT_APP_PING=1 (used when Hearth runs with HEARTH_APP_PING_INTERVAL_MS < IDLE_OBSERVE_MS):
// additionally require that the v4 socket received at least one app-level Ping `09` (the v4
// provider answers `0a`, which the server must accept) — and the v3 provider still none.
//
// NOTE: the reference @hocuspocus/server only counts inbound *application* frames as liveness,
// and providers renew awareness only every 15 s, so the reference itself fails this scenario
// with a 3 s timeout; validate it against the reference with its default 60 s timeout.
import WebSocket from "ws";
import { HocuspocusProvider as ProviderV3 } from "provider-v3";
import { scenario, step, docName, env, envInt, v4Provider, waitSynced, waitText, waitFor, assert, HEARTH_URL, Y, sleep, summarizeEvents } from "./lib.mjs";

const OBSERVE_MS = envInt("IDLE_OBSERVE_MS", 10000);
const EXPECT_APP_PING = env("EXPECT_APP_PING", "0") === "1";

scenario(
  "idle",
  async () => {
    const name = docName("idle");
    const a = v4Provider({ name });
    const b = v4Provider({ name });
    await waitSynced(a, 5000, "A");
    await waitSynced(b, 5000, "B");
    const v3Events = [];
    const v3 = new ProviderV3({ url: HEARTH_URL(), WebSocketPolyfill: WebSocket, name, token: "rw", document: new Y.Doc() });
    for (const n of ["close", "disconnect", "authenticationFailed"]) v3.on(n, (d) => v3Events.push({ name: n, data: d }));
    await waitFor(() => v3.isAuthenticated && v3.isSynced && !v3.hasUnsyncedChanges, 5000, "v3 provider synced");
    a.text.insert(0, "before");
    await waitText([a, b, v3], "before", 5000, "initial edit");
    await waitFor(() => !a.hasUnsyncedChanges, 5000, "initial edit acked");

    const wsA = a.socket.webSocket;
    const wsB = b.socket.webSocket;
    const wsV3 = v3.configuration.websocketProvider.webSocket;
    const evA = a.socket.events.length;
    const evB = b.socket.events.length;
    const pEvA = a.events.length;
    const pEvB = b.events.length;
    step(`idle for ${OBSERVE_MS} ms ...`);
    const until = Date.now() + OBSERVE_MS;
    while (Date.now() < until) {
      await sleep(Math.min(250, until - Date.now()));
      const newA = a.socket.events.slice(evA).concat(a.events.slice(pEvA));
      const newB = b.socket.events.slice(evB).concat(b.events.slice(pEvB));
      assert(newA.length === 0, `A saw connection events while idle: ${summarizeEvents(newA)}`);
      assert(newB.length === 0, `B saw connection events while idle: ${summarizeEvents(newB)}`);
      assert(v3Events.length === 0, `v3 provider saw events while idle: ${v3Events.map((e) => `${e.name}${e.data?.event ? `(${e.data.event.code} ${e.data.event.reason})` : ""}`).join(", ")}`);
      assert(a.socket.webSocket === wsA && wsA.readyState === 1, "A's WebSocket replaced or not open");
      assert(b.socket.webSocket === wsB && wsB.readyState === 1, "B's WebSocket replaced or not open");
      assert(v3.configuration.websocketProvider.webSocket === wsV3 && wsV3.readyState === 1, "v3 WebSocket replaced or not open");
    }
    const pings = a.socket.frames.filter((f) => f.kind === "ping").length;
    step(`no disconnect/reconnect during ${OBSERVE_MS} ms (v4 socket received ${pings} app-level Ping frames)`);
    if (EXPECT_APP_PING) assert(pings >= 1, "EXPECT_APP_PING=1: the v4 socket received at least one app-level Ping (09)");

    b.text.insert(b.text.length, "+after");
    v3.document.getText("t").insert(0, "v3:");
    await waitText([a, b, v3], "v3:before+after", 5000, "edits after the idle period");
    await waitFor(() => !b.hasUnsyncedChanges && !v3.hasUnsyncedChanges, 5000, "edits after idle acked");
    assert(a.isAuthenticated && b.isAuthenticated && v3.isAuthenticated, "still authenticated after idle");
  },
  { timeoutMs: OBSERVE_MS + 20000 },
);
