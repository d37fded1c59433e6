//! Built-in behaviours for the interop suite (`--test-extension`, hidden; never for production):
//!
//! * token `slow`: `on_authenticate` waits 500 ms;
//! * documents named `fail-load…`: `on_load_document` rejects with `load-failed`;
//! * stateless `echo:X` → `echo:X` to the sender; `bcast:X` → `all:X` to everyone; `reset` →
//!   `CLOSE("Reset Connection")` for every connection of the document; `direct:X` → a direct
//!   connection inserts `X` at index 0 of the text `t`; `loads` → `loads:N`, the number of
//!   `on_load_document` runs for this document.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use yrs::{Text, Transact};

use crate::hooks::{
    AuthPayload, Context, Extension, HookError, HookResult, LoadPayload, StatelessPayload,
};
use crate::server::WeakServer;
use crate::shared::Shared;

/// The test behaviours.
#[derive(Debug, Default)]
pub struct TestExtension {
    server: OnceLock<WeakServer>,
    loads: Mutex<HashMap<String, u64>>,
}

impl TestExtension {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub(crate) fn set_server(&self, shared: Weak<Shared>) {
        let _ = self.server.set(WeakServer(shared));
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
            let Some(server) = self.server.get().cloned() else {
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
