// Hearth admin API from Node.js 20+ (built-in fetch, no npm packages).
//
//   HEARTH_ADMIN_URL=http://127.0.0.1:9465 HEARTH_ADMIN_TOKEN=... node admin.mjs [document]
//
// Optional: EVENT=name fires that custom event first; STREAM_COUNT=n (default 50).

const base = process.env.HEARTH_ADMIN_URL ?? "http://127.0.0.1:9465";
const token = process.env.HEARTH_ADMIN_TOKEN;
const name = process.argv[2] ?? "example-doc";
const count = Number(process.env.STREAM_COUNT ?? 50);
if (!token) fail("HEARTH_ADMIN_TOKEN is not set");

// Document names go into the path percent-encoded ("notes/2024" -> "notes%2F2024").
const doc = `/v1/documents/${encodeURIComponent(name)}`;

// One request; any non-2xx answer ends the script with the error code from the body.
async function call(method, path, body) {
  let res;
  try {
    res = await fetch(base + path, {
      method,
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    fail(`${method} ${path}: ${e.cause?.message ?? e.message}`);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    fail(`${method} ${path}: ${res.status} ${data?.error?.code ?? "?"}: ${data?.error?.message ?? ""}`);
  }
  return data;
}

function fail(message) {
  console.error(`error: ${message}`);
  process.exit(1);
}

// (a) Fire a custom event on the document's owner, if EVENT names one.
if (process.env.EVENT) {
  const { reply, reply_base64 } = await call("POST", `${doc}/events/${encodeURIComponent(process.env.EVENT)}`, {
    payload: { from: "admin.mjs" },
  });
  console.log("event reply:", reply !== undefined ? JSON.stringify(reply) : `(base64) ${reply_base64}`);
}

// (b) Stream text into root type "content", one small append per request, the way an assistant
// writes. Each answer comes once the edit is committed; open editors see the words arrive.
const words = "Hearth commits every edit before it answers, so each word below is already saved.".split(" ");
for (let i = 0; i < count; i++) {
  await call("POST", `${doc}/ops`, {
    ops: [{ op: "text.insert", type: "content", text: words[i % words.length] + " " }],
  });
}

// Tell the document's clients, on every node, with a stateless message.
await call("POST", `${doc}/broadcast`, { message: JSON.stringify({ kind: "assistant-done" }) });

// (c) Read it back as JSON, reading root "content" as text.
const read = await call("GET", `${doc}?include=json&types=content:text`);
console.log(JSON.stringify(read.json, null, 2));
