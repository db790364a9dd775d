//! The forecast: will this VM's migration converge as configured, and how long will its RAM
//! take? Made either before anything starts (`migrate --plan`, `migrate --forecast before`)
//! or, by default, from QEMU's own figures once the first pass is over
//! ([`from_first_pass`]), so that no one waits a second for it before data moves.
//!
//! Before starting, it measures on the source, changing nothing:
//! - the guest's **dirty rate**, with QEMU's `calc-dirty-rate` (one second of page sampling);
//! - how much of its RAM **holds data** (zero pages cost nothing to send): 256 pages spread
//!   over guest RAM, read with the monitor's `xp`;
//!
//! and what it assumes: the **throughput** is `--max-bandwidth` when set, otherwise a figure
//! for the transport measured on this project's reference machine ([`ESTIMATED_TLS`],
//! [`ESTIMATED_TCP`]), said to be an estimate in the forecast.
//!
//! After the first pass, it takes the throughput the pass reached (bytes on the wire over its
//! time: this host, this link, this transport) and the dirty rate QEMU counted, and runs the
//! same model.
//!
//! The model is QEMU's pre-copy: the first pass sends the RAM that holds data; each next pass
//! sends what the guest dirtied during the previous one; the migration stops when what is left
//! fits the downtime limit. With a dirty rate at or above the throughput it never does.

use std::time::Duration;

use serde::Serialize;

use super::side::SideCtl;
use super::{MigrationError, MigrationOptions, Transport, UNLIMITED_BANDWIDTH};
use crate::qemu::{HumanMonitorCommand, QueryMemorySizeSummary, RamStats};

/// Pages read to tell how much of the RAM holds data.
const SAMPLED_PAGES: u64 = 256;

/// Bytes per second a single-stream TLS migration reached on the reference machine (2 cores,
/// QEMU 7.2, loopback, static profile: 1620 Mbit/s), and plain TCP (3730 Mbit/s).
pub const ESTIMATED_TLS: f64 = 1620e6 / 8.0;
pub const ESTIMATED_TCP: f64 = 3730e6 / 8.0;

/// More passes than this is not converging in any useful sense.
const MAX_PASSES: u32 = 30;

/// What the forecast was given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastInput {
    /// Guest RAM, bytes.
    pub ram: u64,
    /// Share of sampled pages that hold data (0 to 1).
    pub data_share: f64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: f64,
    /// Bytes per second the link moves.
    pub throughput: f64,
    pub downtime_limit: Duration,
    /// Bytes of disk to copy first (at the same throughput, unless capped apart).
    pub disk_bytes: u64,
}

/// When a forecast was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForecastMade {
    /// Before anything started, from a second of sampling the guest.
    BeforeStart,
    /// Once QEMU's first pass over the RAM was over, from its own figures.
    FirstPass,
}

impl ForecastMade {
    pub fn as_str(self) -> &'static str {
        match self {
            ForecastMade::BeforeStart => "before-start",
            ForecastMade::FirstPass => "first-pass",
        }
    }
}

/// The verdict, with what it rests on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Forecast {
    pub made: ForecastMade,
    pub converges: bool,
    pub predicted_total_ms: u64,
    pub predicted_passes: u32,
    pub predicted_downtime_ms: u64,
    pub ram_bytes: u64,
    /// RAM expected to cross in the first pass (the share holding data).
    pub ram_data_bytes: u64,
    pub dirty_rate_mib_s: f64,
    pub throughput_mbps: f64,
    /// `max-bandwidth` (the cap set), `estimate` (the reference machine's figure), or
    /// `first-pass` (what this migration's first pass reached).
    pub throughput_from: &'static str,
    pub downtime_limit_ms: u64,
    /// Settings that would make a no-go converge.
    pub advice: Vec<String>,
}

/// Runs the pre-copy model on `input`.
pub fn predict(input: &ForecastInput, throughput_from: &'static str) -> Forecast {
    let b = input.throughput.max(1.0);
    let limit = input.downtime_limit.as_secs_f64();
    let data = input.ram as f64 * input.data_share.clamp(0.0, 1.0);
    let disks = input.disk_bytes as f64 / b;
    let mut pass_time = data / b;
    let mut total = disks + pass_time;
    let mut passes = 1;
    let mut left = input.dirty_rate * pass_time;
    let converges = loop {
        if left / b <= limit {
            break true;
        }
        if passes >= MAX_PASSES || input.dirty_rate >= b {
            break false;
        }
        pass_time = left / b;
        total += pass_time;
        passes += 1;
        left = (input.dirty_rate * pass_time).min(input.ram as f64);
    };
    let downtime = left / b;
    let mut advice = Vec::new();
    if !converges {
        let needed = input.dirty_rate * 1.25;
        advice.push(format!(
            "--max-bandwidth {}M or more (the guest dirties {:.0} MiB/s)",
            (needed / f64::from(1u32 << 20)).ceil(),
            input.dirty_rate / f64::from(1u32 << 20)
        ));
        advice.push("--auto-converge (QEMU slows the guest's vCPUs until it fits)".into());
        advice.push(format!(
            "--timeout-action pause with a --timeout: the rest moves as downtime, about {} ms \
             for what the guest dirties in a pass",
            ((input.dirty_rate * (data / b)).min(input.ram as f64) / b * 1000.0).round()
        ));
        advice.push("--multifd N on hosts with more cores; --compress zstd with it".into());
    }
    Forecast {
        made: ForecastMade::BeforeStart,
        converges,
        predicted_total_ms: ((total + downtime) * 1000.0).round() as u64,
        predicted_passes: passes,
        predicted_downtime_ms: (downtime * 1000.0).round() as u64,
        ram_bytes: input.ram,
        ram_data_bytes: data as u64,
        dirty_rate_mib_s: (input.dirty_rate / f64::from(1u32 << 20) * 10.0).round() / 10.0,
        throughput_mbps: (b * 8.0 / 1e6 * 10.0).round() / 10.0,
        throughput_from,
        downtime_limit_ms: input.downtime_limit.as_millis() as u64,
        advice,
    }
}

/// Measures the source (its dirty rate, the share of its RAM holding data) and predicts the
/// migration of `disk_bytes` of disk and its RAM over `transport` with `opts`' cap and
/// downtime limit. Changes nothing on the source.
pub(crate) async fn measure(
    src: &SideCtl,
    opts: &MigrationOptions,
    transport: Transport,
    disk_bytes: u64,
) -> Result<Forecast, MigrationError> {
    let summary = src
        .call("query-memory-size-summary", &QueryMemorySizeSummary)
        .await?;
    let ram = summary.base_memory + summary.plugged_memory.unwrap_or(0);
    // The RAM is read while QEMU samples the dirty rate, which takes a second whatever we do.
    src.start_dirty_rate().await?;
    let data_share = data_share(src, ram).await?;
    let dirty_mib = src.dirty_rate_result().await?;
    let (throughput, from) = if opts.max_bandwidth < UNLIMITED_BANDWIDTH {
        (opts.max_bandwidth as f64, "max-bandwidth")
    } else if transport == Transport::Tls {
        (ESTIMATED_TLS, "estimate")
    } else {
        (ESTIMATED_TCP, "estimate")
    };
    let input = ForecastInput {
        ram,
        data_share,
        dirty_rate: dirty_mib as f64 * f64::from(1u32 << 20),
        throughput,
        downtime_limit: opts.downtime_limit.unwrap_or(Duration::from_millis(
            super::convergence::DEFAULT_DOWNTIME_MS,
        )),
        disk_bytes,
    };
    let forecast = predict(&input, from);
    tracing::info!(
        converges = forecast.converges,
        total_ms = forecast.predicted_total_ms,
        passes = forecast.predicted_passes,
        dirty_mib_s = forecast.dirty_rate_mib_s,
        data_share,
        "forecast"
    );
    Ok(forecast)
}

/// The guest's page size for QEMU's page counts (x86).
const PAGE_SIZE: f64 = 4096.0;

/// The forecast from QEMU's figures once its first pass is over: `ram` as `query-migrate`
/// reports it at the first poll that sees a second dirty-bitmap sync, `elapsed` since the RAM
/// migration started. The throughput is what the pass reached (bytes sent over its time); the
/// dirty rate is QEMU's own count (it is only updated once a second: before that, what the
/// pass left dirty over the pass's time). `None` while the first pass is under way.
pub fn from_first_pass(
    ram: &RamStats,
    elapsed: Duration,
    downtime_limit: Duration,
) -> Option<Forecast> {
    let secs = elapsed.as_secs_f64();
    if ram.dirty_sync_count < 2 || ram.transferred == 0 || secs <= 0.0 || ram.total == 0 {
        return None;
    }
    let throughput = ram.transferred as f64 / secs;
    let dirty_rate = if ram.dirty_pages_rate > 0 {
        ram.dirty_pages_rate as f64 * PAGE_SIZE
    } else {
        ram.remaining as f64 / secs
    };
    let input = ForecastInput {
        ram: ram.total,
        data_share: (ram.transferred as f64 / ram.total as f64).min(1.0),
        dirty_rate,
        throughput,
        downtime_limit,
        disk_bytes: 0,
    };
    let mut forecast = predict(&input, "first-pass");
    forecast.made = ForecastMade::FirstPass;
    tracing::info!(
        converges = forecast.converges,
        total_ms = forecast.predicted_total_ms,
        passes = forecast.predicted_passes,
        dirty_mib_s = forecast.dirty_rate_mib_s,
        mbps = forecast.throughput_mbps,
        "judged after the first pass"
    );
    Some(forecast)
}

/// The share of [`SAMPLED_PAGES`] pages, spread over guest RAM, that hold a non-zero byte.
/// Guest-physical RAM above 3 GiB lies above the 4 GiB boundary on PC machines; a page that
/// cannot be read is left out.
async fn data_share(src: &SideCtl, ram: u64) -> Result<f64, MigrationError> {
    let (mut read, mut with_data) = (0u32, 0u32);
    for i in 0..SAMPLED_PAGES {
        let offset = (ram / SAMPLED_PAGES * i) & !0xfff;
        let addr = if offset >= 3 << 30 {
            offset + (1 << 30)
        } else {
            offset
        };
        let xp = HumanMonitorCommand {
            command_line: format!("xp /512xg {addr:#x}"),
        };
        let dump = src.call("xp (forecast)", &xp).await?;
        if dump.contains("Cannot access") || dump.trim().is_empty() {
            continue;
        }
        read += 1;
        if page_has_data(&dump) {
            with_data += 1;
        }
    }
    Ok(if read == 0 {
        1.0
    } else {
        f64::from(with_data) / f64::from(read)
    })
}

/// Whether the text of an `xp /512xg` dump shows any non-zero word.
pub(crate) fn page_has_data(dump: &str) -> bool {
    dump.lines().any(|line| {
        line.split_whitespace()
            .skip(1)
            .any(|w| w.trim_start_matches("0x").chars().any(|c| c != '0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(dirty_mib: f64, throughput_mib: f64) -> ForecastInput {
        ForecastInput {
            ram: 128 << 20,
            data_share: 0.5,
            dirty_rate: dirty_mib * f64::from(1u32 << 20),
            throughput: throughput_mib * f64::from(1u32 << 20),
            downtime_limit: Duration::from_millis(300),
            disk_bytes: 0,
        }
    }

    #[test]
    fn an_idle_guest_converges_in_one_pass_in_the_time_its_data_takes() {
        let f = predict(&input(0.0, 64.0), "max-bandwidth");

        assert!(f.converges);
        assert_eq!(f.predicted_passes, 1);
        assert_eq!(f.predicted_total_ms, 1000);
        assert_eq!(f.predicted_downtime_ms, 0);
        assert!(f.advice.is_empty());
    }

    #[test]
    fn a_guest_dirtying_faster_than_the_link_never_converges_and_gets_advice() {
        let f = predict(&input(78.0, 16.0), "max-bandwidth");

        assert!(!f.converges);
        assert!(
            f.advice.iter().any(|a| a.contains("--max-bandwidth 98M")),
            "{:?}",
            f.advice
        );
        assert!(f.advice.iter().any(|a| a.contains("--auto-converge")));
    }

    #[test]
    fn a_guest_dirtying_slower_than_the_link_converges_after_a_few_passes() {
        let tight = ForecastInput {
            downtime_limit: Duration::from_millis(100),
            ..input(16.0, 64.0)
        };

        let f = predict(&tight, "max-bandwidth");

        // 1 s for 64 MiB, 0.25 s for the 16 MiB dirtied meanwhile, then 4 MiB (62.5 ms) fits.
        assert!(f.converges);
        assert_eq!(f.predicted_passes, 2, "{f:?}");
        assert_eq!(f.predicted_total_ms, 1313, "{f:?}");
        assert_eq!(f.predicted_downtime_ms, 63, "{f:?}");
    }

    fn first_pass(
        sync: u64,
        transferred_mib: u64,
        dirty_pages_rate: u64,
        remaining_mib: u64,
    ) -> RamStats {
        RamStats {
            transferred: transferred_mib << 20,
            remaining: remaining_mib << 20,
            total: 128 << 20,
            dirty_pages_rate,
            dirty_sync_count: sync,
            ..RamStats::default()
        }
    }

    #[test]
    fn no_verdict_while_the_first_pass_is_under_way() {
        let ram = first_pass(1, 32, 0, 96);

        assert_eq!(
            from_first_pass(&ram, Duration::from_secs(1), Duration::from_millis(300)),
            None
        );
    }

    #[test]
    fn after_the_first_pass_the_throughput_is_what_it_reached_and_the_dirty_rate_qemus() {
        // 64 MiB in 1 s; QEMU counted 4096 pages/s (16 MiB/s) dirty.
        let ram = first_pass(2, 64, 4096, 16);

        let f = from_first_pass(&ram, Duration::from_secs(1), Duration::from_millis(100))
            .expect("verdict");

        assert_eq!(f.made, ForecastMade::FirstPass);
        assert_eq!(f.throughput_from, "first-pass");
        assert_eq!(f.throughput_mbps, 536.9);
        assert_eq!(f.dirty_rate_mib_s, 16.0);
        // The same pre-copy model as before starting: 1 s, then 0.25 s, then 62.5 ms fits.
        assert!(f.converges);
        assert_eq!(f.predicted_total_ms, 1313, "{f:?}");
    }

    #[test]
    fn before_qemu_counts_a_dirty_rate_what_the_pass_left_dirty_stands_for_it() {
        // A pass of 0.5 s (QEMU's rate waits for a second between syncs) left 40 MiB dirty.
        let ram = first_pass(2, 32, 0, 40);

        let f = from_first_pass(&ram, Duration::from_millis(500), Duration::from_millis(300))
            .expect("verdict");

        assert_eq!(f.dirty_rate_mib_s, 80.0);
        assert!(!f.converges, "{f:?}");
    }

    #[test]
    fn a_page_dump_with_any_non_zero_word_holds_data() {
        let zero = "0000000000100000: 0x0000000000000000 0x0000000000000000\r\n";
        let data = "0000000000100000: 0x0000000000000000 0x00000000000000a0\r\n";

        assert!(!page_has_data(zero));
        assert!(page_has_data(data));
    }
}
