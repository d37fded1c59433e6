// provider.destroy() on one of two providers sharing a socket (checklist 14, 17):
//  * the server answers the CLOSE with A 07 "provider_initiated" (seen on the shared socket);
//  * a peer sees the destroyed provider's awareness removed;
//  * the socket stays open and the other provider keeps working;
//  * an immediate re-attach of the same name on the same socket authenticates and syncs afresh;
//  * raw: A 07 -> A 07 "provider_initiated", socket open, another address on it still answers.
import {
  scenario,
  step,
  docName,
  v4Provider,
  v4Socket,
  waitSynced,
  waitText,
  waitFor,
  never,
  assert,
  assertEq,
  rawAuthed,
  enc,
  describeFrame,
} from "./lib.mjs";

scenario("destroy-one", async () => {
  const d1 = docName("destroy-1");
  const d2 = docName("destroy-2");
  const s = v4Socket();
  const p1 = v4Provider({ socket: s, name: d1 });
  const p2 = v4Provider({ socket: s, name: d2 });
  const q1 = v4Provider({ name: d1 });
  const q2 = v4Provider({ name: d2 });
  for (const [p, l] of [[p1, "p1"], [p2, "p2"], [q1, "q1"], [q2, "q2"]]) await waitSynced(p, 5000, l);
  p1.text.insert(0, "one");
  await waitText([p1, q1], "one", 5000, "doc1 converges");
  p1.setAwarenessField("user", "p1");
  const p1Id = p1.document.clientID;
  await waitFor(() => q1.awareness.getStates().get(p1Id)?.user === "p1", 5000, "q1 sees p1's awareness");
  const ws0 = s.webSocket;

  const before = s.frames.length;
  p1.destroy();
  const closeFrame = await waitFor(
    () => s.frames.slice(before).find((f) => f.addr === d1 && f.kind === "close"),
    5000,
    `server replies ${JSON.stringify(d1)} 07 "provider_initiated" to the CLOSE`,
    () => s.frames.slice(before).map(describeFrame).join(" | "),
  );
  assertEq(closeFrame.reason, "provider_initiated", "CLOSE reason");
  await waitFor(() => !q1.awareness.getStates().has(p1Id), 5000, "q1 sees p1's awareness removed");
  step("destroy: CLOSE answered with provider_initiated, awareness removal relayed");

  p2.text.insert(0, "two");
  await waitText([p2, q2], "two", 5000, "p2's edit still reaches q2");
  q2.text.insert(3, "!");
  await waitText([p2, q2], "two!", 5000, "q2's edit still reaches p2");
  await waitFor(() => !p2.hasUnsyncedChanges, 5000, "p2's edit acknowledged");
  assert(s.webSocket === ws0 && ws0.readyState === 1, "shared socket still the same open WebSocket");
  assert(!s.events.some((e) => e.name === "socket.close"), "shared socket emitted no close");
  step("other provider on the shared socket keeps working");

  // re-attach the same name on the same socket right away
  const p1b = v4Provider({ socket: s, name: d1 });
  await waitSynced(p1b, 5000, "re-attached provider for doc1");
  await waitText([p1b], "one", 5000, "re-attached provider gets the content");
  p1b.text.insert(3, "+");
  await waitText([q1, p1b], "one+", 5000, "re-attached provider's edit reaches q1");
  step("re-attach after destroy works");

  // raw wire: CLOSE frame handling
  const raw = await rawAuthed(d1, "rw", { label: "raw" });
  raw.send(enc.auth(d2, "rw", "4.8.0"));
  await raw.waitFrame((f) => f.addr === d2 && f.kind === "authenticated", 5000, "raw: second address authenticated");
  const n = raw.frames.length;
  raw.send(enc.close(d1));
  const c = await raw.waitFrame((f) => f.addr === d1 && f.kind === "close", 5000, "raw: A 07 reply", n);
  assertEq(c.reason, "provider_initiated", "raw: CLOSE reply reason");
  raw.send(enc.step1(d2, new Uint8Array([0])));
  await raw.waitFrame((f) => f.addr === d2 && f.kind === "step2", 5000, "raw: other address on the same socket still answers step1", n);
  await never(() => raw.closed, 200, "raw socket closed after a document CLOSE");
  raw.assertBinaryOnly();
  raw.close();
  step("raw: CLOSE -> provider_initiated, socket stays open");
});
