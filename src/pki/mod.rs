//! PKI directories in QEMU's `tls-creds-x509` layout: validate them, decide whether a side of a
//! migration is *secured*, and make lab PKIs.
//!
//! QEMU's `tls-creds-x509` object reads a directory (`dir=`) holding:
//!
//! | file | used by |
//! |---|---|
//! | `ca-cert.pem` | both ends, to verify the peer |
//! | `server-cert.pem`, `server-key.pem` | the migration destination (`endpoint: server`) |
//! | `client-cert.pem`, `client-key.pem` | the migration source (`endpoint: client`) |
//!
//! - [`check_dir`] runs every check (`pki check`) and returns a serializable [`Report`] whose
//!   findings each name a file and say what to do.
//! - [`assess`] runs the checks one side needs and answers [`Security::Secured`] or
//!   [`Security::Unsecured`] with the first reason (what `--transport auto` uses).
//! - [`LabCa`], [`HostCert`] and [`init_lab`] make a lab CA and host certificates with rcgen.
//! - [`certificate_authz_dn`] gives a certificate's subject as QEMU's `authz-simple` compares it
//!   (GnuTLS's string, [`dn`]).

mod check;
pub mod dn;
mod error;
mod lab;

use std::fmt;
use std::path::Path;

pub use check::{
    CheckOptions, FileReport, Finding, FindingKind, Report, Severity, WARN_DAYS_LEFT, check_dir,
    check_dir_with, qemu_group,
};
pub use dn::{DnError, certificate_authz_dn, qemu_authz_dn};
pub use error::PkiError;
pub use lab::{HostCert, LabCa, LabSummary, init_lab};
/// What a chosen certificate subject is made of ([`HostCert::with_subject`]).
pub use rcgen::{DistinguishedName, DnType, DnValue};

/// Where QEMU looks when `default_tls_x509_cert_dir` is not set, and where CloudStack puts the
/// files (`qemu.conf`'s default).
pub const DEFAULT_PKI_DIR: &str = "/etc/pki/qemu";
/// The CA certificate both ends verify their peer with.
pub const CA_CERT: &str = "ca-cert.pem";
/// The CA's private key; only in a lab CA directory, never in a host's PKI directory.
pub const CA_KEY: &str = "ca-key.pem";
/// The destination's (TLS server's) certificate.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The destination's (TLS server's) private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The source's (TLS client's) certificate.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The source's (TLS client's) private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// Diffie-Hellman parameters for the server end. Without this file QEMU 7.2 generates
/// parameters at every server `object-add` (90-460 ms measured, against 2-3 ms with it).
pub const DH_PARAMS: &str = "dh-params.pem";

/// RFC 7919's `ffdhe2048` group (the published prime, generator 2, and the recommended
/// private-value length of 256 bits), as PKCS#3 PEM: what `pki init` and `host secure` write
/// as [`DH_PARAMS`]. A standard group needs no generation and hides nothing.
pub const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----
MIIBDAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAgICAQA=
-----END DH PARAMETERS-----\n";

/// Which end of a TLS connection a host plays: QEMU's `tls-creds-x509` `endpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The migration destination: it listens (`endpoint: server`).
    Server,
    /// The migration source: it connects (`endpoint: client`).
    Client,
}

impl Role {
    /// Both roles, server first.
    pub const ALL: [Role; 2] = [Role::Server, Role::Client];

    /// The certificate file name this role uses.
    pub fn cert_file(self) -> &'static str {
        match self {
            Role::Server => SERVER_CERT,
            Role::Client => CLIENT_CERT,
        }
    }

    /// The private key file name this role uses.
    pub fn key_file(self) -> &'static str {
        match self {
            Role::Server => SERVER_KEY,
            Role::Client => CLIENT_KEY,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Client => "client",
        })
    }
}

/// Whether one side may take part in a TLS migration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Security {
    /// The directory holds a usable CA certificate and the certificate and key for the role.
    Secured,
    /// No TLS file is installed at all (CloudStack's "no certificates"): the host is
    /// deliberately unsecured. `reason` says what was looked for where.
    Unsecured { reason: String },
    /// TLS files are installed but fail the checks: a secured host that is broken, never to be
    /// treated as unsecured. Each problem names its file and the fix.
    Broken { problems: Vec<String> },
}

impl Security {
    /// True for [`Security::Secured`].
    pub fn is_secured(&self) -> bool {
        matches!(self, Security::Secured)
    }
}

/// Every file a PKI directory may hold; a directory with none of them is unsecured.
const TLS_FILES: [&str; 5] = [CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY];

/// Decides whether `dir` is usable by the `role` end of a TLS migration: the CA certificate and
/// the role's certificate and key exist, are readable, parse as PEM, the certificate chains to the
/// CA, is within its validity dates and fits the role, the key matches it, and the key is not
/// readable by others. Host names are not checked (the caller knows them; see [`check_dir_with`]).
///
/// A directory that holds none of the TLS files (or does not exist) is
/// [`Security::Unsecured`]; one that holds any of them and fails a check is
/// [`Security::Broken`], with every error found.
pub fn assess(dir: &Path, role: Role) -> Security {
    let installed = TLS_FILES
        .iter()
        .any(|f| std::fs::symlink_metadata(dir.join(f)).is_ok());
    let verdict = if !installed {
        Security::Unsecured {
            reason: format!(
                "no TLS certificates are installed in {} ({CA_CERT}, {}, {})",
                dir.display(),
                role.cert_file(),
                role.key_file()
            ),
        }
    } else {
        let options = CheckOptions {
            roles: vec![role],
            hostname: None,
            ..CheckOptions::default()
        };
        let report = check_dir_with(dir, &options);
        let problems: Vec<String> = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(Finding::reason)
            .collect();
        if problems.is_empty() {
            Security::Secured
        } else {
            Security::Broken { problems }
        }
    };
    tracing::debug!(dir = %dir.display(), %role, ?verdict, "assessed PKI directory");
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_displays_as_qemu_endpoint_names() {
        assert_eq!(Role::Server.to_string(), "server");
        assert_eq!(Role::Client.to_string(), "client");
    }

    #[test]
    fn assess_good_lab_dir_is_secured_for_both_roles() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = LabCa::generate("Test CA").expect("ca");
        ca.write_host_dir(tmp.path(), &HostCert::new(["host-a".to_string()]))
            .expect("host dir");

        assert_eq!(assess(tmp.path(), Role::Server), Security::Secured);
        assert_eq!(assess(tmp.path(), Role::Client), Security::Secured);
    }

    #[test]
    fn assess_missing_key_names_the_file() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = LabCa::generate("Test CA").expect("ca");
        ca.write_host_dir(tmp.path(), &HostCert::new(["host-a".to_string()]))
            .expect("host dir");
        std::fs::remove_file(tmp.path().join(SERVER_KEY)).expect("remove");

        let verdict = assess(tmp.path(), Role::Server);

        let expected = format!("{}: does not exist", tmp.path().join(SERVER_KEY).display());
        match verdict {
            Security::Broken { problems } => {
                assert!(problems[0].starts_with(&expected), "{problems:?}")
            }
            other => panic!("a missing server key is a broken secured host: {other:?}"),
        }
        assert_eq!(assess(tmp.path(), Role::Client), Security::Secured);
    }

    #[test]
    fn assess_missing_directory_names_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nope");

        let verdict = assess(&dir, Role::Client);

        match verdict {
            Security::Unsecured { reason } => {
                assert!(reason.contains(&dir.display().to_string()), "{reason}")
            }
            other => panic!("a missing directory is unsecured: {other:?}"),
        }
    }

    #[test]
    fn assess_keys_readable_by_all_is_broken_not_unsecured() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let ca = LabCa::generate("Test CA").expect("ca");
        ca.write_host_dir(tmp.path(), &HostCert::new(["host-a".to_string()]))
            .expect("host dir");
        let key = tmp.path().join(CLIENT_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");

        let verdict = assess(tmp.path(), Role::Client);

        match verdict {
            Security::Broken { problems } => assert!(
                problems
                    .iter()
                    .any(|p| p.starts_with(&key.display().to_string())),
                "{problems:?}"
            ),
            other => panic!("a world-readable key is a broken secured host: {other:?}"),
        }
    }

    #[test]
    fn assess_empty_directory_is_unsecured() {
        let tmp = tempfile::tempdir().expect("tempdir");

        assert!(matches!(
            assess(tmp.path(), Role::Server),
            Security::Unsecured { .. }
        ));
    }
}
