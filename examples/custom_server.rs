//! A custom Hearth server: the stock `hearth` command line (every flag, `HEARTH_*` variable and
//! subcommand) plus an application's own hooks, in one file.
//!
//! ```text
//! cargo run --release --example custom_server -- --database-url sqlite://app.db
//! ```
//!
//! What the hooks do:
//!
//! * **Authentication** (`on_authenticate`): token `writer` may edit any document, token
//!   `reader` may only read, anything else is refused (the client sees `permission-denied`).
//!   The user's name goes into the connection's context, where later hooks find it.
//! * **A custom event** (`on_custom_event`), `append`: the node that owns the document (in a
//!   cluster, whichever node that is) takes the document with `lock_document` and appends the
//!   payload as a line to the `Y.Text` named `log`, through a direct connection. The edit is
//!   stored and reaches every client like a client's own update. It replies with the new length.
//! * **Stateless messages** (`on_stateless`): a writer sending `append:TEXT` fires the `append`
//!   event for its document through [`ServerHandle::emit`], which finds the owner, and answers
//!   `appended:N` with the event's reply. Hooks run inside the document's task, so anything that
//!   waits for the same document is spawned.
//!
//! Other applications fire the same event from a shell with `hearth cluster emit DOC append
//! --payload TEXT` (cluster mode).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use hearth::hooks::{AuthPayload, CustomEventPayload, StatelessPayload};
use hearth::{Context, Extension, HookError, HookResult, ServerHandle, WeakServer};
use yrs::{Text, Transact};

/// Refuses single allocations above a cap, as the stock binary does (see `hearth::alloc`).
#[global_allocator]
static ALLOCATOR: hearth::alloc::CappedAllocator = hearth::alloc::CappedAllocator::new();

fn main() -> std::process::ExitCode {
    hearth::cli::run(|server: &WeakServer| {
        vec![Arc::new(App {
            server: server.clone(),
        }) as Arc<dyn Extension>]
    })
}

/// The application's hooks. It keeps a weak handle: the server owns its extensions, so a
/// strong one would keep the server alive forever.
struct App {
    server: WeakServer,
}

impl App {
    fn server(&self) -> Result<ServerHandle, HookError> {
        self.server
            .upgrade()
            .ok_or_else(|| HookError::reject("server shutting down"))
    }
}

/// Appends `line` to the text `log` of `document`, which this node must own; returns the text's
/// new length.
async fn append_line(server: &ServerHandle, document: &str, line: String) -> Result<u32, String> {
    let conn = server
        .lock_document(document, Context::new())
        .await
        .map_err(|e| e.to_string())?;
    let len = Arc::new(AtomicU32::new(0));
    let out = len.clone();
    let applied = conn
        .transact(move |doc| {
            let log = doc.get_or_insert_text("log");
            let mut txn = doc.transact_mut();
            let end = log.len(&txn);
            log.insert(&mut txn, end, &format!("{line}\n"));
            out.store(log.len(&txn), Ordering::Relaxed);
        })
        .await
        .map_err(|e| e.to_string());
    // closing the direct connection stores the document and lets it unload when idle
    conn.disconnect().await;
    applied.map(|()| len.load(Ordering::Relaxed))
}

#[hearth::async_trait]
impl Extension for App {
    fn name(&self) -> &str {
        "custom-server-example"
    }

    async fn on_authenticate(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        match payload.token {
            "writer" => {}
            "reader" => payload.read_only = true,
            _ => return Err(HookError::permission_denied()),
        }
        payload
            .context
            .insert("user".into(), payload.token.to_owned().into());
        Ok(())
    }

    async fn on_custom_event(
        &self,
        event: &CustomEventPayload<'_>,
    ) -> Result<Option<Vec<u8>>, HookError> {
        if event.name != "append" {
            // not ours: another extension may answer it
            return Ok(None);
        }
        let line = String::from_utf8_lossy(event.payload).into_owned();
        let len = append_line(&self.server()?, event.document_name, line)
            .await
            .map_err(HookError::reject)?;
        Ok(Some(len.to_string().into_bytes()))
    }

    async fn on_stateless(&self, message: &StatelessPayload<'_>) -> HookResult {
        let Some(text) = message.payload.strip_prefix("append:") else {
            return Ok(());
        };
        if message.connection.read_only() {
            message.connection.send_stateless("error:read-only");
            return Ok(());
        }
        let server = self.server()?;
        let (document, text) = (message.document_name.to_owned(), text.to_owned());
        let reply_to = message.connection.clone();
        tokio::spawn(async move {
            let reply = match server.emit(&document, "append", text.into_bytes()).await {
                Ok(len) => format!("appended:{}", String::from_utf8_lossy(&len)),
                Err(e) => format!("error:{e}"),
            };
            reply_to.send_stateless(&reply);
        });
        Ok(())
    }
}
