//! Ports for migration streams and NBD exports, from 49152-49215 by default.
//!
//! A port is handed out only when it is free on the host (a trial bind succeeds) and no other
//! migration on the same host holds it. "Holds" is an exclusive `flock` on a lock file per port
//! in [`lock_dir`]: it works across processes, and the kernel releases it when the holder exits,
//! however it exits, so a crashed migration never leaks a port.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::fcntl::{Flock, FlockArg};

/// The range libvirt and CloudStack open for migration (and that `host secure` opens).
pub const DEFAULT_RANGE: PortRange = PortRange {
    first: 49152,
    last: 49215,
};

/// Where lock files live unless `QTM_LOCK_DIR` says otherwise.
pub const DEFAULT_LOCK_DIR: &str = "/run/lock/qemu-tls-migrate";

/// An inclusive range of TCP ports; serialised as `"FIRST-LAST"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl TryFrom<String> for PortRange {
    type Error = PortError;
    fn try_from(s: String) -> Result<PortRange, PortError> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    /// `FIRST-LAST` or a single `PORT`.
    fn from_str(s: &str) -> Result<PortRange, PortError> {
        let bad = || PortError::BadRange {
            value: s.to_string(),
        };
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

/// Why no port could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortError {
    #[error(
        "bad port range {value:?}: expected FIRST-LAST (e.g. 49152-49215) with 0 < FIRST <= LAST"
    )]
    BadRange { value: String },
    #[error(
        "no free port in {range}: every port is in use or held by another migration on this host; \
         wait for one to finish or widen the range with --port-range"
    )]
    Exhausted { range: PortRange },
    #[error("cannot use the port lock directory {path}")]
    LockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A port reserved for one use; the reservation ends when this is dropped.
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _lock: Flock<File>,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// The directory for port lock files: `QTM_LOCK_DIR`, else [`DEFAULT_LOCK_DIR`].
pub fn lock_dir() -> PathBuf {
    std::env::var_os("QTM_LOCK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCK_DIR))
}

/// Reserves the first port of `range` that is free on this host and not held by another
/// migration.
pub fn allocate(range: PortRange) -> Result<PortLease, PortError> {
    allocate_in(range, &lock_dir())
}

/// [`allocate`] with an explicit lock directory.
pub fn allocate_in(range: PortRange, dir: &Path) -> Result<PortLease, PortError> {
    std::fs::create_dir_all(dir).map_err(|source| PortError::LockDir {
        path: dir.to_path_buf(),
        source,
    })?;
    for port in range.first..=range.last {
        let path = dir.join(format!("port-{port}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| PortError::LockDir {
                path: path.clone(),
                source,
            })?;
        let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) else {
            continue; // another migration holds it
        };
        // Free on the host: nothing else (another program, a lingering QEMU) listens on it.
        if TcpListener::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        tracing::debug!(port, "port reserved");
        return Ok(PortLease { port, _lock: lock });
    }
    Err(PortError::Exhausted { range })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        assert_eq!(
            "49152-49215".parse::<PortRange>().expect("range"),
            DEFAULT_RANGE
        );
        assert_eq!(
            "50000".parse::<PortRange>().expect("single"),
            PortRange {
                first: 50000,
                last: 50000
            }
        );
        assert!("5-1".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
    }

    #[test]
    fn held_ports_are_skipped_and_exhaustion_names_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let range = "49200-49201".parse().expect("range");
        let a = allocate_in(range, dir.path()).expect("first");
        let b = allocate_in(range, dir.path()).expect("second");
        assert_ne!(a.port(), b.port());
        let err = allocate_in(range, dir.path()).expect_err("exhausted");
        assert!(err.to_string().contains("49200-49201"), "{err}");
        drop(a);
        allocate_in(range, dir.path()).expect("released port is reusable");
    }

    #[test]
    fn a_port_someone_listens_on_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("0.0.0.0:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let range = PortRange {
            first: port,
            last: port,
        };
        assert!(matches!(
            allocate_in(range, dir.path()),
            Err(PortError::Exhausted { .. })
        ));
    }
}
