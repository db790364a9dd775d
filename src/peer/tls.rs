//! Mutual TLS for the control channel, from a host's PKI directory (QEMU's layout): the
//! service presents `server-cert.pem` and requires a client certificate from `ca-cert.pem`'s
//! CA; the source presents `client-cert.pem` and verifies the service against the same CA.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::PeerError;
use crate::pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn creds_error(dir: &Path, detail: impl std::fmt::Display) -> PeerError {
    PeerError::Credentials {
        dir: dir.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn roots(dir: &Path) -> Result<RootCertStore, PeerError> {
    let path = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&path)
        .map_err(|e| creds_error(dir, format!("{}: {e}", path.display())))?
    {
        let cert = cert.map_err(|e| creds_error(dir, format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| creds_error(dir, format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

fn chain_and_key(
    dir: &Path,
    cert: &str,
    key: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PeerError> {
    let cert_path = dir.join(cert);
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| creds_error(dir, format!("{}: {e}", cert_path.display())))?;
    let key_path = dir.join(key);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| creds_error(dir, format!("{}: {e}", key_path.display())))?;
    Ok((chain, key))
}

/// Checks the chain with WebPKI, then the certificate's names against an allow list, so a
/// source with a valid but unwelcome certificate is refused during the handshake itself.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowListVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match PeerIdentity::from_der(end_entity.as_ref()) {
            Some(id) if id.allowed_by(&self.allowed) => Ok(verified),
            Some(id) => {
                tracing::warn!(names = ?id.names, allowed = ?self.allowed, "client certificate name not allowed");
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::ApplicationVerificationFailure,
                ))
            }
            None => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The service's TLS configuration: its server certificate, client certificates from the CA
/// required, and (when `allowed` is not empty) carrying one of the allowed names.
pub fn server_config(dir: &Path, allowed: &[String]) -> Result<Arc<ServerConfig>, PeerError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), provider())
        .build()
        .map_err(|e| creds_error(dir, e))?;
    let verifier = Arc::new(AllowListVerifier {
        inner,
        allowed: allowed.to_vec(),
    });
    let (chain, key) = chain_and_key(dir, SERVER_CERT, SERVER_KEY)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| creds_error(dir, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| creds_error(dir, e))?;
    Ok(Arc::new(config))
}

/// The source's TLS configuration: its client certificate, the service verified by the CA.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, PeerError> {
    let (chain, key) = chain_and_key(dir, CLIENT_CERT, CLIENT_KEY)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| creds_error(dir, e))?
        .with_root_certificates(roots(dir)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| creds_error(dir, e))?;
    Ok(Arc::new(config))
}

/// Who is on the other end, from the certificate it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject distinguished name as QEMU's `authz-simple` matches it (`CN=host-a`).
    pub dn: String,
    /// The common name and every DNS/IP subject alternative name.
    pub names: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let dn = cert.subject().to_string();
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_string()),
                    GeneralName::IPAddress(ip) => {
                        if let Ok(b) = <[u8; 4]>::try_from(*ip) {
                            names.push(std::net::Ipv4Addr::from(b).to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(PeerIdentity { dn, names })
    }

    /// Whether one of the names is in `allowed` (an empty list allows every name).
    pub fn allowed_by(&self, allowed: &[String]) -> bool {
        allowed.is_empty() || self.names.iter().any(|n| allowed.contains(n))
    }
}
