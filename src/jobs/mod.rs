//! Running migrations as jobs that other processes can see and control: each `migrate` serves a
//! UNIX control socket, and `jobs` lists them, cancels one, changes its bandwidth or downtime
//! limit, or pauses its guest. Knows nothing of QEMU or of migrations: what a request does is
//! the [`Handler`]'s business.
//!
//! Layout of the run directory ([`run_dir`], default [`DEFAULT_RUN_DIR`]):
//! - `ID.lock`: held (`flock`, exclusive) by the job's process for its whole life; the kernel
//!   releases it however the process ends, so a lock that can be taken means the job is gone;
//! - `ID.sock`: the control socket, mode 0600.
//!
//! A job's life:
//! 1. [`JobServer::start`] opens the directory (created with mode 0700; refused when it is a
//!    symlink, another user's, or open to group or others), takes `ID.lock` (refusing an id in
//!    use), and listens on `ID.sock`;
//! 2. each connection carries one request line and gets one reply line ([`protocol`]); a peer
//!    of another user is refused (`SO_PEERCRED`);
//! 3. dropping the server removes both files, on success and error paths alike; a crashed
//!    job's files are removed by the next [`list`] or [`request`] that finds its lock free.

mod client;
pub mod protocol;
mod server;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;

pub use client::{list, request};
pub use protocol::{DiskProgress, JobStatus, RamProgress, Reply, Request};
pub use server::{Handler, JobServer};

/// Where control sockets live unless `QTM_RUN_DIR` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/qemu-tls-migrate/jobs";
/// How long a client waits for a job's answer by default: a control is applied on the job's
/// next progress tick, within its QMP timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a job waits for a connected client's request line.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong with a job's socket or its directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobsError {
    #[error("cannot use the jobs directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing the jobs directory {path}: {problem}; remove it so that it is created afresh \
         (mode 0700), or set QTM_RUN_DIR to a directory owned by this user and closed to others"
    )]
    UnsafeRunDir { path: PathBuf, problem: String },
    #[error(
        "bad job id {id:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadId { id: String },
    #[error("job id {id} is taken by a running migration; choose another --job-id")]
    IdInUse { id: String },
    #[error("no running job {id:?}; {}", running_list(.running))]
    UnknownJob { id: String, running: Vec<String> },
    #[error("job {id}: cannot reach its control socket {path}")]
    Connect {
        id: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("job {id} did not answer within {after:?}")]
    Timeout { id: String, after: Duration },
    #[error("job {id}: unexpected answer: {detail}")]
    Protocol { id: String, detail: String },
}

impl JobsError {
    /// Whether the error means "no such job" (the CLI's exit 3).
    pub fn is_unknown_job(&self) -> bool {
        matches!(self, JobsError::UnknownJob { .. } | JobsError::BadId { .. })
    }
}

fn running_list(ids: &[String]) -> String {
    if ids.is_empty() {
        "no migration is running on this host".into()
    } else {
        format!("running: {}", ids.join(", "))
    }
}

/// The directory of control sockets: `QTM_RUN_DIR`, else [`DEFAULT_RUN_DIR`].
pub fn run_dir() -> PathBuf {
    std::env::var_os("QTM_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// Creates the run directory (mode 0700) when missing and checks it as a job's server does,
/// for the other files kept there (the migrations' journals).
pub(crate) fn ensure_run_dir(dir: &Path) -> Result<(), JobsError> {
    open_run_dir(dir, true).map(drop)
}

/// A fresh job id: 8 hexadecimal digits.
pub fn new_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // No randomness: the process id is unique among running jobs too.
        return format!("{:08x}", std::process::id());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a job id: it names files, so no separators, no leading dot, a bounded length.
pub fn check_id(id: &str) -> Result<(), JobsError> {
    let ok = (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(JobsError::BadId { id: id.to_string() })
    }
}

/// Opens the run directory, creating it (mode 0700) when `create`, refusing one that is a
/// symlink, not a directory, another user's, or open to group or others. `None`: it does not
/// exist (and `create` is false).
fn open_run_dir(dir: &Path, create: bool) -> Result<Option<OwnedFd>, JobsError> {
    use crate::private_dir::{self, DirProblem, Strictness};
    private_dir::open(dir, create, Strictness::OwnerOnly).map_err(|p| match p {
        DirProblem::Io(source) => JobsError::RunDir {
            path: dir.to_path_buf(),
            source,
        },
        DirProblem::Unsafe(problem) => JobsError::UnsafeRunDir {
            path: dir.to_path_buf(),
            problem,
        },
    })
}

fn lock_name(id: &str) -> String {
    format!("{id}.lock")
}

fn socket_name(id: &str) -> String {
    format!("{id}.sock")
}

/// Opens `ID.lock` in the opened run directory (creating it, mode 0600, when `create`), never
/// following a symlink. `None`: it does not exist.
fn open_lock(
    dir_fd: &OwnedFd,
    dir: &Path,
    id: &str,
    create: bool,
) -> Result<Option<File>, JobsError> {
    let name = lock_name(id);
    let mut flags = OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if create {
        flags |= OFlag::O_CREAT;
    }
    match nix::fcntl::openat(
        dir_fd,
        name.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => Ok(Some(File::from(fd))),
        Err(Errno::ENOENT) if !create => Ok(None),
        Err(Errno::ELOOP) => Err(JobsError::UnsafeRunDir {
            path: dir.join(&name),
            problem: "a symbolic link stands where a lock file belongs".into(),
        }),
        Err(e) => Err(JobsError::RunDir {
            path: dir.join(&name),
            source: e.into(),
        }),
    }
}

/// Whether the locked `file` is still the one named `ID.lock` (a lock taken on a file that was
/// removed and replaced meanwhile proves nothing).
fn still_named(dir_fd: &OwnedFd, id: &str, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(held) = file.metadata() else {
        return false;
    };
    match nix::sys::stat::fstatat(
        dir_fd,
        lock_name(id).as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    ) {
        Ok(named) => named.st_ino == held.ino() && named.st_dev == held.dev(),
        Err(_) => false,
    }
}

/// Takes `ID.lock` when it is free; `None` when another process holds it.
fn try_lock(
    dir_fd: &OwnedFd,
    dir: &Path,
    id: &str,
    create: bool,
) -> Result<Option<Flock<File>>, JobsError> {
    let Some(file) = open_lock(dir_fd, dir, id, create)? else {
        return Ok(None);
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) if still_named(dir_fd, id, &lock) => Ok(Some(lock)),
        _ => Ok(None),
    }
}

/// Removes a job's two files by name in the opened run directory.
fn remove_files(dir_fd: &OwnedFd, id: &str) {
    for name in [socket_name(id), lock_name(id)] {
        let _ = nix::unistd::unlinkat(
            dir_fd,
            name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn ids_are_file_names_and_nothing_more() {
        for good in ["3f9c2a1b", "vm-42.migration_1", &"a".repeat(64)] {
            check_id(good).expect(good);
        }
        for bad in ["", ".hidden", "../x", "a/b", "a b", &"a".repeat(65)] {
            assert!(
                matches!(check_id(bad), Err(JobsError::BadId { .. })),
                "{bad:?}"
            );
        }
        check_id(&new_id()).expect("a new id is valid");
    }

    #[test]
    fn a_run_dir_owned_by_another_user_is_refused_naming_it() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("jobs");
        std::fs::create_dir(&dir).expect("mkdir");
        set_mode(&dir, 0o700);
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody");
        nix::unistd::chown(&dir, Some(nobody.uid), None).expect("chown to nobody");

        let err = open_run_dir(&dir, false).expect_err("refused");

        let msg = err.to_string();
        assert!(matches!(err, JobsError::UnsafeRunDir { .. }), "{msg}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(msg.contains("QTM_RUN_DIR"), "{msg}");
    }

    #[test]
    fn a_symlink_planted_as_a_lock_file_is_refused_not_followed() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("jobs");
        let fd = open_run_dir(&dir, true).expect("open").expect("dir");
        let victim = parent.path().join("victim");
        std::os::unix::fs::symlink(&victim, dir.join("job1.lock")).expect("symlink");

        let err = try_lock(&fd, &dir, "job1", true).expect_err("refused");

        assert!(matches!(err, JobsError::UnsafeRunDir { .. }), "{err}");
        assert!(!victim.exists(), "the symlink was followed");
    }
}
