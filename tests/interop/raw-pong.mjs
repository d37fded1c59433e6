// v4 Pong byte `0a` (single byte, no address) from a client (checklist 30).
// Hearth (optional app-level Ping enabled) must accept it as a keepalive: no close, the
// socket keeps serving its documents. The reference server does NOT accept it (it parses `0a`
// as a varString length and closes 4401) — run with PONG_EXPECT=close4401 against it.
//
// Env: PONG_EXPECT = "accept" (default, Hearth) | "close4401" (reference @hocuspocus/server)
import { scenario, step, docName, never, assertEq, rawAuthed, enc, env } from "./lib.mjs";

scenario("raw-pong", async () => {
  const mode = env("PONG_EXPECT", "accept");
  if (mode !== "accept" && mode !== "close4401") throw new Error(`bad PONG_EXPECT=${mode}`);
  const name = docName("pong");
  const raw = await rawAuthed(name, "rw", { label: "raw" });
  assertEq(raw.frames[0].kind, "authenticated", "authenticated");
  raw.send(enc.pong());
  if (mode === "close4401") {
    const c = await raw.waitClosed(3000, "reference closes the socket on a lone 0a");
    assertEq(c.code, 4401, "reference close code for 0a");
    step("reference behaviour: 0a -> close 4401");
    return;
  }
  await never(() => raw.closed, 500, "socket closed after a Pong (0a)", () => raw.describe());
  const n = raw.frames.length;
  raw.send(enc.pong());
  raw.send(enc.step1(name, new Uint8Array([0])));
  await raw.waitFrame((f) => f.kind === "step2", 3000, "document still answers step1 after Pong frames", n);
  await never(() => raw.closed, 300, "socket closed after a Pong (0a)", () => raw.describe());
  raw.assertBinaryOnly();
  step("0a accepted without a close");
  raw.close();
});
