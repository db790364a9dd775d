//! QOM objects the tool creates: TLS credentials and authorization lists.

use std::path::PathBuf;

use serde::Serialize;

use super::Empty;
use crate::qmp::Command;

/// Which end of a TLS connection credentials serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsEndpoint {
    /// The destination: listens for migration and serves NBD.
    Server,
    /// The source: connects out.
    Client,
}

/// `object-add` of any object this module knows.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "qom-type")]
pub enum ObjectAdd {
    /// `tls-creds-x509`: certificates read from `dir` in QEMU's layout (`ca-cert.pem`,
    /// `server-cert.pem`/`server-key.pem` or `client-cert.pem`/`client-key.pem`).
    #[serde(rename = "tls-creds-x509")]
    TlsCredsX509 {
        id: String,
        dir: PathBuf,
        endpoint: TlsEndpoint,
        #[serde(rename = "verify-peer")]
        verify_peer: bool,
        /// A GnuTLS priority string (cipher choice); QEMU's default when absent.
        #[serde(skip_serializing_if = "Option::is_none")]
        priority: Option<String>,
    },
    /// `authz-simple`: accepts exactly one identity (for TLS, the client's distinguished name,
    /// e.g. `CN=host-a`).
    #[serde(rename = "authz-simple")]
    AuthzSimple { id: String, identity: String },
}

impl ObjectAdd {
    /// The id the object is created under.
    pub fn id(&self) -> &str {
        match self {
            ObjectAdd::TlsCredsX509 { id, .. } | ObjectAdd::AuthzSimple { id, .. } => id,
        }
    }
}

impl Command for ObjectAdd {
    const NAME: &'static str = "object-add";
    type Output = Empty;
}

/// `object-del`.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectDel {
    pub id: String,
}

impl Command for ObjectDel {
    const NAME: &'static str = "object-del";
    type Output = Empty;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tls_creds_serialise_as_qemu_7_2_expects() {
        let add = ObjectAdd::TlsCredsX509 {
            id: "qtm-tls-1".into(),
            dir: "/etc/pki/qemu".into(),
            endpoint: TlsEndpoint::Server,
            verify_peer: true,
            priority: None,
        };
        assert_eq!(
            serde_json::to_value(&add).expect("serialise"),
            json!({"qom-type": "tls-creds-x509", "id": "qtm-tls-1", "dir": "/etc/pki/qemu",
                   "endpoint": "server", "verify-peer": true})
        );
    }
}
