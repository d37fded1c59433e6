//! Connections to Redis: the URL (`redis://`, `rediss://` for TLS) and, for TLS with a private
//! CA or a client certificate, the `redis_tls_*` files.
//!
//! With `rediss://` and no CA file the server is verified against the system's roots (and
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when set); `redis_tls_ca_file` replaces them with the
//! certificates of one PEM file; `redis_tls_cert_file` + `redis_tls_key_file` present a client
//! certificate. Every error names the setting and the file.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Builder, ClientLike, ReconnectPolicy};
use fred::types::config::{Config as RedisConfig, TlsConfig, TlsConnector};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::ClusterError;
use crate::config::{Config, ConfigError};

fn invalid(name: &'static str, message: String) -> ClusterError {
    ClusterError::Config(ConfigError::Invalid { name, message })
}

/// The TLS settings the `redis_tls_*` files ask for; `None` when none is set.
pub(crate) fn redis_tls(config: &Config) -> Result<Option<TlsConfig>, ClusterError> {
    let (ca, cert, key) = (
        &config.redis_tls_ca_file,
        &config.redis_tls_cert_file,
        &config.redis_tls_key_file,
    );
    let set = |p: &std::path::PathBuf| !p.as_os_str().is_empty();
    if !set(ca) && !set(cert) && !set(key) {
        return Ok(None);
    }
    if set(cert) != set(key) {
        return Err(invalid(
            "redis_tls_cert_file",
            "set both redis_tls_cert_file and redis_tls_key_file, or neither".into(),
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    if set(ca) {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| invalid("redis_tls_ca_file", format!("{}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(invalid(
                "redis_tls_ca_file",
                format!("{}: no PEM certificate in it", ca.display()),
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| invalid("redis_tls_ca_file", format!("{}: {e}", ca.display())))?;
        }
    } else {
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
    }
    // ring, the provider every TLS client of this binary uses (its post-quantum key exchange
    // is what the deprecation is about; Redis servers do not offer it)
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("redis_tls_ca_file", e.to_string()))?
        .with_root_certificates(roots);
    let client = if set(cert) {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| invalid("redis_tls_cert_file", format!("{}: {e}", cert.display())))?;
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| invalid("redis_tls_key_file", format!("{}: {e}", key.display())))?;
        builder
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| invalid("redis_tls_cert_file", e.to_string()))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Some(TlsConfig::from(TlsConnector::from(client))))
}

/// The fred configuration for `config`'s Redis: its URL, with the `redis_tls_*` files applied.
pub(crate) fn redis_config(config: &Config) -> Result<RedisConfig, ClusterError> {
    let mut redis = RedisConfig::from_url(&config.redis_url)
        .map_err(|e| invalid("redis_url", e.to_string()))?;
    if let Some(tls) = redis_tls(config)? {
        redis.tls = Some(tls);
    }
    Ok(redis)
}

/// How long the first connection to Redis may take (a node at start-up, `hearth cluster …`).
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A fred client with reconnects (fred does not reconnect without a policy), connected: the
/// first connection's failure, or no connection within [`CONNECT_TIMEOUT`], is
/// [`ClusterError::Connect`], which names `redis_url` (password hidden) and the cause.
pub(crate) async fn redis_client(config: &Config) -> Result<fred::clients::Client, ClusterError> {
    let client = Builder::from_config(redis_config(config)?)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2))
        .build()
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    // `init` reports the first attempt's own error, not the reconnect loop's
    match tokio::time::timeout(CONNECT_TIMEOUT, client.init()).await {
        Ok(Ok(_task)) => Ok(client),
        Ok(Err(e)) => Err(connect_error(config, cause_of(&e))),
        Err(_) => Err(connect_error(
            config,
            format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
        )),
    }
}

/// A fred error's cause in one line. fred keeps an I/O error as its `Debug` text
/// (`Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }`): that becomes
/// `Connection refused (os error 111)`.
pub(crate) fn cause_of(e: &fred::error::Error) -> String {
    let details = e.details();
    let field = |name: &str| {
        let start = details.find(name)? + name.len();
        let rest = &details[start..];
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"').to_owned())
    };
    match (field("message:"), field("code:")) {
        (Some(message), Some(code)) => format!("{message} (os error {code})"),
        (Some(message), None) => message,
        _ if details.is_empty() => format!("{:?}", e.kind()),
        _ => details.to_owned(),
    }
}

/// [`ClusterError::Connect`] for `config`'s Redis.
pub(crate) fn connect_error(config: &Config, cause: String) -> ClusterError {
    ClusterError::Connect {
        url: crate::config::redact_url(&config.redis_url),
        cause,
    }
}

#[cfg(test)]
mod tests {
    use fred::error::{Error, ErrorKind};

    use super::cause_of;

    #[test]
    fn io_errors_read_as_the_os_says_them() {
        let e = Error::new(
            ErrorKind::IO,
            r#"Os { code: 111, kind: ConnectionRefused, message: "Connection refused" }"#,
        );
        assert_eq!(cause_of(&e), "Connection refused (os error 111)");
        let e = Error::new(ErrorKind::Auth, "WRONGPASS invalid username-password pair");
        assert_eq!(cause_of(&e), "WRONGPASS invalid username-password pair");
    }
}
