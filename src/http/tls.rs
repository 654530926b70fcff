//! TLS for the listeners (`server.tls_cert_file`, `server.tls_key_file`):
//! rustls with the ring provider, TLS 1.2 and 1.3, HTTP/1.1 by ALPN (the
//! server speaks HTTP/1.1 only). The handshake is bounded by the header
//! read timeout, so a client that opens a connection and never finishes it
//! costs no more than one that never sends a request head.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Builds the acceptor from a PEM certificate chain and its private key;
/// the error names the file and what is wrong with it.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> anyhow::Result<TlsAcceptor> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "server.tls_cert_file: {}: not a PEM certificate chain: {e}",
                cert_file.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "server.tls_cert_file: {}: holds no certificate",
            cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        anyhow::anyhow!(
            "server.tls_key_file: {}: not a PEM private key: {e}",
            key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow::anyhow!(
                "server.tls_key_file: {} does not go with {}: {e}",
                key_file.display(),
                cert_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
