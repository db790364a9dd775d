//! Where each mode's wall time goes, phase by phase (set-up, disks, RAM, switch-over, finish,
//! clean-up, as the migration's report times them): the medians per mode, a stacked-bar SVG of
//! them, and a Markdown summary of the whole run (results, phases, the gate's verdict) that a
//! CI job page can show as it is.
//!
//! A throughput bar says which mode is slower; a stacked wall says why: a mode whose set-up
//! dominates loses before any data moves, one whose RAM phase dominates loses on the wire.

use std::fmt::Write as _;

use serde::Serialize;

use super::gate::GateReport;
use super::report::{BASELINE, BenchReport, Metric, RunResult};
use super::stats::Stat;
use super::svg;

/// The phases in the order they happen, with their colours in the chart. The first is only
/// for a migrator that reports set-up and disk copy together (libvirt's own modes).
const PHASES: [(&str, &str); 7] = [
    ("set-up + disks, not split", "#d4a6c8"),
    ("set-up", "#b07aa1"),
    ("disks", "#edc948"),
    ("RAM", "#4e79a7"),
    ("switch-over", "#e15759"),
    ("finish", "#59a14f"),
    ("clean-up", "#9c755f"),
];

fn phase_ms(r: &RunResult) -> [u64; 7] {
    let t = &r.phases;
    [
        r.setup_disks_ms.unwrap_or(0),
        t.setup_ms,
        t.disks_ms,
        t.ram_ms,
        t.switchover_ms,
        t.finish_ms,
        t.cleanup_ms,
    ]
}

/// One mode's median wall and median of each phase over its completed measured runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModePhases {
    pub mode: String,
    pub wall_ms: f64,
    /// In the order of [`PHASES`].
    pub phases_ms: [f64; 7],
    /// QEMU's downtime (median), shown beside the wall.
    pub downtime_ms: f64,
}

impl ModePhases {
    /// What the phases do not account for (the bench's own work around the migration, and
    /// the medians of parts not adding up to the median of the whole).
    pub fn other_ms(&self) -> f64 {
        (self.wall_ms - self.phases_ms.iter().sum::<f64>()).max(0.0)
    }
}

/// Per mode, in the report's order; modes without a completed measured run are left out.
pub fn per_mode(report: &BenchReport) -> Vec<ModePhases> {
    report
        .modes
        .iter()
        .filter_map(|s| {
            let runs: Vec<&RunResult> = report
                .runs
                .iter()
                .filter(|r| !r.warmup && r.completed && r.mode == s.mode.name)
                .collect();
            let median = |f: &dyn Fn(&RunResult) -> f64| {
                Stat::of(&runs.iter().map(|r| f(r)).collect::<Vec<_>>()).map(|s| s.median)
            };
            let wall_ms = median(&|r| r.wall_ms as f64)?;
            let mut phases_ms = [0.0; 7];
            for (i, p) in phases_ms.iter_mut().enumerate() {
                *p = median(&|r| phase_ms(r)[i] as f64).unwrap_or(0.0);
            }
            Some(ModePhases {
                mode: s.mode.name.clone(),
                wall_ms,
                phases_ms,
                downtime_ms: median(&|r| r.downtime_ms as f64).unwrap_or(0.0),
            })
        })
        .collect()
}

/// A horizontal stacked bar per mode: the median of each phase, then what they leave of the
/// median wall, with the wall and its ratio to `tcp` written beside.
pub fn render_svg(report: &BenchReport) -> String {
    const LEFT: f64 = 130.0;
    const BAR_W: f64 = 520.0;
    const ROW_H: f64 = 34.0;
    const TOP: f64 = 76.0;
    let rows = per_mode(report);
    let width = LEFT + BAR_W + 280.0;
    let height = TOP + ROW_H * rows.len() as f64 + 66.0;
    let max = rows.iter().map(|r| r.wall_ms).fold(1.0f64, f64::max);
    let x = |v: f64| LEFT + BAR_W * v / max;
    let tcp_wall = rows.iter().find(|r| r.mode == BASELINE).map(|r| r.wall_ms);
    let mut svg = svg::open(
        width,
        height,
        LEFT,
        "Where the wall time goes, ms (median per phase)",
        &format!(
            "{} MiB guest, {} MiB disk, {}, QEMU {}, git {}",
            report.config.ram_mib,
            report.config.disk_mib,
            report.accel,
            report.qemu_version,
            report.git_revision
        ),
    );
    let mut lx = LEFT;
    let unsplit = rows.iter().any(|r| r.phases_ms[0] > 0.0);
    let legend = PHASES
        .iter()
        .enumerate()
        .filter(|&(i, _)| i > 0 || unsplit)
        .map(|(_, p)| p);
    for (name, colour) in legend.chain([&("other", "#d3d3d3")]) {
        let _ = writeln!(
            svg,
            r##"<rect x="{lx:.1}" y="48" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="57">{name}</text>"##,
            lx + 14.0
        );
        lx += 22.0 + 7.0 * name.len() as f64;
    }
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + ROW_H * i as f64;
        let _ = writeln!(
            svg,
            r##"<text x="{:.0}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT - 8.0,
            y + ROW_H / 2.0 + 4.0,
            svg::escape(&row.mode)
        );
        let mut at = 0.0;
        let parts = row
            .phases_ms
            .iter()
            .zip(PHASES.iter().map(|p| p.1))
            .map(|(&ms, c)| (ms, c))
            .chain([(row.other_ms(), "#d3d3d3")]);
        for (ms, colour) in parts {
            if ms <= 0.0 {
                continue;
            }
            let _ = writeln!(
                svg,
                r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"><title>{ms:.0} ms</title></rect>"##,
                x(at),
                y + 6.0,
                x(at + ms) - x(at),
                ROW_H - 12.0
            );
            at += ms;
        }
        let ratio = match tcp_wall {
            Some(t) if t > 0.0 && row.mode != BASELINE => format!(" ({:.2}x tcp)", row.wall_ms / t),
            _ => String::new(),
        };
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}">{:.0} ms{ratio}, downtime {:.0} ms</text>"##,
            x(at.max(row.wall_ms)) + 8.0,
            y + ROW_H / 2.0 + 4.0,
            row.wall_ms,
            row.downtime_ms
        );
    }
    svg::axis_and_close(
        &mut svg,
        LEFT,
        BAR_W,
        TOP + ROW_H * rows.len() as f64 + 4.0,
        max,
        &format!(
            "{} measured round(s) per mode; other: the wall beyond the phases (process start, \
             the source's end){}",
            report.config.repeat,
            if unsplit {
                "\nlibvirt's modes: set-up + disks from its job's time less QEMU's RAM time; RAM: \
                 QEMU's total time, switch-over included"
            } else {
                ""
            }
        ),
    );
    svg
}

/// The run as Markdown: a table per mode (medians, ratios to `tcp`), the phases, and the
/// gate's comparison when there was a baseline.
pub fn render_markdown(report: &BenchReport, gate: Option<&GateReport>) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmark: {}\n", verdict(gate));
    let _ = writeln!(
        md,
        "{} MiB guest, workload {} MiB at {} pages/s, {} MiB disk; {} on {} ({} CPUs); QEMU {}; \
         git {}; {} measured round(s) after {} warm-up.\n",
        report.config.ram_mib,
        report.config.workload.working_set_mib,
        report.config.workload.pages_per_sec,
        report.config.disk_mib,
        report.accel,
        report.host.cpu_model,
        report.host.cpus,
        report.qemu_version,
        report.git_revision,
        report.config.repeat,
        report.config.warmup
    );
    md.push_str(
        "| mode | completed | wall ms | x tcp | RAM Mbit/s | x tcp | downtime ms | guest pause ms | forecast error % |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for s in &report.modes {
        let med = |m: Metric| s.median(m).map_or("-".to_string(), |v| format!("{v:.0}"));
        let x = |m: Metric| {
            s.get(m)
                .and_then(|v| v.ratio_to_tcp)
                .map_or("-".to_string(), |r| format!("{r:.2}"))
        };
        let _ = writeln!(
            md,
            "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} |",
            s.mode.name,
            s.completed,
            s.runs,
            med(Metric::WallMs),
            x(Metric::WallMs),
            med(Metric::RamMbps),
            x(Metric::RamMbps),
            med(Metric::DowntimeMs),
            med(Metric::GuestPauseMs),
            s.median(Metric::ForecastErrorPct)
                .map_or("-".to_string(), |v| format!("{v:+.1}"))
        );
    }
    md.push_str("\nWall time by phase (medians, ms):\n\n| mode |");
    for (name, _) in PHASES {
        let _ = write!(md, " {name} |");
    }
    md.push_str(" other |\n|---|---|---|---|---|---|---|---|---|\n");
    for row in per_mode(report) {
        let _ = write!(md, "| {} |", row.mode);
        for ms in row.phases_ms {
            let _ = write!(md, " {ms:.0} |");
        }
        let _ = writeln!(md, " {:.0} |", row.other_ms());
    }
    if let Some(g) = gate {
        md.push('\n');
        md.push_str(&g.render_markdown());
    }
    md
}

fn verdict(gate: Option<&GateReport>) -> &'static str {
    match gate {
        None => "results (no baseline)",
        Some(g) if g.regressed() => "REGRESSED against the baseline",
        Some(_) => "passed against the baseline",
    }
}

#[cfg(test)]
mod tests;
