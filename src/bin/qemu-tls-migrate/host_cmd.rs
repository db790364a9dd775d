//! `qemu-tls-migrate host ...`: secure a host the way CloudStack does, report its state.

// This is the binary's output, not logging.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use qemu_tls_migrate::host::cloudstack::SelfConnect;
use qemu_tls_migrate::host::{self, SecureOptions, SecureReport};
use qemu_tls_migrate::pki;

use crate::outcome::Outcome;

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Secure this KVM host from CloudStack's agent certificates (PKI, libvirt, firewall).
    #[command(long_about = "\
CloudStack's \"secure this KVM host\" step. From cloud.ca.crt, cloud.crt and cloud.key
(in --from, default /etc/cloudstack/agent):

  1. /etc/pki/qemu gets the five files QEMU reads: ca-cert.pem, server-cert.pem,
     client-cert.pem (certificates, 0644) and server-key.pem, client-key.pem (0640, group
     qemu or libvirt-qemu where one exists);
  2. libvirt's paths become symlinks into it: /etc/pki/CA/cacert.pem,
     /etc/pki/libvirt/{servercert,clientcert}.pem,
     /etc/pki/libvirt/private/{serverkey,clientkey}.pem;
  3. /etc/libvirt/qemu.conf gets default_tls_x509_cert_dir and default_tls_x509_verify = 1;
     /etc/libvirt/libvirtd.conf gets listen_tls = 1, listen_tcp = 0, tls_port = \"16514\",
     auth_tls = \"none\", key_file, cert_file, ca_file. Every other line and comment is kept
     byte for byte ('single' and \"double\" quoted strings are the same value). A file that is
     a symlink is edited where it points (resolved under --root) and stays a link; the file
     keeps its mode, owner and group;
  4. firewall rules opening 16514 and 49152-49215 are written to
     /etc/nftables.d/qemu-tls-migrate.nft and, for iptables hosts,
     /etc/iptables/qemu-tls-migrate.rules (written, not loaded);
  5. the renewal follower: /etc/systemd/system/qemu-tls-migrate-renew.path watches
     cloud.crt, cloud.ca.crt and cloud.key, and qemu-tls-migrate-renew.service runs this
     `host secure` again (same binary, --from, --pki-dir), enabled (paths.target.wants), not
     started: after CloudStack's keystore-cert-import re-points libvirt's paths at cloud.*
     with `ln -sf`, it copies the renewed files in and puts the links back.

Running it again changes nothing. A file that is replaced is first copied to
<file>.qemu-tls-migrate.orig, once, with its mode, owner and group. Every file is written to
a temporary file next to it, synced and renamed over it. Missing CloudStack files are an
error that changes nothing. --root DIR places everything under DIR (the default --from too).
Restart libvirtd afterwards; running VMs and QEMU processes need no restart.

Examples:
  qemu-tls-migrate host secure --dry-run        # show the diff, change nothing
  qemu-tls-migrate host secure
  qemu-tls-migrate host secure --root /tmp/h1 --from /tmp/certs

With --json, prints one JSON object: {\"root\", \"dry_run\", \"changes\": [{\"path\", \"action\",
\"backup\"}], \"unchanged\", \"diff\", \"pki\", ...}.
Exit status: 0 when done (or nothing to do) and the PKI directory is usable; 1 on error.")]
    Secure(SecureArgs),
    /// Report whether this host is secured: {"secured": bool, "reasons": [...]}.
    #[command(long_about = "\
Report whether this host is secured for TLS migration: its PKI directory (qemu.conf's
default_tls_x509_cert_dir, else /etc/pki/qemu) passes the checks of `pki check` for both
roles. This is the flag a CloudStack agent reports to the management server. qemu.conf and
libvirtd.conf settings that differ from what `host secure` sets are listed as warnings.

Example:
  qemu-tls-migrate host status --json
  {\"secured\":false,\"reasons\":[\"/etc/pki/qemu/server-key.pem: does not exist; ...\"],...}

Beside it, CloudStack's own verdict (\"cloudstack\"): the agent installed (agent.properties),
cloud.crt next to it, and the qemu+tls://<privateIp>/system self-connect the agent makes
(probed with --private-ip when libvirtd runs here, else \"not-checked\" with the reason), and
whether the PKI directory holds the agent's current certificates (\"pki\": in-step, stale).
When the two verdicts differ, \"disagreement\" names both (migrate --transport auto refuses).

Exit status: 0 when secured and CloudStack agrees, 1 otherwise.")]
    Status(StatusArgs),
    /// libvirt's qemu hook: a domain migrated in by libvirt loses what serve --libvirt added.
    #[command(long_about = "\
libvirt's qemu hook (install as /etc/libvirt/hooks/qemu.d/qemu-tls-migrate, a script running
`qemu-tls-migrate host libvirt-hook \"$@\"`; the Debian package ships it; restart libvirtd
once). libvirt keeps a running domain's arguments: a domain that `serve --libvirt` brought in
runs with the service's `<qemu:commandline>` (-qmp unix:.../qtm-in-ID.sock,server=on,wait=off
-incoming defer), and libvirt's own next migration of it (virsh migrate, CloudStack's agent)
carries them to the next host. For `migrate begin` and `restore begin` (the domain XML on
standard input), this prints the XML without exactly those arguments, which libvirt then uses;
any other domain, operation or input gets no output (libvirt keeps its XML) and exit 0, so the
hook never stops a migration.")]
    LibvirtHook(LibvirtHookArgs),
}

#[derive(Debug, Args)]
pub struct LibvirtHookArgs {
    /// The domain's name (libvirt's first argument).
    pub guest: String,
    /// The operation: migrate, restore, start, ...
    pub operation: String,
    /// The sub-operation: begin, end, ...
    pub sub_operation: String,
    /// libvirt's extra arguments ("-").
    pub extra: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SecureArgs {
    /// Directory holding cloud.ca.crt, cloud.crt and cloud.key [default: ROOT/etc/cloudstack/agent].
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// Place every file written under this directory instead of / (for tests and images).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// The PKI directory QEMU reads, as seen on the host.
    #[arg(long, value_name = "DIR", default_value = pki::DEFAULT_PKI_DIR)]
    pub pki_dir: PathBuf,
    /// Print what would change (a unified diff for configuration files); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Look at the host under this directory instead of / (for tests and images).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// This host's private IP, as CloudStack knows it: probe qemu+tls://ADDR/system as the
    /// agent does (without it, or with --root, the self-connect is reported as not checked).
    #[arg(long, value_name = "ADDR")]
    pub private_ip: Option<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: HostCommand) -> anyhow::Result<Outcome> {
    match cmd {
        HostCommand::Secure(args) => secure(args),
        HostCommand::Status(args) => status(args),
        HostCommand::LibvirtHook(args) => libvirt_hook(&args),
    }
}

fn libvirt_hook(args: &LibvirtHookArgs) -> anyhow::Result<Outcome> {
    use std::io::{Read, Write};
    if !matches!(
        (args.operation.as_str(), args.sub_operation.as_str()),
        ("migrate" | "restore", "begin")
    ) {
        return Ok(Outcome::Success);
    }
    let mut text = String::new();
    if std::io::stdin().read_to_string(&mut text).is_err() {
        return Ok(Outcome::Success);
    }
    let cleaned = qemu_tls_migrate::libvirt::DomainXml::parse(text)
        .and_then(|x| x.without_service_commandline());
    match cleaned {
        Ok(Some(xml)) => {
            tracing::info!(domain = %args.guest, "libvirt hook: the service's QMP monitor and -incoming defer removed");
            std::io::stdout()
                .write_all(xml.as_str().as_bytes())
                .context("writing the domain XML for libvirt")?;
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(domain = %args.guest, "libvirt hook: XML left as it is: {e}"),
    }
    Ok(Outcome::Success)
}

fn secure(args: SecureArgs) -> anyhow::Result<Outcome> {
    // The follower runs the packaged binary when the host has it, else this one.
    let packaged = host::under(&args.root, std::path::Path::new(host::INSTALLED_BINARY));
    let exec = if packaged.is_file() {
        None
    } else {
        std::env::current_exe().ok()
    };
    let options = SecureOptions {
        root: args.root.clone(),
        from: args.from.clone(),
        pki_dir: args.pki_dir.clone(),
        exec,
    };
    let plan = host::plan_secure(&options)
        .with_context(|| format!("securing the host under {}", args.root.display()))?;
    let firewall_hint = format!(
        "load the firewall rules with `nft -f {}` or `iptables-restore --noflush < {}`",
        host::NFT_RULES,
        host::IPTABLES_RULES
    );
    let mut report = SecureReport {
        root: plan.root.clone(),
        source_dir: plan.source_dir.clone(),
        pki_dir: plan.pki_dir.clone(),
        dry_run: args.dry_run,
        changes: plan.changes(),
        unchanged: plan.unchanged.clone(),
        diff: None,
        pki: None,
        firewall_hint,
        follower_hint: "start the renewal follower with `systemctl daemon-reload && systemctl \
                        start qemu-tls-migrate-renew.path` (it is enabled)"
            .to_string(),
    };
    if args.dry_run {
        report.diff = Some(plan.diff());
    } else {
        report.changes = plan
            .apply()
            .with_context(|| format!("securing the host under {}", args.root.display()))?;
        report.pki = Some(pki::check_dir(&plan.pki_dir, None));
    }
    let usable = report.pki.as_ref().is_none_or(|r| r.usable);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_secure(&report);
    }
    Ok(if usable {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

fn print_secure(report: &SecureReport) {
    if report.changes.is_empty() {
        println!(
            "Host under {} is already secured as `host secure` would; nothing changed.",
            report.root.display()
        );
    } else if let Some(diff) = &report.diff {
        println!(
            "Dry run: {} change(s) under {} (nothing written):",
            report.changes.len(),
            report.root.display()
        );
        print!("{diff}");
    } else {
        println!(
            "Secured the host under {} from {}:",
            report.root.display(),
            report.source_dir.display()
        );
        for change in &report.changes {
            let backup = change
                .backup
                .as_ref()
                .map(|b| format!(" (backup {})", b.display()))
                .unwrap_or_default();
            println!("  {:<8} {}{backup}", change.action, change.path.display());
        }
        println!(
            "Restart libvirtd to use the new settings; {}; {}.",
            report.firewall_hint, report.follower_hint
        );
    }
    if let Some(pki) = &report.pki {
        for finding in &pki.findings {
            println!("pki check: {}", finding.reason());
        }
        if !pki.usable {
            println!(
                "The PKI directory {} is not usable for migration: fix the certificates above.",
                pki.dir.display()
            );
        }
    }
}

/// libvirt's socket: no libvirtd runs without it.
const LIBVIRT_SOCKET: &str = "/run/libvirt/libvirt-sock";

/// CloudStack's self-connect (`qemu+tls://<privateIp>/system`), when it can be made here.
fn probe_self_connect(args: &StatusArgs) -> SelfConnect {
    if args.root != std::path::Path::new("/") {
        return SelfConnect::NotChecked {
            reason: format!(
                "--root {} is not this machine's /: its libvirtd is not that host's",
                args.root.display()
            ),
        };
    }
    let Some(ip) = &args.private_ip else {
        return SelfConnect::NotChecked {
            reason: "no --private-ip given (the agent connects to qemu+tls://<its private IP>/                     system)"
                .to_string(),
        };
    };
    if !std::path::Path::new(LIBVIRT_SOCKET).exists() {
        return SelfConnect::NotChecked {
            reason: format!("no libvirtd here ({LIBVIRT_SOCKET} does not exist)"),
        };
    }
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.clone()
    };
    let uri = format!("qemu+tls://{host}/system");
    match qemu_tls_migrate::libvirt::Libvirt::connect(&uri) {
        Ok(_) => SelfConnect::Ok { uri },
        Err(e) => SelfConnect::Failed {
            uri,
            error: crate::output::error_chain(&e).join(": "),
        },
    }
}

fn status(args: StatusArgs) -> anyhow::Result<Outcome> {
    let status = host::status(&args.root, probe_self_connect(&args));
    if args.json {
        println!("{}", serde_json::to_string(&status)?);
    } else {
        if status.secured {
            println!("secured (PKI directory {})", status.pki_dir.display());
        } else {
            println!("not secured (PKI directory {}):", status.pki_dir.display());
        }
        for reason in &status.reasons {
            println!("  {reason}");
        }
        for warning in &status.warnings {
            println!("  warning: {warning}");
        }
        let cs = &status.cloudstack;
        if cs.agent_installed {
            println!(
                "CloudStack calls it {} ({}/cloud.crt {}; self-connect: {})",
                if cs.secured { "secured" } else { "not secured" },
                cs.agent_dir.display(),
                if cs.cert_present {
                    "present"
                } else {
                    "missing"
                },
                match &cs.self_connect {
                    SelfConnect::Ok { uri } => format!("{uri} works"),
                    SelfConnect::Failed { uri, error } => format!("{uri} failed: {error}"),
                    SelfConnect::NotChecked { reason } => format!("not checked: {reason}"),
                }
            );
        }
        if let Some(d) = &status.disagreement {
            println!("  disagreement: {d}");
        }
        let native = &status.libvirt_tls_migration;
        if native.ready {
            println!("libvirt's own TLS migration (virsh migrate --tls): ready");
        } else {
            println!("libvirt's own TLS migration (virsh migrate --tls): not ready:");
            for reason in &native.reasons {
                println!("  {reason}");
            }
        }
    }
    Ok(if status.secured && status.disagreement.is_none() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
