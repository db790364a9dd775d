//! `qemu-tls-migrate demo`: the whole job on a built-in default. A throwaway CA and two host
//! certificates, two local VMs standing in for two hosts, a TLS migration, the report.

#![allow(clippy::print_stderr)]

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use qemu_tls_migrate::migration::{Endpoint, MigrationOptions};
use qemu_tls_migrate::pki::init_lab;
use qemu_tls_migrate::vm::{Vm, VmConfig};

use crate::migrate_cmd::{TuningArgs, outcome_of, run_migration};
use crate::outcome::Outcome;
use crate::output::print_report;

const SOURCE_HOST: &str = "src-host";
const DEST_HOST: &str = "dst-host";

#[derive(Debug, Args)]
#[command(
    long_about = "Run a complete TLS live migration on this machine with nothing to prepare: \
makes a throwaway CA and certificates for two pretend hosts (src-host, dst-host), starts a source \
VM and a destination VM (`-incoming defer`) with QEMU, fills part of the guest's RAM with data, \
migrates over QEMU-native TLS with each VM using its own host's PKI directory, prints the report, \
and removes everything. KVM is used when it works here, TCG otherwise.",
    after_help = "Examples:\n  qemu-tls-migrate demo\n  qemu-tls-migrate demo --json\n  \
qemu-tls-migrate demo --transport tcp --ram-mib 512"
)]
pub struct DemoArgs {
    /// Guest RAM of the demo VM, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=16384))]
    pub ram_mib: u32,
    /// How much of the guest RAM to fill with data before migrating, in MiB.
    #[arg(long, default_value_t = 192)]
    pub fill_mib: u64,
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
    let source = Vm::launch(config.clone())
        .await
        .context("cannot start the source VM")?;
    let dest_config = config.destination("demo-destination", &root.join("destination"), &[]);
    let dest = Vm::launch(dest_config)
        .await
        .context("cannot start the destination VM")?;
    say(format!(
        "source VM pid {:?} and destination VM pid {:?} running under {}, {} MiB RAM",
        source.pid(),
        dest.pid(),
        source.accel.as_str(),
        args.ram_mib
    ));
    let fill = args.fill_mib.min(u64::from(args.ram_mib)) << 20;
    source
        .scribble_ram(fill, 0x5eed)
        .context("cannot fill the source VM's RAM")?;

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
    args.tuning.apply(&mut options);
    say(format!(
        "migrating {SOURCE_HOST} -> {DEST_HOST} (127.0.0.1), transport {:?}",
        args.tuning.transport
    ));

    let report = run_migration(&options, args.tuning.json, quiet).await;
    print_report(&report, args.tuning.json);
    drop(source);
    drop(dest);
    if args.keep {
        let kept = tmp.keep();
        say(format!("kept {}", kept.display()));
    }
    Ok(outcome_of(&report))
}
