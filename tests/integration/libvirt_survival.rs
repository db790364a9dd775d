//! A migration outlives its caller between two real libvirtds (issue 19.3): a CloudStack-shaped
//! domain (a root and a data disk, a rewritten `--dest-xml` naming new volume paths) migrated
//! through `serve --libvirt` with the agent's option mapping, the tool driven the agent's way
//! ([`AgentCall`]: both streams in one pipe read only at exit, SIGTERM and SIGKILL back to back
//! to the started pid), and killed at each phase. Afterwards exactly one copy runs in libvirt's
//! view of both hosts, the source QEMU holds nothing of the tool's (its objects, block nodes,
//! migration parameters and capabilities as before the run, no block job), the destination
//! holds nothing of a failed run (no domain, no disk the service created), the result file
//! says the outcome and `recover --json` finds nothing left to recover.
//!
//! The tool reaches the source through the monitor the domain declares; a [`QmpDelayProxy`] is
//! put in that socket's place (QEMU's own socket renamed beside it), so a test can hold QEMU's
//! reply to one command and kill the caller while the tool waits for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use qemu_tls_migrate::libvirt::Libvirt;
use qemu_tls_migrate::vm::{DiskFormat, create_image};
use serde_json::Value;

use crate::fixture::{self, AgentCall, Cli, LibvirtPair, QmpDelayProxy, domain_name};
use crate::libvirt::{
    agent_args, libvirt_service, source_monitor_says, wait_block_job, wait_destination_clean,
    wait_ram_phase,
};

/// How long the proxy holds back the reply it was told to hold.
const HOLD: Duration = Duration::from_secs(5);
/// What `Script`'s output interpreters can take without the child blocking (a pipe's size).
const PIPE_CAPACITY: usize = 64 * 1024;

/// Where in the migration the caller's timeout lands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// While the disks are mirrored.
    DiskCopy,
    /// While RAM moves.
    Ram,
    /// After `--pause-after` paused the guest, RAM still moving.
    AfterPause,
    /// While the source waits at `pre-switchover` (its reply to `migrate-continue` held).
    PreSwitchover,
    /// Once the destination runs the guest, while the tool puts the source back (its reply to
    /// the first change after `migrate-continue` held) before `--destroy-source`.
    AfterCompletion,
}

impl Phase {
    /// The agent's options for this phase: `vm.migrate.speed` (0: unlimited), or a disk speed,
    /// slow enough for the phase to be caught; `vm.migrate.pauseafter`.
    fn args(self) -> &'static [&'static str] {
        match self {
            // 48 MiB of disks at 2 MiB/s: some 24 s.
            Phase::DiskCopy => &["--max-bandwidth", "0", "--disk-bandwidth", "2M"],
            // 32 MiB of the guest's RAM written at 4 MiB/s: some 8 s.
            Phase::Ram => &["--max-bandwidth", "4M"],
            Phase::AfterPause => &["--max-bandwidth", "4M", "--pause-after", "1000ms"],
            Phase::PreSwitchover | Phase::AfterCompletion => &["--max-bandwidth", "0"],
        }
    }

    /// Which of the tool's commands to the source gets its reply held back.
    fn held(self) -> Box<dyn Fn(&Value) -> bool + Send + Sync> {
        match self {
            Phase::PreSwitchover => Box::new(fixture::command_named("migrate-continue")),
            Phase::AfterCompletion => Box::new(first_change_after("migrate-continue")),
            _ => Box::new(|_: &Value| false),
        }
    }

    /// Waits until the migration is in this phase.
    async fn reached(self, pair: &LibvirtPair, domain: &Domain) {
        match self {
            Phase::DiskCopy => wait_block_job(pair, &domain.name).await,
            Phase::Ram => wait_ram_phase(pair, &domain.name).await,
            Phase::AfterPause => {
                wait_ram_phase(pair, &domain.name).await;
                let paused =
                    source_monitor_says(pair, &domain.name, r#"{"execute":"query-status"}"#, |v| {
                        v["return"]["status"] == "paused"
                    })
                    .await;
                assert!(paused, "--pause-after never paused the guest");
            }
            Phase::PreSwitchover | Phase::AfterCompletion => {
                tokio::time::timeout(fixture::EVENT_TIMEOUT, domain.proxy.holding())
                    .await
                    .expect("the run reaches the held command");
            }
        }
        if self == Phase::AfterCompletion {
            let state = pair.a.virsh_ok(&["domstate", &domain.name]).await;
            assert_eq!(
                state, "running",
                "the destination runs the guest before the kill"
            );
        }
    }
}

/// A matcher for [`QmpDelayProxy`]: the first command after `name` that is not a query.
fn first_change_after(name: &'static str) -> impl Fn(&Value) -> bool + Send + Sync + 'static {
    let (after, taken) = (AtomicBool::new(false), AtomicBool::new(false));
    move |cmd| {
        let command = cmd["execute"].as_str().unwrap_or_default();
        if command == name {
            after.store(true, Ordering::SeqCst);
            return false;
        }
        after.load(Ordering::SeqCst)
            && !command.starts_with("query-")
            && !taken.swap(true, Ordering::SeqCst)
    }
}

/// A CloudStack-shaped domain running on host b: our guest workload (32 MiB of its RAM
/// written), a qcow2 root disk `vda` (32 MiB of 0x5a) and a qcow2 data disk `vdb` (16 MiB of
/// 0xa5), a virtio NIC on a bridge, its declared monitor reached through a proxy.
struct Domain {
    name: String,
    /// Target, source image, and the new volume the rewritten destination XML names.
    disks: Vec<(&'static str, PathBuf, PathBuf)>,
    proxy: QmpDelayProxy,
}

impl Domain {
    async fn start(
        pair: &LibvirtPair,
        what: &str,
        held: Box<dyn Fn(&Value) -> bool + Send + Sync>,
    ) -> Domain {
        let name = domain_name(what);
        let (images, volumes) = (pair.b.images_dir(), pair.a.images_dir());
        let mut disks = Vec::new();
        for (target, mib, pattern) in [("vda", 32, 0x5a), ("vdb", 16, 0xa5)] {
            let image = images.join(format!("{name}-{target}.qcow2"));
            create_image(&image, DiskFormat::Qcow2, mib << 20).expect("qemu-img create");
            fixture::qemu_io(
                &image,
                DiskFormat::Qcow2,
                &format!("write -P {pattern} 0 {mib}M"),
            );
            // As the management server names a volume it made for the copy: <pool>/<new uuid>.
            let volume = volumes.join(format!("{name}-{target}-0f3c1a6e"));
            disks.push((target, image, volume));
        }
        let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
        let kernel = qemu_tls_migrate::vm::workload::workload_kernel(32, 100).expect("workload");
        let spec: Vec<(&str, &Path)> = disks.iter().map(|(t, p, _)| (*t, p.as_path())).collect();
        let xml = fixture::cloudstack_domain_xml_with(
            &name,
            &spec,
            &monitor,
            pair.bridge(),
            Some(&kernel),
        );
        let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
        std::fs::write(&xml_path, xml).expect("XML");
        pair.b
            .virsh_ok(&["define", xml_path.to_str().expect("UTF-8")])
            .await;
        pair.b.virsh_ok(&["start", &name]).await;
        // QEMU's socket moves aside (a listening socket keeps working under a new name); the
        // proxy takes its place, where the domain's XML says the monitor is.
        let real = monitor.with_extension("real.sock");
        std::fs::rename(&monitor, &real).expect("move the declared monitor aside");
        let proxy = QmpDelayProxy::start(&real, &monitor, held, HOLD).await;
        Domain { name, disks, proxy }
    }

    /// The agent's `--dest-xml`: the source's migratable XML, each disk on its new volume.
    fn dest_xml(&self, pair: &LibvirtPair) -> PathBuf {
        let mut xml = Libvirt::connect(&pair.b.uri())
            .and_then(|l| l.domain(&self.name))
            .and_then(|d| d.migratable_xml())
            .expect("migratable XML");
        for (target, _, volume) in &self.disks {
            xml = xml.with_disk_file(target, volume).expect("disk path");
        }
        let path = pair.b.dir.path().join(format!("{}-dest.xml", self.name));
        std::fs::write(&path, xml.as_str()).expect("write XML");
        path
    }
}

/// What the tool could leave on the source's QEMU, read through libvirt's own monitor.
#[derive(Debug, PartialEq)]
struct SourceQemu {
    parameters: Value,
    capabilities: Value,
    /// The ids under `/objects`.
    objects: Vec<String>,
    /// Every named block node.
    nodes: Vec<String>,
    block_jobs: Value,
}

impl SourceQemu {
    async fn read(pair: &LibvirtPair, name: &str) -> SourceQemu {
        let (uri, name) = (pair.b.uri(), name.to_string());
        tokio::task::spawn_blocking(move || {
            let domain = Libvirt::connect(&uri)
                .and_then(|l| l.domain(&name))
                .expect("source domain");
            let ask = |command: &str| -> Value {
                let reply = domain
                    .monitor_command(&format!(r#"{{"execute":"{command}"}}"#))
                    .expect("libvirt's monitor");
                let v: Value = serde_json::from_str(&reply).expect("JSON reply");
                v["return"].clone()
            };
            let names = |v: Value, key: &str| -> Vec<String> {
                let mut names: Vec<String> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e[key].as_str().map(str::to_string))
                    .collect();
                names.sort();
                names
            };
            let objects = domain
                .monitor_command(r#"{"execute":"qom-list","arguments":{"path":"/objects"}}"#)
                .expect("qom-list");
            let objects: Value = serde_json::from_str(&objects).expect("JSON reply");
            SourceQemu {
                parameters: ask("query-migrate-parameters"),
                capabilities: ask("query-migrate-capabilities"),
                objects: names(objects["return"].clone(), "name"),
                nodes: names(ask("query-named-block-nodes"), "node-name"),
                block_jobs: ask("query-block-jobs"),
            }
        })
        .await
        .expect("reader")
    }
}

/// One run of the agent's command line for `domain`, with its own jobs directory and result
/// file; `phase_args` added.
struct Run {
    _dir: tempfile::TempDir,
    run_dir: PathBuf,
    result: PathBuf,
    call: AgentCall,
    _service: fixture::Service,
    _lab: fixture::Lab,
}

impl Run {
    async fn start(pair: &LibvirtPair, domain: &Domain, phase_args: &[&str]) -> Run {
        let dest_xml = domain.dest_xml(pair);
        let (lab, service, pki_b) = libvirt_service(pair).await;
        let dir = tempfile::tempdir().expect("dir");
        let (run_dir, result) = (dir.path().join("jobs"), dir.path().join("result.json"));
        let mut args = agent_args(&domain.name, &service.addr, &pki_b, &dest_xml);
        // The README's mapping: vm.migrate.downtime, vm.migrate.wait, VIR_MIGRATE_COMPRESSED
        // (not VIR_MIGRATE_AUTO_CONVERGE: refused for a TCG guest, as these are); the answer
        // as the agent reads it.
        let result_arg = result.display().to_string();
        args.extend(
            [
                "--downtime-limit",
                "500",
                "--timeout",
                "120s",
                "--xbzrle",
                "--destroy-source",
                "-q",
                "--result-file",
                &result_arg,
            ]
            .iter()
            .chain(phase_args)
            .map(|s| s.to_string()),
        );
        let cli = Cli::new(&args)
            .in_host(&pair.b)
            .env("QTM_RUN_DIR", &run_dir);
        Run {
            _dir: dir,
            run_dir,
            result,
            call: AgentCall::start(cli),
            _service: service,
            _lab: lab,
        }
    }

    /// `qemu-tls-migrate ARGS` on host b against this run's jobs directory.
    async fn cli(&self, pair: &LibvirtPair, args: &[&str]) -> std::process::Output {
        Cli::new(args)
            .in_host(&pair.b)
            .env("QTM_RUN_DIR", &self.run_dir)
            .output()
            .await
    }
}

/// The CloudStack-shaped domain migrated the agent's way and the caller's timeout at `phase`;
/// checks one copy runs and nothing is left ([`assert_one_copy`]). Returns the result file.
async fn killed_at(phase: Phase, what: &str) -> Value {
    let t0 = Instant::now();
    let pair = LibvirtPair::shared();
    let domain = Domain::start(&pair, what, phase.held()).await;
    let before = SourceQemu::read(&pair, &domain.name).await;
    let mut run = Run::start(&pair, &domain, phase.args()).await;
    tokio::select! {
        () = phase.reached(&pair, &domain) => {}
        early = fixture::wait_result_file(&run.result) => {
            panic!("the run ended before {phase:?}: {early}")
        }
    }
    let tool = run.call.tool_pids();

    let output = run.call.time_out().await;
    let result = fixture::wait_result_file(&run.result).await;
    fixture::wait_gone(&tool).await;

    fixture::show(&format!("{phase:?}: result file"), &result);
    fixture::show(
        &format!("{phase:?}: commands to the source after migrate-continue"),
        &format!("{:?}", domain.proxy.commands_after("migrate-continue")),
    );
    assert_eq!(
        tool.len(),
        2,
        "the caller's process and the owner: {tool:?}"
    );
    assert!(
        output.len() < PIPE_CAPACITY,
        "{} bytes of output",
        output.len()
    );
    assert_one_copy(&pair, &domain, &before, &run, &result).await;
    fixture::show(&format!("{phase:?}: took"), &format!("{:?}", t0.elapsed()));
    result
}

/// Exactly one copy runs in libvirt's view, and the result (of job `domain`'s name) says
/// which: completed, the destination runs it and `--destroy-source` ended the source;
/// cancelled, the source runs with its QEMU as `before` and host a has neither the domain nor
/// its new volumes. Either way `recover --json` finds nothing to recover. Ends the copy.
async fn assert_one_copy(
    pair: &LibvirtPair,
    domain: &Domain,
    before: &SourceQemu,
    run: &Run,
    result: &Value,
) {
    assert_eq!(result["job"], domain.name.as_str(), "{result}");
    let on_a = pair.a.virsh(&["domstate", &domain.name]).await;
    let on_a = String::from_utf8_lossy(&on_a.stdout).trim().to_string();
    let on_b = pair.b.virsh_ok(&["domstate", &domain.name]).await;
    let completed = result["status"] == "completed";
    if completed {
        assert_eq!(on_a, "running", "the destination runs the guest: {result}");
        assert_eq!(
            on_b, "shut off",
            "--destroy-source ended the source: {result}"
        );
        assert_eq!(result["source_end"]["destroyed"], true, "{result}");
    } else {
        assert_eq!(result["status"], "cancelled", "{result}");
        assert_eq!(on_b, "running", "the source runs on: {result}");
        wait_destination_clean(pair, &domain.name, &domain.disks).await;
        let after = SourceQemu::read(pair, &domain.name).await;
        assert_eq!(&after, before, "the source QEMU as before the run");
    }
    assert_eq!(result["cleanup_errors"], Value::Null, "{result}");
    let recovered = run.cli(pair, &["recover", "--json"]).await;
    let recovered = fixture::stdout_json(&recovered);
    assert_eq!(recovered["vms"], serde_json::json!([]), "{recovered}");
    let host = if completed { &pair.a } else { &pair.b };
    host.virsh_ok(&["destroy", &domain.name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_caller_times_out_during_the_disk_copy_runs_on_the_source_untouched() {
    let result = killed_at(Phase::DiskCopy, "k-disks").await;

    assert_eq!(result["status"], "cancelled", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_caller_times_out_while_ram_moves_runs_on_the_source_untouched() {
    let result = killed_at(Phase::Ram, "k-ram").await;

    assert_eq!(result["status"], "cancelled", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_paused_by_pause_after_whose_caller_times_out_is_resumed_on_the_source() {
    let result = killed_at(Phase::AfterPause, "k-paused").await;

    assert_eq!(result["status"], "cancelled", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_caller_times_out_at_pre_switchover_ends_with_one_running_copy() {
    // Either outcome keeps one copy; which one is the owner's to decide.
    killed_at(Phase::PreSwitchover, "k-switch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_whose_caller_times_out_after_completion_runs_on_the_destination_alone() {
    let result = killed_at(Phase::AfterCompletion, "k-done").await;

    assert_eq!(result["status"], "completed", "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancel_by_the_domains_name_reaches_the_owner_after_the_callers_sigkill() {
    let pair = LibvirtPair::shared();
    let domain = Domain::start(&pair, "k-cancel", Phase::DiskCopy.held()).await;
    let before = SourceQemu::read(&pair, &domain.name).await;
    let mut run = Run::start(&pair, &domain, Phase::DiskCopy.args()).await;
    wait_block_job(&pair, &domain.name).await;
    let tool = run.call.tool_pids();
    // The process the agent started dies alone; its owner, which notices and rolls back, must
    // still answer the agent's cancel path by the domain's name.
    run.call.kill_caller().await;

    let cancel = run
        .cli(&pair, &["jobs", "cancel", &domain.name, "--json"])
        .await;
    let result = fixture::wait_result_file(&run.result).await;
    fixture::wait_gone(&tool).await;

    let answer = fixture::stdout_json(&cancel);
    fixture::show("jobs cancel after the caller's SIGKILL", &answer);
    assert_eq!(cancel.status.code(), Some(0), "{answer}");
    assert_eq!(answer["result"], "done", "{answer}");
    assert_eq!(result["status"], "cancelled", "{result}");
    assert_one_copy(&pair, &domain, &before, &run, &result).await;
}
