//! The safety rules, each against real QEMU (and the real service): one running copy of a VM
//! whatever the destination's last step does, no plaintext unless both ends allow it, no local
//! disk left behind, and nothing of the tool's left after a command QEMU carried out late.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use qemu_tls_migrate::migration::FinalStatus;
use qemu_tls_migrate::vm::DiskFormat;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::fixture::{self, Cli, Lab, Pair, QmpDelayProxy, Service, TwoHosts};

/// Longer than the control channel's heartbeat timeout (6 s).
const PAST_THE_HEARTBEAT: Duration = Duration::from_secs(9);

/// The service on host a of `hosts` (PKI directories `pkis`: host a's, host b's) serving the
/// sockets in `qmp_dir`, and a `migrate --to` command line of `pair` from host b naming
/// `socket` there.
async fn serve_through(
    hosts: &TwoHosts,
    (pki_a, pki_b): (&Path, &Path),
    pair: &Pair,
    qmp_dir: &Path,
    socket: &str,
) -> (Service, Vec<String>) {
    let service = Service::builder(pki_a, qmp_dir).on(hosts).start().await;
    let args = fixture::migrate_to_args(pair, &service.addr, pki_b, socket, &[]);
    (service, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_slow_to_resume_ends_with_one_running_copy_locally() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let proxy = QmpDelayProxy::start(
        pair.dest.qmp_path(),
        &pair.dir.path().join("slow-dest.sock"),
        fixture::command_named("cont"),
        Duration::from_secs(7),
    )
    .await;
    let mut options = pair.tls_options(&lab);
    options.dest.qmp = proxy.path.clone();
    // Shorter than the late answer: the finishing steps must not be held to it.
    options.qmp_timeout = Duration::from_secs(3);

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_started_without_dash_s_runs_only_when_the_tool_says() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .tweak(|c| c.incoming_autostart = true)
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.dest_paused = true;
    let watcher = fixture::monitor(&pair.dest).await;
    let mut events = watcher.subscribe();

    let report = fixture::migrate(&options).await;

    let resumed: Vec<String> = std::iter::from_fn(|| events.try_next())
        .map(|e| e.event)
        .filter(|e| e == "RESUME")
        .collect();
    drop(watcher);
    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert!(
        resumed.is_empty(),
        "the destination ran on its own: {resumed:?}"
    );
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_slow_to_resume_past_the_heartbeat_ends_with_one_running_copy_remotely() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let _proxy = QmpDelayProxy::start(
        pair.dest.qmp_path(),
        &qmp_dir.path().join("slow.sock"),
        fixture::command_named("cont"),
        PAST_THE_HEARTBEAT,
    )
    .await;
    let (_service, args) =
        serve_through(&hosts, (&pki_a, &pki_b), &pair, qmp_dir.path(), "slow.sock").await;

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["guest_pause"]["clock"], "two hosts", "{json}");
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_cut_after_the_source_completed_leaves_it_paused_and_reports_the_risk() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let mut pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    // The destination's last step answers late (`cont` and everything after it, so the
    // `query-status` the service sends behind `cont` cannot settle it early), and the cut
    // lands while `finish` is under way.
    let from_cont = std::sync::atomic::AtomicBool::new(false);
    let proxy = QmpDelayProxy::start(
        pair.dest.qmp_path(),
        &qmp_dir.path().join("slow.sock"),
        move |cmd: &serde_json::Value| {
            if cmd["execute"] == "cont" {
                from_cont.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            from_cont.load(std::sync::atomic::Ordering::SeqCst)
        },
        Duration::from_secs(15),
    )
    .await;
    let (_service, args) =
        serve_through(&hosts, (&pki_a, &pki_b), &pair, qmp_dir.path(), "slow.sock").await;
    let child = Cli::new(&args).in_netns(&hosts.b).spawn();

    fixture::wait_migration_completed(&pair.source).await;
    tokio::time::timeout(fixture::EVENT_TIMEOUT, proxy.holding())
        .await
        .expect("the service resumes the destination");
    hosts.link(false);
    let out = tokio::time::timeout(fixture::EVENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the source gives up")
        .expect("wait");

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["error"]["kind"], "split-brain-risk", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("host"), "names where to look: {message}");
    assert_eq!(
        fixture::status(&pair.source).await,
        "postmigrate",
        "the source must stay paused"
    );
    // The service finishes what it was asked to: the one running copy is the destination.
    let dest_state = tokio::time::timeout(fixture::EVENT_TIMEOUT, async {
        loop {
            let s = fixture::status(&pair.dest).await;
            if s != "inmigrate" && s != "paused" {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the destination settles");
    assert_eq!(dest_state, "running");
    assert_ne!(fixture::status(&pair.source).await, "running");
    pair.quit_both().await;
}

/// How long the destination QEMU is frozen (SIGSTOP) right after `cont` reached it: past
/// everything the tool waits for at the end (60 s for `cont`, then about 20 s of asking again).
const FROZEN_FOR: Duration = Duration::from_secs(90);

/// A proxy in front of `pair`'s destination that loses every reply to `cont`; with `freeze`,
/// it also SIGSTOPs the destination QEMU just before passing `cont` on, and returns when it
/// did so through the returned cell.
async fn lossy_cont_proxy(
    pair: &Pair,
    socket: &std::path::Path,
    freeze: bool,
) -> (QmpDelayProxy, Arc<Mutex<Option<Instant>>>) {
    let frozen_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (cell, pid) = (frozen_at.clone(), pair.dest.pid().expect("destination pid"));
    let proxy = QmpDelayProxy::start_with(
        pair.dest.qmp_path(),
        socket,
        fixture::command_named("cont"),
        fixture::FOREVER,
        move || {
            if freeze {
                fixture::signal(pid, Signal::SIGSTOP);
                *cell.lock().expect("lock") = Some(Instant::now());
            }
        },
    )
    .await;
    (proxy, frozen_at)
}

/// Waits out the rest of [`FROZEN_FOR`] since `frozen_at`, then lets the QEMU `pid` run again.
async fn thaw_after_frozen_for(frozen_at: &Mutex<Option<Instant>>, pid: u32) -> Duration {
    let at = frozen_at
        .lock()
        .expect("lock")
        .expect("the destination was frozen");
    let given_up_after = at.elapsed();
    // The scenario's length, not a wait for an event: the QEMU stays frozen this long.
    tokio::time::sleep(FROZEN_FOR.saturating_sub(at.elapsed())).await;
    fixture::signal(pid, Signal::SIGCONT);
    given_up_after
}

/// What must hold once the tool gave up on `pair`'s destination (QEMU `dest_pid`), frozen
/// right after `cont` reached it through `proxy`, `given_up_after` it was frozen, the source's
/// status then being `source_status`: the tool did not wait for the thaw, the source stayed
/// paused, nothing that could stop or end the guest there followed `cont`, and that QEMU lives
/// on as it was.
async fn assert_frozen_destination_left_alone(
    pair: &Pair,
    dest_pid: u32,
    proxy: &QmpDelayProxy,
    source_status: &str,
    given_up_after: Duration,
) {
    assert!(
        given_up_after < FROZEN_FOR,
        "the tool waited for the frozen QEMU"
    );
    assert_eq!(source_status, "postmigrate", "the source must stay paused");
    let after = proxy.commands_after("cont");
    assert!(
        after.iter().all(|c| c == "query-status"),
        "after cont the tool sent {after:?}"
    );
    assert!(
        fixture::process_alive(dest_pid),
        "the destination QEMU was killed"
    );
    let dest_status = fixture::status(&pair.dest).await;
    assert!(
        ["running", "paused"].contains(&dest_status.as_str()),
        "{dest_status}"
    );
    assert!(
        !fixture::tool_objects(&pair.dest).await.is_empty(),
        "the destination was left as it was"
    );
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_cont_ends_with_the_destination_running_locally() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let (proxy, _) = lossy_cont_proxy(&pair, &pair.dir.path().join("lossy.sock"), false).await;
    let mut options = pair.tls_options(&lab);
    options.dest.qmp = proxy.path.clone();

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_cont_ends_with_the_destination_running_remotely() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let _proxy = lossy_cont_proxy(&pair, &qmp_dir.path().join("lossy.sock"), false).await;
    let (_service, args) = serve_through(
        &hosts,
        (&pki_a, &pki_b),
        &pair,
        qmp_dir.path(),
        "lossy.sock",
    )
    .await;

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_frozen_right_after_cont_is_left_alone_and_the_source_stays_paused() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let dest_pid = pair.dest.pid().expect("destination pid");
    let (proxy, frozen_at) =
        lossy_cont_proxy(&pair, &pair.dir.path().join("frozen.sock"), true).await;
    let mut options = pair.tls_options(&lab);
    options.dest.qmp = proxy.path.clone();

    let report = fixture::migrate(&options).await;
    let source_status = fixture::status(&pair.source).await;
    let given_up_after = thaw_after_frozen_for(&frozen_at, dest_pid).await;

    fixture::show("gave up after", &format!("{given_up_after:?}"));
    assert_eq!(report.status, FinalStatus::Failed);
    assert_eq!(fixture::error_kind(&report), Some("split-brain-risk"));
    assert_frozen_destination_left_alone(&pair, dest_pid, &proxy, &source_status, given_up_after)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_frozen_right_after_cont_is_left_alone_by_the_service() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let dest_pid = pair.dest.pid().expect("destination pid");
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let (proxy, frozen_at) =
        lossy_cont_proxy(&pair, &qmp_dir.path().join("frozen.sock"), true).await;
    let (_service, args) = serve_through(
        &hosts,
        (&pki_a, &pki_b),
        &pair,
        qmp_dir.path(),
        "frozen.sock",
    )
    .await;

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;
    let source_status = fixture::status(&pair.source).await;
    let given_up_after = thaw_after_frozen_for(&frozen_at, dest_pid).await;

    let json = fixture::stdout_json(&out);
    fixture::show("gave up after", &format!("{given_up_after:?}"));
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["error"]["kind"], "split-brain-risk", "{json}");
    assert_frozen_destination_left_alone(&pair, dest_pid, &proxy, &source_status, given_up_after)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_readable_by_all_are_a_broken_secured_host_refused_with_exit_3() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::new("Test CA");
    let (src, dst) = (
        lab.host("src", &["src-host"]),
        lab.host("dst", &[fixture::DEST_HOST]),
    );
    for key in [src.join("client-key.pem"), dst.join("server-key.pem")] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let pair = Pair::builder().start().await;
    let (src_qmp, dst_qmp) = (
        pair.source.qmp_path().display().to_string(),
        pair.dest.qmp_path().display().to_string(),
    );
    let (src_dir, dst_dir) = (src.display().to_string(), dst.display().to_string());

    let out = Cli::new([
        "migrate",
        "--json",
        "--source-qmp",
        &src_qmp,
        "--dest-qmp",
        &dst_qmp,
        "--dest-host",
        fixture::DEST_HOST,
        "--source-pki-dir",
        &src_dir,
        "--dest-pki-dir",
        &dst_dir,
    ])
    .output()
    .await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "pki-broken", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("client-key.pem"), "{message}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_refuses_a_plain_migration_unless_started_with_allow_plain() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let service = Service::builder(&pki_a, &qmp_dir).on(&hosts).start().await;
    let args = fixture::migrate_to_args(
        &pair,
        &service.addr,
        &pki_b,
        "qmp.sock",
        &["--transport", "tcp"],
    );

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "plain-refused", "{json}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restricted_service_authorises_the_presented_certificate_and_keeps_its_own_priority() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let service = Service::builder(&pki_a, &qmp_dir)
        .on(&hosts)
        .allow(&["HOST-B"])
        .start()
        .await;
    // No --authz: the service restricts the migration stream by itself. A cipher priority
    // from the source must not become the destination's.
    let args = fixture::migrate_to_args(
        &pair,
        &service.addr,
        &pki_b,
        "qmp.sock",
        &["--max-bandwidth", "16M", "--tls-priority", "NORMAL"],
    );
    let mut child = Cli::new(&args).in_netns(&hosts.b).spawn();

    let (priority, params) =
        fixture::wait_migration_object(&pair.dest, "tls-creds", "priority").await;
    let authz = params["tls-authz"].clone();
    let out = tokio::time::timeout(fixture::EVENT_TIMEOUT, async {
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        while let Ok(Some(_)) = stderr.next_line().await {}
        child.wait_with_output().await
    })
    .await
    .expect("the migration ends")
    .expect("wait");

    assert_eq!(out.status.code(), Some(0));
    assert!(
        authz.as_str().is_some_and(|a| a.starts_with("qtm-authz")),
        "tls-authz on the destination: {authz}"
    );
    assert!(
        priority.is_string(),
        "the credentials' priority: {priority}"
    );
    assert_ne!(
        priority,
        Value::from("NORMAL"),
        "the source chose the cipher floor"
    );
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_disk_neither_copied_nor_declared_shared_is_refused() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 8)])
        .start()
        .await;
    let options = pair.tls_options(&lab);

    let refused = fixture::migrate(&options).await;

    assert_eq!(fixture::error_kind(&refused), Some("disk-left-behind"));
    assert!(refused.refused, "nothing may be changed");
    assert!(fixture::error_message(&refused).contains("disk0"));
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");

    let mut shared = options.clone();
    shared.shared_disks = vec!["disk0".into()];
    let report = fixture::migrate(&shared).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_node_added_after_the_timeout_is_still_removed() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 8)])
        .start()
        .await;
    let proxy = QmpDelayProxy::start(
        pair.source.qmp_path(),
        &pair.dir.path().join("slow-source.sock"),
        fixture::command_named("blockdev-add"),
        Duration::from_secs(6),
    )
    .await;
    let mut options = pair.tls_options(&lab);
    options.source.qmp = proxy.path.clone();
    options.qmp_timeout = Duration::from_secs(3);
    options.disks = qemu_tls_migrate::migration::DiskSelection::AllLocal;

    let report = fixture::migrate(&options).await;

    fixture::assert_error_kind(&report, "timeout");
    assert_eq!(
        fixture::tool_block_leftovers(&pair.source).await,
        (Vec::new(), Vec::new())
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_added_after_the_timeout_are_still_removed() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    // The source's credentials (created by the preflight, kept for the migration) answer late.
    let proxy = QmpDelayProxy::start(
        pair.source.qmp_path(),
        &pair.dir.path().join("slow-source.sock"),
        |cmd: &Value| {
            cmd["execute"] == "object-add"
                && cmd["arguments"]["id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("qtm-tls-"))
        },
        Duration::from_secs(6),
    )
    .await;
    let mut options = pair.tls_options(&lab);
    options.source.qmp = proxy.path.clone();
    options.qmp_timeout = Duration::from_secs(3);

    let report = fixture::migrate(&options).await;

    fixture::assert_error_kind(&report, "timeout");
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_cannot_hold_up_the_service_or_its_shutdown() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let mut service = Service::builder(&pki_a, qmp_dir.path())
        .on(&hosts)
        .start()
        .await;
    let mut greedy = fixture::tls_client(&hosts, &service.addr, &pki_b).await;
    // Pings, each answered with a pong this client never reads, until both buffers are full.
    let ping =
        qemu_tls_migrate::peer::encode(&qemu_tls_migrate::peer::Message::Ping).expect("encode");
    let mut frames = Vec::new();
    for _ in 0..1_000_000 {
        frames.extend_from_slice(&(ping.len() as u32).to_be_bytes());
        frames.extend_from_slice(&ping);
    }
    let (blocked_tx, blocked_rx) = tokio::sync::oneshot::channel();
    let flood = tokio::spawn(async move {
        for chunk in frames.chunks(64 * 1024) {
            // No progress for a second: the service stopped reading.
            match tokio::time::timeout(Duration::from_secs(1), greedy.write_all(chunk)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = blocked_tx.send(());
        // Hold the connection open, never reading.
        std::future::pending::<()>().await;
        drop(greedy);
    });
    tokio::time::timeout(fixture::EVENT_TIMEOUT, blocked_rx)
        .await
        .expect("the service's replies fill the buffers")
        .expect("flood task");

    let code = service.stop().await;
    flood.abort();

    assert_eq!(
        code,
        Some(0),
        "shutdown was held up by a peer that never reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_at_its_session_limit_closes_new_connections_until_one_ends() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let service = Service::builder(&pki_a, qmp_dir.path())
        .on(&hosts)
        .args(&["--max-sessions", "1"])
        .start()
        .await;
    let mut first = fixture::tls_client(&hosts, &service.addr, &pki_b).await;
    let hello = qemu_tls_migrate::peer::encode(&qemu_tls_migrate::peer::Message::Hello {
        client: "first".into(),
    })
    .expect("encode");
    first
        .write_all(&(hello.len() as u32).to_be_bytes())
        .await
        .expect("send");
    first.write_all(&hello).await.expect("send");
    let mut len = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut first, &mut len)
        .await
        .expect("the first source is welcomed");

    let second = fixture::try_tls_client(&hosts, &service.addr, &pki_b).await;

    assert!(
        second.is_err(),
        "a second session was let in over the limit"
    );
    drop(first);
    let third = tokio::time::timeout(fixture::EVENT_TIMEOUT, async {
        loop {
            if fixture::try_tls_client(&hosts, &service.addr, &pki_b)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(third.is_ok(), "the slot was never freed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_from_one_address_does_not_stop_a_migration_from_another() {
    use std::sync::atomic::Ordering::Relaxed;
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let service = Service::builder(&pki_a, &qmp_dir).on(&hosts).start().await;
    let mut handshakes = Vec::new();
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let tls = fixture::tls_client(&hosts, &service.addr, &pki_b).await;
        handshakes.push(started.elapsed());
        // The service's side of the handshake is over (its slot given back) once it answers.
        let mut channel = qemu_tls_migrate::peer::Channel::new(tls);
        let hello = qemu_tls_migrate::peer::Message::Hello {
            client: "measure".into(),
        };
        channel.send(&hello).await.expect("hello");
        channel.recv(fixture::EVENT_TIMEOUT).await.expect("welcome");
    }
    handshakes.sort();
    // From the service's own address: another address than the source's (host b).
    let flood = fixture::IdleFlood::start(&hosts.a, &service.addr, 16);
    flood.wait_opened(16).await;
    let args = fixture::migrate_to_args(&pair, &service.addr, &pki_b, "qmp.sock", &[]);

    let started = std::time::Instant::now();
    let out = Cli::new(&args).in_netns(&hosts.b).output().await;
    let took = started.elapsed();

    let json = fixture::stdout_json(&out);
    let counts = flood.counts();
    fixture::note(format_args!(
        "TLS handshake with the service: median {:?} of 20 (min {:?}, max {:?}); migration beside \
         a flood of 16 idle connections from one address: {took:?}; flood: {} opened, {} refused \
         as busy, {} closed at the handshake deadline",
        handshakes[10],
        handshakes[0],
        handshakes[19],
        counts.opened.load(Relaxed),
        counts.busy.load(Relaxed),
        counts.closed_silently.load(Relaxed),
    ));
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(fixture::status(&pair.dest).await, "running");
    assert_eq!(
        counts.other.load(Relaxed),
        0,
        "the service sent the flood more than an alert"
    );
    assert!(
        handshakes[10] < Duration::from_secs(1),
        "a real handshake takes {:?}, near the service's deadline",
        handshakes[10]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_over_the_services_handshake_limit_is_told_the_service_is_busy() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let service = Service::builder(&pki_a, &qmp_dir).on(&hosts).start().await;
    // From the source's own address: it holds every handshake slot that address gets.
    let flood = fixture::IdleFlood::start(&hosts.b, &service.addr, 4);
    flood.wait_opened(4).await;
    let args = fixture::migrate_to_args(&pair, &service.addr, &pki_b, "qmp.sock", &[]);

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "busy", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("busy") && message.contains("limit"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
    drop(flood);
}
