// Raw-frame checks with a plain `ws` client and hand-encoded lib0 frames
// (checklist 1, 2, 3, 5, 6, 21, 22):
//  * Auth + step1 + awareness sent back-to-back: the first frame for the address is exactly
//    A 02 02 "read-write" (byte-exact), nothing for the address precedes it;
//  * every step1 is answered with step1 then step2 (step2 = diff against the sent SV);
//  * a step2 is acked with exactly one A 08 01 (byte-exact); an update with new content gets
//    exactly one A 08 01 and is echoed back as A 00 02 and broadcast to a peer;
//  * a client frame of unknown type is ignored (document connection keeps working);
//  * client-sent type 6 (BroadcastStateless) -> A 07 "Reset Connection", not relayed to peers,
//    socket stays open;
//  * unparsable frame `ff` -> socket closed with 4401;
//  * the server only ever sends binary frames.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitFor,
  never,
  assert,
  assertEq,
  RawClient,
  HEARTH_URL,
  enc,
  hex,
  Y,
  docWithText,
  textOfUpdate,
  eventsOf,
  rawAuthed,
} from "./lib.mjs";
import * as encoding from "lib0/encoding";

function bytesOf(fn) {
  const e = encoding.createEncoder();
  fn(e);
  return encoding.toUint8Array(e);
}

scenario("raw-frames", async () => {
  const name = docName("raw");
  const seed = v4Provider({ name });
  await waitSynced(seed, 5000, "seed provider");
  seed.text.insert(0, "seed");
  await waitFor(() => !seed.hasUnsyncedChanges, 5000, "seed edit acked");

  const raw = await RawClient.open(HEARTH_URL(), { label: "raw" });
  raw.send(enc.auth(name, "rw", "4.8.0"));
  raw.send(enc.step1(name, new Uint8Array([0])));
  raw.send(enc.awareness(name, [{ clientID: 4242, clock: 1, state: { user: "raw" } }]));
  await raw.waitFrame((f) => f.kind === "step2", 5000, "step2 reply to the queued step1");
  const first = raw.framesFor(name)[0];
  const expectedAuthd = bytesOf((e) => {
    encoding.writeVarString(e, name);
    encoding.writeVarUint(e, 2);
    encoding.writeVarUint(e, 2);
    encoding.writeVarString(e, "read-write");
  });
  assertEq(hex(first.bytes), hex(expectedAuthd), `first frame for the address is Authenticated "read-write" (${raw.describe()})`);
  assertEq(raw.frames[0], first, "no frame at all precedes Authenticated");
  const kinds = raw.framesFor(name).map((f) => f.kind).filter((k) => k === "step1" || k === "step2");
  assertEq(kinds, ["step1", "step2"], `sync answer order (${raw.describe()})`);
  const s2 = raw.frames.find((f) => f.kind === "step2");
  assertEq(textOfUpdate(s2.payload), "seed", "step2 (diff against empty SV) carries the document");
  await raw.waitFrame((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === 4242 && e.clock === 1), 5000, "awareness queued before auth is applied and echoed");
  step("Authenticated first, then step1, step2; queued awareness applied");

  // step1 again (with the full SV): answered again with step1 + step2 (empty diff)
  let n = raw.frames.length;
  const seedDoc = new Y.Doc();
  Y.applyUpdate(seedDoc, s2.payload);
  raw.send(enc.step1(name, Y.encodeStateVector(seedDoc)));
  await raw.waitFrame((f) => f.kind === "step2", 5000, "step2 reply to a second step1", n);
  assertEq(raw.frames.slice(n).map((f) => f.kind).filter((k) => k.startsWith("step")), ["step1", "step2"], "second step1 also answered with step1 then step2");
  assertEq(textOfUpdate(raw.frames.slice(n).find((f) => f.kind === "step2").payload), "", "diff against the full SV adds nothing");

  // step2 ack
  const syncStatusBytes = (v) => hex(bytesOf((e) => { encoding.writeVarString(e, name); encoding.writeVarUint(e, 8); encoding.writeVarUint(e, v); }));
  n = raw.frames.length;
  raw.send(enc.step2(name, new Uint8Array([0, 0])));
  const ack = await raw.waitFrame((f) => f.kind === "syncStatus", 5000, "SyncStatus for a step2", n);
  assertEq(hex(ack.bytes), syncStatusBytes(1), "step2 acked with A 08 01");
  await never(() => raw.frames.slice(n).filter((f) => f.kind === "syncStatus").length > 1, 300, "more than one SyncStatus for one step2");
  assert(!raw.frames.slice(n).some((f) => f.kind === "step1" || f.kind === "step2"), "no step1/step2 in reply to a step2");
  step("step2 acked with exactly one A 08 01");

  // update with new content: one ack, echo to sender, broadcast to the seed provider
  n = raw.frames.length;
  const mine = docWithText("RAW");
  raw.send(enc.update(name, Y.encodeStateAsUpdate(mine)));
  await raw.waitFrame((f) => f.kind === "syncStatus", 5000, "SyncStatus for an update", n);
  await raw.waitFrame((f) => f.kind === "update", 5000, "echo of the update to the sender", n);
  await waitFor(() => seed.text.toString().includes("RAW"), 5000, "raw update reaches the provider", () => seed.text.toString());
  await never(() => raw.frames.slice(n).filter((f) => f.kind === "syncStatus").length > 1, 300, "more than one SyncStatus for one update", () => raw.describe());
  assertEq(raw.frames.slice(n).filter((f) => f.kind === "syncStatus").map((f) => f.status), [1], "exactly one SyncStatus(1) for the update");
  step("update: one A 08 01, echoed to the sender, broadcast to peers");

  // unknown message type from the client is ignored
  n = raw.frames.length;
  raw.send(bytesOf((e) => { encoding.writeVarString(e, name); encoding.writeVarUint(e, 42); }));
  raw.send(enc.step1(name, new Uint8Array([0])));
  await raw.waitFrame((f) => f.kind === "step2", 5000, "document connection still answers after an unknown-type frame", n);
  assert(!raw.frames.slice(n).some((f) => f.kind === "close"), "no CLOSE for an unknown-type frame");

  // client-sent BroadcastStateless (type 6) -> A 07 "Reset Connection", nothing relayed
  const other = docName("raw-t6");
  const peer = v4Provider({ name: other });
  await waitSynced(peer, 5000, "peer on the type-6 doc");
  raw.send(enc.auth(other, "rw", "4.8.0"));
  await raw.waitFrame((f) => f.addr === other && f.kind === "authenticated", 5000, "second address authenticated");
  n = raw.frames.length;
  raw.send(enc.broadcastStateless(other, "sneaky"));
  const reset = await raw.waitFrame((f) => f.addr === other && f.kind === "close", 5000, "CLOSE after a client type-6 frame", n);
  assertEq(reset.reason, "Reset Connection", "type 6 -> CLOSE reason");
  await never(() => eventsOf(peer, "stateless").length > 0, 300, "type-6 payload relayed to a peer");
  // socket stays open and the first address still works
  n = raw.frames.length;
  raw.send(enc.step1(name, new Uint8Array([0])));
  await raw.waitFrame((f) => f.addr === name && f.kind === "step2", 5000, "socket still serves the first address after the type-6 CLOSE", n);
  assert(!raw.closed, "socket still open after type 6");
  raw.assertBinaryOnly();
  step("client type 6 -> A 07 \"Reset Connection\", not relayed, socket open");

  // unparsable frame -> socket closed 4401
  const bad = await rawAuthed(name, "rw", { label: "raw-ff" });
  bad.send(Uint8Array.of(0xff));
  const closed = await bad.waitClosed(5000, "socket closed after unparsable frame ff");
  assertEq([closed.code, closed.reason], [4401, "Unauthorized"], "close code/reason after an unparsable frame");
  step(`unparsable frame -> close ${closed.code} ${JSON.stringify(closed.reason)}`);

  // fresh socket, the unparsable frame as the very first frame
  const bad2 = await RawClient.open(HEARTH_URL(), { label: "raw-ff-first" });
  bad2.send(Uint8Array.of(0xff));
  const closed2 = await bad2.waitClosed(5000, "socket closed after ff as first frame");
  assertEq([closed2.code, closed2.reason], [4401, "Unauthorized"], "close code/reason after ff as the first frame");
  raw.close();
});
