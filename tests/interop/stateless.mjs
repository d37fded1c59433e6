// Stateless round trip (checklist 20; test behaviours echo:/bcast:):
//  * "echo:X" -> only the sender receives "echo:X";
//  * "bcast:X" -> every connection of the document (sender included) receives "all:X";
//  * wire: both arrive as A 05 payload (type 5, never type 6);
//  * a Stateless frame sent before Auth completes is queued and answered after Authenticated.
import {
  scenario,
  step,
  docName,
  v4Provider,
  waitSynced,
  waitFor,
  never,
  assert,
  assertEq,
  eventsOf,
  RawClient,
  HEARTH_URL,
  enc,
} from "./lib.mjs";

scenario("stateless", async () => {
  const name = docName("stateless");
  const a = v4Provider({ name });
  const b = v4Provider({ name });
  await waitSynced(a, 5000, "A");
  await waitSynced(b, 5000, "B");
  const payloads = (p) => eventsOf(p, "stateless").map((e) => e.data.payload);

  a.sendStateless("echo:ping-1");
  await waitFor(() => payloads(a).includes("echo:ping-1"), 5000, "A receives echo:ping-1", () => JSON.stringify(payloads(a)));
  await never(() => payloads(b).length > 0, 300, "B received a stateless meant for A only", () => JSON.stringify(payloads(b)));
  step("echo delivered to the sender only");

  b.sendStateless("bcast:news");
  await waitFor(() => payloads(a).includes("all:news") && payloads(b).includes("all:news"), 5000, "A and B receive all:news", () => `A=${JSON.stringify(payloads(a))} B=${JSON.stringify(payloads(b))}`);
  step("broadcast delivered to all connections");

  // unicode payload round trip (varString = UTF-8 byte length)
  a.sendStateless("echo:héllo ✓ {\"json\":true}");
  await waitFor(() => payloads(a).includes("echo:héllo ✓ {\"json\":true}"), 5000, "unicode echo round trip", () => JSON.stringify(payloads(a)));

  // wire level: type 5 only, queued before auth
  const raw = await RawClient.open(HEARTH_URL(), { label: "raw" });
  raw.send(enc.auth(name, "rw", "4.8.0"));
  raw.send(enc.stateless(name, "echo:early"));
  const echo = await raw.waitFrame((f) => f.kind === "stateless", 5000, "raw: echo of a stateless sent right after Auth");
  assertEq(echo.payload, "echo:early", "raw: echo payload");
  assertEq(raw.frames[0].kind, "authenticated", "raw: Authenticated precedes the stateless answer");
  b.sendStateless("bcast:wire");
  const bc = await raw.waitFrame((f) => f.kind === "stateless" && f.payload === "all:wire", 5000, "raw: broadcast arrives as A 05 \"all:wire\"");
  assertEq([bc.addr, bc.type], [name, 5], "raw: broadcast frame address and type");
  assert(!raw.frames.some((f) => f.type === 6), "raw: no type 6 frame ever sent to a client");
  raw.assertBinaryOnly();
  raw.close();
  step("wire: stateless frames are A 05 payload, queued before auth");
});
