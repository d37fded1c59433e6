// Validate every scenario script against the reference @hocuspocus/server (reference-server.mjs).
// Each script gets a fresh reference server on a free loopback port, like the Rust driver
// (cluster-tests/tests/interop.rs) gives each script a fresh Hearth.
//
//   node run-against-reference.mjs [script ...]      (default: all scripts in scripts.json)
//
// Reference-specific settings (documented in README.md, "Discrepancies"):
//   * REF_TIMEOUT_MS=2000 (the reference has one `timeout` for the pre-auth deadline and idle);
//   * idle.mjs runs against a reference with its default 60 s timeout, because the reference
//     closes an idle provider after 2-4 s with a 2 s timeout (only app frames count as liveness
//     and providers renew awareness every 15 s);
//   * raw-pong.mjs runs with PONG_EXPECT=close4401 (the reference does not accept `0a`).
import { spawn } from "node:child_process";
import { readFileSync, mkdtempSync, existsSync, rmSync, openSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const all = JSON.parse(readFileSync(join(here, "scripts.json"), "utf8"));
const selected = process.argv.slice(2).length ? process.argv.slice(2) : all;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const PER_SCRIPT = {
  idle: { ref: { REF_TIMEOUT_MS: "60000" }, env: { IDLE_OBSERVE_MS: process.env.IDLE_OBSERVE_MS ?? "10000" } },
  "raw-pong": { env: { PONG_EXPECT: "close4401" } },
  "auth-timeout": { env: { AUTH_TIMEOUT_MS: "2000" } },
};

async function startReference(extraEnv) {
  const dir = mkdtempSync(join(tmpdir(), "hearth-ref-"));
  const ready = join(dir, "ready");
  const logFile = join(dir, "server.log");
  const fd = openSync(logFile, "w");
  const child = spawn(process.execPath, [join(here, "reference-server.mjs")], {
    env: { ...process.env, REF_PORT: "0", REF_TIMEOUT_MS: "2000", REF_READY_FILE: ready, ...extraEnv },
    stdio: ["ignore", fd, fd],
  });
  for (let i = 0; i < 200; i++) {
    if (existsSync(ready) && readFileSync(ready, "utf8").includes(":")) break;
    if (child.exitCode !== null) break;
    await sleep(25);
  }
  if (!existsSync(ready)) {
    child.kill("SIGKILL");
    throw new Error(`reference server did not become ready:\n${readFileSync(logFile, "utf8")}`);
  }
  return { child, addr: readFileSync(ready, "utf8").trim(), logFile, dir };
}

function runScript(name, env, timeoutMs) {
  return new Promise((resolve) => {
    const out = [];
    const child = spawn(process.execPath, [join(here, `${name}.mjs`)], { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.on("data", (d) => out.push(d));
    child.stderr.on("data", (d) => out.push(d));
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output: Buffer.concat(out).toString() });
    });
  });
}

const results = [];
for (const name of selected) {
  const cfg = PER_SCRIPT[name] ?? {};
  const ref = await startReference(cfg.ref ?? {});
  const t0 = Date.now();
  const r = await runScript(
    name,
    { HEARTH_URL: `ws://${ref.addr}`, HEARTH_YWS_URL: `ws://${ref.addr}/y`, ...(cfg.env ?? {}) },
    60000,
  );
  ref.child.kill("SIGTERM");
  await new Promise((res) => (ref.child.exitCode !== null ? res() : ref.child.once("exit", res)));
  const ok = r.code === 0;
  results.push({ name, ok, ms: Date.now() - t0 });
  console.log(`${ok ? "PASS" : "FAIL"} ${name} (${Date.now() - t0} ms)`);
  if (!ok || process.env.VERBOSE) {
    console.log(r.output.replace(/^/gm, "    | "));
    if (!ok) console.log(`    reference log:\n${readFileSync(ref.logFile, "utf8").replace(/^/gm, "    > ")}`);
  }
  rmSync(ref.dir, { recursive: true, force: true });
}
const failed = results.filter((r) => !r.ok);
console.log(`\n${results.length - failed.length}/${results.length} scripts passed against the reference server`);
process.exit(failed.length ? 1 : 0);
