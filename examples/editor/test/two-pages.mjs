// Drives the editor demo in a real Chromium (playwright-core): two users, Alice and Bob, each in
// a page of their own, on one document of a Hearth cluster, while the cluster's owner of that
// document is killed. The test runner (cluster-tests/tests/browser_editor.rs) starts the
// cluster and the demo server, and talks with this script over a line protocol:
//
//   script → runner (stdout)   runner → script (stdin)
//   ALICE-CONNECTED            OPEN-BOB            (the runner noted where Alice landed)
//   READY                      KILLED <a|b|none>   (the runner killed the owner; which page
//                                                   was on the killed node)
//   FINAL <json text>          DONE                (the runner compared what the cluster
//                                                   serves; the script then exits 0)
//
// Steps: Alice connects, then Bob (through the balancer, so on another node); each types a
// line; both editors show the same text and each other's caret. After the kill both type
// again while the owner is down, the page on the killed node reconnects (its connection
// count goes up), the other stays or becomes connected, both type once more, and both end
// with the same text holding every line exactly once, everything acknowledged, and each
// other's caret shown again.
//
// Env: EDITOR_URL (the demo's http:// base), HEARTH_URL (ws:// URL of the balancer), DOC,
// CHROMIUM (default /usr/bin/chromium), ARTIFACTS (a directory for screenshots on failure),
// TOKEN (the pages' `token`, default none), SCRIPT_TIMEOUT_MS (default 240000).
// Every wait is bounded; on failure the script prints both pages' state, their console output
// and text, saves screenshots to ARTIFACTS and exits 1.
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const START = Date.now();
const env = (name, fallback) => {
  const v = process.env[name];
  if (v === undefined || v === "") {
    if (fallback !== undefined) return fallback;
    console.error(`environment variable ${name} is not set`);
    process.exit(2);
  }
  return v;
};
const EDITOR_URL = env("EDITOR_URL");
const HEARTH_URL = env("HEARTH_URL");
const DOC = env("DOC");
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");
const ARTIFACTS = env("ARTIFACTS", "");
const TOKEN = env("TOKEN", "");
const SCRIPT_TIMEOUT_MS = Number(env("SCRIPT_TIMEOUT_MS", "240000"));

// Generous bounds: Chromium is slow on a small shared machine.
const LOAD_MS = 60_000;
const CONVERGE_MS = 30_000;
const RECONNECT_MS = 45_000;
const COMMAND_MS = 60_000;
const TYPE_DELAY_MS = 15;

const step = (msg) => console.log(`[${String(Date.now() - START).padStart(6)} ms] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

let browser;
const pages = {}; // label → { page, name, log: [] }
let failing = false;

async function fail(msg, err) {
  if (failing) return;
  failing = true;
  console.log(`\nFAIL: ${msg}`);
  if (err && err.stack) console.log(err.stack);
  for (const [label, p] of Object.entries(pages)) {
    console.log(`\n--- page ${label} (${p.name}) ---`);
    try {
      console.log(`state: ${JSON.stringify(await withTimeout(readState(p.page), 5000, "state"))}`);
      const body = await withTimeout(p.page.innerText("body"), 5000, "page text");
      console.log(`page text:\n${body}`);
    } catch (e) {
      console.log(`(could not read the page: ${e.message})`);
    }
    console.log(`console (last ${Math.min(p.log.length, 40)} of ${p.log.length}):`);
    for (const line of p.log.slice(-40)) console.log(`  ${line}`);
    if (ARTIFACTS) {
      const file = join(ARTIFACTS, `${label}-${p.name}.png`);
      try {
        mkdirSync(ARTIFACTS, { recursive: true });
        await withTimeout(p.page.screenshot({ path: file, fullPage: true }), 10_000, "screenshot");
        console.log(`screenshot: ${file}`);
      } catch (e) {
        console.log(`(no screenshot: ${e.message})`);
      }
    }
  }
  try {
    await withTimeout(browser?.close(), 10_000, "closing the browser");
  } catch {
    // the process exits anyway
  }
  process.exit(1);
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

process.on("unhandledRejection", (e) => fail("unhandled rejection", e));
process.on("uncaughtException", (e) => fail("uncaught exception", e));
setTimeout(() => fail(`the script ran longer than ${SCRIPT_TIMEOUT_MS} ms`), SCRIPT_TIMEOUT_MS).unref();

// --- the runner's commands -------------------------------------------------------------------

const lines = createInterface({ input: process.stdin });
const queued = [];
let waiter = null;
lines.on("close", () => fail("the runner closed this script's input"));
lines.on("line", (line) => {
  if (waiter) {
    const w = waiter;
    waiter = null;
    w(line.trim());
  } else {
    queued.push(line.trim());
  }
});

/** Announces `what` to the runner and waits (bounded) for its answer starting with `expect`. */
async function handshake(what, expect) {
  console.log(what);
  const line =
    queued.shift() ??
    (await withTimeout(new Promise((r) => (waiter = r)), COMMAND_MS, `the runner's ${expect}`));
  if (!line.startsWith(expect)) throw new Error(`expected ${expect} from the runner, got ${JSON.stringify(line)}`);
  return line.slice(expect.length).trim();
}

// --- reading a page ----------------------------------------------------------------------------

/** What a page shows: connection and sync status, the document text, carets and presence. */
function readState(page) {
  return page.evaluate(() => {
    const pm = document.querySelector("#editor .ProseMirror");
    let text = null;
    if (pm) {
      // the document's text, one line per block, without the remote carets' name labels
      const copy = pm.cloneNode(true);
      copy.querySelectorAll(".collaboration-carets__caret").forEach((e) => e.remove());
      text = [...copy.children].map((block) => block.textContent).join("\n");
    }
    const status = document.getElementById("status");
    const sync = document.getElementById("sync");
    return {
      status: status?.dataset.status ?? null,
      connections: Number(status?.dataset.connections ?? 0),
      synced: sync?.dataset.synced === "true",
      sync: sync?.textContent ?? null,
      text,
      carets: [...document.querySelectorAll("#editor .collaboration-carets__label")].map((e) => e.textContent),
      users: [...document.querySelectorAll("#users li")].map((e) => e.textContent),
      error: document.getElementById("error")?.hidden === false ? document.getElementById("error").textContent : null,
    };
  });
}

/** Polls the pages until `pred(states)` holds; throws with the last states after `ms`. */
async function waitUntil(what, ms, pred) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    const states = {};
    for (const [label, p] of Object.entries(pages)) states[label] = await withTimeout(readState(p.page), 10_000, "state");
    last = states;
    if (pred(states)) return states;
    if (Date.now() > deadline) {
      throw new Error(`${what}: not within ${ms} ms; last states:\n${JSON.stringify(last, null, 2)}`);
    }
    await sleep(150);
  }
}

const ready = (s) => s.status === "connected" && s.synced;
const has = (s, line) => s.text !== null && s.text.split("\n").includes(line);
const seesCaret = (s, name) => s.carets.includes(name);

// --- acting --------------------------------------------------------------------------------------

async function open(label, name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  const page = await context.newPage();
  const entry = { page, name, log: [] };
  pages[label] = entry;
  const note = (line) => {
    entry.log.push(line);
    if (entry.log.length > 500) entry.log.shift();
  };
  page.on("console", (m) => note(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => note(`page error: ${e.message}`));
  page.setDefaultTimeout(LOAD_MS);
  const query = new URLSearchParams({ url: HEARTH_URL, doc: DOC, name });
  if (TOKEN) query.set("token", TOKEN);
  await page.goto(`${EDITOR_URL}?${query}`, { timeout: LOAD_MS });
  await page.locator("#editor .ProseMirror").waitFor({ timeout: LOAD_MS });
  return page;
}

/** Types `line` as a new paragraph at the end of the document. */
async function typeLine(label, line) {
  const { page } = pages[label];
  await page.locator("#editor .ProseMirror").click();
  await page.keyboard.press("Control+End");
  const s = await readState(page);
  if (s.text !== null && s.text.trim() !== "") await page.keyboard.press("Enter");
  await page.keyboard.type(line, { delay: TYPE_DELAY_MS });
  step(`${pages[label].name} typed ${JSON.stringify(line)} (page: ${s.status}, sync ${JSON.stringify(s.sync)})`);
}

/** Waits until both pages show every line of `lines` exactly once and the same text. */
function converged(expected) {
  return ({ a, b }) =>
    a.text === b.text &&
    expected.every((line) => a.text.split("\n").filter((l) => l === line).length === 1);
}

// --- the scenario ----------------------------------------------------------------------------------

async function main() {
  step(`launching ${CHROMIUM}`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"], timeout: LOAD_MS });
  step(`chromium ${browser.version()}; editor ${EDITOR_URL}, Hearth ${HEARTH_URL}, document ${DOC}`);

  await open("a", "Alice");
  await waitUntil("Alice connected and synced", LOAD_MS, ({ a }) => ready(a));
  step("Alice connected");
  await handshake("ALICE-CONNECTED", "OPEN-BOB");

  await open("b", "Bob");
  await waitUntil("Bob connected and synced", LOAD_MS, ({ b }) => ready(b));
  step("Bob connected");

  const before = ["Alice wrote this before the kill.", "Bob wrote this before the kill."];
  await typeLine("a", before[0]);
  await waitUntil("Bob sees Alice's line", CONVERGE_MS, ({ b }) => has(b, before[0]));
  await typeLine("b", before[1]);
  let s = await waitUntil(
    "both editors show both lines, everything saved, and each other's caret",
    CONVERGE_MS,
    (st) => converged(before)(st) && ready(st.a) && ready(st.b) && seesCaret(st.a, "Bob") && seesCaret(st.b, "Alice"),
  );
  step(`converged before the kill: ${JSON.stringify(s.a.text)}; Alice sees carets ${JSON.stringify(s.a.carets)}, Bob ${JSON.stringify(s.b.carets)}`);
  if (!s.a.users.some((u) => u.startsWith("Bob")) || !s.b.users.some((u) => u.startsWith("Alice"))) {
    throw new Error(`presence lists lack the other user: Alice ${JSON.stringify(s.a.users)}, Bob ${JSON.stringify(s.b.users)}`);
  }
  const connectionsBefore = { a: s.a.connections, b: s.b.connections };

  const killed = await handshake("READY", "KILLED");
  if (!["a", "b", "none"].includes(killed)) throw new Error(`KILLED names no page: ${killed}`);
  step(`the runner killed the owner (page on it: ${killed})`);

  // Both type while the owner is down (the page on the killed node is offline or about to be).
  const during = ["Alice typed this while the owner was down.", "Bob typed this while the owner was down."];
  await typeLine("a", during[0]);
  await typeLine("b", during[1]);

  s = await waitUntil("both pages connected and synced again", RECONNECT_MS, (st) => {
    const back = killed === "none" || st[killed].connections > connectionsBefore[killed];
    return back && ready(st.a) && ready(st.b);
  });
  step(`reconnected: Alice ${s.a.status} (connection ${s.a.connections}), Bob ${s.b.status} (connection ${s.b.connections})`);

  const after = ["Alice typed this after reconnecting.", "Bob typed this after reconnecting."];
  await typeLine("a", after[0]);
  await waitUntil("Bob sees Alice's new line", CONVERGE_MS, ({ b }) => has(b, after[0]));
  await typeLine("b", after[1]);
  const all = [...before, ...during, ...after];
  s = await waitUntil(
    "both editors show every line once, the same text, everything saved, and each other's caret",
    CONVERGE_MS,
    (st) => converged(all)(st) && ready(st.a) && ready(st.b) && seesCaret(st.a, "Bob") && seesCaret(st.b, "Alice"),
  );
  step(`converged after the kill:\n${s.a.text}`);
  await handshake(`FINAL ${JSON.stringify(s.a.text)}`, "DONE");
  await withTimeout(browser.close(), 20_000, "closing the browser");
  process.exit(0);
}

main().catch((e) => fail(e.message, e));
