//! Results of a benchmark: per run, per mode (median, spread, ratio to `tcp`), and their
//! renderings: a terminal table, CSV and an SVG chart (the JSON is the serialised
//! [`BenchReport`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use super::measure::{HostInfo, git_revision};
use super::stats::{Stat, ratio};
use super::svg;
use super::{BenchConfig, Mode};
use crate::migration::Timing;
use crate::vm::Accel;

/// The name of the baseline mode ratios are taken to.
pub const BASELINE: &str = "tcp";

/// One migration's measurements.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct RunResult {
    /// Position in the run order (0-based, warm-up runs included).
    pub run: usize,
    pub round: u32,
    /// Warm-up runs are reported but not summarised.
    pub warmup: bool,
    pub mode: String,
    /// The migration completed; `false`: it did not converge by the deadline (rolled back), and
    /// only `wall_ms` and `host_cpu_s` are measured.
    pub completed: bool,
    /// QEMU's total migration time (`total-time`), setup to completion.
    pub total_ms: u64,
    pub setup_ms: u64,
    /// Guest pause at switch-over, QEMU's estimate.
    pub downtime_ms: u64,
    /// The guest's real pause: the source's STOP event to the destination's RESUME event.
    pub guest_pause_ms: Option<u64>,
    /// Wall time of the tool's whole migration (preflight and clean-up included).
    pub wall_ms: u64,
    /// RAM bytes QEMU sent (`ram.transferred`).
    pub ram_bytes: u64,
    pub guest_ram_bytes: u64,
    /// `ram_bytes` over `total_ms`, megabits per second.
    pub ram_mbps: f64,
    /// Pages sent whole (`ram.normal`) and sent as zero pages (`ram.duplicate`).
    pub normal_pages: u64,
    pub duplicate_pages: u64,
    pub dirty_sync_count: u64,
    /// QEMU's last dirty-page rate estimate (pages per second).
    pub dirty_pages_rate: u64,
    /// CPU seconds of the source and destination QEMU outside their vCPU threads during the
    /// migration: what migrating cost.
    pub src_cpu_s: f64,
    pub dst_cpu_s: f64,
    /// The same, vCPU threads included.
    pub src_cpu_total_s: f64,
    pub dst_cpu_total_s: f64,
    /// Bytes the disk mirrors copied (0 without disks).
    pub disk_bytes: u64,
    pub disk_mbps: Option<f64>,
    /// Busy CPU seconds of the whole machine during the migration (`/proc/stat`): the cost of
    /// a design, proxies or SSH included, which the QEMU columns do not see. Other work on the
    /// machine adds to it.
    pub host_cpu_s: f64,
    /// The tool's wall time phase by phase, as the migration's report times it. For libvirt's
    /// own modes only `ram_ms` (QEMU's RAM time, its switch-over included) is known.
    pub phases: Timing,
    /// Set-up and disk copy together, where the migrator reports them only together: libvirt's
    /// own modes (its migration job's time on the source less QEMU's RAM time; its short
    /// finish on the destination is in it too). `None`: `phases` splits them.
    pub setup_disks_ms: Option<u64>,
    /// The `total_ms` the migration's forecast predicted (made after QEMU's first pass, the
    /// default); `None`: no forecast was made.
    pub forecast_ms: Option<u64>,
}

impl RunResult {
    /// The tool's own time: its wall time beyond QEMU's `total-time` (set-up, credentials,
    /// clean-up).
    pub fn overhead_ms(&self) -> f64 {
        self.wall_ms.saturating_sub(self.total_ms) as f64
    }

    /// RAM bytes sent over guest RAM size.
    pub fn sent_ratio(&self) -> f64 {
        if self.guest_ram_bytes == 0 {
            0.0
        } else {
            self.ram_bytes as f64 / self.guest_ram_bytes as f64
        }
    }
}

/// The metrics summarised per mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    TotalMs,
    WallMs,
    OverheadMs,
    RamMbps,
    GuestPauseMs,
    DowntimeMs,
    SentRatio,
    SrcCpuS,
    DstCpuS,
    DirtySyncs,
    DiskMbps,
    HostCpuS,
    /// The forecast's error: predicted RAM time over measured, less one, in percent.
    ForecastErrorPct,
}

impl Metric {
    pub const ALL: [Metric; 13] = [
        Metric::TotalMs,
        Metric::WallMs,
        Metric::OverheadMs,
        Metric::RamMbps,
        Metric::GuestPauseMs,
        Metric::DowntimeMs,
        Metric::SentRatio,
        Metric::SrcCpuS,
        Metric::DstCpuS,
        Metric::DirtySyncs,
        Metric::DiskMbps,
        Metric::HostCpuS,
        Metric::ForecastErrorPct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Metric::TotalMs => "total_ms",
            Metric::WallMs => "wall_ms",
            Metric::OverheadMs => "overhead_ms",
            Metric::RamMbps => "ram_mbps",
            Metric::GuestPauseMs => "guest_pause_ms",
            Metric::DowntimeMs => "downtime_ms",
            Metric::SentRatio => "sent_ratio",
            Metric::SrcCpuS => "src_cpu_s",
            Metric::DstCpuS => "dst_cpu_s",
            Metric::DirtySyncs => "dirty_syncs",
            Metric::DiskMbps => "disk_mbps",
            Metric::HostCpuS => "host_cpu_s",
            Metric::ForecastErrorPct => "forecast_error_pct",
        }
    }

    fn of(self, r: &RunResult) -> Option<f64> {
        Some(match self {
            Metric::TotalMs => r.total_ms as f64,
            Metric::WallMs => r.wall_ms as f64,
            Metric::OverheadMs => r.overhead_ms(),
            Metric::RamMbps => r.ram_mbps,
            Metric::GuestPauseMs => return r.guest_pause_ms.map(|v| v as f64),
            Metric::DowntimeMs => r.downtime_ms as f64,
            Metric::SentRatio => r.sent_ratio(),
            Metric::SrcCpuS => r.src_cpu_s,
            Metric::DstCpuS => r.dst_cpu_s,
            Metric::DirtySyncs => r.dirty_sync_count as f64,
            Metric::DiskMbps => return r.disk_mbps,
            Metric::HostCpuS => r.host_cpu_s,
            Metric::ForecastErrorPct => {
                let predicted = r.forecast_ms? as f64;
                if r.total_ms == 0 {
                    return None;
                }
                (predicted / r.total_ms as f64 - 1.0) * 100.0
            }
        })
    }
}

/// One metric of one mode.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct MetricSummary {
    pub metric: Metric,
    #[serde(flatten)]
    pub stat: Stat,
    /// This mode's median over the baseline's (`tcp`) median, same run.
    pub ratio_to_tcp: Option<f64>,
}

/// A mode's measured runs, summarised.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModeSummary {
    pub mode: Mode,
    pub description: String,
    pub runs: usize,
    /// Measured runs that completed (the rest did not converge by the deadline).
    pub completed: usize,
    pub metrics: Vec<MetricSummary>,
}

impl ModeSummary {
    pub fn get(&self, metric: Metric) -> Option<&MetricSummary> {
        self.metrics.iter().find(|m| m.metric == metric)
    }

    pub fn median(&self, metric: Metric) -> Option<f64> {
        self.get(metric).map(|m| m.stat.median)
    }
}

/// What ran the guests: `accel` for the bench's own VMs, TCG for libvirt domains.
fn accel_label(accel: Accel, modes: &[Mode]) -> String {
    let domains = modes.iter().filter(|m| m.domain.is_some()).count();
    match domains {
        0 => accel.as_str().to_string(),
        n if n == modes.len() => "tcg (libvirt domains)".to_string(),
        _ => format!("{} (bench VMs), tcg (libvirt domains)", accel.as_str()),
    }
}

/// Everything a benchmark produced; serialised as the JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub tool_version: &'static str,
    pub git_revision: String,
    pub host: HostInfo,
    pub qemu_version: String,
    /// The guests' accelerator: the bench's own VMs' (`kvm`, `tcg`), and the libvirt modes'
    /// domains, which always run TCG (libvirt's QEMU may not open `/dev/kvm` here).
    pub accel: String,
    pub work_dir: PathBuf,
    pub started_unix: u64,
    pub duration_s: f64,
    pub config: BenchConfig,
    pub modes: Vec<ModeSummary>,
    pub runs: Vec<RunResult>,
}

impl BenchReport {
    pub(crate) fn new(
        config: &BenchConfig,
        accel: Accel,
        qemu_version: String,
        work_dir: PathBuf,
        started: SystemTime,
        runs: Vec<RunResult>,
    ) -> BenchReport {
        let modes = summarise(&config.modes, &runs);
        BenchReport {
            tool_version: env!("CARGO_PKG_VERSION"),
            git_revision: git_revision(),
            host: HostInfo::probe(),
            qemu_version,
            accel: accel_label(accel, &config.modes),
            work_dir,
            started_unix: started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            duration_s: started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
            config: config.clone(),
            modes,
            runs,
        }
    }

    /// One line per mode: every metric's median, min, max, quartiles and ratio to `tcp`.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("mode,description,runs");
        for m in Metric::ALL {
            let n = m.name();
            let _ = write!(
                out,
                ",{n}_median,{n}_min,{n}_max,{n}_q1,{n}_q3,{n}_ratio_to_tcp"
            );
        }
        out.push('\n');
        for s in &self.modes {
            let _ = write!(
                out,
                "{},{},{}",
                s.mode.name,
                csv_field(&s.description),
                s.runs
            );
            for m in Metric::ALL {
                match s.get(m) {
                    Some(ms) => {
                        let st = ms.stat;
                        let r = ms
                            .ratio_to_tcp
                            .map(|r| format!("{r:.4}"))
                            .unwrap_or_default();
                        let _ = write!(
                            out,
                            ",{},{},{},{},{},{r}",
                            st.median, st.min, st.max, st.q1, st.q3
                        );
                    }
                    None => out.push_str(",,,,,,"),
                }
            }
            out.push('\n');
        }
        out
    }

    /// One line per run, warm-up runs included (flagged).
    pub fn runs_csv(&self) -> String {
        let mut out = String::from(
            "run,round,warmup,mode,total_ms,setup_ms,downtime_ms,wall_ms,ram_bytes,\
             guest_ram_bytes,ram_mbps,sent_ratio,normal_pages,duplicate_pages,dirty_sync_count,\
             dirty_pages_rate,src_cpu_s,dst_cpu_s,src_cpu_total_s,dst_cpu_total_s,disk_bytes,\
             disk_mbps,host_cpu_s,forecast_ms\n",
        );
        for r in &self.runs {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{},{},{},{:.2},{:.2},{:.2},{:.2},{},{},{:.2},{}",
                r.run,
                r.round,
                r.warmup,
                r.mode,
                r.total_ms,
                r.setup_ms,
                r.downtime_ms,
                r.wall_ms,
                r.ram_bytes,
                r.guest_ram_bytes,
                r.ram_mbps,
                r.sent_ratio(),
                r.normal_pages,
                r.duplicate_pages,
                r.dirty_sync_count,
                r.dirty_pages_rate,
                r.src_cpu_s,
                r.dst_cpu_s,
                r.src_cpu_total_s,
                r.dst_cpu_total_s,
                r.disk_bytes,
                r.disk_mbps.map(|v| format!("{v:.1}")).unwrap_or_default(),
                r.host_cpu_s,
                r.forecast_ms.map(|v| v.to_string()).unwrap_or_default(),
            );
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Per-mode summaries of the measured (non-warm-up) runs, with ratios to [`BASELINE`].
pub fn summarise(modes: &[Mode], runs: &[RunResult]) -> Vec<ModeSummary> {
    let stats_of = |mode: &str, metric: Metric| {
        let samples: Vec<f64> = runs
            .iter()
            .filter(|r| !r.warmup && r.completed && r.mode == mode)
            .filter_map(|r| metric.of(r))
            .collect();
        Stat::of(&samples)
    };
    modes
        .iter()
        .map(|mode| {
            let metrics = Metric::ALL
                .iter()
                .filter_map(|&metric| {
                    let stat = stats_of(&mode.name, metric)?;
                    let base = stats_of(BASELINE, metric).map(|s| s.median);
                    Some(MetricSummary {
                        metric,
                        stat,
                        ratio_to_tcp: ratio(Some(stat.median), base),
                    })
                })
                .collect();
            ModeSummary {
                mode: mode.clone(),
                description: mode.describe(),
                runs: runs
                    .iter()
                    .filter(|r| !r.warmup && r.mode == mode.name)
                    .count(),
                completed: runs
                    .iter()
                    .filter(|r| !r.warmup && r.completed && r.mode == mode.name)
                    .count(),
                metrics,
            }
        })
        .collect()
}

/// The terminal table: medians with [min-max], and ratios to `tcp`.
pub fn render_table(report: &BenchReport) -> String {
    let headers = [
        "mode",
        "runs",
        "total ms",
        "wall x tcp",
        "tool ms",
        "RAM Mbit/s",
        "x tcp",
        "downtime ms",
        "pause ms",
        "sent/RAM",
        "src CPU s",
        "dst CPU s",
        "host CPU s",
        "syncs",
        "disk Mbit/s",
    ];
    let spread = |s: &ModeSummary, m: Metric, prec: usize| match s.get(m) {
        Some(ms) if ms.stat.n > 1 => format!(
            "{:.p$} [{:.p$}-{:.p$}]",
            ms.stat.median,
            ms.stat.min,
            ms.stat.max,
            p = prec
        ),
        Some(ms) => format!("{:.p$}", ms.stat.median, p = prec),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = report
        .modes
        .iter()
        .map(|s| {
            vec![
                s.mode.name.clone(),
                if s.completed == s.runs {
                    s.runs.to_string()
                } else {
                    format!("{} ({} done)", s.runs, s.completed)
                },
                spread(s, Metric::TotalMs, 0),
                s.get(Metric::WallMs)
                    .and_then(|m| m.ratio_to_tcp)
                    .map_or("-".into(), |r| format!("{r:.2}")),
                spread(s, Metric::OverheadMs, 0),
                spread(s, Metric::RamMbps, 0),
                s.get(Metric::RamMbps)
                    .and_then(|m| m.ratio_to_tcp)
                    .map_or("-".into(), |r| format!("{r:.2}")),
                spread(s, Metric::DowntimeMs, 0),
                spread(s, Metric::GuestPauseMs, 0),
                spread(s, Metric::SentRatio, 2),
                spread(s, Metric::SrcCpuS, 2),
                spread(s, Metric::DstCpuS, 2),
                spread(s, Metric::HostCpuS, 2),
                spread(s, Metric::DirtySyncs, 0),
                spread(s, Metric::DiskMbps, 0),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", text.join("  ").trim_end());
    };
    line(&mut out, &headers.map(String::from));
    for row in &rows {
        line(&mut out, row);
    }
    let _ = writeln!(
        out,
        "median [min-max] of {} measured round(s) after {} warm-up; {} MiB RAM, {}{}; {} on {} \
         ({} CPUs); QEMU {}; git {}",
        report.config.repeat,
        report.config.warmup,
        report.config.ram_mib,
        match report.config.profile {
            super::Profile::Running => format!(
                "workload {} MiB at {} pages/s",
                report.config.workload.working_set_mib, report.config.workload.pages_per_sec
            ),
            super::Profile::Static => "static: source paused, RAM pseudo-random".to_string(),
            super::Profile::Heavy => format!(
                "heavy: workload {} MiB at {} pages/s (0: unpaced){}, deadline {} s",
                report.config.workload.working_set_mib,
                report.config.workload.pages_per_sec,
                report
                    .config
                    .max_bandwidth
                    .map(|b| format!(", link capped at {} MiB/s", b >> 20))
                    .unwrap_or_default(),
                report.config.run_timeout.as_secs()
            ),
        },
        if report.config.disk_mib > 0 {
            format!(", disk {} MiB", report.config.disk_mib)
        } else {
            String::new()
        },
        report.accel,
        report.host.cpu_model,
        report.host.cpus,
        report.qemu_version,
        report.git_revision,
    );
    out
}

/// A bar chart of each mode's median RAM throughput, whiskers from min to max, the ratio to
/// `tcp` beside each bar, and the median source/destination CPU seconds.
pub fn render_svg(report: &BenchReport) -> String {
    const LEFT: f64 = 130.0;
    const BAR_W: f64 = 460.0;
    const ROW_H: f64 = 34.0;
    const TOP: f64 = 56.0;
    let width = LEFT + BAR_W + 230.0;
    let height = TOP + ROW_H * report.modes.len() as f64 + 46.0;
    let max = report
        .modes
        .iter()
        .filter_map(|s| s.get(Metric::RamMbps).map(|m| m.stat.max))
        .fold(1.0f64, f64::max);
    let x = |v: f64| LEFT + BAR_W * v / max;
    let mut svg = svg::open(
        width,
        height,
        LEFT,
        "RAM migration throughput, Mbit/s (median, min-max)",
        &format!(
            "{} MiB guest, workload {} MiB at {} pages/s, {}, QEMU {}, git {}",
            report.config.ram_mib,
            report.config.workload.working_set_mib,
            report.config.workload.pages_per_sec,
            report.accel,
            report.qemu_version,
            report.git_revision
        ),
    );
    for (i, s) in report.modes.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let fill = if s.mode.name == BASELINE {
            "#8c8c8c"
        } else {
            "#3b6ea5"
        };
        let _ = writeln!(
            svg,
            r##"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 8.0,
            y + ROW_H / 2.0 + 4.0,
            svg::escape(&s.mode.name)
        );
        if let Some(m) = s.get(Metric::RamMbps) {
            let _ = writeln!(
                svg,
                r##"<rect x="{LEFT}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"/>"##,
                y + 6.0,
                x(m.stat.median) - LEFT,
                ROW_H - 12.0
            );
            let mid = y + ROW_H / 2.0;
            let _ = writeln!(
                svg,
                r##"<path d="M{:.1} {mid:.1}H{:.1}M{:.1} {:.1}V{:.1}M{:.1} {:.1}V{:.1}" stroke="#222" fill="none"/>"##,
                x(m.stat.min),
                x(m.stat.max),
                x(m.stat.min),
                mid - 5.0,
                mid + 5.0,
                x(m.stat.max),
                mid - 5.0,
                mid + 5.0
            );
            let ratio = m
                .ratio_to_tcp
                .map_or(String::new(), |r| format!(" ({r:.2}x tcp)"));
            let cpu = match (s.median(Metric::SrcCpuS), s.median(Metric::DstCpuS)) {
                (Some(a), Some(b)) => format!(", CPU {a:.1}+{b:.1} s"),
                _ => String::new(),
            };
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}">{:.0}{}{}</text>"##,
                x(m.stat.max) + 8.0,
                mid + 4.0,
                m.stat.median,
                ratio,
                cpu
            );
        }
    }
    svg::axis_and_close(
        &mut svg,
        LEFT,
        BAR_W,
        TOP + ROW_H * report.modes.len() as f64 + 4.0,
        max,
        &format!(
            "{} measured round(s), {} warm-up discarded; CPU: source+destination QEMU outside vCPU threads",
            report.config.repeat, report.config.warmup
        ),
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(mode: &str, warmup: bool, total_ms: u64, mbps: f64) -> RunResult {
        RunResult {
            run: 0,
            round: 0,
            warmup,
            mode: mode.into(),
            completed: true,
            total_ms,
            setup_ms: 5,
            downtime_ms: 20,
            guest_pause_ms: None,
            wall_ms: total_ms + 100,
            ram_bytes: 200 << 20,
            guest_ram_bytes: 100 << 20,
            ram_mbps: mbps,
            normal_pages: 1,
            duplicate_pages: 1,
            dirty_sync_count: 3,
            dirty_pages_rate: 0,
            src_cpu_s: 1.0,
            dst_cpu_s: 0.5,
            src_cpu_total_s: 1.5,
            dst_cpu_total_s: 0.5,
            disk_bytes: 0,
            disk_mbps: None,
            host_cpu_s: 0.0,
            phases: Timing::default(),
            setup_disks_ms: None,
            forecast_ms: None,
        }
    }

    #[test]
    fn summaries_skip_warmup_and_take_ratios_to_tcp() {
        let modes = [Mode::tcp(), Mode::tls()];
        let runs = [
            run("tcp", true, 9999, 1.0),
            run("tcp", false, 1000, 4000.0),
            run("tls", false, 2000, 2000.0),
            run("tcp", false, 1200, 3000.0),
            run("tls", false, 3000, 1000.0),
        ];
        let s = summarise(&modes, &runs);
        assert_eq!(s[0].runs, 2);
        assert_eq!(s[0].median(Metric::TotalMs), Some(1100.0));
        let tls = s[1].get(Metric::RamMbps).expect("tls throughput");
        assert_eq!(tls.stat.median, 1500.0);
        assert_eq!(tls.ratio_to_tcp, Some(1500.0 / 3500.0));
        assert_eq!(s[1].median(Metric::SentRatio), Some(2.0));
        assert!(s[1].get(Metric::DiskMbps).is_none());
    }
}
