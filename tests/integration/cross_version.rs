//! Across QEMU versions, as in a rolling host upgrade: a guest with a 7.2 machine type moves
//! between QEMU 7.2 and 10.0 both ways, over TLS with its local disk, through the destination
//! service on another host; a guest of a 10.0 machine type is refused by a 7.2 destination
//! before anything changes. Both binaries are named explicitly (see `fixture::versions`), so
//! these tests run once, in the 7.2 pass of scripts/test.sh.

use std::path::PathBuf;

use qemu_tls_migrate::vm::DiskFormat;
use serde_json::Value;

use crate::fixture::{self, Cli, Pair, Service};

/// A pair from `source` to `dest` on two hosts with a 32 MiB qcow2 disk and machine type
/// `machine` (`None`: each binary's own `q35`), a service on the destination host, and the
/// `migrate --to` run's exit code and JSON report.
async fn migrate_across(
    source: PathBuf,
    dest: PathBuf,
    machine: Option<&str>,
) -> (Pair, Service, Option<i32>, Value) {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let machine = machine.map(str::to_string);
    let pair = Pair::builder()
        .on(&hosts)
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .qemu(source, dest)
        .tweak(|c| c.machine = machine)
        .start()
        .await;
    let service = Service::builder(&pki_a, &fixture::qmp_dir(&pair.dest))
        .on(&hosts)
        .allow(&["host-b"])
        .start()
        .await;
    let args = fixture::migrate_to_args(
        &pair,
        &service.addr,
        &pki_b,
        "qmp.sock",
        &["--all-local-disks", "--dest-paused", "--authz"],
    );
    let out = Cli::new(&args).in_netns(&hosts.b).output().await;
    let json = fixture::stdout_json(&out);
    fixture::show("report", &json);
    (pair, service, out.status.code(), json)
}

/// Asserts a completed TLS migration whose report names both QEMU series, then that guest
/// RAM is the same page for page and the disk byte for byte.
async fn assert_moved(mut pair: Pair, code: Option<i32>, json: &Value, from: &str, to: &str) {
    assert_eq!(code, Some(0), "{json}");
    assert_eq!(json["status"], "completed", "{json}");
    assert_eq!(json["transport"], "tls", "{json}");
    let version = |side: &str| json["qemu"][side].as_str().unwrap_or_default().to_string();
    assert!(version("source").starts_with(from), "{json}");
    assert!(version("destination").starts_with(to), "{json}");
    assert_eq!(
        json["warnings"],
        serde_json::json!([]),
        "a tested pair gets no version warning"
    );
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    fixture::assert_ram_identical(&pair).await;
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst).expect("disk identical on the other host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pc_q35_7_2_guest_moves_from_qemu_7_2_to_10_0_with_its_disk() {
    let (pair, _service, code, json) = migrate_across(
        fixture::qemu_7_2(),
        fixture::qemu_10_0(),
        Some("pc-q35-7.2"),
    )
    .await;
    assert_moved(pair, code, &json, "7.2.", "10.0.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pc_i440fx_7_2_guest_moves_back_from_qemu_10_0_to_7_2_with_its_disk() {
    let (pair, _service, code, json) = migrate_across(
        fixture::qemu_10_0(),
        fixture::qemu_7_2(),
        Some("pc-i440fx-7.2"),
    )
    .await;
    assert_moved(pair, code, &json, "10.0.", "7.2.").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10_0_machine_type_is_refused_by_a_7_2_destination_with_exit_3_before_anything_changes() {
    // Each binary's own q35: pc-q35-10.0 on the source, pc-q35-7.2 on the destination.
    let (pair, mut service, code, json) =
        migrate_across(fixture::qemu_10_0(), fixture::qemu_7_2(), None).await;

    assert_eq!(code, Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "machine-type", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("pc-q35-10.0"), "{message}");
    assert!(message.contains("QEMU 7.2."), "{message}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
    assert_eq!(
        fixture::tool_objects(&pair.dest).await,
        Vec::<String>::new()
    );
    assert!(service.is_running());
    assert_eq!(service.stop().await, Some(0));
}
