// Older providers (checklist 24): @hocuspocus/provider 3.4.4 (Auth without providerVersion)
// and 2.15.3 (Auth only because a token is configured; appends its `parameters` as a query
// string) authenticate with token "rw" and sync + relay awareness with a v4 provider.
// v2/v3 providers throw on message types they don't know (e.g. Ping 09, SyncReply 04), which
// this harness turns into a failure.
import WebSocket from "ws";
import { HocuspocusProvider as ProviderV3 } from "provider-v3";
import { HocuspocusProvider as ProviderV2, HocuspocusProviderWebsocket as SocketV2 } from "provider-v2";
import { scenario, step, docName, v4Provider, waitSynced, waitText, waitFor, assertEq, HEARTH_URL, Y } from "./lib.mjs";

function track(p) {
  p.events = [];
  for (const n of ["authenticated", "authenticationFailed", "synced", "close", "disconnect", "stateless"]) {
    p.on(n, (data) => p.events.push({ name: n, data }));
  }
  return p;
}

async function legacySynced(p, label) {
  await waitFor(
    () => p.isAuthenticated && p.isSynced && !p.hasUnsyncedChanges,
    5000,
    `${label} authenticated + synced + no unsynced changes`,
    () => JSON.stringify({ isAuthenticated: p.isAuthenticated, synced: p.isSynced, unsynced: p.unsyncedChanges, events: p.events.map((e) => e.name) }),
  );
}

scenario("legacy-providers", async () => {
  const name = docName("legacy");
  const v4 = v4Provider({ name });
  await waitSynced(v4, 5000, "v4 provider");
  v4.text.insert(0, "v4;");

  const v3 = track(
    new ProviderV3({ url: HEARTH_URL(), WebSocketPolyfill: WebSocket, name, token: "rw", document: new Y.Doc() }),
  );
  await legacySynced(v3, "v3.4.4 provider");
  assertEq(v3.authorizedScope, "read-write", "v3 scope");
  step("v3.4.4 provider authenticated and synced");

  const s2 = new SocketV2({ url: HEARTH_URL(), WebSocketPolyfill: WebSocket, parameters: { client: "v2" } });
  const v2 = track(new ProviderV2({ websocketProvider: s2, name, token: "rw", document: new Y.Doc(), broadcast: false }));
  await legacySynced(v2, "v2.15.3 provider");
  assertEq(v2.authorizedScope, "read-write", "v2 scope");
  step("v2.15.3 provider (token, query string) authenticated and synced");

  const t = (p) => p.document.getText("t");
  await waitText([v3, v2], "v4;", 5000, "legacy providers received the v4 content");
  t(v3).insert(t(v3).length, "v3;");
  await waitText([v4, v3, v2], "v4;v3;", 5000, "v3 edit reaches v4 and v2");
  t(v2).insert(t(v2).length, "v2;");
  await waitText([v4, v3, v2], "v4;v3;v2;", 5000, "v2 edit reaches v4 and v3");
  v4.text.insert(v4.text.length, "end");
  await waitText([v4, v3, v2], "v4;v3;v2;end", 5000, "v4 edit reaches v3 and v2");
  await waitFor(
    () => !v4.hasUnsyncedChanges && !v3.hasUnsyncedChanges && !v2.hasUnsyncedChanges,
    5000,
    "all edits acknowledged (SyncStatus 1) on v4, v3 and v2",
    () => `v4=${v4.unsyncedChanges} v3=${v3.unsyncedChanges} v2=${v2.unsyncedChanges}`,
  );
  step("v2/v3/v4 converge");

  v3.setAwarenessField("user", "three");
  v2.setAwarenessField("user", "two");
  await waitFor(
    () =>
      v4.awareness.getStates().get(v3.document.clientID)?.user === "three" &&
      v4.awareness.getStates().get(v2.document.clientID)?.user === "two" &&
      v2.awareness.getStates().get(v3.document.clientID)?.user === "three",
    5000,
    "awareness relays between v2, v3 and v4",
  );
  step("awareness relays across provider generations");
});
