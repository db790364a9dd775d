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

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalStatus {
    Completed,
    Failed,
    Cancelled,
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
        }
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
        }
    }
}
