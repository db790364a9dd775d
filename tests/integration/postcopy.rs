//! Post-copy on QEMU 10.0 (the first series this tool offers it on that the suite has): a
//! busy guest that pre-copy cannot finish under a low bandwidth cap completes once switched to
//! post-copy over TLS, with its RAM the same page for page; a link cut during post-copy is
//! recovered, or reported as it is when it stays cut past the recovery deadline. Skipped,
//! saying so, where this checkout has no QEMU 10.0.

use std::time::Duration;

use qemu_tls_migrate::migration::recover::{self, RecoveryOutcome};
use qemu_tls_migrate::migration::{FinalStatus, MigrationOptions, TimeoutAction};
use qemu_tls_migrate::vm::workload::workload_kernel;

use crate::fixture::{self, Lab, Pair, pass_beyond};

/// A pair on QEMU 10.0 (both ends) whose TCG guest rewrites 64 MiB at 20000 pages/s (about
/// 78 MiB/s): against a 16 MiB/s cap pre-copy never converges. TCG tracks every write, so
/// both sides' RAM can be compared afterwards.
async fn busy_pair_10_0(test: &str) -> Option<Pair> {
    let qemu = fixture::qemu_10_0_or_skip(test)?;
    let kernel = workload_kernel(64, 20_000).expect("workload");
    let pair = Pair::builder()
        .qemu(qemu.clone(), qemu)
        .tweak(|c| {
            c.kernel = Some(kernel);
            c.accel = Some(qemu_tls_migrate::vm::Accel::Tcg);
            c.ram_dir = Some("/dev/shm".into());
        })
        .start()
        .await;
    pass_beyond(pair.source.serial_path(), 0).await;
    Some(pair)
}

/// The post-copy cap of the tests that act while post-copy runs (`--postcopy-bandwidth`):
/// the rest of the 64 MiB then takes seconds to move, not the few milliseconds it can take at
/// no limit, which a test waiting for `postcopy-active` may miss.
const POSTCOPY_CAP: u64 = 16 << 20;

/// TLS options with the link capped at 16 MiB/s and the destination left paused (so its RAM
/// can be compared with the source's once both stand still).
fn capped(pair: &Pair, lab: &Lab) -> MigrationOptions {
    let mut o = pair.tls_options(lab);
    o.max_bandwidth = 16 << 20;
    o.dest_paused = true;
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_completes_with_postcopy_over_tls_on_10_0_with_its_ram_intact() {
    let Some(pair) = busy_pair_10_0("postcopy::a_busy_guest_completes").await else {
        return;
    };
    let lab = Lab::new("Test CA");
    let mut o = capped(&pair, &lab);
    o.convergence.postcopy = true;

    let report = fixture::migrate(&o).await;

    fixture::show(
        "postcopy",
        &serde_json::to_string(&report.convergence).unwrap_or_default(),
    );
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert!(report.convergence.postcopy_at_ms.is_some(), "{report:?}");
    assert!(
        report.warnings.iter().any(|w| w.contains("a lost host")),
        "{:?}",
        report.warnings
    );
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    fixture::assert_ram_identical(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_postcopy_the_guest_runs_on_the_destination_and_never_again_on_the_source() {
    let Some(pair) = busy_pair_10_0("postcopy::after_postcopy_the_guest_runs").await else {
        return;
    };
    let lab = Lab::new("Test CA");
    let mut o = capped(&pair, &lab);
    o.dest_paused = false;
    o.convergence.postcopy = true;

    let before = pass_beyond(pair.source.serial_path(), 0).await.passes;
    let report = fixture::migrate(&o).await;

    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert!(report.convergence.postcopy_at_ms.is_some(), "{report:?}");
    assert_eq!(fixture::status(&pair.dest).await, "running");
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    // The workload goes on counting its passes there, from where the source left it.
    pass_beyond(pair.dest.serial_path(), before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_during_postcopy_is_noted_and_the_migration_finished() {
    let Some(pair) = busy_pair_10_0("postcopy::a_cancellation_during_postcopy").await else {
        return;
    };
    let lab = Lab::new("Test CA");
    let mut o = capped(&pair, &lab);
    o.convergence.postcopy = true;
    // Post-copy capped too, so that it is still under way when the tool next looks: at no
    // limit it may move the rest in less time than that.
    o.convergence.postcopy_bandwidth = Some(POSTCOPY_CAP);
    let cancel = tokio_util::sync::CancellationToken::new();
    let cancel_in_postcopy = async {
        fixture::wait_migration_status(&pair.source, "postcopy-active").await;
        cancel.cancel();
        fixture::migrate_parameters(&pair.source).await["max-postcopy-bandwidth"].clone()
    };

    let (report, cap) = tokio::join!(
        fixture::migrate_observed(&o, |_| {}, &cancel),
        cancel_in_postcopy
    );

    assert_eq!(cap, POSTCOPY_CAP, "max-postcopy-bandwidth during post-copy");
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("cannot be cancelled")),
        "{:?}",
        report.warnings
    );
    fixture::assert_ram_identical(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_action_postcopy_switches_at_the_deadline_and_completes_on_10_0() {
    let Some(pair) = busy_pair_10_0("postcopy::timeout_action_postcopy").await else {
        return;
    };
    let lab = Lab::new("Test CA");
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(3));
    o.convergence.timeout_action = TimeoutAction::Postcopy;

    let report = fixture::migrate(&o).await;

    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert_eq!(
        report.convergence.timeout_action,
        Some(TimeoutAction::Postcopy)
    );
    fixture::assert_ram_identical(&pair).await;
}

/// A [`busy_pair_10_0`] on two hosts (network namespaces), with options that migrate over
/// the link between them, switch to post-copy after the first pass, pause a post-copy that
/// stalls for 2 s (as a cut link that resets nothing does) and retry its recovery for
/// `recover`.
async fn busy_pair_on_two_hosts(
    test: &str,
    hosts: &fixture::TwoHosts,
    lab: &Lab,
    recover: Duration,
) -> Option<(Pair, MigrationOptions)> {
    let qemu = fixture::qemu_10_0_or_skip(test)?;
    let kernel = workload_kernel(64, 20_000).expect("workload");
    let pair = Pair::builder()
        .on(hosts)
        .qemu(qemu.clone(), qemu)
        .tweak(|c| {
            c.kernel = Some(kernel);
            c.accel = Some(qemu_tls_migrate::vm::Accel::Tcg);
            c.ram_dir = Some("/dev/shm".into());
        })
        .start()
        .await;
    pass_beyond(pair.source.serial_path(), 0).await;
    let mut o = capped(&pair, lab);
    o.dest_address = Some(hosts.a_addr.clone());
    o.convergence.postcopy = true;
    o.convergence.postcopy_recover_timeout = Some(recover);
    o.convergence.postcopy_bandwidth = Some(POSTCOPY_CAP);
    o.stall_timeout = Duration::from_secs(2);
    Some((pair, o))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_during_postcopy_and_restored_in_time_is_recovered_with_ram_intact() {
    let (hosts, lab) = (fixture::TwoHosts::create(), Lab::new("Test CA"));
    let Some((pair, o)) = busy_pair_on_two_hosts(
        "postcopy::a_link_cut_restored",
        &hosts,
        &lab,
        Duration::from_secs(60),
    )
    .await
    else {
        return;
    };
    let cut_and_restore = async {
        fixture::wait_migration_status(&pair.source, "postcopy-active").await;
        hosts.link(false);
        fixture::wait_migration_status(&pair.source, "postcopy-paused").await;
        hosts.link(true);
    };

    let (report, ()) = tokio::join!(fixture::migrate(&o), cut_and_restore);

    fixture::show(
        "recovered",
        &serde_json::to_string(&report.convergence).unwrap_or_default(),
    );
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    let recoveries = &report.convergence.postcopy_recoveries;
    assert!(
        !recoveries.is_empty() && recoveries.iter().all(|r| r.recovered_after_ms.is_some()),
        "{recoveries:?}"
    );
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    fixture::assert_ram_identical(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_past_the_recovery_deadline_reports_both_sides_paused_and_resumes_neither() {
    let (hosts, lab) = (fixture::TwoHosts::create(), Lab::new("Test CA"));
    let Some((pair, o)) = busy_pair_on_two_hosts(
        "postcopy::a_link_cut_past_the_deadline",
        &hosts,
        &lab,
        Duration::from_secs(3),
    )
    .await
    else {
        return;
    };
    let cut = async {
        fixture::wait_migration_status(&pair.source, "postcopy-active").await;
        hosts.link(false);
    };

    let (report, ()) = tokio::join!(fixture::migrate(&o), cut);

    assert_eq!(report.status, FinalStatus::Failed, "{report:?}");
    fixture::assert_error_kind(&report, "split-brain-risk");
    let message = fixture::error_message(&report);
    assert!(
        message.contains("could not be recovered") && message.contains("only the destination"),
        "{message}"
    );
    let recoveries = &report.convergence.postcopy_recoveries;
    assert!(
        recoveries
            .last()
            .is_some_and(|r| r.recovered_after_ms.is_none()),
        "{recoveries:?}"
    );
    // Neither side runs the guest: the source never resumes after post-copy began, and both
    // wait, paused, for a recovery.
    fixture::wait_migration_status(&pair.source, "postcopy-paused").await;
    fixture::wait_migration_status(&pair.dest, "postcopy-paused").await;
    assert_ne!(fixture::status(&pair.source).await, "running");
    assert_ne!(fixture::status(&pair.dest).await, "running");
    // The journal stays, and a recovery of the VM touches neither side.
    let recovery = recover::recover_vm(pair.source.qmp_path(), Duration::from_secs(5))
        .await
        .expect("recover");
    assert_eq!(
        recovery.outcome,
        RecoveryOutcome::SplitBrainRisk,
        "{}",
        recovery.describe()
    );
    assert!(
        recovery.describe().contains("migrate-recover"),
        "{}",
        recovery.describe()
    );
    fixture::wait_migration_status(&pair.source, "postcopy-paused").await;
    fixture::wait_migration_status(&pair.dest, "postcopy-paused").await;
}

#[tokio::test]
async fn the_cli_refuses_postcopy_on_7_2_with_exit_3_naming_the_issue_and_changes_nothing() {
    let lab = Lab::new("Test CA");
    let qemu = fixture::qemu_7_2();
    let pair = Pair::builder().qemu(qemu.clone(), qemu).start().await;
    let mut args = pair.tls_args(&lab);
    args.push("--postcopy".into());

    let out = fixture::Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["status"], "failed", "{json}");
    let text = json.to_string();
    assert!(text.contains("#1937") && text.contains("9.1"), "{json}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}

#[tokio::test]
async fn postcopy_with_multifd_channels_is_refused_on_10_0_before_anything_changes() {
    let Some(qemu) = fixture::qemu_10_0_or_skip("postcopy::postcopy_with_multifd") else {
        return;
    };
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .qemu(qemu.clone(), qemu)
        .tweak(|c| c.ram_dir = Some("/dev/shm".into()))
        .start()
        .await;
    let mut o = pair.tls_options(&lab);
    o.convergence.postcopy = true;
    o.multifd = qemu_tls_migrate::migration::Multifd::Channels(2);

    let report = fixture::migrate(&o).await;

    assert!(report.refused, "{report:?}");
    assert!(
        fixture::error_message(&report).contains("--multifd 2"),
        "{report:?}"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test]
async fn a_destination_whose_ram_cannot_take_postcopy_is_refused_before_anything_changes() {
    let Some(qemu) = fixture::qemu_10_0_or_skip("postcopy::a_destination_whose_ram") else {
        return;
    };
    let lab = Lab::new("Test CA");
    // The fixture's RAM file on the test's disk, not tmpfs: QEMU refuses postcopy-ram there.
    let pair = Pair::builder().qemu(qemu.clone(), qemu).start().await;
    let mut o = pair.tls_options(&lab);
    o.convergence.postcopy = true;

    let report = fixture::migrate(&o).await;

    assert!(report.refused, "{report:?}");
    let message = fixture::error_message(&report);
    assert!(
        message.contains("cannot take it") && message.contains("TMPFS"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}
