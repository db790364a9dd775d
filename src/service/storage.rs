//! Where an incoming domain's files may be, on the destination host's word alone
//! (`serve --libvirt`):
//! - a disk the service creates lies in a `--storage-dir` (CloudStack's primary-storage mount
//!   points);
//! - a disk the domain uses without a copy (shared storage, an ISO) lies in a `--shared-dir`;
//! - a kernel, initrd or firmware file lies in a `--boot-dir`.
//!
//! "Lies in" is decided on the resolved path: the parent directory is canonicalised (every `..`
//! and symbolic link resolved) and must be inside one of the canonicalised directories, and the
//! last component must not be a symbolic link. The domain then names the resolved path, so
//! libvirt opens what was checked.
//!
//! A new disk is created exclusively ([`create_exclusive`]: `O_CREAT | O_EXCL | O_NOFOLLOW` in
//! the opened parent directory): of two sessions naming one path, one creates it and the other
//! is refused; nothing that already exists is ever opened for writing. A created file is
//! remembered by device and inode, and [`remove_created`] deletes only that file.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Why a path was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    #[error(
        "{path} is outside every {flag} of this service ({}); the destination host decides \
         where an incoming domain's files are",
        if .dirs.is_empty() { "none given".to_string() } else { dirs_list(.dirs) }
    )]
    Outside {
        path: PathBuf,
        flag: &'static str,
        dirs: Vec<PathBuf>,
    },
    #[error("{path} is not usable: {reason}")]
    NotPlain { path: PathBuf, reason: String },
    #[error(
        "{path} exists on the destination host and is never overwritten; remove it, or give the \
         destination another path (--dest-xml)"
    )]
    Exists { path: PathBuf },
    #[error("cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn dirs_list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which of the operator's directories a path must be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `--storage-dir`: disks the service creates.
    Storage,
    /// `--shared-dir`: disks used as they are.
    Shared,
    /// `--boot-dir`: kernels, initrds, firmware.
    Boot,
}

impl Place {
    fn flag(self) -> &'static str {
        match self {
            Place::Storage => "--storage-dir",
            Place::Shared => "--shared-dir",
            Place::Boot => "--boot-dir",
        }
    }
}

/// The operator's directories, canonicalised once at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageDirs {
    storage: Vec<PathBuf>,
    shared: Vec<PathBuf>,
    boot: Vec<PathBuf>,
}

impl StorageDirs {
    /// Canonicalises each directory; each must exist and be a directory.
    pub fn new(
        storage: &[PathBuf],
        shared: &[PathBuf],
        boot: &[PathBuf],
    ) -> Result<StorageDirs, StorageError> {
        let canonical = |dirs: &[PathBuf]| -> Result<Vec<PathBuf>, StorageError> {
            dirs.iter()
                .map(|d| {
                    let c = std::fs::canonicalize(d).map_err(|source| StorageError::Io {
                        path: d.clone(),
                        source,
                    })?;
                    if c.is_dir() {
                        Ok(c)
                    } else {
                        Err(StorageError::NotPlain {
                            path: d.clone(),
                            reason: "not a directory".into(),
                        })
                    }
                })
                .collect()
        };
        Ok(StorageDirs {
            storage: canonical(storage)?,
            shared: canonical(shared)?,
            boot: canonical(boot)?,
        })
    }

    /// Whether no directory at all was given.
    pub fn is_empty(&self) -> bool {
        self.storage.is_empty() && self.shared.is_empty() && self.boot.is_empty()
    }

    fn dirs(&self, place: Place) -> &[PathBuf] {
        match place {
            Place::Storage => &self.storage,
            Place::Shared => &self.shared,
            Place::Boot => &self.boot,
        }
    }

    /// Where a new disk named `path` is to be created: inside a storage directory once
    /// resolved, nothing there yet.
    pub fn new_disk(&self, path: &Path) -> Result<PathBuf, StorageError> {
        let resolved = self.resolve(path, Place::Storage)?;
        match std::fs::symlink_metadata(&resolved) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(resolved),
            Ok(m) if m.file_type().is_symlink() => Err(StorageError::NotPlain {
                path: path.to_path_buf(),
                reason: "it is a symbolic link".into(),
            }),
            Ok(_) => Err(StorageError::Exists { path: resolved }),
            Err(source) => Err(StorageError::Io {
                path: resolved,
                source,
            }),
        }
    }

    /// An existing regular file at `path`, inside a directory of `place` once resolved.
    pub fn existing_file(&self, path: &Path, place: Place) -> Result<PathBuf, StorageError> {
        let resolved = self.resolve(path, place)?;
        let meta = std::fs::symlink_metadata(&resolved).map_err(|source| StorageError::Io {
            path: resolved.clone(),
            source,
        })?;
        if meta.file_type().is_symlink() {
            return Err(StorageError::NotPlain {
                path: path.to_path_buf(),
                reason: "it is a symbolic link".into(),
            });
        }
        if !meta.is_file() {
            return Err(StorageError::NotPlain {
                path: path.to_path_buf(),
                reason: "not a regular file".into(),
            });
        }
        Ok(resolved)
    }

    /// `path` with its parent canonicalised, checked to lie in a directory of `place`; the last
    /// component is a plain name (not `.` or `..`).
    fn resolve(&self, path: &Path, place: Place) -> Result<PathBuf, StorageError> {
        let not_plain = |reason: &str| StorageError::NotPlain {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !path.is_absolute() {
            return Err(not_plain("not an absolute path"));
        }
        let name = match path.components().next_back() {
            Some(Component::Normal(name)) => name,
            _ => return Err(not_plain("it does not end in a file name")),
        };
        let parent = path
            .parent()
            .ok_or_else(|| not_plain("no parent directory"))?;
        let outside = || StorageError::Outside {
            path: path.to_path_buf(),
            flag: place.flag(),
            dirs: self.dirs(place).to_vec(),
        };
        let parent = std::fs::canonicalize(parent).map_err(|e| StorageError::NotPlain {
            path: path.to_path_buf(),
            reason: format!("its directory cannot be resolved ({e})"),
        })?;
        if !self.dirs(place).iter().any(|d| parent.starts_with(d)) {
            return Err(outside());
        }
        Ok(parent.join(name))
    }
}

/// A file this service created, known by device and inode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreatedFile {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
}

/// Creates the empty file `path` (mode 0600), failing with [`StorageError::Exists`] when
/// anything is there already, a symbolic link included. `path`'s parent is a canonical
/// directory ([`StorageDirs::new_disk`]); it is opened without following a link in its place,
/// and the file is made in that open directory.
pub fn create_exclusive(path: &Path) -> Result<CreatedFile, StorageError> {
    let io = |source: std::io::Error| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => {
            return Err(StorageError::NotPlain {
                path: path.to_path_buf(),
                reason: "it does not end in a file name".into(),
            });
        }
    };
    let dir: OwnedFd = nix::fcntl::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let file = nix::fcntl::openat(
        &dir,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| match e {
        Errno::EEXIST | Errno::ELOOP => StorageError::Exists {
            path: path.to_path_buf(),
        },
        other => io(other.into()),
    })?;
    let meta = std::fs::File::from(file).metadata().map_err(io)?;
    Ok(CreatedFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Whether `path` is still the regular file that was created as `file`.
pub fn is_still(file: &CreatedFile) -> bool {
    std::fs::symlink_metadata(&file.path)
        .is_ok_and(|m| m.is_file() && m.dev() == file.dev && m.ino() == file.ino)
}

/// Deletes `file` if its path still names the file this service created; a file replaced
/// since is left alone (it is not ours). `Err`: what went wrong, in words.
pub fn remove_created(file: &CreatedFile) -> Result<(), String> {
    match std::fs::symlink_metadata(&file.path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("destination: delete {}: {e}", file.path.display())),
        Ok(_) if !is_still(file) => Err(format!(
            "destination: {} was replaced since this service created it; left as it is",
            file.path.display()
        )),
        Ok(_) => std::fs::remove_file(&file.path)
            .map_err(|e| format!("destination: delete {}: {e}", file.path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The new directory `name` in `root`.
    fn new_dir(root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir(&dir).expect("dir");
        dir
    }

    fn dirs(storage: &Path, shared: &Path) -> StorageDirs {
        StorageDirs::new(&[storage.to_path_buf()], &[shared.to_path_buf()], &[])
            .expect("directories")
    }

    #[test]
    fn a_new_disk_inside_a_storage_dir_resolves_to_its_canonical_path() {
        let root = tempfile::tempdir().expect("tmp");
        let storage = root.path().join("pool");
        std::fs::create_dir_all(storage.join("sub")).expect("dirs");
        let d = dirs(&storage, root.path());

        let path = d
            .new_disk(&storage.join("sub/../sub/vol.qcow2"))
            .expect("allowed");

        let canonical = std::fs::canonicalize(&storage).expect("canonical");
        assert_eq!(path, canonical.join("sub/vol.qcow2"));
    }

    #[test]
    fn a_path_outside_the_storage_dirs_or_escaping_through_dotdot_is_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let storage = root.path().join("pool");
        std::fs::create_dir(&storage).expect("dir");
        let d = dirs(&storage, &storage);

        for bad in [
            PathBuf::from("/etc/profile.d/x.sh"),
            storage.join("../escape.qcow2"),
            root.path().join("x"),
        ] {
            let err = d.new_disk(&bad).expect_err("refused");
            assert!(
                matches!(err, StorageError::Outside { .. }),
                "{bad:?}: {err:?}"
            );
        }
        for bad in [
            PathBuf::from("relative.qcow2"),
            storage.join("missing-dir/x.qcow2"),
            storage.join(".."),
        ] {
            let err = d.new_disk(&bad).expect_err("refused");
            assert!(
                matches!(err, StorageError::NotPlain { .. }),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_symlinked_directory_out_of_the_storage_dir_and_a_symlink_as_the_file_are_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let (storage, elsewhere) = (new_dir(root.path(), "pool"), new_dir(root.path(), "etc"));
        std::os::unix::fs::symlink(&elsewhere, storage.join("link")).expect("dir link");
        std::os::unix::fs::symlink(elsewhere.join("x"), storage.join("vol.qcow2"))
            .expect("file link");
        let d = dirs(&storage, &storage);

        let through_dir = d.new_disk(&storage.join("link/vol.qcow2"));
        let link_as_file = d.new_disk(&storage.join("vol.qcow2"));

        assert!(matches!(through_dir, Err(StorageError::Outside { .. })));
        assert!(matches!(link_as_file, Err(StorageError::NotPlain { .. })));
        assert!(!elsewhere.join("x").exists());
    }

    #[test]
    fn of_two_exclusive_creates_of_one_path_the_second_is_refused_and_the_first_removed_once() {
        let root = tempfile::tempdir().expect("tmp");
        let path = root.path().join("vol.raw");

        let first = create_exclusive(&path).expect("first");
        let second = create_exclusive(&path);
        let removed = remove_created(&first);

        assert!(
            matches!(second, Err(StorageError::Exists { .. })),
            "{second:?}"
        );
        assert_eq!(removed, Ok(()));
        assert!(!path.exists());
    }

    #[test]
    fn a_created_file_replaced_since_is_not_removed() {
        let root = tempfile::tempdir().expect("tmp");
        let path = root.path().join("vol.raw");
        let created = create_exclusive(&path).expect("created");
        std::fs::rename(&path, root.path().join("moved")).expect("moved away");
        std::fs::write(&path, b"someone else's").expect("replaced");

        let removed = remove_created(&created);

        assert!(removed.is_err());
        assert_eq!(std::fs::read(&path).expect("kept"), b"someone else's");
    }

    #[test]
    fn a_shared_disk_must_be_an_existing_regular_file_in_a_shared_dir() {
        let root = tempfile::tempdir().expect("tmp");
        let (storage, shared) = (new_dir(root.path(), "pool"), new_dir(root.path(), "nfs"));
        std::fs::write(shared.join("vol"), b"").expect("file");
        std::fs::write(storage.join("other-vm"), b"").expect("file");
        let d = dirs(&storage, &shared);

        assert!(d.existing_file(&shared.join("vol"), Place::Shared).is_ok());
        assert!(matches!(
            d.existing_file(&storage.join("other-vm"), Place::Shared),
            Err(StorageError::Outside { .. })
        ));
        assert!(matches!(
            d.existing_file(&shared.join("missing"), Place::Shared),
            Err(StorageError::Io { .. })
        ));
        assert!(matches!(
            d.existing_file(Path::new("/dev/null"), Place::Shared),
            Err(StorageError::Outside { .. })
        ));
    }
}
