//! `qemu-tls-migrate pki ...`: check a PKI directory, make a lab PKI.

// This is the binary's output, not logging.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use qemu_tls_migrate::pki::{self, Report, Severity};

use crate::outcome::Outcome;

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Make a lab CA and per-host certificate directories (for demos and tests).
    #[command(long_about = "\
Make a lab CA and, for each --host, a directory of the five files QEMU's tls-creds-x509
reads (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem).

Keys are ECDSA P-256. Each host's certificates have the host name as CN (subject just
CN=<host>, so an authz-simple object can name it) and as subject alternative name; the
server certificate has extended key usage serverAuth, the client certificate clientAuth.
Certificates are 0644, keys 0640, directories 0755; the CA key (OUT/ca-key.pem) is 0600.

Example:
  qemu-tls-migrate pki init --out /tmp/lab --host host-a --host host-b
  # then on host-a: copy /tmp/lab/host-a/* to /etc/pki/qemu/

With --json, prints one JSON object: {\"out\", \"ca_common_name\", \"host_dirs\"}.
Exit status: 0 when written, 1 on error.")]
    Init(InitArgs),
    /// Check a PKI directory the way QEMU will use it (a deeper virt-pki-validate).
    #[command(long_about = "\
Check a PKI directory in QEMU's layout (ca-cert.pem, server-cert.pem, server-key.pem,
client-cert.pem, client-key.pem) and report every problem, each naming the file and saying
what to do:

  - each file exists, is readable, is not empty, and is PEM (DER and garbage are told apart);
  - the CA certificate is a CA and within its dates;
  - each certificate chains to the CA, is within its dates (warning under 30 days left),
    has the key usages QEMU wants (digitalSignature + keyEncipherment; serverAuth for the
    server certificate, clientAuth for the client certificate);
  - each key matches its certificate;
  - the server certificate's names cover --hostname (default: this host's name);
  - keys are not accessible to other users; where a qemu/libvirt-qemu group exists, it can
    read every file. Owner, group and mode of each file are reported; recommended: keys
    0640 root:<QEMU's group>, certificates 0644.

These are the checks `--transport auto` uses to call a side secured.

Example:
  qemu-tls-migrate pki check --dir /etc/pki/qemu --hostname host-a.example.org

With --json, prints one JSON object: {\"dir\", \"usable\", \"errors\", \"warnings\", \"files\": [...],
\"findings\": [{\"severity\", \"kind\", \"file\", \"message\", \"fix\"}], ...}.
Exit status: 0 when the directory is usable for migration (warnings allowed), 1 otherwise.")]
    Check(CheckArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Directory to write the CA (ca-cert.pem, ca-key.pem) and one sub-directory per host into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A host to issue certificates for (repeat for each host); becomes its CN and SAN.
    #[arg(long = "host", value_name = "NAME", required = true)]
    pub hosts: Vec<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The PKI directory to check.
    #[arg(long, value_name = "DIR", default_value = pki::DEFAULT_PKI_DIR)]
    pub dir: PathBuf,
    /// The name the server certificate must cover (the source's tls-hostname for this host).
    /// Default: this host's name (/proc/sys/kernel/hostname).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Do not check the server certificate's names.
    #[arg(long, conflicts_with = "hostname")]
    pub no_hostname: bool,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: PkiCommand) -> anyhow::Result<Outcome> {
    match cmd {
        PkiCommand::Init(args) => init(args),
        PkiCommand::Check(args) => check(args),
    }
}

fn init(args: InitArgs) -> anyhow::Result<Outcome> {
    let summary = pki::init_lab(&args.out, &args.hosts)
        .with_context(|| format!("making a lab PKI in {}", args.out.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "Lab CA \"{}\": {} and {} (keep the key private)",
            summary.ca_common_name,
            summary.out.join(pki::CA_CERT).display(),
            summary.out.join(pki::CA_KEY).display()
        );
        for dir in &summary.host_dirs {
            println!("  {}", dir.display());
        }
        if let Some(first) = summary.host_dirs.first() {
            println!(
                "Use a host directory as QEMU's dir=, e.g. -object tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                first.display()
            );
        }
    }
    Ok(Outcome::Success)
}

/// This host's name, as `hostname` prints it.
fn this_hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn check(args: CheckArgs) -> anyhow::Result<Outcome> {
    let hostname = if args.no_hostname {
        None
    } else {
        args.hostname.or_else(this_hostname)
    };
    let report = pki::check_dir(&args.dir, hostname.as_deref());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.usable {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn print_report(report: &Report) {
    let verdict = if report.usable {
        "usable"
    } else {
        "NOT usable"
    };
    let host = report
        .hostname
        .as_deref()
        .map(|h| format!(" for host name {h:?}"))
        .unwrap_or_default();
    println!(
        "PKI directory {}{host}: {verdict} ({} error{}, {} warning{})",
        report.dir.display(),
        report.errors,
        if report.errors == 1 { "" } else { "s" },
        report.warnings,
        if report.warnings == 1 { "" } else { "s" },
    );
    for file in &report.files {
        let name = file
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !file.exists {
            println!("  {name:<16} (missing)");
            continue;
        }
        let owner = format!(
            "{}:{}",
            file.owner.as_deref().unwrap_or("?"),
            file.group.as_deref().unwrap_or("?")
        );
        let mut details = Vec::new();
        if let Some(subject) = &file.subject {
            details.push(subject.clone());
        }
        if !file.names.is_empty() {
            details.push(format!("names {}", file.names.join(",")));
        }
        if let Some(not_after) = &file.not_after {
            details.push(format!("until {not_after}"));
        }
        println!(
            "  {name:<16} {owner:<16} {} {}",
            file.mode.as_deref().unwrap_or("?"),
            details.join("; ")
        );
    }
    for finding in &report.findings {
        let label = match finding.severity {
            Severity::Error => "error:  ",
            Severity::Warning => "warning:",
        };
        println!(
            "{label} {}: {}\n          fix: {}",
            finding.file.display(),
            finding.message,
            finding.fix
        );
    }
    if !report.findings.is_empty() {
        println!("Recommended: {}", report.recommended);
    }
}
