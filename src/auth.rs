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
}
