//! Block migration: local disks copied over NBD with the migration's TLS, guest writes during
//! the copy, the export refusing clients without the CA's certificate, a destination killed
//! mid-copy, and port allocation across concurrent migrations.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use qemu_tls_migrate::migration::{DiskSelection, FinalStatus, Phase};
use qemu_tls_migrate::qemu::HumanMonitorCommand;
use qemu_tls_migrate::vm::DiskFormat;
use tokio_util::sync::CancellationToken;

use crate::fixture::{self, DEST_HOST, Lab, Pair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_disks_migrate_over_tls_and_the_images_are_identical() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::start_with_disks(&[
        ("disk0", DiskFormat::Qcow2, 48),
        ("disk1", DiskFormat::Raw, 32),
    ])
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
    let mut pair = Pair::start_with_disks(&[("disk0", DiskFormat::Qcow2, 256)]).await;
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
    let mut pair = Pair::start_with_disks(&[("disk0", DiskFormat::Qcow2, 16)]).await;
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
    let mut pair = Pair::start_with_disks(&[("disk0", DiskFormat::Qcow2, 128)]).await;
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
        Pair::start().await,
        Pair::start().await,
        Pair::start().await,
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
    assert_eq!(fixture::error_kind(&rc), Some("ports"), "{:?}", rc.error);
    let message = rc
        .error
        .as_ref()
        .and_then(std::error::Error::source)
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(message.contains("49510-49510"), "{message}");
    fixture::assert_source_untouched(&c.source).await;
}
