//! The extension API: a trait with one async method per lifecycle hook, mirroring Hocuspocus.
//!
//! Extensions are ordered by [`Extension::priority`] (higher first; ties keep registration
//! order). Each hook runs over the whole chain and is awaited; the first `Err` stops the chain
//! and decides the wire result exactly as a rejected Hocuspocus hook does:
//!
//! | hook | a rejection means |
//! |---|---|
//! | `on_connect`, `on_authenticate` | `PermissionDenied(reason)`; the address's state is reset, the socket stays open |
//! | `on_load_document` | `Authenticated` then `PermissionDenied(reason)`; nothing is stored |
//! | `before_handle_message` | the document connection is closed with `CLOSE(reason)` |
//! | `on_stateless`, `on_change`, `on_awareness_update`, store and unload hooks | logged; the document keeps working (`before_unload_document` cancels the unload) |
//!
//! [`HookError::skip`] stops the chain without failing (Hocuspocus's `SkipFurtherHooksError`).
//! Context returned by `on_connect`/`on_authenticate` (by mutating [`AuthPayload::context`])
//! reaches every later hook of that document connection.
//!
//! **Where hooks run:** connection hooks (`on_connect`, `on_authenticate`,
//! `before_handle_message`, `connected`) run in the socket's task; document hooks (`on_change`,
//! `on_stateless`, `on_awareness_update`, store, disconnect and unload hooks) run inside the
//! document's task, in order with its frames. A document hook must therefore not *await* work
//! on the same document (e.g. `open_direct_connection` for it): spawn that work instead.
//!
//! **API boundary:** hooks never receive a lock guard or the raw `yrs::Doc`; they get encoded
//! state and cheap handles that talk to the document's task through channels.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::request::RequestInfo;

/// Free-form context shared by every hook of one document connection (like Hocuspocus's
/// `context` object): set it in `on_connect`/`on_authenticate`, read it everywhere later.
pub type Context = serde_json::Map<String, serde_json::Value>;

/// Why a hook rejected. `reason` becomes the `PermissionDenied` text or the `CLOSE` reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct HookError {
    /// Text sent to the client (e.g. `"permission-denied"`, `"Forbidden"`).
    pub reason: String,
    /// When true, the chain stops but the outcome counts as success.
    pub skip: bool,
    /// When true, the refusal is not the client's fault (a backend that decides access is
    /// unreachable): it does not count towards the failed-authentication ban.
    pub unavailable: bool,
}

impl HookError {
    /// A rejection with this reason.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            skip: false,
            unavailable: false,
        }
    }

    /// A refusal because whatever decides access could not be asked (fail closed); it does
    /// not count towards the failed-authentication ban of the client's address.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            skip: false,
            unavailable: true,
        }
    }

    /// The default rejection (`"permission-denied"`), as a Hocuspocus hook throwing an error
    /// without a `reason`.
    pub fn permission_denied() -> Self {
        Self::reject("permission-denied")
    }

    /// The rejection Hocuspocus uses for a falsy rejection value: reason `"Forbidden"`.
    pub fn forbidden() -> Self {
        Self::reject("Forbidden")
    }

    /// Stop running later extensions for this hook, without failing it.
    pub fn skip() -> Self {
        Self {
            reason: String::new(),
            skip: true,
            unavailable: false,
        }
    }
}

/// Result type of every hook.
pub type HookResult = Result<(), HookError>;

/// Data given to `on_connect` and `on_authenticate`.
#[derive(Debug)]
pub struct AuthPayload<'a> {
    /// The document name (the address with any `\0session` suffix removed).
    pub document_name: &'a str,
    /// The token from the Auth frame (empty when the provider has none).
    pub token: &'a str,
    /// The provider version from the Auth frame (v4 providers only).
    pub provider_version: Option<&'a str>,
    /// The upgrade request (path, query, headers, remote address).
    pub request: &'a RequestInfo,
    /// Unique id of the socket (a server-generated UUID).
    pub socket_id: &'a str,
    /// Set to true to make this document connection read-only.
    pub read_only: bool,
    /// Merged into the connection's context; later hooks see it.
    pub context: Context,
    /// When the credentials end (a token's expiry): at that moment the document connection is
    /// refused with `PermissionDenied`, unless a token sync ([`Extension::on_token_sync`])
    /// extended it. `None`: no end. The earliest value set by the hooks wins.
    pub valid_until: Option<std::time::SystemTime>,
}

/// Data given to document-level hooks that have no single connection.
#[derive(Debug, Clone)]
pub struct DocumentPayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The context of the connection that caused the event, if any.
    pub context: Option<&'a Context>,
}

/// Data given to `on_load_document`.
#[derive(Debug)]
pub struct LoadPayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// Context of the connection whose arrival triggered the load.
    pub context: &'a Context,
    /// The state the built-in storage loaded (a v1 update; empty document = `None`).
    pub stored_state: Option<&'a [u8]>,
}

/// Data given to `on_change`.
#[derive(Debug)]
pub struct ChangePayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The update (v1) produced by the transaction.
    pub update: &'a [u8],
    /// Context of the originating connection (`None` for server-side changes without one).
    pub context: Option<&'a Context>,
    /// Socket id of the originating connection (`"server"` for direct connections).
    pub socket_id: Option<&'a str>,
}

/// Data given to `on_store_document` and `after_store_document`.
#[derive(Debug)]
pub struct StorePayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The whole document state (v1 update) being stored.
    pub state: &'a [u8],
    /// Context of the connection behind the latest change, if any.
    pub last_context: Option<&'a Context>,
    /// Number of connections (client + direct) at the time of the store.
    pub clients_count: usize,
}

/// Data given to `on_stateless`.
#[derive(Debug)]
pub struct StatelessPayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The payload string from the client.
    pub payload: &'a str,
    /// The sending connection; use it to reply.
    pub connection: &'a ConnectionRef,
    /// The document; use it to broadcast.
    pub document: &'a DocumentRef,
    /// The sender's context.
    pub context: &'a Context,
}

/// Data given to `on_awareness_update`.
#[derive(Debug)]
pub struct AwarenessPayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// Client ids that appeared.
    pub added: &'a [u64],
    /// Client ids whose state was renewed or changed.
    pub updated: &'a [u64],
    /// Client ids that were removed.
    pub removed: &'a [u64],
    /// Context of the connection that sent it (`None` for timeouts and disconnects).
    pub context: Option<&'a Context>,
}

/// Data given to `on_custom_event` (runs on the document's owner).
#[derive(Debug)]
pub struct CustomEventPayload<'a> {
    /// The document the event is about.
    pub document_name: &'a str,
    /// The event name.
    pub name: &'a str,
    /// Opaque payload from the caller.
    pub payload: &'a [u8],
}

/// Data given to `before_handle_message`.
#[derive(Debug)]
pub struct MessagePayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The raw frame as received (address included).
    pub frame: &'a [u8],
    /// The connection's context.
    pub context: &'a Context,
    /// The connection's socket id.
    pub socket_id: &'a str,
}

/// Data given to `on_disconnect`.
#[derive(Debug)]
pub struct DisconnectPayload<'a> {
    /// The document name.
    pub document_name: &'a str,
    /// The connection's context.
    pub context: &'a Context,
    /// The socket id (`"server"` for direct connections).
    pub socket_id: &'a str,
    /// Connections remaining on the document after this one left.
    pub clients_count: usize,
}

/// A cheap handle to one document connection, for replying from hooks.
#[derive(Clone, Debug)]
pub struct ConnectionRef {
    pub(crate) inner: Arc<dyn ConnectionOps>,
}

impl ConnectionRef {
    /// Sends a stateless message (`A 05 payload`) to this connection only.
    pub fn send_stateless(&self, payload: &str) {
        self.inner.send_stateless(payload);
    }

    /// Closes this document connection with `CLOSE(reason)`; the socket stays open.
    pub fn close(&self, reason: &str) {
        self.inner.close(reason);
    }

    /// Whether the connection is read-only.
    pub fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}

/// A cheap handle to a loaded document, for broadcasting from hooks.
#[derive(Clone, Debug)]
pub struct DocumentRef {
    pub(crate) inner: Arc<dyn DocumentOps>,
}

impl DocumentRef {
    /// Sends `A 05 payload` to every connection of the document.
    pub fn broadcast_stateless(&self, payload: &str) {
        self.inner.broadcast_stateless(payload);
    }

    /// Closes every connection of the document with `CLOSE("Reset Connection")`.
    pub fn close_connections(&self) {
        self.inner.close_connections();
    }

    /// The document's name.
    pub fn name(&self) -> &str {
        self.inner.name()
    }
}

/// Implemented by the socket task's handle (crate-internal seam).
pub(crate) trait ConnectionOps: Send + Sync + std::fmt::Debug {
    fn send_stateless(&self, payload: &str);
    fn close(&self, reason: &str);
    fn read_only(&self) -> bool;
}

/// Implemented by the document handle (crate-internal seam).
pub(crate) trait DocumentOps: Send + Sync + std::fmt::Debug {
    fn broadcast_stateless(&self, payload: &str);
    fn close_connections(&self);
    fn name(&self) -> &str;
}

/// An HTTP answer an `on_request` hook may give instead of the default.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// `Content-Type` header.
    pub content_type: String,
    /// Body bytes.
    pub body: Bytes,
}

/// A server extension. Every method has a no-op default; implement what you need.
#[async_trait]
pub trait Extension: Send + Sync + 'static {
    /// Name used in logs.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }

    /// Higher runs earlier (default 100, as in Hocuspocus).
    fn priority(&self) -> i32 {
        100
    }

    /// Once at start-up, before listening.
    async fn on_configure(&self, _config: &crate::config::Config) -> HookResult {
        Ok(())
    }

    /// Once the listener is bound.
    async fn on_listen(&self, _addr: SocketAddr) -> HookResult {
        Ok(())
    }

    /// A plain HTTP request on a path Hearth does not serve itself. Return `Some` to answer it.
    async fn on_request(&self, _request: &RequestInfo) -> Result<Option<HttpAnswer>, HookError> {
        Ok(None)
    }

    /// Before the WebSocket handshake; a rejection answers HTTP 403 and no socket is opened.
    async fn on_upgrade(&self, _request: &RequestInfo) -> HookResult {
        Ok(())
    }

    /// After the Auth frame arrives, before `on_authenticate`.
    async fn on_connect(&self, _payload: &mut AuthPayload<'_>) -> HookResult {
        Ok(())
    }

    /// Decides whether the token may open the document; may set `read_only` and `context`.
    async fn on_authenticate(&self, _payload: &mut AuthPayload<'_>) -> HookResult {
        Ok(())
    }

    /// A client sent a new token for a document connection that is already authenticated (the
    /// provider's `sendToken()`, Hocuspocus's `onTokenSync`). `payload` carries the new token,
    /// the connection's context, `read_only` as it is, and `valid_until` as it is; a hook may
    /// move `valid_until`. An error closes the document connection (`CLOSE "Unauthorized"`, or
    /// the error's reason), as Hocuspocus does; success sends nothing.
    async fn on_token_sync(&self, _payload: &mut AuthPayload<'_>) -> HookResult {
        Ok(())
    }

    /// Loads (or replaces) the document's content. Return `Some(update)` to apply a v1 update
    /// on top of what the built-in storage loaded.
    async fn on_load_document(
        &self,
        _payload: &LoadPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        Ok(None)
    }

    /// After the document is loaded, before the first connection is attached.
    async fn after_load_document(&self, _payload: &DocumentPayload<'_>) -> HookResult {
        Ok(())
    }

    /// After a document connection is fully set up (queued frames handed over).
    async fn connected(&self, _payload: &DocumentPayload<'_>) -> HookResult {
        Ok(())
    }

    /// Before each frame of an established document connection is handled.
    async fn before_handle_message(&self, _payload: &MessagePayload<'_>) -> HookResult {
        Ok(())
    }

    /// After every change of a loaded document, from any origin.
    async fn on_change(&self, _payload: &ChangePayload<'_>) -> HookResult {
        Ok(())
    }

    /// A stateless message from a client.
    async fn on_stateless(&self, _payload: &StatelessPayload<'_>) -> HookResult {
        Ok(())
    }

    /// After awareness states changed.
    async fn on_awareness_update(&self, _payload: &AwarenessPayload<'_>) -> HookResult {
        Ok(())
    }

    /// When the document is stored (compaction): debounced after changes, on unload, at
    /// shutdown. A rejection keeps the document in memory and the store is retried.
    async fn on_store_document(&self, _payload: &StorePayload<'_>) -> HookResult {
        Ok(())
    }

    /// After every successful store.
    async fn after_store_document(&self, _payload: &StorePayload<'_>) -> HookResult {
        Ok(())
    }

    /// A document connection closed.
    async fn on_disconnect(&self, _payload: &DisconnectPayload<'_>) -> HookResult {
        Ok(())
    }

    /// Before an idle document is unloaded; a rejection cancels the unload.
    async fn before_unload_document(&self, _payload: &DocumentPayload<'_>) -> HookResult {
        Ok(())
    }

    /// After a document was unloaded.
    async fn after_unload_document(&self, _payload: &DocumentPayload<'_>) -> HookResult {
        Ok(())
    }

    /// A custom event (`ServerHandle::emit`), run on the node that owns the document. Return
    /// `Some(reply)` to answer it; the first extension that answers wins.
    async fn on_custom_event(
        &self,
        _payload: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        Ok(None)
    }

    /// Once, at the end of a graceful shutdown.
    async fn on_destroy(&self) -> HookResult {
        Ok(())
    }
}

/// The ordered chain of extensions.
#[derive(Clone, Default)]
pub struct Extensions {
    list: Arc<Vec<Arc<dyn Extension>>>,
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|e| e.name()))
            .finish()
    }
}

/// Runs `$call` on every extension in order; stops at the first error (a `skip` error ends
/// the chain successfully).
macro_rules! run_chain {
    ($self:ident, $ext:ident => $call:expr) => {{
        for $ext in $self.list.iter() {
            match $call.await {
                Ok(()) => {}
                Err(e) if e.skip => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }};
}

impl Extensions {
    /// Builds the chain, sorted by priority (descending, stable).
    pub fn new(mut list: Vec<Arc<dyn Extension>>) -> Self {
        list.sort_by_key(|e| std::cmp::Reverse(e.priority()));
        Self {
            list: Arc::new(list),
        }
    }

    /// True when no extension is registered.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub(crate) async fn on_configure(&self, c: &crate::config::Config) -> HookResult {
        run_chain!(self, e => e.on_configure(c))
    }
    pub(crate) async fn on_listen(&self, a: SocketAddr) -> HookResult {
        run_chain!(self, e => e.on_listen(a))
    }
    pub(crate) async fn on_request(
        &self,
        r: &RequestInfo,
    ) -> Result<Option<HttpAnswer>, HookError> {
        for e in self.list.iter() {
            match e.on_request(r).await {
                Ok(Some(answer)) => return Ok(Some(answer)),
                Ok(None) => {}
                Err(err) if err.skip => break,
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }
    pub(crate) async fn on_upgrade(&self, r: &RequestInfo) -> HookResult {
        run_chain!(self, e => e.on_upgrade(r))
    }
    pub(crate) async fn on_connect(&self, p: &mut AuthPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_connect(p))
    }
    pub(crate) async fn on_authenticate(&self, p: &mut AuthPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_authenticate(p))
    }
    pub(crate) async fn on_token_sync(&self, p: &mut AuthPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_token_sync(p))
    }
    /// Runs every `on_load_document`; returns the updates the extensions produced, in order.
    pub(crate) async fn on_load_document(
        &self,
        p: &LoadPayload<'_>,
    ) -> Result<Vec<Vec<u8>>, HookError> {
        let mut out = Vec::new();
        for e in self.list.iter() {
            match e.on_load_document(p).await {
                Ok(Some(update)) => out.push(update),
                Ok(None) => {}
                Err(err) if err.skip => break,
                Err(err) => return Err(err),
            }
        }
        Ok(out)
    }
    pub(crate) async fn after_load_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        run_chain!(self, e => e.after_load_document(p))
    }
    pub(crate) async fn connected(&self, p: &DocumentPayload<'_>) -> HookResult {
        run_chain!(self, e => e.connected(p))
    }
    pub(crate) async fn before_handle_message(&self, p: &MessagePayload<'_>) -> HookResult {
        run_chain!(self, e => e.before_handle_message(p))
    }
    pub(crate) async fn on_change(&self, p: &ChangePayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_change(p))
    }
    pub(crate) async fn on_stateless(&self, p: &StatelessPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_stateless(p))
    }
    pub(crate) async fn on_awareness_update(&self, p: &AwarenessPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_awareness_update(p))
    }
    pub(crate) async fn on_store_document(&self, p: &StorePayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_store_document(p))
    }
    pub(crate) async fn after_store_document(&self, p: &StorePayload<'_>) -> HookResult {
        run_chain!(self, e => e.after_store_document(p))
    }
    pub(crate) async fn on_disconnect(&self, p: &DisconnectPayload<'_>) -> HookResult {
        run_chain!(self, e => e.on_disconnect(p))
    }
    pub(crate) async fn before_unload_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        run_chain!(self, e => e.before_unload_document(p))
    }
    pub(crate) async fn after_unload_document(&self, p: &DocumentPayload<'_>) -> HookResult {
        run_chain!(self, e => e.after_unload_document(p))
    }
    pub(crate) async fn on_custom_event(
        &self,
        p: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        for e in self.list.iter() {
            match e.on_custom_event(p).await {
                Ok(Some(answer)) => return Ok(Some(answer)),
                Ok(None) => {}
                Err(err) if err.skip => break,
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }
    pub(crate) async fn on_destroy(&self) -> HookResult {
        run_chain!(self, e => e.on_destroy())
    }
}
