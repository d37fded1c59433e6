// Plain y-websocket protocol on HEARTH_YWS_URL (checklist 31, 32, 33):
//  * a raw client receives the server's step1 `00 00 SV` immediately on connect (before
//    sending anything); its step1 gets `00 01 diff`; a joiner gets step1 then the awareness
//    snapshot `01 ...`; the server never sends SyncStatus (type 8) or any Hocuspocus framing;
//  * two y-websocket WebsocketProviders (BroadcastChannel disabled) in room "room-1-<run>"
//    sync (`synced`), converge both ways, relay awareness; updates and awareness are echoed
//    to the sender;
//  * destroying one provider removes its awareness at the other; a client that just closes
//    its socket gets its awareness removed by the server ([id, lastClock, null] broadcast);
//  * a different room is a different document.
// Clients authenticate with the `token` query parameter (y-websocket `params: {token}` ->
// `?token=rw`); the document name is the path segment before the query.
// YWS_AUTH=1 (Hearth, where HEARTH_AUTH_TOKENS also guards y-websocket): a denied token is
// closed with a 4400-4499 code and y-websocket >= 3.1 stops reconnecting (terminal `closed`
// event, checklist 34). The reference y-websocket server has no auth, so this part is skipped
// unless YWS_AUTH=1.
import { WebsocketProvider } from "y-websocket";
import {
  scenario,
  step,
  docName,
  waitFor,
  never,
  assert,
  assertEq,
  RawClient,
  HEARTH_YWS_URL,
  parseYws,
  enc,
  encodeAwarenessEntries,
  Y,
  WebSocket,
  docWithText,
  textOfUpdate,
  env,
} from "./lib.mjs";
import * as encoding from "lib0/encoding";

const ywsAwareness = (entries) => {
  const e = encoding.createEncoder();
  encoding.writeVarUint(e, 1);
  encoding.writeVarUint8Array(e, encodeAwarenessEntries(entries));
  return encoding.toUint8Array(e);
};
const ywsUpdate = (update) => {
  const e = encoding.createEncoder();
  encoding.writeVarUint(e, 0);
  encoding.writeVarUint(e, 2);
  encoding.writeVarUint8Array(e, update);
  return encoding.toUint8Array(e);
};

function ywsProvider(room, token = "rw") {
  const doc = new Y.Doc();
  const p = new WebsocketProvider(HEARTH_YWS_URL(), room, doc, { WebSocketPolyfill: WebSocket, disableBc: true, params: { token } });
  p.statusEvents = [];
  p.closedEvents = [];
  p.on("status", ({ status }) => p.statusEvents.push(status));
  p.on("closed", (ev) => p.closedEvents.push(ev));
  p.text = doc.getText("t");
  return p;
}

scenario("y-websocket", async () => {
  const room = docName("room-1");
  const url = `${HEARTH_YWS_URL()}/${room}?token=rw`;

  const r = await RawClient.open(url, { parser: parseYws, label: "raw-yws" });
  const first = await r.waitFrame(() => true, 3000, "server step1 immediately on connect (nothing sent yet)");
  assertEq([first.kind, Array.from(first.bytes)], ["step1", [0, 0, 1, 0]], "first frame is 00 00 <empty SV>");
  step("raw: server step1 arrives immediately on connect");

  const a = ywsProvider(room);
  const b = ywsProvider(room);
  await waitFor(() => a.synced && b.synced, 5000, "both WebsocketProviders synced", () => `a=${a.synced}/${a.statusEvents} b=${b.synced}/${b.statusEvents}`);
  a.text.insert(0, "hello");
  await waitFor(() => b.text.toString() === "hello", 5000, "A's edit reaches B", () => b.text.toString());
  b.text.insert(5, " yws");
  await waitFor(() => a.text.toString() === "hello yws", 5000, "B's edit reaches A", () => a.text.toString());
  step("two WebsocketProviders converge");

  a.awareness.setLocalStateField("user", "alice");
  const aId = a.doc.clientID;
  await waitFor(() => b.awareness.getStates().get(aId)?.user === "alice", 5000, "B sees A's awareness");
  await r.waitFrame((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === aId && e.state?.user === "alice"), 5000, "raw sees A's awareness broadcast");
  step("awareness relayed");

  // raw: step1 -> step2 diff; update -> echo; awareness -> echo; never type 8
  let n = r.frames.length;
  r.send(enc.ywsStep1(new Uint8Array([0])));
  const s2 = await r.waitFrame((f) => f.kind === "step2", 5000, "step2 (00 01 diff) reply to the raw step1", n);
  assertEq(textOfUpdate(s2.payload), "hello yws", "diff carries the document");
  assert(!r.frames.slice(n).some((f) => f.kind === "step1"), "no server step1 in reply to a client step1");
  n = r.frames.length;
  r.send(ywsUpdate(Y.encodeStateAsUpdate(docWithText("R"))));
  await r.waitFrame((f) => f.kind === "update", 5000, "update echoed to the sender", n);
  await waitFor(() => a.text.toString().includes("R") && b.text.toString().includes("R"), 5000, "raw update reaches both providers");
  r.send(ywsAwareness([{ clientID: 31337, clock: 1, state: { user: "raw" } }]));
  await r.waitFrame((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === 31337 && e.clock === 1), 5000, "awareness echoed to the sender", n);
  await waitFor(() => b.awareness.getStates().get(31337)?.user === "raw", 5000, "B sees the raw client's awareness");
  step("raw: step1 -> step2, update/awareness echoed");

  // joiner: step1 first, then the awareness snapshot
  const j = await RawClient.open(url, { parser: parseYws, label: "raw-joiner" });
  await j.waitFrame((f) => f.kind === "awareness", 3000, "joiner receives the awareness snapshot");
  assertEq(j.frames.slice(0, 2).map((f) => f.kind), ["step1", "awareness"], "joiner: step1 then awareness snapshot");
  assert(j.frames[1].entries.some((e) => e.clientID === aId) && j.frames[1].entries.some((e) => e.clientID === 31337), "snapshot contains A and the raw client");
  j.close();

  // server-side removal when a client just closes its socket
  n = r.frames.length;
  const r2 = await RawClient.open(url, { parser: parseYws, label: "raw2" });
  r2.send(ywsAwareness([{ clientID: 4711, clock: 3, state: { user: "leaver" } }]));
  await waitFor(() => b.awareness.getStates().get(4711)?.user === "leaver", 5000, "B sees raw2's awareness");
  r2.close();
  await waitFor(() => !b.awareness.getStates().has(4711), 5000, "B drops raw2's state after raw2 closed its socket");
  const rem = await r.waitFrame((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === 4711 && e.state === null), 5000, "server broadcasts raw2's removal", n);
  assertEq(rem.entries.find((e) => e.clientID === 4711).clock, 3, "server removal keeps the last clock");
  step("socket close -> server broadcasts the awareness removal");

  // closing a provider removes its awareness at the other one
  a.destroy();
  await waitFor(() => !b.awareness.getStates().has(aId), 5000, "B drops A's awareness after A.destroy()");
  step("provider destroy -> removal relayed");

  // different room = different document
  const other = ywsProvider(docName("room-2"));
  await waitFor(() => other.synced, 5000, "provider in another room synced");
  await never(() => other.text.toString() !== "", 300, "content leaked into another room", () => other.text.toString());

  if (env("YWS_AUTH", "0") === "1") {
    const denied = ywsProvider(docName("room-denied"), "bad");
    await waitFor(() => denied.closedEvents.length > 0, 5000, "denied y-websocket client gets a terminal `closed` event", () => JSON.stringify(denied.statusEvents));
    const code = denied.closedEvents[0].code;
    assert(code >= 4400 && code < 4500, `denied y-websocket client closed with a 44xx code (got ${code} ${JSON.stringify(denied.closedEvents[0].reason)})`);
    await never(() => denied.statusEvents.filter((s) => s === "connecting").length > 1, 1000, "denied y-websocket client reconnected", () => JSON.stringify(denied.statusEvents));
    assert(!denied.synced, "denied client never synced");
    denied.destroy();
    step(`denied token -> close ${code}, no reconnect`);
  } else {
    step("YWS_AUTH!=1: skipping the denied-token check (reference y-websocket server has no auth)");
  }

  assert(!r.frames.some((f) => f.type === 8), "y-websocket clients never receive SyncStatus (type 8)");
  assert(!r.frames.some((f) => f.kind === "unparsable"), "all frames parse as y-websocket frames");
  r.assertBinaryOnly();
  r.close();
  b.destroy();
  other.destroy();
});
