//! Progress while a migration runs, and the report at its end.

use std::time::Duration;

use serde::Serialize;

use super::{DiskProgress, DiskReport, MigrationError, Transport};
use crate::qemu::{MigrationStatus, RamStats};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Preflight,
    Prepare,
    /// Copying disks (NBD mirrors), before RAM.
    Disks,
    Ram,
    Finish,
    Cleanup,
}

impl Phase {
    /// As the JSON output spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preflight => "preflight",
            Phase::Prepare => "prepare",
            Phase::Disks => "disks",
            Phase::Ram => "ram",
            Phase::Finish => "finish",
            Phase::Cleanup => "cleanup",
        }
    }
}

/// A progress sample, sent to the caller's callback.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// QEMU's migration status, once the migration started.
    pub status: Option<MigrationStatus>,
    pub elapsed_ms: u64,
    /// RAM counters from `query-migrate` (bytes transferred, remaining, total, dirty rate, ...).
    pub ram: Option<RamStats>,
    /// Mirror progress per disk (empty without disk copies).
    pub disks: Vec<DiskProgress>,
}

impl Progress {
    /// A phase change with nothing measured yet.
    pub fn phase(phase: Phase, elapsed_ms: u64) -> Progress {
        Progress {
            phase,
            status: None,
            elapsed_ms,
            ram: None,
            disks: Vec::new(),
        }
    }
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalStatus {
    Completed,
    Failed,
    Cancelled,
}

impl FinalStatus {
    /// As the JSON output spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinalStatus::Completed => "completed",
            FinalStatus::Failed => "failed",
            FinalStatus::Cancelled => "cancelled",
        }
    }
}

/// RAM figures of a finished migration.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct RamReport {
    /// Bytes QEMU sent for RAM.
    pub bytes: u64,
    /// Guest RAM size.
    pub total: u64,
    /// QEMU's total migration time (setup to completion).
    pub total_ms: u64,
    /// Time the guest was paused for the switch-over.
    pub downtime_ms: u64,
    /// Average rate, megabits per second: `bytes` over `total_ms`.
    pub throughput_mbps: f64,
    /// How many times QEMU synchronised the dirty bitmap (passes over RAM).
    pub dirty_sync_count: u64,
    /// Bytes sent on the multifd channels (0 without multifd). With compression this is what
    /// crossed the wire for pages, while `bytes` counts them uncompressed (QEMU 7.2 counts a
    /// page in `transferred` when it queues it).
    pub multifd_bytes: u64,
}

impl RamReport {
    pub(crate) fn from_stats(ram: &RamStats, total_ms: u64, downtime_ms: u64) -> RamReport {
        let throughput_mbps = if total_ms == 0 {
            0.0
        } else {
            ram.transferred as f64 * 8.0 / 1e6 / (total_ms as f64 / 1000.0)
        };
        RamReport {
            bytes: ram.transferred,
            total: ram.total,
            total_ms,
            downtime_ms,
            throughput_mbps: (throughput_mbps * 10.0).round() / 10.0,
            dirty_sync_count: ram.dirty_sync_count,
            multifd_bytes: ram.multifd_bytes,
        }
    }
}

/// Where the wall time went, phase by phase (milliseconds; a phase that did not happen is 0).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Timing {
    /// Checks and preparing both sides, up to the first disk or RAM byte.
    pub setup_ms: u64,
    /// Copying disks until every mirror was in sync.
    pub disks_ms: u64,
    /// RAM: from `migrate` to completion, the switch-over excluded.
    pub ram_ms: u64,
    /// At `pre-switchover`: ending the mirrors with the source paused.
    pub switchover_ms: u64,
    /// The destination finishing: loaded, NBD stopped, resumed.
    pub finish_ms: u64,
    /// Putting settings back and removing what was added (or rolling back).
    pub cleanup_ms: u64,
}

/// What the tool itself cost (its own process; QEMU's CPU is not in it).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ToolUsage {
    /// User plus system CPU time.
    pub cpu_ms: u64,
    /// Peak resident set size.
    pub peak_rss_kib: u64,
}

impl ToolUsage {
    /// This process's usage so far.
    pub fn now() -> ToolUsage {
        use nix::sys::resource::{UsageWho, getrusage};
        match getrusage(UsageWho::RUSAGE_SELF) {
            Ok(u) => {
                let ms = |t: nix::sys::time::TimeVal| {
                    (t.tv_sec() as u64) * 1000 + (t.tv_usec() as u64) / 1000
                };
                ToolUsage {
                    cpu_ms: ms(u.user_time()) + ms(u.system_time()),
                    peak_rss_kib: u.max_rss().max(0) as u64,
                }
            }
            Err(_) => ToolUsage::default(),
        }
    }
}

/// The guest's real pause: from the source's `STOP` event to the destination's `RESUME`
/// event, by QEMU's own event timestamps.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct GuestPause {
    pub ms: u64,
    /// Which clocks the two timestamps come from: `"one host"`, or `"two hosts"` (then the
    /// figure assumes their clocks agree, e.g. through NTP).
    pub clock: &'static str,
}

/// What became of the source domain after a completed migration the caller was asked to end
/// it after (`--destroy-source`). A failure changes nothing of the migration's outcome (the
/// guest runs on the destination) but leaves the source's copy, paused, for someone to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceEnd {
    /// The source domain's name.
    pub domain: String,
    pub destroyed: bool,
    /// Why it was not destroyed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SourceEnd {
    /// Whether the source was to be ended and was not.
    pub fn failed(&self) -> bool {
        !self.destroyed
    }
}

/// The result of one migration: always produced, whatever happened.
#[derive(Debug)]
pub struct Report {
    pub status: FinalStatus,
    /// `None` when the migration was refused before a transport was chosen.
    pub transport: Option<Transport>,
    pub ram: RamReport,
    /// One entry per copied disk.
    pub disks: Vec<DiskReport>,
    /// Ports taken from the range: the migration stream's, then the NBD server's (with disks).
    pub ports: Vec<u16>,
    /// Wall time of the whole run, preflight and clean-up included.
    pub wall: Duration,
    pub warnings: Vec<String>,
    /// Problems met while cleaning up (reported, never hiding the main error).
    pub cleanup_errors: Vec<String>,
    pub error: Option<MigrationError>,
    /// The migration was refused before anything was changed on either side.
    pub refused: bool,
    pub timing: Timing,
    /// The guest's real pause, when both events were seen (QEMU's own `downtime` estimate is
    /// in `ram`).
    pub guest_pause: Option<GuestPause>,
    pub tool: ToolUsage,
    /// The multifd channels used (`None`: one stream).
    pub multifd: Option<u8>,
    /// For a libvirt domain: how the tool reached the source's QEMU (set by the caller).
    pub source_qmp_access: Option<super::QmpAccess>,
    /// After a completed migration whose caller was to end the source (`--destroy-source`):
    /// whether that worked (set by the caller).
    pub source_end: Option<SourceEnd>,
    /// What the convergence options did.
    pub convergence: super::ConvergenceReport,
    /// The forecast made before starting, if one was asked for: compare with `ram`.
    pub forecast: Option<super::Forecast>,
    /// `query-version` of both ends (`None` when refused before the destination answered).
    pub qemu: Option<super::QemuVersions>,
}

impl Report {
    /// The report of a migration refused before either VM was changed.
    pub fn refused(error: MigrationError, wall: Duration) -> Report {
        Report {
            status: if matches!(error, MigrationError::Cancelled) {
                FinalStatus::Cancelled
            } else {
                FinalStatus::Failed
            },
            transport: None,
            ram: RamReport::default(),
            disks: Vec::new(),
            ports: Vec::new(),
            wall,
            warnings: Vec::new(),
            cleanup_errors: Vec::new(),
            error: Some(error),
            refused: true,
            timing: Timing {
                setup_ms: wall.as_millis() as u64,
                ..Timing::default()
            },
            guest_pause: None,
            tool: ToolUsage::now(),
            multifd: None,
            source_qmp_access: None,
            source_end: None,
            convergence: super::ConvergenceReport::default(),
            forecast: None,
            qemu: None,
        }
    }
}
