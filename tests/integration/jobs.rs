//! `jobs`: another process (CloudStack's agent, an operator) lists, cancels, speeds up or
//! pauses a `migrate` that runs a busy guest over TLS, through the job's control socket.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use qemu_tls_migrate::vm::DiskFormat;
use qemu_tls_migrate::vm::workload::workload_kernel;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Child;

use crate::fixture::{self, Cli, DEST_HOST, EVENT_TIMEOUT, Lab, Pair, pass_beyond};

/// A `migrate --json` that keeps busy long enough to be controlled. Its control socket lives
/// in `run_dir`.
struct BusyJob {
    _lab: Lab,
    pair: Pair,
    _dir: tempfile::TempDir,
    run_dir: PathBuf,
    id: String,
    child: Child,
    stderr: tokio::task::JoinHandle<String>,
}

impl BusyJob {
    /// A guest dirtying 64 MiB at 20000 pages/s over a link capped at 8 MiB/s: it never
    /// finishes on its own. Returns once `jobs` lists it moving RAM.
    async fn start(id: &str) -> BusyJob {
        let kernel = workload_kernel(64, 20_000).expect("workload");
        let pair = Pair::builder()
            .tweak(|c| c.kernel = Some(kernel))
            .start()
            .await;
        pass_beyond(pair.source.serial_path(), 0).await;
        let mut job = BusyJob::launch(id, pair, &["--max-bandwidth", "8M"]);
        job.wait_listed(|j| j["phase"] == "ram" && j["ram"]["transferred"].as_u64() > Some(0))
            .await;
        job
    }

    /// A 64 MiB disk copied at 2 MiB/s. Returns once `jobs` lists it copying the disk.
    async fn start_copying_a_disk(id: &str) -> BusyJob {
        let pair = Pair::builder()
            .disks(&[("disk0", DiskFormat::Qcow2, 64)])
            .start()
            .await;
        let mut job = BusyJob::launch(id, pair, &["--disk", "disk0", "--disk-bandwidth", "2M"]);
        job.wait_listed(|j| j["phase"] == "disks").await;
        job
    }

    /// `migrate --json` of `pair` over TLS as job `id`, with `extra` arguments.
    fn launch(id: &str, pair: Pair, extra: &[&str]) -> BusyJob {
        let lab = Lab::new("Test CA");
        let dir = tempfile::tempdir().expect("run dir parent");
        let run_dir = dir.path().join("jobs");
        let mut args = pair.tls_args(&lab);
        args.extend(["--job-id", id].iter().chain(extra).map(|s| s.to_string()));
        let mut child = Cli::new(&args).env("QTM_RUN_DIR", &run_dir).spawn();
        // Drained all along: a full pipe would stall the tool.
        let mut pipe = child.stderr.take().expect("stderr");
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text).await;
            text
        });
        BusyJob {
            _lab: lab,
            pair,
            _dir: dir,
            run_dir,
            id: id.to_string(),
            child,
            stderr,
        }
    }

    /// `qemu-tls-migrate ARGS` against this job's run directory.
    async fn cli(&self, args: impl IntoIterator<Item = impl AsRef<OsStr>>) -> Output {
        Cli::new(args)
            .env("QTM_RUN_DIR", &self.run_dir)
            .output()
            .await
    }

    /// Polls `jobs --json` until this job is listed as `wanted` says.
    async fn wait_listed(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
        loop {
            let out = self.cli(&["jobs", "--json"]).await;
            let listed = fixture::stdout_json(&out);
            let this = listed["jobs"]
                .as_array()
                .and_then(|jobs| jobs.iter().find(|j| j["id"] == self.id.as_str()))
                .cloned();
            if let Some(job) = this
                && wanted(&job)
            {
                return job;
            }
            // A migration that ended cannot be listed any more: say why it ended.
            if let Ok(Some(status)) = self.child.try_wait() {
                let stderr = (&mut self.stderr).await.unwrap_or_default();
                panic!(
                    "job {} ended ({status}) before it was listed as expected: {stderr}",
                    self.id
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {} never listed as expected: {listed}",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for the migrate process; returns its exit code, final JSON and stderr.
    async fn finish(mut self) -> (Pair, Option<i32>, Value, String) {
        let status = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .expect("the migration ends")
            .expect("wait");
        let mut stdout = String::new();
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut stdout).await.expect("stdout");
        }
        let stderr = self.stderr.await.expect("stderr reader");
        let json: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {stdout:?}; {stderr}"));
        (self.pair, status.code(), json, stderr)
    }
}

fn run_dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_lists_a_running_migration_and_an_unknown_id_exits_3_naming_it() {
    let mut job = BusyJob::start("vm-list").await;

    let listed = job.wait_listed(|j| j["phase"] == "ram").await;
    let unknown = job.cli(&["jobs", "cancel", "no-such-job", "--json"]).await;
    let human = job.cli(&["jobs"]).await;

    // The migration's owner process, started by the one the caller started.
    let owner = fixture::children_of(job.child.id().expect("pid"));
    assert_eq!(listed["pid"].as_u64(), owner.first().map(|p| u64::from(*p)));
    assert_eq!(
        listed["vm"],
        job.pair.source.qmp_path().display().to_string()
    );
    assert!(listed["ram"]["total"].as_u64() > Some(0), "{listed}");
    assert_eq!(unknown.status.code(), Some(3));
    let refusal = fixture::stdout_json(&unknown);
    fixture::show("jobs cancel no-such-job --json", &refusal);
    assert_eq!(refusal["result"], "unknown-job", "{refusal}");
    assert_eq!(refusal["running"], serde_json::json!(["vm-list"]));
    assert!(
        refusal["error"]
            .as_str()
            .is_some_and(|e| e.contains("no-such-job")),
        "{refusal}"
    );
    let table = String::from_utf8_lossy(&human.stdout);
    fixture::show("jobs", &table);
    assert!(
        table.contains("vm-list") && table.contains("ram"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancel_from_another_process_rolls_back_the_migration_with_exit_4() {
    let job = BusyJob::start("vm-cancel").await;
    let run_dir = job.run_dir.clone();

    let cancel = job.cli(&["jobs", "cancel", "vm-cancel", "--json"]).await;
    let (mut pair, code, report, stderr) = job.finish().await;

    let answer = fixture::stdout_json(&cancel);
    assert_eq!(cancel.status.code(), Some(0), "{answer}");
    assert_eq!(answer["result"], "done");
    assert_eq!(code, Some(4), "{report}: {stderr}");
    assert_eq!(report["status"], "cancelled");
    assert_eq!(report["job"], "vm-cancel");
    fixture::assert_source_untouched(&pair.source).await;
    assert!(
        pair.dest.wait_exit(EVENT_TIMEOUT).await,
        "the destination QEMU was not torn down"
    );
    assert_eq!(run_dir_entries(&run_dir), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_set_max_bandwidth_lifts_the_cap_of_a_running_migration_and_it_completes() {
    let job = BusyJob::start("vm-set").await;

    let set = job
        .cli(&[
            "jobs",
            "set",
            "vm-set",
            "--max-bandwidth",
            "1G",
            "--downtime-limit",
            "1000",
            "--json",
        ])
        .await;
    let (pair, code, report, stderr) = job.finish().await;

    let answer = fixture::stdout_json(&set);
    fixture::show("jobs set --json", &answer);
    fixture::show("migrate --json", &report);
    assert_eq!(set.status.code(), Some(0), "{answer}");
    assert_eq!(
        answer["applied"],
        serde_json::json!(["max-bandwidth 1073741824 bytes/s", "downtime-limit 1000 ms"])
    );
    assert_eq!(code, Some(0), "{report}: {stderr}");
    assert_eq!(report["status"], "completed");
    let controls = &report["convergence"]["controls"];
    assert_eq!(controls[0]["what"], "max-bandwidth", "{report}");
    assert_eq!(controls[0]["value"], 1u64 << 30, "{report}");
    assert_eq!(controls[1]["what"], "downtime-limit", "{report}");
    let first_progress = stderr
        .lines()
        .find(|l| l.starts_with("{\"progress\""))
        .expect("a progress line");
    let first: Value = serde_json::from_str(first_progress).expect("JSON line");
    assert_eq!(first["job"], "vm-set", "{first_progress}");
    assert_eq!(report["job"], "vm-set");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_pause_makes_a_busy_guest_finish_as_downtime() {
    let job = BusyJob::start("vm-pause").await;

    let pause = job.cli(&["jobs", "pause", "vm-pause"]).await;
    let (pair, code, report, stderr) = job.finish().await;

    let said = String::from_utf8_lossy(&pause.stdout);
    fixture::show("jobs pause", &said);
    assert_eq!(pause.status.code(), Some(0), "{pause:?}");
    assert_eq!(said.trim(), "job vm-pause: pause");
    assert_eq!(code, Some(0), "{report}: {stderr}");
    assert_eq!(
        report["convergence"]["controls"][0]["what"], "pause",
        "{report}"
    );
    assert!(
        report["guest_pause"]["ms"].as_u64() > Some(100),
        "the rest moved while the guest was paused: {report}"
    );
    assert_eq!(fixture::status(&pair.dest).await, "running");
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_paused_during_the_disk_copy_runs_again_after_jobs_cancel() {
    let job = BusyJob::start_copying_a_disk("vm-disks").await;

    let pause = job.cli(&["jobs", "pause", "vm-disks", "--json"]).await;
    let paused = fixture::status(&job.pair.source).await;
    let cancel = job.cli(&["jobs", "cancel", "vm-disks", "--json"]).await;
    let (pair, code, report, stderr) = job.finish().await;

    assert_eq!(pause.status.code(), Some(0), "{pause:?}");
    assert_eq!(paused, "paused");
    assert_eq!(cancel.status.code(), Some(0), "{cancel:?}");
    assert_eq!(code, Some(4), "{report}: {stderr}");
    assert_eq!(report["status"], "cancelled");
    fixture::assert_source_untouched(&pair.source).await;
    let (nodes, jobs) = fixture::tool_block_leftovers(&pair.source).await;
    assert!(nodes.is_empty() && jobs.is_empty(), "{nodes:?} {jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_migrate_of_a_vm_copying_its_disk_is_refused_busy_and_the_first_completes() {
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .start()
        .await;
    let mut first = BusyJob::launch(
        "first-run",
        pair,
        &["--disk", "disk0", "--disk-bandwidth", "4M"],
    );
    first.wait_listed(|j| j["phase"] == "disks").await;
    let lab = Lab::new("Test CA");
    // An agent's retry: the same VM, the same destination.
    let mut retry_args = first.pair.tls_args(&lab);
    retry_args.extend(["--job-id", "retry", "--disk", "disk0"].map(String::from));

    let retry = first.cli(&retry_args).await;
    let (mut pair, code, report, stderr) = first.finish().await;

    let refusal = fixture::stdout_json(&retry);
    fixture::show("the retry's refusal", &refusal["error"]["message"]);
    assert_eq!(retry.status.code(), Some(3), "{refusal}");
    assert_eq!(refusal["error"]["kind"], "busy", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("job first-run"), "{message}");
    assert_eq!(code, Some(0), "{report}: {stderr}");
    assert_eq!(report["status"], "completed");
    assert!(fixture::tool_objects(&pair.source).await.is_empty());
    assert_eq!(
        fixture::tool_block_leftovers(&pair.source).await,
        (vec![], vec![])
    );
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst).expect("the first run's copy is whole");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_lock_left_by_a_killed_run_does_not_block_the_next_run() {
    let pair = Pair::builder().start().await;
    let next_dest = pair.next_destination("dest2").await;
    // The killed run waits on its destination's first answer, holding the VM's lock.
    let proxy = fixture::QmpDelayProxy::start(
        pair.dest.qmp_path(),
        &pair.dir.path().join("held.sock"),
        fixture::command_named("query-status"),
        Duration::from_secs(300),
    )
    .await;
    let killed_id = format!("killed-{}", std::process::id());
    let lab = Lab::new("Test CA");
    let (src, dst) = (
        lab.host("src", &["src-host"]),
        lab.host("dst", &[DEST_HOST]),
    );
    let mut killed_args = fixture::migrate_args(&pair, &src, &dst);
    let dest_at = killed_args
        .iter()
        .position(|a| a == "--dest-qmp")
        .expect("--dest-qmp");
    killed_args[dest_at + 1] = proxy.path.display().to_string();
    killed_args.extend(["--job-id".to_string(), killed_id.clone()]);
    let mut killed = Cli::new(&killed_args).spawn();
    proxy.holding().await;
    let record = held_lock_record(&killed_id).expect("the run holds its VM's lock");
    // Every process of the tool: the one started and the migration's owner.
    let pid = killed.id().expect("pid");
    for p in std::iter::once(pid).chain(fixture::children_of(pid)) {
        fixture::signal(p, nix::sys::signal::Signal::SIGKILL);
    }
    killed.wait().await.expect("reaped");
    let mut next_args = fixture::migrate_args(&pair, &src, &dst);
    next_args[dest_at + 1] = next_dest.qmp_path().display().to_string();

    let next = Cli::new(&next_args).output().await;

    let report = fixture::stdout_json(&next);
    assert!(record.contains(&killed_id), "{record}");
    assert_eq!(next.status.code(), Some(0), "{report}");
    assert_eq!(report["status"], "completed");
    assert_eq!(fixture::status(&next_dest).await, "running");
}

/// The contents of the VM lock file (in the port lock directory) that names job `id`.
fn held_lock_record(id: &str) -> Option<String> {
    let dir = qemu_tls_migrate::ports::lock_dir();
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .find(|text| text.contains(&format!("\"job\":\"{id}\"")))
}
