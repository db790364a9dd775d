//! Errors of a migration, each naming the side, file, socket or QEMU message that explains it.

use std::path::PathBuf;
use std::time::Duration;

use super::Side;
use crate::peer::ErrorKind;
use crate::ports::PortError;
use crate::qmp::QmpError;
use crate::vm_lock::VmLockError;

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrationError {
    #[error(
        "refusing a mixed pair: the {side} is not secured for TLS ({reason}) while the other side \
         is; secure it (qemu-tls-migrate pki check --dir {dir}) or migrate between two secured \
         hosts"
    )]
    MixedSecurity {
        side: Side,
        dir: PathBuf,
        reason: String,
    },
    #[error(
        "TLS was asked for but the {side} is not secured ({reason}); fix the PKI directory {dir} \
         (qemu-tls-migrate pki check --dir {dir})"
    )]
    Unsecured {
        side: Side,
        dir: PathBuf,
        reason: String,
    },
    #[error(
        "the {side}'s PKI directory {dir} holds TLS files that fail the checks, so this host is a \
         broken secured host, not an unsecured one: {}; fix them (qemu-tls-migrate pki check \
         --dir {dir}), or remove every TLS file to declare the host unsecured",
        .problems.join("; ")
    )]
    PkiBroken {
        side: Side,
        dir: PathBuf,
        problems: Vec<String>,
    },
    #[error(
        "cannot make the {side}'s PKI directory follow CloudStack's certificates \
         (--no-cloudstack-check skips this check)"
    )]
    CloudStackPki {
        side: Side,
        #[source]
        source: crate::host::HostError,
    },
    #[error("refusing --transport auto on the {side}: {desc}")]
    CloudStackDisagrees { side: Side, desc: String },
    #[error(
        "refusing to leave disk(s) {} behind: each is writable and not on shared storage, so the \
         guest would run on the destination without its data; copy them (--disk NODE or \
         --all-local-disks), declare them shared (--shared-disk NODE), or pass --unsafe",
        .nodes.join(", ")
    )]
    DiskLeftBehind { nodes: Vec<String> },
    #[error(
        "the migration passed the point of no return ({reason}) and the destination's state \
         cannot be known, so the source VM was left paused here and not resumed, and nothing was \
         stopped or removed on the destination: the running copy may be on {holder}; check there \
         (query-status, or virsh domstate): if it runs, the migration completed and the source \
         must not be resumed (shut it down); resume the source only once the destination is \
         known not to run and is stopped for good; never resume both"
    )]
    SplitBrainRisk {
        reason: String,
        holder: String,
        #[source]
        cause: Box<MigrationError>,
    },
    #[error(
        "this host's service refuses plain TCP migrations: RAM and disks would cross the network \
         unencrypted; secure both hosts, or start the service with --allow-plain"
    )]
    PlainRefused,
    #[error("bad request: {desc}")]
    BadRequest { desc: String },
    #[error("libvirt")]
    Libvirt(#[from] crate::libvirt::LibvirtError),
    #[error("the libvirt domain {name} cannot be migrated: {reason}")]
    DomainNotMovable { name: String, reason: String },
    #[error(
        "a domain named {name} is already running on the destination host; a VM must never run \
         twice: stop or rename that one first"
    )]
    DomainExists { name: String },
    #[error(
        "another source's session holds the QMP socket {socket} on the destination host; wait \
         until its migration ends, or name another socket"
    )]
    QmpSocketHeld { socket: PathBuf },
    #[error("cannot reach the {side} QEMU's QMP socket {socket}")]
    Connect {
        side: Side,
        socket: PathBuf,
        #[source]
        source: QmpError,
    },
    #[error(
        "the destination QEMU ({socket}) is not waiting for a migration (its state is {status}): \
         start it with -incoming defer"
    )]
    DestinationNotIncoming { socket: PathBuf, status: String },
    #[error("the source VM ({socket}) cannot be migrated in state {status}")]
    SourceNotReady { socket: PathBuf, status: String },
    #[error(
        "the source QEMU ({socket}) still runs block job(s) {} left by a run of this tool that \
         ended without cleaning up (killed?), which hold its disks; nothing was changed: end \
         them (QMP block-job-cancel with force true, then blockdev-del of their qtm-nbd-* \
         nodes) and migrate again",
        .jobs.join(", ")
    )]
    OrphanJobs { socket: PathBuf, jobs: Vec<String> },
    #[error(
        "the {side} QEMU ({socket}) cannot load the TLS credentials in {dir}: {desc}; the QEMU \
         process (not only root) must be able to read them: check owner, group and mode, e.g. \
         0640 root:qemu for keys"
    )]
    CredentialsUnusable {
        side: Side,
        socket: PathBuf,
        dir: PathBuf,
        desc: String,
    },
    #[error("{step} on the {side} failed")]
    Qmp {
        side: Side,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("the source has no disk {node} (it has: {})", .available.join(", "))]
    UnknownDisk {
        node: String,
        available: Vec<String>,
    },
    #[error("the source's disk {node} cannot be copied: {reason}")]
    SourceDiskUnusable { node: String, reason: String },
    #[error(
        "the destination has no block node {node} to copy the disk into: start it with a disk of \
         the same node name (-blockdev ...,node-name={node})"
    )]
    DestDiskMissing { node: String },
    #[error("the destination's disk {node} cannot take the copy: {reason}")]
    DestDiskUnusable { node: String, reason: String },
    #[error(
        "disk {node} cannot be copied top-only: {reason}; put the same template on the \
         destination once (e.g. scp it to the same path there), create the destination disk as \
         an overlay of it (qemu-img create -f qcow2 -b TEMPLATE -F FORMAT DISK), or copy the \
         whole chain (--disk-copy full)"
    )]
    BackingMismatch { node: String, reason: String },
    #[error("copying disk {node} to the destination failed: {desc}")]
    MirrorFailed { node: String, desc: String },
    #[error("no port for the migration stream")]
    Ports(#[from] PortError),
    #[error(transparent)]
    VmLock(#[from] VmLockError),
    #[error(
        "TLS handshake failed: {desc}; check that both hosts' certificates come from the same CA and that the destination's certificate names {hostname}"
    )]
    TlsHandshake { desc: String, hostname: String },
    #[error(
        "the destination's QEMU {dest_qemu} has no machine type {machine}, the source guest's: \
         it cannot load this guest; migrate it to a QEMU that has {machine} (newer QEMUs keep \
         older machine types, never the reverse)"
    )]
    MachineTypeUnsupported { machine: String, dest_qemu: String },
    #[error(
        "the destination QEMU runs machine type {dest_machine}, the source guest {machine}: \
         start the destination with -machine {machine}"
    )]
    MachineTypeMismatch {
        machine: String,
        dest_machine: String,
    },
    #[error("migration failed: {desc}")]
    Failed { desc: String },
    #[error("the destination went away during the migration{}", .desc.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    DestinationDied { desc: Option<String> },
    #[error("the destination did not resume: {desc}")]
    DestinationNotResumed { desc: String },
    #[error(
        "the destination was told to resume (cont) and did not confirm; asked again, it was last \
         seen: {last_seen}; it may be running the guest ({holder})"
    )]
    DestinationResumeUnknown { holder: String, last_seen: String },
    #[error("the destination did not finish loading the migration within {after:?}")]
    DestinationNotFinished { after: Duration },
    #[error(
        "no progress for {after:?} (migration state {status}): the destination does not answer; cancelled"
    )]
    Stalled { after: Duration, status: String },
    #[error(
        "post-copy could not be recovered within {after:?} ({attempts} attempts; last: {last}): \
         the guest is paused on both ends, and only the destination holds its newest state \
         while the source holds the pages not yet sent; neither is resumed. When the link is \
         back, migrate-recover on the destination and migrate with resume=true on the source \
         finish it"
    )]
    PostcopyNotRecovered {
        after: Duration,
        attempts: u32,
        last: String,
    },
    #[error("the migration did not complete within {after:?}; cancelled")]
    Timeout { after: Duration },
    #[error(
        "the migration will not converge as configured ({why}); --on-no-go abort: cancelled, \
         the source runs on. Would converge with: {advice}"
    )]
    NoGo { why: String, advice: String },
    #[error("cancelled by signal; everything was rolled back")]
    Cancelled,
    #[error("bad migration options: {what}")]
    BadOptions { what: String },
    /// An earlier run of this VM was interrupted and its changes could not all be undone.
    #[error("{detail}; nothing was changed by this run: see `qemu-tls-migrate recover --json`")]
    Interrupted { detail: String },
    #[error(transparent)]
    Journal(#[from] super::journal::JournalError),
    /// The source's certificate has a subject QEMU's `tls-authz` cannot be set to match.
    #[error(
        "the source's certificate subject cannot be given to QEMU's tls-authz: {desc}; issue \
         the source a certificate whose subject QEMU can match (e.g. CN=<host> only), or migrate \
         without --authz to a service without --allow-client"
    )]
    AuthzSubject { desc: String },
    /// Reported by the destination host's service, or about the channel to it.
    #[error("destination host: {message}")]
    Remote {
        kind: ErrorKind,
        message: String,
        /// Nothing was changed.
        refusal: bool,
    },
}

impl MigrationError {
    /// A stable, machine-readable name for the JSON report (`error.kind`).
    pub fn kind(&self) -> &'static str {
        self.error_kind().as_str()
    }

    /// The kind as it crosses the control channel.
    pub fn error_kind(&self) -> ErrorKind {
        match self {
            MigrationError::Remote { kind, .. } => *kind,
            MigrationError::MixedSecurity { .. } => ErrorKind::MixedSecurity,
            MigrationError::Unsecured { .. } => ErrorKind::Unsecured,
            MigrationError::PkiBroken { .. } => ErrorKind::PkiBroken,
            // Kinds of the peer protocol, which does not change for these.
            MigrationError::CloudStackPki { .. } => ErrorKind::PkiBroken,
            MigrationError::CloudStackDisagrees { .. } => ErrorKind::MixedSecurity,
            MigrationError::DiskLeftBehind { .. } => ErrorKind::DiskLeftBehind,
            MigrationError::SplitBrainRisk { .. } => ErrorKind::SplitBrainRisk,
            MigrationError::PlainRefused => ErrorKind::PlainRefused,
            MigrationError::BadRequest { .. } => ErrorKind::BadRequest,
            MigrationError::AuthzSubject { .. } => ErrorKind::NotAllowed,
            MigrationError::Connect { source, .. } if source.is_timeout() => ErrorKind::Timeout,
            MigrationError::Connect { .. } => ErrorKind::Connect,
            MigrationError::DestinationNotIncoming { .. } => ErrorKind::DestinationNotIncoming,
            MigrationError::SourceNotReady { .. } | MigrationError::OrphanJobs { .. } => {
                ErrorKind::SourceNotReady
            }
            MigrationError::CredentialsUnusable { .. } => ErrorKind::CredentialsUnusable,
            MigrationError::Qmp { source, .. } if source.is_timeout() => ErrorKind::Timeout,
            MigrationError::Qmp { source, .. } if source.is_closed() => ErrorKind::QemuGone,
            MigrationError::Qmp { .. } => ErrorKind::Qmp,
            MigrationError::UnknownDisk { .. } => ErrorKind::UnknownDisk,
            MigrationError::SourceDiskUnusable { .. } => ErrorKind::SourceNotReady,
            MigrationError::DestDiskMissing { .. } | MigrationError::DestDiskUnusable { .. } => {
                ErrorKind::DestinationDisk
            }
            MigrationError::MirrorFailed { .. } => ErrorKind::MirrorFailed,
            MigrationError::BackingMismatch { .. } => ErrorKind::BackingMismatch,
            MigrationError::Ports(_) => ErrorKind::Ports,
            MigrationError::VmLock(VmLockError::Busy { .. } | VmLockError::Contended { .. }) => {
                ErrorKind::Busy
            }
            // The same directory as the port leases, with the same fix.
            MigrationError::VmLock(_) => ErrorKind::Ports,
            MigrationError::TlsHandshake { .. } => ErrorKind::TlsHandshake,
            MigrationError::MachineTypeUnsupported { .. }
            | MigrationError::MachineTypeMismatch { .. } => ErrorKind::MachineType,
            MigrationError::Failed { .. } => ErrorKind::MigrationFailed,
            MigrationError::DestinationDied { .. } => ErrorKind::DestinationDied,
            MigrationError::DestinationNotFinished { .. } => ErrorKind::Timeout,
            MigrationError::DestinationNotResumed { .. }
            | MigrationError::DestinationResumeUnknown { .. } => ErrorKind::MigrationFailed,
            MigrationError::Stalled { .. } => ErrorKind::Stalled,
            MigrationError::PostcopyNotRecovered { .. } => ErrorKind::SplitBrainRisk,
            MigrationError::Timeout { .. } => ErrorKind::Timeout,
            MigrationError::NoGo { .. } => ErrorKind::NoGo,
            MigrationError::Cancelled => ErrorKind::Cancelled,
            MigrationError::BadOptions { .. } => ErrorKind::Usage,
            MigrationError::Interrupted { .. } => ErrorKind::SourceNotReady,
            // The run directory, like the lock directory, with the same kind of fix.
            MigrationError::Journal(_) => ErrorKind::Ports,
            MigrationError::Libvirt(crate::libvirt::LibvirtError::NoSuchDomain { .. }) => {
                ErrorKind::NoSuchDomain
            }
            MigrationError::Libvirt(_) => ErrorKind::Libvirt,
            MigrationError::DomainNotMovable { .. } => ErrorKind::DomainNotMovable,
            MigrationError::DomainExists { .. } => ErrorKind::DomainExists,
            MigrationError::QmpSocketHeld { .. } => ErrorKind::Busy,
        }
    }

    /// Builds the error for a migration QEMU reported as failed, telling TLS problems apart.
    pub(crate) fn from_qemu_failure(desc: String, hostname: &str) -> MigrationError {
        // QEMU 7.2 words it "The certificate hasn't got a known issuer", "Certificate does
        // not match the hostname ...", "TLS handshake failed: ...". A plain "Cannot write to
        // TLS channel" is a broken connection, not a handshake problem.
        let lower = desc.to_ascii_lowercase();
        let tls = ["certificate", "handshake", "x509", "issuer", "gnutls"];
        if tls.iter().any(|w| lower.contains(w)) {
            MigrationError::TlsHandshake {
                desc,
                hostname: hostname.to_string(),
            }
        } else {
            MigrationError::Failed { desc }
        }
    }
}
