//! A migration outlives its caller (issue 19): the tool driven the way CloudStack's agent
//! drives it (stdout and stderr merged into a pipe nobody reads until exit; on timeout SIGTERM
//! and at once SIGKILL to the process it started), and killed at each phase. Afterwards one
//! copy of the VM runs, the source holds nothing of the tool's (objects, migration parameters
//! and capabilities as before, no block nodes or jobs), the destination holds nothing of the
//! failed run, and the result file (written by the migration's owner process) or
//! `recover --json` says what happened.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tls_migrate::vm::DiskFormat;
use serde_json::Value;

use crate::fixture::{self, AgentCall, Cli, EVENT_TIMEOUT, Lab, Pair};

/// What Script's output interpreters can take without the child blocking (a pipe's size).
const PIPE_CAPACITY: usize = 64 * 1024;

/// A `migrate --json` of `pair` with a result file and its own run directory, the agent's way.
struct Run {
    _lab: Lab,
    _dir: tempfile::TempDir,
    run_dir: PathBuf,
    result: PathBuf,
    call: AgentCall,
    /// The source's migration parameters and capabilities before the run.
    before: (Value, Value),
}

impl Run {
    async fn start(pair: &Pair, extra: &[&str]) -> Run {
        let lab = Lab::new("Test CA");
        let args = pair.tls_args(&lab);
        Run::launch(lab, pair, args, extra, None).await
    }

    /// `args` with `extra` and the result file, in network namespace `netns` if given.
    async fn launch(
        lab: Lab,
        pair: &Pair,
        mut args: Vec<String>,
        extra: &[&str],
        netns: Option<&str>,
    ) -> Run {
        let dir = tempfile::tempdir().expect("dir");
        let run_dir = dir.path().join("jobs");
        let result = dir.path().join("result.json");
        let before = settings(pair).await;
        args.extend(
            ["--result-file", &result.display().to_string()]
                .iter()
                .chain(extra)
                .map(|s| s.to_string()),
        );
        let mut cli = Cli::new(&args).env("QTM_RUN_DIR", &run_dir);
        if let Some(ns) = netns {
            cli = cli.in_netns(ns);
        }
        let call = AgentCall::start(cli);
        Run {
            _lab: lab,
            _dir: dir,
            run_dir,
            result,
            call,
            before,
        }
    }

    /// `qemu-tls-migrate ARGS` against this run's directory.
    async fn cli(&self, args: &[&str]) -> std::process::Output {
        Cli::new(args)
            .env("QTM_RUN_DIR", &self.run_dir)
            .output()
            .await
    }

    fn journals(&self) -> Vec<String> {
        std::fs::read_dir(&self.run_dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".journal"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A pair whose source holds 64 MiB of random data: over a link capped at 8 MiB/s its RAM
/// takes some 8 s to move.
async fn busy_pair() -> Pair {
    Pair::builder().start().await
}

/// The source's migration parameters and capabilities.
async fn settings(pair: &Pair) -> (Value, Value) {
    let qmp = fixture::monitor(&pair.source).await;
    let params = qmp
        .execute_raw("query-migrate-parameters", None, EVENT_TIMEOUT)
        .await
        .expect("query-migrate-parameters");
    let caps = qmp
        .execute_raw("query-migrate-capabilities", None, EVENT_TIMEOUT)
        .await
        .expect("query-migrate-capabilities");
    (params, caps)
}

/// Waits until the source's migration moves RAM.
async fn wait_ram_moving(pair: &Pair) {
    let qmp = fixture::monitor(&pair.source).await;
    let moving = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let info = qmp
                .execute_raw("query-migrate", None, EVENT_TIMEOUT)
                .await
                .expect("query-migrate");
            if info["status"] == "active" && info["ram"]["transferred"].as_u64() > Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(moving.is_ok(), "the migration never moved RAM");
}

/// Waits until the source's guest is paused (`query-status`).
async fn wait_paused(pair: &Pair) {
    let paused = tokio::time::timeout(EVENT_TIMEOUT, async {
        while fixture::status(&pair.source).await == "running" {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(paused.is_ok(), "the source was never paused");
}

/// The source runs, holding nothing of the tool's, its settings as before `run`; the
/// destination QEMU (which got `migrate-incoming`) was shut down.
async fn assert_rolled_back(pair: &Pair, run: &Run, dest_pid: u32) {
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(
        settings(pair).await,
        run.before,
        "settings as before the run"
    );
    let (jobs, nodes) = fixture::tool_block_leftovers(&pair.source).await;
    assert!(jobs.is_empty() && nodes.is_empty(), "{jobs:?} {nodes:?}");
    fixture::wait_gone(&[dest_pid]).await;
}

/// Exactly one copy runs, and the result says which: completed, the destination runs it and
/// the source (paused) holds nothing of the tool's; otherwise rolled back ([`assert_rolled_back`]).
async fn assert_one_copy(pair: &Pair, run: &Run, dest_pid: u32, result: &Value) {
    if result["status"] == "completed" {
        assert_eq!(fixture::status(&pair.dest).await, "running");
        assert_eq!(fixture::status(&pair.source).await, "postmigrate");
        assert_eq!(
            fixture::tool_objects(&pair.source).await,
            Vec::<String>::new()
        );
        assert_eq!(
            settings(pair).await,
            run.before,
            "settings as before the run"
        );
    } else {
        assert_eq!(result["status"], "cancelled", "{result}");
        assert_rolled_back(pair, run, dest_pid).await;
    }
}

fn assert_bounded(output: &str) {
    assert!(
        output.len() < PIPE_CAPACITY,
        "{} bytes of output: more than a pipe holds",
        output.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_during_ram_rolls_back_and_the_owner_writes_the_result() {
    let pair = busy_pair().await;
    let dest_pid = pair.dest.pid().expect("pid");
    let mut run = Run::start(&pair, &["--max-bandwidth", "8M", "--job-id", "ram-kill"]).await;
    wait_ram_moving(&pair).await;
    let tool = run.call.tool_pids();

    let output = run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;
    fixture::wait_gone(&tool).await;

    fixture::show("result file after SIGTERM+SIGKILL", &result);
    assert_eq!(
        tool.len(),
        2,
        "the caller's process and the owner: {tool:?}"
    );
    assert_eq!(result["status"], "cancelled", "{result}");
    assert_eq!(result["job"], "ram-kill", "{result}");
    assert_rolled_back(&pair, &run, dest_pid).await;
    assert!(run.journals().is_empty(), "{:?}", run.journals());
    assert_bounded(&output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_during_the_disk_copy_leaves_no_node_or_job() {
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 64)])
        .start()
        .await;
    let dest_pid = pair.dest.pid().expect("pid");
    let mut run = Run::start(&pair, &["--disk", "disk0", "--disk-bandwidth", "2M"]).await;
    fixture::wait_block_job(&pair.source).await;

    run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;

    assert_eq!(result["status"], "cancelled", "{result}");
    assert_rolled_back(&pair, &run, dest_pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_after_the_pause_action_resumes_the_guest_the_tool_paused() {
    let pair = busy_pair().await;
    let dest_pid = pair.dest.pid().expect("pid");
    // Paused at 2 s, the rest (64 MiB at 1 MiB/s) would take a minute more.
    let mut run = Run::start(
        &pair,
        &[
            "--max-bandwidth",
            "1M",
            "--timeout",
            "2",
            "--timeout-action",
            "pause",
        ],
    )
    .await;
    wait_ram_moving(&pair).await;
    wait_paused(&pair).await;

    run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;

    assert_eq!(result["status"], "cancelled", "{result}");
    assert_rolled_back(&pair, &run, dest_pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_nobody_reads_completes_with_its_output_bounded() {
    let pair = busy_pair().await;
    // Progress lines every 250 ms and the QMP traffic logged, on a stream nobody reads.
    let mut run = Run::start(&pair, &["--max-bandwidth", "16M", "-vv"]).await;

    let (code, output) = run.call.finish().await;

    let result = fixture::wait_result_file(&run.result).await;
    fixture::note(format_args!(
        "a -vv run nobody read: {} bytes of output passed on",
        output.len()
    ));
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(fixture::status(&pair.dest).await, "running");
    assert_bounded(&output);
    assert!(run.journals().is_empty(), "{:?}", run.journals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_of_every_tool_process_recover_puts_the_vm_back() {
    let pair = busy_pair().await;
    let dest_pid = pair.dest.pid().expect("pid");
    let mut run = Run::start(&pair, &["--max-bandwidth", "8M", "--job-id", "crashed"]).await;
    wait_ram_moving(&pair).await;
    let tool = run.call.tool_pids();

    run.call.kill_all().await;
    fixture::wait_gone(&tool).await;
    let listed = run.cli(&["jobs", "--json"]).await;
    let source = pair.source.qmp_path().display().to_string();
    let recovered = run.cli(&["recover", &source, "--json"]).await;
    let again = run.cli(&["recover", &source, "--json"]).await;

    let listed = fixture::stdout_json(&listed);
    fixture::show("jobs --json after the crash", &listed);
    assert_eq!(listed["needs_recovery"][0]["job"], "crashed", "{listed}");
    let answer = fixture::stdout_json(&recovered);
    fixture::show("recover --json", &answer);
    assert_eq!(recovered.status.code(), Some(0), "{answer}");
    assert_eq!(answer["vms"][0]["outcome"], "rolled-back", "{answer}");
    assert_eq!(answer["vms"][0]["source_status"], "running", "{answer}");
    assert_rolled_back(&pair, &run, dest_pid).await;
    let again = fixture::stdout_json(&again);
    assert_eq!(again["vms"][0]["outcome"], "clean", "{again}");
    assert!(run.journals().is_empty(), "{:?}", run.journals());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_migrate_recovers_what_a_crashed_run_left_and_then_migrates() {
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .start()
        .await;
    let image = pair.dir.path().join("dest2-disk0.qcow2");
    qemu_tls_migrate::vm::create_image(&image, DiskFormat::Qcow2, 32 << 20).expect("image");
    let next_dest = pair.next_destination_with("dest2", &[image]).await;
    let mut crashed = Run::start(&pair, &["--disk", "disk0", "--disk-bandwidth", "1M"]).await;
    fixture::wait_block_job(&pair.source).await;
    crashed.call.kill_all().await;
    let lab = Lab::new("Test CA");
    let mut args = pair.tls_args(&lab);
    retarget(&mut args, next_dest.qmp_path());
    args.extend(["--disk", "disk0"].map(String::from));

    let next = Cli::new(&args)
        .env("QTM_RUN_DIR", &crashed.run_dir)
        .output()
        .await;

    let report = fixture::stdout_json(&next);
    fixture::show("the next migrate's report", &report);
    assert_eq!(next.status.code(), Some(0), "{report}");
    let warnings = report["warnings"].to_string();
    assert!(warnings.contains("recovered first"), "{warnings}");
    assert_eq!(fixture::status(&next_dest).await, "running");
    let (jobs, nodes) = fixture::tool_block_leftovers(&pair.source).await;
    assert!(jobs.is_empty() && nodes.is_empty(), "{jobs:?} {nodes:?}");
    assert!(crashed.journals().is_empty(), "{:?}", crashed.journals());
}

/// Points a `migrate` command line at another destination QMP socket.
fn retarget(args: &mut [String], dest: &Path) {
    let at = args
        .iter()
        .position(|a| a == "--dest-qmp")
        .expect("--dest-qmp");
    args[at + 1] = dest.display().to_string();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_after_pre_switchover_ends_with_one_running_copy() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 16)])
        .start()
        .await;
    let dest_pid = pair.dest.pid().expect("pid");
    // The source answers `migrate-continue` (sent at pre-switchover) 5 s late.
    let proxy = fixture::QmpDelayProxy::start(
        pair.source.qmp_path(),
        &pair.dir.path().join("slow-source.sock"),
        fixture::command_named("migrate-continue"),
        Duration::from_secs(5),
    )
    .await;
    let mut args = pair.tls_args(&lab);
    let at = args.iter().position(|a| a == "--source-qmp").expect("flag");
    args[at + 1] = proxy.path.display().to_string();
    let mut run = Run::launch(lab, &pair, args, &["--disk", "disk0"], None).await;
    tokio::time::timeout(EVENT_TIMEOUT, proxy.holding())
        .await
        .expect("the run reaches pre-switchover");

    run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;

    fixture::show("result after a kill at pre-switchover", &result["status"]);
    assert_one_copy(&pair, &run, dest_pid, &result).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_while_the_destination_resumes_completes_the_migration() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let dest_pid = pair.dest.pid().expect("pid");
    // The destination answers `cont` 5 s late: the kill lands after the point of no return.
    let proxy = fixture::QmpDelayProxy::start(
        pair.dest.qmp_path(),
        &pair.dir.path().join("slow-dest.sock"),
        fixture::command_named("cont"),
        Duration::from_secs(5),
    )
    .await;
    let mut args = pair.tls_args(&lab);
    retarget(&mut args, &proxy.path);
    let mut run = Run::launch(lab, &pair, args, &[], None).await;
    tokio::time::timeout(EVENT_TIMEOUT, proxy.holding())
        .await
        .expect("the run resumes the destination");

    run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;

    assert_eq!(result["status"], "completed", "{result}");
    assert_one_copy(&pair, &run, dest_pid, &result).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_timeout_of_a_migration_to_another_host_rolls_both_hosts_back() {
    let (hosts, lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let service = fixture::Service::builder(&pki_a, &fixture::qmp_dir(&pair.dest))
        .on(&hosts)
        .start()
        .await;
    let args = fixture::migrate_to_args(&pair, &service.addr, &pki_b, "qmp.sock", &[]);
    let mut run = Run::launch(lab, &pair, args, &["--max-bandwidth", "8M"], Some(&hosts.b)).await;
    wait_ram_moving(&pair).await;
    let tool = run.call.tool_pids();

    run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;
    fixture::wait_gone(&tool).await;

    assert_eq!(result["status"], "cancelled", "{result}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(
        settings(&pair).await,
        run.before,
        "settings as before the run"
    );
    assert_ne!(fixture::status_or_gone(&pair.dest).await, "running");
}
