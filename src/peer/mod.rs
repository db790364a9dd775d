//! The control channel between a source host and a destination host's service.
//!
//! Transport: TCP with mutual TLS (rustls, `ring`), both ends presenting certificates from the
//! hosts' PKI directories and verifying the other against the shared CA; the service may
//! further restrict which certificate names may connect.
//!
//! Framing: every message is one frame: a 4-byte big-endian length, then that many bytes of
//! JSON `{"v": VERSION, "msg": {...}}`. Frames over [`MAX_FRAME`] are refused, as are unknown
//! versions and anything that does not decode; the receiver answers with an [`Message::Error`]
//! where it still can, and closes.
//!
//! Liveness: the source sends [`Message::Ping`] every [`HEARTBEAT_INTERVAL`]; each side treats
//! [`HEARTBEAT_TIMEOUT`] without any frame as a dead channel and rolls back on its own.
//!
//! This module knows the protocol only: its messages ([`messages`]) are plain data.

mod messages;
#[cfg(test)]
mod proptests;
mod tls;

pub use messages::{
    Authz, BackingSpec, DestPlan, DestPrepared, DiskCopy, DiskSpec, ErrorKind, Message, NewBacking,
    NewDisk,
};
pub use tls::{
    BUSY_ALERT, PeerIdentity, client_config, is_busy_refusal, server_config, tls_failure_reason,
};

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;
/// The service's default TCP port: outside the migration range 49152-49215 (and next to
/// libvirt's TLS port 16514); `host secure` opens it.
pub const DEFAULT_PORT: u16 = 16515;
/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 256 * 1024;
/// How often the source says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Silence after which a side declares the channel dead.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(6);
/// How long one message may take to be handed to the peer before the channel counts as dead.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// `address` as a socket address, with [`DEFAULT_PORT`] when it names no port.
pub fn with_default_port(address: &crate::addr::Address) -> String {
    address.with_port(address.port_or(DEFAULT_PORT))
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    v: u32,
    msg: Value,
}

/// What went wrong on the channel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with {peer} failed: {reason}")]
    Tls {
        peer: String,
        /// What went wrong, in words an operator can act on (see [`tls_failure_reason`]).
        reason: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the TLS credentials in {dir}: {detail}")]
    Credentials {
        dir: std::path::PathBuf,
        detail: String,
    },
    #[error("the peer's certificate names {names:?} are not allowed (allowed: {allowed:?})")]
    NotAllowed {
        names: Vec<String>,
        allowed: Vec<String>,
    },
    #[error("frame refused: {0}")]
    Frame(String),
    #[error("the peer speaks protocol version {got}, this build {VERSION}")]
    Version { got: u32 },
    #[error("the control channel closed")]
    Closed,
    #[error("no word from the peer for {0:?}")]
    Silent(Duration),
    #[error("the peer took nothing we sent for {0:?}: it stopped reading")]
    NotReading(Duration),
    #[error("unexpected message: {0}")]
    Unexpected(String),
    #[error(
        "the handshake was cut short: every handshake slot was taken and this one was the oldest"
    )]
    CutShort,
    #[error(
        "the service at {peer} is busy: it refused the connection {tries} times before any \
         handshake, being over its limit of TLS handshakes in flight (from this address, or in \
         all) or of sessions; try again later (the service logs which limit)"
    )]
    Busy { peer: String, tries: u32 },
}

/// A framed, versioned message stream over any byte stream (TLS in production).
#[derive(Debug)]
pub struct Channel<S> {
    framed: Framed<S, LengthDelimitedCodec>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    pub fn new(stream: S) -> Channel<S> {
        let codec = LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME)
            .new_codec();
        Channel {
            framed: Framed::new(stream, codec),
        }
    }

    /// Sends one message; a peer that does not take it within [`SEND_TIMEOUT`] (it stopped
    /// reading) is an error, so no sender can be held up by it.
    pub async fn send(&mut self, msg: &Message) -> Result<(), PeerError> {
        let frame = encode(msg)?;
        tokio::time::timeout(SEND_TIMEOUT, self.framed.send(frame))
            .await
            .map_err(|_| PeerError::NotReading(SEND_TIMEOUT))?
            .map_err(|e| PeerError::Frame(e.to_string()))
    }

    /// The next message with no time limit (the caller tracks silence itself). Cancel-safe:
    /// a partly read frame stays buffered.
    pub async fn next(&mut self) -> Result<Message, PeerError> {
        match self.framed.next().await {
            None => Err(PeerError::Closed),
            Some(Err(e)) => Err(PeerError::Frame(e.to_string())),
            Some(Ok(bytes)) => decode(&bytes),
        }
    }

    /// The next message, or an error for a closed channel, an oversized or malformed frame,
    /// an unknown version, or `timeout` of silence.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Message, PeerError> {
        let next = tokio::time::timeout(timeout, self.framed.next())
            .await
            .map_err(|_| PeerError::Silent(timeout))?;
        match next {
            None => Err(PeerError::Closed),
            Some(Err(e)) => Err(PeerError::Frame(e.to_string())),
            Some(Ok(bytes)) => decode(&bytes),
        }
    }
}

/// Encodes a message into a frame's payload.
pub fn encode(msg: &Message) -> Result<Bytes, PeerError> {
    let env = serde_json::json!({"v": VERSION, "msg": msg});
    let bytes = serde_json::to_vec(&env).map_err(|e| PeerError::Frame(e.to_string()))?;
    if bytes.len() > MAX_FRAME {
        return Err(PeerError::Frame(format!(
            "message of {} bytes exceeds {MAX_FRAME}",
            bytes.len()
        )));
    }
    Ok(Bytes::from(bytes))
}

/// Decodes a frame's payload: version first, then the message.
pub fn decode(bytes: &[u8]) -> Result<Message, PeerError> {
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| PeerError::Frame(format!("not a message: {e}")))?;
    if env.v != VERSION {
        return Err(PeerError::Version { got: env.v });
    }
    serde_json::from_value(env.msg).map_err(|e| PeerError::Frame(format!("unknown message: {e}")))
}

impl PeerError {
    /// The `kind` sent in an [`Message::Error`] for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PeerError::Version { .. } => ErrorKind::ProtocolVersion,
            PeerError::Frame(_) | PeerError::Unexpected(_) => ErrorKind::Protocol,
            PeerError::NotAllowed { .. } => ErrorKind::NotAllowed,
            PeerError::Silent(_) | PeerError::NotReading(_) => ErrorKind::Timeout,
            PeerError::Credentials { .. } => ErrorKind::Credentials,
            PeerError::Busy { .. } | PeerError::CutShort => ErrorKind::Busy,
            _ => ErrorKind::Channel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_their_version() {
        let msg = Message::Preflight {
            qmp: "vm1.sock".into(),
            plan: DestPlan {
                machine: None,
                postcopy: false,
                tls: true,
                multifd_compression: None,
                tls_priority: None,
                multifd: Some(2),
                disks: vec![DiskSpec {
                    node: "disk0".into(),
                    device: None,
                    size: 1 << 30,
                    copy: DiskCopy::Top,
                    backing: Some(BackingSpec {
                        filename: "/templates/t.qcow2".into(),
                        format: "qcow2".into(),
                        size: 1 << 30,
                        fingerprint: Some("sha256:00".into()),
                    }),
                }],
                create_dest_disks: false,
                authz: Authz::FromPeerCert,
                listen_address: "198.18.0.1".into(),
                port_range: crate::ports::DEFAULT_RANGE,
            },
        };
        assert_eq!(decode(&encode(&msg).expect("encode")).expect("decode"), msg);
    }

    #[test]
    fn wrong_versions_unknown_messages_and_garbage_are_refused() {
        let v1 = br#"{"v": 1, "msg": {"type": "ping"}}"#;
        assert!(matches!(decode(v1), Err(PeerError::Version { got: 1 })));
        let unknown = br#"{"v": 2, "msg": {"type": "format-disk"}}"#;
        assert!(matches!(decode(unknown), Err(PeerError::Frame(_))));
        assert!(matches!(
            decode(b"\x00\xffgarbage"),
            Err(PeerError::Frame(_))
        ));
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_without_reading_it() {
        let (a, b) = tokio::io::duplex(1024);
        let mut rx = Channel::new(a);
        let mut raw = b;
        use tokio::io::AsyncWriteExt;
        raw.write_all(&((MAX_FRAME as u32 + 1).to_be_bytes()))
            .await
            .expect("write");
        let err = rx.recv(Duration::from_secs(5)).await.expect_err("too big");
        assert!(matches!(err, PeerError::Frame(_)), "{err}");
    }
}
