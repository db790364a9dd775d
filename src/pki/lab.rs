//! Lab PKIs made with rcgen: a CA, and per host the five files QEMU's `tls-creds-x509` reads.
//!
//! Keys are ECDSA P-256 (QEMU 7.2's GnuTLS accepts them). Leaf certificates carry what QEMU
//! checks: key usage DigitalSignature + KeyEncipherment, extended key usage serverAuth (server
//! certificate) or clientAuth (client certificate), and a subject of just `CN=<first name>` so
//! that an `authz-simple` object can name the peer as `CN=host-a`, unless another subject is
//! chosen ([`HostCert::with_subject`]: several RDNs, any string types, as CloudStack's CA or
//! another one would issue them).

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use super::{CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, PkiError, SERVER_CERT, SERVER_KEY};

/// Mode of a PKI directory: everyone may list it (QEMU may run as another user).
const DIR_MODE: u32 = 0o755;
/// Mode of certificates: public data.
const CERT_MODE: u32 = 0o644;
/// Mode of host keys: owner and QEMU's group (`chown root:qemu` where QEMU is not root).
const HOST_KEY_MODE: u32 = 0o640;
/// Mode of the CA key: owner only; QEMU never reads it.
const CA_KEY_MODE: u32 = 0o600;

/// How long a lab CA is valid.
const CA_VALIDITY: Duration = Duration::days(3650);
/// How long a lab host certificate is valid by default.
const HOST_VALIDITY: Duration = Duration::days(365);
/// How far back validity starts, so that small clock differences between hosts do not matter.
const BACKDATE: Duration = Duration::hours(1);

/// The certificate to issue for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCert {
    /// The host's names: the first is the CN; all are subject alternative names (IP SANs for
    /// those that parse as IP addresses, DNS SANs otherwise).
    pub names: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Serial number; `None` lets rcgen pick one (a hash of the public key).
    pub serial: Option<u64>,
    /// The subject, RDNs in this order; `None`: `CN=<first name>`.
    pub subject: Option<DistinguishedName>,
}

impl HostCert {
    /// A certificate for `names`, valid from an hour ago for 365 days.
    pub fn new(names: impl Into<Vec<String>>) -> HostCert {
        let now = OffsetDateTime::now_utc();
        HostCert {
            names: names.into(),
            not_before: now - BACKDATE,
            not_after: now + HOST_VALIDITY,
            serial: None,
            subject: None,
        }
    }

    /// The same certificate with `subject` instead of `CN=<first name>` (one attribute per RDN,
    /// in the order pushed, each of the string type given).
    pub fn with_subject(mut self, subject: DistinguishedName) -> HostCert {
        self.subject = Some(subject);
        self
    }

    fn params(&self, ekus: Vec<ExtendedKeyUsagePurpose>) -> Result<CertificateParams, PkiError> {
        let cn = self.names.first().ok_or(PkiError::NoHostNames)?;
        for name in &self.names {
            check_host_name(name)?;
        }
        let mut params =
            CertificateParams::new(self.names.clone()).map_err(|source| PkiError::Generate {
                what: format!("certificate parameters for {cn}"),
                source,
            })?;
        params.distinguished_name = self.subject.clone().unwrap_or_else(|| {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn.as_str());
            dn
        });
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.serial_number = self
            .serial
            .map(|serial| SerialNumber::from_slice(&serial.to_be_bytes()));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        Ok(params)
    }
}

/// Host names double as directory names under `pki init --out`, so keep them tame.
fn check_host_name(name: &str) -> Result<(), PkiError> {
    let tame = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '*'));
    if tame && name != ".." {
        Ok(())
    } else {
        Err(PkiError::BadHostName {
            name: name.to_string(),
        })
    }
}

/// A lab certificate authority: its certificate and the key it signs with.
pub struct LabCa {
    cert_pem: String,
    key_pem: String,
    common_name: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for LabCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LabCa")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

impl LabCa {
    /// Makes a new CA (ECDSA P-256, valid from an hour ago for ten years) named `CN=common_name`.
    pub fn generate(common_name: &str) -> Result<LabCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: "CA key".to_string(),
                source,
            }
        })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: format!("CA certificate {common_name}"),
                source,
            })?;
        tracing::info!(common_name, "generated lab CA");
        Ok(LabCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            common_name: common_name.to_string(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA written by [`LabCa::write_ca`]: `ca-cert.pem` and `ca-key.pem` in `dir`.
    pub fn load(dir: &Path) -> Result<LabCa, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::BadCaKey {
            path: key_path.clone(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::BadCaCert {
                path: cert_path.clone(),
                source,
            })?;
        let common_name = common_name_of(&cert_pem).unwrap_or_default();
        tracing::info!(dir = %dir.display(), common_name, "loaded lab CA");
        Ok(LabCa {
            cert_pem,
            key_pem,
            common_name,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// Writes `ca-cert.pem` (0644) and `ca-key.pem` (0600) into `dir`, creating it.
    pub fn write_ca(&self, dir: &Path) -> Result<(), PkiError> {
        create_dir(dir)?;
        write_file(&dir.join(CA_CERT), self.cert_pem.as_bytes(), CERT_MODE)?;
        write_file(&dir.join(CA_KEY), self.key_pem.as_bytes(), CA_KEY_MODE)?;
        Ok(())
    }

    /// Issues a server and a client certificate for `host` and writes the five files QEMU reads
    /// (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`)
    /// into `dir`, creating it (0755). Certificates are 0644, keys 0640. Existing files are
    /// replaced atomically (renamed over), so a QEMU reading them sees the old or the new file.
    pub fn write_host_dir(&self, dir: &Path, host: &HostCert) -> Result<(), PkiError> {
        let (server_cert, server_key) =
            self.issue(host, vec![ExtendedKeyUsagePurpose::ServerAuth])?;
        let (client_cert, client_key) =
            self.issue(host, vec![ExtendedKeyUsagePurpose::ClientAuth])?;
        create_dir(dir)?;
        write_file(&dir.join(CA_CERT), self.cert_pem.as_bytes(), CERT_MODE)?;
        write_key(&dir.join(SERVER_KEY), server_key.as_bytes())?;
        write_file(&dir.join(SERVER_CERT), server_cert.as_bytes(), CERT_MODE)?;
        write_key(&dir.join(CLIENT_KEY), client_key.as_bytes())?;
        write_file(&dir.join(CLIENT_CERT), client_cert.as_bytes(), CERT_MODE)?;
        write_file(
            &dir.join(super::DH_PARAMS),
            super::FFDHE2048_PEM.as_bytes(),
            CERT_MODE,
        )?;
        tracing::info!(dir = %dir.display(), names = ?host.names, "wrote host PKI directory");
        Ok(())
    }

    /// Issues one certificate (PEM) and its new key (PEM, PKCS#8) for `host`.
    pub fn issue_pem(
        &self,
        host: &HostCert,
        role: super::Role,
    ) -> Result<(String, String), PkiError> {
        let eku = match role {
            super::Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
            super::Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        };
        self.issue(host, vec![eku])
    }

    /// Issues one certificate good for both roles (serverAuth and clientAuth), the way
    /// CloudStack's CA issues a host's `cloud.crt`, and its new key: (certificate PEM, key PEM).
    pub fn issue_dual_pem(&self, host: &HostCert) -> Result<(String, String), PkiError> {
        self.issue(
            host,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn issue(
        &self,
        host: &HostCert,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<(String, String), PkiError> {
        let params = host.params(ekus)?;
        let cn = host.names.first().map(String::as_str).unwrap_or_default();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| {
            PkiError::Generate {
                what: format!("key for {cn}"),
                source,
            }
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: format!("certificate for {cn}"),
                source,
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What [`init_lab`] made.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LabSummary {
    /// The directory holding `ca-cert.pem` and `ca-key.pem`.
    pub out: PathBuf,
    /// The CA's common name.
    pub ca_common_name: String,
    /// One PKI directory per host (`out/<host>`), in the order given.
    pub host_dirs: Vec<PathBuf>,
}

/// Makes a lab PKI under `out`: a new CA (`out/ca-cert.pem`, `out/ca-key.pem`) and, for each
/// host, `out/<host>/` holding the five files QEMU reads, with the host name as CN and SAN.
pub fn init_lab(out: &Path, hosts: &[String]) -> Result<LabSummary, PkiError> {
    if hosts.is_empty() {
        return Err(PkiError::NoHostNames);
    }
    for host in hosts {
        check_host_name(host)?;
    }
    let ca_common_name = "qemu-tls-migrate lab CA".to_string();
    let ca = LabCa::generate(&ca_common_name)?;
    ca.write_ca(out)?;
    let mut host_dirs = Vec::with_capacity(hosts.len());
    for host in hosts {
        let dir = out.join(host);
        ca.write_host_dir(&dir, &HostCert::new(vec![host.clone()]))?;
        host_dirs.push(dir);
    }
    Ok(LabSummary {
        out: out.to_path_buf(),
        ca_common_name,
        host_dirs,
    })
}

fn common_name_of(cert_pem: &str) -> Option<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    let existed = dir.is_dir();
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })?;
    if !existed {
        fs::set_permissions(dir, fs::Permissions::from_mode(DIR_MODE)).map_err(|source| {
            PkiError::Io {
                action: "set the mode of",
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Writes a host key: mode 0640 and, where this host has a QEMU group (`qemu`,
/// `libvirt-qemu`) and we may change groups, owned by that group, so a QEMU that runs as that
/// user (libvirt's) can read it, the way a real host is set up.
fn write_key(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    let group = super::qemu_group()
        .filter(|_| nix::unistd::geteuid().is_root())
        .and_then(|name| nix::unistd::Group::from_name(&name).ok().flatten())
        .map(|g| g.gid);
    write_file_owned(path, contents, HOST_KEY_MODE, group)
}

/// Writes `path` atomically with `mode`: a temporary file in the same directory, renamed over.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    write_file_owned(path, contents, mode, None)
}

/// [`write_file`], with the file's group set to `group` when given.
fn write_file_owned(
    path: &Path,
    contents: &[u8],
    mode: u32,
    group: Option<nix::unistd::Gid>,
) -> Result<(), PkiError> {
    let io_err = |action: &'static str| {
        let path = path.to_path_buf();
        move |source| PkiError::Io {
            action,
            path,
            source,
        }
    };
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    let mut tmp =
        tempfile::NamedTempFile::new_in(parent).map_err(io_err("create a file next to"))?;
    if let Some(gid) = group {
        nix::unistd::fchown(tmp.as_file(), None, Some(gid))
            .map_err(|e| io_err("set the group of")(std::io::Error::from(e)))?;
    }
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of"))?;
    tmp.write_all(contents).map_err(io_err("write"))?;
    tmp.as_file().sync_all().map_err(io_err("write"))?;
    tmp.persist(path).map_err(|e| io_err("replace")(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;

    fn parse(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate")
    }

    #[test]
    fn host_cert_has_cn_sans_and_role_usages() {
        let ca = LabCa::generate("Test CA").expect("ca");
        let host = HostCert::new(vec!["host-a".to_string(), "10.0.0.1".to_string()]);

        let (server_pem, _) = ca
            .issue_pem(&host, crate::pki::Role::Server)
            .expect("server");
        let (client_pem, _) = ca
            .issue_pem(&host, crate::pki::Role::Client)
            .expect("client");

        let server_der = parse(&server_pem);
        let (_, server) = x509_parser::parse_x509_certificate(&server_der).expect("x509");
        assert_eq!(server.subject().to_string(), "CN=host-a");
        assert_eq!(server.issuer().to_string(), "CN=Test CA");
        let ku = server.key_usage().expect("ku").expect("ku present").value;
        assert!(ku.digital_signature() && ku.key_encipherment());
        let eku = server
            .extended_key_usage()
            .expect("eku")
            .expect("eku")
            .value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans = server
            .subject_alternative_name()
            .expect("san")
            .expect("san present")
            .value;
        assert_eq!(sans.general_names.len(), 2);
        let client_der = parse(&client_pem);
        let (_, client) = x509_parser::parse_x509_certificate(&client_der).expect("x509");
        let eku = client
            .extended_key_usage()
            .expect("eku")
            .expect("eku")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn ca_is_a_ca_with_cert_signing() {
        let ca = LabCa::generate("Test CA").expect("ca");

        let der = parse(ca.cert_pem());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");

        assert!(cert.basic_constraints().expect("bc").expect("bc").value.ca);
        let ku = cert.key_usage().expect("ku").expect("ku").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
    }

    #[test]
    fn serial_is_used_when_given() {
        let ca = LabCa::generate("Test CA").expect("ca");
        let mut host = HostCert::new(vec!["host-a".to_string()]);
        host.serial = Some(0x1234);

        let (pem, _) = ca
            .issue_pem(&host, crate::pki::Role::Server)
            .expect("server");

        let der = parse(&pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert_eq!(cert.raw_serial(), &[0x12, 0x34][..]);
    }

    #[test]
    fn write_host_dir_sets_modes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("host-a");
        let ca = LabCa::generate("Test CA").expect("ca");

        ca.write_host_dir(&dir, &HostCert::new(vec!["host-a".to_string()]))
            .expect("write");

        let mode = |name: &str| {
            fs::metadata(dir.join(name))
                .expect("metadata")
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode(CA_CERT), 0o644);
        assert_eq!(mode(SERVER_CERT), 0o644);
        assert_eq!(mode(CLIENT_CERT), 0o644);
        assert_eq!(mode(SERVER_KEY), 0o640);
        assert_eq!(mode(CLIENT_KEY), 0o640);
        assert_eq!(
            fs::metadata(&dir).expect("dir").permissions().mode() & 0o7777,
            0o755
        );
    }

    #[test]
    fn load_reads_back_what_write_ca_wrote_and_signs_with_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = LabCa::generate("Test CA").expect("ca");
        ca.write_ca(tmp.path()).expect("write ca");

        let loaded = LabCa::load(tmp.path()).expect("load");
        loaded
            .write_host_dir(&tmp.path().join("h"), &HostCert::new(vec!["h".to_string()]))
            .expect("write host");

        assert_eq!(loaded.common_name(), "Test CA");
        assert_eq!(
            fs::metadata(tmp.path().join(CA_KEY))
                .expect("key")
                .permissions()
                .mode()
                & 0o7777,
            0o600
        );
        assert!(crate::pki::assess(&tmp.path().join("h"), crate::pki::Role::Server).is_secured());
    }

    #[test]
    fn init_lab_makes_one_dir_per_host() {
        let tmp = tempfile::tempdir().expect("tempdir");

        let summary =
            init_lab(tmp.path(), &["host-a".to_string(), "host-b".to_string()]).expect("init");

        assert_eq!(
            summary.host_dirs,
            vec![tmp.path().join("host-a"), tmp.path().join("host-b")]
        );
        assert!(tmp.path().join(CA_KEY).is_file());
        for dir in &summary.host_dirs {
            assert!(crate::pki::assess(dir, crate::pki::Role::Server).is_secured());
            assert!(crate::pki::assess(dir, crate::pki::Role::Client).is_secured());
        }
    }

    #[test]
    fn bad_host_names_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");

        let err = init_lab(tmp.path(), &["../etc".to_string()]).expect_err("refused");

        assert!(matches!(err, PkiError::BadHostName { .. }), "{err}");
    }

    #[test]
    fn load_of_missing_dir_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");

        let err = LabCa::load(tmp.path()).expect_err("missing");

        assert!(err.to_string().contains(CA_CERT), "{err}");
    }
}
