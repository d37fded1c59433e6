//! The behaviours the interop and cluster tests rely on, run by the `hearth-test-server` binary
//! (the stock command line plus this extension):
//!
//! * token `slow`: `on_authenticate` waits 500 ms;
//! * documents named `fail-load…`: `on_load_document` rejects with `load-failed`;
//! * stateless `echo:X` → `echo:X` to the sender; `bcast:X` → `all:X` to everyone; `reset` →
//!   `CLOSE("Reset Connection")` for every connection of the document; `direct:X` → a direct
//!   connection inserts `X` at index 0 of the text `t`; `loads` → `loads:N`, the number of
//!   `on_load_document` runs for this document.
//! * custom events (`on_custom_event`, `hearth cluster emit`), each answered by the node that
//!   runs it: `whoami` → this node's id; `append` → a direct connection pushes the payload (as a
//!   string) onto the `Y.Array` `log`, the marker array of the cluster tests' client, stores the
//!   document and replies with this node's id; `slow` → sleeps for the payload's number of
//!   milliseconds (default 5000, at most 60 000), then replies with this node's id; `fail` →
//!   the handler rejects with `failed-on-purpose`; any other event is left to other extensions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use yrs::{Array, Text, Transact};

use hearth::config::Config;
use hearth::hooks::{
    AuthPayload, Context, CustomEventPayload, Extension, HookError, HookResult, LoadPayload,
    StatelessPayload,
};
use hearth::{ServerHandle, WeakServer};

/// The test behaviours.
#[derive(Debug)]
pub struct TestExtension {
    server: WeakServer,
    node_id: OnceLock<String>,
    loads: Mutex<HashMap<String, u64>>,
}

/// Longest `slow` custom event.
const MAX_SLOW: Duration = Duration::from_secs(60);

impl TestExtension {
    /// The extension, calling the server through `server`.
    pub fn new(server: WeakServer) -> Arc<Self> {
        Arc::new(Self {
            server,
            node_id: OnceLock::new(),
            loads: Mutex::default(),
        })
    }

    fn server(&self) -> Option<ServerHandle> {
        self.server.upgrade()
    }
}

#[async_trait]
impl Extension for TestExtension {
    fn name(&self) -> &str {
        "test-extension"
    }

    fn priority(&self) -> i32 {
        1000
    }

    async fn on_configure(&self, config: &Config) -> HookResult {
        let _ = self.node_id.set(config.node_id.clone());
        Ok(())
    }

    async fn on_custom_event(
        &self,
        p: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        let me = self.node_id.get().cloned().unwrap_or_default().into_bytes();
        match p.name {
            "whoami" => Ok(Some(me)),
            "fail" => Err(HookError::reject("failed-on-purpose")),
            "slow" => {
                let ms = std::str::from_utf8(p.payload)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(5000);
                tokio::time::sleep(Duration::from_millis(ms).min(MAX_SLOW)).await;
                Ok(Some(me))
            }
            "append" => {
                // Not a document hook: this runs outside the document's task, so it may wait for
                // work on the same document.
                let text = String::from_utf8_lossy(p.payload).into_owned();
                let Some(server) = self.server() else {
                    return Err(HookError::reject("server not ready"));
                };
                let conn = server
                    .open_direct_connection(p.document_name, Context::new())
                    .await
                    .map_err(|e| HookError::reject(e.client_reason()))?;
                let applied = conn
                    .transact(move |doc| {
                        let log = doc.get_or_insert_array("log");
                        let mut txn = doc.transact_mut();
                        log.push_back(&mut txn, text);
                    })
                    .await;
                conn.disconnect().await;
                applied.map_err(|e| HookError::reject(e.to_string()))?;
                Ok(Some(me))
            }
            _ => Ok(None),
        }
    }

    async fn on_authenticate(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        if payload.token == "slow" {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    }

    async fn on_load_document(
        &self,
        payload: &LoadPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        *self
            .loads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(payload.document_name.to_owned())
            .or_default() += 1;
        if payload.document_name.starts_with("fail-load") {
            return Err(HookError::reject("load-failed"));
        }
        Ok(None)
    }

    async fn on_stateless(&self, p: &StatelessPayload<'_>) -> HookResult {
        if let Some(x) = p.payload.strip_prefix("echo:") {
            p.connection.send_stateless(&format!("echo:{x}"));
        } else if let Some(x) = p.payload.strip_prefix("bcast:") {
            p.document.broadcast_stateless(&format!("all:{x}"));
        } else if p.payload == "loads" {
            let n = self
                .loads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(p.document_name)
                .copied()
                .unwrap_or(0);
            p.connection.send_stateless(&format!("loads:{n}"));
        } else if p.payload == "reset" {
            p.document.close_connections();
        } else if let Some(x) = p.payload.strip_prefix("direct:") {
            // Hooks run inside the document's task: work on the same document must be spawned.
            let Some(server) = self.server() else {
                return Ok(());
            };
            let (name, text) = (p.document_name.to_owned(), x.to_owned());
            tokio::spawn(async move {
                let Ok(conn) = server.open_direct_connection(&name, Context::new()).await else {
                    return;
                };
                let _ = conn
                    .transact(move |doc| {
                        let t = doc.get_or_insert_text("t");
                        let mut txn = doc.transact_mut();
                        t.insert(&mut txn, 0, &text);
                    })
                    .await;
                conn.disconnect().await;
            });
        }
        Ok(())
    }
}
