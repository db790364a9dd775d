//! Helping a busy guest's migration finish: what the caller asked for ([`Convergence`]), the
//! plan of downtime steps ([`DowntimeSteps`]), the deadline a completion timeout per GiB gives,
//! and what was done, for the report ([`ConvergenceReport`]).
//!
//! The means, all QEMU's own:
//! - **auto-converge**: QEMU throttles the guest's vCPUs (`cpu-throttle-initial`, then more by
//!   `cpu-throttle-increment` each pass that does not converge), so it dirties less;
//! - **XBZRLE**: pages sent again go as deltas against a cache of what was sent
//!   (`xbzrle-cache-size`), cheap for a workload that rewrites a few words of each page;
//! - **multifd compression** (`zstd`, `zlib`): pages compressed on the multifd channels; both
//!   sides must set the same method;
//! - **downtime steps** (Nova's `live_migration_downtime_steps`): the allowed downtime raised in
//!   steps while the migration runs, so a guest that almost converges gets there;
//! - **timeout action** `pause` (CloudStack's `vm.migrate.pauseafter`, libvirt's
//!   `--timeout-suspend`): at the deadline the guest is paused, and what is left moves as
//!   downtime, instead of the migration being abandoned; or, with a pause deadline of its own
//!   ([`Convergence::pause_after`]), the guest paused at one deadline and the migration
//!   abandoned at a later one (the agent's `vm.migrate.pauseafter` beside `vm.migrate.wait`);
//! - **post-copy** (`--postcopy` after the first pass, `--timeout-action postcopy` at the
//!   deadline): the guest moves to the destination and the rest of its memory follows on
//!   demand; offered only where [`crate::migration::postcopy`] says, with its recovery.

use std::time::Duration;

use serde::Serialize;

/// What to do when the migration's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeoutAction {
    /// Cancel and roll back (the source runs on).
    #[default]
    Abort,
    /// Pause the guest so the migration finishes; the rest moves as downtime.
    Pause,
    /// Switch to post-copy at the deadline (see [`crate::migration::postcopy`]).
    Postcopy,
}

/// What to do when the judgement after the first pass (or the forecast before starting) says
/// the migration will not converge as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoGo {
    /// Say so in the report and go on (the deadline and the timeout action still hold).
    #[default]
    Warn,
    /// Pause the guest so what is left moves as downtime (as `--timeout-action pause` does at
    /// the deadline).
    Pause,
    /// Cancel and roll back: the source runs on (kind `no-go`).
    Abort,
}

/// QEMU's default downtime limit (ms), when the caller sets none.
pub(crate) const DEFAULT_DOWNTIME_MS: u64 = 300;

pub use crate::qemu::Compression;

/// The XBZRLE cache's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XbzrleCache {
    /// From the guest's dirty rate, sampled before the migration ([`auto_xbzrle_cache`]).
    Auto,
    Bytes(u64),
}

/// auto-converge's throttle, in percent of the guest's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Throttle {
    pub initial: u8,
    pub increment: u8,
}

impl Default for Throttle {
    /// QEMU's defaults.
    fn default() -> Throttle {
        Throttle {
            initial: 20,
            increment: 10,
        }
    }
}

/// Raise the downtime limit from its starting value to `max` in `steps` equal steps, one
/// every `every`, from the start of the RAM phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DowntimeSteps {
    #[serde(serialize_with = "as_ms")]
    pub max: Duration,
    pub steps: u32,
    #[serde(serialize_with = "as_ms")]
    pub every: Duration,
}

fn as_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

impl DowntimeSteps {
    /// The limit (ms) for the step due `elapsed` into the RAM phase, starting from `start_ms`;
    /// `None` before the first step.
    pub fn limit_at(&self, start_ms: u64, elapsed: Duration) -> Option<u64> {
        let every = self.every.as_millis().max(1);
        let step = (elapsed.as_millis() / every).min(u128::from(self.steps)) as u64;
        if step == 0 || self.steps == 0 {
            return None;
        }
        let max = self.max.as_millis() as u64;
        if max <= start_ms {
            return Some(max);
        }
        Some(start_ms + (max - start_ms) * step / u64::from(self.steps))
    }

    /// Parses `MAX_MS[:STEPS[:EVERY_S]]` (defaults: 10 steps, one every 5 s).
    pub fn parse(s: &str) -> Result<DowntimeSteps, String> {
        let mut parts = s.split(':');
        let num = |p: Option<&str>, what: &str| -> Result<Option<u64>, String> {
            p.map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| format!("{what} {v:?} is not a whole number"))
            })
            .transpose()
        };
        let max = num(parts.next(), "the maximum downtime")?.unwrap_or(0);
        let steps = num(parts.next(), "the number of steps")?.unwrap_or(10);
        let every = num(parts.next(), "the seconds between steps")?.unwrap_or(5);
        if parts.next().is_some() {
            return Err("expected MAX_MS[:STEPS[:EVERY_S]]".into());
        }
        if max == 0 || steps == 0 || steps > 1000 || every == 0 || every > 3600 {
            return Err(format!(
                "{s:?}: use a maximum above 0 ms, 1 to 1000 steps, 1 to 3600 s between them"
            ));
        }
        Ok(DowntimeSteps {
            max: Duration::from_millis(max),
            steps: steps as u32,
            every: Duration::from_secs(every),
        })
    }
}

/// Everything the caller may ask for to help a migration converge. The default asks for
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Convergence {
    pub auto_converge: Option<Throttle>,
    pub xbzrle: Option<XbzrleCache>,
    /// Needs multifd.
    pub compress: Option<Compression>,
    pub downtime_steps: Option<DowntimeSteps>,
    pub timeout_action: TimeoutAction,
    /// Pause the guest this long after the migration started (so the rest moves as downtime),
    /// while the migration's own deadline, later, still abandons it: a pause deadline beside
    /// an abort deadline. It acts in the RAM phase (at its start when it passed during the
    /// disk copy). Not with [`TimeoutAction::Pause`], which makes the one deadline a pause.
    pub pause_after: Option<Duration>,
    /// A deadline of this much per GiB of guest RAM plus copied disk (KubeVirt's
    /// `completionTimeoutPerGiB`), so one number fits VMs of all sizes.
    pub completion_timeout_per_gib: Option<Duration>,
    /// What a no-go verdict leads to.
    pub on_no_go: OnNoGo,
    /// Switch to post-copy once the first pass over the RAM is over (libvirt's
    /// `--postcopy-after-precopy`); see [`crate::migration::postcopy`].
    pub postcopy: bool,
    /// How long a post-copy whose link was cut is retried (`None`:
    /// [`crate::migration::postcopy::DEFAULT_RECOVER_TIMEOUT`]).
    pub postcopy_recover_timeout: Option<Duration>,
    /// Bytes per second the RAM stream may take once post-copy started (QEMU's
    /// `max-postcopy-bandwidth`); `None`: no limit, so the pages still on the source move as
    /// fast as the link allows (the guest waits on each one it touches).
    pub postcopy_bandwidth: Option<u64>,
}

impl Convergence {
    /// Whether post-copy may start in this migration (`--postcopy` or `--timeout-action
    /// postcopy`): the capability is then on, on both ends.
    pub fn wants_postcopy(&self) -> bool {
        self.postcopy || self.timeout_action == TimeoutAction::Postcopy
    }
}

/// The deadline for `bytes` of RAM and disk at `per_gib` per GiB (at least one second).
pub fn completion_timeout(per_gib: Duration, bytes: u64) -> Duration {
    let gib = bytes as f64 / f64::from(1u32 << 30);
    per_gib.mul_f64(gib).max(Duration::from_secs(1))
}

/// The XBZRLE cache for a guest dirtying `dirty_mib_per_s` MiB per second with `ram` bytes:
/// what it dirties in two seconds (so a page rewritten within a pass or two is found), at least
/// 64 MiB, at most half its RAM, a power of two (QEMU rounds down to one anyway).
pub fn auto_xbzrle_cache(dirty_mib_per_s: u64, ram: u64) -> u64 {
    let wanted = (dirty_mib_per_s.saturating_mul(2) << 20).max(64 << 20);
    let capped = wanted.min((ram / 2).max(1 << 20));
    1u64 << (63 - capped.leading_zeros())
}

/// One downtime step taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DowntimeStep {
    /// Into the RAM phase.
    pub at_ms: u64,
    pub limit_ms: u64,
}

/// What was asked for and what acted, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConvergenceReport {
    /// auto-converge's throttle at its highest (percent of the guest's CPU time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_converge_max_throttle_pct: Option<u64>,
    /// The XBZRLE cache used, and the bytes it sent as deltas.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compress: Option<Compression>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub downtime_steps: Vec<DowntimeStep>,
    /// The timeout action taken, and when (ms from the start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_action: Option<TimeoutAction>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_action_at_ms: Option<u64>,
    /// The deadline in force (from --timeout or the completion timeout per GiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The action a no-go verdict led to (`--on-no-go pause` or `abort`), and when (ms from
    /// the start).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_go_action: Option<OnNoGo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_go_action_at_ms: Option<u64>,
    /// The pause deadline in force (`--pause-after`), beside the deadline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pause_deadline_ms: Option<u64>,
    /// Controls applied while the migration ran (`jobs set`, `jobs pause`), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<super::AppliedControl>,
    /// When post-copy started (ms from the start): from then on the source is never resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy_at_ms: Option<u64>,
    /// Each recovery of a post-copy whose link was cut, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub postcopy_recoveries: Vec<PostcopyRecovery>,
}

/// One post-copy recovery: when the link was found cut, how many attempts it took, and how
/// long until the migration ran again (`None`: it never did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PostcopyRecovery {
    pub paused_at_ms: u64,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered_after_ms: Option<u64>,
}

impl ConvergenceReport {
    /// Whether anything was asked for or acted.
    pub fn is_empty(&self) -> bool {
        *self == ConvergenceReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_steps_rise_evenly_to_the_maximum_and_stay() {
        let steps = DowntimeSteps::parse("1000:4:10").expect("parse");

        let at = |s| steps.limit_at(200, Duration::from_secs(s));

        assert_eq!(at(5), None);
        assert_eq!(at(10), Some(400));
        assert_eq!(at(25), Some(600));
        assert_eq!(at(40), Some(1000));
        assert_eq!(at(400), Some(1000));
    }

    #[test]
    fn downtime_steps_are_parsed_with_defaults_and_bad_input_is_named() {
        assert_eq!(
            DowntimeSteps::parse("2000").expect("parse"),
            DowntimeSteps {
                max: Duration::from_millis(2000),
                steps: 10,
                every: Duration::from_secs(5),
            }
        );
        assert!(DowntimeSteps::parse("0").is_err());
        assert!(DowntimeSteps::parse("x:2").is_err_and(|e| e.contains("\"x\"")));
        assert!(DowntimeSteps::parse("100:2:3:4").is_err());
    }

    #[test]
    fn the_completion_timeout_scales_with_size() {
        let per_gib = Duration::from_secs(150);

        assert_eq!(
            completion_timeout(per_gib, 2 << 30),
            Duration::from_secs(300)
        );
        assert_eq!(
            completion_timeout(per_gib, 128 << 20),
            Duration::from_millis(18750)
        );
        assert_eq!(completion_timeout(per_gib, 0), Duration::from_secs(1));
    }

    #[test]
    fn the_auto_xbzrle_cache_covers_two_seconds_of_dirtying_within_bounds() {
        assert_eq!(auto_xbzrle_cache(100, 4 << 30), 128 << 20);
        assert_eq!(auto_xbzrle_cache(1, 4 << 30), 64 << 20);
        assert_eq!(auto_xbzrle_cache(10_000, 1 << 30), 512 << 20);
        assert_eq!(auto_xbzrle_cache(100, 256 << 20), 128 << 20);
    }
}
