// Slow authentication (checklist 6, 7; test behaviour: token "slow" = read-write after 500 ms):
//  * raw: Auth("slow") + step1 + update + awareness + stateless sent back-to-back; nothing is
//    answered before Authenticated (which takes >= ~500 ms); afterwards every queued frame takes
//    effect in order (step1 -> step1+step2, update -> SyncStatus 1 + broadcast, awareness ->
//    echo, stateless -> echo);
//  * a v4 provider with token "slow" that edits before its auth completes syncs correctly and
//    its early edit reaches a peer.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitFor,
  assert,
  assertEq,
  RawClient,
  HEARTH_URL,
  enc,
  Y,
  docWithText,
  textOfUpdate,
  eventsOf,
} from "./lib.mjs";

scenario("slow-auth", async () => {
  const name = docName("slow");
  const peer = v4Provider({ name });
  await waitSynced(peer, 5000, "peer");
  peer.text.insert(0, "P");
  await waitFor(() => !peer.hasUnsyncedChanges, 5000, "peer edit acked");

  const raw = await RawClient.open(HEARTH_URL(), { label: "raw-slow" });
  const sentAt = Date.now();
  raw.send(enc.auth(name, "slow", "4.8.0"));
  raw.send(enc.step1(name, new Uint8Array([0])));
  raw.send(enc.update(name, Y.encodeStateAsUpdate(docWithText("R"))));
  raw.send(enc.awareness(name, [{ clientID: 9001, clock: 1, state: { user: "slow" } }]));
  raw.send(enc.stateless(name, "echo:after-auth"));

  const authd = await raw.waitFrame((f) => f.kind === "authenticated", 5000, "Authenticated for the slow token");
  const authMs = authd.t - sentAt;
  assert(raw.frames[0] === authd, `nothing answered before Authenticated: ${raw.describe()}`);
  assert(authMs >= 400, `Authenticated only after the 500 ms auth delay (got it after ${authMs} ms)`);
  assertEq(authd.scope, "read-write", "slow token scope");
  step(`raw: Authenticated after ${authMs} ms, nothing before it`);

  await raw.waitFrame((f) => f.kind === "stateless", 5000, "stateless echo (last queued frame)");
  await raw.waitFrame((f) => f.kind === "update", 5000, "broadcast of the queued update");
  await raw.waitFrame((f) => f.kind === "awareness" && f.entries.some((e) => e.clientID === 9001), 5000, "echo of the queued awareness");
  await raw.waitFrame((f) => f.kind === "syncStatus", 5000, "SyncStatus for the queued update");
  const idx = (pred) => raw.frames.findIndex(pred);
  const i1 = idx((f) => f.kind === "step1");
  const i2 = idx((f) => f.kind === "step2");
  const iS = idx((f) => f.kind === "syncStatus");
  const iE = idx((f) => f.kind === "stateless");
  // (SyncStatus may come after later frames' answers: Hearth acks after the durable commit.)
  assert(i1 > 0 && i1 < i2 && i2 < iE && i2 < iS, `queued frames answered in order: step1 < step2 < {SyncStatus, stateless echo}: ${raw.describe()}`);
  assertEq(textOfUpdate(raw.frames[i2].payload), "P", "step2 answers the queued step1 before the queued update was applied");
  assertEq(raw.frames.filter((f) => f.kind === "syncStatus").map((f) => f.status), [1], "one SyncStatus(1) for the queued update");
  assertEq(eventsOf(peer, "stateless").length, 0, "stateless echo went to the sender only");
  await waitFor(() => peer.text.toString().includes("R"), 5000, "queued update reached the peer", () => peer.text.toString());
  await waitFor(() => peer.awareness.getStates().get(9001)?.user === "slow", 5000, "queued awareness reached the peer");
  raw.assertBinaryOnly();
  raw.close();
  step("raw: queued frames took effect in order after auth");

  // real provider with the slow token, editing before auth completes
  const slow = v4Provider({ name, token: "slow", attach: false });
  let editedAt = 0;
  slow.on("open", () =>
    setTimeout(() => {
      slow.text.insert(0, "early:");
      editedAt = Date.now();
    }, 50),
  );
  slow.attach();
  await waitFor(() => eventsOf(slow, "authenticated").length > 0, 5000, "slow provider authenticated");
  assert(editedAt > 0 && editedAt < eventsOf(slow, "authenticated")[0].t, "the provider's edit was sent before its auth completed");
  await waitSynced(slow, 5000, "slow provider");
  await waitFor(
    () => slow.text.toString() === peer.text.toString() && peer.text.toString().includes("early:") && slow.text.toString().includes("P"),
    5000,
    "slow provider's pre-auth edit reached the peer and the provider got the document",
    () => `slow=${JSON.stringify(slow.text.toString())} peer=${JSON.stringify(peer.text.toString())}`,
  );
  step("slow provider synced; its pre-auth edit took effect");
});
