// Read-only scope (checklist 10, 11):
//  * token "ro" -> onAuthenticated scope "readonly" (wire: A 02 02 "readonly"), initial sync
//    completes (its step2 contains nothing new -> A 08 01 -> hasUnsyncedChanges false);
//  * its edits get SyncStatus 0, hasUnsyncedChanges stays true, never reach other providers
//    (nor a later joiner);
//  * its awareness is still relayed;
//  * raw: step1 answered with step1+step2; step2 with nothing new -> 08 01; update/step2 with
//    new content -> 08 00.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitText,
  waitFor,
  never,
  assert,
  assertEq,
  eventsOf,
  providerState,
  rawAuthed,
  enc,
  Y,
  docWithText,
} from "./lib.mjs";

scenario("read-only", async () => {
  const name = docName("ro");
  const w = v4Provider({ name });
  await waitSynced(w, 5000, "writer W");
  w.text.insert(0, "base");
  await waitFor(() => !w.hasUnsyncedChanges, 5000, "W's edit acknowledged");

  const r = v4Provider({ name, token: "ro" });
  await waitSynced(r, 5000, "read-only provider R (its nothing-new step2 must be acked with SyncStatus 1)");
  assertEq(eventsOf(r, "authenticated")[0]?.data?.scope, "readonly", "onAuthenticated scope");
  assertEq(r.authorizedScope, "readonly", "authorizedScope");
  const authFrame = r.socket.frames.find((f) => f.addr === name && f.kind === "authenticated");
  assertEq(authFrame?.scope, "readonly", "wire scope string (A 02 02 \"readonly\")");
  await waitText([r], "base", 5000, "R receives the document");
  step("R authenticated as readonly and synced");

  const statusBefore = r.socket.frames.filter((f) => f.kind === "syncStatus").length;
  r.text.insert(0, "X");
  await waitFor(
    () => r.socket.frames.filter((f) => f.kind === "syncStatus").length > statusBefore,
    5000,
    "R receives a SyncStatus for its edit",
  );
  const statuses = r.socket.frames.filter((f) => f.kind === "syncStatus").slice(statusBefore).map((f) => f.status);
  assertEq(statuses, [0], "SyncStatus for a read-only edit");
  await never(() => w.text.toString() !== "base", 500, "read-only edit reached W", () => w.text.toString());
  assert(r.hasUnsyncedChanges, `R keeps hasUnsyncedChanges=true (${providerState(r)})`);
  const j = v4Provider({ name });
  await waitSynced(j, 5000, "late joiner J");
  assertEq(j.text.toString(), "base", "late joiner does not see the read-only edit");
  step("read-only edit rejected (SyncStatus 0), not applied, not broadcast");

  // W's edits still reach R
  w.text.insert(4, "!");
  await waitFor(() => r.text.toString().includes("base!"), 5000, "W's later edit reaches R", () => r.text.toString());

  // awareness from a read-only connection is relayed
  r.setAwarenessField("user", "reader");
  await waitFor(
    () => w.awareness.getStates().get(r.document.clientID)?.user === "reader",
    5000,
    "W sees R's awareness",
  );
  step("read-only awareness relayed");

  // raw wire checks
  const raw = await rawAuthed(name, "ro", { label: "raw ro" });
  assertEq(raw.framesFor(name)[0].scope, "readonly", "raw: Authenticated scope");
  raw.send(enc.step1(name, new Uint8Array([0])));
  await raw.waitFrame((f) => f.kind === "step2", 5000, "raw: step2 reply to step1");
  const serverState = raw.frames.find((f) => f.kind === "step2").payload;
  assertEq(raw.framesFor(name).map((f) => f.kind).filter((k) => k !== "awareness"), ["authenticated", "step1", "step2"], "raw: read-only step1 answered with step1 then step2");

  const statusesFrom = () => raw.frames.filter((f) => f.kind === "syncStatus").map((f) => f.status);
  raw.send(enc.step2(name, new Uint8Array([0, 0])));
  await waitFor(() => statusesFrom().length >= 1, 5000, "raw: SyncStatus for empty step2", () => raw.describe());
  raw.send(enc.step2(name, serverState));
  await waitFor(() => statusesFrom().length >= 2, 5000, "raw: SyncStatus for contained step2", () => raw.describe());
  const fresh = Y.encodeStateAsUpdate(docWithText("new"));
  raw.send(enc.update(name, fresh));
  await waitFor(() => statusesFrom().length >= 3, 5000, "raw: SyncStatus for update with new content", () => raw.describe());
  raw.send(enc.step2(name, fresh));
  await waitFor(() => statusesFrom().length >= 4, 5000, "raw: SyncStatus for step2 with new content", () => raw.describe());
  assertEq(statusesFrom(), [1, 1, 0, 0], "raw read-only SyncStatus sequence: empty step2, contained step2, new update, new step2");
  await never(() => w.text.toString().includes("new"), 300, "raw read-only content reached W", () => w.text.toString());
  raw.assertBinaryOnly();
  raw.close();
  step("raw read-only SyncStatus semantics OK");
});
