//! Recovery: puts a VM back after a run that ended without undoing its changes (killed with
//! SIGKILL, its host crashed), from the run's journal ([`super::journal`]). Runs at the start
//! of the next migration of that VM, in `qemu-tls-migrate recover`, and in `serve` at
//! start-up.
//!
//! With the VM's lock held (a run still holding it is alive: it is left alone):
//! 1. stop the source's outgoing migration if the run started one, and learn whether it
//!    completed;
//! 2. learn whether the destination runs the guest: a local destination is asked
//!    (`query-status`; a QEMU that is gone runs nothing); a remote one is known only from the
//!    journal's [`Stage`] (its service rolls its own side back when the run's channel drops);
//! 3. the destination runs it: the migration happened; the tool's objects and settings go from
//!    both sides, the source stays paused. It does not (or never got `cont`): the destination
//!    is rolled back as the run would have, then the source, resumed only if the run paused
//!    it. Unknown and `cont` may have reached it: the source's settings are put back but it
//!    stays paused (split-brain-risk), and the recovery says what to check;
//! 4. the journal is removed.
//!
//! Every value put back is the journal's (the one before the run), never what QEMU holds now.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use super::journal::{self, JournalDest, JournalError, JournalRecord, Stage};
use super::undo::{self, Undo};
use crate::qemu::{MigrationStatus, QueryMigrate, QueryStatus};
use crate::qmp::{Qmp, QmpError};
use crate::vm_lock::{VmKey, VmLock, VmLockError};

/// What a recovery found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryOutcome {
    /// No journal: nothing of the tool's is recorded on this VM.
    Clean,
    /// The interrupted run was rolled back: the source is as it was before it (running if it
    /// ran), the destination holds nothing of it.
    RolledBack,
    /// The destination runs the guest: the migration had completed; the tool's leftovers were
    /// removed and the source stays paused.
    Completed,
    /// The source stays paused: the destination may run the guest (see `check`).
    SplitBrainRisk,
    /// A run of the tool still holds the VM: nothing was touched.
    InProgress,
    /// The source's QEMU could not be reached: nothing was touched, the journal stays.
    Unreachable,
}

impl RecoveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RecoveryOutcome::Clean => "clean",
            RecoveryOutcome::RolledBack => "rolled-back",
            RecoveryOutcome::Completed => "completed",
            RecoveryOutcome::SplitBrainRisk => "split-brain-risk",
            RecoveryOutcome::InProgress => "in-progress",
            RecoveryOutcome::Unreachable => "unreachable",
        }
    }
}

/// A recovery's answer: the VM's state now.
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// The VM (its source QMP socket, or as the journal names it).
    pub vm: String,
    pub outcome: RecoveryOutcome,
    /// The interrupted run: its job id and process.
    pub job: Option<String>,
    pub pid: Option<u32>,
    pub journal: Option<PathBuf>,
    /// The source QEMU's run state now (`running`, `paused`, `postmigrate`...); `None`: not
    /// reachable or gone.
    pub source_status: Option<String>,
    /// The local destination QEMU's run state now; `None`: none, gone or not reachable.
    pub dest_status: Option<String>,
    /// What was undone.
    pub actions: Vec<String>,
    /// What could not be undone.
    pub problems: Vec<String>,
    /// What an operator must check by hand (split-brain-risk).
    pub check: Option<String>,
}

impl Recovery {
    fn new(vm: String, outcome: RecoveryOutcome) -> Recovery {
        Recovery {
            vm,
            outcome,
            job: None,
            pid: None,
            journal: None,
            source_status: None,
            dest_status: None,
            actions: Vec::new(),
            problems: Vec::new(),
            check: None,
        }
    }

    /// Whether the VM may be migrated now: nothing is left of an earlier run.
    pub fn settled(&self) -> bool {
        matches!(
            self.outcome,
            RecoveryOutcome::Clean | RecoveryOutcome::RolledBack
        ) && self.problems.is_empty()
    }

    /// In words, for a log line or a refusal.
    pub fn describe(&self) -> String {
        let who = match (&self.job, self.pid) {
            (Some(j), Some(p)) => format!(" (job {j}, pid {p})"),
            (None, Some(p)) => format!(" (pid {p})"),
            _ => String::new(),
        };
        let mut text = format!(
            "{}: an interrupted run{who}: {}",
            self.vm,
            self.outcome.as_str()
        );
        if !self.actions.is_empty() {
            text.push_str(&format!("; undone: {}", self.actions.join(", ")));
        }
        if !self.problems.is_empty() {
            text.push_str(&format!("; not undone: {}", self.problems.join("; ")));
        }
        if let Some(check) = &self.check {
            text.push_str(&format!("; {check}"));
        }
        text
    }
}

/// Recovers the VM of QMP socket `source_qmp` if a journal of it is left, else says its state.
pub async fn recover_vm(source_qmp: &Path, timeout: Duration) -> Result<Recovery, JournalError> {
    let dir = crate::jobs::run_dir();
    let key = VmKey::socket(source_qmp);
    // A domain's journal is keyed by its UUID: found by the socket it recorded.
    let path = journal::list(&dir)
        .into_iter()
        .find(|p| {
            journal::read(p)
                .ok()
                .flatten()
                .is_some_and(|r| VmKey::socket(&r.source_qmp) == key)
        })
        .unwrap_or_else(|| journal::journal_path(&dir, &key));
    let vm = source_qmp.display().to_string();
    // The keys the run held (a domain's UUID too), else the socket's.
    let keys = match journal::read(&path)? {
        Some(record) => record.keys(),
        None => vec![key],
    };
    let lock = match VmLock::acquire(&keys, None) {
        Ok(lock) => lock,
        Err(e) => return Ok(busy(vm, e)),
    };
    match journal::read(&path)? {
        Some(record) => Ok(recover_held(&record, &path, &lock, timeout).await),
        None => {
            let mut r = Recovery::new(vm, RecoveryOutcome::Clean);
            r.source_status = status_of(source_qmp, timeout).await.ok();
            Ok(r)
        }
    }
}

/// Recovers every VM with a journal in the run directory whose run is gone.
pub async fn recover_all(timeout: Duration) -> Vec<Result<Recovery, JournalError>> {
    let mut all = Vec::new();
    for path in journal::list(&crate::jobs::run_dir()) {
        let record = match journal::read(&path) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                all.push(Err(e));
                continue;
            }
        };
        let recovery = match VmLock::acquire(&record.keys(), None) {
            Ok(lock) => recover_held(&record, &path, &lock, timeout).await,
            Err(e) => {
                let mut r = busy(record.vm.clone(), e);
                r.journal = Some(path);
                r
            }
        };
        all.push(Ok(recovery));
    }
    all
}

/// The journals in the run directory whose run is gone (their VM needs a recovery).
pub fn pending() -> Vec<JournalRecord> {
    journal::list(&crate::jobs::run_dir())
        .iter()
        .filter_map(|p| journal::read(p).ok().flatten())
        .filter(|r| VmLock::acquire(&r.keys(), None).is_ok())
        .collect()
}

/// Before a run on the VM whose lock `lock` is held (its journal keyed `key`), reaching its
/// QEMU at `source_qmp` (a libvirt domain's passthrough socket is this run's own): recovers
/// what an earlier run left. `None`: there was nothing.
pub(crate) async fn recover_before_run(
    key: &VmKey,
    lock: &VmLock,
    source_qmp: &Path,
    timeout: Duration,
) -> Result<Option<Recovery>, JournalError> {
    let path = journal::journal_path(&journal::run_dir()?, key);
    match journal::read(&path)? {
        Some(mut record) => {
            record.source_qmp = source_qmp.to_path_buf();
            Ok(Some(recover_held(&record, &path, lock, timeout).await))
        }
        None => Ok(None),
    }
}

fn busy(vm: String, e: VmLockError) -> Recovery {
    let mut r = Recovery::new(vm, RecoveryOutcome::InProgress);
    if let VmLockError::Busy { job, pid, .. } = &e {
        r.job = job.clone();
        r.pid = *pid;
    } else {
        r.problems.push(e.to_string());
    }
    r
}

/// A QEMU that is gone (its socket missing or refusing): it holds nothing any more.
fn is_gone(e: &QmpError) -> bool {
    match e {
        QmpError::Connect { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
        ),
        other => other.is_closed(),
    }
}

async fn status_of(qmp: &Path, timeout: Duration) -> Result<String, QmpError> {
    let q = Qmp::connect(qmp, timeout).await?;
    let status = q.call_timeout(&QueryStatus, timeout).await?;
    q.close().await;
    Ok(status.status)
}

/// The recovery proper, `_lock` held (see the module's steps).
async fn recover_held(
    record: &JournalRecord,
    path: &Path,
    _lock: &VmLock,
    timeout: Duration,
) -> Recovery {
    let mut r = Recovery::new(record.vm.clone(), RecoveryOutcome::RolledBack);
    r.job = record.job.clone();
    r.pid = Some(record.pid);
    r.journal = Some(path.to_path_buf());
    tracing::warn!(vm = %record.vm, job = ?record.job, pid = record.pid, "recovering from an interrupted run");
    let src = match Qmp::connect(&record.source_qmp, timeout).await {
        Ok(q) => Some(q),
        // A domain's socket may have been the dead run's own passthrough: not proof.
        Err(e) if is_gone(&e) && record.source_domain_uuid.is_none() => {
            r.problems.push(format!("source: its QEMU is gone ({e})"));
            None
        }
        Err(e) => {
            r.outcome = RecoveryOutcome::Unreachable;
            r.problems.push(format!("source: {e}"));
            return r;
        }
    };
    if record.stage == Stage::Postcopy {
        return recover_postcopy(r, src, path, timeout).await;
    }
    // 1. Nothing more reaches the destination.
    let mut source_stack = record.source.clone();
    let mut completed = false;
    if let Some(q) = &src
        && source_stack
            .iter()
            .any(|u| matches!(u, Undo::CancelMigration))
    {
        source_stack.retain(|u| !matches!(u, Undo::CancelMigration));
        r.problems
            .extend(undo::unwind(vec![Undo::CancelMigration], false, q, timeout).await);
        r.actions.push("source: outgoing migration stopped".into());
        completed = matches!(
            q.call_timeout(&QueryMigrate, timeout).await,
            Ok(info) if info.status == Some(MigrationStatus::Completed)
        );
    }
    // 2. Does the destination run the guest?
    let mut dest_qmp = None;
    let dest_runs = match &record.dest {
        JournalDest::Local { qmp } => match Qmp::connect(qmp, timeout).await {
            Ok(q) => {
                let runs = match q.call_timeout(&QueryStatus, timeout).await {
                    Ok(s) => {
                        r.dest_status = Some(s.status.clone());
                        Some(s.running)
                    }
                    Err(e) if is_gone(&e) => Some(false),
                    Err(_) => None,
                };
                dest_qmp = Some(q);
                runs
            }
            Err(e) if is_gone(&e) => Some(false),
            Err(e) => {
                r.problems.push(format!("destination: {e}"));
                None
            }
        },
        JournalDest::Remote { .. } => match record.stage {
            Stage::Completed => Some(true),
            Stage::Finishing | Stage::Postcopy => None,
            Stage::Running => Some(false),
        },
    };
    // 3. Undo by the one-running-copy rule.
    let dest_runs = match (dest_runs, record.stage) {
        (Some(runs), _) => Some(runs),
        // Never told to run it: it holds the guest at most paused.
        (None, Stage::Running) if !completed => Some(false),
        (None, _) => None,
    };
    let succeeded = dest_runs == Some(true);
    if let Some(q) = &dest_qmp
        && dest_runs.is_some()
    {
        let before = record.destination.len();
        r.problems
            .extend(undo::unwind(record.destination.clone(), succeeded, q, timeout).await);
        if before > 0 {
            r.actions.push(describe_unwind(
                "destination",
                &record.destination,
                succeeded,
            ));
        }
    }
    match dest_runs {
        Some(true) => r.outcome = RecoveryOutcome::Completed,
        Some(false) => r.outcome = RecoveryOutcome::RolledBack,
        None => {
            source_stack.retain(|u| !matches!(u, Undo::ResumeSource));
            r.outcome = RecoveryOutcome::SplitBrainRisk;
            r.check = Some(format!(
                "the source stays paused: the destination ({}) may run the guest; check there \
                 (query-status) and resume the source (QMP cont) only if it does not run it",
                match &record.dest {
                    JournalDest::Local { qmp } => qmp.display().to_string(),
                    JournalDest::Remote { address } => address.clone(),
                }
            ));
        }
    }
    if let Some(q) = &src {
        r.problems
            .extend(undo::unwind(source_stack.clone(), succeeded, q, timeout).await);
        if !source_stack.is_empty() {
            r.actions
                .push(describe_unwind("source", &source_stack, succeeded));
        }
        r.source_status = q
            .call_timeout(&QueryStatus, timeout)
            .await
            .ok()
            .map(|s| s.status);
        q.close().await;
    }
    if let Some(q) = &dest_qmp {
        if dest_runs != Some(false) || !has_teardown(&record.destination) {
            r.dest_status = q
                .call_timeout(&QueryStatus, timeout)
                .await
                .ok()
                .map(|s| s.status);
        } else {
            r.dest_status = None;
        }
        q.close().await;
    }
    journal_done(path);
    tracing::warn!("{}", r.describe());
    r
}

/// A run interrupted after post-copy started touches neither side: the destination holds the
/// guest's newest state and the source the pages not yet sent. Once the source says
/// `completed` (the post-copy was finished, by the run before it died or by hand), the journal
/// goes; until then it stays, so every later run of this VM is refused with what to do.
async fn recover_postcopy(
    mut r: Recovery,
    src: Option<Qmp>,
    path: &Path,
    timeout: Duration,
) -> Recovery {
    let status = match &src {
        Some(q) => q
            .call_timeout(&QueryMigrate, timeout)
            .await
            .ok()
            .and_then(|i| i.status),
        None => None,
    };
    if let Some(q) = src {
        q.close().await;
    }
    if status == Some(MigrationStatus::Completed) {
        r.outcome = RecoveryOutcome::Completed;
        r.actions
            .push("post-copy had completed: nothing to put back".into());
        journal_done(path);
        return r;
    }
    r.outcome = RecoveryOutcome::SplitBrainRisk;
    r.check = Some(format!(
        "post-copy had started and the source's migration is {}: the destination holds the \
         guest's newest state and the source the pages not yet sent, so neither was touched; \
         finish it with migrate-recover on the destination and migrate resume=true on the \
         source, and never resume the source",
        status.map_or("unknown", MigrationStatus::as_str)
    ));
    r
}

fn has_teardown(stack: &[Undo]) -> bool {
    stack.iter().any(|u| matches!(u, Undo::TearDownDestination))
}

/// What unwinding `stack` did, in words.
fn describe_unwind(side: &str, stack: &[Undo], succeeded: bool) -> String {
    let names: Vec<&str> = stack
        .iter()
        .rev()
        .filter(|u| !succeeded || u.needed_after_success())
        .map(Undo::name)
        .collect();
    format!("{side}: {}", names.join(", "))
}

fn journal_done(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "cannot remove the journal: {e}");
    }
}
