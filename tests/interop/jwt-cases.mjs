// JWT answers as the real provider sees them. CASES is a JSON array of
// {label, url, doc, token, expect}: expect "read-write" / "readonly" (onAuthenticated's scope,
// then synced) or "denied" (onAuthenticationFailed with `reason`, "permission-denied" unless
// the case names another, never synced). Every case runs its own provider on its own socket.
import { scenario, step, env, waitFor, v4Socket, v4Provider, eventsOf, providerState } from "./lib.mjs";

const cases = JSON.parse(env("CASES"));

scenario("jwt-cases", async () => {
  for (const c of cases) {
    const socket = v4Socket({ url: c.url });
    const p = v4Provider({ socket, name: c.doc, token: c.token });
    if (c.expect === "denied") {
      await waitFor(() => eventsOf(p, "authenticationFailed").length > 0, 5000, `${c.label}: authenticationFailed`, () => providerState(p));
      const reason = eventsOf(p, "authenticationFailed")[0]?.data?.reason;
      if (reason !== (c.reason ?? "permission-denied")) throw new Error(`${c.label}: reason ${reason}`);
      if (p.isAuthenticated || eventsOf(p, "synced").length > 0) throw new Error(`${c.label}: synced after a denial`);
    } else {
      await waitFor(() => p.isAuthenticated && p.synced, 5000, `${c.label}: authenticated and synced`, () => providerState(p));
      const scope = eventsOf(p, "authenticated")[0]?.data?.scope;
      if (scope !== c.expect) throw new Error(`${c.label}: scope ${scope}, expected ${c.expect}`);
    }
    step(`${c.label}: ${c.expect}`);
    p.destroy();
    socket.destroy();
  }
});
