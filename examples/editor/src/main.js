// The editor demo: a TipTap editor on a Yjs document served by Hearth through the unchanged
// @hocuspocus/provider, with presence (names, colours, remote carets) and the connection and
// sync status. Settings come from the query string, see README.md.
import { HocuspocusProvider } from "@hocuspocus/provider";
import { Editor } from "@tiptap/core";
import Collaboration from "@tiptap/extension-collaboration";
import CollaborationCaret from "@tiptap/extension-collaboration-caret";
import StarterKit from "@tiptap/starter-kit";

import { readSettings } from "./settings.js";

const settings = readSettings(window.location.search);
const $ = (id) => document.getElementById(id);

$("doc-name").textContent = settings.doc;
$("server-url").textContent = settings.url;
$("user-name").textContent = settings.name;
$("user-name").style.color = settings.color;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}
if (settings.error) showError(settings.error);

const provider = new HocuspocusProvider({
  url: settings.url,
  name: settings.doc,
  // a server without authentication ignores it; Hearth with auth_tokens or JWT checks it
  token: settings.token || null,
  onAuthenticationFailed: ({ reason }) =>
    showError(`the server refused this document: ${reason || "permission denied"} (see ?token=)`),
});

const editor = new Editor({
  element: $("editor"),
  extensions: [
    // the Yjs document keeps the history; the editor's own undo stack would fight it
    StarterKit.configure({ undoRedo: false }),
    Collaboration.configure({ document: provider.document }),
    CollaborationCaret.configure({
      provider,
      user: { name: settings.name, color: settings.color },
    }),
  ],
  autofocus: "end",
});

// Connection status: connecting / connected / disconnected, and how often it was connected.
let connections = 0;
const statusEl = $("status");
function showStatus(status) {
  // the provider may report `connected` more than once per connection
  if (status === "connected" && statusEl.dataset.status !== "connected") connections += 1;
  statusEl.dataset.status = status;
  statusEl.dataset.connections = String(connections);
  statusEl.textContent =
    status === "connected" && connections > 1
      ? `connected (reconnected ${connections - 1}×)`
      : status;
  showSync();
}
provider.on("status", ({ status }) => showStatus(status));

// Sync status: the first handshake, then whether every local change was acknowledged (Hearth
// acknowledges an edit once it is stored).
const syncEl = $("sync");
function showSync() {
  const connected = statusEl.dataset.status === "connected";
  const pending = provider.unsyncedChanges;
  let text;
  if (!connected) text = pending > 0 ? `offline, ${pending} unsaved` : "offline";
  else if (!provider.isSynced) text = "syncing…";
  else if (pending > 0) text = `saving ${pending}…`;
  else text = "all changes saved";
  syncEl.dataset.synced = String(connected && provider.isSynced && pending === 0);
  syncEl.textContent = text;
}
provider.on("synced", showSync);
provider.on("unsyncedChanges", showSync);
provider.on("disconnect", showSync);

// Presence: everyone with a `user` in their awareness state, this tab first.
const usersEl = $("users");
function showUsers() {
  const own = provider.awareness.clientID;
  const states = [...provider.awareness.getStates().entries()]
    .filter(([, state]) => state && state.user && typeof state.user.name === "string")
    .sort(([a], [b]) => (a === own ? -1 : b === own ? 1 : a - b));
  usersEl.replaceChildren(
    ...states.map(([id, { user }]) => {
      const li = document.createElement("li");
      li.className = "user";
      li.dataset.self = String(id === own);
      const dot = document.createElement("span");
      dot.className = "dot";
      dot.style.backgroundColor = /^#[0-9a-fA-F]{6}$/.test(user.color) ? user.color : "#888888";
      li.append(dot, document.createTextNode(user.name.slice(0, 40) + (id === own ? " (you)" : "")));
      return li;
    }),
  );
}
provider.awareness.on("change", showUsers);

showStatus("connecting");
showUsers();

// for poking at from the developer console
window.hearth = { editor, provider };
