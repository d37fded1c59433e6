// Awareness relay (checklist 15, 16, 17):
//  * A sets a state (clock >= 1) -> B sees it and A receives the echo of its own entry;
//  * a joiner (real provider and raw client) receives the existing awareness snapshot right
//    after Authenticated, before step1/step2;
//  * A destroys its provider -> B sees A removed;
//  * D's socket disconnects (no goodbye) -> the server broadcasts [idD, lastClock, null] and
//    B drops D's state.
import {
  scenario,
  step,
  docName,
  v4Provider,
  v4Socket,
  waitSynced,
  waitFor,
  assert,
  assertEq,
  rawAuthed,
  describeFrame,
  enc,
} from "./lib.mjs";

scenario("awareness", async () => {
  const name = docName("aw");
  const a = v4Provider({ name });
  const b = v4Provider({ name });
  await waitSynced(a, 5000, "A");
  await waitSynced(b, 5000, "B");
  const aId = a.document.clientID;

  a.setAwarenessField("user", "alice");
  const aClock = a.awareness.meta.get(aId).clock;
  assert(aClock >= 1, `A's awareness clock >= 1 after setting a field (got ${aClock})`);

  await waitFor(
    () => b.awareness.getStates().get(aId)?.user === "alice",
    5000,
    "B sees A's awareness state {user:'alice'}",
    () => JSON.stringify([...b.awareness.getStates()]),
  );
  step("B sees A's state");
  await waitFor(
    () =>
      a.socket.frames.some(
        (f) => f.kind === "awareness" && f.addr === name && f.entries.some((e) => e.clientID === aId && e.clock === aClock && e.state?.user === "alice"),
      ),
    5000,
    "A receives the echo of its own awareness entry (same clock)",
    () => a.socket.frames.map(describeFrame).join(" | "),
  );
  step("A got its own awareness echo");

  // Joiner: real provider gets the snapshot
  const c = v4Provider({ name });
  await waitSynced(c, 5000, "joiner C");
  await waitFor(
    () => c.awareness.getStates().get(aId)?.user === "alice",
    5000,
    "joiner C receives the existing awareness snapshot (A's state)",
    () => JSON.stringify([...c.awareness.getStates()]),
  );

  // Joiner on the wire: Authenticated, Awareness snapshot, step1, step2 (in that order)
  const raw = await rawAuthed(name, "rw", { label: "raw joiner" });
  raw.send(enc.step1(name, new Uint8Array([0])));
  await raw.waitFrame((f) => f.kind === "step2", 5000, "step2 reply");
  const kinds = raw.framesFor(name).map((f) => f.kind);
  assertEq(kinds.slice(0, 4), ["authenticated", "awareness", "step1", "step2"], `raw joiner frame order (${raw.describe(name)})`);
  const snap = raw.framesFor(name)[1];
  assert(
    snap.entries.some((e) => e.clientID === aId && e.clock === aClock && e.state?.user === "alice"),
    `snapshot contains A's entry [${aId}, ${aClock}, {user:'alice'}]: ${describeFrame(snap)}`,
  );
  raw.assertBinaryOnly();
  step("raw joiner: Authenticated, Awareness snapshot, step1, step2");

  // A destroys its provider -> B sees A removed
  a.destroy();
  await waitFor(
    () => !b.awareness.getStates().has(aId),
    5000,
    "B drops A's awareness state after A.destroy()",
    () => JSON.stringify([...b.awareness.getStates()]),
  );
  step("B saw A's removal after destroy()");

  // D disconnects its socket without a goodbye -> server-generated removal with the same clock
  const dSocket = v4Socket();
  const d = v4Provider({ name, socket: dSocket });
  await waitSynced(d, 5000, "D");
  const dId = d.document.clientID;
  d.setAwarenessField("user", "dave");
  d.setAwarenessField("color", "red");
  const dClock = d.awareness.meta.get(dId).clock;
  await waitFor(() => b.awareness.getStates().get(dId)?.color === "red", 5000, "B sees D's state");
  await waitFor(
    () => raw.frames.some((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === dId && e.clock === dClock)),
    5000,
    "raw sees D's latest state",
  );
  const before = raw.frames.length;
  dSocket.disconnect();
  await waitFor(
    () => !b.awareness.getStates().has(dId),
    5000,
    "B drops D's awareness state after D's socket closed",
    () => JSON.stringify([...b.awareness.getStates()]),
  );
  const removal = await raw.waitFrame(
    (f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === dId && e.state === null),
    5000,
    "server broadcasts D's removal",
    before,
  );
  const entry = removal.entries.find((e) => e.clientID === dId);
  assertEq([entry.clientID, entry.clock, entry.json], [dId, dClock, "null"], "server-generated removal is [id, lastClock, \"null\"]");
  step("server broadcast D's removal with the same clock");
  raw.close();
});
