//! The command line as CloudStack's agent and a person use it: the JSON contract, exit codes,
//! and SIGINT cancelling a running migration with everything rolled back.

use std::path::Path;
use std::process::Output;

use nix::sys::signal::Signal;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::fixture::{self, Cli, DEST_HOST, Lab, Pair};

/// A lab, a started pair and the `migrate --json` arguments of a TLS migration between them.
async fn tls_pair_and_args() -> (Lab, Pair, Vec<String>) {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let args = pair.tls_args(&lab);
    (lab, pair, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_reports_a_completed_tls_migration_and_exits_0() {
    let (_lab, _pair, args) = tls_pair_and_args().await;

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["status"], "completed");
    assert_eq!(json["transport"], "tls");
    for field in ["bytes", "total_ms", "downtime_ms", "throughput_mbps"] {
        assert!(
            json["ram"][field].is_number(),
            "ram.{field} missing in {json}"
        );
    }
    assert!(json.get("error").is_none());
    assert!(json["timing"]["ram_ms"].as_u64() > Some(0), "{json}");
    assert!(json["timing"]["setup_ms"].is_number(), "{json}");
    assert_eq!(json["guest_pause"]["clock"], "one host", "{json}");
    assert!(json["guest_pause"]["ms"].is_number(), "{json}");
    assert!(json["tool"]["peak_rss_kib"].as_u64() > Some(0), "{json}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("{\"progress\"")),
        "no JSON progress lines: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_refuses_a_mixed_pair_with_exit_3() {
    let lab = Lab::new("Test CA");
    let unsecured = tempfile::tempdir().expect("empty dir");
    let src = lab.host("src", &["src-host"]);
    let pair = Pair::builder().start().await;
    let args = fixture::migrate_args(&pair, &src, unsecured.path());

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["status"], "failed");
    assert_eq!(json["error"]["kind"], "mixed-security");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("destination")
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_cancels_a_running_migration_and_rolls_back_with_exit_4() {
    let (_lab, pair, out, stderr) = migrate_and_signal(&[Signal::SIGINT]).await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(4), "{json}: {stderr}");
    assert_eq!(json["status"], "cancelled");
    assert_eq!(json["error"]["kind"], "cancelled");
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authz_restricts_the_destination_to_this_source_and_still_completes() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .disks(&[("disk0", qemu_tls_migrate::vm::DiskFormat::Qcow2, 8)])
        .start()
        .await;
    let mut args = pair.tls_args(&lab);
    args.extend(["--authz".to_string(), "--all-local-disks".to_string()]);

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["status"], "completed");
}

#[tokio::test]
async fn huge_migrate_timeouts_are_usage_errors_naming_the_flag_not_panics() {
    for flag in [
        "--timeout",
        "--pause-after",
        "--stall-timeout",
        "--qmp-timeout",
    ] {
        let out = Cli::new([
            "migrate",
            "--source-qmp",
            "/nonexistent/src.sock",
            "--dest-qmp",
            "/nonexistent/dst.sock",
            "--dest-host",
            DEST_HOST,
            flag,
            "18446744073709551615",
        ])
        .output()
        .await;

        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
        assert!(!stderr.contains("panicked"), "{flag}: {stderr}");
    }
}

#[tokio::test]
async fn a_huge_serve_qmp_timeout_is_a_usage_error_naming_the_flag() {
    let out = Cli::new([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--qmp-timeout",
        "18446744073709551615",
    ])
    .output()
    .await;

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--qmp-timeout"), "{stderr}");
}

#[tokio::test]
async fn an_empty_dest_host_is_refused_by_validation_with_exit_3_and_kind_usage() {
    let out = Cli::new([
        "migrate",
        "--json",
        "--source-qmp",
        "/nonexistent/src.sock",
        "--dest-qmp",
        "/nonexistent/dst.sock",
        "--dest-host",
        "",
    ])
    .output()
    .await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "usage", "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("destination host"),
        "{json}"
    );
}

/// Runs a throttled TLS migration through the CLI and, once bytes move, sends `signals`: the
/// first at once, each next one as soon as the tool said it is cancelling. Returns the pair,
/// the tool's output and everything it wrote on stderr after the first signal.
async fn migrate_and_signal(signals: &[Signal]) -> (Lab, Pair, Output, String) {
    let (lab, pair, mut args) = tls_pair_and_args().await;
    args.extend(["--max-bandwidth".to_string(), "8M".to_string()]);
    let mut child = Cli::new(&args).spawn();
    let pid = nix::unistd::Pid::from_raw(child.id().expect("pid") as i32);
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    assert!(
        fixture::ram_transferred_beyond(&mut stderr, 0).await,
        "the migration never started moving bytes"
    );

    let mut after = String::new();
    for (i, signal) in signals.iter().enumerate() {
        if i > 0 {
            let cancelling = tokio::time::timeout(fixture::EVENT_TIMEOUT, async {
                while let Ok(Some(line)) = stderr.next_line().await {
                    after.push_str(&line);
                    after.push('\n');
                    if line.contains("rolling back") {
                        return true;
                    }
                }
                false
            })
            .await;
            assert_eq!(
                cancelling.ok(),
                Some(true),
                "no cancelling message: {after}"
            );
        }
        nix::sys::signal::kill(pid, *signal).expect("kill");
    }
    let rest = tokio::spawn(async move {
        let mut text = String::new();
        while let Ok(Some(line)) = stderr.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let out = tokio::time::timeout(fixture::EVENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the tool exits after the signal")
        .expect("wait");
    after.push_str(&rest.await.expect("stderr reader"));
    (lab, pair, out, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_cancels_a_running_migration_and_rolls_back_with_exit_4() {
    let (_lab, pair, out, stderr) = migrate_and_signal(&[Signal::SIGHUP]).await;

    assert_eq!(out.status.code(), Some(4), "{:?}: {stderr}", out.status);
    let json = fixture::stdout_json(&out);
    assert_eq!(json["status"], "cancelled");
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_during_rollback_is_reported_and_the_rollback_finishes_with_exit_4() {
    let (_lab, pair, out, stderr) = migrate_and_signal(&[Signal::SIGINT, Signal::SIGINT]).await;

    assert_eq!(out.status.code(), Some(4), "{:?}: {stderr}", out.status);
    let json = fixture::stdout_json(&out);
    assert_eq!(json["status"], "cancelled");
    assert!(
        stderr.contains("rollback in progress, please wait"),
        "{stderr}"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_pki_dirs_are_resolved_against_the_current_directory_and_complete() {
    let lab = Lab::new("Test CA");
    lab.host("src", &["src-host"]);
    lab.host("dst", &[DEST_HOST]);
    let pair = Pair::builder().start().await;
    // Relative to the lab directory, which is not QEMU's current directory.
    let args = fixture::migrate_args(&pair, Path::new("src"), Path::new("./dst"));

    let out = Cli::new(&args).cwd(lab.dir.path()).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["status"], "completed");
    assert_eq!(json["transport"], "tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_quiet_writes_one_object_and_nothing_else_and_the_result_file_holds_it() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let result = pair.dir.path().join("result.json");
    let mut args = pair.tls_args(&lab);
    args.extend([
        "-q".to_string(),
        "--result-file".to_string(),
        result.display().to_string(),
    ]);

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).expect("result file")).expect("JSON");
    assert_eq!(saved, json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_auto_picks_channels_from_the_cpus_and_reports_them() {
    let (_lab, _pair, mut args) = tls_pair_and_args().await;
    args.extend(["--multifd".to_string(), "auto".to_string()]);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    let expected = qemu_tls_migrate::migration::auto_multifd(cpus, cpus);
    assert_eq!(
        json["multifd_channels"],
        serde_json::json!(expected),
        "{json}"
    );
}
