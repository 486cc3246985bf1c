//! TLS for every connection Kiln makes or serves, on rustls with ring: the trust a client uses
//! (the system's roots, plus the CA certificates a farm names: `KILN_TLS_CA_FILE`, for a farm
//! whose certificates its own CA signed), and the API's certificate and key.
//!
//! The extra CAs are the process's, set once at start ([`trust_ca_file`]) by whatever config
//! names them, and used by every TLS client after: the API client ([`crate::client`]),
//! `amqps://` ([`crate::amqp`]) and `mqtts://`.

use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA files trusted besides the system's roots: (their PEM text, their certificates).
static EXTRA: RwLock<Vec<(String, Vec<CertificateDer<'static>>)>> = RwLock::new(Vec::new());

/// Why a TLS file is not usable.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsFileError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsFileError {
    TlsFileError { path: path.display().to_string(), message: message.to_string() }
}

/// The certificates in a PEM file, at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"));
    }
    Ok(certs)
}

/// Trusts the CA certificates in the PEM file at `path` from now on, besides the system's.
pub fn trust_ca_file(path: &Path) -> Result<(), TlsFileError> {
    let certs = certificates(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let mut extra = EXTRA.write().unwrap_or_else(|p| p.into_inner());
    if !extra.iter().any(|(t, _)| *t == text) {
        extra.push((text, certs));
    }
    Ok(())
}

/// The extra CA certificates as one PEM text (for lapin, which takes them so), if any.
pub fn extra_ca_pem() -> Option<String> {
    let extra = EXTRA.read().unwrap_or_else(|p| p.into_inner());
    (!extra.is_empty()).then(|| extra.iter().map(|(text, _)| format!("{}\n", text.trim_end())).collect())
}

/// The system's root certificates, read once (unreadable ones are skipped).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "a system root certificate was not read");
        }
        found.certs
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client's settings: the system's roots and the extra CAs, no client certificate.
pub fn client_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(system_roots().iter().cloned());
    let extra = EXTRA.read().unwrap_or_else(|p| p.into_inner());
    roots.add_parsable_certificates(extra.iter().flat_map(|(_, certs)| certs.iter().cloned()));
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    // ring's provider supports the default versions: this cannot fail.
    Arc::new(config.unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3")))
}

/// A TLS server's settings from a PEM certificate chain and its PEM private key.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>, TlsFileError> {
    let certs = certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| file_error(key_file, format!("no PEM private key read: {e}")))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| file_error(cert_file, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| file_error(key_file, format!("does not go with {}: {e}", cert_file.display())))?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let e = trust_ca_file(&f).unwrap_err().to_string();
        assert!(e.starts_with(&f.display().to_string()) && e.contains("no PEM certificate"), "{e}");
        let e = trust_ca_file(&dir.path().join("missing.pem")).unwrap_err().to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
