//! Drives one migration through the steps listed in the module docs of [`super`]: the source
//! side directly over QMP, the destination side through a [`Destination`], local
//! ([`DestinationSide`]) or remote (the destination host's service).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::control::{self, AppliedControl, Control, ControlRequest};
use super::convergence::{self, ConvergenceReport, DowntimeStep, TimeoutAction, XbzrleCache};
use super::destination::{AbortOutcome, DestinationSide, Finished};
use super::disks::{self, DiskProgress, DiskReport, SourceDisk};
use super::side::SideCtl;
use super::undo::Undo;
use super::{
    FinalStatus, GuestPause, MigrationError, MigrationOptions, PROGRESS_INTERVAL, Phase, Progress,
    RamReport, Report, Side, Timing, ToolUsage, Transport, TransportDecision, decide_transport,
};
use crate::peer::{DestPlan, DestPrepared, DiskCopy};
use crate::qemu::{
    BlockJobCancel, BlockJobEvent, BlockdevAddNbd, BlockdevMirror, CalcDirtyRate, Migrate,
    MigrateContinue, MigrateSetParameters, MigrationEvent, MigrationInfo, MigrationStatus,
    MirrorSync, QueryBlock, QueryBlockJobs, QueryDirtyRate, QueryKvm, QueryMemorySizeSummary,
    QueryMigrate, QueryStatus, RamStats, Stop, tcp_uri,
};
use crate::qmp::{Events, Qmp, QmpError};
use crate::vm_lock::VmLock;

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
    /// Whose clock the destination's event timestamps come from, next to this host's.
    fn clock(&self) -> &'static str {
        "one host"
    }
    /// The destination host's CPU count (for `--multifd auto`).
    fn cpus(&self) -> u32 {
        super::host_cpus()
    }
    /// Checks without changing anything (disks, ports, credentials).
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError>;
    /// Makes the destination ready to receive; returns its ports.
    async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError>;
    /// Resolves when the destination is lost (its QEMU exited, or its host stopped answering).
    async fn gone(&mut self);
    /// After the source completed: finish loading, resume when `resume`; returns clean-up
    /// problems.
    async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError>;
    /// Rolls everything back; says whether the destination is known not to run the guest.
    async fn abort(&mut self) -> AbortOutcome;
    /// Once [`Destination::gone`] returned: what is known of why.
    fn gone_reason(&self) -> Option<String> {
        None
    }
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
    async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError> {
        DestinationSide::finish(self, resume).await
    }
    async fn abort(&mut self) -> AbortOutcome {
        DestinationSide::abort(self).await
    }
    fn gone_reason(&self) -> Option<String> {
        Some("its QEMU exited".into())
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
    if let Err(error) = opts.validate() {
        return Report::refused(error, started.elapsed());
    }
    // Before anything else, and held until the roll-back is over: no other run drives this VM.
    let lock = match super::lock_source(opts) {
        Ok(lock) => lock,
        Err(error) => return Report::refused(error, started.elapsed()),
    };
    // The transport comes from the PKI directories alone: nothing is connected yet.
    let decision = decide_transport(opts.transport, &opts.source.pki_dir, &opts.dest.pki_dir);
    let attach = async {
        let decision = decision?;
        let side =
            DestinationSide::attach(&opts.dest.qmp, &opts.dest.pki_dir, opts.qmp_timeout).await?;
        Ok((decision, side))
    };
    match attach.await {
        Ok((decision, side)) => {
            migrate_to(opts, decision, side, &lock, started, progress, cancel).await
        }
        Err(error) => Report::refused(error, started.elapsed()),
    }
}

/// Runs one migration from the source in `opts` to `dest`, with the transport already decided.
/// `_lock` is the source VM's lock, which the caller holds until this returns: the proof that
/// no other run drives the same VM (see [`crate::vm_lock`]).
pub async fn migrate_to<D: Destination>(
    opts: &MigrationOptions,
    decision: TransportDecision,
    mut dest: D,
    _lock: &VmLock,
    started: Instant,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &CancellationToken,
) -> Report {
    let mut run = Run::new(opts, started, progress, decision.transport);
    if let Some(w) = &decision.warning {
        tracing::warn!("{w}");
        run.warnings.push(w.clone());
    }
    let result = run.execute(&mut dest, cancel).await;
    run.marks.cleanup = Some(Instant::now());
    run.report(Phase::Cleanup, None, None);
    let mut resumed_at_us = None;
    let (cleanup_errors, error, refused) = match result {
        Ok(finished) => {
            let mut errors = match &mut run.src {
                Some(src) => src.unwind(true).await,
                None => Vec::new(),
            };
            errors.extend(finished.problems);
            resumed_at_us = finished.resumed_at_us;
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
    let guest_pause = match (run.stopped_at_us, resumed_at_us) {
        (Some(stop), Some(resume)) if resume >= stop => Some(GuestPause {
            ms: ((resume - stop) / 1000) as u64,
            clock: dest.clock(),
        }),
        _ => None,
    };
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
        timing: run.marks.timing(run.started, Instant::now()),
        guest_pause,
        tool: ToolUsage::now(),
        multifd: run.multifd,
        source_qmp_access: None,
        convergence: run.convergence,
        forecast: run.forecast,
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
    marks: Marks,
    /// The multifd channels used (`None`: one stream).
    multifd: Option<u8>,
    /// The source's last `STOP` event, microseconds since the epoch (this host's clock).
    stopped_at_us: Option<i64>,
    /// The whole-migration deadline in force (`--timeout`, or the completion timeout per GiB).
    deadline: Option<Duration>,
    /// The downtime limit the migration started with (ms), from which steps rise.
    downtime_start_ms: u64,
    convergence: ConvergenceReport,
    /// Controls from another task ([`super::control`]), read by the watch loop.
    control: Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
    forecast: Option<super::forecast::Forecast>,
    /// In the names of the nodes and jobs this run creates ([`disks::run_id`]).
    run_id: String,
}

/// When each phase began, for [`Timing`].
#[derive(Debug, Default)]
struct Marks {
    disks: Option<Instant>,
    ram: Option<Instant>,
    switchover: Option<Instant>,
    switched: Option<Instant>,
    finish: Option<Instant>,
    finished: Option<Instant>,
    cleanup: Option<Instant>,
}

impl Marks {
    fn timing(&self, started: Instant, end: Instant) -> Timing {
        let ms = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(a), Some(b)) if b > a => (b - a).as_millis() as u64,
            _ => 0,
        };
        let first_byte = self.disks.or(self.ram).or(self.cleanup);
        let switchover_ms = ms(self.switchover, self.switched);
        Timing {
            setup_ms: ms(Some(started), first_byte),
            disks_ms: ms(self.disks, self.ram),
            ram_ms: ms(self.ram, self.finish.or(self.cleanup)).saturating_sub(switchover_ms),
            switchover_ms,
            finish_ms: ms(self.finish, self.finished),
            cleanup_ms: ms(self.cleanup, Some(end)),
        }
    }
}

impl<'a> Run<'a> {
    /// A run that has done nothing yet; the deadline is `--timeout` until the completion
    /// timeout per GiB is known, and the caller's control channel (if any) is taken over.
    fn new(
        opts: &'a MigrationOptions,
        started: Instant,
        progress: &'a mut (dyn FnMut(&Progress) + Send),
        transport: Transport,
    ) -> Run<'a> {
        Run {
            opts,
            started,
            progress,
            warnings: Vec::new(),
            transport,
            ram: RamReport::default(),
            src: None,
            ports: Vec::new(),
            disk_progress: Vec::new(),
            disk_reports: Vec::new(),
            committed: None,
            marks: Marks::default(),
            multifd: None,
            stopped_at_us: None,
            deadline: opts.timeout,
            downtime_start_ms: DEFAULT_DOWNTIME_MS,
            convergence: ConvergenceReport::default(),
            control: opts.control.as_ref().and_then(|c| c.take()),
            forecast: None,
            run_id: disks::run_id(),
        }
    }
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
            if self.committed.is_none() && src.undo.iter().any(|u| matches!(u, Undo::ResumeSource))
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
    ) -> Result<Finished, MigrationError> {
        let opts = self.opts;
        let tls = self.transport == Transport::Tls;
        let multifd = if opts.multifd_auto {
            let n = super::auto_multifd(super::host_cpus(), dest.cpus());
            tracing::info!(channels = ?n, "multifd auto");
            n
        } else {
            opts.multifd
        };
        self.multifd = multifd;

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
        let mut disks = disks::select(&blocks, &opts.disks, &opts.disk_copy)?;
        disks::fingerprint_backings(&mut disks).await?;
        if !disks.is_empty() {
            check_no_orphan_mirrors(&src).await?;
        }
        if !disks.is_empty() {
            tracing::info!(disks = ?disks.iter().map(|d| &d.node).collect::<Vec<_>>(), "disks to copy");
        }
        let conv = &opts.convergence;
        if conv.auto_converge.is_some() {
            let kvm = src.call("query-kvm", &QueryKvm).await?;
            if !kvm.enabled {
                return Err(MigrationError::BadOptions {
                    what: AUTO_CONVERGE_ON_TCG.into(),
                });
            }
        }
        if conv.compress.is_some() && multifd.is_none() {
            return Err(MigrationError::BadOptions {
                what: "--compress needs multifd (--multifd N; --multifd auto chose none on this \
                       host pair)"
                    .into(),
            });
        }
        // Cheap refusals before the forecast's second of sampling.
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
        if opts.forecast {
            let disk_bytes = disks.iter().map(SourceDisk::to_copy).sum();
            let f = super::forecast::measure(&src, opts, self.transport, disk_bytes).await?;
            if !f.converges {
                let w = format!(
                    "the forecast says this migration will not converge as configured (the \
                     guest dirties {} MiB/s against {} Mbit/s); consider: {}",
                    f.dirty_rate_mib_s,
                    f.throughput_mbps,
                    f.advice.join("; ")
                );
                tracing::warn!("{w}");
                self.warnings.push(w);
            }
            self.forecast = Some(f);
        }
        // The forecast measured the RAM and the dirty rate already, when it ran.
        let needs_ram_size =
            conv.completion_timeout_per_gib.is_some() || conv.xbzrle == Some(XbzrleCache::Auto);
        let ram_size = match &self.forecast {
            Some(f) => f.ram_bytes,
            None if needs_ram_size => {
                let summary = src
                    .call("query-memory-size-summary", &QueryMemorySizeSummary)
                    .await?;
                summary.base_memory + summary.plugged_memory.unwrap_or(0)
            }
            None => 0,
        };
        if let Some(per_gib) = conv.completion_timeout_per_gib {
            let disk_bytes: u64 = disks.iter().map(|d| d.size).sum();
            let by_size = convergence::completion_timeout(per_gib, ram_size + disk_bytes);
            self.deadline = Some(self.deadline.map_or(by_size, |t| t.min(by_size)));
        }
        self.convergence.deadline_ms = self.deadline.map(|d| d.as_millis() as u64);
        let xbzrle_cache = match conv.xbzrle {
            Some(XbzrleCache::Bytes(b)) => Some(b),
            Some(XbzrleCache::Auto) => {
                let rate = match &self.forecast {
                    Some(f) => f.dirty_rate_mib_s as u64,
                    None => sample_dirty_rate(&src).await?,
                };
                let cache = convergence::auto_xbzrle_cache(rate, ram_size);
                tracing::info!(dirty_mib_per_s = rate, cache, "XBZRLE cache sized");
                Some(cache)
            }
            None => None,
        };
        self.convergence.xbzrle_cache_bytes = xbzrle_cache;
        self.convergence.compress = conv.compress;
        self.downtime_start_ms = opts
            .downtime_limit
            .map_or(DEFAULT_DOWNTIME_MS, |d| d.as_millis() as u64);
        let plan = DestPlan {
            tls,
            tls_priority: opts.tls_priority.clone(),
            multifd,
            multifd_compression: conv.compress.map(|c| c.as_str().to_string()),
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
            src.credentials_id(opts.tls_priority.as_deref()).await?
        } else {
            String::new()
        };
        let mut wanted = vec![("events", true)];
        if multifd.is_some() {
            wanted.push(("multifd", true));
        }
        if !disks.is_empty() {
            // Stop at pre-switchover, CPUs paused, to end the mirrors before the last RAM pass.
            wanted.push(("pause-before-switchover", true));
        }
        if opts.convergence.auto_converge.is_some() {
            wanted.push(("auto-converge", true));
        }
        if xbzrle_cache.is_some() {
            wanted.push(("xbzrle", true));
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
            multifd_channels: multifd,
            multifd_compression: opts.convergence.compress.map(|c| c.as_str().to_string()),
            cpu_throttle_initial: opts.convergence.auto_converge.map(|t| t.initial),
            cpu_throttle_increment: opts.convergence.auto_converge.map(|t| t.increment),
            xbzrle_cache_size: xbzrle_cache,
            ..Default::default()
        })
        .await?;
        let qmp = src.qmp.clone();

        // Disks, then RAM.
        let mut src_events = qmp.subscribe();
        if let Some(nbd_port) = prepared.nbd_port {
            self.marks.disks = Some(Instant::now());
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
            Some(a) => tcp_uri(&a.host, a.port_or(prepared.migration_port)),
            None => tcp_uri(opts.connect_host(), prepared.migration_port),
        };
        tracing::info!(%uri, transport = %self.transport, "starting migration");
        self.marks.ram = Some(Instant::now());
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
        self.marks.finish = Some(Instant::now());
        let finished = dest.finish(was_running && !opts.dest_paused).await;
        self.marks.finished = Some(Instant::now());
        finished
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
        let mut watch = Watch::new(opts, self.deadline, self.started, "following the migration");
        watch.pause_at_deadline = opts.convergence.timeout_action == TimeoutAction::Pause;
        loop {
            let status = match watch
                .next(src_events, dest, cancel, &mut self.control)
                .await?
            {
                Seen::Event(e) if e.event == "MIGRATION" => {
                    match serde_json::from_value::<MigrationEvent>(e.data) {
                        Ok(m) => {
                            tracing::debug!(status = ?m.status, "source migration status");
                            m.status
                        }
                        Err(_) => continue,
                    }
                }
                Seen::Event(e) => {
                    if e.event == "STOP" {
                        self.stopped_at_us =
                            e.timestamp.map(|t| t.seconds * 1_000_000 + t.microseconds);
                    }
                    continue;
                }
                Seen::Tick => {
                    let info = qmp(
                        Side::Source,
                        "query-migrate",
                        src.call_timeout(&QueryMigrate, t),
                    )
                    .await?;
                    let ram = info.ram.unwrap_or_default();
                    self.report(Phase::Ram, info.status, info.ram);
                    self.note_convergence(&info);
                    let status = info.status.unwrap_or(MigrationStatus::None);
                    if !status.is_final() {
                        watch.progressed(ram.transferred, || format!("{status:?}"))?;
                        watch.check_dest_gone(|| info.error_desc.clone())?;
                        self.step_downtime(src).await?;
                    }
                    status
                }
                Seen::Deadline => {
                    // What is left moves while the guest is paused: downtime, not failure.
                    tracing::warn!(after = ?self.deadline, "deadline passed: pausing the guest so the migration finishes");
                    qmp(
                        Side::Source,
                        "stop (timeout action)",
                        src.call_timeout(&Stop, t),
                    )
                    .await?;
                    self.convergence.timeout_action = Some(TimeoutAction::Pause);
                    self.convergence.timeout_action_at_ms =
                        Some(self.started.elapsed().as_millis() as u64);
                    continue;
                }
                Seen::Control(request) => {
                    self.answer_control(src, request).await;
                    continue;
                }
            };
            self.note_commit(status);
            if status.is_final() {
                break;
            }
            if status == MigrationStatus::PreSwitchover && !switched {
                switched = true;
                self.marks.switchover = Some(Instant::now());
                self.switchover(src, disks, src_events).await?;
                self.marks.switched = Some(Instant::now());
            }
        }
        // A poll may have seen the end before the queued events were read: the STOP among
        // them dates the guest's pause.
        while let Some(e) = src_events.try_next() {
            if e.event == "STOP" {
                self.stopped_at_us = e.timestamp.map(|t| t.seconds * 1_000_000 + t.microseconds);
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
            let info = self.final_stats(src, info).await;
            self.note_convergence(&info);
            return Ok(info);
        }
        let desc = info
            .error_desc
            .unwrap_or_else(|| format!("QEMU reports {:?}", info.status));
        // The destination exits when an incoming migration fails, so a dead destination is
        // often a consequence: the source's own words (a TLS error, say) explain more.
        match MigrationError::from_qemu_failure(desc, opts.effective_tls_hostname()) {
            MigrationError::Failed { desc } if watch.dest_gone() => {
                Err(watch.gone_error(Some(format!("source reports: {desc}"))))
            }
            other => Err(other),
        }
    }

    /// Notes what the convergence means did, from a `query-migrate` reply.
    fn note_convergence(&mut self, info: &MigrationInfo) {
        if let Some(pct) = info.cpu_throttle_percentage {
            let max = self.convergence.auto_converge_max_throttle_pct.unwrap_or(0);
            self.convergence.auto_converge_max_throttle_pct = Some(max.max(pct));
        }
        if let Some(x) = info.xbzrle_cache {
            self.convergence.xbzrle_bytes = Some(x.bytes);
        }
    }

    /// Raises the downtime limit when a step of `--downtime-steps` is due.
    async fn step_downtime(&mut self, src: &Qmp) -> Result<(), MigrationError> {
        let (Some(steps), Some(ram_start)) = (self.opts.convergence.downtime_steps, self.marks.ram)
        else {
            return Ok(());
        };
        let Some(limit) = steps.limit_at(self.downtime_start_ms, ram_start.elapsed()) else {
            return Ok(());
        };
        if self.convergence.controls.iter().any(|c| c.sets_downtime()) {
            // An operator set the limit while the migration ran: theirs stands.
            return Ok(());
        }
        let current = self
            .convergence
            .downtime_steps
            .last()
            .map_or(self.downtime_start_ms, |s| s.limit_ms);
        if limit <= current {
            return Ok(());
        }
        tracing::info!(limit_ms = limit, "raising the downtime limit");
        let set = MigrateSetParameters {
            downtime_limit: Some(limit),
            ..Default::default()
        };
        qmp(
            Side::Source,
            "migrate-set-parameters downtime-limit",
            src.call_timeout(&set, self.opts.qmp_timeout),
        )
        .await?;
        self.convergence.downtime_steps.push(DowntimeStep {
            at_ms: ram_start.elapsed().as_millis() as u64,
            limit_ms: limit,
        });
        Ok(())
    }

    /// Applies a control from another task on the source and answers it; a refused control
    /// leaves the migration running as it was.
    async fn answer_control(&mut self, src: &Qmp, request: ControlRequest) {
        let result = self.apply_control(src, request.control).await;
        if let Err(e) = &result {
            tracing::warn!(control = ?request.control, "control refused: {e}");
        }
        // The asker may have given up waiting: nothing to tell then.
        let _ = request.reply.send(result);
    }

    async fn apply_control(&mut self, src: &Qmp, control: Control) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        match control {
            Control::SetMaxBandwidth(b) => {
                if b == 0 || b > super::UNLIMITED_BANDWIDTH {
                    return Err(MigrationError::BadOptions {
                        what: format!(
                            "bandwidth {b} bytes/s: use 1 to {} (unlimited)",
                            super::UNLIMITED_BANDWIDTH
                        ),
                    });
                }
                let set = MigrateSetParameters {
                    max_bandwidth: Some(b),
                    ..Default::default()
                };
                let step = "migrate-set-parameters max-bandwidth (control)";
                qmp(Side::Source, step, src.call_timeout(&set, t)).await?;
            }
            Control::SetDowntimeLimit(d) => {
                let set = MigrateSetParameters {
                    downtime_limit: Some(d.as_millis() as u64),
                    ..Default::default()
                };
                let step = "migrate-set-parameters downtime-limit (control)";
                qmp(Side::Source, step, src.call_timeout(&set, t)).await?;
            }
            Control::Pause => {
                let status = qmp(
                    Side::Source,
                    "query-status",
                    src.call_timeout(&QueryStatus, t),
                )
                .await?;
                // Paused during the disk copy, the source must still be resumed on a roll-back
                // (its resume is registered only when RAM starts to move).
                if status.running
                    && let Some(side) = self.src.as_mut()
                    && !side.undo.iter().any(|u| matches!(u, Undo::ResumeSource))
                {
                    side.undo.push(Undo::ResumeSource);
                }
                qmp(Side::Source, "stop (control)", src.call_timeout(&Stop, t)).await?;
            }
        }
        tracing::info!(?control, "control applied");
        let at_ms = self.started.elapsed().as_millis() as u64;
        self.convergence
            .controls
            .push(AppliedControl::new(at_ms, control));
        Ok(())
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
        let run = self.run_id.as_str();
        let src = self.src.as_mut().ok_or(MigrationError::Cancelled)?;
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
        self.disk_progress = disks
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
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
        dest: &mut D,
        cancel: &CancellationToken,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let t = opts.qmp_timeout;
        let started = Instant::now();
        let mut ready: HashMap<String, u64> = HashMap::new();
        let mut watch = Watch::new(opts, self.deadline, self.started, "copying disks");
        let run = self.run_id.clone();
        // Events of another run's jobs (one killed earlier) are not ours to follow.
        let node_of = |job: &str| {
            disks
                .iter()
                .find(|d| d.job_id(&run) == job)
                .map(|d| d.node.clone())
        };
        self.report(Phase::Disks, None, None);
        while ready.len() < disks.len() {
            match watch
                .next(src_events, dest, cancel, &mut self.control)
                .await?
            {
                Seen::Control(request) => self.answer_control(src, request).await,
                Seen::Event(e) => {
                    let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                        continue;
                    };
                    let Some(node) = node_of(&job.device) else {
                        continue;
                    };
                    match e.event.as_str() {
                        "BLOCK_JOB_READY" => {
                            tracing::info!(%node, bytes = job.len, "mirror ready");
                            ready.insert(node.clone(), started.elapsed().as_millis() as u64);
                            if let Some(p) =
                                self.disk_progress.iter_mut().find(|p| p.device == node)
                            {
                                p.offset = job.offset;
                                p.len = job.len;
                                p.ready = true;
                            }
                        }
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => {
                            if watch.dest_gone() {
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
                // Only the RAM phase pauses at the deadline.
                Seen::Deadline => continue,
                Seen::Tick => {
                    let jobs = qmp(
                        Side::Source,
                        "query-block-jobs",
                        src.call_timeout(&QueryBlockJobs, t),
                    )
                    .await?;
                    for p in self.disk_progress.iter_mut() {
                        if let Some(j) = jobs
                            .iter()
                            .find(|j| node_of(&j.device).as_deref() == Some(p.device.as_str()))
                        {
                            p.offset = j.offset;
                            p.len = j.len;
                            p.ready |= j.ready;
                        }
                    }
                    self.report(Phase::Disks, None, None);
                    let total: u64 = self.disk_progress.iter().map(|p| p.offset).sum();
                    watch.progressed(total, || "copying disks".into())?;
                    watch.check_dest_gone(|| Some("while disks were being copied".into()))?;
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
                    copy: p.copy,
                    to_copy: p.to_copy,
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
        let run = self.run_id.clone();
        for disk in disks {
            let cancel = BlockJobCancel {
                device: disk.job_id(&run),
                force: false,
            };
            qmp(
                Side::Source,
                "block-job-cancel",
                src.call_timeout(&cancel, t),
            )
            .await?;
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
                event = src_events.next() => event,
            };
            let Some(e) = event else {
                return Err(source_gone(src, "switch-over"));
            };
            if e.event == "STOP" {
                self.stopped_at_us = e.timestamp.map(|t| t.seconds * 1_000_000 + t.microseconds);
            }
            let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                continue;
            };
            if !pending.contains(&job.device) {
                continue;
            }
            let node = disks
                .iter()
                .find(|d| d.job_id(&run) == job.device)
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

/// Why auto-converge is refused for a guest QEMU runs without KVM.
const AUTO_CONVERGE_ON_TCG: &str = "--auto-converge is refused for a guest QEMU runs without KVM \
(TCG): with QEMU 7.2's vCPU throttling, TCG's dirty tracking lost guest writes here (the \
destination got a stale page of the guest's stack in every run), so the destination's memory \
would not be the source's. Use --xbzrle, --downtime-steps or --timeout-action pause";

/// QEMU 7.2's default downtime limit (ms), when the caller sets none.
pub(crate) const DEFAULT_DOWNTIME_MS: u64 = 300;

/// How long [`sample_dirty_rate`] samples.
const DIRTY_RATE_SAMPLE: Duration = Duration::from_secs(1);

/// The guest's dirty rate (MiB/s) over [`DIRTY_RATE_SAMPLE`] (`calc-dirty-rate`); read-only.
pub(crate) async fn sample_dirty_rate(src: &SideCtl) -> Result<u64, MigrationError> {
    start_dirty_rate(src).await?;
    dirty_rate_result(src).await
}

/// Starts QEMU's dirty-rate measurement, which runs [`DIRTY_RATE_SAMPLE`] in the background.
pub(crate) async fn start_dirty_rate(src: &SideCtl) -> Result<(), MigrationError> {
    let calc = CalcDirtyRate {
        calc_time: DIRTY_RATE_SAMPLE.as_secs(),
        sample_pages: None,
    };
    src.call("calc-dirty-rate", &calc).await.map(drop)
}

/// Waits for the measurement [`start_dirty_rate`] started; MiB/s.
pub(crate) async fn dirty_rate_result(src: &SideCtl) -> Result<u64, MigrationError> {
    let deadline = Instant::now() + DIRTY_RATE_SAMPLE + src.timeout;
    loop {
        let info = src.call("query-dirty-rate", &QueryDirtyRate).await?;
        if info.status == "measured" {
            return Ok(info.dirty_rate.unwrap_or(0).max(0) as u64);
        }
        if Instant::now() > deadline {
            return Err(MigrationError::Failed {
                desc: format!("the dirty rate was not measured within {:?}", src.timeout),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
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

/// Refuses to copy disks while a mirror of this tool's is still on the source: the VM's lock
/// says no other run drives this VM, so it was left by a run that was killed before it could
/// clean up, and it still holds its disk (a new mirror of that disk would fail half way, after
/// the destination was prepared). Another run's job is never ours to cancel.
async fn check_no_orphan_mirrors(src: &SideCtl) -> Result<(), MigrationError> {
    let jobs = src.call("query-block-jobs", &QueryBlockJobs).await?;
    let orphans: Vec<String> = jobs
        .into_iter()
        .map(|j| j.device)
        .filter(|id| id.starts_with(super::OBJECT_PREFIX))
        .collect();
    if orphans.is_empty() {
        return Ok(());
    }
    Err(MigrationError::OrphanJobs {
        socket: src.socket.clone(),
        jobs: orphans,
    })
}

/// What the watch loop saw: a source event, or a tick to poll progress on.
enum Seen {
    Event(crate::qmp::Event),
    Tick,
    /// The deadline passed and the guest is to be paused (`--timeout-action pause`).
    Deadline,
    /// A control from another task, to apply and answer.
    Control(ControlRequest),
}

/// The one watch loop of a migration's long phases (disk copy, RAM): cancellation, the
/// whole-migration deadline, the source's events, a lost destination, and a tick every
/// [`PROGRESS_INTERVAL`] on which the caller polls progress and feeds the stall check.
///
/// A lost destination is not an error at once: the source usually reports the failure in its
/// own words (a TLS error, a mirror error) within [`DEST_GONE_GRACE`], which explains more;
/// after that it is [`MigrationError::DestinationDied`].
struct Watch {
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    tick: tokio::time::Interval,
    stall: StallWatch,
    dest_gone_at: Option<Instant>,
    gone_reason: Option<String>,
    step: &'static str,
    /// At the deadline, say so ([`Seen::Deadline`]) once instead of failing: the caller
    /// pauses the guest and the migration goes on.
    pause_at_deadline: bool,
}

impl Watch {
    fn new(
        opts: &MigrationOptions,
        timeout: Option<Duration>,
        started: Instant,
        step: &'static str,
    ) -> Watch {
        Watch {
            deadline: timeout.and_then(|d| started.checked_add(d)),
            timeout,
            pause_at_deadline: false,
            tick: tokio::time::interval(PROGRESS_INTERVAL),
            stall: StallWatch::new(opts.stall_timeout),
            dest_gone_at: None,
            gone_reason: None,
            step,
        }
    }

    /// The next thing to act on, or the error that ends the phase.
    async fn next<D: Destination>(
        &mut self,
        src_events: &mut Events,
        dest: &mut D,
        cancel: &CancellationToken,
        control: &mut Option<tokio::sync::mpsc::Receiver<ControlRequest>>,
    ) -> Result<Seen, MigrationError> {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                request = control::next_control(control) => return Ok(Seen::Control(request)),
                _ = sleep_until_opt(self.deadline) => {
                    if self.pause_at_deadline {
                        self.deadline = None;
                        return Ok(Seen::Deadline);
                    }
                    return Err(MigrationError::Timeout { after: self.timeout.unwrap_or_default() });
                }
                event = src_events.next() => {
                    return match event {
                        Some(e) => Ok(Seen::Event(e)),
                        None => Err(MigrationError::Qmp {
                            side: Side::Source,
                            step: self.step,
                            source: QmpError::Closed {
                                peer: String::new(),
                                reason: "the source QEMU exited".into(),
                            },
                        }),
                    };
                }
                _ = dest.gone(), if self.dest_gone_at.is_none() => {
                    self.gone_reason = dest.gone_reason();
                    tracing::warn!(reason = ?self.gone_reason, "the destination went away");
                    self.dest_gone_at = Some(Instant::now());
                }
                _ = self.tick.tick() => return Ok(Seen::Tick),
            }
        }
    }

    /// Records the latest byte count; an error once it has not grown for the stall timeout.
    fn progressed(
        &mut self,
        bytes: u64,
        status: impl FnOnce() -> String,
    ) -> Result<(), MigrationError> {
        self.stall.check(bytes, status)
    }

    /// An error once the destination has been gone for longer than the grace period.
    fn check_dest_gone(&self, desc: impl FnOnce() -> Option<String>) -> Result<(), MigrationError> {
        match self.dest_gone_at {
            Some(at) if at.elapsed() >= DEST_GONE_GRACE => Err(self.gone_error(desc())),
            _ => Ok(()),
        }
    }

    /// The error for a destination gone, with `desc` (what the source saw) and the reason the
    /// destination gave, where known.
    fn gone_error(&self, desc: Option<String>) -> MigrationError {
        let desc = match (desc, &self.gone_reason) {
            (Some(d), Some(r)) => Some(format!("{d}; {r}")),
            (d, r) => d.or_else(|| r.clone()),
        };
        MigrationError::DestinationDied { desc }
    }

    fn dest_gone(&self) -> bool {
        self.dest_gone_at.is_some()
    }
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use serde_json::{Value, json};

    use super::*;
    use crate::migration::Endpoint;
    use crate::qmp::fake::{self, Received};

    const T: Duration = Duration::from_secs(5);

    /// A destination that only rolls back, noting how many commands the source had received
    /// by then.
    struct FakeDestination {
        stopped: bool,
        source_log: Received,
        aborted_after: Arc<Mutex<Option<usize>>>,
    }

    impl Destination for FakeDestination {
        fn changed(&self) -> bool {
            true
        }
        fn holder(&self) -> String {
            "the fake destination".into()
        }
        async fn preflight(&mut self, _: &DestPlan) -> Result<(), MigrationError> {
            Ok(())
        }
        async fn prepare(&mut self, _: &DestPlan) -> Result<DestPrepared, MigrationError> {
            Err(MigrationError::Cancelled)
        }
        async fn gone(&mut self) {
            std::future::pending().await
        }
        async fn finish(&mut self, _: bool) -> Result<Finished, MigrationError> {
            Err(MigrationError::Cancelled)
        }
        async fn abort(&mut self) -> AbortOutcome {
            let seen = self.source_log.lock().map(|l| l.len()).unwrap_or(0);
            *self.aborted_after.lock().expect("lock") = Some(seen);
            AbortOutcome {
                stopped: self.stopped,
                problems: Vec::new(),
            }
        }
    }

    /// Rolls back a migration whose source reached `committed` against a destination that
    /// reports `stopped`; returns the error, the source's commands, and how many of them came
    /// before the destination's abort.
    async fn roll_back(
        committed: Option<&'static str>,
        stopped: bool,
    ) -> (MigrationError, Vec<String>, usize) {
        let (qmp, peer) = fake::connect(json!([]), T).await.expect("fake QEMU");
        let log = peer.answer_all(|name, _| {
            Ok(match name {
                "query-migrate" => json!({"status": "cancelled"}),
                "query-status" => json!({"running": false, "status": "postmigrate"}),
                _ => json!({}),
            })
        });
        let mut src =
            SideCtl::with_qmp(Side::Source, qmp, Path::new("src.sock"), Path::new("/"), T);
        src.undo = vec![Undo::ResumeSource, Undo::CancelMigration];
        let endpoint = || Endpoint {
            qmp: "x".into(),
            pki_dir: "/".into(),
        };
        let opts = MigrationOptions::new(endpoint(), endpoint(), "dst");
        let mut progress = |_: &Progress| {};
        let mut run = Run::new(&opts, Instant::now(), &mut progress, Transport::Tls);
        run.src = Some(src);
        run.committed = committed;
        let aborted_after = Arc::new(Mutex::new(None));
        let mut dest = FakeDestination {
            stopped,
            source_log: log.clone(),
            aborted_after: aborted_after.clone(),
        };

        let (_, error) = run
            .roll_back(
                &mut dest,
                MigrationError::Failed {
                    desc: "boom".into(),
                },
            )
            .await;

        let sent: Vec<String> = log
            .lock()
            .expect("lock")
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        let before_abort = aborted_after.lock().expect("lock").expect("aborted");
        (error, sent, before_abort)
    }

    /// Applies `controls` in turn to a source whose guest runs, before RAM moves (nothing
    /// on its undo stack); returns each answer, the commands the source got, the report's
    /// controls and whether the source would be resumed on a roll-back.
    async fn apply(
        controls: &[Control],
    ) -> (
        Vec<Result<(), String>>,
        Vec<(String, Value)>,
        Vec<AppliedControl>,
        bool,
    ) {
        let (qmp, peer) = fake::connect(json!([]), T).await.expect("fake QEMU");
        let log = peer.answer_all(|name, _| {
            Ok(match name {
                "query-status" => json!({"running": true, "status": "running"}),
                _ => json!({}),
            })
        });
        let src = SideCtl::with_qmp(Side::Source, qmp.clone(), Path::new("s"), Path::new("/"), T);
        let endpoint = || Endpoint {
            qmp: "x".into(),
            pki_dir: "/".into(),
        };
        let opts = MigrationOptions::new(endpoint(), endpoint(), "dst");
        let mut progress = |_: &Progress| {};
        let mut run = Run::new(&opts, Instant::now(), &mut progress, Transport::Tls);
        run.src = Some(src);
        let mut answers = Vec::new();
        for c in controls {
            answers.push(run.apply_control(&qmp, *c).await.map_err(|e| e.to_string()));
        }
        let sent = log.lock().expect("lock").clone();
        let resumes = run
            .src
            .as_ref()
            .is_some_and(|s| s.undo.iter().any(|u| matches!(u, Undo::ResumeSource)));
        (answers, sent, run.convergence.controls, resumes)
    }

    #[tokio::test]
    async fn a_bandwidth_control_sets_the_parameter_and_is_recorded() {
        let (answers, sent, controls, _) = apply(&[Control::SetMaxBandwidth(1 << 30)]).await;

        assert_eq!(answers, vec![Ok(())]);
        assert_eq!(sent[0].0, "migrate-set-parameters");
        assert_eq!(sent[0].1["max-bandwidth"], 1u64 << 30, "{sent:?}");
        assert_eq!(controls[0].what, "max-bandwidth");
    }

    #[tokio::test]
    async fn a_bandwidth_of_zero_is_refused_without_touching_qemu() {
        let (answers, sent, controls, _) = apply(&[Control::SetMaxBandwidth(0)]).await;

        assert!(
            answers[0]
                .as_ref()
                .is_err_and(|e| e.contains("bandwidth 0")),
            "{answers:?}"
        );
        assert!(sent.is_empty(), "{sent:?}");
        assert!(controls.is_empty());
    }

    #[tokio::test]
    async fn a_pause_during_the_disk_copy_stops_the_guest_and_registers_its_resume() {
        let (answers, sent, controls, resumes) = apply(&[Control::Pause]).await;

        assert_eq!(answers, vec![Ok(())]);
        let names: Vec<&str> = sent.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["query-status", "stop"]);
        assert_eq!(controls[0].what, "pause");
        assert!(
            resumes,
            "a roll-back must resume the guest paused by the control"
        );
    }

    #[tokio::test]
    async fn a_source_past_the_point_of_no_return_stays_paused_when_the_destination_may_run() {
        let (error, sent, _) = roll_back(Some("the source completed the migration"), false).await;

        assert_eq!(error.kind(), "split-brain-risk");
        assert!(
            error.to_string().contains("the fake destination"),
            "{error}"
        );
        assert!(!sent.contains(&"cont".to_string()), "{sent:?}");
    }

    #[tokio::test]
    async fn the_source_resumes_only_after_the_destination_confirmed_it_does_not_run() {
        let (error, sent, before_abort) =
            roll_back(Some("the source completed the migration"), true).await;

        assert_eq!(error.kind(), "migration-failed");
        let cancel = sent
            .iter()
            .position(|n| n == "migrate_cancel")
            .expect("cancelled");
        let cont = sent.iter().position(|n| n == "cont").expect("resumed");
        assert!(
            cancel < before_abort && before_abort <= cont,
            "{sent:?} abort after {before_abort}"
        );
    }

    #[tokio::test]
    async fn a_source_that_never_passed_the_switch_over_resumes_whatever_the_destination_says() {
        let (error, sent, _) = roll_back(None, false).await;

        assert_eq!(error.kind(), "migration-failed");
        assert!(sent.contains(&"cont".to_string()), "{sent:?}");
    }
}
