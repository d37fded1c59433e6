// Reads the demo's settings from the query string: `url` (a ws:// or wss:// Hearth URL),
// `doc` (the document name), `name` and `color` (how this user appears to others), `token`
// (sent to the server's authentication, for servers that require one). Every value is bounded;
// a bad one falls back to its default and is reported in `error`.

/** Where a Hearth node listens by default (`hearth` with no settings). */
export const DEFAULT_URL = "ws://127.0.0.1:1234";
const DEFAULT_DOC = "demo";
const MAX_URL = 2048;
const MAX_DOC = 200;
const MAX_NAME = 40;
const MAX_TOKEN = 4096;
const PALETTE = ["#d9480f", "#1971c2", "#2f9e44", "#9c36b5", "#e8590c", "#0c8599", "#c2255c", "#5f3dc4"];

/** Picks a stable palette colour for a name. */
function colourFor(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

/**
 * Parses `search` (e.g. `?url=ws://host:1234&doc=notes&name=Alice`) into
 * `{ url, doc, name, color, token, error }`.
 */
export function readSettings(search) {
  const q = new URLSearchParams(search.length > 8192 ? "" : search);
  const errors = [];

  let url = q.get("url") ?? DEFAULT_URL;
  if (url.length > MAX_URL || !/^wss?:\/\/[^\s]+$/.test(url)) {
    errors.push(`url must be a ws:// or wss:// URL; using ${DEFAULT_URL}`);
    url = DEFAULT_URL;
  }

  let doc = q.get("doc") ?? DEFAULT_DOC;
  if (doc.length === 0 || doc.length > MAX_DOC) {
    errors.push(`doc must be 1 to ${MAX_DOC} characters; using ${DEFAULT_DOC}`);
    doc = DEFAULT_DOC;
  }

  let name = (q.get("name") ?? "").trim().slice(0, MAX_NAME);
  if (name.length === 0) name = `Guest ${Math.floor(1000 + Math.random() * 9000)}`;

  let color = q.get("color") ?? "";
  if (!/^#[0-9a-fA-F]{6}$/.test(color)) color = colourFor(name);

  let token = q.get("token") ?? "";
  if (token.length > MAX_TOKEN) {
    errors.push(`token must be at most ${MAX_TOKEN} characters; sending none`);
    token = "";
  }

  return { url, doc, name, color, token, error: errors.join("; ") };
}
