//! Unit tests of the run's roll-back order and its controls, over a fake QMP peer.

use std::path::Path;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use serde_json::{Value, json};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::control::{AppliedControl, Control};
use super::super::destination::{AbortOutcome, Destination, Finished};
use super::super::side::SideCtl;
use super::super::undo::Undo;
use super::super::{
    Endpoint, MigrationError, MigrationOptions, Progress, Side, Transport, ValidOptions,
};
use super::{Commit, CommitPoint, Run, RunContext};
use crate::peer::{DestPlan, DestPrepared};
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
    async fn lost(&mut self) {
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

/// Options of a run between two sockets that are never opened.
fn options() -> ValidOptions {
    let endpoint = || Endpoint {
        qmp: "x".into(),
        pki_dir: "/".into(),
    };
    MigrationOptions::new(endpoint(), endpoint(), "dst")
        .validate()
        .expect("valid")
}

/// Rolls back a migration whose source reached `committed` against a destination that
/// reports `stopped`; returns the error, the source's commands, and how many of them came
/// before the destination's abort.
async fn roll_back(commit: Commit, stopped: bool) -> (MigrationError, Vec<String>, usize) {
    let (qmp, peer) = fake::connect(json!([]), T).await.expect("fake QEMU");
    let log = peer.answer_all(|name, _| {
        Ok(match name {
            "query-migrate" => json!({"status": "cancelled"}),
            "query-status" => json!({"running": false, "status": "postmigrate"}),
            _ => json!({}),
        })
    });
    let mut src = SideCtl::with_qmp(Side::Source, qmp, Path::new("src.sock"), Path::new("/"), T);
    src.undo = vec![Undo::ResumeSource, Undo::CancelMigration].into();
    let opts = options();
    let mut progress = |_: &Progress| {};
    let cancel = CancellationToken::new();
    let cx = RunContext::new(&mut progress, &cancel);
    let mut run = Run::new(&opts, Instant::now(), cx, Transport::Tls);
    run.commit = commit;
    let aborted_after = Arc::new(Mutex::new(None));
    let mut dest = FakeDestination {
        stopped,
        source_log: log.clone(),
        aborted_after: aborted_after.clone(),
    };

    let (_, error) = run
        .roll_back(
            &mut src,
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
    let mut src = SideCtl::with_qmp(Side::Source, qmp, Path::new("s"), Path::new("/"), T);
    let opts = options();
    let mut progress = |_: &Progress| {};
    let cancel = CancellationToken::new();
    let cx = RunContext::new(&mut progress, &cancel);
    let mut run = Run::new(&opts, Instant::now(), cx, Transport::Tls);
    let mut answers = Vec::new();
    for c in controls {
        answers.push(
            run.apply_control(&mut src, *c)
                .await
                .map_err(|e| e.to_string()),
        );
    }
    let sent = log.lock().expect("lock").clone();
    let resumes = src.undo.iter().any(|u| matches!(u, Undo::ResumeSource));
    (answers, sent, run.said.convergence.controls, resumes)
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
    let (error, sent, _) = roll_back(Commit::Passed(CommitPoint::Completed), false).await;

    assert_eq!(error.kind(), "split-brain-risk");
    assert!(
        error.to_string().contains("the fake destination"),
        "{error}"
    );
    assert!(!sent.contains(&"cont".to_string()), "{sent:?}");
}

#[tokio::test]
async fn the_source_resumes_only_after_the_destination_confirmed_it_does_not_run() {
    let (error, sent, before_abort) = roll_back(Commit::Passed(CommitPoint::Completed), true).await;

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
    let (error, sent, _) = roll_back(Commit::NotYet, false).await;

    assert_eq!(error.kind(), "migration-failed");
    assert!(sent.contains(&"cont".to_string()), "{sent:?}");
}
