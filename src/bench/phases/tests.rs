use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::*;
use crate::bench::gate::{Better, Comparison};
use crate::bench::{BenchConfig, Mode, Profile, WorkloadConfig};
use crate::migration::Timing;
use crate::vm::Accel;

fn config() -> BenchConfig {
    BenchConfig {
        profile: Profile::Running,
        modes: vec![Mode::tcp(), Mode::tls()],
        ram_mib: 128,
        workload: WorkloadConfig {
            working_set_mib: 32,
            pages_per_sec: 5000,
        },
        disk_mib: 32,
        file_fill_mib: 0,
        repeat: 3,
        warmup: 1,
        accel: Some(Accel::Tcg),
        run_timeout: Duration::from_secs(30),
        max_bandwidth: None,
        pause_after: Duration::from_secs(10),
        work_dir: None,
    }
}

fn run(mode: &str, warmup: bool, wall_ms: u64, setup_ms: u64, ram_ms: u64) -> RunResult {
    RunResult {
        mode: mode.into(),
        warmup,
        completed: true,
        wall_ms,
        phases: Timing {
            setup_ms,
            disks_ms: 100,
            ram_ms,
            switchover_ms: 2,
            finish_ms: 5,
            cleanup_ms: 3,
        },
        total_ms: ram_ms,
        forecast_ms: Some(ram_ms + 50),
        ..RunResult::default()
    }
}

fn report() -> BenchReport {
    let runs = vec![
        run("tcp", true, 9999, 9000, 900),
        run("tcp", false, 500, 20, 360),
        run("tls", false, 900, 300, 480),
        run("tcp", false, 520, 30, 370),
        run("tls", false, 1000, 400, 490),
        run("tcp", false, 510, 25, 365),
        run("tls", false, 950, 350, 500),
    ];
    BenchReport::new(
        &config(),
        Accel::Tcg,
        "7.2.22".into(),
        PathBuf::from("/tmp"),
        SystemTime::now(),
        runs,
    )
}

#[test]
fn phases_are_medians_of_the_measured_runs_and_other_is_what_they_leave_of_the_wall() {
    let rows = per_mode(&report());

    assert_eq!(rows.len(), 2);
    let tls = &rows[1];
    assert_eq!(tls.mode, "tls");
    assert_eq!(tls.wall_ms, 950.0);
    assert_eq!(tls.phases_ms, [0.0, 350.0, 100.0, 490.0, 2.0, 5.0, 3.0]);
    assert_eq!(
        tls.other_ms(),
        0.0,
        "phases summing past the wall leave no negative rest"
    );
    let tcp = &rows[0];
    assert_eq!(
        tcp.phases_ms[1], 25.0,
        "the warm-up's 9000 ms set-up is not counted"
    );
    assert_eq!(
        tcp.other_ms(),
        510.0 - (25.0 + 100.0 + 365.0 + 2.0 + 5.0 + 3.0)
    );
}

#[test]
fn the_chart_stacks_a_bar_per_phase_and_writes_the_wall_and_its_ratio_to_tcp() {
    let svg = render_svg(&report());

    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    // 6 legend squares + (tcp: 6 phases + other) + (tls: 6 phases, no rest).
    assert_eq!(svg.matches("<rect x=").count(), 6 + 1 + 7 + 6, "{svg}");
    assert!(svg.contains("950 ms (1.86x tcp)"), "{svg}");
    assert!(svg.contains("<title>350 ms</title>"), "{svg}");
}

#[test]
fn a_libvirt_mode_shows_its_unsplit_set_up_and_disks_its_ram_and_the_accelerator_of_its_domains() {
    let mut config = config();
    config.modes = vec![Mode::domain(crate::bench::libvirt::DomainMode::LibvirtTls)];
    let libvirt = |wall_ms, before, ram_ms| RunResult {
        mode: "libvirt-tls".into(),
        completed: true,
        wall_ms,
        total_ms: ram_ms,
        downtime_ms: 40,
        phases: Timing {
            ram_ms,
            ..Timing::default()
        },
        setup_disks_ms: Some(before),
        ..RunResult::default()
    };
    let report = BenchReport::new(
        &config,
        Accel::Kvm,
        "libvirt's (system)".into(),
        PathBuf::from("/tmp"),
        SystemTime::now(),
        vec![libvirt(1900, 560, 1100), libvirt(2000, 600, 1150)],
    );

    let rows = per_mode(&report);
    assert_eq!(rows[0].phases_ms, [580.0, 0.0, 0.0, 1125.0, 0.0, 0.0, 0.0]);
    assert_eq!(rows[0].other_ms(), 1950.0 - 580.0 - 1125.0);
    let svg = render_svg(&report);
    assert!(svg.contains("set-up + disks, not split"), "{svg}");
    assert!(svg.contains("1950 ms, downtime 40 ms"), "{svg}");
    assert!(
        svg.contains("tcg (libvirt domains)") && !svg.contains("kvm"),
        "the domains run TCG whatever the bench's VMs would: {svg}"
    );
}

#[test]
fn the_summary_names_the_verdict_and_marks_a_regressed_ratio() {
    let report = report();
    let gate = GateReport {
        max_regression: 0.3,
        comparisons: vec![Comparison {
            mode: "tls".into(),
            metric: "ram_mbps",
            better: Better::Higher,
            baseline_ratio: 0.6,
            ratio: 0.3,
            worse_by: 0.5,
            regressed: true,
        }],
        new_modes: vec![],
    };

    let md = render_markdown(&report, Some(&gate));

    assert!(
        md.starts_with("# Benchmark: REGRESSED against the baseline"),
        "{md}"
    );
    assert!(md.contains("| tls | 3/3 | 950 | 1.86 |"), "{md}");
    // 540 predicted against 490 measured (the median run).
    assert!(md.contains("| +10.2 |"), "{md}");
    assert!(
        md.contains("| tls | ram_mbps | 0.600 | 0.300 | 50.0% | **REGRESSED** |"),
        "{md}"
    );
    assert!(
        md.contains("| tls | 0 | 350 | 100 | 490 | 2 | 5 | 3 | 0 |"),
        "{md}"
    );
    let plain = render_markdown(&report, None);
    assert!(
        plain.starts_with("# Benchmark: results (no baseline)"),
        "{plain}"
    );
    assert!(!plain.contains("Against the baseline"), "{plain}");
}
