//! Convergence options against real QEMU and our guest workload: a guest that dirties memory
//! faster than the capped link moves it does not finish on its own, and finishes with help.

use std::time::Duration;

use qemu_tls_migrate::migration::{
    Compression, FinalStatus, ForecastMade, ForecastWhen, MigrationOptions, OnNoGo, Report,
    Throttle, TimeoutAction, XbzrleCache,
};
use qemu_tls_migrate::vm::workload::workload_kernel;

use crate::fixture::{self, Cli, GuestRam, Lab, Pair, pass_beyond};

/// A pair whose guest dirties `wss_mib` MiB at `pages_per_sec`, running its workload.
async fn dirtying_pair(wss_mib: u32, pages_per_sec: u32) -> Pair {
    dirtying_pair_under(wss_mib, pages_per_sec, None).await
}

/// [`dirtying_pair`] under this accelerator (`None`: the fixture's probe).
async fn dirtying_pair_under(
    wss_mib: u32,
    pages_per_sec: u32,
    accel: Option<qemu_tls_migrate::vm::Accel>,
) -> Pair {
    let kernel = workload_kernel(wss_mib, pages_per_sec).expect("workload");
    let pair = Pair::builder()
        .tweak(|c| {
            c.kernel = Some(kernel);
            if accel.is_some() {
                c.accel = accel;
            }
        })
        .start()
        .await;
    pass_beyond(pair.source.serial_path(), 0).await;
    pair
}

/// 20000 pages/s over 64 MiB (about 78 MiB/s) against a 16 MiB/s link: never converges.
async fn busy_pair() -> Pair {
    dirtying_pair(64, 20_000).await
}

/// [`busy_pair`] under TCG, which tracks every guest write, so the RAM of the two sides can be
/// compared afterwards (see `tls_migration_completes_and_guest_ram_is_identical`).
async fn busy_tcg_pair() -> Pair {
    dirtying_pair_under(64, 20_000, Some(qemu_tls_migrate::vm::Accel::Tcg)).await
}

/// TLS options with the link capped at 16 MiB/s.
fn capped(pair: &Pair, lab: &Lab) -> MigrationOptions {
    let mut o = pair.tls_options(lab);
    o.max_bandwidth = 16 << 20;
    o
}

fn show(what: &str, r: &Report) {
    fixture::show(
        what,
        &format!(
            "{:?} ram {} bytes ({} on multifd) in {} ms, downtime {} ms, pause {:?}, convergence {}, error {:?}",
            r.status,
            r.ram.bytes,
            r.ram.multifd_bytes,
            r.ram.total_ms,
            r.ram.downtime_ms,
            r.guest_pause.as_ref().map(|p| p.ms),
            serde_json::to_string(&r.convergence).unwrap_or_default(),
            r.error.as_ref().map(|e| e.to_string())
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_guest_times_out_without_help_and_runs_on_at_the_source() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(6));

    let report = fixture::migrate(&o).await;

    show("no help", &report);
    assert_eq!(report.status, FinalStatus::Failed);
    assert_eq!(fixture::error_kind(&report), Some("timeout"));
    assert_eq!(fixture::status(&pair.source).await, "running");
}

/// The default judgement: made from the first pass's own figures, a no-go for the busy guest.
fn assert_first_pass_no_go(report: &Report) {
    let f = report
        .forecast
        .as_ref()
        .expect("a verdict after the first pass");
    assert_eq!(f.made, ForecastMade::FirstPass, "{f:?}");
    assert_eq!(f.throughput_from, "first-pass", "{f:?}");
    assert!(!f.converges, "{f:?}");
    // What the capped link (16 MiB/s, 134 Mbit/s) moved, not a reference machine's figure.
    assert!(f.throughput_mbps <= 141.0, "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_go_judged_after_the_first_pass_rolls_back_with_on_no_go_abort() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(120));
    o.convergence.on_no_go = OnNoGo::Abort;

    let report = fixture::migrate(&o).await;

    show("on-no-go abort", &report);
    assert_eq!(report.status, FinalStatus::Failed, "{report:?}");
    fixture::assert_error_kind(&report, "no-go");
    assert_first_pass_no_go(&report);
    assert_eq!(report.convergence.no_go_action, Some(OnNoGo::Abort));
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_go_judged_after_the_first_pass_pauses_the_guest_with_on_no_go_pause() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(120));
    o.convergence.on_no_go = OnNoGo::Pause;

    let report = fixture::migrate(&o).await;

    show("on-no-go pause", &report);
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert_first_pass_no_go(&report);
    assert_eq!(report.convergence.no_go_action, Some(OnNoGo::Pause));
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_converge_lets_the_busy_guest_finish_with_its_ram_intact() {
    let pair = busy_pair().await;
    auto_converge_moves_the_busy_guest_intact(&pair).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_converge_under_tcg_lets_the_busy_guest_finish_with_its_ram_intact() {
    // 5000 pages/s (about 20 MiB/s, still more than the 16 MiB/s link moves), not
    // busy_tcg_pair's 20000: the workload makes up for time it did not run, up to 100 ms of
    // its rate, so a vCPU QEMU throttles at 99 % (10 ms run per second) still dirtied 2000
    // pages a second at 20000, half the 300 ms the downtime limit lets through, and whether a
    // pass fitted was luck (32-71 s, and 3 of 9 runs past the 120 s deadline). At 5000 it is
    // about 550 pages a second at 99 %: the pass after the throttle gets there fits.
    let pair = dirtying_pair_under(64, 5_000, Some(qemu_tls_migrate::vm::Accel::Tcg)).await;
    auto_converge_moves_the_busy_guest_intact(&pair).await;
}

/// Migrates `pair`'s busy guest with auto-converge (60 %, +20 %; the destination left paused)
/// and checks that it finished throttled, with the guest's RAM the same on both sides page for
/// page, but for the one page each set-up misses whatever the settings:
/// - under this machine's nested KVM, SeaBIOS's e-segment page (0xe8000, see migration.rs);
/// - under QEMU 7.2's TCG, the workload's stack and tick-counter page (0x105000): 7.2 stops
///   tracking writes to a page whose TLB entry outlives a dirty-log sync, and this guest (paging
///   off) never flushes its TLB, so any migration of more than one pass misses the page, with
///   auto-converge or without. `scripts/repro-tcg-autoconverge.py` shows it with raw QMP;
///   QEMU 10.0 loses nothing.
async fn auto_converge_moves_the_busy_guest_intact(pair: &Pair) {
    let lab = Lab::new("Test CA");
    let mut o = capped(pair, &lab);
    o.dest_paused = true;
    o.convergence.auto_converge = Some(Throttle {
        initial: 60,
        increment: 20,
    });

    let report = fixture::migrate(&o).await;

    show("auto-converge", &report);
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert!(
        report
            .convergence
            .auto_converge_max_throttle_pct
            .is_some_and(|p| p >= 60),
        "{:?}",
        report.convergence
    );
    assert_ram_intact_but_known_pages(pair, &report, "auto-converge").await;
}

/// Checks the guest's RAM is the same on both sides page for page, but for the one page the
/// set-up misses in any migration of more than one pass (see
/// [`auto_converge_moves_the_busy_guest_intact`]).
async fn assert_ram_intact_but_known_pages(pair: &Pair, report: &Report, what: &str) {
    let source_qemu = report
        .qemu
        .as_ref()
        .expect("both QEMU versions reported")
        .source;
    let known: &[usize] = match pair.source.accel {
        qemu_tls_migrate::vm::Accel::Kvm => &[0xe8],
        qemu_tls_migrate::vm::Accel::Tcg if source_qemu.major < 10 => &[0x105],
        qemu_tls_migrate::vm::Accel::Tcg => &[],
    };
    let differing = fixture::ram_difference(pair).await;
    fixture::show("pages differing", &format!("{differing:x?}"));
    assert!(
        differing.iter().all(|page| known.contains(page)),
        "pages {differing:x?} differ after {what} under {} on QEMU {source_qemu}",
        pair.source.accel.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_action_pause_finishes_the_busy_guest_as_downtime_with_its_ram_intact() {
    let lab = Lab::new("Test CA");
    let pair = busy_tcg_pair().await;
    let mut o = capped(&pair, &lab);
    o.dest_paused = true;
    o.timeout = Some(Duration::from_secs(4));
    o.convergence.timeout_action = TimeoutAction::Pause;

    let report = fixture::migrate(&o).await;

    show("timeout-action pause", &report);
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    assert_eq!(
        report.convergence.timeout_action,
        Some(TimeoutAction::Pause)
    );
    // The destination stays paused (to compare RAM), so the pause is dated from the action.
    assert!(
        report
            .convergence
            .timeout_action_at_ms
            .is_some_and(|at| at < report.wall.as_millis() as u64),
        "{:?}",
        report.convergence
    );
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    // More than one pass before the pause: QEMU 7.2's TCG may miss the tick page.
    assert_ram_intact_but_known_pages(&pair, &report, "the pause action").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downtime_steps_raise_the_limit_until_the_busy_guest_fits() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(60));
    // 64 MiB at 16 MiB/s is 4 s: a limit of 6 s lets the last pass through.
    o.convergence.downtime_steps = Some(qemu_tls_migrate::migration::DowntimeSteps {
        max: Duration::from_secs(6),
        steps: 2,
        every: Duration::from_secs(2),
    });

    let report = fixture::migrate(&o).await;

    show("downtime steps", &report);
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    let limits: Vec<u64> = report
        .convergence
        .downtime_steps
        .iter()
        .map(|s| s.limit_ms)
        .collect();
    assert_eq!(limits.last(), Some(&6000), "{limits:?}");
}

/// Two migrations of like pairs across two hosts, without and with `tweak`: their reports,
/// and the bytes each sent across the link (QEMU 7.2's own counters count multifd pages before
/// compression).
async fn with_and_without(
    wss_mib: u32,
    pages_per_sec: u32,
    ram: GuestRam,
    base: impl Fn(&mut MigrationOptions),
    tweak: impl Fn(&mut MigrationOptions),
) -> ((Report, u64), (Report, u64)) {
    let lab = Lab::new("Test CA");
    let mut reports = Vec::new();
    for with in [false, true] {
        let hosts = fixture::TwoHosts::create();
        let kernel = workload_kernel(wss_mib, pages_per_sec).expect("workload");
        let pair = Pair::builder()
            .on(&hosts)
            .ram(ram)
            .tweak(|c| c.kernel = Some(kernel))
            .start()
            .await;
        pass_beyond(pair.source.serial_path(), 0).await;
        let mut o = pair.tls_options(&lab);
        o.dest_address = Some(hosts.a_addr.clone());
        base(&mut o);
        if with {
            tweak(&mut o);
        }
        let before = hosts.source_tx_bytes();
        let report = fixture::migrate(&o).await;
        let sent = hosts.source_tx_bytes() - before;
        assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
        assert_eq!(fixture::status(&pair.dest).await, "running");
        reports.push((report, sent));
    }
    let with = reports.pop().expect("with");
    let without = reports.pop().expect("without");
    (without, with)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xbzrle_sends_fewer_bytes_for_a_guest_rewriting_its_pages() {
    // 23 MiB/s of rewrites against a 32 MiB/s link: many passes, each resending most of the
    // working set (about twice the bytes without XBZRLE, so a loaded machine cannot turn the
    // comparison around).
    let (without, with) = with_and_without(
        32,
        6000,
        GuestRam::Filled,
        |o| o.max_bandwidth = 32 << 20,
        |o| o.convergence.xbzrle = Some(XbzrleCache::Auto),
    )
    .await;

    show("without xbzrle", &without.0);
    show("with xbzrle", &with.0);
    fixture::show(
        "bytes across the link",
        &format!("{} without, {} with", without.1, with.1),
    );
    assert!(
        with.0
            .convergence
            .xbzrle_cache_bytes
            .is_some_and(|b| b >= 64 << 20)
    );
    assert!(
        with.0.ram.bytes < without.0.ram.bytes && with.1 < without.1,
        "{:?} bytes with XBZRLE, {:?} without",
        (with.0.ram.bytes, with.1),
        (without.0.ram.bytes, without.1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_on_multifd_sends_fewer_bytes() {
    // The workload's pages (one word each) compress; random data would not.
    let (without, with) = with_and_without(
        32,
        1000,
        GuestRam::AsBooted,
        |o| o.multifd = qemu_tls_migrate::migration::Multifd::Channels(2),
        |o| o.convergence.compress = Some(Compression::Zstd),
    )
    .await;

    show("multifd 2", &without.0);
    show("multifd 2 zstd", &with.0);
    fixture::show(
        "bytes across the link",
        &format!("{} without, {} with", without.1, with.1),
    );
    // QEMU 7.2 counts multifd pages before compression, in `transferred` and `multifd_bytes`
    // alike: the link's counter tells.
    assert!(
        with.1 * 2 < without.1,
        "{} bytes across the link with zstd, {} without",
        with.1,
        without.1
    );
}

#[tokio::test]
async fn compression_without_multifd_is_refused_before_anything_changes() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let mut o = pair.tls_options(&lab);
    o.convergence.compress = Some(Compression::Zstd);

    let report = fixture::migrate(&o).await;

    assert!(report.refused, "{report:?}");
    assert_eq!(fixture::error_kind(&report), Some("usage"));
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_says_no_go_for_the_busy_guest_with_advice_and_changes_nothing() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut args = pair.tls_args(&lab);
    args.extend(["--plan", "--max-bandwidth", "16M"].map(String::from));

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    fixture::show("plan, busy guest", &json);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["forecast"]["converges"], false, "{json}");
    assert!(
        json["forecast"]["dirty_rate_mib_s"].as_f64() > Some(16.0),
        "{json}"
    );
    assert!(
        json["forecast"]["advice"].as_array().is_some_and(|a| a
            .iter()
            .any(|s| s.as_str().is_some_and(|s| s.contains("--auto-converge")))),
        "{json}"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_says_go_for_an_idle_guest_and_the_migration_completes() {
    let lab = Lab::new("Test CA");
    // 64 MiB of the 128 MiB filled with data by the fixture; the guest dirties nothing.
    let pair = Pair::builder().start().await;
    let mut o = pair.tls_options(&lab);
    o.max_bandwidth = 64 << 20;

    let forecast = qemu_tls_migrate::migration::plan(&o.clone().validate().expect("valid"))
        .await
        .expect("plan");
    o.forecast = ForecastWhen::Before;
    let report = fixture::migrate(&o).await;

    fixture::show("plan, idle guest", &format!("{forecast:?}"));
    show("idle guest", &report);
    assert!(forecast.converges, "{forecast:?}");
    assert_eq!(report.status, FinalStatus::Completed, "{report:?}");
    // How close the prediction comes is a benchmark's figure, not a test's: on this 2-core
    // machine under the suite's load the same run measured 1.0 to 3.5 s.
    fixture::note(format_args!(
        "idle guest: predicted {} ms, measured {} ms",
        forecast.predicted_total_ms, report.ram.total_ms
    ));
    assert!(report.forecast.is_some_and(|f| f.converges));
}

#[tokio::test]
async fn post_copy_is_refused_on_qemu_7_2_naming_issue_1937_before_anything_changes() {
    let lab = Lab::new("Test CA");
    let qemu = fixture::qemu_7_2();
    let pair = Pair::builder().qemu(qemu.clone(), qemu).start().await;
    let mut o = pair.tls_options(&lab);
    o.convergence.postcopy = true;

    let report = fixture::migrate(&o).await;

    assert!(report.refused, "{report:?}");
    let message = fixture::error_message(&report);
    assert!(
        message.contains("post-copy is refused")
            && message.contains("#1937")
            && message.contains("QEMU 9.1 or later"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lost_after_the_pause_action_leaves_the_source_running_again() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let mut o = capped(&pair, &lab);
    o.timeout = Some(Duration::from_secs(3));
    o.convergence.timeout_action = TimeoutAction::Pause;
    let dest_pid = pair.dest.pid().expect("destination pid");
    let mut killed = false;

    // Paused at 3 s, the rest (about 64 MiB at 16 MiB/s) takes some 4 s more: kill the
    // destination in between, while the guest is paused by the tool.
    let report = fixture::migrate_observed(
        &o,
        |p| {
            if !killed && p.elapsed_ms > 4500 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(dest_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed = true;
            }
        },
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;

    show("destination lost after the pause", &report);
    assert!(
        killed,
        "the migration ended before the destination could be killed"
    );
    assert_eq!(report.status, FinalStatus::Failed, "{report:?}");
    assert_eq!(
        report.convergence.timeout_action,
        Some(TimeoutAction::Pause)
    );
    assert_ne!(fixture::error_kind(&report), Some("split-brain-risk"));
    assert_eq!(fixture::status(&pair.source).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_after_pauses_the_busy_guest_before_the_abort_deadline_and_it_finishes() {
    let lab = Lab::new("Test CA");
    let pair = busy_pair().await;
    let args = |pause: &str, timeout: &str| {
        let mut args = pair.tls_args(&lab);
        args.extend(
            [
                "--max-bandwidth",
                "16M",
                "--no-forecast",
                "--pause-after",
                pause,
                "--timeout",
                timeout,
            ]
            .map(String::from),
        );
        args
    };
    // A pause deadline that is not before the abort deadline is refused, naming both.
    let refused = Cli::new(args("600000ms", "10m")).output().await;
    let refusal = fixture::stdout_json(&refused);
    assert_eq!(refused.status.code(), Some(3), "{refusal}");
    assert_eq!(refusal["error"]["kind"], "usage", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("600s") && message.contains("pause"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;

    // CloudStack's vm.migrate.pauseafter (ms) beside vm.migrate.wait.
    let out = Cli::new(args("3000ms", "120s")).output().await;

    let json = fixture::stdout_json(&out);
    fixture::show("pause-after", &json["convergence"]);
    assert_eq!(out.status.code(), Some(0), "{json}");
    let conv = &json["convergence"];
    assert_eq!(conv["pause_deadline_ms"], 3000, "{json}");
    assert_eq!(conv["deadline_ms"], 120_000, "{json}");
    assert_eq!(conv["timeout_action"], "pause", "{json}");
    let at = conv["timeout_action_at_ms"].as_u64().unwrap_or_default();
    assert!((3000..120_000).contains(&at), "{json}");
    assert_eq!(fixture::status(&pair.dest).await, "running");
}
