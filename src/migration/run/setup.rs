//! Phase 1, set-up: look, don't touch. The source and its disks are checked, what cannot go
//! is refused, the forecast and the convergence aids are sized, and the destination checks
//! the plan (its preflight). Nothing is changed on either side, so a failure here is a
//! refusal.

use std::time::Duration;

use super::super::convergence::{self, DEFAULT_DOWNTIME_MS, XbzrleCache};
use super::super::destination::Destination;
use super::super::disks::{self, SourceDisk};
use super::super::postcopy;
use super::super::side::SideCtl;
use super::super::versions::{self, QemuVersions};
use super::super::{ForecastWhen, MigrationError, Multifd, OBJECT_PREFIX, Transport, host_cpus};
use super::Run;
use crate::peer::DestPlan;
use crate::qemu::{
    BlockInfo, MigrationStatus, QueryBlock, QueryBlockJobs, QueryMemorySizeSummary, QueryMigrate,
    QueryStatus,
};

/// What set-up settled, for every later phase.
#[derive(Debug)]
pub(super) struct Setup {
    /// The guest ran before: it runs again on the destination (or here, after a roll-back).
    pub was_running: bool,
    pub disks: Vec<SourceDisk>,
    /// The multifd channels (`None`: one stream).
    pub multifd: Option<u8>,
    pub xbzrle_cache: Option<u64>,
    /// The whole-migration deadline (`--timeout`, or the completion timeout per GiB).
    pub deadline: Option<Duration>,
    /// The downtime limit the migration starts with (ms), from which steps rise.
    pub downtime_start_ms: u64,
    /// What the destination was asked to take, and checked.
    pub plan: DestPlan,
}

/// The guest's RAM size and dirty rate, when set-up needed them.
struct GuestFigures {
    ram_bytes: u64,
    dirty_mib_s: Option<u64>,
}

impl Run<'_, '_> {
    pub(super) async fn set_up<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
    ) -> Result<Setup, MigrationError> {
        let opts = self.opts;
        // QEMU 10.0 refuses multifd with post-copy ("not yet compatible"): auto picks none.
        let multifd = if opts.convergence.wants_postcopy() && opts.multifd == Multifd::Auto {
            None
        } else {
            opts.multifd.channels(host_cpus(), dest.cpus())
        };
        if opts.multifd == Multifd::Auto {
            tracing::info!(channels = ?multifd, "multifd auto");
        }
        self.said.multifd = multifd;
        let was_running = check_source(src).await?;
        src.save_settings().await?;
        let blocks = src.call("query-block", &QueryBlock).await?;
        let disks = self.pick_disks(src, &blocks).await?;
        self.refuse_what_cannot_go(&blocks, &disks, multifd)?;
        let guest = self.measure_guest(src, &disks).await?;
        let deadline = self.deadline(&disks, &guest);
        let xbzrle_cache = self.xbzrle_cache(src, &guest).await?;
        let conv = &opts.convergence;
        self.said.convergence.compress = conv.compress;
        let machine = versions::current_machine(src).await;
        let plan = DestPlan {
            tls: self.transport == Transport::Tls,
            tls_priority: opts.tls_priority.clone(),
            multifd,
            multifd_compression: conv.compress,
            disks: disks.iter().map(SourceDisk::spec).collect(),
            create_dest_disks: opts.create_dest_disks,
            authz: opts.authz.clone(),
            listen_address: opts.listen_address().to_string(),
            port_range: opts.port_range,
            machine,
            postcopy: conv.wants_postcopy(),
        };
        dest.preflight(&plan).await?;
        self.note_versions(src, dest);
        if plan.postcopy {
            self.check_postcopy(dest, &disks)?;
        }
        if plan.tls {
            src.probe_credentials(self.source_tls_priority().as_deref())
                .await?;
        }
        Ok(Setup {
            was_running,
            disks,
            multifd,
            xbzrle_cache,
            deadline,
            downtime_start_ms: opts
                .downtime_limit
                .map_or(DEFAULT_DOWNTIME_MS, |d| d.as_millis() as u64),
            plan,
        })
    }

    /// Refuses post-copy where this tool does not offer it: a QEMU before
    /// [`postcopy::FIRST_QEMU`] at either end, disks to copy (their mirrors end at
    /// `pre-switchover`, which post-copy skips), or a destination that cannot take it.
    fn check_postcopy<D: Destination>(
        &self,
        dest: &D,
        disks: &[SourceDisk],
    ) -> Result<(), MigrationError> {
        let refuse = |what: String| Err(MigrationError::BadOptions { what });
        let Some(versions) = self.said.qemu else {
            return refuse(
                "post-copy is refused: the destination's QEMU version is unknown".into(),
            );
        };
        if let Err(why) = postcopy::check_versions(versions.source, versions.destination) {
            return refuse(why);
        }
        if !dest.offers_postcopy() {
            return refuse(
                "post-copy is refused: it is offered only with a destination QEMU this process \
                 drives (--dest-qmp), not through a destination service (--to)"
                    .into(),
            );
        }
        if let Multifd::Channels(n) = self.opts.multifd {
            return refuse(format!(
                "post-copy is refused with --multifd {n}: QEMU does not run post-copy over \
                 multifd channels (leave --multifd out, or --multifd auto, which then picks none)"
            ));
        }
        if !disks.is_empty() {
            return refuse(format!(
                "post-copy is refused with disks to copy ({}): their mirrors end at \
                 pre-switchover, which post-copy does not pass; use shared storage \
                 (--shared-disk) or leave --postcopy out",
                disks
                    .iter()
                    .map(|d| d.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok(())
    }

    /// The GnuTLS priority of the source's credentials: the caller's, or without TLS 1.3 when
    /// post-copy may start ([`postcopy::tls_priority`]).
    pub(super) fn source_tls_priority(&self) -> Option<String> {
        let asked = self.opts.tls_priority.as_deref();
        if self.opts.convergence.wants_postcopy() {
            Some(postcopy::tls_priority(asked))
        } else {
            asked.map(str::to_string)
        }
    }

    /// Both ends' QEMU versions into the report, with a warning for an untested one.
    fn note_versions<D: Destination>(&mut self, src: &SideCtl, dest: &D) {
        let Some(destination) = dest.qemu_version() else {
            return;
        };
        let versions = QemuVersions {
            source: src.qmp.greeting().version.qemu,
            destination,
        };
        tracing::info!(source = %versions.source, destination = %versions.destination, "QEMU versions");
        if let Some(w) = versions.untested_warning() {
            self.warn(w);
        }
        self.said.qemu = Some(versions);
    }

    /// The disks to copy, each with its backing file's fingerprint when copied top-only.
    async fn pick_disks(
        &mut self,
        src: &SideCtl,
        blocks: &[BlockInfo],
    ) -> Result<Vec<SourceDisk>, MigrationError> {
        let opts = self.opts;
        let mut disks = disks::select(blocks, &opts.disks, &opts.disk_copy)?;
        disks::fingerprint_backings(&mut disks).await?;
        if !disks.is_empty() {
            check_no_orphan_mirrors(src).await?;
            tracing::info!(disks = ?disks.iter().map(|d| &d.node).collect::<Vec<_>>(), "disks to copy");
        }
        Ok(disks)
    }

    /// The refusals that need the source's answers (its block devices): compression with no
    /// multifd channel chosen, and a local disk left behind (or, with `--unsafe`, a warning).
    /// Cheap ones, before the forecast's second of sampling.
    ///
    /// Auto-converge is not refused under TCG: the page it was blamed for losing is lost by
    /// QEMU 7.2's TCG dirty tracking with or without it (see the README, "When a VM will not
    /// converge", and `scripts/repro-tcg-autoconverge.py`).
    fn refuse_what_cannot_go(
        &mut self,
        blocks: &[BlockInfo],
        disks: &[SourceDisk],
        multifd: Option<u8>,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let conv = &opts.convergence;
        if conv.compress.is_some() && multifd.is_none() {
            return Err(MigrationError::BadOptions {
                what: "--compress needs multifd (--multifd N; --multifd auto chose none on this \
                       host pair)"
                    .into(),
            });
        }
        let behind = disks::left_behind(blocks, disks, &opts.shared_disks);
        if behind.is_empty() {
            return Ok(());
        }
        if !opts.allow_unsafe {
            return Err(MigrationError::DiskLeftBehind { nodes: behind });
        }
        self.warn(format!(
            "--unsafe: local disk(s) {} are not copied; the guest will not see their contents \
             on the destination",
            behind.join(", ")
        ));
        Ok(())
    }

    /// The forecast (unless turned off), and the RAM size and dirty rate the deadline and the
    /// XBZRLE cache need: the forecast measures both, so nothing is measured twice.
    async fn measure_guest(
        &mut self,
        src: &SideCtl,
        disks: &[SourceDisk],
    ) -> Result<GuestFigures, MigrationError> {
        let opts = self.opts;
        let conv = &opts.convergence;
        if opts.forecast == ForecastWhen::Before {
            let disk_bytes = disks.iter().map(SourceDisk::to_copy).sum();
            let f = super::super::forecast::measure(src, opts, self.transport, disk_bytes).await?;
            if !f.converges {
                self.warn(format!(
                    "the forecast says this migration will not converge as configured (the \
                     guest dirties {} MiB/s against {} Mbit/s); consider: {}",
                    f.dirty_rate_mib_s,
                    f.throughput_mbps,
                    f.advice.join("; ")
                ));
            }
            let figures = GuestFigures {
                ram_bytes: f.ram_bytes,
                dirty_mib_s: Some(f.dirty_rate_mib_s as u64),
            };
            self.said.forecast = Some(f);
            return Ok(figures);
        }
        let needs_ram_size =
            conv.completion_timeout_per_gib.is_some() || conv.xbzrle == Some(XbzrleCache::Auto);
        let ram_bytes = if needs_ram_size {
            let summary = src
                .call("query-memory-size-summary", &QueryMemorySizeSummary)
                .await?;
            summary.base_memory + summary.plugged_memory.unwrap_or(0)
        } else {
            0
        };
        Ok(GuestFigures {
            ram_bytes,
            dirty_mib_s: None,
        })
    }

    /// `--timeout`, or the completion timeout per GiB of RAM and disk when it is earlier.
    fn deadline(&mut self, disks: &[SourceDisk], guest: &GuestFigures) -> Option<Duration> {
        let mut deadline = self.opts.timeout;
        if let Some(per_gib) = self.opts.convergence.completion_timeout_per_gib {
            let disk_bytes: u64 = disks.iter().map(|d| d.size).sum();
            let by_size = convergence::completion_timeout(per_gib, guest.ram_bytes + disk_bytes);
            deadline = Some(deadline.map_or(by_size, |t| t.min(by_size)));
        }
        self.said.convergence.deadline_ms = deadline.map(|d| d.as_millis() as u64);
        self.said.convergence.pause_deadline_ms = self
            .opts
            .convergence
            .pause_after
            .map(|d| d.as_millis() as u64);
        deadline
    }

    /// The XBZRLE cache: the size asked for, or sized from the guest's dirty rate.
    async fn xbzrle_cache(
        &mut self,
        src: &SideCtl,
        guest: &GuestFigures,
    ) -> Result<Option<u64>, MigrationError> {
        let cache = match self.opts.convergence.xbzrle {
            Some(XbzrleCache::Bytes(b)) => Some(b),
            Some(XbzrleCache::Auto) => {
                let rate = match guest.dirty_mib_s {
                    Some(rate) => rate,
                    None => src.sample_dirty_rate().await?,
                };
                let cache = convergence::auto_xbzrle_cache(rate, guest.ram_bytes);
                tracing::info!(dirty_mib_per_s = rate, cache, "XBZRLE cache sized");
                Some(cache)
            }
            None => None,
        };
        self.said.convergence.xbzrle_cache_bytes = cache;
        Ok(cache)
    }
}

/// Checks the source can be migrated; returns whether its guest is running.
async fn check_source(src: &SideCtl) -> Result<bool, MigrationError> {
    let status = src.call("query-status", &QueryStatus).await?;
    let movable = ["running", "paused", "prelaunch", "suspended", "debug"];
    if !movable.contains(&status.status.as_str()) {
        return Err(MigrationError::SourceNotReady {
            socket: src.socket.clone(),
            status: status.status,
        });
    }
    let info = src.call("query-migrate", &QueryMigrate).await?;
    if let Some(s) = info.status
        && !(s.is_final() || s == MigrationStatus::None)
    {
        return Err(MigrationError::SourceNotReady {
            socket: src.socket.clone(),
            status: format!("{} with a migration already {}", status.status, s.as_str()),
        });
    }
    Ok(status.running)
}

/// Refuses to copy disks while a mirror of this tool's is still on the source: the VM's lock
/// says no other run drives this VM, so it was left by a run that was killed before it could
/// clean up, and it still holds its disk (a new mirror of that disk would fail half way, after
/// the destination was prepared). Another run's job is never ours to cancel.
async fn check_no_orphan_mirrors(src: &SideCtl) -> Result<(), MigrationError> {
    let jobs = src.call("query-block-jobs", &QueryBlockJobs).await?;
    let orphans: Vec<String> = jobs
        .into_iter()
        .map(|j| j.device)
        .filter(|id| id.starts_with(OBJECT_PREFIX))
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    Err(MigrationError::OrphanJobs {
        socket: src.socket.clone(),
        jobs: orphans,
    })
}
