//! Errors of the QMP client.

use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking QMP. Every variant names the peer (the socket path).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QmpError {
    #[error(
        "cannot connect to QMP socket {path}: is QEMU running with -qmp unix:{path},server=on?"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP peer {peer} did not complete the handshake within {after:?}")]
    ConnectTimeout { peer: String, after: Duration },
    #[error("QMP connection to {peer} is closed ({reason})")]
    Closed { peer: String, reason: String },
    #[error("QMP peer {peer} sent something that is not QMP: {detail}")]
    Protocol { peer: String, detail: String },
    #[error("QEMU at {peer} refused {command}: {class}: {desc}")]
    Qemu {
        peer: String,
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, ...).
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    #[error("QEMU at {peer} did not answer {command} within {after:?}")]
    Timeout {
        peer: String,
        command: String,
        after: Duration,
    },
    #[error("cannot encode the arguments of {command}")]
    Encode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected reply to {command}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
}

impl QmpError {
    pub(crate) fn protocol(peer: &str, detail: String) -> QmpError {
        QmpError::Protocol {
            peer: peer.to_string(),
            detail,
        }
    }

    /// Fills in the command name of an error the reader task built without knowing it.
    pub(crate) fn for_command(self, name: &str) -> QmpError {
        match self {
            QmpError::Qemu {
                peer, class, desc, ..
            } => QmpError::Qemu {
                peer,
                command: name.to_string(),
                class,
                desc,
            },
            other => other,
        }
    }

    /// QEMU's error class and description, when QEMU itself refused the command.
    pub fn qemu_error(&self) -> Option<(&str, &str)> {
        match self {
            QmpError::Qemu { class, desc, .. } => Some((class, desc)),
            _ => None,
        }
    }

    /// True when the connection is gone (closed socket, broken stream): QEMU probably exited.
    pub fn is_closed(&self) -> bool {
        matches!(self, QmpError::Closed { .. } | QmpError::Protocol { .. })
    }

    /// True when the peer did not answer in time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            QmpError::Timeout { .. } | QmpError::ConnectTimeout { .. }
        )
    }
}
