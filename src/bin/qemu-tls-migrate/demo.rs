//! `qemu-tls-migrate demo`: the whole job on a built-in default. A throwaway CA and two host
//! certificates, two local VMs standing in for two hosts, a TLS migration, the report.

#![allow(clippy::print_stderr)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use qemu_tls_migrate::migration::DiskSelection;
use qemu_tls_migrate::migration::{Endpoint, MigrationOptions};
use qemu_tls_migrate::pki::init_lab;
use qemu_tls_migrate::vm::workload::{self, Workload};
use qemu_tls_migrate::vm::{DiskConfig, DiskFormat, Vm, VmConfig, create_image};
use std::path::Path;
use std::time::Duration;

use crate::outcome::{Outcome, outcome_of};
use crate::output::print_report;
use crate::running::run_migration;
use crate::tuning::TuningArgs;

const SOURCE_HOST: &str = "src-host";
const DEST_HOST: &str = "dst-host";

#[derive(Debug, Args)]
#[command(
    long_about = "Run a complete TLS live migration on this machine with nothing to prepare: \
makes a throwaway CA and certificates for two pretend hosts (src-host, dst-host), starts a source \
VM and a destination VM (`-incoming defer`) with QEMU, boots a small guest that fills part of its \
RAM with data and keeps writing to it (qemu-tls-migrate's own workload kernel), \
migrates over QEMU-native TLS with each VM using its own host's PKI directory, prints the report, \
and removes everything. KVM is used when it works here, TCG otherwise.",
    after_help = "Examples:\n  qemu-tls-migrate demo\n  qemu-tls-migrate demo --json\n  \
qemu-tls-migrate demo --transport tcp --ram-mib 512"
)]
pub struct DemoArgs {
    /// Guest RAM of the demo VM, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=16384))]
    pub ram_mib: u32,
    /// How much of the guest RAM the guest fills with data before the migration, in MiB.
    #[arg(long, default_value_t = 192)]
    pub fill_mib: u32,
    /// Pages (4 KiB) per second the guest keeps writing during the migration.
    #[arg(long, default_value_t = 2000)]
    pub dirty_rate: u32,
    /// Size of the VM's local disk in MiB (copied over NBD with the same TLS); 0 for none.
    #[arg(long, default_value_t = 64)]
    pub disk_mib: u64,
    /// Keep the temporary directory (PKI, logs, RAM files) and print where it is.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

pub async fn run(args: DemoArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let say = |msg: String| {
        if !quiet && !args.tuning.json {
            eprintln!("demo: {msg}");
        }
    };
    let tmp = tempfile::Builder::new()
        .prefix("qtm-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let root: PathBuf = tmp.path().to_path_buf();

    let lab = init_lab(&root.join("pki"), &[SOURCE_HOST.into(), DEST_HOST.into()])
        .context("cannot create the demo PKI")?;
    let pki_of = |host: &str| root.join("pki").join(host);
    say(format!(
        "throwaway CA and host certificates in {} ({} hosts)",
        root.join("pki").display(),
        lab.host_dirs.len()
    ));

    let mut config = VmConfig::new("demo-source", &root.join("source"));
    config.ram_mib = args.ram_mib;
    // The working set starts at 4 MiB of guest RAM; leave room below the top.
    let working_set = args.fill_mib.min(args.ram_mib.saturating_sub(8));
    let workload = Workload {
        working_set_mib: working_set,
        pages_per_sec: args.dirty_rate,
    };
    config.kernel = Some(
        workload
            .kernel_in(&root.join("guest"))
            .context("cannot write the guest kernel")?,
    );
    let disk_paths = (
        root.join("source-disk.qcow2"),
        root.join("destination-disk.qcow2"),
    );
    if args.disk_mib > 0 {
        prepare_disks(&disk_paths.0, &disk_paths.1, args.disk_mib << 20)?;
        config.disks.push(DiskConfig {
            node: "disk0".into(),
            path: disk_paths.0.clone(),
            format: DiskFormat::Qcow2,
            device: None,
        });
        say(format!(
            "local disk disk0: {} MiB qcow2 full of data; an empty one waits on the destination",
            args.disk_mib
        ));
    }
    let source = Vm::launch(config.clone())
        .await
        .context("cannot start the source VM")?;
    let dest_config = config.destination(
        "demo-destination",
        &root.join("destination"),
        std::slice::from_ref(&disk_paths.1),
    );
    let dest = Vm::launch(dest_config)
        .await
        .context("cannot start the destination VM")?;
    say(format!(
        "source VM pid {} and destination VM pid {} running under {}, {} MiB RAM",
        pid(&source),
        pid(&dest),
        source.accel.as_str(),
        args.ram_mib
    ));
    // Migrating while the firmware still boots makes this machine's KVM send all of RAM
    // twice; a real guest is long booted. Wait until the guest says it filled its memory.
    workload::wait_ready(&source, Duration::from_secs(60))
        .await
        .map_err(|tail| anyhow::anyhow!("the demo guest did not start: {tail}"))?;
    say(format!(
        "guest running: {working_set} MiB of its RAM written, {} pages/s still being written",
        args.dirty_rate
    ));

    let mut options = MigrationOptions::new(
        Endpoint {
            qmp: source.qmp_path().to_path_buf(),
            pki_dir: pki_of(SOURCE_HOST),
        },
        Endpoint {
            qmp: dest.qmp_path().to_path_buf(),
            pki_dir: pki_of(DEST_HOST),
        },
        DEST_HOST,
    );
    options.dest_address = Some("127.0.0.1".into());
    if args.disk_mib > 0 {
        options.disks = DiskSelection::AllLocal;
    }
    args.tuning.apply(&mut options);
    say(format!(
        "migrating {SOURCE_HOST} -> {DEST_HOST} (127.0.0.1), transport {}",
        args.tuning.transport.name()
    ));

    let report = run_migration(options, args.tuning.json, quiet).await;
    print_report(&report, args.tuning.json);
    let (mut source, mut dest) = (source, dest);
    source.quit(Duration::from_secs(10)).await;
    dest.quit(Duration::from_secs(10)).await;
    if args.disk_mib > 0 && report.error.is_none() {
        say(compare_disks(&disk_paths.0, &disk_paths.1));
    }
    if args.keep {
        let kept = tmp.keep();
        say(format!("kept {}", kept.display()));
    }
    Ok(outcome_of(&report))
}

/// A source image full of data, and an empty destination image of the same size.
fn prepare_disks(source: &Path, dest: &Path, size: u64) -> anyhow::Result<()> {
    create_image(source, DiskFormat::Qcow2, size)?;
    create_image(dest, DiskFormat::Qcow2, size)?;
    let pattern = format!("write -P 0x5a 0 {size}");
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &pattern])
        .arg(source)
        .output()
        .context("cannot run qemu-io (qemu-utils)")?;
    anyhow::ensure!(
        out.status.success(),
        "qemu-io could not write the demo disk: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `qemu-img compare` of the two images, in words.
fn compare_disks(source: &Path, dest: &Path) -> String {
    match std::process::Command::new("qemu-img")
        .arg("compare")
        .arg(source)
        .arg(dest)
        .output()
    {
        Ok(out) if out.status.success() => {
            "qemu-img compare: source and destination disks are identical".into()
        }
        Ok(out) => format!(
            "qemu-img compare: disks DIFFER: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        Err(e) => format!("qemu-img compare could not run: {e}"),
    }
}

/// A VM's process id, or "?" once it has none.
fn pid(vm: &qemu_tls_migrate::vm::Vm) -> String {
    vm.pid().map_or_else(|| "?".into(), |p| p.to_string())
}
