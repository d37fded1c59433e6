// Persistence across reconnect within one server (checklist 28):
//  * edit, provider destroyed (its socket too), wait UNLOAD_WAIT_MS (default 1000) for the store
//    + unload, then a new provider on a new socket gets the content;
//  * the test behaviour "loads" (stateless; reply "loads:N" = number of onLoadDocument runs for
//    this document since server start) proves the document really was unloaded and loaded
//    again from storage (N goes 1 -> 2), so this can't pass on an in-memory copy.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitText,
  waitFor,
  assertEq,
  eventsOf,
  sleep,
  envInt,
} from "./lib.mjs";

const UNLOAD_WAIT_MS = envInt("UNLOAD_WAIT_MS", 1000);

async function loads(p) {
  const before = eventsOf(p, "stateless").length;
  p.sendStateless("loads");
  const ev = await waitFor(
    () => eventsOf(p, "stateless").slice(before).find((e) => e.data.payload.startsWith("loads:")),
    5000,
    "reply to the 'loads' stateless",
  );
  return ev.data.payload;
}

scenario("persistence", async () => {
  const name = docName("persist");
  const p1 = v4Provider({ name });
  await waitSynced(p1, 5000, "P1");
  assertEq(await loads(p1), "loads:1", "first load of a new document");
  p1.text.insert(0, "persist me");
  p1.document.getMap("m").set("k", 42);
  await waitFor(() => !p1.hasUnsyncedChanges, 5000, "edit acknowledged before disconnecting");
  p1.destroy();
  p1.socket.destroy();
  step(`P1 destroyed; waiting ${UNLOAD_WAIT_MS} ms for store + unload`);
  await sleep(UNLOAD_WAIT_MS);

  const p2 = v4Provider({ name });
  await waitSynced(p2, 5000, "P2");
  await waitText([p2], "persist me", 5000, "content survives unload + reload");
  assertEq(p2.document.getMap("m").get("k"), 42, "map content survives");
  assertEq(await loads(p2), "loads:2", "document was unloaded and loaded again from storage (onLoadDocument ran twice)");
  step("reloaded from storage with the content");

  // a second round: edit on top of the stored state
  p2.text.insert(p2.text.length, " twice");
  await waitFor(() => !p2.hasUnsyncedChanges, 5000, "second edit acknowledged");
  p2.destroy();
  p2.socket.destroy();
  await sleep(UNLOAD_WAIT_MS);
  const p3 = v4Provider({ name });
  await waitSynced(p3, 5000, "P3");
  await waitText([p3], "persist me twice", 5000, "second edit persisted too");
  assertEq(await loads(p3), "loads:3", "third load");
});
