//! Controls from another task (the `jobs` socket), applied on the source by the watch loop
//! while disks or RAM move, each answered with QEMU's success or error.

use super::super::control::{AppliedControl, Control, ControlRequest};
use super::super::side::SideCtl;
use super::super::undo::Undo;
use super::super::{MigrationError, check_bandwidth};
use super::Run;
use crate::qemu::{MigrateSetParameters, QueryStatus, Stop};

impl Run<'_, '_> {
    /// Applies a control on the source and answers it; a refused control leaves the migration
    /// running as it was.
    pub(super) async fn answer_control(&mut self, src: &mut SideCtl, request: ControlRequest) {
        let result = self.apply_control(src, request.control).await;
        if let Err(e) = &result {
            tracing::warn!(control = ?request.control, "control refused: {e}");
        }
        // The asker may have given up waiting: nothing to tell then.
        let _ = request.reply.send(result);
    }

    pub(super) async fn apply_control(
        &mut self,
        src: &mut SideCtl,
        control: Control,
    ) -> Result<(), MigrationError> {
        match control {
            Control::SetMaxBandwidth(b) => {
                check_bandwidth(b).map_err(|what| MigrationError::BadOptions { what })?;
                let set = MigrateSetParameters {
                    max_bandwidth: Some(b),
                    ..Default::default()
                };
                src.call("migrate-set-parameters max-bandwidth (control)", &set)
                    .await?;
            }
            Control::SetDowntimeLimit(d) => {
                let set = MigrateSetParameters {
                    downtime_limit: Some(d.as_millis() as u64),
                    ..Default::default()
                };
                src.call("migrate-set-parameters downtime-limit (control)", &set)
                    .await?;
            }
            Control::Pause => {
                let status = src.call("query-status", &QueryStatus).await?;
                // Paused during the disk copy, the source must still be resumed on a roll-back
                // (its resume is registered only when RAM starts to move).
                if status.running && !src.undo.iter().any(|u| matches!(u, Undo::ResumeSource)) {
                    src.undo.push(Undo::ResumeSource);
                }
                src.call("stop (control)", &Stop).await?;
            }
        }
        tracing::info!(?control, "control applied");
        let at_ms = self.elapsed_ms();
        self.said
            .convergence
            .controls
            .push(AppliedControl::new(at_ms, control));
        Ok(())
    }
}
