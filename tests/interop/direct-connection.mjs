// Server-side direct connection (checklist 29; test behaviour "direct:X" opens a direct
// connection to the same document, inserts X at index 0 of Y.Text "t", disconnects):
//  * the sender and another provider see the server-side insert (as a broadcast update,
//    A 00 02 — not a step2), hasUnsyncedChanges stays false, both stay connected;
//  * the change is persisted: a provider joining later (after everyone left and the document
//    was unloaded) still sees it.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitText,
  waitFor,
  assert,
  eventsOf,
  sleep,
  envInt,
} from "./lib.mjs";

const UNLOAD_WAIT_MS = envInt("UNLOAD_WAIT_MS", 1000);

scenario("direct-connection", async () => {
  const name = docName("direct");
  const a = v4Provider({ name });
  const b = v4Provider({ name });
  await waitSynced(a, 5000, "A");
  await waitSynced(b, 5000, "B");
  a.text.insert(0, "world");
  await waitText([a, b], "world", 5000, "initial content");
  await waitFor(() => !a.hasUnsyncedChanges, 5000, "initial edit acked");

  const n = a.socket.frames.length;
  a.sendStateless("direct:hello ");
  await waitText([a, b], "hello world", 5000, "server-side direct insert reaches both providers");
  assert(
    a.socket.frames.slice(n).some((f) => f.addr === name && f.kind === "update"),
    "direct change arrives as a broadcast update (A 00 02)",
  );
  assert(!a.hasUnsyncedChanges && !b.hasUnsyncedChanges, "server-originated change does not create unsynced changes");
  assert(!eventsOf(a, "close").length && !eventsOf(b, "close").length, "providers not closed by the direct connection");
  step("providers saw the direct-connection insert");

  a.text.insert(a.text.length, "!");
  await waitText([a, b], "hello world!", 5000, "providers still sync after the direct connection closed");

  a.destroy();
  b.destroy();
  await sleep(UNLOAD_WAIT_MS);
  const c = v4Provider({ name });
  await waitSynced(c, 5000, "C after everyone left");
  await waitText([c], "hello world!", 5000, "direct change persisted across unload");
  step("direct change persisted");
});
