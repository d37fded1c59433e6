//! Certificates for TLS tests, made with the `openssl` command-line tool: a test CA, a server
//! certificate for `localhost` / `127.0.0.1` signed by it, a client certificate, and a second,
//! unrelated CA (for "wrong CA" cases).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The files of one test PKI (all PEM).
#[derive(Debug, Clone)]
pub struct TestPki {
    /// The CA certificate that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA certificate that signed nothing here.
    pub other_ca: PathBuf,
    /// Server certificate (`CN=localhost`, SAN `DNS:localhost`, `IP:127.0.0.1`).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Client certificate (`CN=hearth`).
    pub client_cert: PathBuf,
    /// Its key (PKCS#8).
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (install the openssl package)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl TestPki {
    /// Makes the PKI in `dir` (created if missing).
    pub fn make(dir: &Path) -> anyhow::Result<TestPki> {
        std::fs::create_dir_all(dir)?;
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN=hearth test {ca}"),
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                ],
            )?;
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, cn) in [("server", "localhost"), ("client", "hearth")] {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-subj",
                    &format!("/CN={cn}"),
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                ],
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &format!("{name}.ext"),
                    "-out",
                    &format!("{name}.pem"),
                ],
            )?;
        }
        Ok(TestPki {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        })
    }
}
