//! Placeholder and weak secrets are refused for every secret setting, with the cluster secret's
//! strength policy (`hearth_proxy::check_secret`: no placeholder words such as `change-me`,
//! `secret` or `admin-token`, enough distinct characters, no short repeated pattern), each with
//! its own shortest length. Database and Redis URLs are refused when their password is an
//! unmistakable placeholder ([`placeholder_password`]).

use super::{Config, ConfigError};

/// Shortest accepted `jwt_secret` (an HS256 key of the hash's size).
pub(super) const MIN_JWT_SECRET_LEN: usize = 32;

/// Shortest accepted admin token, `auth_webhook_secret` and `webhook_secret`.
pub(crate) const MIN_TOKEN_LEN: usize = 16;

/// Passwords refused in `database_url` and `redis_url` (compared case-insensitively), besides a
/// password equal to the user name (`hearth:hearth`, `postgres:postgres`).
const PLACEHOLDER_PASSWORDS: &[&str] = &[
    "password",
    "passwd",
    "pass",
    "changeme",
    "change-me",
    "change_me",
    "changeit",
    "secret",
    "example",
    "placeholder",
    "hearth",
    "postgres",
    "redis",
];

fn weak(name: &'static str, what: &str, e: hearth_proxy::WeakSecret) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: format!("{what}{e}; generate one with `openssl rand -base64 48`"),
    }
}

/// Checks every secret setting that is set: `jwt_secret`, each of `admin_tokens`,
/// `auth_webhook_secret`, `webhook_secret`, and the passwords of `database_url` and `redis_url`.
/// (The cluster secrets are checked by [`Config::cluster_secrets`].)
pub(super) fn check(config: &Config) -> Result<(), ConfigError> {
    let single = [
        ("jwt_secret", &config.jwt_secret, MIN_JWT_SECRET_LEN),
        (
            "auth_webhook_secret",
            &config.auth_webhook_secret,
            MIN_TOKEN_LEN,
        ),
        ("webhook_secret", &config.webhook_secret, MIN_TOKEN_LEN),
    ];
    for (name, value, min) in single {
        if !value.is_empty() {
            hearth_proxy::check_secret(value.as_bytes(), min)
                .map_err(|e| weak(name, "the secret ", e))?;
        }
    }
    config
        .admin_token_list()
        .map_err(|message| ConfigError::Invalid {
            name: "admin_tokens",
            message,
        })?;
    for (name, url) in [
        ("database_url", &config.database_url),
        ("redis_url", &config.redis_url),
    ] {
        if placeholder_password(url) {
            return Err(ConfigError::Invalid {
                name,
                message: format!(
                    "{}: the password is a placeholder (such as password, changeme, secret, or \
                     the user name); use a generated one",
                    super::redact_url(url)
                ),
            });
        }
    }
    Ok(())
}

/// True when `url` (`scheme://user:password@host…`) carries a password that is an unmistakable
/// placeholder: one of [`PLACEHOLDER_PASSWORDS`] or the user name itself, ignoring case and
/// percent-encoding. A URL without a password is never refused here.
pub(super) fn placeholder_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return false;
    };
    let Some((user, password)) = userinfo.split_once(':') else {
        return false;
    };
    let password = percent_decode(password).to_ascii_lowercase();
    if password.is_empty() {
        return false;
    }
    PLACEHOLDER_PASSWORDS.contains(&password.as_str())
        || password == percent_decode(user).to_ascii_lowercase()
}

/// `%XX` sequences decoded (invalid ones kept as they are); bytes that are not UTF-8 replaced.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let v = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRONG: &str = "q7Vt2Lm9Xc4Rb8Zn1Kw6Hy3Jd5Fs0PaE";

    #[test]
    fn placeholder_passwords_in_urls() {
        for url in [
            "postgres://hearth:hearth@postgres:5432/hearth",
            "postgres://app:password@db/app",
            "postgresql://app:ChangeMe@db/app",
            "postgres://app:change-me@db/app",
            "postgres://app:%73ecret@db/app",
            "redis://:secret@cache:6379",
            "redis://default:redis@cache:6379/0",
            "postgres://postgres:postgres@127.0.0.1/test",
        ] {
            assert!(placeholder_password(url), "{url}");
        }
        for url in [
            "postgres://hearth@postgres:5432/hearth",
            "postgres://hearth:Xq4-v9Lr@db/hearth",
            "postgres://127.0.0.1/test",
            "redis://127.0.0.1:6379",
            "redis://:k8Vn2Qz@cache:6379",
            "sqlite://hearth.db",
            "memory://",
            // a password that merely contains a word is the operator's business
            "postgres://app:password-7Hk2qZ@db/app",
        ] {
            assert!(!placeholder_password(url), "{url}");
        }
    }

    #[test]
    fn every_secret_setting_refuses_placeholders() {
        let base = Config::default();
        let cases: Vec<(&str, Config)> = vec![
            (
                "jwt_secret",
                Config {
                    jwt_secret: "change-me-change-me-change-me-1234".into(),
                    ..base.clone()
                },
            ),
            (
                "admin_tokens",
                Config {
                    admin_tokens: format!("{STRONG},admin-token-0123456789"),
                    ..base.clone()
                },
            ),
            (
                "auth_webhook_secret",
                Config {
                    auth_webhook_secret: "change-me-secret-123".into(),
                    ..base.clone()
                },
            ),
            (
                "webhook_secret",
                Config {
                    webhook_secret: "aaaaaaaaaaaaaaaaaaaa".into(),
                    ..base.clone()
                },
            ),
            (
                "database_url",
                Config {
                    database_url: "postgres://hearth:hearth@db/hearth".into(),
                    ..base.clone()
                },
            ),
        ];
        for (name, c) in cases {
            match check(&c) {
                Err(ConfigError::Invalid { name: n, message }) => {
                    assert_eq!(n, name);
                    assert!(!message.contains('\n'), "{message}");
                    assert!(!message.contains("hearth:hearth"), "{message}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let strong = Config {
            jwt_secret: STRONG.into(),
            admin_tokens: format!("{STRONG}, Zq8Wm1Xr4Tb7Yn2K"),
            auth_webhook_secret: STRONG.into(),
            webhook_secret: "Zq8Wm1Xr4Tb7Yn2K".into(),
            database_url: "postgres://hearth@db/hearth".into(),
            ..base
        };
        assert!(check(&strong).is_ok(), "{:?}", check(&strong));
    }
}
