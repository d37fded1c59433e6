// Denied tokens (checklist 8, 9):
//  * a provider with token "bad" (and one with an unknown token) gets onAuthenticationFailed
//    with reason "permission-denied" (wire: A 02 01 "permission-denied"; nothing else for that
//    address);
//  * the shared socket stays open (no close/disconnect, same WebSocket object) and another
//    document multiplexed on it keeps syncing;
//  * retrying with a new Auth (new provider, token "rw") for the same address on the same socket
//    is evaluated again and succeeds (v4 behaviour).
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
  hasEvent,
  eventsOf,
  providerState,
  describeFrame,
  sleep,
} from "./lib.mjs";

scenario("bad-token", async () => {
  const badName = docName("bad");
  const unknownName = docName("unknown-token");
  const okName = docName("ok");

  // content in badName so the retry can be checked for a real sync
  const writer = v4Provider({ name: badName });
  await waitSynced(writer, 5000, "writer on the protected doc");
  writer.text.insert(0, "secret");

  const socket = v4Socket();
  const bad = v4Provider({ socket, name: badName, token: "bad" });
  const unknown = v4Provider({ socket, name: unknownName, token: "no-such-token" });
  const ok = v4Provider({ socket, name: okName });

  await waitFor(() => hasEvent(bad, "authenticationFailed"), 5000, "onAuthenticationFailed for token 'bad'", () => providerState(bad));
  assertEq(eventsOf(bad, "authenticationFailed")[0].data.reason, "permission-denied", "reason for token 'bad'");
  await waitFor(() => hasEvent(unknown, "authenticationFailed"), 5000, "onAuthenticationFailed for an unknown token", () => providerState(unknown));
  assertEq(eventsOf(unknown, "authenticationFailed")[0].data.reason, "permission-denied", "reason for an unknown token");
  assert(!bad.isAuthenticated && !hasEvent(bad, "authenticated"), "denied provider is not authenticated");
  step("both denied providers got onAuthenticationFailed('permission-denied')");

  await waitSynced(ok, 5000, "OK provider on the same socket");
  const ws0 = socket.webSocket;

  // the denied address must get exactly the PermissionDenied frame and nothing else
  await sleep(200);
  const badFrames = socket.frames.filter((f) => f.addr === badName);
  assertEq(
    badFrames.map((f) => `${f.kind}:${f.reason ?? ""}`),
    ["denied:permission-denied"],
    `frames for the denied address (${badFrames.map(describeFrame).join(" | ")})`,
  );

  // the other document on the same socket keeps syncing
  const peer = v4Provider({ name: okName });
  await waitSynced(peer, 5000, "peer on the OK doc");
  ok.text.insert(0, "still");
  await waitText([ok, peer], "still", 5000, "OK doc edit reaches a peer");
  peer.text.insert(5, " works");
  await waitText([ok, peer], "still works", 5000, "peer edit reaches the OK doc on the shared socket");
  await waitFor(() => !ok.hasUnsyncedChanges, 5000, "OK provider's edit acknowledged");
  step("other document on the shared socket keeps syncing");

  // retry on the same socket with a new Auth (v4: evaluated again)
  const retry = v4Provider({ socket, name: badName, token: "rw" });
  await waitSynced(retry, 5000, "retry provider (token rw) on the same socket");
  await waitText([retry], "secret", 5000, "retry provider receives the document content");
  retry.text.insert(6, "!");
  await waitText([writer, retry], "secret!", 5000, "retry provider's edit reaches the writer");
  step("retry with a new token on the same socket authenticated and synced");

  await never(() => socket.events.some((e) => e.name === "socket.close" || e.name === "socket.disconnect"), 300, "shared socket closed", () => JSON.stringify(socket.events.map((e) => e.name)));
  assert(socket.webSocket === ws0 && socket.webSocket.readyState === 1, "the shared socket is the same open WebSocket (no reconnect)");
});
