// Two v4 providers editing one Y.Text converge; a late joiner gets the full content;
// hasUnsyncedChanges goes back to false after edits (synced stays true); a provider with
// forceSyncInterval completes its forced sync cycles (checklist 3, 4, 5, 23).
import { scenario, step, docName, v4Provider, waitSynced, waitText, waitFor, assert, providerState } from "./lib.mjs";

scenario("convergence", async () => {
  const name = docName("conv");

  const a = v4Provider({ name });
  const b = v4Provider({ name });
  await waitSynced(a, 5000, "A");
  await waitSynced(b, 5000, "B");
  assert(a.authorizedScope === "read-write", `A scope is read-write (got ${a.authorizedScope})`);
  step("A and B authenticated + synced, hasUnsyncedChanges=false");

  a.text.insert(0, "hello");
  assert(a.hasUnsyncedChanges, "A has unsynced changes right after a local edit");
  await waitText([a, b], "hello", 5000, "A's edit reaches B");
  b.text.insert(5, " world");
  await waitText([a, b], "hello world", 5000, "B's edit reaches A");

  // concurrent edits from both sides
  for (let i = 0; i < 20; i++) {
    a.text.insert(0, "a");
    b.text.insert(b.text.length, "b");
  }
  const expected = `${"a".repeat(20)}hello world${"b".repeat(20)}`;
  await waitText([a, b], expected, 5000, "concurrent edits converge");
  await waitFor(
    () => !a.hasUnsyncedChanges && !b.hasUnsyncedChanges && a.synced && b.synced,
    5000,
    "hasUnsyncedChanges=false and synced=true on A and B after edits (every update acked with SyncStatus 1)",
    () => `A=${providerState(a)} B=${providerState(b)}`,
  );
  step("A and B converged, all edits acknowledged");

  const c = v4Provider({ name });
  await waitSynced(c, 5000, "late joiner C");
  await waitText([c], expected, 5000, "late joiner gets the full content");
  step("late joiner C has the full content");

  // forceSyncInterval: every cycle resets unsyncedChanges to 1 and sends step1; the server must
  // answer step1+step2 and ack the provider's step2, otherwise hasUnsyncedChanges sticks at true.
  const f = v4Provider({ name, forceSyncInterval: 300 });
  await waitSynced(f, 5000, "forceSync provider F");
  let cycles = 0;
  f.on("unsyncedChanges", ({ number }) => {
    if (number === 1) cycles += 1;
  });
  await waitFor(() => cycles >= 3, 5000, "3 forceSync cycles started", () => providerState(f));
  await waitFor(() => !f.hasUnsyncedChanges, 2000, "forceSync cycle completes (hasUnsyncedChanges=false)", () => providerState(f));
  c.text.insert(0, "!");
  await waitText([a, b, c, f], `!${expected}`, 5000, "edit after forceSync cycles reaches everyone");
});
