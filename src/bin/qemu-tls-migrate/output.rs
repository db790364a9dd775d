//! What the migration commands print: a progress bar on a terminal, JSON lines on stderr with
//! `--json`, and the final report (human text, or exactly one JSON object on stdout).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use qemu_tls_migrate::migration::{Forecast, ForecastMade, Progress, QmpAccess, Report};
use serde_json::{Value, json};

/// Where progress goes.
pub enum ProgressOut {
    /// A live bar on stderr (a terminal, no `--json`).
    Bar(ProgressBar),
    /// One JSON object per line on stderr, with the job's id when it has one.
    JsonLines(Option<String>),
    /// Nothing (`-q`, or not a terminal without `--json`).
    Silent,
}

impl ProgressOut {
    pub fn new(json: bool, quiet: bool) -> ProgressOut {
        if quiet {
            ProgressOut::Silent
        } else if json {
            ProgressOut::JsonLines(None)
        } else if !std::io::stderr().is_terminal() {
            ProgressOut::Silent
        } else {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:>9} [{bar:30}] {bytes}/{total_bytes} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            ProgressOut::Bar(bar)
        }
    }

    pub fn update(&self, p: &Progress) {
        match self {
            ProgressOut::Silent => {}
            ProgressOut::JsonLines(None) => eprintln!("{}", json!({"progress": p})),
            // "progress" stays the line's first member, for readers that match the prefix.
            ProgressOut::JsonLines(Some(id)) => {
                eprintln!("{{\"progress\":{},\"job\":{}}}", json!(p), json!(id))
            }
            ProgressOut::Bar(bar) => {
                bar.set_prefix(p.phase.as_str());
                if p.ram.is_none() && !p.disks.is_empty() {
                    let len: u64 = p.disks.iter().map(|d| d.len).sum();
                    let done: u64 = p.disks.iter().map(|d| d.offset).sum();
                    let ready = p.disks.iter().filter(|d| d.ready).count();
                    let top = p.disks.iter().filter(|d| !d.copy.is_full()).count();
                    let to_copy: u64 = p.disks.iter().map(|d| d.to_copy).sum();
                    bar.set_length(len);
                    bar.set_position(done);
                    bar.set_message(format!(
                        "disks {ready}/{} in sync ({top} top-only), {} allocated to copy",
                        p.disks.len(),
                        indicatif::HumanBytes(to_copy)
                    ));
                } else if let Some(ram) = &p.ram {
                    bar.set_length(ram.total);
                    bar.set_position(ram.total.saturating_sub(ram.remaining));
                    let remaining_s = if ram.mbps > 0.0 {
                        ram.remaining as f64 * 8.0 / (ram.mbps * 1e6)
                    } else {
                        0.0
                    };
                    bar.set_message(format!(
                        "{:.0} Mbit/s, ~{remaining_s:.1} s left, dirty {} pages/s, sent {}",
                        ram.mbps,
                        ram.dirty_pages_rate,
                        indicatif::HumanBytes(ram.transferred),
                    ));
                } else if let Some(status) = p.status {
                    bar.set_message(status.as_str());
                }
            }
        }
    }

    /// Names the job in every JSON progress line.
    pub fn with_job(self, id: &str) -> ProgressOut {
        match self {
            ProgressOut::JsonLines(_) => ProgressOut::JsonLines(Some(id.to_string())),
            other => other,
        }
    }

    pub fn finish(&self) {
        if let ProgressOut::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// The stable JSON form of a report (documented in README.md).
pub fn report_json(report: &Report) -> Value {
    let mut v = json!({
        "status": report.status,
        "transport": report.transport,
        "ram": {
            "bytes": report.ram.bytes,
            "total_ms": report.ram.total_ms,
            "downtime_ms": report.ram.downtime_ms,
            "throughput_mbps": report.ram.throughput_mbps,
            "guest_ram_bytes": report.ram.total,
            "dirty_sync_count": report.ram.dirty_sync_count,
            "multifd_bytes": report.ram.multifd_bytes,
        },
        "disks": report.disks,
        "ports": report.ports,
        "wall_ms": report.wall.as_millis() as u64,
        "multifd_channels": report.multifd,
        "timing": report.timing,
        "tool": report.tool,
        "warnings": report.warnings,
    });
    if let Some(access) = report.source_qmp_access {
        v["source_qmp"] = json!(access);
    }
    if let Some(end) = &report.source_end {
        v["source_end"] = json!(end);
    }
    if let Some(q) = &report.qemu {
        v["qemu"] = json!({
            "source": q.source.to_string(),
            "destination": q.destination.to_string(),
        });
    }
    if !report.convergence.is_empty() {
        v["convergence"] = json!(report.convergence);
    }
    if let Some(f) = &report.forecast {
        v["forecast"] = json!(f);
    }
    if let Some(pause) = &report.guest_pause {
        v["guest_pause"] = json!(pause);
    }
    if let Some(err) = &report.error {
        let chain = error_chain(err);
        v["error"] = json!({
            "kind": err.kind(),
            "message": chain.join(": "),
            "chain": chain,
        });
    }
    if !report.cleanup_errors.is_empty() {
        v["cleanup_errors"] = json!(report.cleanup_errors);
    }
    v
}

/// The messages of an error and its sources, outermost first.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![err.to_string()];
    let mut source = err.source();
    while let Some(s) = source {
        out.push(s.to_string());
        source = s.source();
    }
    out
}

/// [`report_json`] with the job's id (`"job"`), when the run had one.
pub fn report_json_job(report: &Report, job: Option<&str>) -> Value {
    let mut v = report_json(report);
    if let Some(id) = job {
        v["job"] = json!(id);
    }
    v
}

/// Prints a forecast (`migrate --plan`): one JSON object, or words.
pub fn print_forecast(f: &Forecast, json: bool) {
    if json {
        println!("{}", json!({ "forecast": f }));
        return;
    }
    println!(
        "forecast: {} ({} MiB of {} MiB RAM holds data; the guest dirties {} MiB/s; {} Mbit/s from {})",
        if f.converges {
            "converges"
        } else {
            "will NOT converge as configured"
        },
        f.ram_data_bytes >> 20,
        f.ram_bytes >> 20,
        f.dirty_rate_mib_s,
        f.throughput_mbps,
        f.throughput_from
    );
    if f.converges {
        println!(
            "  predicted: {} ms in {} pass(es), downtime {} ms (limit {} ms)",
            f.predicted_total_ms, f.predicted_passes, f.predicted_downtime_ms, f.downtime_limit_ms
        );
    }
    for a in &f.advice {
        println!("  would converge with: {a}");
    }
}

/// Prints the final report: one JSON object on stdout, or a human summary.
pub fn print_report(report: &Report, json: bool) {
    print_report_job(report, json, None);
}

/// [`print_report`], naming the run's job.
pub fn print_report_job(report: &Report, json: bool, job: Option<&str>) {
    if json {
        println!("{}", report_json_job(report, job));
        return;
    }
    let transport = report
        .transport
        .map(|t| t.to_string())
        .unwrap_or_else(|| "-".into());
    match job {
        Some(id) => println!(
            "migration {} over {transport} (job {id})",
            report.status.as_str()
        ),
        None => println!("migration {} over {transport}", report.status.as_str()),
    }
    if report.ram.total_ms > 0 {
        println!(
            "  RAM: {} sent ({} guest RAM) in {} ms, downtime {} ms, {:.1} Mbit/s, {} dirty syncs",
            indicatif::HumanBytes(report.ram.bytes),
            indicatif::HumanBytes(report.ram.total),
            report.ram.total_ms,
            report.ram.downtime_ms,
            report.ram.throughput_mbps,
            report.ram.dirty_sync_count,
        );
    }
    for d in &report.disks {
        println!(
            "  disk {} ({} copy, {} allocated to copy): {} copied in {} ms, {:.1} Mbit/s",
            d.device,
            d.copy.as_str(),
            indicatif::HumanBytes(d.to_copy),
            indicatif::HumanBytes(d.bytes),
            d.ms,
            d.throughput_mbps
        );
    }
    if let Some(q) = &report.qemu {
        println!(
            "  QEMU: {} on the source, {} on the destination",
            q.source, q.destination
        );
    }
    if let Some(at) = report.convergence.postcopy_at_ms {
        println!("  post-copy from {at} ms (from then on only a lost host loses the VM)");
    }
    for r in &report.convergence.postcopy_recoveries {
        match r.recovered_after_ms {
            Some(ms) => println!(
                "  post-copy paused at {} ms (link cut?), recovered in {ms} ms ({} attempts)",
                r.paused_at_ms, r.attempts
            ),
            None => println!(
                "  post-copy paused at {} ms, NOT recovered ({} attempts): both ends paused",
                r.paused_at_ms, r.attempts
            ),
        }
    }
    let t = &report.timing;
    println!(
        "  wall time: {} ms (set-up {}, disks {}, RAM {}, switch-over {}, finish {}, clean-up {})",
        report.wall.as_millis(),
        t.setup_ms,
        t.disks_ms,
        t.ram_ms,
        t.switchover_ms,
        t.finish_ms,
        t.cleanup_ms
    );
    if let Some(f) = &report.forecast {
        println!(
            "  forecast ({}): {}, {} ms predicted ({} pass{}, {} Mbit/s from {}, guest dirtying {} MiB/s) against {} ms measured",
            match f.made {
                ForecastMade::BeforeStart => "before starting",
                ForecastMade::FirstPass => "after the first pass",
            },
            if f.converges { "go" } else { "no-go" },
            f.predicted_total_ms,
            f.predicted_passes,
            if f.predicted_passes == 1 { "" } else { "es" },
            f.throughput_mbps,
            f.throughput_from,
            f.dirty_rate_mib_s,
            report.ram.total_ms
        );
    }
    if let Some(access) = report.source_qmp_access {
        let how = match access {
            QmpAccess::DeclaredMonitor => "its declared QMP monitor",
            QmpAccess::LibvirtPassthrough => "libvirt's QMP passthrough",
        };
        println!("  source domain reached through {how}");
    }
    match &report.source_end {
        Some(e) if e.failed() => println!(
            "  SOURCE NOT DESTROYED: domain {} is left paused on this host ({}); the guest runs \
             on the destination: destroy the source's copy (virsh destroy {})",
            e.domain,
            e.error.as_deref().unwrap_or("unknown error"),
            e.domain
        ),
        Some(e) => println!("  source domain {} destroyed", e.domain),
        None => {}
    }
    if let Some(pause) = &report.guest_pause {
        println!(
            "  guest paused {} ms, source STOP to destination RESUME ({} clock); QEMU's estimate {} ms",
            pause.ms, pause.clock, report.ram.downtime_ms
        );
    }
    println!(
        "  this tool: {} ms CPU, peak RSS {} KiB",
        report.tool.cpu_ms, report.tool.peak_rss_kib
    );
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    if let Some(err) = &report.error {
        let chain = error_chain(err);
        println!("  error [{}]: {}", err.kind(), chain.join(": "));
    }
    for c in &report.cleanup_errors {
        println!("  clean-up problem: {c}");
    }
}
