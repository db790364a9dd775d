//! Block migration: local disks copied over NBD with the migration's TLS, guest writes during
//! the copy, the export refusing clients without the CA's certificate, a destination killed
//! mid-copy, port allocation across concurrent migrations, and what crosses the wire: top-only
//! copies of overlays, zeroes skipped, the disk bandwidth cap.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use qemu_tls_migrate::migration::{DiskSelection, FinalStatus, MigrationOptions, Phase};
use qemu_tls_migrate::peer::DiskCopy;
use qemu_tls_migrate::qemu::HumanMonitorCommand;
use qemu_tls_migrate::vm::{DiskConfig, DiskFormat, create_image};
use tokio_util::sync::CancellationToken;

use serde_json::Value;

use crate::fixture::{
    self, Cli, CountingProxy, DEST_HOST, DestBacking, DiskNames, GuestRam, Lab, Overlay, Pair,
    Service,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_disks_migrate_over_tls_and_the_images_are_identical() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .disks(&[
            ("disk0", DiskFormat::Qcow2, 48),
            ("disk1", DiskFormat::Raw, 32),
        ])
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.disks = DiskSelection::AllLocal;

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    let copied: Vec<&str> = report.disks.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(copied, ["disk0", "disk1"]);
    assert_eq!(report.ports.len(), 2, "a migration port and an NBD port");
    assert_eq!(
        fixture::tool_block_leftovers(&pair.source).await,
        (vec![], vec![])
    );
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst).expect("destination image equals source image");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_writes_during_the_mirror_reach_the_destination() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 256)])
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.disks = DiskSelection::Nodes(vec!["disk0".into()]);
    let copying = Arc::new(AtomicBool::new(false));
    let ram_started = Arc::new(AtomicBool::new(false));
    let writes_while_copying = Arc::new(AtomicUsize::new(0));
    let monitor = fixture::monitor(&pair.source).await;
    // Writes through the source's block layer (HMP qemu-io), as a guest would, until RAM moves:
    // the mirror is still running then, so every write must reach the destination.
    let writer = tokio::spawn({
        let (copying, ram_started, count) = (
            copying.clone(),
            ram_started.clone(),
            writes_while_copying.clone(),
        );
        async move {
            let mut n: u64 = 0;
            while !ram_started.load(Ordering::SeqCst) {
                let cmd = format!(
                    "qemu-io disk0 \"write -P 0x{:x} {}k 64k\"",
                    0x80 + n % 64,
                    (n * 1031) % (255 * 1024)
                );
                monitor
                    .call(&HumanMonitorCommand { command_line: cmd })
                    .await
                    .expect("qemu-io through HMP");
                if copying.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
            }
        }
    });

    let report = fixture::migrate_observed(
        &options,
        |p| {
            copying.store(p.phase == Phase::Disks, Ordering::SeqCst);
            if p.phase == Phase::Ram {
                ram_started.store(true, Ordering::SeqCst);
            }
        },
        &CancellationToken::new(),
    )
    .await;
    ram_started.store(true, Ordering::SeqCst);
    writer.await.expect("writer");

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert!(
        writes_while_copying.load(Ordering::SeqCst) > 0,
        "no write landed during the copy"
    );
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst)
            .expect("writes during the mirror reached the destination");
    }
}

/// `qemu-img info` against the destination's NBD export, optionally with client credentials.
fn nbd_info(port: u16, creds_dir: Option<&std::path::Path>) -> Result<String, String> {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("info");
    let target = match creds_dir {
        None => format!("driver=nbd,host=127.0.0.1,port={port},export=disk0"),
        Some(dir) => {
            cmd.args([
                "--object",
                &format!(
                    "tls-creds-x509,id=tls0,dir={},endpoint=client",
                    dir.display()
                ),
            ]);
            format!(
                "driver=nbd,host=127.0.0.1,port={port},export=disk0,tls-creds=tls0,tls-hostname={DEST_HOST}"
            )
        }
    };
    cmd.args(["--image-opts", &target]);
    let out = cmd.output().map_err(|e| e.to_string())?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nbd_export_refuses_clients_without_the_cas_certificate() {
    let lab = Lab::new("Test CA");
    let other = Lab::new("Another CA");
    let src_pki = lab.host("src", &["src-host"]);
    let intruder_pki = other.host("intruder", &["src-host"]);
    let mut pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 16)])
        .start()
        .await;
    let mut options = pair.options(&src_pki, &lab.host("dst", &[DEST_HOST]));
    options.disks = DiskSelection::AllLocal;
    // The migration port is taken first, the NBD port second, from a range no other test uses.
    options.port_range = "49500-49501".parse().expect("range");
    options.max_bandwidth = 16 << 20; // keep the NBD server up for a few seconds
    let mut results = None;
    let probed = AtomicBool::new(false);

    let report = fixture::migrate_observed(
        &options,
        |p| {
            if p.phase == Phase::Ram && !probed.swap(true, Ordering::SeqCst) {
                let r = [
                    nbd_info(49501, None),
                    nbd_info(49501, Some(&intruder_pki)),
                    nbd_info(49501, Some(&src_pki)),
                ];
                results = Some(r);
            }
        },
        &CancellationToken::new(),
    )
    .await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(report.ports, [49500, 49501]);
    let [plain, intruder, member] = results.expect("probed during the migration");
    let plain = plain.expect_err("a plain NBD client must be refused");
    assert!(plain.contains("TLS"), "refused for lack of TLS: {plain}");
    let intruder = intruder.expect_err("a client certificate from another CA must be refused");
    assert!(!intruder.contains("Connection refused"), "{intruder}");
    member
        .expect("a client with the CA's certificate gets in (the refusals are about certificates)");
    pair.quit_both().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_killed_mid_mirror_leaves_the_source_running_with_intact_disks() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 128)])
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.disks = DiskSelection::AllLocal;
    let (src_image, _) = pair.disk_images()[0].clone();
    let pristine = pair.dir.path().join("pristine.qcow2");
    std::fs::copy(&src_image, &pristine).expect("copy of the source image");
    let dest_pid = nix::unistd::Pid::from_raw(pair.dest.pid().expect("pid") as i32);
    let killed = AtomicBool::new(false);

    let report = fixture::migrate_observed(
        &options,
        |p| {
            if p.phase == Phase::Disks && !killed.swap(true, Ordering::SeqCst) {
                let _ = nix::sys::signal::kill(dest_pid, nix::sys::signal::Signal::SIGKILL);
            }
        },
        &CancellationToken::new(),
    )
    .await;

    assert!(killed.load(Ordering::SeqCst));
    assert_eq!(report.status, FinalStatus::Failed);
    assert!(
        matches!(
            fixture::error_kind(&report),
            Some("destination-died" | "mirror-failed")
        ),
        "{:?}",
        report.error
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(
        fixture::tool_block_leftovers(&pair.source).await,
        (vec![], vec![])
    );
    pair.source.quit(fixture::EVENT_TIMEOUT).await;
    fixture::images_identical(&src_image, &pristine).expect("the source disk is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_get_different_ports_and_a_one_port_range_runs_out() {
    let lab = Lab::new("Test CA");
    let (src_pki, dst_pki) = (
        lab.host("src", &["src-host"]),
        lab.host("dst", &[DEST_HOST]),
    );
    let (a, b, c) = (
        Pair::builder().start().await,
        Pair::builder().start().await,
        Pair::builder().start().await,
    );
    let mut slow = a.options(&src_pki, &dst_pki);
    slow.max_bandwidth = 16 << 20;
    // A holds exactly 49510 while B, whose range includes it, must take another port, and C,
    // whose range is 49510 alone, must find none.
    slow.port_range = "49510".parse().expect("single port");
    let mut second = b.options(&src_pki, &dst_pki);
    second.port_range = "49510-49512".parse().expect("range");
    let mut starved = c.options(&src_pki, &dst_pki);
    starved.port_range = "49510".parse().expect("single port");
    let a_moving = tokio::sync::Notify::new();
    let notified = AtomicBool::new(false);

    let cancel = CancellationToken::new();
    let first = fixture::migrate_observed(
        &slow,
        |p| {
            if p.phase == Phase::Ram && !notified.swap(true, Ordering::SeqCst) {
                a_moving.notify_one();
            }
        },
        &cancel,
    );
    let others = async {
        a_moving.notified().await;
        // Both start while A moves (one after the other, C could find A done on a slow day).
        tokio::join!(fixture::migrate(&second), fixture::migrate(&starved))
    };
    let (ra, (rb, rc)) = tokio::join!(first, others);

    assert_eq!(ra.status, FinalStatus::Completed, "{:?}", ra.error);
    assert_eq!(rb.status, FinalStatus::Completed, "{:?}", rb.error);
    assert_eq!(ra.ports, [49510]);
    assert_ne!(rb.ports, [49510], "two migrations at once share a port");
    fixture::assert_error_kind(&rc, "ports");
    let message = rc
        .error
        .as_ref()
        .and_then(std::error::Error::source)
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("49510-49510"), "{message}");
    fixture::assert_source_untouched(&c.source).await;
}

/// Options for a TLS migration of `pair`'s `disk0`, copied as `copy`, with its NBD traffic
/// through a counting proxy. The range `first`..=`first + 1` is this test's alone: the
/// migration takes `first`, NBD `first + 1`.
async fn counted_disk_options(
    pair: &Pair,
    lab: &Lab,
    first: u16,
    copy: DiskCopy,
) -> (MigrationOptions, CountingProxy) {
    let mut options = pair.tls_options(lab);
    options.disks = DiskSelection::Nodes(vec!["disk0".into()]);
    options.disk_copy.default = copy;
    options.port_range = format!("{first}-{}", first + 1).parse().expect("range");
    let proxy = CountingProxy::start(first + 1).await;
    options.nbd_connect = Some(proxy.addr.parse().expect("proxy address"));
    (options, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_only_copy_sends_about_the_overlay_where_a_full_copy_sends_the_chain() {
    let lab = Lab::new("Test CA");
    let mut top_pair = Pair::builder()
        .overlay(Overlay::new(256, 16, DestBacking::SameTemplate))
        .ram(GuestRam::AsBooted)
        .start()
        .await;
    let mut full_pair = Pair::builder()
        .overlay(Overlay::new(256, 16, DestBacking::None))
        .ram(GuestRam::AsBooted)
        .start()
        .await;
    let (top_options, top_wire) = counted_disk_options(&top_pair, &lab, 49530, DiskCopy::Top).await;
    let (full_options, full_wire) =
        counted_disk_options(&full_pair, &lab, 49532, DiskCopy::Full).await;
    let overlay = fixture::allocated_size(&top_pair.disk_images()[0].0);

    let top = fixture::migrate(&top_options).await;
    let full = fixture::migrate(&full_options).await;

    assert_eq!(top.status, FinalStatus::Completed, "{:?}", top.error);
    assert_eq!(full.status, FinalStatus::Completed, "{:?}", full.error);
    let (t, f) = (&top.disks[0], &full.disks[0]);
    fixture::note(format_args!(
        "top: {} bytes on the wire, disks {} ms, migration {} ms, to copy {}; full: {} bytes \
         on the wire, disks {} ms, migration {} ms, to copy {}; overlay allocated {overlay}",
        top_wire.sent(),
        t.ms,
        top.wall.as_millis(),
        t.to_copy,
        full_wire.sent(),
        f.ms,
        full.wall.as_millis(),
        f.to_copy
    ));
    assert_eq!((t.copy, f.copy), (DiskCopy::Top, DiskCopy::Full));
    assert_eq!(t.to_copy, overlay, "top: bytes to copy are the overlay's");
    assert!(
        f.to_copy > 256 << 20,
        "full: the template counts: {}",
        f.to_copy
    );
    assert!(
        top_wire.sent() > 16 << 20 && top_wire.sent() < overlay + (2 << 20),
        "top: {} bytes on the wire for an overlay of {overlay}",
        top_wire.sent()
    );
    assert!(
        full_wire.sent() > 256 << 20,
        "full: {} bytes on the wire",
        full_wire.sent()
    );
    top_pair.quit_both().await;
    full_pair.quit_both().await;
    for (src, dst) in top_pair
        .disk_images()
        .into_iter()
        .chain(full_pair.disk_images())
    {
        fixture::images_identical(&src, &dst)
            .expect("the destination's chain reads as the source's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_is_refused_and_nothing_changed_when_the_destination_disk_has_no_backing_file() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .overlay(Overlay::new(32, 4, DestBacking::None))
        .ram(GuestRam::AsBooted)
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.disks = DiskSelection::Nodes(vec!["disk0".into()]);
    options.disk_copy.default = DiskCopy::Top;

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Failed);
    assert!(report.refused, "nothing may have been changed");
    assert_eq!(fixture::error_kind(&report), Some("backing-mismatch"));
    let message = fixture::error_message(&report);
    assert!(message.contains("no backing file"), "{message}");
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
    assert!(fixture::tool_objects(&pair.dest).await.is_empty());
    pair.quit_both().await;
}

/// `migrate --json` of `pair` with `extra`, through the CLI, with fresh PKIs from `lab`.
async fn migrate_cli(pair: &Pair, lab: &Lab, extra: &[&str]) -> (std::process::Output, Value) {
    let mut args = pair.tls_args(lab);
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Cli::new(&args).output().await;
    let json = fixture::stdout_json(&out);
    (out, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_is_refused_with_exit_3_when_the_destination_template_differs() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .overlay(Overlay::new(32, 4, DestBacking::OtherTemplate))
        .ram(GuestRam::AsBooted)
        .start()
        .await;

    let (out, json) = migrate_cli(&pair, &lab, &["--disk", "disk0,copy=top"]).await;

    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "backing-mismatch", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("differs") && message.contains("--disk-copy full"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
    pair.quit_both().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_only_copy_onto_another_template_under_other_node_names_is_refused_unchanged() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .overlay(Overlay::new(64, 4, DestBacking::OtherTemplate).named(DiskNames::DIFFERENT))
        .ram(GuestRam::AsBooted)
        .start()
        .await;

    let (out, json) = migrate_cli(&pair, &lab, &["--disk", "vd0,copy=top"]).await;

    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "backing-mismatch", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("differs") && message.contains("dst-template.raw"),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(
        fixture::tool_block_leftovers(&pair.source).await,
        (vec![], vec![])
    );
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
    assert!(fixture::tool_objects(&pair.dest).await.is_empty());
    pair.quit_both().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_only_copy_onto_the_same_template_under_other_node_names_completes_and_disks_equal() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .overlay(Overlay::new(64, 4, DestBacking::SameTemplate).named(DiskNames::DIFFERENT))
        .ram(GuestRam::AsBooted)
        .start()
        .await;

    let (out, json) = migrate_cli(&pair, &lab, &["--disk", "vd0,copy=top"]).await;

    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["disks"][0]["copy"], "top", "{json}");
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst)
            .expect("the destination's chain reads as the source's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_service_a_top_only_copy_under_other_node_names_checks_the_template() {
    let lab = Lab::new("Test CA");
    let (pki_a, pki_b) = (
        lab.host("host-a", &["host-a"]),
        lab.host("host-b", &["host-b"]),
    );
    let mut wrong = Pair::builder()
        .overlay(Overlay::new(64, 4, DestBacking::OtherTemplate).named(DiskNames::DIFFERENT))
        .ram(GuestRam::AsBooted)
        .start()
        .await;
    let mut right = Pair::builder()
        .overlay(Overlay::new(64, 4, DestBacking::SameTemplate).named(DiskNames::DIFFERENT))
        .ram(GuestRam::AsBooted)
        .start()
        .await;
    let serve = |pair: &Pair| {
        let qmp_dir = fixture::qmp_dir(&pair.dest);
        let pki_a = pki_a.clone();
        async move { Service::builder(&pki_a, &qmp_dir).start().await }
    };
    let (wrong_service, right_service) = (serve(&wrong).await, serve(&right).await);
    let args = |pair: &Pair, service: &Service| {
        fixture::migrate_to_args(
            pair,
            &service.addr,
            &pki_b,
            "qmp.sock",
            &["--disk", "vd0,copy=top"],
        )
    };

    let refused = Cli::new(args(&wrong, &wrong_service)).output().await;
    let completed = Cli::new(args(&right, &right_service)).output().await;

    let (refused_json, completed_json) = (
        fixture::stdout_json(&refused),
        fixture::stdout_json(&completed),
    );
    assert_eq!(refused.status.code(), Some(3), "{refused_json}");
    assert_eq!(
        refused_json["error"]["kind"], "backing-mismatch",
        "{refused_json}"
    );
    fixture::assert_source_untouched(&wrong.source).await;
    assert_eq!(fixture::status(&wrong.dest).await, "inmigrate");
    assert!(fixture::tool_objects(&wrong.dest).await.is_empty());
    assert_eq!(completed.status.code(), Some(0), "{completed_json}");
    wrong.quit_both().await;
    right.quit_both().await;
    for (src, dst) in right.disk_images() {
        fixture::images_identical(&src, &dst)
            .expect("the destination's chain reads as the source's");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_no_journal_records_is_refused_by_name_and_left_alone() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .start()
        .await;
    let mut args = pair.tls_args(&lab);
    args.extend(["--disk", "disk0", "--disk-bandwidth", "1M"].map(String::from));
    let mut killed = Cli::new(&args).spawn();
    let orphan = fixture::wait_block_job(&pair.source).await;
    // Every process of the tool, and its journal: a mirror the tool has no record of.
    let pid = killed.id().expect("pid");
    for p in std::iter::once(pid).chain(fixture::children_of(pid)) {
        fixture::signal(p, nix::sys::signal::Signal::SIGKILL);
    }
    killed.wait().await.expect("reaped");
    let journal = qemu_tls_migrate::migration::journal::journal_path(
        &qemu_tls_migrate::jobs::run_dir(),
        &qemu_tls_migrate::vm_lock::VmKey::socket(pair.source.qmp_path()),
    );
    std::fs::remove_file(&journal).expect("the killed run's journal");
    let mut options = pair.tls_options(&lab);
    options.disks = DiskSelection::Nodes(vec!["disk0".into()]);

    let report = fixture::migrate(&options).await;

    assert!(report.refused, "{:?}", report.error);
    assert_eq!(fixture::error_kind(&report), Some("source-not-ready"));
    let message = fixture::error_message(&report);
    assert!(message.contains(&orphan), "{message}");
    let (jobs, _) = fixture::tool_block_leftovers(&pair.source).await;
    assert_eq!(jobs, [orphan], "the killed run's job is not ours to end");
    assert_eq!(fixture::status(&pair.source).await, "running");
}

/// A 256 MiB qcow2 `disk0` holding 16 MiB of data and, when `zero_mib` > 0, that many MiB of
/// zeroes written as data (allocated); the destination gets an empty qcow2 of the same size.
async fn sparse_pair(zero_mib: u64) -> Pair {
    let dir = tempfile::Builder::new()
        .prefix("qtm-test-")
        .tempdir()
        .expect("test dir");
    let (src, dst) = (
        dir.path().join("disk0.qcow2"),
        dir.path().join("dest-disk0.qcow2"),
    );
    create_image(&src, DiskFormat::Qcow2, 256 << 20).expect("source image");
    create_image(&dst, DiskFormat::Qcow2, 256 << 20).expect("destination image");
    fixture::qemu_io(&src, DiskFormat::Qcow2, "write -P 0x44 0 8M");
    fixture::qemu_io(&src, DiskFormat::Qcow2, "write -P 0x55 128M 8M");
    if zero_mib > 0 {
        fixture::qemu_io(
            &src,
            DiskFormat::Qcow2,
            &format!("write -P 0 200M {zero_mib}M"),
        );
    }
    let disk = DiskConfig {
        node: "disk0".into(),
        path: src,
        format: DiskFormat::Qcow2,
        device: None,
    };
    Pair::builder()
        .images(dir, vec![disk], vec![dst])
        .ram(GuestRam::AsBooted)
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_disk_with_16_mib_of_data_crosses_the_wire_as_its_data_and_stays_sparse() {
    let lab = Lab::new("Test CA");
    let mut pair = sparse_pair(0).await;
    let mut before_pair = sparse_pair(0).await;
    let (options, wire) = counted_disk_options(&pair, &lab, 49534, DiskCopy::Full).await;
    // What every copy did before zeroes were skipped: for a sparse image, the same.
    let (mut before, before_wire) =
        counted_disk_options(&before_pair, &lab, 49542, DiskCopy::Full).await;
    before.skip_zeroes = false;
    let src_allocated = fixture::allocated_size(&pair.disk_images()[0].0);

    let report = fixture::migrate(&options).await;
    let before_report = fixture::migrate(&before).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(
        before_report.status,
        FinalStatus::Completed,
        "{:?}",
        before_report.error
    );
    pair.quit_both().await;
    before_pair.quit_both().await;
    let (src, dst) = pair.disk_images().remove(0);
    let dst_allocated = fixture::allocated_size(&dst);
    fixture::note(format_args!(
        "sparse: zeroes skipped {} bytes on the wire, zeroes copied {}; allocated \
         {src_allocated} on the source, {dst_allocated} on the destination",
        wire.sent(),
        before_wire.sent()
    ));
    for sent in [wire.sent(), before_wire.sent()] {
        assert!(
            sent < 20 << 20,
            "{sent} bytes on the wire for 16 MiB of data in 256 MiB"
        );
    }
    assert!(
        dst_allocated < src_allocated + (4 << 20),
        "destination {dst_allocated} bytes against the source's {src_allocated}"
    );
    fixture::images_identical(&src, &dst).expect("identical");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeroes_written_as_data_cross_the_wire_as_write_zeroes_unless_asked_to_copy_them() {
    let lab = Lab::new("Test CA");
    let mut skip_pair = sparse_pair(32).await;
    let mut copy_pair = sparse_pair(32).await;
    let (skip_options, skip_wire) =
        counted_disk_options(&skip_pair, &lab, 49536, DiskCopy::Full).await;
    let (mut copy_options, copy_wire) =
        counted_disk_options(&copy_pair, &lab, 49538, DiskCopy::Full).await;
    copy_options.skip_zeroes = false;

    let skipped = fixture::migrate(&skip_options).await;
    let copied = fixture::migrate(&copy_options).await;

    assert_eq!(
        skipped.status,
        FinalStatus::Completed,
        "{:?}",
        skipped.error
    );
    assert_eq!(copied.status, FinalStatus::Completed, "{:?}", copied.error);
    skip_pair.quit_both().await;
    copy_pair.quit_both().await;
    let (skip_src, skip_dst) = skip_pair.disk_images().remove(0);
    let (copy_src, copy_dst) = copy_pair.disk_images().remove(0);
    fixture::note(format_args!(
        "16 MiB data + 32 MiB zeroes as data: skip {} bytes on the wire, destination {} \
         allocated; copy {} bytes, destination {} allocated; source {} allocated",
        skip_wire.sent(),
        fixture::allocated_size(&skip_dst),
        copy_wire.sent(),
        fixture::allocated_size(&copy_dst),
        fixture::allocated_size(&skip_src)
    ));
    assert!(skip_wire.sent() < 20 << 20, "skip: {}", skip_wire.sent());
    assert!(copy_wire.sent() > 48 << 20, "copy: {}", copy_wire.sent());
    assert!(fixture::allocated_size(&skip_dst) < fixture::allocated_size(&skip_src));
    fixture::images_identical(&skip_src, &skip_dst).expect("identical (skip)");
    fixture::images_identical(&copy_src, &copy_dst).expect("identical (copy)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_bandwidth_cap_holds_the_copy_rate_and_the_migration_completes() {
    const CAP: u64 = 8 << 20;
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder()
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .start()
        .await;
    let (mut options, wire) = counted_disk_options(&pair, &lab, 49540, DiskCopy::Full).await;
    options.disk_bandwidth = Some(CAP);

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    let disk = &report.disks[0];
    let rate = (32u64 << 20) as f64 / (disk.ms as f64 / 1000.0);
    fixture::note(format_args!(
        "cap {CAP} B/s: 32 MiB in {} ms, {rate:.0} B/s, {} bytes on the wire",
        disk.ms,
        wire.sent()
    ));
    assert!(
        rate < CAP as f64 * 1.25 && rate > CAP as f64 * 0.5,
        "{rate:.0} B/s under a cap of {CAP}"
    );
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst).expect("identical");
    }
}
