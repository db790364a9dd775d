//! Drives one migration through the steps listed in the module docs of [`super`]: the source
//! side directly over QMP, the destination side through a [`Destination`], local
//! ([`DestinationSide`]) or remote (the destination host's service).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::destination::{AbortOutcome, DestinationSide};
use super::disks::{self, DiskProgress, DiskReport, SourceDisk};
use super::side::{SideCtl, object_id};
use super::undo::Undo;
use super::{
    FinalStatus, MigrationError, MigrationOptions, PROGRESS_INTERVAL, Phase, Progress, RamReport,
    Report, Side, Transport, TransportDecision, decide_transport,
};
use crate::qemu::{
    BlockJobCancel, BlockJobEvent, BlockdevAddNbd, BlockdevMirror, InetAddress, Migrate,
    MigrateContinue, MigrateSetParameters, MigrationEvent, MigrationInfo, MigrationStatus,
    QueryBlock, QueryBlockJobs, QueryMigrate, QueryStatus, RamStats, tcp_uri,
};
use crate::peer::{DestPlan, DestPrepared};
use crate::qmp::{Events, Qmp, QmpError};

/// After the destination went away, how long the source has to report the failure in its own
/// words before the migration is declared lost.
const DEST_GONE_GRACE: Duration = Duration::from_secs(10);

/// The destination side as the driver sees it: prepared, watched, finished or aborted.
/// Implemented locally by [`DestinationSide`] and remotely over the control channel.
#[allow(async_fn_in_trait)]
pub trait Destination {
    /// Whether anything on the destination was changed (decides "refused" versus "failed").
    fn changed(&self) -> bool;
    /// Where the guest may run if this destination's state becomes unknown, for the report.
    fn holder(&self) -> String;
    /// Checks without changing anything (disks, ports, credentials).
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError>;
    /// Makes the destination ready to receive; returns its ports.
    async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError>;
    /// Resolves when the destination is lost (its QEMU exited, or its host stopped answering).
    async fn gone(&mut self);
    /// After the source completed: finish loading, resume when `resume`; returns clean-up
    /// problems.
    async fn finish(&mut self, resume: bool) -> Result<Vec<String>, MigrationError>;
    /// Rolls everything back; says whether the destination is known not to run the guest.
    async fn abort(&mut self) -> AbortOutcome;
}

impl Destination for DestinationSide {
    fn changed(&self) -> bool {
        DestinationSide::changed(self)
    }
    fn holder(&self) -> String {
        DestinationSide::holder(self)
    }
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        DestinationSide::preflight(self, plan).await
    }
    async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError> {
        DestinationSide::prepare(self, plan).await
    }
    async fn gone(&mut self) {
        DestinationSide::gone(self).await
    }
    async fn finish(&mut self, resume: bool) -> Result<Vec<String>, MigrationError> {
        DestinationSide::finish(self, resume).await
    }
    async fn abort(&mut self) -> AbortOutcome {
        DestinationSide::abort(self).await
    }
}

/// Runs one migration between two QEMUs reachable from this process and returns its report.
/// Never panics on outside input; on any failure everything the migration changed is rolled
/// back before this returns (see [`Report`]).
///
/// `progress` is called at each phase change and about every [`PROGRESS_INTERVAL`] while disks
/// or RAM move. `cancel` aborts the migration and rolls back (wire it to SIGINT/SIGTERM).
pub async fn migrate(
    opts: &MigrationOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &CancellationToken,
) -> Report {
    let started = Instant::now();
    let mut report = |p: Phase| {
        progress(&Progress {
            phase: p,
            status: None,
            elapsed_ms: started.elapsed().as_millis() as u64,
            ram: None,
            disks: Vec::new(),
        })
    };
    report(Phase::Preflight);
    // The transport comes from the PKI directories alone: nothing is connected yet.
    let decision = decide_transport(opts.transport, &opts.source.pki_dir, &opts.dest.pki_dir);
    let attach = async {
        let decision = decision?;
        let side =
            DestinationSide::attach(&opts.dest.qmp, &opts.dest.pki_dir, opts.qmp_timeout).await?;
        Ok((decision, side))
    };
    match attach.await {
        Ok((decision, side)) => migrate_to(opts, decision, side, started, progress, cancel).await,
        Err(error) => Report::refused(error, started.elapsed()),
    }
}

/// Runs one migration from the source in `opts` to `dest`, with the transport already decided.
pub async fn migrate_to<D: Destination>(
    opts: &MigrationOptions,
    decision: TransportDecision,
    mut dest: D,
    started: Instant,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &CancellationToken,
) -> Report {
    let mut run = Run {
        opts,
        started,
        progress,
        warnings: Vec::new(),
        transport: decision.transport,
        ram: RamReport::default(),
        src: None,
        ports: Vec::new(),
        disk_progress: Vec::new(),
        disk_reports: Vec::new(),
        committed: None,
    };
    if let Some(w) = &decision.warning {
        tracing::warn!("{w}");
        run.warnings.push(w.clone());
    }
    let result = run.execute(&mut dest, cancel).await;
    run.report(Phase::Cleanup, None, None);
    let (cleanup_errors, error, refused) = match result {
        Ok(problems) => {
            let mut errors = match &mut run.src {
                Some(src) => src.unwind(true).await,
                None => Vec::new(),
            };
            errors.extend(problems);
            (errors, None, false)
        }
        Err(error) => {
            // Refused means nothing was changed on either side, whatever the error.
            let refused = !dest.changed() && run.src.as_ref().is_none_or(|s| s.undo.is_empty());
            let (errors, error) = run.roll_back(&mut dest, error).await;
            (errors, Some(error), refused)
        }
    };
    let status = match &error {
        None => FinalStatus::Completed,
        Some(MigrationError::Cancelled) => FinalStatus::Cancelled,
        Some(_) => FinalStatus::Failed,
    };
    tracing::info!(?status, "migration finished");
    Report {
        status,
        transport: Some(run.transport),
        ram: run.ram,
        disks: run.disk_reports,
        ports: run.ports,
        wall: run.started.elapsed(),
        warnings: run.warnings,
        cleanup_errors,
        error,
        refused,
    }
}

struct Run<'a> {
    opts: &'a MigrationOptions,
    started: Instant,
    progress: &'a mut (dyn FnMut(&Progress) + Send),
    warnings: Vec<String>,
    transport: Transport,
    ram: RamReport,
    src: Option<SideCtl>,
    ports: Vec<u16>,
    disk_progress: Vec<DiskProgress>,
    disk_reports: Vec<DiskReport>,
    /// Set once the source passed the point of no return (what it passed): the destination
    /// may hold the whole state, and the source is resumed only if the destination is known
    /// not to run.
    committed: Option<&'static str>,
}

impl Run<'_> {
    /// Rolls back after a failure, in the order that keeps one running copy:
    /// 1. stop the outgoing migration, so nothing more reaches the destination, and learn
    ///    whether the source completed meanwhile;
    /// 2. roll the destination back, learning whether it may have run the guest;
    /// 3. unwind the source; it is resumed only if it never passed the point of no return or
    ///    the destination is known not to run. Otherwise it stays paused and the error says
    ///    where the VM may run.
    async fn roll_back<D: Destination>(
        &mut self,
        dest: &mut D,
        error: MigrationError,
    ) -> (Vec<String>, MigrationError) {
        let mut problems = Vec::new();
        if let Some(src) = &mut self.src {
            if src.undo.iter().any(|u| matches!(u, Undo::CancelMigration)) {
                src.undo.retain(|u| !matches!(u, Undo::CancelMigration));
                problems.extend(src.run_undo(Undo::CancelMigration).await);
            }
            if self.committed.is_none()
                && src.undo.iter().any(|u| matches!(u, Undo::ResumeSource))
            {
                // `migrate` was sent: it may have completed before the cancel took hold.
                match src.qmp.call_timeout(&QueryMigrate, src.timeout).await {
                    Ok(info) if info.status == Some(MigrationStatus::Completed) => {
                        self.committed = Some("the source completed the migration");
                    }
                    Ok(_) => {}
                    Err(e) if e.is_closed() => {}
                    Err(_) => self.committed = Some("the source's migration state is unknown"),
                }
            }
        }
        let outcome = dest.abort().await;
        problems.extend(outcome.problems);
        let keep_paused = self.committed.filter(|_| !outcome.stopped);
        if let Some(src) = &mut self.src {
            if keep_paused.is_some() {
                src.undo.retain(|u| !matches!(u, Undo::ResumeSource));
            }
            problems.extend(src.unwind(false).await);
        }
        let error = match keep_paused {
            Some(reason) => {
                tracing::error!(%reason, holder = %dest.holder(), "the source VM stays paused: the destination may run it");
                MigrationError::SplitBrainRisk {
                    reason: reason.to_string(),
                    holder: dest.holder(),
                    cause: Box::new(error),
                }
            }
            None => error,
        };
        (problems, error)
    }

    fn report(&mut self, phase: Phase, status: Option<MigrationStatus>, ram: Option<RamStats>) {
        let p = Progress {
            phase,
            status,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            ram,
            disks: self.disk_progress.clone(),
        };
        (self.progress)(&p);
    }

    /// Returns the destination's clean-up problems on success.
    async fn execute<D: Destination>(
        &mut self,
        dest: &mut D,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, MigrationError> {
        let opts = self.opts;
        let tls = self.transport == Transport::Tls;

        // Look, don't touch: the source, its disks, the destination's preflight.
        let mut src = SideCtl::connect(
            Side::Source,
            &opts.source.qmp,
            &opts.source.pki_dir,
            opts.qmp_timeout,
        )
        .await?;
        let was_running = check_source(&src).await?;
        src.save_settings().await?;
        let blocks = src.call("query-block", &QueryBlock).await?;
        let disks = disks::select(&blocks, &opts.disks)?;
        if !disks.is_empty() {
            tracing::info!(disks = ?disks.iter().map(|d| &d.node).collect::<Vec<_>>(), "disks to copy");
        }
        let behind = disks::left_behind(&blocks, &disks, &opts.shared_disks);
        if !behind.is_empty() {
            if !opts.allow_unsafe {
                return Err(MigrationError::DiskLeftBehind { nodes: behind });
            }
            let w = format!(
                "--unsafe: local disk(s) {} are not copied; the guest will not see their \
                 contents on the destination",
                behind.join(", ")
            );
            tracing::warn!("{w}");
            self.warnings.push(w);
        }
        let plan = DestPlan {
            tls,
            tls_priority: opts.tls_priority.clone(),
            multifd: opts.multifd,
            disks: disks.iter().map(SourceDisk::spec).collect(),
            create_dest_disks: opts.create_dest_disks,
            authz: opts.authz.clone(),
            listen_address: opts.listen_address().to_string(),
            port_range: opts.port_range,
        };
        let src = self.src.insert(src);
        dest.preflight(&plan).await?;
        if tls {
            src.probe_credentials(opts.tls_priority.as_deref()).await?;
        }
        if cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }

        // Prepare both sides. From here on every change has its undo.
        self.report(Phase::Prepare, None, None);
        let prepared = dest.prepare(&plan).await?;
        self.ports.push(prepared.migration_port);
        self.ports.extend(prepared.nbd_port);
        let src = self.src.as_mut().ok_or(MigrationError::Cancelled)?;
        let creds = if tls {
            let id = object_id("tls");
            src.add_credentials(&id, opts.tls_priority.as_deref())
                .await?;
            id
        } else {
            String::new()
        };
        let mut wanted = vec![("events", true)];
        if opts.multifd.is_some() {
            wanted.push(("multifd", true));
        }
        if !disks.is_empty() {
            // Stop at pre-switchover, CPUs paused, to end the mirrors before the last RAM pass.
            wanted.push(("pause-before-switchover", true));
        }
        src.set_capabilities(&wanted).await?;
        src.set_parameters(&MigrateSetParameters {
            tls_creds: Some(creds.clone()),
            tls_hostname: Some(if tls {
                opts.effective_tls_hostname().to_string()
            } else {
                String::new()
            }),
            max_bandwidth: Some(opts.max_bandwidth),
            downtime_limit: opts.downtime_limit.map(|d| d.as_millis() as u64),
            multifd_channels: opts.multifd,
            ..Default::default()
        })
        .await?;
        let qmp = src.qmp.clone();

        // Disks, then RAM.
        let mut src_events = qmp.subscribe();
        if let Some(nbd_port) = prepared.nbd_port {
            self.mirror_disks(&disks, nbd_port, &creds).await?;
            self.wait_mirrors_ready(&qmp, &disks, &mut src_events, dest, cancel)
                .await?;
        }
        let src = self.src.as_mut().ok_or(MigrationError::Cancelled)?;
        if was_running {
            src.undo.push(Undo::ResumeSource);
        }
        src.undo.push(Undo::CancelMigration);
        let uri = match &opts.source_connect {
            Some(hostport) => format!("tcp:{hostport}"),
            None => tcp_uri(opts.connect_host(), prepared.migration_port),
        };
        tracing::info!(%uri, transport = %self.transport, "starting migration");
        src.call("migrate", &Migrate { uri }).await?;
        self.report(Phase::Ram, Some(MigrationStatus::Setup), None);
        let info = self
            .follow(&qmp, &disks, &mut src_events, dest, cancel)
            .await?;
        let ram = info.ram.unwrap_or_default();
        self.ram = RamReport::from_stats(
            &ram,
            info.total_time.unwrap_or(0),
            info.downtime.unwrap_or(0),
        );

        // Finish on the destination: it runs exactly when the source ran before.
        self.report(Phase::Finish, info.status, Some(ram));
        dest.finish(was_running && !opts.dest_paused).await
    }

    /// Follows the outgoing migration to a final state, reporting progress. Fails on
    /// cancellation, the deadline, a stall, or a destination that went away.
    async fn follow<D: Destination>(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
        dest: &mut D,
        cancel: &CancellationToken,
    ) -> Result<MigrationInfo, MigrationError> {
        let mut switched = false;
        let opts = self.opts;
        let t = opts.qmp_timeout;
        let deadline = opts.timeout.and_then(|d| self.started.checked_add(d));
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut stall = StallWatch::new(opts.stall_timeout);
        let mut dest_gone_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::Timeout { after: opts.timeout.unwrap_or_default() });
                }
                event = src_events.next() => match event {
                    None => {
                        return Err(MigrationError::Qmp {
                            side: Side::Source,
                            step: "following the migration",
                            source: QmpError::Closed { peer: src.peer().to_string(), reason: "the source QEMU exited".into() },
                        });
                    }
                    Some(e) if e.event == "MIGRATION" => {
                        if let Ok(m) = serde_json::from_value::<MigrationEvent>(e.data) {
                            tracing::debug!(status = ?m.status, "source migration status");
                            self.note_commit(m.status);
                            if m.status.is_final() {
                                break;
                            }
                            if m.status == MigrationStatus::PreSwitchover && !switched {
                                switched = true;
                                self.switchover(src, disks, src_events).await?;
                            }
                        }
                    }
                    Some(_) => {}
                },
                _ = dest.gone(), if dest_gone_at.is_none() => {
                    tracing::warn!("the destination went away");
                    dest_gone_at = Some(Instant::now());
                }
                _ = tick.tick() => {
                    let info = qmp(Side::Source, "query-migrate", src.call_timeout(&QueryMigrate, t)).await?;
                    let ram = info.ram.unwrap_or_default();
                    self.report(Phase::Ram, info.status, info.ram);
                    if let Some(status) = info.status {
                        self.note_commit(status);
                    }
                    if info.status.is_some_and(MigrationStatus::is_final) {
                        break;
                    }
                    if info.status == Some(MigrationStatus::PreSwitchover) && !switched {
                        switched = true;
                        self.switchover(src, disks, src_events).await?;
                    }
                    stall.check(ram.transferred, || {
                        format!("{:?}", info.status.unwrap_or(MigrationStatus::None))
                    })?;
                    if dest_gone_at.is_some_and(|at| at.elapsed() >= DEST_GONE_GRACE) {
                        return Err(MigrationError::DestinationDied { desc: info.error_desc });
                    }
                }
            }
        }
        let info = qmp(
            Side::Source,
            "query-migrate",
            src.call_timeout(&QueryMigrate, t),
        )
        .await?;
        self.report(Phase::Ram, info.status, info.ram);
        if let Some(status) = info.status {
            self.note_commit(status);
        }
        if info.status == Some(MigrationStatus::Completed) {
            return Ok(self.final_stats(src, info).await);
        }
        let desc = info
            .error_desc
            .unwrap_or_else(|| format!("QEMU reports {:?}", info.status));
        // The destination exits when an incoming migration fails, so a dead destination is
        // often a consequence: the source's own words (a TLS error, say) explain more.
        match MigrationError::from_qemu_failure(desc, opts.effective_tls_hostname()) {
            MigrationError::Failed { desc } if dest_gone_at.is_some() => {
                Err(MigrationError::DestinationDied { desc: Some(desc) })
            }
            other => Err(other),
        }
    }

    /// Records that the source passed the point of no return, when `status` says so.
    fn note_commit(&mut self, status: MigrationStatus) {
        if self.committed.is_some() {
            return;
        }
        self.committed = match status {
            MigrationStatus::Device => Some("the source sent its device state"),
            MigrationStatus::Completed => Some("the source completed the migration"),
            _ => None,
        };
    }

    /// QEMU 7.2 sets the status to `completed` a moment before it fills in `total-time` and
    /// `downtime`; a query in between sees neither. Asks again, briefly, until they are there.
    async fn final_stats(&mut self, src: &Qmp, mut info: MigrationInfo) -> MigrationInfo {
        for _ in 0..40 {
            if info.total_time.unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            match src.call_timeout(&QueryMigrate, self.opts.qmp_timeout).await {
                Ok(again) => info = again,
                Err(_) => break,
            }
        }
        info
    }

    /// Source side: an NBD client node per disk (TLS as the migration) and a mirror into it.
    async fn mirror_disks(
        &mut self,
        disks: &[SourceDisk],
        port: u16,
        creds: &str,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let src = self.src.as_mut().ok_or(MigrationError::Cancelled)?;
        let tls = !creds.is_empty();
        for disk in disks {
            let add = BlockdevAddNbd {
                driver: "nbd",
                node_name: disk.nbd_node(),
                server: InetAddress::new(opts.connect_host(), port),
                export: disk.node.clone(),
                tls_creds: tls.then(|| creds.to_string()),
                tls_hostname: tls.then(|| opts.effective_tls_hostname().to_string()),
            };
            // Registered first: a command that times out may still be carried out.
            src.undo.push(Undo::DeleteBlockNode {
                side: Side::Source,
                node: disk.nbd_node(),
            });
            src.call("blockdev-add nbd", &add).await?;
        }
        for disk in disks {
            let mirror = BlockdevMirror {
                job_id: disk.job_id(),
                device: disk.node.clone(),
                target: disk.nbd_node(),
                sync: "full",
                copy_mode: opts.mirror_mode,
            };
            src.undo.push(Undo::CancelJob { job: disk.job_id() });
            src.call("blockdev-mirror", &mirror).await?;
        }
        self.disk_progress = disks
            .iter()
            .map(|d| DiskProgress {
                device: d.node.clone(),
                offset: 0,
                len: d.size,
                ready: false,
            })
            .collect();
        Ok(())
    }

    /// Follows the mirrors until every one is ready (source and destination in sync),
    /// reporting progress. Fails on a mirror error, a dead destination, a stall, the deadline,
    /// or cancellation.
    async fn wait_mirrors_ready<D: Destination>(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
        dest: &mut D,
        cancel: &CancellationToken,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let t = opts.qmp_timeout;
        let started = Instant::now();
        let deadline = opts.timeout.and_then(|d| self.started.checked_add(d));
        let mut ready: HashMap<String, u64> = HashMap::new();
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut stall = StallWatch::new(opts.stall_timeout);
        let node_of = |job: &str| {
            disks
                .iter()
                .find(|d| d.job_id() == job)
                .map(|d| d.node.clone())
        };
        self.report(Phase::Disks, None, None);
        while ready.len() < disks.len() {
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::Timeout { after: opts.timeout.unwrap_or_default() });
                }
                event = src_events.next() => {
                    let Some(e) = event else {
                        return Err(source_gone(src, "copying disks"));
                    };
                    let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else { continue };
                    let Some(node) = node_of(&job.device) else { continue };
                    match e.event.as_str() {
                        "BLOCK_JOB_READY" => {
                            tracing::info!(%node, bytes = job.len, "mirror ready");
                            ready.insert(node.clone(), started.elapsed().as_millis() as u64);
                            if let Some(p) = self.disk_progress.iter_mut().find(|p| p.device == node) {
                                p.offset = job.offset;
                                p.len = job.len;
                                p.ready = true;
                            }
                        }
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => {
                            return Err(MigrationError::MirrorFailed {
                                node,
                                desc: job.error.unwrap_or_else(|| format!("{} before the copy was in sync", e.event)),
                            });
                        }
                        _ => {}
                    }
                }
                _ = dest.gone() => {
                    return Err(MigrationError::DestinationDied { desc: Some("while disks were being copied".into()) });
                }
                _ = tick.tick() => {
                    let jobs = qmp(Side::Source, "query-block-jobs", src.call_timeout(&QueryBlockJobs, t)).await?;
                    for p in self.disk_progress.iter_mut() {
                        if let Some(j) = jobs.iter().find(|j| node_of(&j.device).as_deref() == Some(p.device.as_str())) {
                            p.offset = j.offset;
                            p.len = j.len;
                            p.ready |= j.ready;
                        }
                    }
                    self.report(Phase::Disks, None, None);
                    let total: u64 = self.disk_progress.iter().map(|p| p.offset).sum();
                    stall.check(total, || "copying disks".into())?;
                }
            }
        }
        self.disk_reports = self
            .disk_progress
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
                    bytes: p.len,
                    ms,
                    throughput_mbps: (mbps * 10.0).round() / 10.0,
                }
            })
            .collect();
        Ok(())
    }

    /// At `pre-switchover` (source CPUs paused): end every ready mirror without pivoting, so
    /// the destination's disks hold exactly the source's, then let the migration finish.
    async fn switchover(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        for disk in disks {
            let cancel = BlockJobCancel {
                device: disk.job_id(),
                force: false,
            };
            qmp(
                Side::Source,
                "block-job-cancel",
                src.call_timeout(&cancel, t),
            )
            .await?;
        }
        let mut pending: Vec<String> = disks.iter().map(|d| d.job_id()).collect();
        let deadline = Instant::now().checked_add(t);
        while !pending.is_empty() {
            let event = tokio::select! {
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::MirrorFailed {
                        node: pending.join(", "),
                        desc: format!("the mirror did not finish within {t:?} at switch-over"),
                    });
                }
                event = src_events.next() => event,
            };
            let Some(e) = event else {
                return Err(source_gone(src, "switch-over"));
            };
            let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                continue;
            };
            if !pending.contains(&job.device) {
                continue;
            }
            let node = disks
                .iter()
                .find(|d| d.job_id() == job.device)
                .map(|d| d.node.clone())
                .unwrap_or_else(|| job.device.clone());
            match (e.event.as_str(), job.error) {
                ("BLOCK_JOB_COMPLETED", None) => {
                    pending.retain(|j| j != &job.device);
                    if let Some(r) = self.disk_reports.iter_mut().find(|r| r.device == node) {
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
        self.committed = Some("the source passed the switch-over");
        qmp(Side::Source, "migrate-continue", src.call_timeout(&cont, t)).await?;
        Ok(())
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
            status: format!("{} with a migration already {s:?}", status.status),
        });
    }
    Ok(status.running)
}

/// Declares a copy stalled when its byte count has not grown for `after`.
struct StallWatch {
    after: Duration,
    bytes: u64,
    since: Instant,
}

impl StallWatch {
    fn new(after: Duration) -> StallWatch {
        StallWatch {
            after,
            bytes: 0,
            since: Instant::now(),
        }
    }

    /// Records the latest byte count; an error naming `status` once it has been still too long.
    fn check(&mut self, bytes: u64, status: impl FnOnce() -> String) -> Result<(), MigrationError> {
        if bytes > self.bytes {
            self.bytes = bytes;
            self.since = Instant::now();
        } else if self.since.elapsed() >= self.after {
            return Err(MigrationError::Stalled {
                after: self.after,
                status: status(),
            });
        }
        Ok(())
    }
}

fn source_gone(src: &Qmp, step: &'static str) -> MigrationError {
    MigrationError::Qmp {
        side: Side::Source,
        step,
        source: QmpError::Closed {
            peer: src.peer().to_string(),
            reason: "the source QEMU exited".into(),
        },
    }
}

/// Tags a QMP failure with the side and step it happened at.
async fn qmp<T>(
    side: Side,
    step: &'static str,
    call: impl std::future::Future<Output = Result<T, QmpError>>,
) -> Result<T, MigrationError> {
    call.await
        .map_err(|source| MigrationError::Qmp { side, step, source })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
