//! Runtime control of a running migration: another task (the `jobs` control socket of the
//! binary, a test) changes the bandwidth or the downtime limit, or pauses the guest, while the
//! driver copies disks or RAM.
//!
//! 1. The caller makes a channel ([`control_channel`]), hands the [`ControlReceiver`] to the
//!    run ([`super::RunContext::with_control`]) and keeps the [`ControlSender`].
//! 2. The run reads it in its watch loop, during the disk copy and the RAM phase only.
//! 3. Each [`Control`] is applied on the source with one QMP command; the sender gets `Ok` or
//!    the error, and the report's `convergence.controls` lists what was applied and when.
//!
//! Cancelling is not a control: it goes through the migration's `CancellationToken`, exactly
//! as a signal does.

use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::MigrationError;

/// How many controls may wait for the driver at once.
const QUEUE: usize = 16;

/// A change to a running migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The RAM stream's cap in bytes per second (`max-bandwidth`).
    SetMaxBandwidth(u64),
    /// The longest pause allowed at switch-over (`downtime-limit`). Once set this way,
    /// `--downtime-steps` stops raising it: the operator has taken over.
    SetDowntimeLimit(Duration),
    /// Pause the guest now (`stop`), as `--timeout-action pause` does at the deadline: what is
    /// left moves as downtime, and the destination resumes it.
    Pause,
}

/// A control as the report records it: `{"at_ms": 5230, "what": "max-bandwidth", "value":
/// 33554432}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppliedControl {
    /// From the start of the run.
    pub at_ms: u64,
    /// `max-bandwidth` (bytes/s), `downtime-limit` (ms) or `pause`.
    pub what: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<u64>,
}

impl AppliedControl {
    pub(crate) fn new(at_ms: u64, control: Control) -> AppliedControl {
        let (what, value) = match control {
            Control::SetMaxBandwidth(b) => ("max-bandwidth", Some(b)),
            Control::SetDowntimeLimit(d) => ("downtime-limit", Some(d.as_millis() as u64)),
            Control::Pause => ("pause", None),
        };
        AppliedControl { at_ms, what, value }
    }

    /// Whether this control set the downtime limit.
    pub(crate) fn sets_downtime(&self) -> bool {
        self.what == "downtime-limit"
    }
}

/// One control on its way to the driver, with where its answer goes.
#[derive(Debug)]
pub(crate) struct ControlRequest {
    pub control: Control,
    pub reply: oneshot::Sender<Result<(), MigrationError>>,
}

/// The caller's end: sends controls and waits for the driver's answer.
#[derive(Debug, Clone)]
pub struct ControlSender(mpsc::Sender<ControlRequest>);

impl ControlSender {
    /// Applies `control` to the running migration; `Err` carries QEMU's refusal, or says the
    /// migration no longer takes controls (it ended, or is past the RAM phase).
    pub async fn send(&self, control: Control) -> Result<(), MigrationError> {
        let gone = || MigrationError::Failed {
            desc: "the migration no longer takes controls (it is finishing or has ended)".into(),
        };
        let (reply, answer) = oneshot::channel();
        self.0
            .send(ControlRequest { control, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// The run's end: where its watch loop reads controls.
#[derive(Debug)]
pub struct ControlReceiver(mpsc::Receiver<ControlRequest>);

impl ControlReceiver {
    /// The next control, or never once every sender is gone (the receiver is then dropped).
    pub(crate) async fn next(control: &mut Option<ControlReceiver>) -> ControlRequest {
        if let Some(rx) = control
            && let Some(request) = rx.0.recv().await
        {
            return request;
        }
        *control = None;
        std::future::pending().await
    }
}

/// A new control channel: keep the sender, give the receiver to the run.
pub fn control_channel() -> (ControlSender, ControlReceiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (ControlSender(tx), ControlReceiver(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_controls_serialise_as_what_and_value() {
        let bw = AppliedControl::new(10, Control::SetMaxBandwidth(1 << 20));
        let dt = AppliedControl::new(20, Control::SetDowntimeLimit(Duration::from_secs(2)));
        let pause = AppliedControl::new(30, Control::Pause);

        assert_eq!(
            serde_json::to_value([bw, dt, pause]).expect("json"),
            serde_json::json!([
                {"at_ms": 10, "what": "max-bandwidth", "value": 1048576},
                {"at_ms": 20, "what": "downtime-limit", "value": 2000},
                {"at_ms": 30, "what": "pause"},
            ])
        );
    }

    #[tokio::test]
    async fn a_control_sent_after_the_migration_ended_says_so() {
        let (tx, receiver) = control_channel();
        drop(receiver);

        let err = tx.send(Control::Pause).await.expect_err("nobody listens");

        assert!(
            err.to_string().contains("no longer takes controls"),
            "{err}"
        );
    }
}
