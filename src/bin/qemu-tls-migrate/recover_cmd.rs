//! `qemu-tls-migrate recover [VM]`: puts back what an interrupted migration left on a VM (from
//! its journal), or, with nothing left, says the VM's state.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use qemu_tls_migrate::migration::recover::{self, Recovery, RecoveryOutcome};
use serde_json::json;

use crate::outcome::Outcome;

#[derive(Debug, Args)]
#[command(
    long_about = "Put back a VM that an interrupted migration (its processes killed, its host \
crashed) left changed, from the journal the migration wrote before each change (in the jobs \
directory, /run/qemu-tls-migrate/jobs or $QTM_RUN_DIR): the outgoing migration is stopped, the \
tool's objects, block nodes, jobs and NBD exports are removed, migration parameters and \
capabilities get the values they had before that run, and the guest is resumed if the run \
paused it and nothing may run it elsewhere. If the destination runs the guest, the migration \
happened: the source stays paused. If that cannot be known and the destination may have been \
told to run it, the source stays paused and the answer is split-brain-risk, saying what to \
check.\n\n\
Without VM: every VM with a journal whose migration is gone (`qemu-tls-migrate jobs` lists \
them). A running migration's VM is left alone (in-progress). The next `migrate` of a VM does \
the same first.",
    after_help = "Exit codes: 0 the VM is clean, rolled back, or migrated (completed); 1 \
split-brain-risk, in-progress, unreachable, or something could not be undone.\n\
With --json, stdout carries one object: {\"vms\": [{\"vm\", \"outcome\": \
\"clean\"|\"rolled-back\"|\"completed\"|\"split-brain-risk\"|\"in-progress\"|\"unreachable\", \
\"job\", \"pid\", \"source_status\", \"dest_status\", \"actions\", \"problems\", \"check\"}]}."
)]
pub struct RecoverArgs {
    /// The VM: its source QMP socket, as `migrate --source-qmp` named it.
    #[arg(value_name = "QMP-SOCKET")]
    pub vm: Option<PathBuf>,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Timeout of each QMP command, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = crate::parse::timeout_secs())]
    pub timeout: u64,
}

pub async fn run(args: RecoverArgs) -> anyhow::Result<Outcome> {
    let timeout = Duration::from_secs(args.timeout);
    let results = match &args.vm {
        Some(vm) => vec![recover::recover_vm(vm, timeout).await],
        None => recover::recover_all(timeout).await,
    };
    let mut vms = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(r) => vms.push(r),
            Err(e) => errors.push(crate::output::error_chain(&e).join(": ")),
        }
    }
    let ok = errors.is_empty() && vms.iter().all(fine);
    if args.json {
        let mut v = json!({ "vms": vms });
        if !errors.is_empty() {
            v["errors"] = json!(errors);
        }
        println!("{v}");
    } else {
        if vms.is_empty() && errors.is_empty() {
            println!("no interrupted migration left anything to recover");
        }
        for r in &vms {
            println!("{}", human(r));
        }
        for e in &errors {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {e}");
            }
        }
    }
    Ok(if ok {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn fine(r: &Recovery) -> bool {
    r.problems.is_empty()
        && matches!(
            r.outcome,
            RecoveryOutcome::Clean | RecoveryOutcome::RolledBack | RecoveryOutcome::Completed
        )
}

fn human(r: &Recovery) -> String {
    match r.outcome {
        RecoveryOutcome::Clean => format!(
            "{}: nothing to recover; the source is {}",
            r.vm,
            r.source_status.as_deref().unwrap_or("not reachable")
        ),
        _ => {
            let mut text = r.describe();
            if let Some(s) = &r.source_status {
                text.push_str(&format!("; the source is {s}"));
            }
            text
        }
    }
}
