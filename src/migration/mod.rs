//! The migration plan: everything between "two QMP sockets and a PKI" and "the VM runs on the
//! destination", with an undo stack that rolls back whatever was done when anything fails.
//!
//! One migration, step by step (see `driver.rs`):
//! 1. **Transport.** Decide TLS or TCP from the two PKI directories ([`decide_transport`]);
//!    a mixed secured/unsecured pair is refused here, before QMP is even connected.
//! 2. **Look, don't touch.** Connect both QMP sockets; the source must be running or paused and
//!    not migrating, the destination waiting with `-incoming defer`. Save both sides' migration
//!    capabilities and parameters.
//! 3. **Credentials preflight (TLS).** A throwaway `object-add`/`object-del` of the credentials
//!    on each QEMU proves QEMU itself can read the files.
//! 4. **Prepare.** `tls-creds-x509` objects (server on the destination, client on the source),
//!    capabilities (`events`, `multifd`) and parameters (`tls-creds`, `tls-hostname`,
//!    bandwidth, downtime) on both sides; a port from the range; `migrate-incoming`.
//! 5. **Disks** (non-shared storage). The destination exports each disk over NBD (with the
//!    same TLS credentials); the source adds an NBD client node per disk (zeroes sent as
//!    write-zeroes requests) and mirrors into it (`sync: full`, or `top` for an overlay whose
//!    template the destination has too; all disks at once, each at most `--disk-bandwidth`),
//!    until every mirror is ready.
//! 6. **Migrate.** `migrate` on the source; follow `MIGRATION` events and `query-migrate`,
//!    reporting progress; watch for a dead destination, a stall, the deadline, cancellation.
//!    With disks, `pause-before-switchover` stops at `pre-switchover` with the source's CPUs
//!    paused: each ready mirror is cancelled (it completes without pivoting, the destination in
//!    sync), then `migrate-continue`.
//! 7. **Finish.** Wait for the destination to complete, stop its NBD server, resume it (unless
//!    asked not to).
//! 8. **Clean up, always.** Parameters and capabilities put back as they were, objects deleted;
//!    on failure also: migration cancelled, source resumed, destination torn down (`quit`).

pub mod cloudstack;
mod control;
mod convergence;
mod destination;
mod disks;
mod error;
mod forecast;
pub mod journal;
mod options;
pub mod postcopy;
pub mod recover;
mod remote;
mod report;
mod run;
mod side;
mod undo;
mod versions;

pub use control::{AppliedControl, Control, ControlReceiver, ControlSender, control_channel};
pub use convergence::{
    Compression, Convergence, ConvergenceReport, DowntimeStep, DowntimeSteps, OnNoGo,
    PostcopyRecovery, Throttle, TimeoutAction, XbzrleCache,
};
pub use destination::{AbortOutcome, Destination, DestinationSide, Finished};
pub use disks::{
    CopyPlan, DiskProgress, DiskReport, DiskSelection, SourceDisk, backing_fingerprint,
};
pub use error::MigrationError;
pub use forecast::{ESTIMATED_TCP, ESTIMATED_TLS, Forecast, ForecastMade};
pub use options::{
    Endpoint, ForecastWhen, MigrationOptions, Multifd, ValidOptions, check_bandwidth,
    check_multifd_channels, check_pause_after, check_timeout,
};
pub use remote::{RemoteDestination, RemoteTarget, migrate_remote};
pub use report::{
    FinalStatus, GuestPause, Phase, Progress, RamReport, Report, SourceEnd, Timing, ToolUsage,
};
pub use run::{RunContext, migrate, migrate_to};
pub use versions::{QemuVersions, TESTED_QEMU};

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::pki::{self, Role, Security};

/// `max-bandwidth` meaning "no limit": the largest value QEMU accepts (libvirt uses the same).
/// QEMU 7.2's own default is 128 MiB/s, which would throttle a loopback or 10G link.
pub const UNLIMITED_BANDWIDTH: u64 = i64::MAX as u64;
/// Per-command QMP timeout unless told otherwise.
pub const DEFAULT_QMP_TIMEOUT: Duration = Duration::from_secs(30);
/// A migration whose transferred byte count has not moved for this long is abandoned.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest timeout (whole run, stall, QMP command) the options accept: a week. Longer is
/// a mistake, and durations near `u64::MAX` seconds cannot even be added to a clock.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most channels `--multifd auto` picks: past this, more TLS sessions stop paying off
/// against the CPU they take from the guest.
pub const AUTO_MULTIFD_MAX: u8 = 8;

/// This host's CPU count (1 when it cannot be told).
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

/// `--multifd auto`: one channel per two CPUs of the smaller host (each TLS channel keeps a
/// core busy on both ends, and the guest's vCPUs need the rest), at most
/// [`AUTO_MULTIFD_MAX`]; `None` (one plain stream, multifd off) when that is one or none. On
/// this project's 2-CPU machines it is `None`: measured there, two channels were no faster
/// than one stream.
pub fn auto_multifd(source_cpus: u32, dest_cpus: u32) -> Option<u8> {
    let n = (source_cpus.min(dest_cpus) / 2).min(u32::from(AUTO_MULTIFD_MAX));
    (n >= 2).then_some(n as u8)
}

/// The most multifd channels the options accept (QEMU's own limit is 255).
pub const MAX_MULTIFD_CHANNELS: u8 = 64;
/// How often `query-migrate` is polled for progress while events drive the state machine.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// Prefix of every QOM object id this tool creates, so leftovers are easy to find.
pub const OBJECT_PREFIX: &str = "qtm-";
/// About 30 years (what tokio itself uses for "never"): the deadline of a timeout too long to
/// add to an `Instant`.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// The instant `after` from now; a timeout too long for an `Instant` (`Duration::MAX`) gives a
/// far deadline instead of a panic.
pub(crate) fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        // Unreachable: a monotonic clock is nowhere near its end.
        .unwrap_or(now)
}

/// One side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    /// The TLS role this side plays.
    pub fn role(self) -> Role {
        match self {
            Side::Source => Role::Client,
            Side::Destination => Role::Server,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// The wire transport actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// QEMU-native TLS over TCP.
    Tls,
    /// Plain TCP, unencrypted.
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tls => "tls",
            Transport::Tcp => "tcp",
        })
    }
}

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// TLS when both sides are secured, TCP when neither is, refuse a mixed pair.
    #[default]
    Auto,
    Tls,
    Tcp,
}

/// Runs `f` (libvirt's blocking calls) off the async threads, within `timeout`. A call that
/// outlives the timeout is not cancelled (libvirt has no way to): it finishes unseen.
pub(crate) async fn libvirt_call<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> Result<T, MigrationError> + Send + 'static,
) -> Result<T, MigrationError> {
    match tokio::time::timeout(timeout, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(MigrationError::Failed {
            desc: "a libvirt call panicked".into(),
        }),
        Err(_) => Err(MigrationError::Failed {
            desc: format!("libvirt did not answer within {timeout:?}"),
        }),
    }
}

/// The forecast for `opts`' source (`migrate --plan`): connects to the source's QMP, measures,
/// predicts, and changes nothing. The transport is decided from the PKI directories as for a
/// migration (it sets the throughput estimate).
pub async fn plan(opts: &ValidOptions) -> Result<Forecast, MigrationError> {
    let transport = match opts.transport {
        TransportChoice::Tcp => Transport::Tcp,
        TransportChoice::Tls => Transport::Tls,
        TransportChoice::Auto => {
            match decide_transport(opts.transport, &opts.source.pki_dir, &opts.dest.pki_dir) {
                Ok(d) => d.transport,
                // A remote destination's PKI is not here to look at: assume the usual case.
                Err(_) => Transport::Tls,
            }
        }
    };
    let src = side::SideCtl::connect(
        Side::Source,
        &opts.source.qmp,
        &opts.source.pki_dir,
        opts.qmp_timeout,
    )
    .await?;
    let blocks = src.call("query-block", &crate::qemu::QueryBlock).await?;
    let disk_bytes = disks::select(&blocks, &opts.disks, &opts.disk_copy)?
        .iter()
        .map(SourceDisk::to_copy)
        .sum();
    forecast::measure(&src, opts, transport, disk_bytes).await
}

/// How the tool reaches a libvirt domain's QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QmpAccess {
    /// A QMP monitor the domain declares in its `<qemu:commandline>`, beside libvirt's own.
    DeclaredMonitor,
    /// libvirt's own monitor, through its QMP passthrough (`virsh qemu-monitor-command`).
    LibvirtPassthrough,
}

/// A libvirt domain as a migration source: the QMP socket to drive it by, and how that socket
/// reaches QEMU. Keep it alive for the whole migration: with
/// [`QmpAccess::LibvirtPassthrough`] it serves the socket.
#[derive(Debug)]
pub struct DomainEndpoint {
    pub name: String,
    /// The domain's UUID: what names it to the VM lock whatever socket reaches it.
    pub uuid: String,
    pub socket: PathBuf,
    pub access: QmpAccess,
    /// The domain's disks, from its live XML (with their QEMU device ids).
    pub disks: Vec<crate::libvirt::DiskSpec>,
    _passthrough: Option<crate::libvirt::Passthrough>,
}

impl DomainEndpoint {
    /// The QEMU device id of the domain's disk named `disk`: its target (`vda`, as the
    /// domain's XML and the CloudStack agent name it) or its alias (`virtio-disk0`).
    pub fn device_of(&self, disk: &str) -> Result<String, MigrationError> {
        self.devices_of(std::slice::from_ref(&disk.to_string()))
            .map(|mut d| d.remove(0))
    }

    /// [`DomainEndpoint::device_of`] for each of `disks`.
    pub fn devices_of(&self, disks: &[String]) -> Result<Vec<String>, MigrationError> {
        disks.iter().map(|disk| self.lookup(disk)).collect()
    }

    fn lookup(&self, disk: &str) -> Result<String, MigrationError> {
        self.disks
            .iter()
            .find(|d| d.target == disk || d.alias.as_deref() == Some(disk))
            .and_then(|d| d.alias.clone())
            .ok_or_else(|| MigrationError::UnknownDisk {
                node: disk.to_string(),
                available: self.disks.iter().map(|d| d.target.clone()).collect(),
            })
    }
}

/// The libvirt domain `name` (at `uri`), checked movable: active, running or paused, no libvirt
/// job on it. Its QMP is the monitor its `<qemu:commandline>` declares (the tool then talks to
/// QEMU beside libvirt, which keeps its own monitor) or, when it declares none, libvirt's QMP
/// passthrough served on a private socket. Runs libvirt's blocking calls off the async
/// threads, within `timeout`.
pub async fn domain_endpoint(
    uri: &str,
    name: &str,
    timeout: Duration,
) -> Result<DomainEndpoint, MigrationError> {
    use crate::libvirt::{Libvirt, Passthrough, StateKind};
    let (uri, name) = (uri.to_string(), name.to_string());
    let handle = tokio::runtime::Handle::current();
    libvirt_call(timeout, move || {
        let refuse = |reason: String| MigrationError::DomainNotMovable {
            name: name.clone(),
            reason,
        };
        let domain = Libvirt::connect(&uri)?.domain(&name)?;
        let state = domain.state()?;
        if !matches!(state.kind, StateKind::Running | StateKind::Paused) {
            return Err(refuse(format!(
                "it is {}; only a running or paused domain can be migrated",
                state.kind.as_str()
            )));
        }
        if domain.job_active()? {
            return Err(refuse(
                "libvirt has a job running on it (another migration, a save, a snapshot); \
                 wait for it to end"
                    .into(),
            ));
        }
        let xml = domain.live_xml()?;
        let disks = xml.disks()?;
        let uuid = domain.uuid()?;
        if let Some(monitor) = xml.declared_monitor()? {
            return Ok(DomainEndpoint {
                name,
                uuid,
                socket: monitor.path,
                access: QmpAccess::DeclaredMonitor,
                disks,
                _passthrough: None,
            });
        }
        // The passthrough serves its socket on the async runtime.
        let _runtime = handle.enter();
        let passthrough = Passthrough::start(&uri, &name)?;
        Ok(DomainEndpoint {
            name,
            uuid,
            socket: passthrough.path().to_path_buf(),
            access: QmpAccess::LibvirtPassthrough,
            disks,
            _passthrough: Some(passthrough),
        })
    })
    .await
}

/// Destroys (stops) the libvirt domain `name` at `uri`; its definition stays.
pub async fn destroy_domain(
    uri: &str,
    name: &str,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let (uri, name) = (uri.to_string(), name.to_string());
    libvirt_call(timeout, move || {
        crate::libvirt::Libvirt::connect(&uri)?
            .domain(&name)?
            .destroy()?;
        tracing::info!(domain = %name, "source domain destroyed");
        Ok(())
    })
    .await
}

/// What a destination service started with `--libvirt` is asked to make: the incoming domain's
/// XML and the disks to create for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestDomain {
    pub xml: String,
    pub disks: Vec<crate::peer::NewDisk>,
}

/// What the destination service may do with a disk path that already exists
/// ([`crate::peer::NewDisk::adopt`], `grow`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestDisks {
    /// Use an existing file (after the service's checks) instead of refusing it.
    pub adopt: bool,
    /// Grow an adopted file smaller than the source's disk.
    pub grow: bool,
}

/// The incoming domain for the libvirt domain `name` (at `uri`): its migratable XML (or
/// `dest_xml`, the caller's rewrite of it: other disk paths, another VNC address), and the
/// disks to create on the destination, with the format and virtual size of the source's image
/// (`qemu-img info`): the writable file disks whose targets `create` names, or all of them
/// when it is `None`; those whose targets `top_only` names, each as an overlay on the backing
/// file of the same name as the source's, in its own directory on the destination.
///
/// A disk `create` names that is not a writable disk of the domain is refused, not left out.
/// A block or network disk is not made here (the service creates files only): the
/// destination's own checks find whether it has it (a service refuses a block disk in the
/// XML by name). An encrypted image (qcow2 with LUKS encryption, or a LUKS volume) is refused
/// here by name, before anything starts: its secret lives in each host's libvirt (a raw disk
/// holding a LUKS header is the guest's own encryption, copied as bytes).
/// `existing` says what the service may do with a path that exists (adopt it, grow it).
pub async fn dest_domain(
    uri: &str,
    name: &str,
    dest_xml: Option<String>,
    create: Option<Vec<String>>,
    top_only: Vec<String>,
    existing: DestDisks,
    timeout: Duration,
) -> Result<DestDomain, MigrationError> {
    use crate::libvirt::Libvirt;
    let (uri, name) = (uri.to_string(), name.to_string());
    libvirt_call(timeout, move || {
        let source_xml = Libvirt::connect(&uri)?.domain(&name)?.migratable_xml()?;
        let xml = dest_xml.unwrap_or_else(|| source_xml.as_str().to_string());
        let all = source_xml.disks()?;
        if let Some(targets) = &create {
            for target in targets {
                let why = match all.iter().find(|d| &d.target == target) {
                    None => Some("the domain has no such disk".to_string()),
                    Some(d) if d.device != "disk" => Some(format!("it is a {}", d.device)),
                    Some(d) if d.readonly => Some("it is read-only".to_string()),
                    Some(_) => None,
                };
                if let Some(why) = why {
                    return Err(MigrationError::BadOptions {
                        what: format!(
                            "disk {target} of domain {name} cannot be created on the destination \
                             host ({why}); leave it out of --disk, or declare it shared \
                             (--shared-disk {target}) if the destination reaches it"
                        ),
                    });
                }
            }
        }
        let writable = all
            .into_iter()
            .filter(|d| d.device == "disk" && !d.readonly)
            .filter(|d| create.as_ref().is_none_or(|t| t.contains(&d.target)));
        let mut disks = Vec::new();
        for disk in writable {
            let Some(file) = &disk.file else { continue };
            let info = image_info(file)?;
            let size = info["virtual-size"]
                .as_u64()
                .ok_or_else(|| MigrationError::Failed {
                    desc: format!("qemu-img info {}: no virtual size", file.display()),
                })?;
            let format = disk
                .format
                .clone()
                .or_else(|| info["format"].as_str().map(str::to_string))
                .unwrap_or_else(|| "raw".into());
            // A raw disk holding a LUKS header is the guest's own encryption, copied as bytes (one
            // libvirt decrypts has an <encryption> element, which the service refuses).
            if info["encrypted"].as_bool() == Some(true) && format != "raw" {
                return Err(MigrationError::BadOptions {
                    what: format!(
                        "disk {} of domain {name} ({}) is encrypted: encrypted (LUKS) volumes \
                         are not copied, their secrets being each host's libvirt's; leave it out \
                         of --disk, or declare it shared (--shared-disk {}) if the destination \
                         reaches it",
                        disk.target,
                        file.display(),
                        disk.target
                    ),
                });
            }
            let backing = match (
                top_only.contains(&disk.target),
                info["backing-filename"].as_str(),
            ) {
                (true, Some(backing)) => {
                    let file_name = Path::new(backing)
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .filter(|n| !n.is_empty())
                        .ok_or_else(|| MigrationError::BackingMismatch {
                            node: disk.target.clone(),
                            reason: format!("its backing file {backing:?} has no file name"),
                        })?;
                    Some(crate::peer::NewBacking {
                        file_name,
                        // Checked against the source's on the destination (format and size).
                        format: info["backing-filename-format"]
                            .as_str()
                            .unwrap_or("raw")
                            .to_string(),
                    })
                }
                // No backing file: the service makes a plain disk, and the preflight refuses
                // the top-only copy naming it.
                _ => None,
            };
            disks.push(crate::peer::NewDisk {
                target: disk.target.clone(),
                format,
                size,
                backing,
                adopt: existing.adopt,
                grow: existing.adopt && existing.grow,
            });
        }
        Ok(DestDomain { xml, disks })
    })
    .await
}

/// `qemu-img info -U --output=json` of `file`.
fn image_info(file: &Path) -> Result<serde_json::Value, MigrationError> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(file)
        .output()
        .map_err(|e| MigrationError::Failed {
            desc: format!("cannot run qemu-img info on {}: {e}", file.display()),
        })?;
    serde_json::from_slice(&out.stdout).map_err(|_| MigrationError::Failed {
        desc: format!(
            "qemu-img info {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// The transport decision and any warning that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportDecision {
    pub transport: Transport,
    pub warning: Option<String>,
}

/// Applies the secured/unsecured rule to the two PKI directories:
/// - a directory with TLS files that fail the checks is refused ([`MigrationError::PkiBroken`]),
///   never taken for an unsecured one;
/// - `auto`: TLS when both are secured, TCP (with a warning) when neither is (no TLS files at
///   all on either side), an error naming the unsecured side for a mixed pair;
/// - `tls`: both must be secured;
/// - `tcp`: always TCP.
pub fn decide_transport(
    choice: TransportChoice,
    source_pki: &Path,
    dest_pki: &Path,
) -> Result<TransportDecision, MigrationError> {
    if choice == TransportChoice::Tcp {
        return decide_transport_from(
            choice,
            (&Security::Secured, source_pki),
            (&Security::Secured, dest_pki),
        );
    }
    let src = pki::assess(source_pki, Side::Source.role());
    let dst = pki::assess(dest_pki, Side::Destination.role());
    decide_transport_from(choice, (&src, source_pki), (&dst, dest_pki))
}

/// [`decide_transport`] with each side's security already known (a remote destination
/// reports its own), with the directory (or a description of it) to name in errors.
pub fn decide_transport_from(
    choice: TransportChoice,
    source: (&Security, &Path),
    dest: (&Security, &Path),
) -> Result<TransportDecision, MigrationError> {
    if choice == TransportChoice::Tcp {
        return Ok(TransportDecision {
            transport: Transport::Tcp,
            warning: Some(
                "plain TCP was asked for: RAM and device state cross the network unencrypted"
                    .into(),
            ),
        });
    }
    let (src, source_pki) = source;
    let (dst, dest_pki) = dest;
    // A side whose TLS files fail the checks is refused whatever was asked: it was meant to be
    // secured, so falling back to plain TCP would send the VM in the clear by accident.
    for (side, dir, security) in [
        (Side::Source, source_pki, src),
        (Side::Destination, dest_pki, dst),
    ] {
        if let Security::Broken { problems } = security {
            return Err(MigrationError::PkiBroken {
                side,
                dir: dir.to_path_buf(),
                problems: problems.clone(),
            });
        }
    }
    let unsecured = |side: Side, dir: &Path, s: &Security| match s {
        Security::Unsecured { reason } => Some((side, dir.to_path_buf(), reason.clone())),
        Security::Secured | Security::Broken { .. } => None,
    };
    let problems: Vec<(Side, PathBuf, String)> = [
        unsecured(Side::Source, source_pki, src),
        unsecured(Side::Destination, dest_pki, dst),
    ]
    .into_iter()
    .flatten()
    .collect();
    match (choice, problems.as_slice()) {
        (_, []) => Ok(TransportDecision {
            transport: Transport::Tls,
            warning: None,
        }),
        (TransportChoice::Auto, [_, _]) => Ok(TransportDecision {
            transport: Transport::Tcp,
            warning: Some(format!(
                "neither host is secured for TLS (source: {}; destination: {}): migrating over \
                 plain TCP, unencrypted",
                problems[0].2, problems[1].2
            )),
        }),
        (TransportChoice::Auto, [(side, dir, reason)]) => Err(MigrationError::MixedSecurity {
            side: *side,
            dir: dir.clone(),
            reason: reason.clone(),
        }),
        (_, [(side, dir, reason), ..]) => Err(MigrationError::Unsecured {
            side: *side,
            dir: dir.clone(),
            reason: reason.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multifd_auto_takes_one_channel_per_two_cpus_of_the_smaller_host() {
        assert_eq!(auto_multifd(2, 2), None, "two CPUs: one stream");
        assert_eq!(auto_multifd(3, 64), None);
        assert_eq!(auto_multifd(16, 8), Some(4));
        assert_eq!(auto_multifd(64, 64), Some(AUTO_MULTIFD_MAX));
    }

    #[test]
    fn deadline_after_duration_max_is_far_away_not_a_panic() {
        let now = tokio::time::Instant::now();

        let deadline = deadline_after(Duration::MAX);

        assert!(deadline >= now + FAR_FUTURE, "{deadline:?}");
    }
}
