// Streams INSERTS small text inserts into Y.Text "content" of DOC through the admin API
// (round-robin over HEARTH_ADMIN_URLS, one request each, as a backend writing text would)
// while CLIENTS real providers, spread over HEARTH_URLS, edit the same document (markers in
// Y.Array "edits"). Passes when every provider holds every insert and every marker, and all
// providers hold the same text.
//
// Env: HEARTH_URLS, HEARTH_ADMIN_URLS (comma-separated), HEARTH_ADMIN_TOKEN, DOC, INSERTS,
// CLIENTS.

import { scenario, step, env, envInt, waitFor, v4Socket, v4Provider, waitSynced, sleep } from "./lib.mjs";

const urls = env("HEARTH_URLS").split(",");
const admins = env("HEARTH_ADMIN_URLS").split(",");
const token = env("HEARTH_ADMIN_TOKEN");
const doc = env("DOC", "streamed");
const inserts = envInt("INSERTS", 2000);
const clients = envInt("CLIENTS", 20);
const editsEach = 10;

scenario("admin-stream", async () => {
  const providers = [];
  for (let i = 0; i < clients; i++) {
    const socket = v4Socket({ url: urls[i % urls.length] });
    providers.push(v4Provider({ socket, name: doc, token: "rw" }));
  }
  for (const [i, p] of providers.entries()) await waitSynced(p, 15000, `provider ${i}`);
  step(`${clients} providers synced over ${urls.length} nodes`);

  // providers edit while the API streams
  let editing = true;
  const editors = providers.map(async (p, i) => {
    for (let k = 0; k < editsEach && editing; k++) {
      p.document.getArray("edits").push([`p${i}-${k}`]);
      await sleep(50 + ((i * 7) % 40));
    }
  });

  const started = Date.now();
  for (let i = 0; i < inserts; i++) {
    const base = admins[i % admins.length];
    const res = await fetch(`${base}/v1/documents/${encodeURIComponent(doc)}/ops`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ ops: [{ op: "text.insert", type: "content", text: `<${i}>` }] }),
    });
    if (!res.ok) throw new Error(`insert ${i}: HTTP ${res.status} ${await res.text()}`);
  }
  editing = false;
  await Promise.all(editors);
  step(`${inserts} inserts acknowledged in ${Date.now() - started} ms`);

  const complete = (p) => {
    const text = p.document.getText("content").toString();
    const edits = p.document.getArray("edits").length;
    return text.split("<").length - 1 === inserts && edits === clients * editsEach;
  };
  await waitFor(() => providers.every(complete), 60000, "every provider holds every insert and edit", () =>
    providers.map((p, i) => `${i}: ${p.document.getText("content").toString().split("<").length - 1} inserts, ${p.document.getArray("edits").length} edits`).join("\n"),
  );
  const first = providers[0].document.getText("content").toString();
  for (const [i, p] of providers.entries()) {
    if (p.document.getText("content").toString() !== first) throw new Error(`provider ${i} diverged`);
  }
  for (let i = 0; i < inserts; i++) {
    if (!first.includes(`<${i}>`)) throw new Error(`insert ${i} missing`);
  }
  await waitFor(() => providers.every((p) => !p.hasUnsyncedChanges), 30000, "every provider edit acknowledged");
  step("converged");
  for (const p of providers) p.destroy();
}, { timeoutMs: 200000 });
