//! The static token table's format (`auth_tokens`): comma-separated `token=scope` with scope
//! `read-write`, `read-only` or `deny`; the token `*` is the rule for every token not listed.
//! Unset or empty: every client is read-write. A token with no rule and no `*` is denied.
//! Configuration validates it; the built-in extension in `auth` enforces it.

use std::collections::HashMap;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Read and write.
    ReadWrite,
    /// Read only: updates get `SyncStatus(0)`.
    ReadOnly,
    /// Refused with `PermissionDenied`.
    Deny,
}

/// A parsed token table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenTable {
    rules: HashMap<String, Scope>,
    fallback: Option<Scope>,
}

impl TokenTable {
    /// Parses `token=scope,…`. An empty string gives an empty table (everyone read-write).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut table = TokenTable::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (token, scope) = part
                .rsplit_once('=')
                .ok_or_else(|| format!("`{part}` is not token=scope"))?;
            let scope = match scope.trim() {
                "read-write" | "rw" => Scope::ReadWrite,
                "read-only" | "readonly" | "ro" => Scope::ReadOnly,
                "deny" => Scope::Deny,
                other => {
                    return Err(format!(
                        "unknown scope `{other}` (read-write, read-only, deny)"
                    ));
                }
            };
            match token.trim() {
                "*" => table.fallback = Some(scope),
                t => {
                    table.rules.insert(t.to_owned(), scope);
                }
            }
        }
        Ok(table)
    }

    /// True when no rule is configured (everyone is read-write).
    pub fn is_open(&self) -> bool {
        self.rules.is_empty() && self.fallback.is_none()
    }

    /// The scope of `token`.
    pub fn scope(&self, token: &str) -> Scope {
        if self.is_open() {
            return Scope::ReadWrite;
        }
        self.rules
            .get(token)
            .copied()
            .or(self.fallback)
            .unwrap_or(Scope::Deny)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_rules_and_fallback() {
        let t = TokenTable::parse("rw=read-write, ro=read-only,bad=deny,*=read-only").unwrap();
        assert_eq!(t.scope("rw"), Scope::ReadWrite);
        assert_eq!(t.scope("ro"), Scope::ReadOnly);
        assert_eq!(t.scope("bad"), Scope::Deny);
        assert_eq!(t.scope("other"), Scope::ReadOnly);
        let strict = TokenTable::parse("a=read-write").unwrap();
        assert_eq!(strict.scope(""), Scope::Deny);
        assert_eq!(
            TokenTable::parse("").unwrap().scope("anything"),
            Scope::ReadWrite
        );
        assert!(TokenTable::parse("x").is_err());
        assert!(TokenTable::parse("x=admin").is_err());
        // tokens may contain '='
        assert_eq!(
            TokenTable::parse("a=b=read-only").unwrap().scope("a=b"),
            Scope::ReadOnly
        );
    }
}
