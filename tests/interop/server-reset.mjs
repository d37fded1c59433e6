// Server-initiated document close (checklist 26; test behaviour: stateless "reset" closes all
// connections of the document):
//  * every provider of the document gets onClose({event:{code:1000, reason:"Reset Connection"}})
//    (wire: A 07 "Reset Connection");
//  * the sockets stay open; another document on the same socket is unaffected;
//  * the document content survives (a new provider gets it).
import {
  scenario,
  step,
  docName,
  v4Provider,
  v4Socket,
  waitSynced,
  waitText,
  waitFor,
  assert,
  assertEq,
  eventsOf,
  providerState,
  describeFrame,
} from "./lib.mjs";

scenario("server-reset", async () => {
  const name = docName("reset");
  const s = v4Socket();
  const a = v4Provider({ socket: s, name });
  const bystander = v4Provider({ socket: s, name: docName("reset-bystander") });
  const b = v4Provider({ name });
  for (const [p, l] of [[a, "A"], [b, "B"], [bystander, "bystander"]]) await waitSynced(p, 5000, l);
  a.text.insert(0, "keep me");
  await waitText([a, b], "keep me", 5000, "content before reset");
  await waitFor(() => !a.hasUnsyncedChanges, 5000, "edit acked");
  const ws0 = s.webSocket;

  a.sendStateless("reset");
  for (const [p, l] of [[a, "A"], [b, "B"]]) {
    await waitFor(() => eventsOf(p, "close").length > 0, 5000, `${l}: onClose after the server reset`, () => providerState(p));
    const ev = eventsOf(p, "close")[0].data.event;
    assertEq([ev.code, ev.reason], [1000, "Reset Connection"], `${l}: close event`);
  }
  const closeFrame = s.frames.find((f) => f.addr === name && f.kind === "close");
  assertEq(closeFrame?.reason, "Reset Connection", `wire: A 07 "Reset Connection" (${s.frames.map(describeFrame).join(" | ")})`);
  assert(!s.events.some((e) => e.name === "socket.close"), "socket not closed by a document reset");
  assert(s.webSocket === ws0 && ws0.readyState === 1, "same open WebSocket after the reset");
  assert(!eventsOf(bystander, "close").length, "bystander document on the same socket not closed");
  step("reset: both providers got onClose(1000, 'Reset Connection'); socket open");

  bystander.text.insert(0, "alive");
  await waitFor(() => !bystander.hasUnsyncedChanges, 5000, "bystander still syncs", () => providerState(bystander));

  const c = v4Provider({ name });
  await waitSynced(c, 5000, "new provider after reset");
  await waitText([c], "keep me", 5000, "content survives the reset");
});
