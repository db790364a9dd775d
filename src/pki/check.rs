//! `pki check`: every check of a PKI directory, each problem a [`Finding`] that names the file
//! and says what to do.
//!
//! The checks, in order:
//! 1. The directory exists.
//! 2. Each file exists, is readable, is not empty, and is PEM of the right kind (a DER file and
//!    plain garbage are told apart); each certificate parses as X.509.
//! 3. The CA certificate is a CA (basic constraints) and within its validity dates.
//! 4. Each role's certificate: within its validity dates (a warning under [`WARN_DAYS_LEFT`]
//!    days left), chains to the CA (webpki), has the key usages QEMU wants
//!    (DigitalSignature + KeyEncipherment; serverAuth or clientAuth), and its key matches it.
//! 5. The server certificate's names cover the host name (when one is given), the way GnuTLS
//!    matches `tls-hostname`: DNS/IP subject alternative names, or the CN when there are none.
//! 6. Ownership and modes: keys are not accessible to others; where a `qemu` or `libvirt-qemu`
//!    group exists, every file is readable by it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::{CA_CERT, Role};

/// A certificate with fewer days left than this gets a warning.
pub const WARN_DAYS_LEFT: i64 = 30;

/// The groups QEMU runs as on the distributions we know (Fedora/RHEL: `qemu`; Debian/Ubuntu under
/// libvirt: `libvirt-qemu`), in the order they are looked for.
const QEMU_GROUPS: [&str; 2] = ["qemu", "libvirt-qemu"];

/// What to check.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The roles whose certificate and key are checked (the CA certificate always is).
    pub roles: Vec<Role>,
    /// The name the server certificate must cover; `None` skips that check.
    pub hostname: Option<String>,
    /// The time validity dates are checked against.
    pub now: OffsetDateTime,
    /// The group QEMU runs as, whose read access is checked; `None` skips that check.
    pub qemu_group: Option<String>,
}

impl Default for CheckOptions {
    /// Both roles, no host name, now, and the QEMU group found on this host.
    fn default() -> Self {
        CheckOptions {
            roles: Role::ALL.to_vec(),
            hostname: None,
            now: OffsetDateTime::now_utc(),
            qemu_group: qemu_group(),
        }
    }
}

/// The first of `qemu`, `libvirt-qemu` that exists as a group on this host.
pub fn qemu_group() -> Option<String> {
    QEMU_GROUPS.iter().find_map(|name| {
        nix::unistd::Group::from_name(name)
            .ok()
            .flatten()
            .map(|g| g.name)
    })
}

/// How bad a finding is: any error makes the directory unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// What a finding is about; stable names for scripts (`--json`) and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FindingKind {
    DirMissing,
    Missing,
    Unreadable,
    Empty,
    DerNotPem,
    WrongPemType,
    Garbage,
    BadCertificate,
    BadKey,
    NotCa,
    Expired,
    NotYetValid,
    ExpiresSoon,
    OtherCa,
    ChainInvalid,
    WrongKeyUsage,
    KeyMismatch,
    WrongHostname,
    KeyWorldReadable,
    KeyNotOwnedByRoot,
    QemuGroupCannotRead,
    /// The server end has no `dh-params.pem`: QEMU generates parameters at every migration.
    NoDhParams,
}

/// One problem with one file, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub kind: FindingKind,
    /// The file (or directory) the finding is about.
    pub file: PathBuf,
    /// What is wrong, without the path.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl Finding {
    /// `<file>: <message>; <fix>`: the one-line form, starting with the file.
    pub fn reason(&self) -> String {
        format!("{}: {}; {}", self.file.display(), self.message, self.fix)
    }
}

/// What was found about one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileReport {
    pub file: PathBuf,
    pub exists: bool,
    /// Owner user name (or uid), when the file exists.
    pub owner: Option<String>,
    /// Owner group name (or gid), when the file exists.
    pub group: Option<String>,
    /// Permission bits in octal, e.g. `"0640"`, when the file exists.
    pub mode: Option<String>,
    /// Certificate subject, e.g. `"CN=host-a"`.
    pub subject: Option<String>,
    /// Certificate issuer.
    pub issuer: Option<String>,
    /// Certificate names (SANs, or the CN when there are none).
    pub names: Vec<String>,
    /// Certificate end of validity (RFC 3339).
    pub not_after: Option<String>,
}

/// The result of [`check_dir`]: serializable as the `--json` output of `pki check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    /// True when there is no error: the directory is usable for migration.
    pub usable: bool,
    pub errors: usize,
    pub warnings: usize,
    pub hostname: Option<String>,
    pub qemu_group: Option<String>,
    pub recommended: &'static str,
    pub files: Vec<FileReport>,
    pub findings: Vec<Finding>,
}

impl Report {
    /// The first error, if any.
    pub fn first_error(&self) -> Option<&Finding> {
        self.findings.iter().find(|f| f.severity == Severity::Error)
    }

    /// Findings of one kind.
    pub fn of_kind(&self, kind: FindingKind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }
}

/// Checks `dir` for both roles, and the server certificate against `hostname` when given.
pub fn check_dir(dir: &Path, hostname: Option<&str>) -> Report {
    let options = CheckOptions {
        hostname: hostname.map(str::to_string),
        ..CheckOptions::default()
    };
    check_dir_with(dir, &options)
}

/// Checks `dir` as `options` say.
pub fn check_dir_with(dir: &Path, options: &CheckOptions) -> Report {
    let mut checker = Checker {
        options,
        findings: Vec::new(),
        files: Vec::new(),
    };
    checker.run(dir);
    let errors = checker
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = checker.findings.len() - errors;
    let report = Report {
        dir: dir.to_path_buf(),
        usable: errors == 0,
        errors,
        warnings,
        hostname: options.hostname.clone(),
        qemu_group: options.qemu_group.clone(),
        recommended: "certificates 0644 root:root (or 0640 root:qemu); keys 0640 root:<QEMU's group> (0600 when QEMU runs as root)",
        files: checker.files,
        findings: checker.findings,
    };
    tracing::debug!(dir = %dir.display(), errors, warnings, "checked PKI directory");
    report
}

/// A certificate file that parsed.
struct LoadedCert {
    path: PathBuf,
    der: CertificateDer<'static>,
}

struct Checker<'o> {
    options: &'o CheckOptions,
    findings: Vec<Finding>,
    files: Vec<FileReport>,
}

/// What a file holds, as far as PEM goes.
enum Content<T> {
    Parsed(T),
    Bad,
}

impl Checker<'_> {
    fn push(
        &mut self,
        severity: Severity,
        kind: FindingKind,
        file: &Path,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.findings.push(Finding {
            severity,
            kind,
            file: file.to_path_buf(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn error(
        &mut self,
        kind: FindingKind,
        file: &Path,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Severity::Error, kind, file, message, fix);
    }

    fn warning(
        &mut self,
        kind: FindingKind,
        file: &Path,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.push(Severity::Warning, kind, file, message, fix);
    }

    fn run(&mut self, dir: &Path) {
        if !dir.is_dir() {
            let message = if dir.exists() {
                "is not a directory"
            } else {
                "directory does not exist"
            };
            self.error(
                FindingKind::DirMissing,
                dir,
                message,
                "create it with the five PEM files (`qemu-tls-migrate host secure` or `pki init`), or pass --dir",
            );
            return;
        }
        let ca = self.load_cert(&dir.join(CA_CERT), false);
        if let Some(ca) = &ca {
            self.check_ca(ca);
        }
        for role in self.options.roles.clone() {
            let cert = self.load_cert(&dir.join(role.cert_file()), false);
            let key = self.load_key(&dir.join(role.key_file()));
            if let Some(cert) = &cert {
                self.check_leaf(cert, ca.as_ref(), role);
                if let Some((key_path, key)) = &key {
                    self.check_key_match(cert, key_path, key, role);
                }
                if role == Role::Server
                    && let Some(hostname) = self.options.hostname.clone()
                {
                    self.check_hostname(cert, &hostname);
                }
            }
            if role == Role::Server {
                self.check_dh_params(dir);
            }
        }
    }

    /// A server directory without `dh-params.pem` works, but slowly: warn with the cost.
    fn check_dh_params(&mut self, dir: &Path) {
        let path = dir.join(super::DH_PARAMS);
        if !path.exists() {
            self.push(
                Severity::Warning,
                FindingKind::NoDhParams,
                &path,
                "missing: QEMU then generates Diffie-Hellman parameters each time it is a \
                 migration destination (90-460 ms per migration measured on QEMU 7.2, against \
                 2-3 ms with the file)",
                "write RFC 7919's ffdhe2048 group there (`qemu-tls-migrate host secure` or `pki \
                 init` do; or `certtool --get-dh-params --bits 2048 > dh-params.pem`)",
            );
        }
    }

    /// Stats and reads `path`, recording a [`FileReport`] and the findings about access.
    fn read(&mut self, path: &Path, is_key: bool) -> Option<Vec<u8>> {
        let mut report = FileReport {
            file: path.to_path_buf(),
            exists: false,
            owner: None,
            group: None,
            mode: None,
            subject: None,
            issuer: None,
            names: Vec::new(),
            not_after: None,
        };
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) => {
                self.files.push(report);
                if e.kind() == std::io::ErrorKind::NotFound {
                    let what = if is_key {
                        "the private key"
                    } else {
                        "the certificate"
                    };
                    self.error(
                        FindingKind::Missing,
                        path,
                        "does not exist",
                        format!(
                            "install {what} there (PEM), e.g. with `qemu-tls-migrate host secure`"
                        ),
                    );
                } else {
                    self.error(
                        FindingKind::Unreadable,
                        path,
                        format!("cannot be inspected ({e})"),
                        "check the permissions of the directory",
                    );
                }
                return None;
            }
        };
        let mode = meta.mode() & 0o7777;
        report.exists = true;
        report.owner = Some(user_name(meta.uid()));
        report.group = Some(group_name(meta.gid()));
        report.mode = Some(format!("{mode:04o}"));
        self.files.push(report);
        self.check_access(path, &meta, is_key);
        match fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.error(
                    FindingKind::Unreadable,
                    path,
                    format!("cannot be read ({e})"),
                    "make it readable by root and by QEMU's group (chmod 0640)",
                );
                None
            }
        }
    }

    fn check_access(&mut self, path: &Path, meta: &fs::Metadata, is_key: bool) {
        let mode = meta.mode() & 0o7777;
        let p = path.display();
        if is_key && mode & 0o007 != 0 {
            self.error(
                FindingKind::KeyWorldReadable,
                path,
                format!("private key is accessible to all users (mode {mode:04o})"),
                format!("chmod 0640 {p} (and chown root:<QEMU's group>), then replace the key: it may have leaked"),
            );
        }
        if is_key && meta.uid() != 0 {
            self.warning(
                FindingKind::KeyNotOwnedByRoot,
                path,
                format!(
                    "private key is owned by {} rather than root",
                    user_name(meta.uid())
                ),
                format!("chown root {p}"),
            );
        }
        if let Some(group) = self.options.qemu_group.clone() {
            let group_gid = nix::unistd::Group::from_name(&group)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw());
            let by_group = group_gid == Some(meta.gid()) && mode & 0o040 != 0;
            let by_others = mode & 0o004 != 0;
            if !by_group && !by_others {
                self.warning(
                    FindingKind::QemuGroupCannotRead,
                    path,
                    format!(
                        "QEMU's group {group} cannot read it (owner {}, group {}, mode {mode:04o})",
                        user_name(meta.uid()),
                        group_name(meta.gid())
                    ),
                    format!("chown root:{group} {p}; chmod 0640 {p}"),
                );
            }
        }
    }

    fn load_cert(&mut self, path: &Path, _is_key: bool) -> Option<LoadedCert> {
        let bytes = self.read(path, false)?;
        let der = match self.parse_pem(path, &bytes, false, |b| {
            CertificateDer::pem_slice_iter(b).find_map(Result::ok)
        }) {
            Content::Parsed(der) => der,
            Content::Bad => return None,
        };
        let parsed = x509_parser::parse_x509_certificate(&der);
        match parsed {
            Ok((_, cert)) => {
                if let Some(report) = self.files.iter_mut().find(|r| r.file == path) {
                    report.subject = Some(cert.subject().to_string());
                    report.issuer = Some(cert.issuer().to_string());
                    report.names = cert_names(&cert);
                    report.not_after = Some(cert.validity().not_after.to_string());
                }
            }
            Err(e) => {
                self.error(
                    FindingKind::BadCertificate,
                    path,
                    format!("holds a CERTIFICATE block that is not valid X.509 ({e})"),
                    "replace it with the certificate your CA issued",
                );
                return None;
            }
        }
        Some(LoadedCert {
            path: path.to_path_buf(),
            der,
        })
    }

    fn load_key(&mut self, path: &Path) -> Option<(PathBuf, PrivateKeyDer<'static>)> {
        let bytes = self.read(path, true)?;
        match self.parse_pem(path, &bytes, true, |b| {
            PrivateKeyDer::from_pem_slice(b).ok()
        }) {
            Content::Parsed(key) => Some((path.to_path_buf(), key)),
            Content::Bad => None,
        }
    }

    /// Parses PEM with `parse`, telling an empty file, a DER file, PEM of another kind and
    /// garbage apart when it fails.
    fn parse_pem<T>(
        &mut self,
        path: &Path,
        bytes: &[u8],
        is_key: bool,
        parse: impl Fn(&[u8]) -> Option<T>,
    ) -> Content<T> {
        let what = if is_key { "private key" } else { "certificate" };
        let want = if is_key {
            "-----BEGIN PRIVATE KEY----- (or RSA/EC PRIVATE KEY)"
        } else {
            "-----BEGIN CERTIFICATE-----"
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            self.error(
                FindingKind::Empty,
                path,
                "is empty",
                format!("put the PEM {what} there"),
            );
            return Content::Bad;
        }
        if let Some(parsed) = parse(bytes) {
            return Content::Parsed(parsed);
        }
        let p = path.display();
        if bytes.first() == Some(&0x30) && std::str::from_utf8(bytes).is_err() {
            let convert = if is_key {
                format!("openssl pkey -inform DER -in {p} -out {p}.pem")
            } else {
                format!("openssl x509 -inform DER -in {p} -out {p}.pem")
            };
            self.error(
                FindingKind::DerNotPem,
                path,
                format!("is DER (binary) where QEMU expects a PEM {what}"),
                format!("convert it: {convert}, then move {p}.pem to {p}"),
            );
            return Content::Bad;
        }
        let text = String::from_utf8_lossy(bytes);
        if let Some(label) = first_pem_label(&text) {
            let (message, fix) = if label.contains("ENCRYPTED") {
                (
                    format!("holds an encrypted key ({label}); QEMU cannot use a passphrase"),
                    format!("decrypt it: openssl pkey -in {p} -out {p}.plain, then move it over"),
                )
            } else {
                (
                    format!("holds a PEM {label} block where a {what} ({want}) is expected"),
                    format!("put the {what} in this file; check that files were not swapped"),
                )
            };
            self.error(FindingKind::WrongPemType, path, message, fix);
            return Content::Bad;
        }
        self.error(
            FindingKind::Garbage,
            path,
            format!("is neither PEM nor DER (no {want} line)"),
            format!("replace it with the PEM {what}"),
        );
        Content::Bad
    }

    fn check_ca(&mut self, ca: &LoadedCert) {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&ca.der) else {
            return;
        };
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            self.error(
                FindingKind::NotCa,
                &ca.path,
                format!(
                    "is not a CA certificate (no basic constraints CA:TRUE; subject {})",
                    cert.subject()
                ),
                "put the CA's certificate here, not a host certificate",
            );
        }
        self.check_dates(&ca.path, &cert, "CA certificate");
    }

    fn check_dates(&mut self, path: &Path, cert: &X509Certificate<'_>, what: &str) {
        let now = self.options.now.unix_timestamp();
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        let fix = format!("issue a new {what} and install it here");
        if now > not_after {
            self.error(
                FindingKind::Expired,
                path,
                format!("{what} expired on {}", cert.validity().not_after),
                fix,
            );
        } else if now < not_before {
            self.error(
                FindingKind::NotYetValid,
                path,
                format!(
                    "{what} is not valid before {} (check this host's clock)",
                    cert.validity().not_before
                ),
                "fix the clock, or issue a certificate valid from now",
            );
        } else {
            let days_left = (not_after - now) / 86_400;
            if days_left < WARN_DAYS_LEFT {
                self.warning(
                    FindingKind::ExpiresSoon,
                    path,
                    format!(
                        "{what} expires in {days_left} days ({})",
                        cert.validity().not_after
                    ),
                    "renew it soon; the next migration picks up replaced files without restarts",
                );
            }
        }
    }

    fn check_leaf(&mut self, leaf: &LoadedCert, ca: Option<&LoadedCert>, role: Role) {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&leaf.der) else {
            return;
        };
        let what = format!("{role} certificate");
        self.check_dates(&leaf.path, &cert, &what);
        self.check_usages(&leaf.path, &cert, role);
        let Some(ca) = ca else {
            return;
        };
        // Check the chain at a time inside the leaf's validity, so that an expired certificate
        // is reported once, as expired, and the chain check answers only "is it the CA's".
        let now = self.options.now.unix_timestamp();
        let at = now
            .max(cert.validity().not_before.timestamp())
            .min(cert.validity().not_after.timestamp())
            .max(0);
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.unsigned_abs()));
        let anchor = match webpki::anchor_from_trusted_cert(&ca.der) {
            Ok(anchor) => anchor,
            Err(e) => {
                self.error(
                    FindingKind::ChainInvalid,
                    &ca.path,
                    format!("cannot serve as a trust anchor ({e})"),
                    "replace it with the CA certificate",
                );
                return;
            }
        };
        let end_entity = match webpki::EndEntityCert::try_from(&leaf.der) {
            Ok(ee) => ee,
            Err(e) => {
                self.error(
                    FindingKind::BadCertificate,
                    &leaf.path,
                    format!("{what} cannot be used as an end-entity certificate ({e})"),
                    "issue a new certificate",
                );
                return;
            }
        };
        let usage = match role {
            Role::Server => webpki::KeyUsage::server_auth(),
            Role::Client => webpki::KeyUsage::client_auth(),
        };
        let anchors = [anchor];
        let result = end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            time,
            usage,
            None,
            None,
        );
        let result = result.map(|_| ());
        match result {
            Ok(()) => {}
            // Reported by check_usages, with a better message.
            Err(webpki::Error::RequiredEkuNotFoundContext(_)) => {}
            Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => {
                let issuer = cert.issuer().to_string();
                self.error(
                    FindingKind::OtherCa,
                    &leaf.path,
                    format!(
                        "{what} was not issued by the CA in {} (its issuer is {issuer})",
                        ca.path.display()
                    ),
                    format!(
                        "install the certificate issued by this CA, or the CA that issued it as {}",
                        ca.path.display()
                    ),
                );
            }
            Err(e) => {
                self.error(
                    FindingKind::ChainInvalid,
                    &leaf.path,
                    format!("{what} does not verify against {} ({e})", ca.path.display()),
                    "issue a new certificate from this CA",
                );
            }
        }
    }

    fn check_usages(&mut self, path: &Path, cert: &X509Certificate<'_>, role: Role) {
        let what = format!("{role} certificate");
        match cert.key_usage() {
            Ok(Some(ku)) => {
                let mut missing = Vec::new();
                if !ku.value.digital_signature() {
                    missing.push("digitalSignature");
                }
                if !ku.value.key_encipherment() {
                    missing.push("keyEncipherment");
                }
                if !missing.is_empty() {
                    self.error(
                        FindingKind::WrongKeyUsage,
                        path,
                        format!("{what}'s key usage lacks {}", missing.join(" and ")),
                        "issue a certificate with key usage digitalSignature, keyEncipherment",
                    );
                }
            }
            Ok(None) => {}
            Err(e) => self.error(
                FindingKind::BadCertificate,
                path,
                format!("{what} has an unreadable key usage extension ({e})"),
                "issue a new certificate",
            ),
        }
        let purpose = match role {
            Role::Server => "serverAuth",
            Role::Client => "clientAuth",
        };
        let wanted = |e: &x509_parser::extensions::ExtendedKeyUsage<'_>| match role {
            Role::Server => e.server_auth || e.any,
            Role::Client => e.client_auth || e.any,
        };
        match cert.extended_key_usage() {
            Ok(Some(eku)) if !wanted(eku.value) => self.error(
                FindingKind::WrongKeyUsage,
                path,
                format!("{what}'s extended key usage lacks {purpose}"),
                format!("issue a certificate with extended key usage {purpose}"),
            ),
            Ok(_) => {}
            Err(e) => self.error(
                FindingKind::BadCertificate,
                path,
                format!("{what} has an unreadable extended key usage extension ({e})"),
                "issue a new certificate",
            ),
        }
    }

    fn check_key_match(
        &mut self,
        cert: &LoadedCert,
        key_path: &Path,
        key: &PrivateKeyDer<'static>,
        role: Role,
    ) {
        let signing_key = match rustls::crypto::ring::sign::any_supported_type(key) {
            Ok(k) => k,
            Err(e) => {
                self.error(
                    FindingKind::BadKey,
                    key_path,
                    format!("private key cannot be loaded ({e})"),
                    "use an unencrypted RSA, ECDSA (P-256/P-384) or Ed25519 key in PEM",
                );
                return;
            }
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&cert.der) else {
            return;
        };
        let Some(key_spki) = signing_key.public_key() else {
            return;
        };
        if key_spki.as_ref() != parsed.public_key().raw {
            self.error(
                FindingKind::KeyMismatch,
                key_path,
                format!(
                    "private key does not match the {role} certificate {}",
                    cert.path.display()
                ),
                "install the key the certificate was issued for (or re-issue the certificate for this key)",
            );
        }
    }

    fn check_hostname(&mut self, cert: &LoadedCert, hostname: &str) {
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&cert.der) else {
            return;
        };
        let names = cert_names(&parsed);
        if names.iter().any(|n| name_matches(n, hostname)) {
            return;
        }
        // Cross-check with webpki when the certificate has SANs (it ignores the CN).
        if let Ok(server_name) = ServerName::try_from(hostname)
            && let Ok(ee) = webpki::EndEntityCert::try_from(&cert.der)
            && ee.verify_is_valid_for_subject_name(&server_name).is_ok()
        {
            return;
        }
        self.error(
            FindingKind::WrongHostname,
            &cert.path,
            format!(
                "server certificate names [{}] do not cover the host name {hostname:?}",
                names.join(", ")
            ),
            format!(
                "issue a server certificate with {hostname} as a subject alternative name, or pass the name it has with --hostname"
            ),
        );
    }
}

/// The certificate's names the way GnuTLS matches a host name: DNS and IP SANs, or the CN when
/// there is no DNS SAN.
fn cert_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    let mut dns = false;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => {
                    dns = true;
                    names.push((*n).to_string());
                }
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        names.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if !dns {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
        );
    }
    names
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// Case-insensitive match, with a leading `*.` wildcard covering one label.
fn name_matches(pattern: &str, hostname: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let hostname = hostname.trim_end_matches('.').to_ascii_lowercase();
    if pattern == hostname {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix("*.")
        && let Some((first, rest)) = hostname.split_once('.')
    {
        return !first.is_empty() && rest == suffix;
    }
    false
}

fn first_pem_label(text: &str) -> Option<String> {
    let start = text.find("-----BEGIN ")? + "-----BEGIN ".len();
    let end = text[start..].find("-----")?;
    Some(text[start..start + end].to_string())
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{CLIENT_KEY, HostCert, LabCa, SERVER_CERT, SERVER_KEY};
    use std::os::unix::fs::PermissionsExt;

    fn good_dir(names: &[&str]) -> (tempfile::TempDir, LabCa) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = LabCa::generate("Test CA").expect("ca");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        ca.write_host_dir(tmp.path(), &HostCert::new(names))
            .expect("write");
        (tmp, ca)
    }

    fn options(hostname: Option<&str>) -> CheckOptions {
        CheckOptions {
            hostname: hostname.map(str::to_string),
            qemu_group: None,
            ..CheckOptions::default()
        }
    }

    fn kinds(report: &Report) -> Vec<FindingKind> {
        report.findings.iter().map(|f| f.kind).collect()
    }

    #[test]
    fn good_dir_has_no_findings() {
        let (tmp, _ca) = good_dir(&["host-a"]);

        let report = check_dir_with(tmp.path(), &options(Some("host-a")));

        assert!(report.usable, "{:#?}", report.findings);
        assert!(report.findings.is_empty(), "{:#?}", report.findings);
        assert_eq!(report.files.len(), 5);
    }

    #[test]
    fn a_server_dir_without_dh_params_is_usable_with_a_warning_naming_the_cost() {
        let (tmp, _ca) = good_dir(&["host-a"]);
        std::fs::remove_file(tmp.path().join(crate::pki::DH_PARAMS)).expect("remove");

        let report = check_dir_with(tmp.path(), &options(Some("host-a")));

        assert!(report.usable);
        assert_eq!(kinds(&report), vec![FindingKind::NoDhParams]);
        assert!(
            report.findings[0].message.contains("ms"),
            "{:?}",
            report.findings
        );
    }

    #[test]
    fn wrong_hostname_is_an_error_on_the_server_cert() {
        let (tmp, _ca) = good_dir(&["host-a"]);

        let report = check_dir_with(tmp.path(), &options(Some("host-b")));

        assert_eq!(kinds(&report), vec![FindingKind::WrongHostname]);
        assert_eq!(report.findings[0].file, tmp.path().join(SERVER_CERT));
    }

    #[test]
    fn wildcard_and_ip_names_match() {
        let (tmp, _ca) = good_dir(&["*.lab.example", "192.0.2.7"]);

        assert!(check_dir_with(tmp.path(), &options(Some("h1.lab.example"))).usable);
        assert!(check_dir_with(tmp.path(), &options(Some("192.0.2.7"))).usable);
        assert!(!check_dir_with(tmp.path(), &options(Some("a.b.lab.example"))).usable);
    }

    #[test]
    fn cert_from_another_ca_is_other_ca() {
        let (tmp, _ca) = good_dir(&["host-a"]);
        let other = LabCa::generate("Other CA").expect("other");
        let (pem, key) = other
            .issue_pem(&HostCert::new(vec!["host-a".to_string()]), Role::Server)
            .expect("issue");
        fs::write(tmp.path().join(SERVER_CERT), pem).expect("write");
        fs::write(tmp.path().join(SERVER_KEY), key).expect("write");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(kinds(&report), vec![FindingKind::OtherCa]);
    }

    #[test]
    fn expired_and_soon_expiring_certs() {
        let (tmp, ca) = good_dir(&["host-a"]);
        let now = OffsetDateTime::now_utc();
        let mut host = HostCert::new(vec!["host-a".to_string()]);
        host.not_before = now - time::Duration::days(20);
        host.not_after = now - time::Duration::days(1);
        ca.write_host_dir(tmp.path(), &host).expect("write");

        let expired = check_dir_with(tmp.path(), &options(None));
        host.not_after = now + time::Duration::days(5);
        ca.write_host_dir(tmp.path(), &host).expect("write");
        let soon = check_dir_with(tmp.path(), &options(None));

        assert_eq!(
            kinds(&expired),
            vec![FindingKind::Expired, FindingKind::Expired]
        );
        assert_eq!(
            kinds(&soon),
            vec![FindingKind::ExpiresSoon, FindingKind::ExpiresSoon]
        );
        assert!(soon.usable);
    }

    #[test]
    fn key_of_another_cert_is_a_mismatch() {
        let (tmp, ca) = good_dir(&["host-a"]);
        let (_, key) = ca
            .issue_pem(&HostCert::new(vec!["host-a".to_string()]), Role::Client)
            .expect("issue");
        fs::write(tmp.path().join(CLIENT_KEY), key).expect("write");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(kinds(&report), vec![FindingKind::KeyMismatch]);
        assert_eq!(report.findings[0].file, tmp.path().join(CLIENT_KEY));
    }

    #[test]
    fn world_readable_key_is_an_error() {
        let (tmp, _ca) = good_dir(&["host-a"]);
        fs::set_permissions(
            tmp.path().join(SERVER_KEY),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(kinds(&report), vec![FindingKind::KeyWorldReadable]);
        assert!(report.findings[0].fix.contains("chmod 0640"));
    }

    #[test]
    fn empty_garbage_der_and_swapped_files_are_told_apart() {
        let (tmp, _ca) = good_dir(&["host-a"]);
        let cert_der = CertificateDer::from_pem_file(tmp.path().join(SERVER_CERT)).expect("pem");
        let key_pem = fs::read(tmp.path().join(SERVER_KEY)).expect("key");
        fs::write(tmp.path().join(CA_CERT), b"").expect("write");
        fs::write(tmp.path().join(SERVER_CERT), cert_der.as_ref()).expect("write");
        fs::write(tmp.path().join(SERVER_KEY), b"this is not a key\n").expect("write");
        fs::write(tmp.path().join(crate::pki::CLIENT_CERT), key_pem).expect("write");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(
            kinds(&report),
            vec![
                FindingKind::Empty,
                FindingKind::DerNotPem,
                FindingKind::Garbage,
                FindingKind::WrongPemType
            ]
        );
    }

    #[test]
    fn not_yet_valid_cert_mentions_the_clock() {
        let (tmp, ca) = good_dir(&["host-a"]);
        let now = OffsetDateTime::now_utc();
        let mut host = HostCert::new(vec!["host-a".to_string()]);
        host.not_before = now + time::Duration::days(2);
        host.not_after = now + time::Duration::days(300);
        ca.write_host_dir(tmp.path(), &host).expect("write");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(
            kinds(&report),
            vec![FindingKind::NotYetValid, FindingKind::NotYetValid]
        );
        assert!(report.findings[0].message.contains("clock"));
    }

    #[test]
    fn host_cert_as_ca_is_not_a_ca() {
        let (tmp, _ca) = good_dir(&["host-a"]);
        fs::copy(tmp.path().join(SERVER_CERT), tmp.path().join(CA_CERT)).expect("copy");

        let report = check_dir_with(tmp.path(), &options(None));

        assert_eq!(report.findings[0].kind, FindingKind::NotCa);
        assert!(!report.usable);
    }

    #[test]
    fn name_matching_rules() {
        assert!(name_matches("Host-A", "host-a"));
        assert!(name_matches("*.example.org", "a.example.org"));
        assert!(!name_matches("*.example.org", "example.org"));
        assert!(!name_matches("host-a", "host-ab"));
    }
}
