//! Connections to Redis: the URL (`redis://`, `rediss://` for TLS) and, for TLS with a private
//! CA or a client certificate, the `redis_tls_*` files.
//!
//! With `rediss://` and no CA file the server is verified against the system's roots (and
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` when set); `redis_tls_ca_file` replaces them with the
//! certificates of one PEM file; `redis_tls_cert_file` + `redis_tls_key_file` present a client
//! certificate. Every error names the setting and the file.

use std::sync::Arc;

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

/// A fred client with reconnects (fred does not reconnect without a policy).
pub(crate) async fn redis_client(config: &Config) -> Result<fred::clients::Client, ClusterError> {
    let client = Builder::from_config(redis_config(config)?)
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 2000, 2))
        .build()
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    client
        .init()
        .await
        .map_err(|e| ClusterError::Redis(e.to_string()))?;
    Ok(client)
}
