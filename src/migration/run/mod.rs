//! One migration, driven from the source: the source directly over QMP, the destination
//! through a [`Destination`] (local [`super::DestinationSide`] or remote
//! [`super::RemoteDestination`]). Each phase has a file, and hands the next what exists from
//! then on:
//!
//! 1. [`setup`]: look, don't touch (the source, its disks, refusals, forecast, convergence
//!    sizing, the destination's preflight, the credentials probe) -> a [`setup::Setup`];
//! 2. [`prepare`]: the destination made ready, the source's credentials, capabilities and
//!    parameters -> a [`prepare::Prepared`]; from here every change has its undo;
//! 3. [`copy`]: the disks mirrored until ready, and their end at switch-over;
//! 4. [`ram`]: `migrate` and one watch loop to a final state, applying controls
//!    ([`controls`]) and the convergence steps;
//! 5. the destination's `finish`; then, on success, the source's undo stack unwound, or on
//!    any failure [`rollback`] in the order that keeps one running copy.
//!
//! The point of no return is [`Commit`]: once the source passed it, the source is resumed
//! only when the destination is known not to run the guest.

mod controls;
mod copy;
mod postcopy;
mod prepare;
mod ram;
mod rollback;
mod setup;
mod timeline;
mod watch;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::control::ControlReceiver;
use super::convergence::ConvergenceReport;
use super::destination::{Destination, DestinationSide, Finished};
use super::disks::{self, DiskProgress, DiskReport};
use super::forecast::Forecast;
use super::journal::{self, Journal, JournalRecord, Stage};
use super::side::SideCtl;
use super::{
    FinalStatus, GuestPause, MigrationError, Phase, Progress, RamReport, Report, Side, ToolUsage,
    Transport, TransportDecision, ValidOptions, decide_transport,
};
use crate::qemu::{MigrationStatus, RamStats};
use crate::vm_lock::VmLock;
use std::sync::Arc;

pub(crate) use rollback::{Commit, CommitPoint};
use timeline::{Mark, Timeline};

/// What a running migration talks to besides the two QEMUs: where progress goes, what cancels
/// it, and (optionally) where controls from another task arrive ([`super::control_channel`]).
pub struct RunContext<'a> {
    /// Called at each phase change and about every [`super::PROGRESS_INTERVAL`] while disks
    /// or RAM move.
    pub progress: &'a mut (dyn FnMut(&Progress) + Send),
    /// Aborts the migration and rolls back (wire it to SIGINT/SIGTERM).
    pub cancel: &'a CancellationToken,
    /// Controls applied while disks or RAM move; `None`: none will come.
    pub control: Option<ControlReceiver>,
    /// Warnings for the report from before the run (a recovery of an earlier one).
    pub notes: Vec<String>,
}

impl std::fmt::Debug for RunContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunContext")
            .field("cancelled", &self.cancel.is_cancelled())
            .field("controls", &self.control.is_some())
            .finish_non_exhaustive()
    }
}

impl<'a> RunContext<'a> {
    /// A context with progress and cancellation, and no controls.
    pub fn new(
        progress: &'a mut (dyn FnMut(&Progress) + Send),
        cancel: &'a CancellationToken,
    ) -> RunContext<'a> {
        RunContext {
            progress,
            cancel,
            control: None,
            notes: Vec::new(),
        }
    }

    /// The same, taking controls from `control`.
    pub fn with_control(mut self, control: ControlReceiver) -> RunContext<'a> {
        self.control = Some(control);
        self
    }
}

/// Runs one migration between two QEMUs reachable from this process and returns its report.
/// Never panics on outside input; on any failure everything the migration changed is rolled
/// back before this returns (see [`Report`]).
pub async fn migrate(opts: &ValidOptions, cx: RunContext<'_>) -> Report {
    let started = Instant::now();
    let mut cx = cx;
    (cx.progress)(&Progress::phase(Phase::Preflight, 0));
    // Before anything else, and held until the roll-back is over: no other run drives this VM.
    let lock = match opts.lock_source() {
        Ok(lock) => lock,
        Err(error) => return Report::refused(error, started.elapsed()),
    };
    // What an interrupted run left goes first (its QMP connections too: one client each).
    match recover_first(opts, &lock).await {
        Ok(notes) => cx.notes.extend(notes),
        Err(error) => return Report::refused(error, started.elapsed()),
    }
    // CloudStack's renewed certificates are followed (or the run refused) before the PKI
    // directories are looked at for the transport.
    let sides = [
        (
            Side::Source,
            opts.source_cloudstack_dir.as_deref(),
            opts.source.pki_dir.as_path(),
        ),
        (
            Side::Destination,
            opts.dest_cloudstack_dir.as_deref(),
            opts.dest.pki_dir.as_path(),
        ),
    ];
    match super::cloudstack::prepare(opts.transport, &sides) {
        Ok(notes) => cx.notes.extend(notes),
        Err(error) => return Report::refused(error, started.elapsed()),
    }
    // The transport comes from the PKI directories alone: nothing is connected yet.
    let decision = decide_transport(opts.transport, &opts.source.pki_dir, &opts.dest.pki_dir);
    let attach = async {
        let decision = decision?;
        let side =
            DestinationSide::attach(&opts.dest.qmp, &opts.dest.pki_dir, opts.qmp_timeout).await?;
        Ok((decision, side))
    };
    match attach.await {
        Ok((decision, side)) => migrate_to(opts, decision, side, &lock, started, cx).await,
        Err(error) => Report::refused(error, started.elapsed()),
    }
}

/// Runs one migration from the source in `opts` to `dest`, with the transport already decided.
/// `_lock` is the source VM's lock, which the caller holds until this returns: the proof that
/// no other run drives the same VM (see [`crate::vm_lock`]).
pub async fn migrate_to<D: Destination>(
    opts: &ValidOptions,
    decision: TransportDecision,
    mut dest: D,
    _lock: &VmLock,
    started: Instant,
    cx: RunContext<'_>,
) -> Report {
    let mut run = Run::new(opts, started, cx, decision.transport);
    for note in std::mem::take(&mut run.cx.notes) {
        run.warn(note);
    }
    if let Some(w) = &decision.warning {
        run.warn(w.clone());
    }
    let connected = match start_journal(opts, &dest) {
        Ok(journal) => SideCtl::connect(
            Side::Source,
            &opts.source.qmp,
            &opts.source.pki_dir,
            opts.qmp_timeout,
        )
        .await
        .map(|src| (src, journal)),
        Err(error) => Err(error),
    };
    let ending = match connected {
        Ok((mut src, journal)) => {
            src.undo.journal_to(journal.clone(), Side::Source);
            dest.journal_to(&journal);
            run.journal = Some(journal.clone());
            let result = run.execute(&mut src, &mut dest).await;
            let ending = run.conclude(&mut src, &mut dest, result).await;
            let split = matches!(
                ending.error,
                Some(
                    MigrationError::SplitBrainRisk { .. }
                        | MigrationError::PostcopyNotRecovered { .. }
                )
            );
            if ending.cleanup_errors.is_empty() && !split {
                journal.remove();
            }
            ending
        }
        // Nothing was done on the source; what the destination's preflight did goes.
        Err(error) => {
            let refused = !dest.changed();
            let outcome = dest.abort().await;
            Ending {
                cleanup_errors: outcome.problems,
                error: Some(error),
                refused,
                resumed_at_us: None,
            }
        }
    };
    run.into_report(ending, dest.clock())
}

/// Recovers what an interrupted earlier run of this VM left (its journal), with the VM's lock
/// held; returns the report's warning about it. A VM still holding an earlier run's changes is
/// refused.
pub(crate) async fn recover_first(
    opts: &ValidOptions,
    lock: &VmLock,
) -> Result<Vec<String>, MigrationError> {
    let key = journal::journal_key(&opts.source.qmp, opts.source_domain_uuid.as_deref());
    let recovered =
        super::recover::recover_before_run(&key, lock, &opts.source.qmp, opts.qmp_timeout).await?;
    match recovered {
        None => Ok(Vec::new()),
        Some(r) if r.settled() => Ok(vec![format!("recovered first: {}", r.describe())]),
        Some(r) => Err(MigrationError::Interrupted {
            detail: r.describe(),
        }),
    }
}

/// Writes the run's journal before anything changes.
fn start_journal<D: Destination>(
    opts: &ValidOptions,
    dest: &D,
) -> Result<Arc<Journal>, MigrationError> {
    let key = journal::journal_key(&opts.source.qmp, opts.source_domain_uuid.as_deref());
    let path = journal::journal_path(&journal::run_dir()?, &key);
    let record = JournalRecord {
        vm: opts.source.qmp.display().to_string(),
        job: opts.job_id.clone(),
        pid: std::process::id(),
        started_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        source_qmp: opts.source.qmp.clone(),
        source_domain_uuid: opts.source_domain_uuid.clone(),
        dest: dest.journal_dest(),
        stage: Stage::Running,
        source: Vec::new(),
        destination: Vec::new(),
    };
    Ok(Arc::new(Journal::create(path, record)?))
}

/// How a run ended, for its report.
struct Ending {
    cleanup_errors: Vec<String>,
    error: Option<MigrationError>,
    /// Nothing was changed on either side.
    refused: bool,
    /// When the destination's guest resumed (its clock).
    resumed_at_us: Option<i64>,
}

/// One migration under way: its options and context, where it stands ([`Commit`]), and what
/// its report will say.
struct Run<'o, 'c> {
    opts: &'o ValidOptions,
    started: Instant,
    cx: RunContext<'c>,
    transport: Transport,
    /// In the names of the nodes and jobs this run creates ([`disks::run_id`]).
    run_id: String,
    commit: Commit,
    timeline: Timeline,
    said: Said,
    /// Where each change is recorded before it is made.
    journal: Option<Arc<Journal>>,
}

/// What the report will say, gathered as the phases go.
#[derive(Debug, Default)]
struct Said {
    warnings: Vec<String>,
    ram: RamReport,
    ports: Vec<u16>,
    disk_progress: Vec<DiskProgress>,
    disk_reports: Vec<DiskReport>,
    /// The multifd channels used (`None`: one stream).
    multifd: Option<u8>,
    /// The source's last `STOP` event, microseconds since the epoch (this host's clock).
    stopped_at_us: Option<i64>,
    convergence: ConvergenceReport,
    forecast: Option<Forecast>,
    /// Both QEMUs' versions, once the destination's preflight told its own.
    qemu: Option<super::QemuVersions>,
    /// QEMU's dirty syncs so far (2: the first pass is over).
    dirty_syncs: u64,
}

impl<'o, 'c> Run<'o, 'c> {
    fn new(
        opts: &'o ValidOptions,
        started: Instant,
        cx: RunContext<'c>,
        transport: Transport,
    ) -> Run<'o, 'c> {
        Run {
            opts,
            started,
            cx,
            transport,
            run_id: disks::run_id(),
            commit: Commit::NotYet,
            timeline: Timeline::default(),
            said: Said::default(),
            journal: None,
        }
    }
}

impl Run<'_, '_> {
    /// The phases in order; returns the destination's clean-up problems on success.
    async fn execute<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
    ) -> Result<Finished, MigrationError> {
        let setup = self.set_up(src, dest).await?;
        if self.cx.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        self.send_progress(Phase::Prepare, None, None);
        let prepared = self.prepare(src, dest, &setup).await?;
        // Subscribed before the first job starts: no event of this run is missed.
        let mut events = src.qmp.subscribe();
        if let Some(nbd_port) = prepared.ports.nbd_port {
            self.copy_disks(src, dest, &setup, &prepared, nbd_port, &mut events)
                .await?;
        }
        let info = self
            .move_ram(src, dest, &setup, &prepared, &mut events)
            .await?;
        // Finish on the destination: it runs exactly when the source ran before.
        self.send_progress(Phase::Finish, info.status, info.ram);
        self.timeline.mark(Mark::Finish);
        // From here the destination may run the guest: a recovery must not resume the source.
        self.journal_stage(Stage::Finishing);
        let finished = dest
            .finish(setup.was_running && !self.opts.dest_paused)
            .await;
        self.timeline.mark(Mark::Finished);
        finished
    }

    /// After the phases: unwinds the source's changes on success, or rolls everything back.
    async fn conclude<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        result: Result<Finished, MigrationError>,
    ) -> Ending {
        self.timeline.mark(Mark::Cleanup);
        self.send_progress(Phase::Cleanup, None, None);
        match result {
            Ok(finished) => {
                self.journal_stage(Stage::Completed);
                let mut cleanup_errors = src.unwind(true).await;
                cleanup_errors.extend(finished.problems);
                Ending {
                    cleanup_errors,
                    error: None,
                    refused: false,
                    resumed_at_us: finished.resumed_at_us,
                }
            }
            Err(error) => {
                // Refused means nothing was changed on either side, whatever the error.
                let refused = !dest.changed() && src.undo.is_empty();
                let (cleanup_errors, error) = self.roll_back(src, dest, error).await;
                Ending {
                    cleanup_errors,
                    error: Some(error),
                    refused,
                    resumed_at_us: None,
                }
            }
        }
    }

    fn into_report(self, ending: Ending, clock: &'static str) -> Report {
        let status = match &ending.error {
            None => FinalStatus::Completed,
            Some(MigrationError::Cancelled) => FinalStatus::Cancelled,
            Some(_) => FinalStatus::Failed,
        };
        tracing::info!(?status, "migration finished");
        let said = self.said;
        let guest_pause = match (said.stopped_at_us, ending.resumed_at_us) {
            (Some(stop), Some(resume)) if resume >= stop => Some(GuestPause {
                ms: ((resume - stop) / 1000) as u64,
                clock,
            }),
            _ => None,
        };
        Report {
            status,
            transport: Some(self.transport),
            ram: said.ram,
            disks: said.disk_reports,
            ports: said.ports,
            wall: self.started.elapsed(),
            warnings: said.warnings,
            cleanup_errors: ending.cleanup_errors,
            error: ending.error,
            refused: ending.refused,
            timing: self.timeline.timing(self.started, Instant::now()),
            guest_pause,
            tool: ToolUsage::now(),
            multifd: said.multifd,
            source_qmp_access: None,
            source_end: None,
            convergence: said.convergence,
            forecast: said.forecast,
            qemu: said.qemu,
        }
    }

    /// Tells the caller where the migration is ([`RunContext::progress`]).
    fn send_progress(
        &mut self,
        phase: Phase,
        status: Option<MigrationStatus>,
        ram: Option<RamStats>,
    ) {
        let p = Progress {
            phase,
            status,
            elapsed_ms: self.elapsed_ms(),
            ram,
            disks: self.said.disk_progress.clone(),
        };
        (self.cx.progress)(&p);
    }

    fn journal_stage(&self, stage: Stage) {
        if let Some(j) = &self.journal {
            j.set_stage(stage);
        }
    }

    /// A warning for the log and the report.
    fn warn(&mut self, w: String) {
        tracing::warn!("{w}");
        self.said.warnings.push(w);
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Notes the source's `STOP` event's time: the start of the guest's pause.
    fn note_stop(&mut self, event: &crate::qmp::Event) {
        if event.event == "STOP" {
            self.said.stopped_at_us = event.timestamp_us();
        }
    }
}

#[cfg(test)]
mod tests;
