// Pre-auth deadline (checklist 19): a socket that never authenticates any document is closed
// with 4408 "Connection Timeout" after the configured auth timeout — regardless of traffic
// (it keeps sending frames for an address that never sends Auth; those are queued, never
// answered). A socket that sent a *denied* Auth has not authenticated either.
//
// Env: AUTH_TIMEOUT_MS = the server's configured pre-auth timeout (default 2000).
//   The close must happen no earlier than 0.9 x AUTH_TIMEOUT_MS - 100 ms and no later than
//   2 x AUTH_TIMEOUT_MS + 2000 ms after the socket opened (the reference checks on an interval
//   of `timeout`, so it closes between 1x and 2x).
import { scenario, step, docName, envInt, assert, assertEq, RawClient, HEARTH_URL, enc, sleep } from "./lib.mjs";

const AUTH_TIMEOUT_MS = envInt("AUTH_TIMEOUT_MS", 2000);

scenario(
  "auth-timeout",
  async () => {
    const name = docName("noauth");
    const lo = Math.max(0, AUTH_TIMEOUT_MS * 0.9 - 100);
    const hi = AUTH_TIMEOUT_MS * 2 + 2000;

    const silent = await RawClient.open(HEARTH_URL(), { label: "silent" });
    const chatty = await RawClient.open(HEARTH_URL(), { label: "chatty" });
    const denied = await RawClient.open(HEARTH_URL(), { label: "denied" });
    denied.send(enc.auth(`${name}-denied`, "bad", "4.8.0"));
    const chatter = setInterval(() => {
      if (chatty.ws.readyState === 1) {
        chatty.send(enc.step1(name, new Uint8Array([0])));
        chatty.send(enc.awareness(name, [{ clientID: 7, clock: 1 + Math.floor(Math.random() * 1000), state: {} }]));
      }
    }, 250);

    for (const c of [silent, chatty, denied]) {
      const closed = await c.waitClosed(hi + 1000, "socket closed by the pre-auth deadline");
      const after = closed.t - c.openedAt;
      step(`${c.label}: closed ${closed.code} ${JSON.stringify(closed.reason)} after ${after} ms`);
      assertEq([closed.code, closed.reason], [4408, "Connection Timeout"], `${c.label}: close code/reason`);
      assert(after >= lo, `${c.label}: closed too early (${after} ms < ${lo} ms)`);
      assert(after <= hi, `${c.label}: closed too late (${after} ms > ${hi} ms)`);
    }
    clearInterval(chatter);
    assert(!silent.frames.length, `silent socket received nothing: ${silent.describe()}`);
    assert(!chatty.frames.some((f) => f.addr === name), `unauthenticated address got no answer: ${chatty.describe()}`);
    assertEq(denied.frames.map((f) => f.kind), ["denied"], "denied socket only received PermissionDenied");
    await sleep(0);
  },
  { timeoutMs: Math.max(20000, AUTH_TIMEOUT_MS * 2 + 8000) },
);
