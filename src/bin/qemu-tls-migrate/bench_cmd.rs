//! `qemu-tls-migrate bench`: TLS against the TCP baseline, side by side, on fresh local VM
//! pairs running the guest workload. Arguments become a [`BenchConfig`]; the harness is
//! [`qemu_tls_migrate::bench`].

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use qemu_tls_migrate::bench::{
    self, BenchConfig, BenchError, BenchEvent, BenchReport, DEFAULT_RUN_TIMEOUT, HEAVY_RUN_TIMEOUT,
    Mode, WorkloadConfig,
};
use qemu_tls_migrate::vm::Accel;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;

/// Defaults of a full run and of `--quick` (the CI smoke check, under three minutes here).
struct Defaults {
    ram_mib: u32,
    working_set_mib: u32,
    dirty_rate: u32,
    repeat: u32,
    warmup: u32,
}

const FULL: Defaults = Defaults {
    ram_mib: 1024,
    working_set_mib: 256,
    dirty_rate: 5_000,
    repeat: 5,
    warmup: 1,
};

const QUICK: Defaults = Defaults {
    ram_mib: 128,
    working_set_mib: 32,
    dirty_rate: 5_000,
    repeat: 1,
    warmup: 1,
};

/// Multifd channels of the `tls-mfdN` mode unless `--multifd` says otherwise (QEMU's own
/// default channel count).
const DEFAULT_MULTIFD: u8 = 2;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    /// The guest workload runs, dirtying its working set at --dirty-rate.
    Running,
    /// The data plane alone: the source paused, its RAM full of pseudo-random bytes.
    Static,
    /// A guest dirtying faster than plain TLS moves it (default: half its RAM, unpaced), with a
    /// 30 s deadline: runs that do not converge are counted, not fatal. For comparing the
    /// convergence modes (auto-converge, xbzrle, zstd, pause-after).
    Heavy,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum AccelArg {
    /// KVM when a probe VM runs under it, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args)]
#[command(
    long_about = "Benchmark QEMU-native TLS migration against the plain TCP baseline on this \
machine. For every run it starts a fresh source VM booting the guest workload (a small multiboot \
kernel built with this tool that dirties a working set of RAM at a set rate) and a fresh \
destination VM, makes a lab PKI, and migrates over loopback with the tool's own migration code.\n\n\
Modes run interleaved (tcp tls ... tcp tls ...), after discarded warm-up rounds. Per mode it \
reports the median and spread of total migration time, RAM throughput, downtime, RAM bytes sent \
over guest RAM, the tool's own time (wall time beyond QEMU's), CPU seconds the source and \
destination QEMU spent outside their vCPU threads (from /proc) and the whole machine's busy CPU \
seconds (proxies included), and each median's ratio to the tcp mode's.\n\n\
Modes: tcp, tls, tls-mfdN (TLS over N multifd channels), tcp-mfdN, tls-aes128, tls-aes256, \
tls-chacha20 (TLS limited to one cipher through the credentials' GnuTLS priority string), \
tls-proxy (QEMU in plain TCP through a socat/OpenSSL TLS proxy pair: KubeVirt's and tunnelled \
migration's design), ssh (QEMU in plain TCP through an SSH port forward into an sshd the bench \
starts on loopback: Proxmox's secure migration), and the convergence aids over TLS: \
auto-converge, xbzrle, zstd (2 multifd channels, compressed), pause-after (the guest paused at \
--pause-after seconds). With --profile heavy a run that does not converge by --timeout is \
counted (runs column: \"3 (1 done)\"), not fatal.",
    after_help = "Examples:\n  qemu-tls-migrate bench --quick\n  \
qemu-tls-migrate bench --ram-mib 1024 --working-set-mib 0 --repeat 5 --out bench-out\n  \
qemu-tls-migrate bench --modes tcp,tls,tls-mfd4 --dirty-rate 50000 --json\n\n\
With --json, progress goes to stderr as JSON lines and stdout carries the report as one JSON \
object. --out DIR writes bench.json (the report), bench.csv (one line per mode), runs.csv (one \
line per run), bench.svg (throughput per mode), phases.svg (each mode's wall by phase) and \
summary.md (the results, the phases and the gate's verdict in Markdown, for a CI job page)."
)]
pub struct BenchArgs {
    /// Modes to compare, comma-separated (default: tcp,tls,tls-mfdN,tls-aes128,tls-aes256,
    /// tls-chacha20). Ratios are taken to tcp, so keep it in the list. libvirt-tls,
    /// libvirt-tcp, tool-domain-tls, tool-domain-tcp: a libvirt domain between two libvirtds
    /// the bench starts, migrated by virsh migrate --p2p or by migrate --domain into serve
    /// --libvirt (README, "Performance").
    #[arg(long, value_delimiter = ',', value_parser = parse_mode)]
    pub modes: Vec<Mode>,
    /// Run every mode on each of these QEMU binaries too, side by side in the same rounds
    /// (repeatable; LABEL=PATH, e.g. --qemu 7.2=/usr/bin/qemu-system-x86_64 --qemu
    /// 10.0=.qemu/10.0/bin/qemu-system-x86_64). The first keeps the plain mode names (its tcp
    /// is the baseline of every ratio); the others' modes are named MODE@LABEL.
    #[arg(long = "qemu", value_name = "LABEL=PATH", value_parser = parse_qemu)]
    pub qemus: Vec<bench::QemuBinary>,
    /// Multifd channels of the default matrix's tls-mfdN mode.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MULTIFD,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub multifd: u8,
    /// Guest RAM in MiB (default 1024; 128 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..=65536))]
    pub ram_mib: Option<u32>,
    /// Guest memory the workload dirties, in MiB; 0 for an idle guest (default 256; 32 with
    /// --quick).
    #[arg(long)]
    pub working_set_mib: Option<u32>,
    /// Pages (4 KiB) the workload dirties per second; 0 for as fast as the guest CPU can
    /// (default 5000, also with --quick).
    #[arg(long, value_name = "PAGES_PER_SEC")]
    pub dirty_rate: Option<u32>,
    /// Size of a local disk copied with the RAM (NBD mirror over the same transport), in MiB;
    /// 0 for none.
    #[arg(long, default_value_t = 0)]
    pub disk_mib: u32,
    /// Before each migration, write this many MiB of data into guest RAM through the RAM file,
    /// from outside the guest (as `demo` and the tests fill RAM), above the working set.
    /// Reproduces the double send under KVM described in README.md, "Performance".
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub file_fill_mib: u32,
    /// Measured rounds (default 5; 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: Option<u32>,
    /// Rounds run first and discarded (default 1).
    #[arg(long)]
    pub warmup: Option<u32>,
    /// Small and short: 128 MiB guests, one measured round; what CI runs as a smoke check.
    #[arg(long)]
    pub quick: bool,
    /// Accelerator of the guests.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: AccelArg,
    /// Give up on a migration after this many seconds (default 300; 30 with --profile heavy).
    #[arg(long, value_name = "SECS", value_parser = crate::parse::timeout_secs())]
    pub timeout: Option<u64>,
    /// Cap every mode's RAM stream (bytes per second, K/M/G suffix).
    #[arg(long, value_name = "RATE", value_parser = crate::parse::parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// The pause-after mode's deadline, after which it pauses the guest (seconds).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = crate::parse::timeout_secs())]
    pub pause_after: u64,
    /// Where the VMs' directories go (RAM files included; default /dev/shm when present).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Write bench.json, bench.csv, runs.csv, bench.svg, phases.svg and summary.md into DIR
    /// (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Progress as JSON lines on stderr, the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// running: the guest workload dirties RAM while it moves; static: the source paused with
    /// its RAM full of random bytes, measuring the data plane alone.
    #[arg(long, value_enum, default_value = "running")]
    pub profile: ProfileArg,
    /// Compare this run's ratios to tcp with a stored run's (a bench.json of the same host
    /// kind, e.g. from --out): TLS/TCP throughput, end-to-end time, downtime and bytes sent per
    /// RAM byte, per mode. Exit 1 when one moved the bad way by more than --max-regression.
    /// Only ratios are gated, never absolute times: CI machines are noisy.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// How far a gated ratio may move the bad way before the run fails (10% or 0.1).
    #[arg(long, value_name = "PCT", default_value = "10%", value_parser = bench::gate::parse_threshold)]
    pub max_regression: f64,
    /// The gated metrics, comma-separated (default all: ram_mbps, total_ms, downtime_ms,
    /// sent_ratio). Downtime of a small guest varies too much to gate on a short run.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub gate_metrics: Vec<String>,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::by_name(s).ok_or_else(|| {
        format!(
            "unknown mode {s:?}: use tcp, tls, tls-mfdN, tcp-mfdN, tls-aes128, tls-aes256, \
             tls-chacha20, tls-proxy, ssh, auto-converge, xbzrle, zstd or pause-after"
        )
    })
}

/// `LABEL=PATH` of `--qemu`: the path must be an existing file.
fn parse_qemu(s: &str) -> Result<bench::QemuBinary, String> {
    let (label, path) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected LABEL=PATH, e.g. 10.0=.qemu/10.0/bin/qemu-system-x86_64")
    })?;
    if label.is_empty()
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
    {
        return Err(format!(
            "{label:?}: a label is letters, digits, '.', '-' or '_'"
        ));
    }
    let path = std::path::PathBuf::from(path);
    if !path.is_file() {
        return Err(format!("{}: no such QEMU binary", path.display()));
    }
    Ok(bench::QemuBinary {
        label: label.to_string(),
        path,
    })
}

impl BenchArgs {
    /// The checked plan.
    pub fn config(&self) -> anyhow::Result<BenchConfig> {
        let d = if self.quick { QUICK } else { FULL };
        let modes = if self.modes.is_empty() {
            Mode::standard(self.multifd)
        } else {
            self.modes.clone()
        };
        let mut labels: Vec<&str> = self.qemus.iter().map(|q| q.label.as_str()).collect();
        labels.sort_unstable();
        if labels.windows(2).any(|w| w[0] == w[1]) {
            bail!("a label is given twice in --qemu");
        }
        let modes = Mode::across(&modes, &self.qemus);
        let mut names: Vec<&str> = modes.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            bail!("a mode is listed twice in --modes");
        }
        let ram_mib = self.ram_mib.unwrap_or(d.ram_mib);
        let heavy = matches!(self.profile, ProfileArg::Heavy);
        let working_set_mib = self.working_set_mib.unwrap_or(if heavy {
            ram_mib / 2
        } else {
            d.working_set_mib
        });
        // The working set starts at 4 MiB of guest RAM; the guest caps it to what there is.
        if working_set_mib > ram_mib.saturating_sub(6) {
            bail!(
                "a working set of {working_set_mib} MiB does not fit a {ram_mib} MiB guest (at \
                 most {} MiB)",
                ram_mib.saturating_sub(6)
            );
        }
        if self.disk_mib > 0 && modes.iter().any(|m| m.proxy.is_some()) {
            bail!(
                "the tls-proxy and ssh modes carry the migration stream only, not NBD: drop --disk-mib"
            );
        }
        Ok(BenchConfig {
            profile: match self.profile {
                ProfileArg::Running => bench::Profile::Running,
                ProfileArg::Static => bench::Profile::Static,
                ProfileArg::Heavy => bench::Profile::Heavy,
            },
            modes,
            ram_mib,
            workload: WorkloadConfig {
                working_set_mib,
                pages_per_sec: self
                    .dirty_rate
                    .unwrap_or(if heavy { 0 } else { d.dirty_rate }),
            },
            disk_mib: self.disk_mib,
            file_fill_mib: self.file_fill_mib,
            repeat: self.repeat.unwrap_or(d.repeat),
            warmup: self.warmup.unwrap_or(d.warmup),
            accel: match self.accel {
                AccelArg::Auto => None,
                AccelArg::Kvm => Some(Accel::Kvm),
                AccelArg::Tcg => Some(Accel::Tcg),
            },
            run_timeout: Duration::from_secs(self.timeout.unwrap_or(if heavy {
                HEAVY_RUN_TIMEOUT.as_secs()
            } else {
                DEFAULT_RUN_TIMEOUT.as_secs()
            })),
            max_bandwidth: self.max_bandwidth,
            pause_after: Duration::from_secs(self.pause_after),
            work_dir: self.work_dir.clone(),
        })
    }
}

/// Where progress goes.
enum Progress {
    Bar(ProgressBar),
    JsonLines,
    Silent,
}

impl Progress {
    fn new(json: bool, quiet: bool, runs: u64) -> Progress {
        if json {
            Progress::JsonLines
        } else if quiet || !std::io::stderr().is_terminal() {
            Progress::Silent
        } else {
            let bar = ProgressBar::new(runs);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} bench [{bar:30}] run {pos}/{len} {elapsed_precise} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            Progress::Bar(bar)
        }
    }

    fn event(&self, e: &BenchEvent<'_>) {
        match (self, e) {
            (Progress::Silent, _) => {}
            (
                Progress::JsonLines,
                BenchEvent::RunStarted {
                    run,
                    runs,
                    round,
                    warmup,
                    mode,
                },
            ) => eprintln!(
                "{}",
                json!({"bench": {"event": "run-started", "run": run, "runs": runs,
                        "round": round, "warmup": warmup, "mode": mode.name}})
            ),
            (Progress::JsonLines, BenchEvent::RunFinished { result, .. }) => {
                eprintln!(
                    "{}",
                    json!({"bench": {"event": "run-finished", "result": result}})
                )
            }
            (Progress::JsonLines, _) => {}
            (
                Progress::Bar(bar),
                BenchEvent::RunStarted {
                    run,
                    round,
                    warmup,
                    mode,
                    ..
                },
            ) => {
                bar.set_position(*run as u64);
                let kind = if *warmup { "warm-up" } else { "round" };
                bar.set_message(format!("{mode} ({kind} {}): starting VMs", round + 1));
            }
            (Progress::Bar(bar), BenchEvent::Migrating { .. }) => {
                bar.set_message(format!("{}: migrating", message_head(bar)));
            }
            (Progress::Bar(bar), BenchEvent::Migration { progress, .. }) => {
                if let Some(ram) = &progress.ram
                    && ram.total > 0
                {
                    let done = ram.total.saturating_sub(ram.remaining) as f64 / ram.total as f64;
                    bar.set_message(format!(
                        "{}: migrating {:.0}%, {:.0} Mbit/s",
                        message_head(bar),
                        done * 100.0,
                        ram.mbps
                    ));
                }
            }
            (Progress::Bar(bar), BenchEvent::RunFinished { run, result }) => {
                bar.set_position(*run as u64 + 1);
                bar.set_message(format!(
                    "{}: {} ms, {:.0} Mbit/s",
                    result.mode, result.total_ms, result.ram_mbps
                ));
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The "mode (round N)" part of the bar's message.
fn message_head(bar: &ProgressBar) -> String {
    let msg = bar.message();
    msg.split(':').next().unwrap_or_default().to_string()
}

pub async fn run(args: BenchArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let config = args.config()?;
    // Read before the long run, so a bad path fails at once.
    let baseline: Option<serde_json::Value> = match &args.baseline {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the baseline {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!("the baseline {} is not JSON (a bench.json)", path.display())
            })?)
        }
        None => None,
    };
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
    }
    let runs = u64::from(config.warmup + config.repeat) * config.modes.len() as u64;
    let progress = Progress::new(args.json, quiet, runs);
    let cancel = CancellationToken::new();
    let watcher = tokio::spawn(crate::signals::cancel_on_signal(cancel.clone()));
    let mut on_event = |e: BenchEvent<'_>| progress.event(&e);
    let result = bench::run(&config, &mut on_event, &cancel).await;
    watcher.abort();
    progress.finish();
    let report = match result {
        Ok(r) => r,
        Err(BenchError::Cancelled) => {
            eprintln!("bench: cancelled");
            return Ok(Outcome::Cancelled);
        }
        Err(e) => return Err(e).context("benchmark failed"),
    };
    let gate = match &baseline {
        Some(base) => Some(
            bench::gate::compare(
                base,
                &serde_json::to_value(&report)?,
                args.max_regression,
                &args.gate_metrics,
            )
            .context("cannot compare with the baseline")?,
        ),
        None => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(g) = &gate {
            v["gate"] = serde_json::to_value(g)?;
        }
        println!("{v}");
    } else {
        print!("{}", bench::render_table(&report));
        if let Some(g) = &gate {
            println!(
                "\nagainst the baseline (max regression {:.0}%):\n{}",
                g.max_regression * 100.0,
                g.render()
            );
        }
    }
    if let Some(out) = &args.out {
        let written = write_outputs(&report, gate.as_ref(), out)?;
        if !quiet {
            eprintln!("bench: wrote {}", written.join(", "));
        }
    }
    match gate {
        Some(g) if g.regressed() => {
            eprintln!("bench: a ratio regressed beyond the threshold (see the table)");
            Ok(Outcome::Failed)
        }
        _ => Ok(Outcome::Success),
    }
}

/// Writes the output files; returns their paths.
fn write_outputs(
    report: &BenchReport,
    gate: Option<&bench::gate::GateReport>,
    dir: &Path,
) -> anyhow::Result<Vec<String>> {
    let files = [
        ("bench.json", serde_json::to_string_pretty(report)? + "\n"),
        ("bench.csv", report.to_csv()),
        ("runs.csv", report.runs_csv()),
        ("bench.svg", bench::render_svg(report)),
        ("phases.svg", bench::phases::render_svg(report)),
        ("summary.md", bench::phases::render_markdown(report, gate)),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn config(args: &[&str]) -> anyhow::Result<BenchConfig> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))?;
        cli.bench.config()
    }

    #[test]
    fn quick_is_small_and_explicit_values_win() {
        let c = config(&["--quick", "--ram-mib", "256"]).expect("config");
        assert_eq!((c.ram_mib, c.repeat, c.warmup), (256, 1, 1));
        assert_eq!(c.workload.working_set_mib, QUICK.working_set_mib);
        assert_eq!(c.modes[0].name, "tcp");
    }

    #[test]
    fn modes_are_parsed_and_duplicates_refused() {
        let c = config(&["--modes", "tcp,tls-mfd4"]).expect("config");
        assert_eq!(c.modes[1].multifd, Some(4));
        assert!(config(&["--modes", "tcp,tcp"]).is_err());
        assert!(config(&["--modes", "tcp,udp"]).is_err());
    }

    #[test]
    fn a_working_set_larger_than_the_guest_is_refused() {
        let err = config(&["--ram-mib", "64", "--working-set-mib", "64"]).expect_err("too big");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
