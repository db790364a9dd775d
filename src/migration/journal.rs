//! The journal: what a run changed on each QEMU, written to disk before each change, so that a
//! run killed at any point (`kill -9` of every process, a host crash) can be undone by the next
//! one, by `qemu-tls-migrate recover`, or by `serve` at start-up ([`super::recover`]).
//!
//! One file per VM, `vm-HASH.journal` in the run directory ([`crate::jobs::run_dir`], next to
//! the jobs' control sockets; HASH as the VM's lock file names it, [`crate::vm_lock`]):
//! 1. [`Journal::create`] writes the run's record (who, which QEMUs) before anything changes;
//! 2. every change of an undo stack ([`super::undo::UndoStack`]) rewrites it: a temporary file,
//!    `fsync`ed, renamed over the old one, the directory `fsync`ed; so a reader sees the
//!    previous record or the new one, never half of one. The undo entries carry the *previous*
//!    values (parameters and capabilities as they were before the run), so a recovery puts the
//!    VM back as it was before the tool touched it, never as the dead run left it;
//! 3. before `cont` can reach a destination, the record says so ([`Stage::Finishing`]); once
//!    the destination runs the guest, [`Stage::Completed`];
//! 4. a run that ends with nothing left to undo removes the file ([`Journal::remove`]); one
//!    whose clean-up failed keeps it for a recovery to finish.
//!
//! The run holds the VM's lock while its journal exists; a journal whose lock can be taken was
//! left by a run that is gone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::Side;
use super::undo::Undo;
use crate::vm_lock::VmKey;

/// Journal files end with this.
pub const JOURNAL_SUFFIX: &str = ".journal";

/// What went wrong with a journal file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    #[error("cannot write the migration journal {path}; nothing was changed on either side")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the migration journal {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the migration journal {path} is not one this tool wrote ({detail}); look at it, and \
         remove it once the VM is known to be as it should"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error("cannot use the run directory for migration journals")]
    RunDir(#[source] crate::jobs::JobsError),
}

/// Where a run stands, as far as a recovery needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Before the destination was told to finish: the destination never ran the guest.
    Running,
    /// `cont` (or the remote `finish`) may have reached the destination: it may run the guest.
    Finishing,
    /// The destination runs the guest; what is left is the source's clean-up.
    Completed,
    /// Post-copy started and has not completed: the guest's memory is split between the two
    /// QEMUs, so a recovery touches neither (only `migrate-recover` / `migrate resume=true`
    /// can finish it).
    Postcopy,
}

/// The destination of a journalled run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum JournalDest {
    /// A QEMU on this host, through its QMP socket.
    Local { qmp: PathBuf },
    /// A `serve` on another host, which rolls its own side back.
    Remote { address: String },
}

/// The journal's contents.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRecord {
    /// The VM, as `jobs` names it.
    pub vm: String,
    pub job: Option<String>,
    /// The process that wrote it.
    pub pid: u32,
    /// Milliseconds since the epoch, when the run started.
    pub started_ms: u64,
    pub source_qmp: PathBuf,
    /// The libvirt domain's UUID, when the source is one (a key of its lock).
    #[serde(default)]
    pub source_domain_uuid: Option<String>,
    pub dest: JournalDest,
    pub stage: Stage,
    /// The source's undo stack, oldest first.
    pub source: Vec<Undo>,
    /// The local destination's undo stack, oldest first.
    pub destination: Vec<Undo>,
}

impl JournalRecord {
    /// The VM's lock keys (what the run held).
    pub fn keys(&self) -> Vec<VmKey> {
        let mut keys = vec![VmKey::socket(&self.source_qmp)];
        keys.extend(self.source_domain_uuid.as_deref().map(VmKey::domain));
        keys
    }

    /// The key its file is named by ([`journal_key`]).
    pub fn journal_key(&self) -> VmKey {
        journal_key(&self.source_qmp, self.source_domain_uuid.as_deref())
    }

    /// Whether the run changed anything that is still to undo.
    pub fn has_changes(&self) -> bool {
        !self.source.is_empty() || !self.destination.is_empty()
    }
}

/// A run's journal, rewritten on every change.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    record: Mutex<JournalRecord>,
}

/// The key a VM's journal is named by: a libvirt domain's UUID (its QMP socket may be a
/// passthrough private to each run), else its QMP socket.
pub fn journal_key(source_qmp: &Path, domain_uuid: Option<&str>) -> VmKey {
    match domain_uuid {
        Some(uuid) => VmKey::domain(uuid),
        None => VmKey::socket(source_qmp),
    }
}

/// The journal file of the VM keyed `key` ([`journal_key`]), in `dir`.
pub fn journal_path(dir: &Path, key: &VmKey) -> PathBuf {
    dir.join(format!("{}{JOURNAL_SUFFIX}", key.file_stem()))
}

/// The run directory, created (mode 0700) if missing.
pub(crate) fn run_dir() -> Result<PathBuf, JournalError> {
    let dir = crate::jobs::run_dir();
    crate::jobs::ensure_run_dir(&dir).map_err(JournalError::RunDir)?;
    Ok(dir)
}

impl Journal {
    /// Writes `record` as the journal at `path` (there must be none: recover it first).
    pub(crate) fn create(path: PathBuf, record: JournalRecord) -> Result<Journal, JournalError> {
        let journal = Journal {
            path,
            record: Mutex::new(record),
        };
        journal.write()?;
        Ok(journal)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records one side's undo stack (including entries that do not count as changes, such
    /// as probed credentials).
    pub(crate) fn set_stack(&self, side: Side, stack: Vec<Undo>) {
        self.update(|r| match side {
            Side::Source => r.source = stack,
            Side::Destination => r.destination = stack,
        });
    }

    pub(crate) fn set_stage(&self, stage: Stage) {
        self.update(|r| r.stage = stage);
    }

    /// Changes the record and writes it. A journal that cannot be written is logged, not
    /// fatal: the run itself undoes its changes; only a crash would then leave them.
    fn update(&self, change: impl FnOnce(&mut JournalRecord)) {
        if let Ok(mut r) = self.record.lock() {
            change(&mut r);
        }
        if let Err(e) = self.write() {
            tracing::error!("{e}");
        }
    }

    fn write(&self) -> Result<(), JournalError> {
        let text = match self.record.lock() {
            Ok(r) => serde_json::to_vec_pretty(&*r).map_err(std::io::Error::other),
            Err(_) => Err(std::io::Error::other("journal record poisoned")),
        };
        let err = |source| JournalError::Write {
            path: self.path.clone(),
            source,
        };
        write_atomic(&self.path, &text.map_err(err)?).map_err(err)
    }

    /// Removes the file: the run ended with nothing left to undo.
    pub(crate) fn remove(&self) {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), "cannot remove the journal: {e}"),
        }
    }
}

/// Writes `bytes` at `path` through a temporary file in its directory, `fsync`ed and renamed
/// into place, then `fsync`s the directory: durable, and never seen half written.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".journal-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Reads the journal at `path`; `None` when there is none.
pub fn read(path: &Path) -> Result<Option<JournalRecord>, JournalError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(JournalError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| JournalError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
}

/// Every journal file in `dir`.
pub fn list(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vm-") && n.ends_with(JOURNAL_SUFFIX))
        })
        .collect();
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::MigrateSetParameters;

    fn record() -> JournalRecord {
        JournalRecord {
            vm: "/run/vm1.sock".into(),
            job: Some("job1".into()),
            pid: 42,
            started_ms: 1,
            source_qmp: "/run/vm1.sock".into(),
            source_domain_uuid: None,
            dest: JournalDest::Local {
                qmp: "/run/vm1-in.sock".into(),
            },
            stage: Stage::Running,
            source: Vec::new(),
            destination: Vec::new(),
        }
    }

    #[test]
    fn a_journal_keeps_the_previous_values_and_reads_back_as_written() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("vm-x.journal");
        let journal = Journal::create(path.clone(), record()).expect("create");
        let params = MigrateSetParameters {
            tls_creds: Some(String::new()),
            tls_authz: Some(serde_json::Value::Null),
            max_bandwidth: Some(134_217_728),
            ..Default::default()
        };

        journal.set_stack(
            Side::Source,
            vec![
                Undo::DeleteObject {
                    side: Side::Source,
                    id: "qtm-tls-42-1".into(),
                },
                Undo::RestoreParameters {
                    side: Side::Source,
                    params: params.clone(),
                },
                Undo::ResumeSource,
            ],
        );
        journal.set_stage(Stage::Finishing);
        let back = read(&path).expect("read").expect("there");

        assert_eq!(back.stage, Stage::Finishing);
        assert_eq!(back.source.len(), 3);
        match &back.source[1] {
            Undo::RestoreParameters { params: p, .. } => assert_eq!(p, &params),
            other => panic!("{other:?}"),
        }
        assert_eq!(list(dir.path()), vec![path.clone()]);
        journal.remove();
        assert!(read(&path).expect("read").is_none());
    }
}
