//! Mutual TLS for the control channel, from a host's PKI directory (QEMU's layout): the
//! service presents `server-cert.pem` and requires a client certificate from `ca-cert.pem`'s
//! CA; the source presents `client-cert.pem` and verifies the service against the same CA.

use std::net::IpAddr;
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
use crate::pki::DnError;
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
    /// Subject distinguished name exactly as QEMU's `authz-simple` compares it (GnuTLS's
    /// string, [`crate::pki::dn`]: `C=US,O=Acme,CN=host-a`), or why QEMU cannot be given it.
    pub dn: Result<String, DnError>,
    /// The names the certificate is valid for: its DNS and IP subject alternative names, or,
    /// only when it has none, its common names (RFC 6125: SANs take precedence over the CN).
    pub names: Vec<String>,
    /// IP subject alternative names, IPv4 and IPv6.
    pub ips: Vec<IpAddr>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let dn = crate::pki::qemu_authz_dn(cert.subject().as_raw());
        let mut names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                    GeneralName::IPAddress(ip) => {
                        let addr = match ip.len() {
                            4 => <[u8; 4]>::try_from(*ip).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*ip).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(addr) = addr {
                            names.push(addr.to_string());
                            ips.push(addr);
                        }
                    }
                    _ => {}
                }
            }
        }
        if names.is_empty() {
            names = cert
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_ascii_lowercase))
                .collect();
        }
        Some(PeerIdentity { dn, names, ips })
    }

    /// The subject for a log line: the DN, or why it cannot be an `authz-simple` identity.
    pub fn subject(&self) -> String {
        match &self.dn {
            Ok(dn) => dn.clone(),
            Err(e) => format!("(a subject QEMU's authz cannot match: {e})"),
        }
    }

    /// Whether one of the certificate's names is in `allowed` (an empty list allows every
    /// name). DNS names compare without regard to case; an allowed entry that is an IP address
    /// (either family, any notation) matches an IP subject alternative name of that address.
    pub fn allowed_by(&self, allowed: &[String]) -> bool {
        allowed.is_empty() || allowed.iter().any(|a| self.matches(a))
    }

    fn matches(&self, allowed: &str) -> bool {
        let bare = allowed.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.names.iter().any(|n| n.eq_ignore_ascii_case(allowed)),
        }
    }
}

/// What the service writes to a connection it will not start a handshake on (over a handshake
/// or session limit) before closing it: a plaintext TLS record holding a fatal `user_canceled`
/// alert, which RFC 8446 defines as "canceling the handshake for some reason unrelated to a
/// protocol failure". A source's TLS library reports it as that alert, so the source can say
/// the service is busy instead of guessing at certificates. Seven bytes, written without
/// waiting, costing the service no handshake.
pub const BUSY_ALERT: [u8; 7] = [
    21, // content type: alert
    3, 3, // record version: TLS 1.2 (what TLS 1.3 records carry too)
    0, 2,  // length
    2,  // level: fatal
    90, // description: user_canceled
];

/// Whether a failed handshake is the service's [`BUSY_ALERT`].
pub fn is_busy_refusal(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::UserCanceled
        ))
    )
}

/// Describes why a TLS handshake failed, for the service's log and the source's error: the
/// rustls error inside `e` mapped to what an operator can check.
pub fn tls_failure_reason(e: &std::io::Error) -> String {
    use rustls::{AlertDescription, CertificateError, Error as TlsError};
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    else {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
                "the peer closed the connection during the handshake (a service closes one over \
                 its 3 s deadline, or cuts the oldest short when all its handshake slots are \
                 taken: see its log; a source closes when it gives up)"
                    .into()
            }
            _ => e.to_string(),
        };
    };
    match tls {
        TlsError::NoCertificatesPresented => {
            "the peer presented no certificate (a client certificate is required)".into()
        }
        TlsError::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not issued by this host's CA (ca-cert.pem)".into()
        }
        TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "the peer's certificate names are not in the service's --allow-client list".into()
        }
        TlsError::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the peer's certificate has expired".into(),
        TlsError::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "the peer's certificate is not valid yet (check both clocks)".into(),
        TlsError::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the peer's certificate does not carry the name it was reached by".into(),
        TlsError::InvalidCertificate(other) => {
            format!("the peer's certificate is unusable: {other:?}")
        }
        TlsError::PeerIncompatible(why) => {
            format!("no common TLS protocol version or cipher suite ({why:?})")
        }
        TlsError::InvalidMessage(_) => {
            "the peer does not speak TLS (a plain TCP client, or another protocol)".into()
        }
        TlsError::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate) => {
            "the peer refused our certificate (it trusts another CA, or our certificate is bad)"
                .into()
        }
        TlsError::AlertReceived(AlertDescription::UserCanceled) => {
            "the service is busy: it is over its limit of TLS handshakes in flight (from this \
             address, or in all) or of sessions, and refused the connection before the handshake; \
             try again in a moment (the service logs which limit)"
                .into()
        }
        TlsError::AlertReceived(AlertDescription::CertificateRequired) => {
            "the peer wants a client certificate".into()
        }
        TlsError::AlertReceived(alert) => format!("the peer sent the TLS alert {alert:?}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{HostCert, LabCa};

    fn identity(names: &[&str]) -> PeerIdentity {
        let ca = LabCa::generate("Test CA").expect("ca");
        let dir = tempfile::tempdir().expect("dir");
        ca.write_host_dir(
            dir.path(),
            &HostCert::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()),
        )
        .expect("host dir");
        let der = CertificateDer::from_pem_file(dir.path().join(CLIENT_CERT)).expect("cert");
        PeerIdentity::from_der(der.as_ref()).expect("identity")
    }

    #[test]
    fn allowed_names_match_dns_sans_without_regard_to_case() {
        let id = identity(&["Host-B.example"]);
        assert!(id.allowed_by(&["host-b.EXAMPLE".into()]));
        assert!(!id.allowed_by(&["host-c.example".into()]));
    }

    #[test]
    fn allowed_ip_addresses_match_ip_sans_of_both_families() {
        let id = identity(&["198.18.0.2", "2001:db8::2"]);
        assert!(id.allowed_by(&["198.18.0.2".into()]));
        assert!(id.allowed_by(&["2001:DB8:0:0::2".into()]));
        assert!(id.allowed_by(&["[2001:db8::2]".into()]));
        assert!(!id.allowed_by(&["198.18.0.3".into()]));
    }

    /// Runs a handshake between a service configured with `server_dir` and a source with
    /// `client_dir` over an in-memory stream; returns the service's view of the failure.
    async fn service_side_failure(server_dir: &Path, client_dir: &Path) -> String {
        let server =
            tokio_rustls::TlsAcceptor::from(server_config(server_dir, &[]).expect("server"));
        let client = tokio_rustls::TlsConnector::from(client_config(client_dir).expect("client"));
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("host-a").expect("name");
        let (served, _) = tokio::join!(server.accept(a), client.connect(name, b));
        match served {
            Ok(_) => "handshake succeeded".into(),
            Err(e) => tls_failure_reason(&e),
        }
    }

    #[tokio::test]
    async fn the_service_says_when_a_source_comes_with_another_cas_certificate() {
        let (ours, theirs) = (
            tempfile::tempdir().expect("dir"),
            tempfile::tempdir().expect("dir"),
        );
        let hosts = HostCert::new(vec!["host-a".to_string()]);
        LabCa::generate("Our CA")
            .expect("ca")
            .write_host_dir(ours.path(), &hosts)
            .expect("dir");
        LabCa::generate("Their CA")
            .expect("ca")
            .write_host_dir(theirs.path(), &hosts)
            .expect("dir");

        let reason = service_side_failure(ours.path(), theirs.path()).await;

        assert!(
            reason.contains("not issued by this host's CA")
                || reason.contains("refused our certificate"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn a_source_reads_the_services_busy_alert_as_a_busy_service() {
        let dir = tempfile::tempdir().expect("dir");
        LabCa::generate("Our CA")
            .expect("ca")
            .write_host_dir(dir.path(), &HostCert::new(vec!["host-a".to_string()]))
            .expect("dir");
        let client = tokio_rustls::TlsConnector::from(client_config(dir.path()).expect("client"));
        let (a, mut service) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("host-a").expect("name");
        use tokio::io::AsyncWriteExt;
        service.write_all(&BUSY_ALERT).await.expect("write");

        let err = client.connect(name, a).await.expect_err("refused");

        assert!(is_busy_refusal(&err), "{err}");
        assert!(tls_failure_reason(&err).contains("busy"));
    }

    #[test]
    fn an_empty_allow_list_allows_every_certificate_of_the_ca() {
        assert!(identity(&["host-z"]).allowed_by(&[]));
    }
}
