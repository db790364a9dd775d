//! Directories only this user may change: the port lock directory and the jobs' run directory
//! hold files other processes trust, so a directory another user owns, or can write to, or a
//! symbolic link put in its place, is refused.
//!
//! The check is made on the open directory (`O_NOFOLLOW`, then `fstat`), and the caller works
//! through that descriptor, so a swap between the check and the use changes nothing.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Why a directory was not opened.
#[derive(Debug)]
pub(crate) enum DirProblem {
    Io(std::io::Error),
    /// What makes it unsafe, in words.
    Unsafe(String),
}

/// Which mode bits the directory must not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strictness {
    /// Nobody else may write to it (`0o022` clear).
    NotWritableByOthers,
    /// Nobody else may even look (`0o077` clear: 0700).
    OwnerOnly,
}

/// Opens `dir`, creating it (mode 0700, parents as needed) when `create`; `None` when it does
/// not exist and `create` is false. Refuses a symbolic link, a non-directory, another user's
/// directory, or one with the mode bits `strict` forbids.
pub(crate) fn open(
    dir: &Path,
    create: bool,
    strict: Strictness,
) -> Result<Option<OwnedFd>, DirProblem> {
    if create {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(DirProblem::Io)?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => tracing::debug!(dir = %dir.display(), "private directory created"),
            // Created earlier, or by a process running beside this one: checked below.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(DirProblem::Io(e)),
        }
    }
    let unsafe_dir = |problem: &str| DirProblem::Unsafe(problem.to_string());
    // A first look names what is wrong; the O_NOFOLLOW open is what makes it safe.
    let kind = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) => return Err(DirProblem::Io(e)),
    };
    if kind.is_symlink() {
        return Err(unsafe_dir("it is a symbolic link"));
    }
    if !kind.is_dir() {
        return Err(unsafe_dir("it is not a directory"));
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(dir, flags, Mode::empty()).map_err(|errno| match errno {
        Errno::ELOOP | Errno::ENOTDIR => unsafe_dir("it is not a plain directory"),
        other => DirProblem::Io(other.into()),
    })?;
    let stat = nix::sys::stat::fstat(&fd).map_err(|e| DirProblem::Io(e.into()))?;
    let me = nix::unistd::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(DirProblem::Unsafe(format!(
            "it belongs to uid {}, not to this user (uid {me})",
            stat.st_uid
        )));
    }
    let mode = stat.st_mode & 0o7777;
    match strict {
        Strictness::NotWritableByOthers if mode & 0o022 != 0 => Err(DirProblem::Unsafe(format!(
            "it is writable by group or others (mode {mode:04o})"
        ))),
        Strictness::OwnerOnly if mode & 0o077 != 0 => Err(DirProblem::Unsafe(format!(
            "it is open to group or others (mode {mode:04o}; 0700 expected)"
        ))),
        _ => Ok(Some(fd)),
    }
}
