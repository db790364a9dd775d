//! `qemu-tls-migrate jobs`: list the migrations running on this host, cancel one, change its
//! bandwidth or downtime limit, pause its guest; and [`RunningJob`], the job side that
//! `migrate` runs (its control socket, answering from its progress, its cancellation token and
//! its control channel).

#![allow(clippy::print_stdout)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};
use futures_util::future::BoxFuture;
use qemu_tls_migrate::jobs::{self, JobServer, JobStatus, JobsError, Reply, Request};
use qemu_tls_migrate::migration::journal::JournalRecord;
use qemu_tls_migrate::migration::{
    Control, ControlReceiver, ControlSender, Phase, Progress, control_channel,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;

#[derive(Debug, Args)]
#[command(
    long_about = "List the migrations running on this host, and control one while it runs: \
cancel it (it rolls back exactly as on Ctrl-C: the destination is torn down, the source runs \
on), give it more or less bandwidth, allow a longer downtime, or pause its guest so that what \
is left moves as downtime and the migration finishes.\n\n\
Each `migrate` serves a control socket, ID.sock, in the jobs directory (/run/qemu-tls-migrate/jobs, \
or $QTM_RUN_DIR; mode 0700, sockets 0600, this user only). Its id is in its first JSON \
progress line and in its final JSON (\"job\"); choose it with `migrate --job-id`. The socket \
goes when the migration ends; a crashed one's is removed by the next listing.\n\n\
Controls apply while disks or RAM move; earlier or later they are refused with a message.",
    after_help = "Examples:\n  \
qemu-tls-migrate jobs                                  # id, pid, phase, VM, progress\n  \
qemu-tls-migrate jobs set 3f9c2a1b --max-bandwidth 1G  # more bandwidth now\n  \
qemu-tls-migrate jobs set 3f9c2a1b --downtime-limit 2000\n  \
qemu-tls-migrate jobs pause 3f9c2a1b                   # finish now, as downtime\n  \
qemu-tls-migrate jobs cancel 3f9c2a1b --json           # roll back; waits until it has\n\n\
Exit codes: 0 done, 1 failed (QEMU refused the change, the job did not answer), 2 bad \
command line, 3 no running job with that id (the message lists the running ones).\n\
With --json, stdout carries exactly one object: {\"jobs\": [...]} for the list; \
{\"id\", \"result\": \"done\"|\"failed\"|\"unknown-job\", \"applied\": [...], \"error\", \
\"running\"} for the others."
)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub action: Option<JobsAction>,
    /// Print exactly one JSON object on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for a job's answer (a control is applied on its next progress tick; a
    /// cancel waits for the roll-back to end), in seconds.
    #[arg(long, value_name = "SECS", global = true, default_value_t = jobs::DEFAULT_REQUEST_TIMEOUT.as_secs(),
        value_parser = crate::parse::timeout_secs())]
    pub timeout: u64,
}

#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// List running migrations: id, pid, VM, phase and progress (the default).
    List,
    /// Cancel a running migration and wait until it has rolled back (the source runs on).
    Cancel { id: String },
    /// Change a running migration's RAM bandwidth cap or its downtime limit.
    #[command(group(ArgGroup::new("what").required(true).multiple(true)))]
    Set {
        id: String,
        /// The new cap of the RAM stream, bytes per second with an optional K/M/G suffix
        /// (powers of 1024), or "unlimited" (or 0).
        #[arg(long, value_name = "RATE", group = "what", value_parser = crate::parse::parse_bandwidth)]
        max_bandwidth: Option<u64>,
        /// The longest pause allowed at switch-over, milliseconds (ends --downtime-steps).
        #[arg(long, value_name = "MS", group = "what", value_parser = clap::value_parser!(u64).range(1..=2_000_000))]
        downtime_limit: Option<u64>,
    },
    /// Pause the guest now: the rest moves as downtime, the destination resumes it.
    Pause { id: String },
}

pub async fn run(args: JobsArgs) -> anyhow::Result<Outcome> {
    let dir = jobs::run_dir();
    let timeout = Duration::from_secs(args.timeout);
    let (id, request) = match args.action.unwrap_or(JobsAction::List) {
        JobsAction::List => {
            return Ok(match jobs::list(&dir, timeout).await {
                Ok(listed) => {
                    let pending = qemu_tls_migrate::migration::recover::pending();
                    print_list(&listed, &pending, args.json);
                    Outcome::Success
                }
                Err(e) => {
                    let message = crate::output::error_chain(&e).join(": ");
                    if args.json {
                        println!("{}", json!({"jobs": [], "error": message}));
                    } else {
                        #[allow(clippy::print_stderr)]
                        {
                            eprintln!("error: {message}");
                        }
                    }
                    Outcome::Failed
                }
            });
        }
        JobsAction::Cancel { id } => (id, Request::Cancel),
        JobsAction::Set {
            id,
            max_bandwidth,
            downtime_limit,
        } => (
            id,
            Request::Set {
                max_bandwidth,
                downtime_limit_ms: downtime_limit,
            },
        ),
        JobsAction::Pause { id } => (id, Request::Pause),
    };
    let result = match jobs::request(&dir, &id, &request, timeout).await {
        Ok(Reply::Done { applied }) if request == Request::Cancel => {
            wait_ended(&dir, &id, timeout).await.map(|()| applied)
        }
        Ok(Reply::Done { applied }) => Ok(applied),
        Ok(Reply::Error { message, applied }) => Err((message, applied, None)),
        Ok(Reply::Status(_)) => Err(("unexpected status reply".into(), Vec::new(), None)),
        Err(e) => Err((e.to_string(), Vec::new(), Some(e))),
    };
    Ok(print_result(&id, result, args.json))
}

/// After a cancel: waits until the job has rolled back and ended (its socket gone).
async fn wait_ended(
    dir: &std::path::Path,
    id: &str,
    timeout: Duration,
) -> Result<(), (String, Vec<String>, Option<JobsError>)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match jobs::request(dir, id, &Request::Status, timeout).await {
            Err(e) if e.is_unknown_job() => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err((
                    format!("job {id} was cancelled but had not ended after {timeout:?}"),
                    vec!["cancel".into()],
                    None,
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

type Failure = (String, Vec<String>, Option<JobsError>);

fn print_result(id: &str, result: Result<Vec<String>, Failure>, json: bool) -> Outcome {
    match result {
        Ok(applied) => {
            if json {
                println!(
                    "{}",
                    json!({"id": id, "result": "done", "applied": applied})
                );
            } else {
                println!("job {id}: {}", applied.join(", "));
            }
            Outcome::Success
        }
        Err((message, applied, error)) => {
            let unknown = error.as_ref().is_some_and(JobsError::is_unknown_job);
            if json {
                let mut v = json!({
                    "id": id,
                    "result": if unknown { "unknown-job" } else { "failed" },
                    "applied": applied,
                    "error": message,
                });
                if let Some(JobsError::UnknownJob { running, .. }) = &error {
                    v["running"] = json!(running);
                }
                println!("{v}");
            } else {
                #[allow(clippy::print_stderr)]
                {
                    eprintln!("error: {message}");
                    if !applied.is_empty() {
                        eprintln!("applied before that: {}", applied.join(", "));
                    }
                }
            }
            if unknown {
                Outcome::NotFound
            } else {
                Outcome::Failed
            }
        }
    }
}

fn print_list(listed: &[JobStatus], pending: &[JournalRecord], json: bool) {
    if json {
        let pending: Vec<_> = pending
            .iter()
            .map(|r| json!({"vm": r.vm, "job": r.job, "pid": r.pid, "stage": r.stage}))
            .collect();
        println!("{}", json!({ "jobs": listed, "needs_recovery": pending }));
        return;
    }
    for r in pending {
        println!(
            "needs recovery: {} (interrupted job {}, pid {}): run `qemu-tls-migrate recover`",
            r.vm,
            r.job.as_deref().unwrap_or("-"),
            r.pid
        );
    }
    if listed.is_empty() {
        println!("no migration is running on this host");
        return;
    }
    let id_width = listed.iter().map(|j| j.id.len()).max().unwrap_or(0).max(2);
    let vm_width = listed.iter().map(|j| j.vm.len()).max().unwrap_or(0).max(2);
    println!(
        "{:<id_width$} {:>8} {:<9} {:<vm_width$} PROGRESS",
        "ID", "PID", "PHASE", "VM"
    );
    for j in listed {
        println!(
            "{:<id_width$} {:>8} {:<9} {:<vm_width$} {}",
            j.id,
            j.pid,
            j.phase,
            j.vm,
            progress_text(j)
        );
    }
}

fn progress_text(j: &JobStatus) -> String {
    use indicatif::HumanBytes;
    let secs = j.elapsed_ms as f64 / 1000.0;
    if let Some(ram) = &j.ram {
        let done = ram.total.saturating_sub(ram.remaining);
        let pct = (done.saturating_mul(100))
            .checked_div(ram.total)
            .unwrap_or(0);
        return format!(
            "RAM {pct}% of {}, {} sent, {:.0} Mbit/s, {secs:.0} s",
            HumanBytes(ram.total),
            HumanBytes(ram.transferred),
            ram.mbps
        );
    }
    if !j.disks.is_empty() {
        let len: u64 = j.disks.iter().map(|d| d.len).sum();
        let done: u64 = j.disks.iter().map(|d| d.offset).sum();
        return format!(
            "disks {}/{}, {secs:.0} s",
            HumanBytes(done),
            HumanBytes(len)
        );
    }
    format!("{secs:.0} s")
}

/// The job side of a running `migrate`: its control socket, its cancellation token, its
/// latest progress. Dropping it removes the socket.
pub struct RunningJob {
    server: JobServer,
    state: Arc<JobState>,
}

struct JobState {
    id: String,
    vm: String,
    cancel: CancellationToken,
    control: ControlSender,
    progress: Mutex<Option<Progress>>,
}

impl RunningJob {
    /// Takes `id` (or a fresh one) and listens on its control socket; returns the job and
    /// the control channel's receiving end, for the run.
    pub fn start(id: Option<&str>, vm: String) -> Result<(RunningJob, ControlReceiver), JobsError> {
        let id = id.map_or_else(jobs::new_id, str::to_string);
        let (control, receiver) = control_channel();
        let state = Arc::new(JobState {
            id: id.clone(),
            vm,
            cancel: CancellationToken::new(),
            control,
            progress: Mutex::new(None),
        });
        let server = JobServer::start(&jobs::run_dir(), &id, Arc::new(Answer(state.clone())))?;
        Ok((RunningJob { server, state }, receiver))
    }

    pub fn id(&self) -> &str {
        self.server.id()
    }

    /// Cancelled by `jobs cancel` (and by the signals the caller wires to it).
    pub fn cancel_token(&self) -> CancellationToken {
        self.state.cancel.clone()
    }

    pub fn update(&self, p: &Progress) {
        if let Ok(mut latest) = self.state.progress.lock() {
            *latest = Some(p.clone());
        }
    }
}

/// Answers the control socket's requests from the job's state.
struct Answer(Arc<JobState>);

impl jobs::Handler for Answer {
    fn handle(&self, request: Request) -> BoxFuture<'static, Reply> {
        let state = self.0.clone();
        Box::pin(async move { state.answer(request).await })
    }
}

impl JobState {
    async fn answer(&self, request: Request) -> Reply {
        let latest = self.progress.lock().ok().and_then(|p| p.clone());
        let phase = latest.as_ref().map(|p| p.phase);
        let controls = match request {
            Request::Status => return Reply::Status(self.status(latest.as_ref())),
            Request::Cancel => {
                tracing::warn!(job = %self.id, "cancelled through the control socket: rolling back");
                self.cancel.cancel();
                return Reply::Done {
                    applied: vec!["cancel".into()],
                };
            }
            Request::Set {
                max_bandwidth,
                downtime_limit_ms,
            } => {
                let mut controls = Vec::new();
                controls.extend(max_bandwidth.map(Control::SetMaxBandwidth));
                controls.extend(
                    downtime_limit_ms
                        .map(|ms| Control::SetDowntimeLimit(Duration::from_millis(ms))),
                );
                controls
            }
            Request::Pause => vec![Control::Pause],
        };
        if !matches!(phase, Some(Phase::Disks | Phase::Ram)) {
            let phase = phase.map_or_else(|| "starting".into(), phase_name);
            return Reply::Error {
                message: format!(
                    "job {} is in phase {phase}: controls apply while disks or RAM move",
                    self.id
                ),
                applied: Vec::new(),
            };
        }
        let mut applied = Vec::new();
        for control in controls {
            match self.control.send(control).await {
                Ok(()) => applied.push(describe(control)),
                Err(e) => {
                    let chain = crate::output::error_chain(&e);
                    return Reply::Error {
                        message: chain.join(": "),
                        applied,
                    };
                }
            }
        }
        Reply::Done { applied }
    }

    fn status(&self, latest: Option<&Progress>) -> JobStatus {
        JobStatus {
            id: self.id.clone(),
            pid: std::process::id(),
            vm: self.vm.clone(),
            phase: latest.map_or_else(|| "starting".into(), |p| phase_name(p.phase)),
            status: latest
                .and_then(|p| p.status)
                .and_then(|s| serde_json::to_value(s).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            elapsed_ms: latest.map_or(0, |p| p.elapsed_ms),
            ram: latest.and_then(|p| p.ram).map(|r| jobs::RamProgress {
                transferred: r.transferred,
                remaining: r.remaining,
                total: r.total,
                mbps: r.mbps,
            }),
            disks: latest
                .map(|p| {
                    p.disks
                        .iter()
                        .map(|d| jobs::DiskProgress {
                            device: d.device.clone(),
                            offset: d.offset,
                            len: d.len,
                            ready: d.ready,
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn phase_name(phase: Phase) -> String {
    phase.as_str().to_string()
}

fn describe(control: Control) -> String {
    match control {
        Control::SetMaxBandwidth(b) => format!("max-bandwidth {b} bytes/s"),
        Control::SetDowntimeLimit(d) => format!("downtime-limit {} ms", d.as_millis()),
        Control::Pause => "pause".into(),
    }
}
