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
        return Err("a bandwidth of 0 would stop the migration; use \"unlimited\"".into());
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
        assert!(parse_bandwidth("0").is_err());
        assert!(parse_bandwidth("12X").is_err());
        assert!(parse_bandwidth("fast").is_err());
    }
}
