//! The guest workload and the benchmark harness against real QEMU: the workload runs under
//! this machine's accelerator and keeps running across a TLS migration, and `bench --quick`
//! (what CI runs as a smoke check) writes a report that parses.

use qemu_tls_migrate::migration::{Endpoint, FinalStatus, MigrationOptions};
use qemu_tls_migrate::vm::workload::{self, Workload};

use crate::fixture::{self, Cli, DEST_HOST, EVENT_TIMEOUT, GuestRam, Lab, Pair, pass_beyond};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_dirties_its_working_set_and_keeps_running_after_a_tls_migration() {
    let lab = Lab::new("Test CA");
    let (src_pki, dst_pki) = (
        lab.host("src", &["src-host"]),
        lab.host("dst", &[DEST_HOST]),
    );
    let dir = tempfile::tempdir().expect("workload dir");
    let load = Workload {
        working_set_mib: 8,
        pages_per_sec: 0,
    };
    let kernel = load.kernel_in(dir.path()).expect("install the workload");
    let pair = Pair::builder()
        .ram(GuestRam::AsBooted)
        .tweak(|c| {
            c.ram_mib = 64;
            c.kernel = Some(kernel);
        })
        .start()
        .await;
    let (source, dest) = (&pair.source, &pair.dest);

    let first = pass_beyond(source.serial_path(), 0).await;
    let later = pass_beyond(source.serial_path(), first.passes).await;
    let status = workload::read_status(source.ram_path())
        .expect("read the RAM file")
        .expect("status block written");
    let mut options = MigrationOptions::new(
        Endpoint {
            qmp: source.qmp_path().to_path_buf(),
            pki_dir: src_pki,
        },
        Endpoint {
            qmp: dest.qmp_path().to_path_buf(),
            pki_dir: dst_pki,
        },
        DEST_HOST,
    );
    options.timeout = Some(EVENT_TIMEOUT);
    let report = fixture::migrate(&options).await;
    let on_dest = pass_beyond(dest.serial_path(), later.passes).await;

    assert!(later.pages > first.pages, "{first:?} then {later:?}");
    assert_eq!(status.working_set_pages, 8 * 256);
    assert!(status.filled);
    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert!(on_dest.passes > later.passes, "{on_dest:?} after {later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_quick_writes_a_report_csv_and_chart_that_parse() {
    let out = tempfile::tempdir().expect("out dir");
    let out_dir = out.path().to_str().expect("utf-8 path");

    let run = Cli::new([
        "bench",
        "--quick",
        "--modes",
        "tcp,tls,tls-proxy,ssh",
        "--warmup",
        "0",
        "--ram-mib",
        "64",
        "--working-set-mib",
        "8",
        "--out",
        out_dir,
    ])
    .output()
    .await;

    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "stderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench.json")).expect("bench.json"),
    )
    .expect("bench.json parses");
    let modes: Vec<&str> = report["modes"]
        .as_array()
        .expect("modes")
        .iter()
        .filter_map(|m| m["mode"]["name"].as_str())
        .collect();
    assert_eq!(modes, ["tcp", "tls", "tls-proxy", "ssh"]);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4);
    assert!(
        runs.iter().all(|r| r["host_cpu_s"].as_f64() > Some(0.0)),
        "the machine's CPU time is measured: {runs:?}"
    );
    let csv = std::fs::read_to_string(out.path().join("bench.csv")).expect("bench.csv");
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(
        csv.lines().nth(1).is_some_and(|l| l.starts_with("tcp,")),
        "{csv}"
    );
    let runs = std::fs::read_to_string(out.path().join("runs.csv")).expect("runs.csv");
    assert_eq!(runs.lines().count(), 5, "{runs}");
    let svg = std::fs::read_to_string(out.path().join("bench.svg")).expect("bench.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("tls"), "no table on stdout: {stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_migrates_a_libvirt_domain_by_libvirt_and_by_the_tool_between_its_own_libvirtds() {
    let out = tempfile::tempdir().expect("out dir");
    let out_dir = out.path().to_str().expect("utf-8 path");

    // The bench starts its own pair of libvirtds (TLS listeners with its lab PKI) and verifies
    // each run itself: the domain running on the destination, the disks equal.
    let run = Cli::new([
        "bench",
        "--quick",
        "--modes",
        "libvirt-tls,tool-domain-tls",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--ram-mib",
        "64",
        "--working-set-mib",
        "8",
        "--disk-mib",
        "8",
        "--out",
        out_dir,
    ])
    .output()
    .await;

    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "stderr: {stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench.json")).expect("bench.json"),
    )
    .expect("bench.json parses");
    let runs = report["runs"].as_array().expect("runs");
    let modes: Vec<&str> = runs.iter().filter_map(|r| r["mode"].as_str()).collect();
    assert_eq!(modes, ["libvirt-tls", "tool-domain-tls"]);
    for r in runs {
        assert_eq!(r["completed"], true, "{r}");
        assert!(r["wall_ms"].as_u64() > Some(0), "{r}");
        assert!(r["total_ms"].as_u64() > Some(0), "QEMU's RAM time: {r}");
        assert!(r["ram_bytes"].as_u64() > Some(0), "{r}");
    }
    assert!(
        runs[1]["phases"]["ram_ms"].as_u64() > Some(0),
        "the tool's phases: {}",
        runs[1]
    );
    for r in runs {
        assert_eq!(r["disk_bytes"], 8 << 20, "both copied the whole disk: {r}");
    }
    // libvirt's job statistics (the source's) time set-up and disk copy only together.
    assert!(runs[0]["setup_disks_ms"].as_u64() > Some(0), "{}", runs[0]);
    assert_eq!(runs[1]["setup_disks_ms"], serde_json::Value::Null);
    assert_eq!(report["accel"], "tcg (libvirt domains)");
}
