//! A destination volume that already exists, adopted instead of created (`serve --libvirt`,
//! a disk the source sent with [`NewDisk::adopt`]): CloudStack's management server creates the
//! volumes of a migration with local storage on the destination itself before the agent
//! migrates (a linked-clone overlay on the template it copied there, or an empty full-clone
//! image), and the rewritten domain XML points at them.
//!
//! The file is used only when all of these hold, checked in this order, each refusal naming
//! the path:
//! 1. it lies in a `--storage-dir` and is a regular file (the caller resolved it with
//!    [`super::storage::StorageDirs::existing_file`]: canonical, no escape, no symbolic link);
//! 2. no process has it open ([`holders`]: `/proc/*/fd`), and `qemu-img info` without `-U`
//!    can take its lock (a QEMU, `qemu-nbd` or `qemu-io` elsewhere holds it otherwise);
//! 3. it is an image of the source's format, not encrypted (LUKS volumes are refused: their
//!    secrets live in libvirt on each host), of at least the source's virtual size (smaller
//!    only when the source allows growing it, `--create-dest-disks`: once every check passed,
//!    [`check`] grows it with `qemu-img resize`, before any QEMU opens it; the incoming QEMU
//!    could not: it holds its images inactive, and QEMU 7.2 aborts on `block_resize` of one,
//!    `scripts/repro-resize-inactive.py`);
//! 4. for a top-only copy, an overlay on a template inside a storage directory, of the format
//!    the source's overlay names (the template's content is compared with the source's
//!    fingerprint by the preflight, as for a disk the service created); for a full copy, no
//!    backing file at all;
//! 5. empty: no data of its own (`qemu-img map`), so that it is a volume made for this
//!    migration and not another VM's disk, and so that what the copy does not write reads as
//!    the source's.
//!
//! An adopted file is remembered by device and inode and never deleted, neither by a
//! roll-back nor by the clean-up after a crash: CloudStack deletes its own volumes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::storage::{CreatedFile, Place, StorageDirs};
use crate::peer::NewDisk;

/// Why an existing file was not adopted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdoptError {
    #[error("{path} is in use by {holders}; it is adopted only when nothing else has it open")]
    InUse { path: PathBuf, holders: String },
    #[error(
        "{path} is locked by another process (qemu-img info: {detail}); it is adopted only when \
         nothing else uses it"
    )]
    Locked { path: PathBuf, detail: String },
    #[error("{path} cannot be adopted: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("cannot run qemu-img on {path}")]
    QemuImg {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Steps 2-5 of the module docs for the file `path` (step 1 done by the caller), to receive
/// `disk`, then the growth step 3 allows; returns the file by device and inode.
pub fn check(path: &Path, disk: &NewDisk, dirs: &StorageDirs) -> Result<CreatedFile, AdoptError> {
    let unusable = |reason: String| AdoptError::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|e| unusable(e.to_string()))?;
    let file = CreatedFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let open_by = holders(&file);
    if !open_by.is_empty() {
        return Err(AdoptError::InUse {
            path: path.to_path_buf(),
            holders: open_by.join(", "),
        });
    }
    let info = qemu_img(path, &["info", "--output=json"])?;
    let size = check_image(&info, disk).map_err(unusable)?;
    check_backing(&info, disk, dirs).map_err(unusable)?;
    let map = qemu_img(path, &["map", "--output=json"])?;
    if let Some(offset) = own_data(&map) {
        return Err(unusable(format!(
            "it holds data of its own (from offset {offset}); only an empty volume made for this \
             migration is adopted"
        )));
    }
    if size < disk.size {
        tracing::info!(disk = %path.display(), from = size, to = disk.size, "growing the adopted volume");
        resize(path, &disk.format, disk.size)?;
    }
    tracing::info!(disk = %path.display(), target = %disk.target, "adopting the existing volume");
    Ok(file)
}

/// Step 3: format, encryption, size.
fn check_image(info: &serde_json::Value, disk: &NewDisk) -> Result<u64, String> {
    let format = info["format"].as_str().unwrap_or("unknown");
    if format != disk.format {
        return Err(format!(
            "it is a {format} image, the source's disk {} a {} image",
            disk.target, disk.format
        ));
    }
    if info["encrypted"].as_bool() == Some(true) {
        return Err(
            "it is encrypted (LUKS volumes are not supported: their secrets are each host's \
             libvirt's)"
                .into(),
        );
    }
    let size = info["virtual-size"]
        .as_u64()
        .ok_or("qemu-img reports no virtual size")?;
    if size < disk.size && !disk.grow {
        return Err(format!(
            "it holds {size} bytes, the source's disk {} {} bytes; grow it, or pass \
             --create-dest-disks",
            disk.target, disk.size
        ));
    }
    Ok(size)
}

/// `qemu-img resize` of `path` (a `format` image no process holds) to `size` bytes.
fn resize(path: &Path, format: &str, size: u64) -> Result<(), AdoptError> {
    run_qemu_img(path, &["resize", "-q", "-f", format], &[&size.to_string()]).map(drop)
}

/// Step 4: the backing file a top-only copy needs, or none for a full copy.
fn check_backing(
    info: &serde_json::Value,
    disk: &NewDisk,
    dirs: &StorageDirs,
) -> Result<(), String> {
    let backing = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str());
    let Some(want) = &disk.backing else {
        return match backing {
            None => Ok(()),
            Some(b) => Err(format!(
                "it is an overlay on {b}, and the source's disk {} is copied whole (a full copy \
                 needs a volume without backing file; copy it top-only with --disk {},copy=top)",
                disk.target, disk.target
            )),
        };
    };
    let Some(backing) = backing else {
        return Err(format!(
            "it has no backing file, and the source's disk {} is copied top-only (it needs an \
             overlay on the template {})",
            disk.target, want.file_name
        ));
    };
    let template = dirs
        .existing_file(Path::new(backing), Place::Storage)
        .map_err(|e| format!("its backing file is not a local template: {e}"))?;
    match info["backing-filename-format"].as_str() {
        Some(f) if f == want.format => Ok(()),
        Some(f) => Err(format!(
            "its backing file {} is declared {f}, the source's template {} is {}",
            template.display(),
            want.file_name,
            want.format
        )),
        None => Err(format!(
            "it does not declare its backing file's format (recreate it with qemu-img create -F \
             {})",
            want.format
        )),
    }
}

/// Step 5: the offset of the first extent holding data of the image itself (depth 0), in
/// `qemu-img map --output=json`'s answer; zero extents and those from the backing file are
/// not its own.
fn own_data(map: &serde_json::Value) -> Option<u64> {
    map.as_array()?
        .iter()
        .find(|e| {
            e["depth"].as_u64() == Some(0)
                && e["data"].as_bool() == Some(true)
                && e["zero"].as_bool() != Some(true)
        })
        .and_then(|e| e["start"].as_u64())
}

/// `qemu-img ARGS path` (without `-U`: it takes the image's lock), its JSON output.
fn qemu_img(path: &Path, args: &[&str]) -> Result<serde_json::Value, AdoptError> {
    let stdout = run_qemu_img(path, args, &[])?;
    serde_json::from_slice(&stdout).map_err(|e| AdoptError::Unusable {
        path: path.to_path_buf(),
        reason: format!("qemu-img {} answered no JSON ({e})", args[0]),
    })
}

/// `qemu-img <before> <path> <after>`: its standard output, or why it failed (a lock held
/// elsewhere apart).
fn run_qemu_img(path: &Path, before: &[&str], after: &[&str]) -> Result<Vec<u8>, AdoptError> {
    let out = std::process::Command::new("qemu-img")
        .args(before)
        .arg(path)
        .args(after)
        .output()
        .map_err(|source| AdoptError::QemuImg {
            path: path.to_path_buf(),
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        if stderr.contains("lock") {
            return Err(AdoptError::Locked {
                path: path.to_path_buf(),
                detail: stderr.lines().next().unwrap_or_default().to_string(),
            });
        }
        return Err(AdoptError::Unusable {
            path: path.to_path_buf(),
            reason: format!(
                "qemu-img {} failed: {stderr}",
                before.first().unwrap_or(&"")
            ),
        });
    }
    Ok(out.stdout)
}

/// The processes (other than this one) with `file` open, as `pid N (command)`.
pub fn holders(file: &CreatedFile) -> Vec<String> {
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in procs.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == file.dev && m.ino() == file.ino)
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{DiskFormat, create_image};

    fn disk(format: &str, size: u64) -> NewDisk {
        NewDisk {
            target: "vdb".into(),
            format: format.into(),
            size,
            backing: None,
            adopt: true,
            grow: false,
        }
    }

    fn run(program: &str, args: &[&str], path: &Path) {
        let status = std::process::Command::new(program)
            .args(args)
            .arg(path)
            .status()
            .expect("run");
        assert!(status.success(), "{program} {args:?}");
    }

    fn pool() -> (tempfile::TempDir, StorageDirs) {
        let root = tempfile::tempdir().expect("tmp");
        let dirs = StorageDirs::new(&[root.path().to_path_buf()], &[], &[]).expect("dirs");
        (root, dirs)
    }

    #[test]
    fn an_empty_stub_of_the_source_format_and_size_is_adopted_by_its_inode() {
        let (root, dirs) = pool();
        let path = root.path().join("vol");
        create_image(&path, DiskFormat::Qcow2, 1 << 20).expect("image");

        let file = check(&path, &disk("qcow2", 1 << 20), &dirs).expect("adopted");

        let meta = std::fs::metadata(&path).expect("meta");
        assert_eq!((file.dev, file.ino), (meta.dev(), meta.ino()));
    }

    #[test]
    fn a_smaller_volume_is_refused_naming_both_sizes_unless_it_may_grow_then_it_is_grown() {
        let (root, dirs) = pool();
        let path = root.path().join("vol");
        create_image(&path, DiskFormat::Qcow2, 1 << 20).expect("image");
        let mut wanted = disk("qcow2", 2 << 20);

        let refused = check(&path, &wanted, &dirs)
            .expect_err("smaller")
            .to_string();
        wanted.grow = true;
        let grown = check(&path, &wanted, &dirs);
        let size =
            qemu_img(&path, &["info", "--output=json"]).expect("info")["virtual-size"].as_u64();

        assert!(
            refused.contains("1048576") && refused.contains("2097152"),
            "{refused}"
        );
        assert!(grown.is_ok(), "{grown:?}");
        assert_eq!(
            size,
            Some(2 << 20),
            "grown by the check, before any QEMU opens it"
        );
    }

    #[test]
    fn another_format_data_of_its_own_or_a_backing_file_for_a_full_copy_is_refused() {
        let (root, dirs) = pool();
        let raw = root.path().join("raw");
        create_image(&raw, DiskFormat::Raw, 1 << 20).expect("image");
        let used = root.path().join("used");
        create_image(&used, DiskFormat::Qcow2, 1 << 20).expect("image");
        run(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x5a 0 4k"],
            &used,
        );
        let overlay = root.path().join("overlay");
        let backing = raw.display().to_string();
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing],
            &overlay,
        );

        for (path, what) in [
            (&raw, "raw image"),
            (&used, "data of its own"),
            (&overlay, "overlay on"),
        ] {
            let err = check(path, &disk("qcow2", 1 << 20), &dirs)
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains(what) && err.contains(&path.display().to_string()),
                "{what}: {err}"
            );
        }
    }

    #[test]
    fn an_encrypted_volume_is_refused_by_name() {
        let (root, dirs) = pool();
        let path = root.path().join("luks.qcow2");
        // QEMU before 9.2.1 times a first PBKDF round of the key and fails with "Unable to get
        // accurate CPU usage" when that round took under a clock tick (QEMU commit "crypto: fix
        // bogus error benchmarking pbkdf on fast machines"): with the default sha256 that was
        // 14 of 40 creates on this machine. sha512 makes each round slow enough (0 of 40), and
        // the few retries cover a faster machine.
        let mut last = None;
        for _ in 0..5 {
            let out = std::process::Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "--object",
                    "secret,id=s0,data=secret",
                    "-f",
                    "qcow2",
                ])
                .args([
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,\
                     encrypt.hash-alg=sha512",
                ])
                .arg(&path)
                .arg("1M")
                .output()
                .expect("qemu-img");
            if out.status.success() {
                last = None;
                break;
            }
            last = Some(String::from_utf8_lossy(&out.stderr).into_owned());
            if !last.as_deref().unwrap_or("").contains("accurate CPU usage") {
                break;
            }
        }
        assert!(last.is_none(), "qemu-img create: {last:?}");
        let err = check(&path, &disk("qcow2", 1 << 20), &dirs)
            .expect_err("encrypted")
            .to_string();
        assert!(
            err.contains("encrypted") && err.contains(&path.display().to_string()),
            "{err}"
        );
    }
}
