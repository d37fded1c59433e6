// Token expiry and token sync with the real provider (v4's sendToken()). SHORT is a token that
// ends a few seconds after the script starts, FRESH one that lasts. Provider K refreshes its
// token before SHORT ends (sendToken with FRESH): it stays authenticated past the end and
// nothing is refused. Provider L does not: it gets onAuthenticationFailed("permission-denied")
// when SHORT ends, then comes back on the same socket with FRESH (sendToken + startSync), is
// authenticated and synced again, and its edit reaches K.
import { scenario, step, env, waitFor, never, v4Socket, v4Provider, waitSynced, eventsOf, providerState } from "./lib.mjs";

const url = env("HEARTH_URL");
const doc = env("DOC");
const short = env("SHORT");
const fresh = env("FRESH");
const endsAt = Number(env("SHORT_ENDS_AT_MS"));

scenario("jwt-expiry", async () => {
  const tokens = { k: short, l: short };
  const k = v4Provider({ socket: v4Socket({ url }), name: doc, token: () => tokens.k });
  const l = v4Provider({ socket: v4Socket({ url }), name: doc, token: () => tokens.l });
  await waitSynced(k, 5000, "K");
  await waitSynced(l, 5000, "L");
  tokens.k = fresh;
  await k.sendToken();
  step("K sent a fresh token");
  await waitFor(() => eventsOf(l, "authenticationFailed").length > 0, Math.max(1000, endsAt - Date.now() + 4000),
    "L refused when its token ended", () => providerState(l));
  const reason = eventsOf(l, "authenticationFailed")[0]?.data?.reason;
  if (reason !== "permission-denied") throw new Error(`L: reason ${reason}`);
  step(`L refused ${Date.now() - endsAt} ms after its token's end`);
  await never(() => eventsOf(k, "authenticationFailed").length > 0 || eventsOf(k, "close").length > 0, 1500,
    "K refused or closed although it refreshed", () => providerState(k));
  tokens.l = fresh;
  await l.sendToken();
  l.startSync();
  await waitFor(() => l.isAuthenticated && l.synced, 5000, "L back with a fresh token", () => providerState(l));
  l.document.getText("t").insert(0, "back");
  await waitFor(() => k.document.getText("t").toString() === "back", 5000, "L's edit reaches K");
  step("L is back and its edit reached K");
  k.destroy();
  l.destroy();
}, { timeoutMs: 30000 });
