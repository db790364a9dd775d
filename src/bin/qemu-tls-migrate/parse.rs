//! Parsers of the command line's values (clap `value_parser`s). They only parse: every rule
//! a value must meet beyond its form is the library's (`check_bandwidth`,
//! `check_multifd_channels`, `MigrationOptions::validate`), called from here where clap
//! should name the flag (exit 2).

use std::path::{Path, PathBuf};

use qemu_tls_migrate::migration::{self, MAX_MULTIFD_CHANNELS, Multifd, UNLIMITED_BANDWIDTH};
use qemu_tls_migrate::peer::DiskCopy;
use qemu_tls_migrate::ports::PortRange;

/// Seconds from 1 to [`migration::MAX_TIMEOUT`], for every timeout flag: clap refuses the rest
/// with a usage error (exit 2) that names the flag.
pub fn timeout_secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=migration::MAX_TIMEOUT.as_secs())
}

/// A duration: a number with a unit, `ms`, `s`, `m` or `h` (`30000ms`, `600s`, `10m`), or a
/// bare number of seconds (what the timeout flags always took).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("{s:?}: expected a duration like 30000ms, 600s, 10m or 600 (seconds)");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms_per)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `--timeout`: a duration ([`parse_duration`]) from 1 s to [`migration::MAX_TIMEOUT`].
pub fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    migration::check_timeout("timeout", parse_duration(s)?)
}

/// `--pause-after`: a duration ([`parse_duration`]); 0 for none (CloudStack's
/// `vm.migrate.pauseafter` 0), which [`crate::tuning`] leaves out.
pub fn parse_pause_after(s: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Ok(d);
    }
    migration::check_pause_after(d)
}

/// `dir` made absolute against the current directory: QEMU opens the PKI files itself, from
/// its own current directory, so a relative path would name other files there.
pub fn absolute_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot resolve the directory {} against the current directory ({e}); give an \
             absolute path",
            dir.display()
        )
    })
}

/// `--disk NODE[,copy=top|full]`: the node and, when given, its copy mode.
pub fn parse_disk(s: &str) -> Result<(String, Option<DiskCopy>), String> {
    let mut parts = s.split(',');
    let node = parts.next().unwrap_or_default().trim();
    if node.is_empty() {
        return Err(format!("--disk {s:?}: expected NODE[,copy=top|full]"));
    }
    let mut copy = None;
    for part in parts {
        copy = Some(match part.trim() {
            "copy=top" => DiskCopy::Top,
            "copy=full" => DiskCopy::Full,
            other => {
                return Err(format!(
                    "--disk {s:?}: unknown setting {other:?}; expected copy=top or copy=full"
                ));
            }
        });
    }
    Ok((node.to_string(), copy))
}

pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(UNLIMITED_BANDWIDTH);
    }
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown suffix {c:?} in {s:?}: use K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte rate like 500M, 1G or unlimited"))?;
    if n == 0 {
        // As CloudStack's vm.migrate.speed 0 (and libvirt's bandwidth 0) mean.
        return Ok(UNLIMITED_BANDWIDTH);
    }
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    migration::check_bandwidth(bytes)
}

/// `--multifd N|auto`.
pub fn parse_multifd(s: &str) -> Result<Multifd, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Multifd::Auto);
    }
    let n = s.parse::<u8>().map_err(|_| {
        format!("{s:?}: use a channel count from 1 to {MAX_MULTIFD_CHANNELS}, or auto")
    })?;
    migration::check_multifd_channels(n).map(Multifd::Channels)
}

pub fn parse_range(s: &str) -> Result<PortRange, String> {
    s.parse()
        .map_err(|e: qemu_tls_migrate::ports::PortError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_may_carry_its_copy_mode() {
        assert_eq!(parse_disk("disk0"), Ok(("disk0".into(), None)));
        assert_eq!(
            parse_disk("disk0,copy=top"),
            Ok(("disk0".into(), Some(DiskCopy::Top)))
        );
        assert!(parse_disk("disk0,copy=some").is_err());
        assert!(parse_disk(",copy=top").is_err());
    }

    #[test]
    fn bandwidth_accepts_suffixes_and_unlimited() {
        assert_eq!(parse_bandwidth("500M"), Ok(500 << 20));
        assert_eq!(parse_bandwidth("1g"), Ok(1 << 30));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert_eq!(parse_bandwidth("unlimited"), Ok(UNLIMITED_BANDWIDTH));
        assert!(parse_bandwidth("12X").is_err());
        assert!(parse_bandwidth("fast").is_err());
    }

    #[test]
    fn bandwidth_0_is_unlimited() {
        assert_eq!(parse_bandwidth("0"), Ok(UNLIMITED_BANDWIDTH));
        assert_eq!(parse_bandwidth("0M"), Ok(UNLIMITED_BANDWIDTH));
    }

    #[test]
    fn durations_take_units_and_a_bare_number_is_seconds() {
        use std::time::Duration;
        assert_eq!(parse_duration("30000ms"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("600"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        for bad in [
            "",
            "ms",
            "1.5s",
            "-1s",
            "10 min",
            "5x",
            &format!("{}h", u64::MAX),
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn timeouts_are_checked_by_the_library_naming_the_value() {
        use std::time::Duration;
        assert_eq!(parse_timeout("600s"), Ok(Duration::from_secs(600)));
        let err = parse_timeout("500ms").expect_err("under a second");
        assert!(err.contains("timeout 500ms"), "{err}");
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("8d").is_err());
        assert!(parse_timeout("169h").is_err());
    }

    #[test]
    fn pause_after_takes_milliseconds_and_0_is_none() {
        use std::time::Duration;
        assert_eq!(parse_pause_after("30000ms"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_pause_after("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_pause_after("0ms"), Ok(Duration::ZERO));
        assert!(parse_pause_after("169h").is_err());
    }
}
