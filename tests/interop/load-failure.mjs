// Document load failure (checklist 25; test behaviour: names starting with "fail-load" fail
// onLoadDocument with reason "load-failed"):
//  * providers for "fail-load-1" get onAuthenticated THEN onAuthenticationFailed("load-failed");
//  * wire: exactly Authenticated "read-write" followed by PermissionDenied "load-failed", no sync
//    frames; the socket stays open and serves other documents; a new Auth for the same address
//    on the same socket is evaluated again (same pair).
import {
  scenario,
  step,
  docName,
  v4Provider,
  v4Socket,
  waitSynced,
  waitFor,
  never,
  assert,
  assertEq,
  eventsOf,
  providerState,
  rawAuthed,
  enc,
  sleep,
} from "./lib.mjs";

const NAME = "fail-load-1";

scenario("load-failure", async () => {
  const s = v4Socket();
  const p = v4Provider({ socket: s, name: NAME });
  const q = v4Provider({ name: NAME }); // concurrent second client on another socket
  const ok = v4Provider({ socket: s, name: docName("load-ok") });
  for (const [x, l] of [[p, "P"], [q, "Q"]]) {
    await waitFor(() => eventsOf(x, "authenticationFailed").length > 0, 5000, `${l}: onAuthenticationFailed`, () => providerState(x));
    const names = x.events.filter((e) => e.name === "authenticated" || e.name === "authenticationFailed").map((e) => e.name);
    assertEq(names, ["authenticated", "authenticationFailed"], `${l}: onAuthenticated then onAuthenticationFailed`);
    assertEq(eventsOf(x, "authenticationFailed")[0].data.reason, "load-failed", `${l}: failure reason`);
    assert(!x.synced, `${l}: never synced`);
  }
  await waitSynced(ok, 5000, "other document on the same socket");
  step("providers: onAuthenticated then onAuthenticationFailed('load-failed'); socket still serves other docs");

  const raw = await rawAuthed(NAME, "rw", { label: "raw" });
  raw.send(enc.step1(NAME, new Uint8Array([0])));
  await raw.waitFrame((f) => f.kind === "denied", 5000, "PermissionDenied after Authenticated");
  await sleep(200);
  const seq = raw.framesFor(NAME).map((f) => `${f.kind}:${f.scope ?? f.reason ?? ""}`);
  assertEq(seq, ["authenticated:read-write", "denied:load-failed"], "wire sequence for a failing load");
  step("wire: Authenticated \"read-write\" then PermissionDenied \"load-failed\"");

  // retry on the same socket: evaluated again
  const n = raw.frames.length;
  raw.send(enc.auth(NAME, "rw", "4.8.0"));
  await raw.waitFrame((f) => f.kind === "denied", 5000, "retry: PermissionDenied again", n);
  assertEq(raw.frames.slice(n).map((f) => `${f.kind}:${f.scope ?? f.reason ?? ""}`), ["authenticated:read-write", "denied:load-failed"], "retry wire sequence");

  // socket open, other documents still work
  const other = docName("load-ok-raw");
  raw.send(enc.auth(other, "rw", "4.8.0"));
  raw.send(enc.step1(other, new Uint8Array([0])));
  await raw.waitFrame((f) => f.addr === other && f.kind === "step2", 5000, "another address on the same socket syncs");
  await never(() => raw.closed, 200, "socket closed after a load failure");
  raw.assertBinaryOnly();
  raw.close();
});
