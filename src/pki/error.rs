//! The errors of making and loading lab PKIs. (Problems *found* in a PKI directory are not
//! errors but [`Finding`](super::Finding)s of a [`Report`](super::Report).)

use std::path::PathBuf;

/// Why a lab PKI could not be made, loaded or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {}: check the path and its permissions", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// rcgen refused to make a key or certificate.
    #[error("cannot generate the {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    /// A lab CA directory's certificate is not a PEM X.509 certificate.
    #[error(
        "{} is not a PEM CA certificate: point at a directory made by `pki init`",
        path.display()
    )]
    BadCaCert {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// A lab CA directory's key is not a PEM PKCS#8 key rcgen can sign with.
    #[error(
        "{} is not a PEM PKCS#8 private key rcgen can sign with: point at a directory made by `pki init`",
        path.display()
    )]
    BadCaKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    /// A host certificate was asked for with no name.
    #[error("a host certificate needs at least one name (the first becomes its CN)")]
    NoHostNames,
    /// A host name cannot be used as a directory name or certificate name.
    #[error("{name:?} is not a usable host name: use letters, digits, '.', '-' (or an IP address)")]
    BadHostName { name: String },
}
