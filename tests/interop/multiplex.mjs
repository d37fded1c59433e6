// Multiplexing (checklist 12, 13):
//  * two documents on one HocuspocusProviderWebsocket sync independently, every inbound frame
//    carries one of the two names;
//  * sessionAwareness:true — two providers with the same document name on one socket both
//    authenticate and sync; every inbound frame carries the composite "name\0sessionId" address.
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
  describeFrame,
} from "./lib.mjs";

scenario("multiplex", async () => {
  const x = docName("mux-x");
  const y = docName("mux-y");
  const s = v4Socket();
  const px = v4Provider({ socket: s, name: x });
  const py = v4Provider({ socket: s, name: y });
  const qx = v4Provider({ name: x });
  const qy = v4Provider({ name: y });
  for (const [p, l] of [[px, "px"], [py, "py"], [qx, "qx"], [qy, "qy"]]) await waitSynced(p, 5000, l);
  step("two documents on one socket authenticated + synced");

  px.text.insert(0, "in-x");
  qy.text.insert(0, "in-y");
  await waitText([px, qx], "in-x", 5000, "doc X converges");
  await waitText([py, qy], "in-y", 5000, "doc Y converges");
  await never(() => px.text.toString() !== "in-x" || py.text.toString() !== "in-y", 300, "cross-document leak");
  py.text.insert(4, "+");
  await waitText([py, qy], "in-y+", 5000, "doc Y edit from the shared socket");
  await waitFor(() => !px.hasUnsyncedChanges && !py.hasUnsyncedChanges, 5000, "both shared-socket providers acked");
  const foreign = s.frames.filter((f) => f.addr !== x && f.addr !== y);
  assert(foreign.length === 0, `all frames on the shared socket carry one of the two names; foreign: ${foreign.map(describeFrame).join(" | ")}`);
  assert(s.frames.some((f) => f.addr === x) && s.frames.some((f) => f.addr === y), "frames for both names seen");
  step("documents multiplexed on one socket sync independently");

  // sessionAwareness: same name twice on one socket
  const z = docName("mux-z");
  const s2 = v4Socket();
  const a = v4Provider({ socket: s2, name: z, sessionAwareness: true });
  const b = v4Provider({ socket: s2, name: z, sessionAwareness: true });
  const plain = v4Provider({ name: z });
  await waitSynced(a, 5000, "session provider A");
  await waitSynced(b, 5000, "session provider B");
  await waitSynced(plain, 5000, "plain provider on another socket");
  a.text.insert(0, "A");
  await waitText([a, b, plain], "A", 5000, "session A's edit reaches session B and the plain provider");
  b.text.insert(1, "B");
  await waitText([a, b, plain], "AB", 5000, "session B's edit reaches session A and the plain provider");
  plain.text.insert(2, "P");
  await waitText([a, b, plain], "ABP", 5000, "plain provider's edit reaches both session providers");
  b.setAwarenessField("user", "bob");
  await waitFor(() => a.awareness.getStates().get(b.document.clientID)?.user === "bob", 5000, "session A sees session B's awareness");
  await waitFor(() => !a.hasUnsyncedChanges && !b.hasUnsyncedChanges, 5000, "session providers acked");
  const addrA = `${z}\0${a.sessionId}`;
  const addrB = `${z}\0${b.sessionId}`;
  const bad = s2.frames.filter((f) => f.addr !== addrA && f.addr !== addrB);
  assert(bad.length === 0, `every frame on the session socket carries name\\0sessionId; others: ${bad.map(describeFrame).join(" | ")}`);
  assert(s2.frames.some((f) => f.addr === addrA && f.kind === "authenticated"), "A authenticated on its composite address");
  assert(s2.frames.some((f) => f.addr === addrB && f.kind === "authenticated"), "B authenticated on its composite address");
  step("sessionAwareness providers with the same name on one socket both sync");
});
