//! Phase 3, the disk copy: an NBD client node per disk on the source (TLS as the migration)
//! and a mirror into it, followed until every mirror is ready; and, at `pre-switchover`, the
//! end of every mirror without pivoting, so the destination's disks hold exactly the source's.

use std::collections::HashMap;

use tokio::time::Instant;

use super::super::destination::Destination;
use super::super::disks::{DiskProgress, DiskReport, SourceDisk};
use super::super::side::SideCtl;
use super::super::undo::Undo;
use super::super::{MigrationError, Phase, Side};
use super::Run;
use super::prepare::Prepared;
use super::setup::Setup;
use super::timeline::Mark;
use super::watch::{Deadlines, Seen, Watch, sleep_until_opt, source_gone};
use crate::peer::DiskCopy;
use crate::qemu::{
    BlockJobCancel, BlockJobEvent, BlockdevAddNbd, BlockdevMirror, MigrateContinue,
    MigrationStatus, MirrorSync, QueryBlockJobs,
};
use crate::qmp::Events;

impl Run<'_, '_> {
    /// Mirrors every disk into the destination's export on `nbd_port` and waits until all
    /// are in sync.
    pub(super) async fn copy_disks<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        setup: &Setup,
        prepared: &Prepared,
        nbd_port: u16,
        events: &mut Events,
    ) -> Result<(), MigrationError> {
        self.timeline.mark(Mark::Disks);
        self.mirror_disks(src, &setup.disks, nbd_port, &prepared.creds)
            .await?;
        self.wait_mirrors_ready(src, dest, setup, events).await
    }

    /// An NBD client node per disk and a mirror into it.
    async fn mirror_disks(
        &mut self,
        src: &mut SideCtl,
        disks: &[SourceDisk],
        port: u16,
        creds: &str,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let run = self.run_id.as_str();
        let tls = !creds.is_empty();
        for (i, disk) in disks.iter().enumerate() {
            let add = BlockdevAddNbd {
                driver: "nbd",
                node_name: disk.nbd_node(run, i),
                server: opts.nbd_server(port),
                export: disk.node.clone(),
                tls_creds: tls.then(|| creds.to_string()),
                tls_hostname: tls.then(|| opts.effective_tls_hostname().to_string()),
                // The mirror already sends what the source's metadata says is unallocated or
                // zero as WRITE_ZEROES; this catches data blocks that hold only zeroes.
                discard: opts.skip_zeroes.then_some("unmap"),
                detect_zeroes: opts.skip_zeroes.then_some("unmap"),
            };
            // Registered first: a command that times out may still be carried out.
            src.undo.push(Undo::DeleteBlockNode {
                side: Side::Source,
                node: disk.nbd_node(run, i),
            });
            src.call("blockdev-add nbd", &add).await?;
        }
        for (i, disk) in disks.iter().enumerate() {
            let mirror = BlockdevMirror {
                job_id: disk.job_id(run),
                device: disk.node.clone(),
                target: disk.nbd_node(run, i),
                sync: match disk.copy {
                    DiskCopy::Full => MirrorSync::Full,
                    DiskCopy::Top => MirrorSync::Top,
                },
                copy_mode: opts.mirror_mode,
                speed: opts.disk_bandwidth,
            };
            tracing::info!(node = %disk.node, copy = disk.copy.as_str(), to_copy = disk.allocated,
                speed = ?opts.disk_bandwidth, "mirroring");
            src.undo.push(Undo::CancelJob {
                job: disk.job_id(run),
                target: disk.nbd_node(run, i),
            });
            src.call("blockdev-mirror", &mirror).await?;
        }
        self.said.disk_progress = disks
            .iter()
            .map(|d| DiskProgress {
                device: d.node.clone(),
                offset: 0,
                len: d.size,
                ready: false,
                copy: d.copy,
                to_copy: d.allocated,
            })
            .collect();
        Ok(())
    }

    /// Follows the mirrors until every one is ready (source and destination in sync),
    /// reporting progress. Fails on a mirror error, a dead destination, a stall, the deadline,
    /// or cancellation.
    async fn wait_mirrors_ready<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        setup: &Setup,
        events: &mut Events,
    ) -> Result<(), MigrationError> {
        let started = Instant::now();
        let mut ready: HashMap<String, u64> = HashMap::new();
        // Only the RAM phase pauses the guest: here every deadline is one to abort at.
        let deadlines = Deadlines {
            abort: setup.deadline,
            pause: None,
        };
        let mut watch = Watch::new(self.opts, deadlines, self.started, "copying disks");
        let disks = &setup.disks;
        self.send_progress(Phase::Disks, None, None);
        while ready.len() < disks.len() {
            match watch
                .next(events, dest, self.cx.cancel, &mut self.cx.control)
                .await?
            {
                Seen::Control(request) => self.answer_control(src, request).await,
                Seen::Event(e) => {
                    let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                        continue;
                    };
                    // Events of another run's jobs (one killed earlier) are not ours to follow.
                    let Some(node) = node_of(disks, &self.run_id, &job.device) else {
                        continue;
                    };
                    match e.event.as_str() {
                        "BLOCK_JOB_READY" => {
                            tracing::info!(%node, bytes = job.len, "mirror ready");
                            ready.insert(node.clone(), started.elapsed().as_millis() as u64);
                            if let Some(p) = self
                                .said
                                .disk_progress
                                .iter_mut()
                                .find(|p| p.device == node)
                            {
                                p.offset = job.offset;
                                p.len = job.len;
                                p.ready = true;
                            }
                        }
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => {
                            if watch.saw_dest_lost() {
                                return Err(MigrationError::DestinationDied {
                                    desc: Some("while disks were being copied".into()),
                                });
                            }
                            return Err(MigrationError::MirrorFailed {
                                node,
                                desc: job.error.unwrap_or_else(|| {
                                    format!("{} before the copy was in sync", e.event)
                                }),
                            });
                        }
                        _ => {}
                    }
                }
                Seen::Deadline => continue,
                Seen::Tick => {
                    self.poll_mirrors(src, disks).await?;
                    let total: u64 = self.said.disk_progress.iter().map(|p| p.offset).sum();
                    watch.progressed(total, || "copying disks".into())?;
                    watch.check_dest_lost(|| Some("while disks were being copied".into()))?;
                }
            }
        }
        self.said.disk_reports = disk_reports(&self.said.disk_progress, &ready);
        Ok(())
    }

    /// Reads the mirrors' progress (`query-block-jobs`) and reports it.
    async fn poll_mirrors(
        &mut self,
        src: &SideCtl,
        disks: &[SourceDisk],
    ) -> Result<(), MigrationError> {
        let jobs = src.call("query-block-jobs", &QueryBlockJobs).await?;
        for p in self.said.disk_progress.iter_mut() {
            if let Some(j) = jobs.iter().find(|j| {
                node_of(disks, &self.run_id, &j.device).as_deref() == Some(p.device.as_str())
            }) {
                p.offset = j.offset;
                p.len = j.len;
                p.ready |= j.ready;
            }
        }
        self.send_progress(Phase::Disks, None, None);
        Ok(())
    }

    /// At `pre-switchover` (source CPUs paused): ends every ready mirror without pivoting, so
    /// the destination's disks hold exactly the source's, then lets the migration finish.
    pub(super) async fn switch_over(
        &mut self,
        src: &SideCtl,
        disks: &[SourceDisk],
        events: &mut Events,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        let run = self.run_id.clone();
        for disk in disks {
            let cancel = BlockJobCancel {
                device: disk.job_id(&run),
                force: false,
            };
            src.call("block-job-cancel", &cancel).await?;
        }
        let mut pending: Vec<String> = disks.iter().map(|d| d.job_id(&run)).collect();
        let deadline = Instant::now().checked_add(t);
        while !pending.is_empty() {
            let event = tokio::select! {
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::MirrorFailed {
                        node: pending.join(", "),
                        desc: format!("the mirror did not finish within {t:?} at switch-over"),
                    });
                }
                event = events.next() => event,
            };
            let Some(e) = event else {
                return Err(source_gone(src.qmp.peer(), "switch-over"));
            };
            self.note_stop(&e);
            let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                continue;
            };
            if !pending.contains(&job.device) {
                continue;
            }
            let node = node_of(disks, &run, &job.device).unwrap_or_else(|| job.device.clone());
            match (e.event.as_str(), job.error) {
                ("BLOCK_JOB_COMPLETED", None) => {
                    pending.retain(|j| j != &job.device);
                    if let Some(r) = self.said.disk_reports.iter_mut().find(|r| r.device == node) {
                        r.bytes = r.bytes.max(job.offset);
                    }
                }
                ("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED", error) => {
                    return Err(MigrationError::MirrorFailed {
                        node,
                        desc: error.unwrap_or_else(|| "cancelled before it was in sync".into()),
                    });
                }
                _ => {}
            }
        }
        tracing::info!("mirrors completed at switch-over; continuing");
        let cont = MigrateContinue {
            state: MigrationStatus::PreSwitchover,
        };
        // From here the source may finish at any moment, whatever this call returns.
        self.commit.pass(super::CommitPoint::SwitchOver);
        src.call("migrate-continue", &cont).await?;
        Ok(())
    }
}

/// The source node of this run's mirror job `job`; `None` for another run's job.
fn node_of(disks: &[SourceDisk], run: &str, job: &str) -> Option<String> {
    disks
        .iter()
        .find(|d| d.job_id(run) == job)
        .map(|d| d.node.clone())
}

/// Each disk's copy as the report gives it: `ready` holds when each came in sync (ms after
/// the copy began).
fn disk_reports(progress: &[DiskProgress], ready: &HashMap<String, u64>) -> Vec<DiskReport> {
    progress
        .iter()
        .map(|p| {
            let ms = ready.get(&p.device).copied().unwrap_or(0);
            let mbps = if ms == 0 {
                0.0
            } else {
                p.len as f64 * 8.0 / 1e6 / (ms as f64 / 1000.0)
            };
            DiskReport {
                device: p.device.clone(),
                copy: p.copy,
                to_copy: p.to_copy,
                bytes: p.len,
                ms,
                throughput_mbps: (mbps * 10.0).round() / 10.0,
            }
        })
        .collect()
}
