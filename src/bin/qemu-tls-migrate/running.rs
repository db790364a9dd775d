//! Runs one migration with the command line's progress output and signal handling, for
//! `migrate` and `demo`.

use std::time::Duration;

use qemu_tls_migrate::migration::{
    self, ControlReceiver, MigrationOptions, RemoteTarget, Report, RunContext, ValidOptions,
};
use tokio_util::sync::CancellationToken;

use crate::jobs_cmd::RunningJob;
use crate::output::ProgressOut;
use crate::signals::cancel_on_signal;

/// Runs a migration with progress output and signals cancelling it (see [`cancel_on_signal`]).
pub async fn run_migration(options: MigrationOptions, json: bool, quiet: bool) -> Report {
    match options.validate() {
        Ok(valid) => run_migration_to(&valid, None, json, quiet, None).await,
        Err(e) => Report::refused(e, Duration::ZERO),
    }
}

/// [`run_migration`], to a remote service when `remote` is given, controlled through `job`'s
/// socket when given (`jobs cancel` cancels it as a signal does).
pub async fn run_migration_to(
    options: &ValidOptions,
    remote: Option<&RemoteTarget>,
    json: bool,
    quiet: bool,
    job: Option<(&RunningJob, ControlReceiver)>,
) -> Report {
    let (job, control) = match job {
        Some((job, control)) => (Some(job), Some(control)),
        None => (None, None),
    };
    let mut out = ProgressOut::new(json, quiet);
    let cancel = match job {
        Some(job) => {
            out = out.with_job(job.id());
            job.cancel_token()
        }
        None => CancellationToken::new(),
    };
    let watcher = tokio::spawn(cancel_on_signal(cancel.clone()));
    let mut on_progress = |p: &migration::Progress| {
        if let Some(job) = job {
            job.update(p);
        }
        out.update(p)
    };
    let mut cx = RunContext::new(&mut on_progress, &cancel);
    cx.control = control;
    let report = match remote {
        None => migration::migrate(options, cx).await,
        Some(target) => migration::migrate_remote(options, target, cx).await,
    };
    watcher.abort();
    out.finish();
    report
}
