//! The protocol's messages as plain data: what a source asks of a destination host, what the
//! service answers, and the error kinds that cross the wire. A change to any type here is a
//! change of the protocol: bump [`super::VERSION`].

use serde::{Deserialize, Serialize};

use crate::pki::Security;
use crate::ports::PortRange;

/// Every message of the protocol, in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Message {
    /// Source → service, first.
    Hello {
        client: String,
    },
    /// Service → source: whether this host is secured for TLS, and its CPU count (for
    /// `--multifd auto`).
    Welcome {
        server: String,
        security: Security,
        cpus: u32,
    },
    /// Source → service started with `--libvirt`: start the incoming libvirt domain from `xml`
    /// (paused, waiting with `-incoming defer`, a QMP monitor in the service's directory),
    /// creating the local disks `disks` first; rolled back with the session.
    StartDomain {
        xml: String,
        disks: Vec<NewDisk>,
    },
    /// Service → source: the incoming domain waits; its QMP socket is `qmp` in the service's
    /// directory (what the following `preflight` names).
    DomainStarted {
        qmp: String,
    },
    /// Source → service: attach to the QEMU whose QMP socket is `qmp` in the service's
    /// directory, and check (change nothing) that it can take `plan`.
    Preflight {
        qmp: String,
        plan: DestPlan,
    },
    /// Service → source: the preflight passed. `backing_checked`: the service checked the
    /// backing files of top-only disks (a service older than top-only copies leaves it out,
    /// and the source must then refuse them: the old one never looked).
    Preflighted {
        #[serde(default)]
        backing_checked: bool,
        /// The destination QEMU's version (a service before this field leaves it out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        qemu: Option<crate::qmp::QemuVersion>,
    },
    /// Source → service: make the changes; answer with the ports.
    Prepare,
    /// Service → source.
    Prepared {
        prepared: DestPrepared,
    },
    /// Source → service: the source completed; finish loading and resume when `resume`.
    Finish {
        resume: bool,
    },
    /// Service → source: done; clean-up problems, if any, and when the destination's guest
    /// resumed (its `RESUME` event, microseconds since the epoch on the destination's clock).
    Finished {
        problems: Vec<String>,
        resumed_at_us: Option<i64>,
    },
    /// Source → service: roll everything back.
    Abort,
    /// Service → source: rolled back. `stopped`: the destination QEMU is known not to run the
    /// guest and never did (it is gone, or it was never resumed and cannot start on its own);
    /// only then may the source resume a VM that passed the switch-over.
    Aborted {
        stopped: bool,
        problems: Vec<String>,
    },
    /// Service → source: the destination QEMU went away.
    Gone {
        reason: String,
    },
    /// Either way: a request failed or a frame was refused. `refusal` says nothing was changed.
    Error {
        kind: ErrorKind,
        message: String,
        refusal: bool,
    },
    Ping,
    Pong,
}

impl Message {
    /// The message's type as it crosses the wire (`start-domain`, `preflight`, ...): what an
    /// error about a message names, never the message itself (a `start-domain` carries a whole
    /// domain XML, a `preflight` a plan).
    pub fn type_name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::StartDomain { .. } => "start-domain",
            Message::DomainStarted { .. } => "domain-started",
            Message::Preflight { .. } => "preflight",
            Message::Preflighted { .. } => "preflighted",
            Message::Prepare => "prepare",
            Message::Prepared { .. } => "prepared",
            Message::Finish { .. } => "finish",
            Message::Finished { .. } => "finished",
            Message::Abort => "abort",
            Message::Aborted { .. } => "aborted",
            Message::Gone { .. } => "gone",
            Message::Error { .. } => "error",
            Message::Ping => "ping",
            Message::Pong => "pong",
        }
    }
}

/// What the source asks of the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestPlan {
    pub tls: bool,
    /// GnuTLS priority string for the credentials. A service applies its own and ignores this.
    pub tls_priority: Option<String>,
    pub multifd: Option<u8>,
    /// The multifd compression method (`zstd`, `zlib`); both sides must set the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<crate::qemu::Compression>,
    /// Disks to receive over NBD: node names and the source's sizes (never file names).
    pub disks: Vec<DiskSpec>,
    /// Grow smaller destination disks (to the source's size) instead of refusing.
    pub create_dest_disks: bool,
    /// Which source identity the destination's migration and NBD listeners accept.
    pub authz: Authz,
    /// Where to listen for the migration stream and NBD. A service picks its own.
    pub listen_address: String,
    /// A service picks its own.
    pub port_range: PortRange,
    /// The source guest's machine type (`pc-q35-7.2`): the destination checks it can load it.
    /// `None` from a source that could not ask (or a build before the check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Post-copy may start: the destination turns on `postcopy-ram` too. Only a local
    /// destination takes it today (a service is not offered post-copy).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
}

/// A disk the service creates for an incoming domain: the XML's disk with guest device
/// `target` (its file path comes from the XML), empty, of this format and virtual size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDisk {
    pub target: String,
    pub format: String,
    pub size: u64,
    /// Create it as an overlay on this backing file (for a top-only copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<NewBacking>,
    /// When the XML's path already exists on the destination host, use that file (a volume
    /// CloudStack's management server created there) instead of refusing it, once the service
    /// checked it: an empty image of this format, not in use, on the template of `backing` (or
    /// on none). An adopted file is never deleted by the service. A peer that does not send
    /// this field means `false` (today's refusal); a service that does not know it refuses the
    /// existing path as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
    /// An adopted file smaller than `size` may be grown to it (`--create-dest-disks`); without
    /// it, such a file is refused naming both sizes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grow: bool,
}

/// The backing file of a [`NewDisk`]: the file of this name in the new disk's own directory
/// (a storage pool: CloudStack keeps a template beside the volumes made from it, under the same
/// name on every host). Only a name, never a path: a peer cannot point a new disk at any other
/// file of the destination host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBacking {
    pub file_name: String,
    /// Its image format (`qcow2`, `raw`).
    pub format: String,
}

/// One disk the destination is to receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The source's block node name (the root node the guest's device uses); the name of the
    /// destination's NBD export of this disk, and the destination's node when `device` is
    /// absent or names no device there.
    pub node: String,
    /// The guest device the disk is attached to (its qdev id, e.g. `virtio-disk0`): the same
    /// on both hosts, as device state requires, where node names may differ (libvirt numbers
    /// its nodes in the order it opens them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The source disk's virtual size in bytes.
    pub size: u64,
    /// What is copied: the whole chain (the default, and what a peer that does not send this
    /// field means) or the top image only.
    #[serde(default, skip_serializing_if = "DiskCopy::is_full")]
    pub copy: DiskCopy,
    /// With [`DiskCopy::Top`]: the backing image the destination's disk must already sit on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<BackingSpec>,
}

/// How much of a disk's backing chain crosses the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCopy {
    /// Everything the guest sees, backing files included (`blockdev-mirror sync: full`).
    #[default]
    Full,
    /// Only the top image (`sync: top`): the destination's disk is an overlay on the same
    /// backing file (a template present on both hosts).
    Top,
}

impl DiskCopy {
    pub fn is_full(&self) -> bool {
        *self == DiskCopy::Full
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskCopy::Full => "full",
            DiskCopy::Top => "top",
        }
    }
}

/// The source's backing image of a disk copied top-only, as the destination checks its own
/// against it. The file name is the one in the overlay's header (a local template path, never a
/// URL: those are refused before anything is sent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackingSpec {
    pub filename: String,
    /// Image format (`qcow2`, `raw`).
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// A fingerprint of the file's bytes (see `migration::backing_fingerprint`), when the
    /// source could read the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

/// Which TLS client identity the destination accepts (QEMU's `tls-authz`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "mode", content = "dn", rename_all = "kebab-case")]
pub enum Authz {
    /// Any certificate from the CA.
    #[default]
    Off,
    /// Only a certificate with this distinguished name (`CN=host-a`).
    Identity(String),
    /// Only the certificate the source presented on the control channel (the service fills
    /// in its distinguished name).
    FromPeerCert,
}

/// What the destination tells the source once prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestPrepared {
    pub migration_port: u16,
    pub nbd_port: Option<u16>,
}

/// Why a request failed, as it crosses the wire. Unknown kinds from a newer peer read as
/// [`ErrorKind::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ErrorKind {
    MixedSecurity,
    Unsecured,
    PkiBroken,
    PlainRefused,
    CredentialsUnusable,
    Connect,
    Timeout,
    DestinationNotIncoming,
    SourceNotReady,
    UnknownDisk,
    DestinationDisk,
    DiskLeftBehind,
    MirrorFailed,
    Ports,
    TlsHandshake,
    MigrationFailed,
    DestinationDied,
    Stalled,
    NoGo,
    QemuGone,
    Qmp,
    Cancelled,
    SplitBrainRisk,
    Usage,
    BadRequest,
    Busy,
    Protocol,
    ProtocolVersion,
    NotAllowed,
    Channel,
    Credentials,
    Listen,
    NoSuchDomain,
    DomainNotMovable,
    DomainExists,
    Libvirt,
    BackingMismatch,
    MachineType,
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The kebab-case name used in JSON reports.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MixedSecurity => "mixed-security",
            ErrorKind::MachineType => "machine-type",
            ErrorKind::Unsecured => "unsecured",
            ErrorKind::PkiBroken => "pki-broken",
            ErrorKind::PlainRefused => "plain-refused",
            ErrorKind::CredentialsUnusable => "credentials-unusable",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::DestinationNotIncoming => "destination-not-incoming",
            ErrorKind::SourceNotReady => "source-not-ready",
            ErrorKind::UnknownDisk => "unknown-disk",
            ErrorKind::DestinationDisk => "destination-disk",
            ErrorKind::DiskLeftBehind => "disk-left-behind",
            ErrorKind::MirrorFailed => "mirror-failed",
            ErrorKind::Ports => "ports",
            ErrorKind::TlsHandshake => "tls-handshake",
            ErrorKind::MigrationFailed => "migration-failed",
            ErrorKind::DestinationDied => "destination-died",
            ErrorKind::Stalled => "stalled",
            ErrorKind::NoGo => "no-go",
            ErrorKind::QemuGone => "qemu-gone",
            ErrorKind::Qmp => "qmp",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::SplitBrainRisk => "split-brain-risk",
            ErrorKind::Usage => "usage",
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::Busy => "busy",
            ErrorKind::Protocol => "protocol",
            ErrorKind::ProtocolVersion => "protocol-version",
            ErrorKind::NotAllowed => "not-allowed",
            ErrorKind::Channel => "channel",
            ErrorKind::Credentials => "credentials",
            ErrorKind::Listen => "listen",
            ErrorKind::NoSuchDomain => "no-such-domain",
            ErrorKind::DomainNotMovable => "domain-not-movable",
            ErrorKind::DomainExists => "domain-exists",
            ErrorKind::Libvirt => "libvirt",
            ErrorKind::BackingMismatch => "backing-mismatch",
            ErrorKind::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_serialise_as_their_names_and_unknown_ones_read_as_other() {
        for kind in [
            ErrorKind::SplitBrainRisk,
            ErrorKind::PkiBroken,
            ErrorKind::Busy,
        ] {
            let json = serde_json::to_value(kind).expect("encode");
            assert_eq!(json, serde_json::Value::from(kind.as_str()));
        }
        let unknown: ErrorKind = serde_json::from_str("\"from-the-future\"").expect("decode");
        assert_eq!(unknown, ErrorKind::Other);
    }

    /// `Preflighted` as a build before top-only copies declared it.
    #[derive(Debug, Deserialize, Serialize, PartialEq)]
    #[serde(tag = "type", rename_all = "kebab-case")]
    enum OldMessage {
        Preflighted,
    }

    #[test]
    fn preflighted_stays_readable_both_ways_across_the_backing_checked_field() {
        let new = serde_json::to_string(&Message::Preflighted {
            backing_checked: true,
            qemu: None,
        })
        .expect("encode");
        let old = serde_json::to_string(&OldMessage::Preflighted).expect("encode");

        let old_reads_new: OldMessage = serde_json::from_str(&new).expect("an old peer reads it");
        let new_reads_old: Message = serde_json::from_str(&old).expect("a new peer reads it");

        assert_eq!(old_reads_new, OldMessage::Preflighted);
        assert_eq!(
            new_reads_old,
            Message::Preflighted {
                backing_checked: false,
                qemu: None,
            }
        );
    }

    #[test]
    fn a_new_disk_from_an_older_source_is_created_never_adopted() {
        let disk: NewDisk =
            serde_json::from_str(r#"{"target": "vda", "format": "qcow2", "size": 1024}"#)
                .expect("decode");

        assert_eq!((disk.adopt, disk.grow), (false, false));
        let json = serde_json::to_value(&disk).expect("encode");
        assert!(json.get("adopt").is_none(), "{json}");
    }

    #[test]
    fn a_disk_spec_from_an_older_source_means_a_full_copy() {
        let spec: DiskSpec =
            serde_json::from_str(r#"{"node": "disk0", "size": 1024}"#).expect("decode");

        assert_eq!((spec.copy, spec.backing), (DiskCopy::Full, None));
    }

    #[test]
    fn each_type_name_is_the_tag_the_message_is_sent_with() {
        let messages = [
            Message::StartDomain {
                xml: "<domain/>".into(),
                disks: Vec::new(),
            },
            Message::Prepare,
            Message::Finish { resume: true },
            Message::Ping,
        ];
        for msg in messages {
            let json = serde_json::to_value(&msg).expect("encode");
            assert_eq!(json["type"], msg.type_name());
        }
    }

    #[test]
    fn authz_modes_round_trip() {
        for authz in [
            Authz::Off,
            Authz::FromPeerCert,
            Authz::Identity("CN=host-b".into()),
        ] {
            let json = serde_json::to_string(&authz).expect("encode");
            assert_eq!(serde_json::from_str::<Authz>(&json).expect("decode"), authz);
        }
    }
}
