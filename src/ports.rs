//! Ports for migration streams and NBD exports, from 49152-49215 by default.
//!
//! A port is handed out only when it is free on the host (a trial bind succeeds) and no other
//! migration on the same host holds it. "Holds" is an exclusive `flock` on a lock file per port
//! in [`lock_dir`]: it works across processes, and the kernel releases it when the holder exits,
//! however it exits, so a crashed migration never leaks a port.
//!
//! The lock directory is this user's alone: created with mode 0700, and refused when it is a
//! symlink, belongs to another user, or is writable by group or others. Lock files are opened
//! relative to the directory's descriptor with `O_NOFOLLOW`, so a symlink planted in place of
//! one is refused, never followed. Otherwise a local user could hold every port (a denial of
//! service) or redirect the tool's writes.

use std::fmt;
use std::fs::File;
use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

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
    #[error(
        "refusing the port lock directory {path}: {problem}; remove it so that it is created \
         afresh (mode 0700), or set QTM_LOCK_DIR to a directory owned by this user and writable \
         only by it"
    )]
    UnsafeLockDir { path: PathBuf, problem: String },
    #[error(
        "refusing the port lock file {path}: {problem}; remove it (the tool creates its lock \
         files itself) and find out who put it there"
    )]
    UnsafeLockFile { path: PathBuf, problem: String },
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
    let dir_fd = open_lock_dir(dir)?;
    for port in range.first..=range.last {
        let file = open_lock_file(&dir_fd, dir, port)?;
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

/// Creates the lock directory (mode 0700) when missing, and opens it, refusing one that is a
/// symlink, not a directory, another user's, or writable by group or others.
fn open_lock_dir(dir: &Path) -> Result<OwnedFd, PortError> {
    use crate::private_dir::{self, DirProblem, Strictness};
    match private_dir::open(dir, true, Strictness::NotWritableByOthers) {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => Err(PortError::LockDir {
            path: dir.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        }),
        Err(DirProblem::Io(source)) => Err(PortError::LockDir {
            path: dir.to_path_buf(),
            source,
        }),
        Err(DirProblem::Unsafe(problem)) => Err(PortError::UnsafeLockDir {
            path: dir.to_path_buf(),
            problem,
        }),
    }
}

/// Opens (creating, mode 0600) the lock file of `port` in the opened lock directory, never
/// following a symlink and refusing anything but a plain file.
fn open_lock_file(dir_fd: &OwnedFd, dir: &Path, port: u16) -> Result<File, PortError> {
    let name = format!("port-{port}.lock");
    let path = dir.join(&name);
    // O_NONBLOCK: a FIFO in place of the lock file must not block the open.
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = nix::fcntl::openat(
        dir_fd,
        name.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|errno| match errno {
        Errno::ELOOP => PortError::UnsafeLockFile {
            path: path.clone(),
            problem: "it is a symbolic link".into(),
        },
        other => PortError::LockDir {
            path: path.clone(),
            source: other.into(),
        },
    })?;
    let file = File::from(fd);
    let kind = file
        .metadata()
        .map_err(|source| PortError::LockDir {
            path: path.clone(),
            source,
        })?
        .file_type();
    if !kind.is_file() {
        return Err(PortError::UnsafeLockFile {
            path,
            problem: "it is not a plain file".into(),
        });
    }
    Ok(file)
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

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn a_lock_dir_owned_by_another_user_is_refused_naming_it() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("locks");
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, 0o700);
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody");
        nix::unistd::chown(&dir, Some(nobody.uid), None).expect("chown to nobody");

        let err = allocate_in("49204".parse().expect("range"), &dir).expect_err("refused");

        assert!(matches!(err, PortError::UnsafeLockDir { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("QTM_LOCK_DIR"), "{msg}");
    }

    #[test]
    fn a_symlink_planted_as_a_lock_file_is_refused_not_followed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("locks");
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, 0o700);
        let victim = parent.path().join("victim");
        std::os::unix::fs::symlink(&victim, dir.join("port-49207.lock")).expect("symlink");

        let err = allocate_in("49207".parse().expect("range"), &dir).expect_err("refused");

        assert!(matches!(err, PortError::UnsafeLockFile { .. }), "{err}");
        assert!(err.to_string().contains("port-49207.lock"), "{err}");
        assert!(!victim.exists(), "the symlink was followed");
    }
}
