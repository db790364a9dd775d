//! What `serve --libvirt` made for an incoming domain, written down (`--state-dir`) so that
//! a service killed while the domain waits is cleaned up by the next one, before that one
//! accepts connections ([`super::incoming::recover`]).
//!
//! One file per incoming domain, `incoming-ID.json`, in a directory only this user may open
//! ([`crate::private_dir`], mode 0700):
//! 1. written before anything is created for the domain, and rewritten after each disk is
//!    created (so it never lists a file the service did not create) or adopted (listed apart,
//!    never deleted);
//! 2. marked `resuming` before `finish` may resume the domain: from then on it may run the
//!    guest, and nothing of the service's destroys it;
//! 3. removed once the session is over: finished (the domain now runs the guest) or rolled back.
//!
//! The service holds an exclusive `flock` on the file for as long as the session lives; the
//! kernel drops it however the process ends, so a file whose lock can be taken was left by a
//! service that is gone, and one whose lock cannot be taken belongs to a service still running
//! (two services on one state directory never take each other's domains).
//!
//! A rewrite is one `pwrite` at offset 0 and a truncation, then `fsync`; a reader takes the
//! first JSON value of the file, so a rewrite cut short between the two steps still reads.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::storage::CreatedFile;

const PREFIX: &str = "incoming-";
const SUFFIX: &str = ".json";

/// Why the state directory or a record could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    #[error(
        "refusing the state directory {path}: {problem}; remove it so that it is created afresh \
         (mode 0700), or name another with --state-dir"
    )]
    UnsafeDir { path: PathBuf, problem: String },
    #[error("cannot use the record {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What was made for one incoming domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The libvirt URI the domain was created at.
    pub uri: String,
    pub name: String,
    /// How the domain is found again (a name can be reused by someone else).
    pub uuid: String,
    /// Its QMP socket, which QEMU leaves behind when killed.
    pub qmp: PathBuf,
    /// The disks the service created for it, by device and inode: deleted by a roll-back.
    #[serde(default)]
    pub disks: Vec<CreatedFile>,
    /// The existing volumes it adopted ([`super::adopt`]): never deleted (their owner,
    /// CloudStack, deletes them). A record of an older build has none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<CreatedFile>,
    /// `finish` began: the domain may run the guest, and is never destroyed.
    #[serde(default)]
    pub resuming: bool,
}

/// The state directory, opened once and used through its descriptor.
#[derive(Debug, Clone)]
pub struct Records {
    dir: Arc<OwnedFd>,
    path: PathBuf,
}

/// A record written by this process, locked while it lives.
#[derive(Debug)]
pub struct RecordFile {
    dir: Records,
    name: String,
    file: Flock<File>,
    record: Record,
}

/// A record left by a service that is gone, locked now by this one.
#[derive(Debug)]
pub struct LeftRecord {
    pub file: RecordFile,
}

impl Records {
    /// Opens `dir`, creating it (mode 0700, parents as needed).
    pub fn open(dir: &Path) -> Result<Records, RecordError> {
        use crate::private_dir::{self, DirProblem, Strictness};
        let unsafe_dir = |problem: String| RecordError::UnsafeDir {
            path: dir.to_path_buf(),
            problem,
        };
        match private_dir::open(dir, true, Strictness::OwnerOnly) {
            Ok(Some(fd)) => Ok(Records {
                dir: Arc::new(fd),
                path: dir.to_path_buf(),
            }),
            Ok(None) => Err(unsafe_dir("it could not be created".into())),
            Err(DirProblem::Io(source)) => Err(RecordError::Io {
                path: dir.to_path_buf(),
                source,
            }),
            Err(DirProblem::Unsafe(problem)) => Err(unsafe_dir(problem)),
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a new record `incoming-ID.json` and locks it; `id` is the caller's unique name.
    pub fn create(&self, id: &str, record: Record) -> Result<RecordFile, RecordError> {
        let name = format!("{PREFIX}{id}{SUFFIX}");
        let io = |source: std::io::Error| RecordError::Io {
            path: self.path.join(&name),
            source,
        };
        let fd = nix::fcntl::openat(
            &*self.dir,
            name.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| io(e.into()))?;
        let file = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io(e.into()))?;
        let mut created = RecordFile {
            dir: self.clone(),
            name,
            file,
            record,
        };
        created.write()?;
        Ok(created)
    }

    /// The records whose service is gone (their lock was free), each locked now; a record
    /// another running service holds is skipped. A file that cannot be read is reported with
    /// its name and left in place.
    pub fn left_behind(&self) -> (Vec<LeftRecord>, Vec<String>) {
        let (mut left, mut problems) = (Vec::new(), Vec::new());
        let listing = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&*self.dir)
        );
        let entries = match std::fs::read_dir(&listing) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("cannot list {}: {e}", self.path.display()));
                return (left, problems);
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(PREFIX) && name.ends_with(SUFFIX)) {
                continue;
            }
            match self.take(&name) {
                Ok(Some(file)) => left.push(LeftRecord { file }),
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }
        (left, problems)
    }

    /// Opens and locks `name` when its lock is free and it still has that name; reads it.
    fn take(&self, name: &str) -> Result<Option<RecordFile>, String> {
        let path = self.path.join(name);
        let fd = nix::fcntl::openat(
            &*self.dir,
            name,
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let Ok(mut file) = Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock) else {
            // Its service still runs.
            return Ok(None);
        };
        if !self.still_named(name, &file) {
            // Removed (and perhaps re-created) by its owner meanwhile.
            return Ok(None);
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let record = serde_json::Deserializer::from_slice(&bytes)
            .into_iter::<Record>()
            .next()
            .ok_or_else(|| "it is empty".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                format!(
                    "cannot read the record {}: {e}; left in place, check it by hand",
                    path.display()
                )
            })?;
        Ok(Some(RecordFile {
            dir: self.clone(),
            name: name.to_string(),
            file,
            record,
        }))
    }

    fn still_named(&self, name: &str, file: &File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Ok(held) = file.metadata() else {
            return false;
        };
        nix::sys::stat::fstatat(&*self.dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|named| named.st_ino == held.ino() && named.st_dev == held.dev())
    }
}

impl RecordFile {
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The record's path, for messages.
    pub fn path(&self) -> PathBuf {
        self.dir.path.join(&self.name)
    }

    /// Changes the record and writes it at once.
    pub fn update(&mut self, change: impl FnOnce(&mut Record)) -> Result<(), RecordError> {
        change(&mut self.record);
        self.write()
    }

    fn write(&mut self) -> Result<(), RecordError> {
        let io = |source: std::io::Error| RecordError::Io {
            path: self.dir.path.join(&self.name),
            source,
        };
        let mut bytes =
            serde_json::to_vec_pretty(&self.record).map_err(|e| io(std::io::Error::other(e)))?;
        bytes.push(b'\n');
        self.file.write_all_at(&bytes, 0).map_err(io)?;
        self.file.set_len(bytes.len() as u64).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// Deletes the record (its domain is done with): unlinked while still locked, so no other
    /// service can take it meanwhile.
    pub fn remove(self) -> Result<(), RecordError> {
        nix::unistd::unlinkat(
            &*self.dir.dir,
            self.name.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(|e| RecordError::Io {
            path: self.dir.path.join(&self.name),
            source: e.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            uri: "qemu:///system".into(),
            name: "i-2-3-VM".into(),
            uuid: "8e4f2a47-7d7c-4c43-a1f8-3f0d2d1b6a11".into(),
            qmp: "/run/qemu-tls-migrate/libvirt/qtm-in-1.sock".into(),
            disks: Vec::new(),
            adopted: Vec::new(),
            resuming: false,
        }
    }

    #[test]
    fn a_record_held_by_a_live_session_is_not_left_behind_and_one_released_is() {
        let root = tempfile::tempdir().expect("tmp");
        let records = Records::open(&root.path().join("state")).expect("open");
        let mut held = records.create("a", record()).expect("create");
        held.update(|r| r.resuming = true).expect("update");

        let (while_held, _) = records.left_behind();
        drop(held);
        let (after, problems) = records.left_behind();

        assert!(while_held.is_empty());
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(after.len(), 1);
        let mut expected = record();
        expected.resuming = true;
        assert_eq!(after[0].file.record(), &expected);
    }

    #[test]
    fn a_removed_record_is_gone_and_a_shorter_rewrite_still_reads() {
        let root = tempfile::tempdir().expect("tmp");
        let records = Records::open(&root.path().join("state")).expect("open");
        let mut long = record();
        long.name = "x".repeat(300);
        let mut file = records.create("b", long).expect("create");
        file.update(|r| r.name = "short".into()).expect("update");
        let path = file.path();
        drop(file);

        let (left, _) = records.left_behind();
        let names: Vec<String> = left.iter().map(|l| l.file.record().name.clone()).collect();
        for l in left {
            l.file.remove().expect("remove");
        }

        assert_eq!(names, ["short"]);
        assert!(!path.exists());
        assert!(records.left_behind().0.is_empty());
    }

    #[test]
    fn an_unreadable_record_is_reported_and_left_in_place() {
        let root = tempfile::tempdir().expect("tmp");
        let records = Records::open(&root.path().join("state")).expect("open");
        let path = records.path().join("incoming-c.json");
        std::fs::write(&path, b"{not json").expect("write");

        let (left, problems) = records.left_behind();

        assert!(left.is_empty());
        assert!(problems[0].contains("incoming-c.json"), "{problems:?}");
        assert!(path.exists());
    }
}
