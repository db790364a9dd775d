//! The regression gate: this run's ratios to `tcp` against a stored run's (`bench --baseline`).
//!
//! Only ratios are gated, never absolute times: a CI machine is noisy, but TLS over TCP on the
//! same machine in the same interleaved run is comparable from run to run. Each gated metric of
//! each mode (the `tcp` mode itself is 1.0 by definition) regresses when its ratio moved the bad
//! way by more than the threshold, relative to the baseline's ratio.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use super::report::Metric;

/// The metrics gated, with the direction that is better.
pub const GATED: [(Metric, Better); 4] = [
    (Metric::RamMbps, Better::Higher),
    (Metric::TotalMs, Better::Lower),
    (Metric::DowntimeMs, Better::Lower),
    (Metric::SentRatio, Better::Lower),
];

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Higher,
    Lower,
}

/// One mode's metric, baseline against now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub mode: String,
    pub metric: &'static str,
    pub better: Better,
    pub baseline_ratio: f64,
    pub ratio: f64,
    /// Relative change in the bad direction (0.12 = 12% worse); negative when better.
    pub worse_by: f64,
    pub regressed: bool,
}

/// The gate's verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GateReport {
    pub max_regression: f64,
    pub comparisons: Vec<Comparison>,
    /// Modes of this run the baseline does not have (not gated).
    pub new_modes: Vec<String>,
}

impl GateReport {
    pub fn regressed(&self) -> bool {
        self.comparisons.iter().any(|c| c.regressed)
    }

    /// A table for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<16} {:<12} {:>10} {:>10} {:>8}\n",
            "mode", "metric (x tcp)", "baseline", "now", "worse by"
        );
        for c in &self.comparisons {
            let _ = writeln!(
                out,
                "{:<16} {:<12} {:>10.3} {:>10.3} {:>7.1}%{}",
                c.mode,
                c.metric,
                c.baseline_ratio,
                c.ratio,
                c.worse_by * 100.0,
                if c.regressed { "  REGRESSED" } else { "" }
            );
        }
        for m in &self.new_modes {
            let _ = writeln!(out, "{m:<16} (not in the baseline)");
        }
        out
    }

    /// The same table in Markdown, for a CI job page.
    pub fn render_markdown(&self) -> String {
        let mut md = format!(
            "Against the baseline (a ratio to tcp that moved the bad way by more than {:.0}% \
             fails):\n\n| mode | metric (x tcp) | baseline | now | worse by | |\n\
             |---|---|---|---|---|---|\n",
            self.max_regression * 100.0
        );
        for c in &self.comparisons {
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {:.3} | {:.1}% | {} |",
                c.mode,
                c.metric,
                c.baseline_ratio,
                c.ratio,
                c.worse_by * 100.0,
                if c.regressed { "**REGRESSED**" } else { "ok" }
            );
        }
        for m in &self.new_modes {
            let _ = writeln!(md, "| {m} | (not in the baseline) | | | | |");
        }
        md
    }
}

/// Why a baseline cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateError {
    #[error("the baseline is not a bench report (no \"modes\" list)")]
    NotAReport,
    #[error("the baseline and this run share no mode besides tcp")]
    NothingToCompare,
}

/// One run's ratio to `tcp` of `metric` in `mode`, from a bench report's JSON form.
fn ratio(report: &[Value], mode: &str, metric: &str) -> Option<f64> {
    let m = report.iter().find(|m| m["mode"]["name"] == mode)?;
    m["metrics"]
        .as_array()?
        .iter()
        .find(|x| x["metric"] == metric)?["ratio_to_tcp"]
        .as_f64()
}

/// Compares this run's report with `baseline` (a `bench.json` as written by `bench --out`),
/// both in their JSON form.
/// Only the metrics named in `only` are gated (all of [`GATED`] when it is empty).
pub fn compare(
    baseline: &Value,
    now: &Value,
    max_regression: f64,
    only: &[String],
) -> Result<GateReport, GateError> {
    let base_modes = baseline["modes"].as_array().ok_or(GateError::NotAReport)?;
    let now_modes = now["modes"].as_array().ok_or(GateError::NotAReport)?;
    let mut comparisons = Vec::new();
    let mut new_modes = Vec::new();
    let names = now_modes
        .iter()
        .filter_map(|m| m["mode"]["name"].as_str())
        .filter(|n| *n != "tcp");
    for name in names {
        if !base_modes.iter().any(|m| m["mode"]["name"] == name) {
            new_modes.push(name.to_string());
            continue;
        }
        let gated = GATED
            .into_iter()
            .filter(|(m, _)| only.is_empty() || only.iter().any(|o| o == m.name()));
        for (metric, better) in gated {
            let (Some(base), Some(ratio)) = (
                ratio(base_modes, name, metric.name()),
                ratio(now_modes, name, metric.name()),
            ) else {
                continue;
            };
            if base <= 0.0 {
                continue;
            }
            let worse_by = match better {
                Better::Higher => (base - ratio) / base,
                Better::Lower => (ratio - base) / base,
            };
            comparisons.push(Comparison {
                mode: name.to_string(),
                metric: metric.name(),
                better,
                baseline_ratio: base,
                ratio,
                worse_by,
                regressed: worse_by > max_regression,
            });
        }
    }
    if comparisons.is_empty() {
        return Err(GateError::NothingToCompare);
    }
    Ok(GateReport {
        max_regression,
        comparisons,
        new_modes,
    })
}

/// Parses a threshold: `10%` or `0.1`.
pub fn parse_threshold(s: &str) -> Result<f64, String> {
    let (num, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (s, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a threshold like 10% or 0.1"))?;
    let v = v / scale;
    if !(0.0..=10.0).contains(&v) {
        return Err(format!("{s:?} is out of range (0% to 1000%)"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tls_mbps_ratio: f64, tls_total_ratio: f64) -> Value {
        serde_json::json!({"modes": [
            {"mode": {"name": "tcp"}, "metrics": [
                {"metric": "ram_mbps", "ratio_to_tcp": 1.0}]},
            {"mode": {"name": "tls"}, "metrics": [
                {"metric": "ram_mbps", "ratio_to_tcp": tls_mbps_ratio},
                {"metric": "total_ms", "ratio_to_tcp": tls_total_ratio}]}
        ]})
    }

    #[test]
    fn a_ratio_that_moved_the_bad_way_past_the_threshold_regresses() {
        let gate = compare(&report(0.70, 1.5), &report(0.60, 1.5), 0.10, &[]).expect("gate");

        assert!(gate.regressed());
        let mbps = &gate.comparisons[0];
        assert_eq!(mbps.metric, "ram_mbps");
        assert!(mbps.regressed && (mbps.worse_by - 0.142857).abs() < 1e-3);
        assert!(!gate.comparisons[1].regressed);
    }

    #[test]
    fn noise_within_the_threshold_and_improvements_pass() {
        let gate = compare(&report(0.70, 1.5), &report(0.66, 1.2), 0.10, &[]).expect("gate");

        assert!(!gate.regressed(), "{}", gate.render());
    }

    #[test]
    fn only_the_named_metrics_are_gated() {
        let only = ["total_ms".to_string()];
        let gate = compare(&report(0.70, 1.5), &report(0.30, 1.5), 0.10, &only).expect("gate");

        assert!(!gate.regressed());
        assert_eq!(gate.comparisons.len(), 1);
    }

    #[test]
    fn a_baseline_without_modes_is_refused() {
        let err = compare(&serde_json::json!({}), &report(0.7, 1.5), 0.1, &[]).expect_err("no");
        assert!(matches!(err, GateError::NotAReport));
    }

    #[test]
    fn thresholds_read_as_percent_or_fraction() {
        assert_eq!(parse_threshold("10%"), Ok(0.1));
        assert_eq!(parse_threshold("0.25"), Ok(0.25));
        assert!(parse_threshold("fast").is_err());
        assert!(parse_threshold("-5%").is_err());
    }

    /// The CI gate (scripts/bench-ci.sh: the committed baseline, 30 %, these metrics) passes
    /// the baseline against itself and fails when TLS's throughput relative to TCP halves.
    #[test]
    fn the_ci_gate_fails_a_halved_tls_throughput_and_passes_the_baseline_itself() {
        let baseline: Value =
            serde_json::from_str(include_str!("../../benches/baseline/quick.json")).expect("json");
        let gated = ["ram_mbps", "total_ms", "sent_ratio"].map(String::from);
        let same = compare(&baseline, &baseline, 0.30, &gated).expect("gate");
        assert!(!same.regressed(), "{}", same.render());

        let mut halved = baseline.clone();
        for m in halved["modes"].as_array_mut().expect("modes") {
            if m["mode"]["name"] != "tls" {
                continue;
            }
            for x in m["metrics"].as_array_mut().expect("metrics") {
                if x["metric"] == "ram_mbps" {
                    let r = x["ratio_to_tcp"].as_f64().expect("ratio");
                    x["ratio_to_tcp"] = serde_json::json!(r / 2.0);
                }
            }
        }
        let gate = compare(&baseline, &halved, 0.30, &gated).expect("gate");
        assert!(gate.regressed(), "{}", gate.render());
    }
}
