#!/usr/bin/env node
// A tiny static server for the editor demo: serves public/ and the bundle in dist/ (built by
// `npm run build`). Only flat file names are served (no directories, no dot files), so a request
// can never leave those two folders. Usage: node server.mjs [--port 8080] [--host 127.0.0.1]
// (--port 0 picks a free port). Prints `listening on http://HOST:PORT/` once it listens.
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { dirname, extname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const ROOTS = [join(here, "public"), join(here, "dist")];
const MAX_URL = 2048;
const NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;
const TYPES = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".map": "application/json; charset=utf-8",
};

function parseArgs(argv) {
  const opts = { port: 8080, host: "127.0.0.1" };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split("=", 2);
    const value = inline ?? argv[++i];
    if (flag === "--port") {
      const port = Number(value);
      if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`--port: not a port: ${value}`);
      opts.port = port;
    } else if (flag === "--host") {
      if (!value) fail("--host: missing value");
      opts.host = value;
    } else {
      fail(`unknown argument: ${argv[i]} (usage: node server.mjs [--port P] [--host H])`);
    }
  }
  return opts;
}

function fail(message) {
  console.error(`editor demo server: ${message}`);
  process.exit(2);
}

/** The file a request path names, or null: `/` is index.html, otherwise one flat file name. */
function fileName(rawUrl) {
  if (typeof rawUrl !== "string" || rawUrl.length > MAX_URL) return null;
  const path = rawUrl.split("?", 1)[0];
  if (path === "/") return "index.html";
  let name;
  try {
    name = decodeURIComponent(path.slice(1));
  } catch {
    return null;
  }
  return NAME.test(name) && TYPES[extname(name)] ? name : null;
}

async function serve(req, res) {
  if (req.method !== "GET" && req.method !== "HEAD") {
    res.writeHead(405, { allow: "GET, HEAD" }).end();
    return;
  }
  const name = fileName(req.url);
  if (name) {
    for (const root of ROOTS) {
      let body;
      try {
        body = await readFile(join(root, name));
      } catch {
        continue;
      }
      res.writeHead(200, {
        "content-type": TYPES[extname(name)],
        "content-length": body.length,
        "cache-control": "no-store",
        "x-content-type-options": "nosniff",
      });
      res.end(req.method === "HEAD" ? undefined : body);
      return;
    }
  }
  const hint = name === "editor.js" ? " (run `npm run build` first)" : "";
  res.writeHead(404, { "content-type": "text/plain; charset=utf-8" }).end(`not found${hint}\n`);
}

const { port, host } = parseArgs(process.argv.slice(2));
const server = createServer((req, res) => {
  serve(req, res).catch(() => {
    if (!res.headersSent) res.writeHead(500);
    res.end();
  });
});
server.requestTimeout = 10_000;
server.headersTimeout = 5_000;
server.on("error", (e) => fail(e.message));
server.listen(port, host, () => {
  const addr = server.address();
  const shown = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  console.log(`listening on http://${shown}:${addr.port}/`);
});
for (const sig of ["SIGINT", "SIGTERM"]) process.on(sig, () => process.exit(0));
