//! One migration at a time per VM, across processes: a run holds its VM's lock from before it
//! touches anything until everything it did is put back, so a second run on the same VM (an
//! agent's retry while the first still copies a disk) is refused at once, naming the run that
//! holds it, instead of colliding with it half way.
//!
//! A VM is named by keys ([`VmKey`]): the canonical path of its QMP socket, and for a libvirt
//! domain its UUID too (its socket may be a passthrough private to each run). Each key is a
//! file `vm-HASH.lock` in the port lock directory ([`crate::ports::lock_dir`], the same checks:
//! this user's, not writable by others, no symlinks followed), held with an exclusive `flock`:
//! the kernel releases it however the holder ends, so a run killed with SIGKILL never blocks
//! the next one. The holder writes its job id and pid into the file, for the refusal to name.
//!
//! 1. Open `vm-HASH.lock` (created 0600 if missing, `O_NOFOLLOW`) and `flock` it without
//!    waiting; held elsewhere: read who holds it and refuse ([`VmLockError::Busy`]).
//! 2. Check the locked file is still the one of that name (a holder removes it on release,
//!    and a file removed under us proves nothing): if not, start again.
//! 3. Write the holder's record. On release, remove the file while still holding it.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

/// How often a lock whose file was removed under us (its holder released it meanwhile) is
/// tried again before giving up.
const TRIES: usize = 8;

/// Why a VM's lock was not taken.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmLockError {
    #[error(
        "{vm} is being migrated by another run of this tool ({}); nothing was changed: wait for \
         that run to end{}, and do not start another meanwhile",
        holder_text(.job, .pid),
        .job.as_ref().map(|j| format!(" (qemu-tls-migrate jobs; or cancel it: qemu-tls-migrate \
            jobs cancel {j})")).unwrap_or_default()
    )]
    Busy {
        vm: String,
        job: Option<String>,
        pid: Option<u32>,
    },
    #[error("cannot use the VM lock {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing the lock directory {path}: {problem}; remove it so that it is created afresh \
         (mode 0700), or set QTM_LOCK_DIR to a directory owned by this user and writable only \
         by it"
    )]
    UnsafeDir { path: PathBuf, problem: String },
    #[error(
        "refusing the VM lock file {path}: {problem}; remove it (the tool creates its lock files \
         itself) and find out who put it there"
    )]
    UnsafeFile { path: PathBuf, problem: String },
    #[error("the lock of {vm} kept being removed and made anew by other runs; try again")]
    Contended { vm: String },
}

fn holder_text(job: &Option<String>, pid: &Option<u32>) -> String {
    match (job, pid) {
        (Some(job), Some(pid)) => format!("job {job}, pid {pid}"),
        (Some(job), None) => format!("job {job}"),
        (None, Some(pid)) => format!("pid {pid}, no job id"),
        (None, None) => "it has not said who it is yet".into(),
    }
}

/// One name of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmKey {
    /// The VM's QMP socket, canonicalised (`./vm.sock` and `/run/vm.sock` are one VM).
    Socket(PathBuf),
    /// A libvirt domain's UUID.
    Domain(String),
}

impl VmKey {
    /// The key of the QEMU behind `socket`: its canonical path, or (when it cannot be resolved,
    /// e.g. it does not exist: the connection will fail anyway) the absolute path as given.
    pub fn socket(socket: &Path) -> VmKey {
        let path = std::fs::canonicalize(socket)
            .or_else(|_| std::path::absolute(socket))
            .unwrap_or_else(|_| socket.to_path_buf());
        VmKey::Socket(path)
    }

    /// The key of the libvirt domain with this UUID.
    pub fn domain(uuid: &str) -> VmKey {
        VmKey::Domain(uuid.trim().to_ascii_lowercase())
    }

    /// What the key is hashed from: a kind and the value.
    fn text(&self) -> String {
        match self {
            VmKey::Socket(path) => format!("qmp:{}", path.display()),
            VmKey::Domain(uuid) => format!("domain:{uuid}"),
        }
    }

    /// The VM as a message names it.
    fn describe(&self) -> String {
        match self {
            VmKey::Socket(path) => format!("the VM of QMP socket {}", path.display()),
            VmKey::Domain(uuid) => format!("the libvirt domain {uuid}"),
        }
    }

    /// `vm-HASH`: the lock file's name without `.lock`, also the VM's journal's
    /// ([`crate::migration::journal`]).
    pub fn file_stem(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.text().as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("vm-{hex}")
    }

    fn file_name(&self) -> String {
        format!("{}.lock", self.file_stem())
    }
}

/// What the holder writes into its lock file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    vm: String,
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
}

/// A VM's lock, held until dropped (the files are removed then).
#[derive(Debug)]
pub struct VmLock {
    held: Vec<Held>,
}

#[derive(Debug)]
struct Held {
    dir_fd: OwnedFd,
    name: String,
    lock: Flock<File>,
}

impl VmLock {
    /// Takes every key of one VM, for the run `job` (named to a second run that finds it
    /// busy), in the lock directory ([`crate::ports::lock_dir`]).
    pub fn acquire(keys: &[VmKey], job: Option<&str>) -> Result<VmLock, VmLockError> {
        VmLock::acquire_in(&crate::ports::lock_dir(), keys, job)
    }

    /// [`VmLock::acquire`] in `dir`. All keys or none: a key held elsewhere releases those
    /// already taken.
    pub fn acquire_in(
        dir: &Path,
        keys: &[VmKey],
        job: Option<&str>,
    ) -> Result<VmLock, VmLockError> {
        let mut lock = VmLock { held: Vec::new() };
        for key in keys {
            let held = take(dir, key, job)?;
            lock.held.push(held);
        }
        tracing::debug!(keys = ?keys, ?job, "VM lock taken");
        Ok(lock)
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        for held in self.held.drain(..) {
            // Removed while still held: a run that opened it meanwhile finds it renamed away
            // (step 2) and starts again on a new file.
            if still_named(&held.dir_fd, &held.name, &held.lock) {
                let _ = nix::unistd::unlinkat(
                    &held.dir_fd,
                    held.name.as_str(),
                    nix::unistd::UnlinkatFlags::NoRemoveDir,
                );
            }
            drop(held.lock);
        }
    }
}

fn take(dir: &Path, key: &VmKey, job: Option<&str>) -> Result<Held, VmLockError> {
    let name = key.file_name();
    for _ in 0..TRIES {
        let dir_fd = open_dir(dir)?;
        let file = open_file(&dir_fd, dir, &name)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let record = read_record(&mut file);
                return Err(VmLockError::Busy {
                    vm: key.describe(),
                    job: record.job,
                    pid: record.pid,
                });
            }
            Err((_, errno)) => {
                return Err(VmLockError::Io {
                    path: dir.join(&name),
                    source: errno.into(),
                });
            }
        };
        if !still_named(&dir_fd, &name, &lock) {
            continue;
        }
        let record = Record {
            vm: key.describe(),
            job: job.map(str::to_string),
            pid: Some(std::process::id()),
        };
        write_record(&mut lock, &record).map_err(|source| VmLockError::Io {
            path: dir.join(&name),
            source,
        })?;
        return Ok(Held { dir_fd, name, lock });
    }
    Err(VmLockError::Contended { vm: key.describe() })
}

fn open_dir(dir: &Path) -> Result<OwnedFd, VmLockError> {
    use crate::private_dir::{self, DirProblem, Strictness};
    match private_dir::open(dir, true, Strictness::NotWritableByOthers) {
        Ok(Some(fd)) => Ok(fd),
        Ok(None) => Err(VmLockError::Io {
            path: dir.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        }),
        Err(DirProblem::Io(source)) => Err(VmLockError::Io {
            path: dir.to_path_buf(),
            source,
        }),
        Err(DirProblem::Unsafe(problem)) => Err(VmLockError::UnsafeDir {
            path: dir.to_path_buf(),
            problem,
        }),
    }
}

/// Opens (creating, mode 0600) the lock file `name`, never following a symlink and refusing
/// anything but a plain file.
fn open_file(dir_fd: &OwnedFd, dir: &Path, name: &str) -> Result<File, VmLockError> {
    let path = dir.join(name);
    // O_NONBLOCK: a FIFO in place of the lock file must not block the open.
    let flags =
        OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    let fd = nix::fcntl::openat(dir_fd, name, flags, Mode::from_bits_truncate(0o600)).map_err(
        |errno| match errno {
            Errno::ELOOP => VmLockError::UnsafeFile {
                path: path.clone(),
                problem: "it is a symbolic link".into(),
            },
            other => VmLockError::Io {
                path: path.clone(),
                source: other.into(),
            },
        },
    )?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(|source| VmLockError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(VmLockError::UnsafeFile {
            path,
            problem: "it is not a plain file".into(),
        });
    }
    Ok(file)
}

/// Whether the locked `file` is still the one named `name`.
fn still_named(dir_fd: &OwnedFd, name: &str, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(held) = file.metadata() else {
        return false;
    };
    match nix::sys::stat::fstatat(dir_fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(named) => named.st_ino == held.ino() && named.st_dev == held.dev(),
        Err(_) => false,
    }
}

/// The holder's record; empty when it cannot be read (the holder has not written it yet).
fn read_record(file: &mut File) -> Record {
    let mut text = String::new();
    // Bounded: the tool writes a short line; anything longer is not ours to trust.
    let read = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.take(4096).read_to_string(&mut text));
    match read {
        Ok(_) => serde_json::from_str(text.trim()).unwrap_or_default(),
        Err(_) => Record::default(),
    }
}

fn write_record(file: &mut File, record: &Record) -> std::io::Result<()> {
    let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(line.as_bytes())?;
    file.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> VmKey {
        VmKey::Socket(PathBuf::from(format!("/run/vms/{name}.sock")))
    }

    #[test]
    fn a_second_run_on_a_held_vm_is_refused_naming_the_first_runs_job() {
        let dir = tempfile::tempdir().expect("dir");
        let _first =
            VmLock::acquire_in(dir.path(), &[key("vm1")], Some("first-run")).expect("first");

        let err = VmLock::acquire_in(dir.path(), &[key("vm1")], Some("retry")).expect_err("busy");

        let msg = err.to_string();
        assert!(matches!(err, VmLockError::Busy { .. }), "{msg}");
        assert!(
            msg.contains("first-run")
                && msg.contains(&std::process::id().to_string())
                && msg.contains("/run/vms/vm1.sock"),
            "{msg}"
        );
    }

    #[test]
    fn other_vms_are_not_held_and_a_released_vm_can_be_taken_again_leaving_no_file() {
        let dir = tempfile::tempdir().expect("dir");
        let first = VmLock::acquire_in(dir.path(), &[key("vm1")], None).expect("first");

        let other = VmLock::acquire_in(dir.path(), &[key("vm2")], None);
        drop(first);
        let again = VmLock::acquire_in(dir.path(), &[key("vm1")], None);

        assert!(other.is_ok(), "{other:?}");
        assert!(again.is_ok(), "{again:?}");
        drop((other, again));
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("list").collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn a_domain_held_by_uuid_is_busy_whatever_socket_the_second_run_uses() {
        let dir = tempfile::tempdir().expect("dir");
        let uuid = "6A2D5E0C-1111-2222-3333-444455556666";
        let _first = VmLock::acquire_in(
            dir.path(),
            &[key("passthrough-a"), VmKey::domain(uuid)],
            Some("first-run"),
        )
        .expect("first");

        let err = VmLock::acquire_in(
            dir.path(),
            &[key("passthrough-b"), VmKey::domain(&uuid.to_lowercase())],
            None,
        )
        .expect_err("busy");

        assert!(matches!(err, VmLockError::Busy { .. }), "{err}");
        assert!(err.to_string().contains("first-run"), "{err}");
        // All or none: the second run's socket key was released with its refusal.
        VmLock::acquire_in(dir.path(), &[key("passthrough-b")], None).expect("released");
    }

    #[test]
    fn one_socket_named_two_ways_is_one_vm() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("vm.sock");
        std::fs::write(&socket, b"").expect("socket stand-in");
        std::os::unix::fs::symlink(&socket, dir.path().join("alias.sock")).expect("symlink");

        assert_eq!(
            VmKey::socket(&dir.path().join("alias.sock")),
            VmKey::socket(&socket)
        );
    }

    #[test]
    fn a_symlink_planted_as_a_lock_file_is_refused_not_followed() {
        let parent = tempfile::tempdir().expect("dir");
        let dir = parent.path().join("locks");
        std::fs::create_dir(&dir).expect("mkdir");
        let victim = parent.path().join("victim");
        std::os::unix::fs::symlink(&victim, dir.join(key("vm1").file_name())).expect("symlink");

        let err = VmLock::acquire_in(&dir, &[key("vm1")], None).expect_err("refused");

        assert!(matches!(err, VmLockError::UnsafeFile { .. }), "{err}");
        assert!(!victim.exists(), "the symlink was followed");
    }
}
