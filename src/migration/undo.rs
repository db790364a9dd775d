//! The undo stack: every change the migration makes to a VM pushes the action that reverts it.
//!
//! After a migration the stack is unwound in reverse order. Actions that only make sense after a
//! failure (cancel the outgoing migration, resume the source, tear down the destination) are
//! skipped after a success; the rest (parameters and capabilities put back, objects deleted) run
//! either way.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Side;
use super::journal::Journal;
use crate::qemu::{
    BlockJobCancel, BlockdevDel, CapabilityState, CloseFd, Cont, MigrateCancel,
    MigrateSetCapabilities, MigrateSetParameters, MigrationStatus, NbdServerStop, ObjectDel,
    QueryBlockJobs, QueryMigrate, QueryStatus, Quit, Yank, YankInstance,
};
use crate::qmp::{Qmp, QmpError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "undo")]
pub enum Undo {
    DeleteObject {
        side: Side,
        id: String,
    },
    RestoreCapabilities {
        side: Side,
        caps: Vec<CapabilityState>,
    },
    RestoreParameters {
        side: Side,
        params: MigrateSetParameters,
    },
    /// `migrate_cancel` on the source and wait until QEMU has stopped the migration.
    CancelMigration,
    /// Resume the source if the migration left it paused (it was running before).
    ResumeSource,
    /// `quit` the destination QEMU: after `migrate-incoming` it cannot take another migration.
    TearDownDestination,
    /// Stop the destination's NBD server (closing its exports).
    StopNbdServer,
    /// Delete a block node the tool added.
    DeleteBlockNode {
        side: Side,
        node: String,
    },
    /// Cancel a mirror job (forced, no completion) and wait until it is gone; its NBD
    /// target's connection is yanked first, so that requests stuck on a dead link cannot hold
    /// the cancellation.
    CancelJob {
        job: String,
        target: String,
    },
    /// `closefd` on the source: a descriptor passed with `getfd` that no command took (the
    /// migration's socket before `migrate fd:` took it over).
    CloseFd {
        fdname: String,
    },
}

/// One side's undo stack, mirrored into the run's journal (when it has one) at every change:
/// an entry is recorded before the change it undoes is made.
#[derive(Debug, Default)]
pub(crate) struct UndoStack {
    items: Vec<Undo>,
    /// Credentials made by the preflight and not yet adopted: not a change of the VM's (the
    /// run deletes them either way), but a kill must not leave them.
    probed: Option<Undo>,
    journal: Option<(Arc<Journal>, Side)>,
}

impl From<Vec<Undo>> for UndoStack {
    fn from(items: Vec<Undo>) -> UndoStack {
        UndoStack {
            items,
            ..UndoStack::default()
        }
    }
}

impl UndoStack {
    /// From now on, every change is written to `journal` as `side`'s stack.
    pub fn journal_to(&mut self, journal: Arc<Journal>, side: Side) {
        self.journal = Some((journal, side));
        self.record();
    }

    fn record(&self) {
        if let Some((journal, side)) = &self.journal {
            let all = self.items.iter().chain(&self.probed).cloned().collect();
            journal.set_stack(*side, all);
        }
    }

    pub fn push(&mut self, undo: Undo) {
        self.items.push(undo);
        self.record();
    }

    pub fn retain(&mut self, keep: impl FnMut(&Undo) -> bool) {
        self.items.retain(keep);
        self.record();
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Undo> {
        self.items.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn set_probed(&mut self, probed: Option<Undo>) {
        self.probed = probed;
        self.record();
    }

    pub fn take_probed(&mut self) -> Option<Undo> {
        self.probed.take()
    }

    /// The stack for unwinding (probed credentials last, so deleted first). The journal keeps
    /// its entries until the run removes it: an unwind cut short is finished by a recovery.
    pub fn take_all(&mut self) -> Vec<Undo> {
        let mut stack = std::mem::take(&mut self.items);
        stack.extend(self.probed.take());
        stack
    }
}

impl Undo {
    /// The action in words, for a recovery's account.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Undo::DeleteObject { .. } => "object deleted",
            Undo::RestoreCapabilities { .. } => "capabilities put back",
            Undo::RestoreParameters { .. } => "parameters put back",
            Undo::CancelMigration => "migration cancelled",
            Undo::ResumeSource => "guest resumed if paused",
            Undo::TearDownDestination => "QEMU quit",
            Undo::StopNbdServer => "NBD server stopped",
            Undo::DeleteBlockNode { .. } => "block node deleted",
            Undo::CancelJob { .. } => "block job cancelled",
            Undo::CloseFd { .. } => "descriptor closed",
        }
    }

    pub(crate) fn needed_after_success(&self) -> bool {
        !matches!(
            self,
            Undo::CancelMigration
                | Undo::ResumeSource
                | Undo::TearDownDestination
                | Undo::CancelJob { .. }
        )
    }

    /// What stays on a QEMU that is left as it is (one that may run the guest), for the
    /// report; `None` for actions that change nothing there.
    pub(crate) fn left_behind(&self) -> Option<String> {
        let side = self.side();
        match self {
            Undo::DeleteObject { id, .. } => Some(format!("{side}: object {id} left in place")),
            Undo::RestoreCapabilities { .. } => Some(format!(
                "{side}: migration capabilities left as the tool set them"
            )),
            Undo::RestoreParameters { .. } => Some(format!(
                "{side}: migration parameters left as the tool set them"
            )),
            Undo::StopNbdServer => Some(format!("{side}: NBD server left running")),
            Undo::DeleteBlockNode { node, .. } => {
                Some(format!("{side}: block node {node} left in place"))
            }
            Undo::CancelJob { job, .. } => Some(format!("{side}: block job {job} left running")),
            Undo::CloseFd { fdname } => Some(format!("{side}: descriptor {fdname} left open")),
            Undo::CancelMigration | Undo::ResumeSource | Undo::TearDownDestination => None,
        }
    }

    /// Undos registered before the command they undo, so the thing may not exist.
    fn may_not_exist(&self) -> bool {
        matches!(
            self,
            Undo::DeleteObject { .. }
                | Undo::DeleteBlockNode { .. }
                | Undo::CancelJob { .. }
                | Undo::CloseFd { .. }
        )
    }

    fn side(&self) -> Side {
        match self {
            Undo::DeleteObject { side, .. }
            | Undo::RestoreCapabilities { side, .. }
            | Undo::RestoreParameters { side, .. }
            | Undo::DeleteBlockNode { side, .. } => *side,
            Undo::CancelMigration
            | Undo::ResumeSource
            | Undo::CancelJob { .. }
            | Undo::CloseFd { .. } => Side::Source,
            Undo::TearDownDestination | Undo::StopNbdServer => Side::Destination,
        }
    }
}

/// Unwinds one side's `stack`, returning a description of every action that failed. Nothing
/// is tried once the QMP connection is gone: that QEMU has exited and took its state with it.
pub(crate) async fn unwind(
    stack: Vec<Undo>,
    succeeded: bool,
    qmp: &Qmp,
    timeout: Duration,
) -> Vec<String> {
    let mut errors = Vec::new();
    for action in stack.into_iter().rev() {
        if succeeded && !action.needed_after_success() {
            continue;
        }
        if !qmp.is_open() {
            break;
        }
        let side = action.side();
        tracing::debug!(?action, "undo");
        let result = match run(&action, qmp, timeout).await {
            // Registered before the command that creates it: it may never have come to be.
            Err(e) if action.may_not_exist() && is_not_found(&e) => Ok(()),
            other => other,
        };
        let torn_down = matches!(action, Undo::TearDownDestination);
        if let Err(e) = result {
            // A QEMU that exits while we talk to it has nothing left to undo.
            if !e.is_closed() {
                tracing::warn!(%side, "clean-up step failed: {e}");
                errors.push(format!("{side}: {e}"));
            }
        }
        if torn_down {
            break;
        }
    }
    errors
}

/// QEMU 7.2's words for "no such object/node": `object 'X' not found`, `Failed to find node
/// with node-name='X'`, `Cannot find device='X' nor node-name='X'`.
fn is_not_found(e: &QmpError) -> bool {
    e.qemu_error().is_some_and(|(_, desc)| {
        let desc = desc.to_ascii_lowercase();
        desc.contains("not found")
            || desc.contains("failed to find")
            || desc.contains("cannot find")
    })
}

async fn run(action: &Undo, qmp: &Qmp, timeout: Duration) -> Result<(), QmpError> {
    match action {
        Undo::DeleteObject { id, .. } => {
            qmp.call_timeout(&ObjectDel { id: id.clone() }, timeout)
                .await?;
        }
        Undo::RestoreCapabilities { caps, .. } => {
            qmp.call_timeout(
                &MigrateSetCapabilities {
                    capabilities: caps.clone(),
                },
                timeout,
            )
            .await?;
        }
        Undo::RestoreParameters { params, .. } => {
            qmp.call_timeout(params, timeout).await?;
        }
        Undo::CancelMigration => {
            qmp.call_timeout(&MigrateCancel, timeout).await?;
            wait_migration_stopped(qmp, timeout).await?;
        }
        Undo::ResumeSource => {
            let status = qmp.call_timeout(&QueryStatus, timeout).await?;
            if !status.running {
                tracing::info!(state = %status.status, "resuming the source VM");
                qmp.call_timeout(&Cont, timeout).await?;
            }
        }
        Undo::TearDownDestination => {
            tracing::info!("tearing down the destination QEMU");
            qmp.call_timeout(&Quit, timeout).await?;
        }
        Undo::StopNbdServer => {
            qmp.call_timeout(&NbdServerStop, timeout).await?;
        }
        Undo::DeleteBlockNode { node, side } => {
            if *side == Side::Source {
                // The NBD client's peer may be gone: closing it would wait on the dead link.
                yank_nbd(qmp, node, timeout).await;
            }
            qmp.call_timeout(
                &BlockdevDel {
                    node_name: node.clone(),
                },
                timeout,
            )
            .await?;
        }
        Undo::CancelJob { job, target } => {
            yank_nbd(qmp, target, timeout).await;
            cancel_job(qmp, job, timeout).await?
        }
        Undo::CloseFd { fdname } => {
            qmp.call_timeout(
                &CloseFd {
                    fdname: fdname.clone(),
                },
                timeout,
            )
            .await?;
        }
    }
    Ok(())
}

/// Yanks the NBD client node `node`'s connection. A node that is gone, or has no connection
/// to yank, is no error: there is nothing to cut.
async fn yank_nbd(qmp: &Qmp, node: &str, timeout: Duration) {
    let yank = Yank {
        instances: vec![YankInstance::BlockNode {
            node_name: node.to_string(),
        }],
    };
    if let Err(e) = qmp.call_timeout(&yank, timeout).await {
        tracing::debug!(node, "yank: {e}");
    }
}

/// Waits until the source's migration is no longer running (cancelled, failed or completed),
/// following `MIGRATION` events with `query-migrate` as a cross-check.
async fn wait_migration_stopped(qmp: &Qmp, timeout: Duration) -> Result<(), QmpError> {
    let mut events = qmp.subscribe();
    let deadline = super::deadline_after(timeout);
    loop {
        let info = qmp.call_timeout(&QueryMigrate, timeout).await?;
        let status = info.status.unwrap_or(MigrationStatus::None);
        if status.is_final() || status == MigrationStatus::None {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err(QmpError::Timeout {
                    peer: qmp.peer().to_string(),
                    command: format!("migrate_cancel (still {status:?})"),
                    after: timeout,
                });
            }
            // Any event may be the status change; re-query either way.
            _ = events.next() => {}
            _ = tokio::time::sleep(super::PROGRESS_INTERVAL) => {}
        }
    }
}

/// Force-cancels a block job if it still exists, and waits until QEMU has dismissed it (its
/// target node cannot be deleted before).
async fn cancel_job(qmp: &Qmp, job: &str, timeout: Duration) -> Result<(), QmpError> {
    let exists = |jobs: &[crate::qemu::BlockJobInfo]| jobs.iter().any(|j| j.device == job);
    let mut events = qmp.subscribe();
    if !exists(&qmp.call_timeout(&QueryBlockJobs, timeout).await?) {
        return Ok(());
    }
    let cancel = BlockJobCancel {
        device: job.to_string(),
        force: true,
    };
    if let Err(e) = qmp.call_timeout(&cancel, timeout).await {
        // It may have ended between the query and the cancel.
        if exists(&qmp.call_timeout(&QueryBlockJobs, timeout).await?) {
            return Err(e);
        }
    }
    let deadline = super::deadline_after(timeout);
    while exists(&qmp.call_timeout(&QueryBlockJobs, timeout).await?) {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                return Err(QmpError::Timeout {
                    peer: qmp.peer().to_string(),
                    command: format!("block-job-cancel {job}"),
                    after: timeout,
                });
            }
            _ = events.next() => {}
            _ = tokio::time::sleep(super::PROGRESS_INTERVAL) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The migration's socket handed over with `getfd` is closed by an unwind, and an unwind
    /// after `migrate` took it (QEMU: "not found") is not a failure.
    #[tokio::test]
    async fn a_descriptor_no_command_took_is_closed_and_a_taken_one_is_no_error() {
        let t = Duration::from_secs(5);
        let (qmp, fake) = crate::qmp::fake::connect(json!([]), t).await.expect("fake");
        let asked = fake.answer_all(|name, args| match (name, args["fdname"].as_str()) {
            ("closefd", Some("open")) => Ok(json!({})),
            ("closefd", Some(other)) => Err(format!("File descriptor named '{other}' not found")),
            _ => Err("unexpected".into()),
        });
        let stack = vec![
            Undo::CloseFd {
                fdname: "taken".into(),
            },
            Undo::CloseFd {
                fdname: "open".into(),
            },
        ];
        let errors = unwind(stack, false, &qmp, t).await;
        assert!(errors.is_empty(), "{errors:?}");
        let asked = asked.lock().expect("record").clone();
        let names: Vec<_> = asked
            .iter()
            .map(|(n, a)| format!("{n} {}", a["fdname"].as_str().unwrap_or_default()))
            .collect();
        assert_eq!(names, ["closefd open", "closefd taken"]);
    }
}
