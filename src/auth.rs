//! The built-in static token table (`HEARTH_AUTH_TOKENS`), as an [`Extension`].
//!
//! The table's format and parsing live in `tokens`.

use async_trait::async_trait;

use crate::hooks::{AuthPayload, Extension, HookError, HookResult};
use crate::tokens::{Scope, TokenTable};

/// The extension that enforces a [`TokenTable`] in `on_authenticate`.
#[derive(Debug)]
pub struct StaticTokens(pub TokenTable);

#[async_trait]
impl Extension for StaticTokens {
    fn name(&self) -> &str {
        "static-tokens"
    }

    async fn on_authenticate(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        match self.0.scope(payload.token) {
            Scope::ReadWrite => Ok(()),
            Scope::ReadOnly => {
                payload.read_only = true;
                Ok(())
            }
            Scope::Deny => Err(HookError::permission_denied()),
        }
    }

    /// A new token must not be denied, and a read-only token cannot keep a read-write
    /// connection.
    async fn on_token_sync(&self, payload: &mut AuthPayload<'_>) -> HookResult {
        match self.0.scope(payload.token) {
            Scope::ReadWrite => Ok(()),
            Scope::ReadOnly if payload.read_only => Ok(()),
            Scope::ReadOnly | Scope::Deny => Err(HookError::reject("Unauthorized")),
        }
    }
}
