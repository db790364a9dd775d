//! The roll-back after a failure, in the order that keeps one running copy, and the point of
//! no return it turns on.

use super::super::MigrationError;
use super::super::destination::Destination;
use super::super::side::SideCtl;
use super::super::undo::Undo;
use super::Run;
use crate::qemu::{MigrationStatus, QueryMigrate};

/// Whether the source passed the point of no return: from then on the destination may hold
/// the whole VM, and the source is resumed only if the destination is known not to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    NotYet,
    Passed(CommitPoint),
}

/// What the source passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitPoint {
    /// It sent its device state.
    DeviceState,
    /// It passed `pre-switchover` (`migrate-continue` was sent).
    SwitchOver,
    /// It completed the migration.
    Completed,
    /// Post-copy started (`migrate-start-postcopy` was sent): the guest's memory is split
    /// between the two, so neither side is ever rolled back.
    Postcopy,
    /// `migrate` was sent and its state could not be learnt.
    Unknown,
}

impl CommitPoint {
    /// In words, for the report.
    pub fn describe(self) -> &'static str {
        match self {
            CommitPoint::DeviceState => "the source sent its device state",
            CommitPoint::SwitchOver => "the source passed the switch-over",
            CommitPoint::Completed => "the source completed the migration",
            CommitPoint::Postcopy => {
                "post-copy started: the destination runs the guest while part of its memory is \
                 still on the source, so neither side is resumed, stopped or rolled back"
            }
            CommitPoint::Unknown => "the source's migration state is unknown",
        }
    }
}

impl Commit {
    /// The source passed `point` (the first point passed is kept).
    pub(crate) fn pass(&mut self, point: CommitPoint) {
        if *self == Commit::NotYet {
            *self = Commit::Passed(point);
        }
    }
}

impl Run<'_, '_> {
    /// Rolls back after a failure, in the order that keeps one running copy:
    /// 1. stop the outgoing migration, so nothing more reaches the destination, and learn
    ///    whether the source completed meanwhile;
    /// 2. roll the destination back, learning whether it may have run the guest;
    /// 3. unwind the source; it is resumed only if it never passed the point of no return or
    ///    the destination is known not to run. Otherwise it stays paused and the error says
    ///    where the VM may run.
    pub(super) async fn roll_back<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        error: MigrationError,
    ) -> (Vec<String>, MigrationError) {
        if self.commit == Commit::Passed(CommitPoint::Postcopy) {
            return self.leave_postcopy(src, dest, error).await;
        }
        let mut problems = Vec::new();
        if src.undo.iter().any(|u| matches!(u, Undo::CancelMigration)) {
            src.undo.retain(|u| !matches!(u, Undo::CancelMigration));
            problems.extend(src.run_undo(Undo::CancelMigration).await);
        }
        if self.commit == Commit::NotYet && src.undo.iter().any(|u| matches!(u, Undo::ResumeSource))
        {
            // `migrate` was sent: it may have completed before the cancel took hold.
            match src.qmp.call_timeout(&QueryMigrate, src.timeout).await {
                Ok(info) if info.status == Some(MigrationStatus::Completed) => {
                    self.commit.pass(CommitPoint::Completed);
                }
                Ok(_) => {}
                Err(e) if e.is_closed() => {}
                Err(_) => self.commit.pass(CommitPoint::Unknown),
            }
        }
        let outcome = dest.abort().await;
        problems.extend(outcome.problems);
        let keep_paused = match self.commit {
            Commit::Passed(point) if !outcome.stopped => Some(point),
            _ => None,
        };
        if keep_paused.is_some() {
            src.undo.retain(|u| !matches!(u, Undo::ResumeSource));
        }
        problems.extend(src.unwind(false).await);
        let error = match keep_paused {
            Some(point) => {
                let reason = point.describe();
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

    /// After post-copy started, a failure leaves both QEMUs exactly as they are: the source
    /// holds the pages the destination lacks, the destination the guest's newest state, and a
    /// later `migrate-recover` / `migrate resume=true` (which needs the credentials and
    /// settings the tool made) can still finish it. Nothing is cancelled, stopped or deleted.
    async fn leave_postcopy<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        error: MigrationError,
    ) -> (Vec<String>, MigrationError) {
        let mut problems = vec![format!(
            "source: left as it is after post-copy started ({}): nothing was cancelled, \
             resumed or removed there",
            src.socket.display()
        )];
        problems.extend(src.undo.take_all().iter().filter_map(Undo::left_behind));
        // Held since the switch: its abort takes nothing down and undoes nothing.
        problems.extend(dest.abort().await.problems);
        tracing::error!(holder = %dest.holder(), "post-copy failed: both sides left as they are");
        let error = match error {
            e @ MigrationError::PostcopyNotRecovered { .. } => e,
            other => MigrationError::SplitBrainRisk {
                reason: CommitPoint::Postcopy.describe().to_string(),
                holder: dest.holder(),
                cause: Box::new(other),
            },
        };
        (problems, error)
    }
}
