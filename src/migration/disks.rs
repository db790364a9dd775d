//! Non-shared disks: which of the source's disks to copy, whether the destination can take
//! them, and the names of what the copy creates.
//!
//! A disk is *local* (copied by `--all-local-disks`) when it is writable and its image is a file
//! or block device on this host, not on shared storage. Shared means a network protocol driver
//! (`nbd`, `rbd`, `iscsi`, `gluster`, `ssh`, `http(s)`, ...) or a file on a network or cluster
//! file system (NFS, CIFS/SMB, Ceph, GlusterFS over FUSE, GFS2, OCFS2), told by `statfs`.
//!
//! A disk is copied whole (`sync: full`) or top-only ([`DiskCopy::Top`], `sync: top`): then
//! only its top image crosses the wire, and the destination's disk must already be an overlay
//! on the same backing image, checked by format, virtual size and a fingerprint of the file
//! ([`backing_fingerprint`]) before anything starts.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{MigrationError, OBJECT_PREFIX};
use crate::peer::{BackingSpec, DiskCopy, DiskSpec};
use crate::qemu::{BlockDeviceInfo, BlockInfo, ImageInfo};

/// Which disks to copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DiskSelection {
    /// None: storage is shared, or the VM has no disks.
    #[default]
    None,
    /// Every writable disk not on shared storage.
    AllLocal,
    /// These disks, each named by its block node (as in `-blockdev node-name=...`) or by its
    /// guest device's id (as in `-device ...,id=virtio-disk0`; libvirt's alias).
    Nodes(Vec<String>),
}

/// A source disk to copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDisk {
    /// The block node the guest's device uses.
    pub node: String,
    /// The guest device's id ([`device_id`]), when the disk is attached to one.
    #[serde(default)]
    pub device: Option<String>,
    /// Virtual size in bytes.
    pub size: u64,
    pub format: String,
    pub filename: String,
    /// Whole chain or top image only.
    #[serde(default)]
    pub copy: DiskCopy,
    /// With [`DiskCopy::Top`]: the backing image the destination must have too.
    #[serde(default)]
    pub backing: Option<BackingSpec>,
    /// Bytes to copy: what the copied images take on the host (QEMU's `actual-size`, summed
    /// over the chain for a full copy), not the virtual size.
    #[serde(default)]
    pub allocated: u64,
}

impl SourceDisk {
    /// Bytes the copy will move: what the copied images take on the host, or the virtual
    /// size where QEMU does not say.
    pub fn to_copy(&self) -> u64 {
        if self.allocated > 0 {
            self.allocated
        } else {
            self.size
        }
    }

    /// The NBD client node on the source that writes into the destination's export, for the
    /// run `run` (see [`run_id`]) and this disk's place `index` in its copy: QEMU limits node
    /// names to 31 characters, too few for a libvirt node name beside the run's id.
    pub fn nbd_node(&self, run: &str, index: usize) -> String {
        format!("{OBJECT_PREFIX}nbd-{run}-{index}")
    }

    /// The mirror job's id, for the run `run`.
    pub fn job_id(&self, run: &str) -> String {
        format!("{OBJECT_PREFIX}mirror-{run}-{}", self.node)
    }

    /// What the destination is told about this disk: its node, size and copy mode, never its
    /// file name (a path or URL may carry credentials and says nothing the destination needs).
    /// A top-only disk adds its backing file's name, a local path (URLs are refused in
    /// [`select`]), which the destination checks its own template against.
    pub fn spec(&self) -> DiskSpec {
        DiskSpec {
            node: self.node.clone(),
            device: self.device.clone(),
            size: self.size,
            copy: self.copy,
            backing: self.backing.clone(),
        }
    }
}

/// The id of the guest device a `query-block` entry is attached to: the `id=` of a
/// `-device` (libvirt's alias, e.g. `virtio-disk0`, from the QOM path
/// `/machine/peripheral/virtio-disk0/virtio-backend`), or the whole QOM path of a device
/// without one.
pub fn device_id(block: &BlockInfo) -> Option<String> {
    let qdev = block.qdev.as_deref().filter(|q| !q.is_empty())?;
    Some(match qdev.strip_prefix("/machine/peripheral/") {
        Some(rest) => rest.split('/').next().unwrap_or(rest).to_string(),
        None => qdev.to_string(),
    })
}

/// A fresh id for one run, 8 hexadecimal digits, in the names of the nodes and jobs it creates:
/// two runs never share a name, so neither can collide with, or undo, what the other made
/// (QOM object ids carry the process id and a counter for the same reason).
pub(crate) fn run_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        // No randomness: the process id and the time tell live runs apart too.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return format!("{:08x}", std::process::id() ^ nanos);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How each disk is to be copied: one default, and exceptions by node name or device id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyPlan {
    pub default: DiskCopy,
    pub per_node: BTreeMap<String, DiskCopy>,
}

impl CopyPlan {
    pub fn for_node(&self, node: &str) -> DiskCopy {
        self.per_node.get(node).copied().unwrap_or(self.default)
    }
}

/// Mirror progress of one disk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskProgress {
    pub device: String,
    /// Bytes the mirror has dealt with (zeroes written as zeroes included).
    pub offset: u64,
    /// The mirror's current estimate of its whole work.
    pub len: u64,
    pub ready: bool,
    /// `full` or `top`.
    pub copy: DiskCopy,
    /// Bytes to copy: allocated in the copied images, not the virtual size.
    pub to_copy: u64,
}

/// The copy of one disk, in the final report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskReport {
    pub device: String,
    /// `full` (the whole chain) or `top` (the top image only).
    pub copy: DiskCopy,
    /// Bytes to copy: allocated in the copied images (QEMU's `actual-size`), not the virtual
    /// size.
    pub to_copy: u64,
    /// Bytes the mirror copied (QEMU's job offset: ranges of zeroes it wrote as zeroes count
    /// too, though they cost a few bytes on the wire).
    pub bytes: u64,
    /// Time from the mirror's start until source and destination were in sync.
    pub ms: u64,
    /// Megabits per second over that time.
    pub throughput_mbps: f64,
}

/// Picks the disks to copy from the source's `query-block`, each copied as `copy` says. A disk
/// to copy top-only must have a backing file on the local file system (the same template is
/// then looked for on the destination).
pub(crate) fn select(
    blocks: &[BlockInfo],
    selection: &DiskSelection,
    copy: &CopyPlan,
) -> Result<Vec<SourceDisk>, MigrationError> {
    let nodes: Vec<(&BlockDeviceInfo, Option<String>)> = blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref().map(|n| (n, device_id(b))))
        .collect();
    let picked: Vec<(&BlockDeviceInfo, Option<String>)> = match selection {
        DiskSelection::None => Vec::new(),
        DiskSelection::AllLocal => nodes
            .iter()
            .filter(|(n, _)| !n.ro && is_local(n))
            .cloned()
            .collect(),
        DiskSelection::Nodes(names) => names
            .iter()
            .map(|name| {
                nodes
                    .iter()
                    .find(|(n, device)| {
                        &n.node_name == name || device.as_deref() == Some(name.as_str())
                    })
                    .cloned()
                    .ok_or_else(|| MigrationError::UnknownDisk {
                        node: name.clone(),
                        available: nodes.iter().map(|(n, _)| n.node_name.clone()).collect(),
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    if let Some(node) = copy.per_node.keys().find(|k| {
        !picked
            .iter()
            .any(|(n, d)| &n.node_name == *k || d.as_ref() == Some(*k))
    }) {
        return Err(MigrationError::UnknownDisk {
            node: format!("{node} (given a copy mode but not copied)"),
            available: picked.iter().map(|(n, _)| n.node_name.clone()).collect(),
        });
    }
    picked
        .into_iter()
        .map(|(n, device)| {
            let explicit = copy
                .per_node
                .get(&n.node_name)
                .or_else(|| device.as_ref().and_then(|d| copy.per_node.get(d)))
                .copied();
            let has_backing = n.image.as_ref().is_some_and(|i| i.backing_image.is_some());
            let disk = match explicit {
                Some(mode) => source_disk(n, mode),
                // `top` for every disk, as libvirt's --copy-storage-inc: a disk with no
                // backing file (a data disk beside a template-based root disk) is all top.
                None if copy.default == DiskCopy::Top && !has_backing => {
                    tracing::info!(node = %n.node_name, "no backing file: copied whole");
                    source_disk(n, DiskCopy::Full)
                }
                None => source_disk(n, copy.default),
            };
            disk.map(|d| SourceDisk { device, ..d })
        })
        .collect()
}

fn source_disk(n: &BlockDeviceInfo, copy: DiskCopy) -> Result<SourceDisk, MigrationError> {
    let image = n.image.as_ref();
    let allocated = |images: &mut dyn Iterator<Item = &ImageInfo>| {
        images
            .map(|i| i.actual_size.unwrap_or(i.virtual_size))
            .sum()
    };
    let (backing, to_copy) = match (copy, image) {
        (DiskCopy::Full, Some(image)) => (None, allocated(&mut image.chain())),
        (DiskCopy::Full, None) => (None, 0),
        (DiskCopy::Top, image) => {
            let top = image.ok_or_else(|| MigrationError::BackingMismatch {
                node: n.node_name.clone(),
                reason: "QEMU reports no image for it".into(),
            })?;
            let below =
                top.backing_image
                    .as_deref()
                    .ok_or_else(|| MigrationError::BackingMismatch {
                        node: n.node_name.clone(),
                        reason: "it has no backing file, so its top image is the whole disk".into(),
                    })?;
            if !Path::new(&below.filename).is_absolute() {
                // A URL or json: name may carry credentials, and names nothing the
                // destination could find as a file.
                return Err(MigrationError::BackingMismatch {
                    node: n.node_name.clone(),
                    reason: "its backing image is not a local file".into(),
                });
            }
            let spec = BackingSpec {
                filename: below.filename.clone(),
                format: below.format.clone(),
                size: below.virtual_size,
                fingerprint: None,
            };
            (Some(spec), allocated(&mut std::iter::once(top)))
        }
    };
    // Without a size, every destination disk would look large enough.
    let size = image
        .map(|i| i.virtual_size)
        .ok_or_else(|| MigrationError::SourceDiskUnusable {
            node: n.node_name.clone(),
            reason: "QEMU reports no image for it, so its size is unknown".into(),
        })?;
    Ok(SourceDisk {
        node: n.node_name.clone(),
        device: None,
        size,
        format: n.drv.clone(),
        filename: n.file.clone(),
        copy,
        backing,
        allocated: to_copy,
    })
}

/// How many samples [`backing_fingerprint`] takes, and how large each is.
const FINGERPRINT_SAMPLES: u64 = 64;
const FINGERPRINT_SAMPLE_BYTES: u64 = 64 << 10;

/// A fingerprint of a backing file's bytes: SHA-256 over its length and 64 samples of 64 KiB
/// spread evenly over it (4 MiB read, whatever the size). Two copies of one template (copied
/// with `cp`, `scp`, `rsync`) match; two different templates of one size almost never do. It is
/// not a full checksum: a template changed in place between the samples would pass, which is
/// why templates must be immutable (as CloudStack's are).
pub fn backing_fingerprint(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&len.to_le_bytes());
    let span = len.saturating_sub(FINGERPRINT_SAMPLE_BYTES);
    let mut buf = vec![0u8; FINGERPRINT_SAMPLE_BYTES as usize];
    for i in 0..FINGERPRINT_SAMPLES {
        let offset = span / (FINGERPRINT_SAMPLES - 1) * i;
        file.seek(SeekFrom::Start(offset))?;
        let mut read = 0;
        loop {
            let n = file.read(&mut buf[read..])?;
            if n == 0 {
                break;
            }
            read += n;
        }
        ctx.update(&buf[..read]);
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256-sampled:{hex}"))
}

/// Fills in each top-only disk's backing fingerprint, reading the files off the async threads.
/// A file this process cannot read is refused: without its fingerprint the destination could
/// check the template's format and size only, and a template of the same size with other bytes
/// would give a disk that reads as neither.
pub(crate) async fn fingerprint_backings(disks: &mut [SourceDisk]) -> Result<(), MigrationError> {
    for disk in disks.iter_mut() {
        let Some(backing) = disk.backing.as_mut() else {
            continue;
        };
        let path = PathBuf::from(&backing.filename);
        let read = tokio::task::spawn_blocking(move || backing_fingerprint(&path)).await;
        let refuse = |why: String| MigrationError::BackingMismatch {
            node: disk.node.clone(),
            reason: format!(
                "its backing file {} cannot be read by this process ({why}), so the \
                 destination's template cannot be compared with it; make the file readable by \
                 the user this tool runs as",
                backing.filename
            ),
        };
        match read {
            Ok(Ok(fp)) => backing.fingerprint = Some(fp),
            Ok(Err(e)) => return Err(refuse(e.to_string())),
            Err(_) => return Err(refuse("the reading task failed".into())),
        }
    }
    Ok(())
}

/// The source's writable local disks (by the rule of [`DiskSelection::AllLocal`]) that would
/// stay behind: neither in `copied` nor declared shared (by node name or device id).
pub(crate) fn left_behind(
    blocks: &[BlockInfo],
    copied: &[SourceDisk],
    declared_shared: &[String],
) -> Vec<String> {
    blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref().map(|n| (n, device_id(b))))
        .filter(|(n, _)| !n.ro && is_local(n))
        .filter(|(n, _)| !copied.iter().any(|c| c.node == n.node_name))
        .filter(|(n, device)| {
            !declared_shared
                .iter()
                .any(|s| *s == n.node_name || device.as_deref() == Some(s.as_str()))
        })
        .map(|(n, _)| n.node_name.clone())
        .collect()
}

/// Network protocol drivers: their data is already reachable from the destination.
const SHARED_DRIVERS: &[&str] = &[
    "nbd", "rbd", "iscsi", "gluster", "ssh", "http", "https", "ftp", "ftps", "nfs", "vxhs",
];

/// `statfs` magic numbers of network and cluster file systems.
const SHARED_FS_MAGIC: &[i64] = &[
    0x6969,      // NFS
    0xFF53_4D42, // CIFS
    0xFE53_4D42, // SMB2
    0x517B,      // SMB
    0x00C3_6400, // Ceph
    0x6573_5546, // FUSE (GlusterFS, ...)
    0x0116_1970, // GFS2
    0x7461_636F, // OCFS2
    0x0BD0_0BD0, // Lustre
];

fn is_local(node: &BlockDeviceInfo) -> bool {
    let file = node.file.as_str();
    if file.starts_with("json:") || file.contains("://") {
        return false;
    }
    if SHARED_DRIVERS.contains(&node.drv.as_str()) {
        return false;
    }
    let path = Path::new(file);
    match nix::sys::statfs::statfs(path) {
        Ok(fs) => !SHARED_FS_MAGIC.contains(&fs.filesystem_type().0),
        // A file QEMU opened but we cannot see (another mount namespace): assume local, the
        // safe side, since copying a shared disk costs time but never loses data.
        Err(_) => true,
    }
}

/// The destination's disk for one source disk, as [`check_destination`] chose it once: every
/// later check and the exports use this, never a lookup of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DestDisk {
    /// The source's node name: the name the destination exports the disk under, which is what
    /// the source's NBD client asks for.
    pub export: String,
    /// The destination's root node for the disk.
    pub node: String,
    /// For a top-only copy: the destination's backing file, which must have the source's
    /// fingerprint ([`verify_backing_fingerprints`]).
    pub backing: Option<BackingCheck>,
}

/// What the destination's template of a top-only disk must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BackingCheck {
    /// The destination's backing file, as its QEMU opened it.
    pub path: PathBuf,
    /// The source's fingerprint of its own backing file.
    pub fingerprint: String,
}

/// Checks the destination has, for each disk, the root node attached to the same guest device
/// (or, for a disk named by node alone or whose device the destination lacks, a root node of
/// that name), writable and as large as the source's; for a top-only disk, a backing image of the source's format and size,
/// whose file is then compared by [`verify_backing_fingerprints`]. A disk asked for twice, or
/// two source disks on one destination disk, are refused.
///
/// A smaller disk is refused even when the source may grow it (`may_grow`, only shapes the
/// message): a QEMU waiting for an incoming migration holds its images inactive and cannot
/// resize them (7.2 aborts on `block_resize`, 10.0 refuses it:
/// `scripts/repro-resize-inactive.py`), so the file must be grown before that QEMU opens it,
/// as `serve --libvirt` does for a volume it adopts.
pub(crate) fn check_destination(
    dest_blocks: &[BlockInfo],
    disks: &[DiskSpec],
    may_grow: bool,
) -> Result<Vec<DestDisk>, MigrationError> {
    let roots: Vec<(&BlockDeviceInfo, Option<String>)> = dest_blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref().map(|n| (n, device_id(b))))
        .collect();
    let mut found: Vec<DestDisk> = Vec::with_capacity(disks.len());
    for (i, disk) in disks.iter().enumerate() {
        let unusable = |reason: &str| MigrationError::DestDiskUnusable {
            node: disk.node.clone(),
            reason: reason.into(),
        };
        if disks[..i].iter().any(|d| d.node == disk.node) {
            return Err(unusable("it is named twice"));
        }
        let by_device = disk
            .device
            .as_ref()
            .and_then(|id| roots.iter().find(|(_, d)| d.as_ref() == Some(id)));
        let (node, _) = by_device
            .or_else(|| roots.iter().find(|(n, _)| n.node_name == disk.node))
            .ok_or_else(|| MigrationError::DestDiskMissing {
                node: disk.node.clone(),
            })?;
        if found.iter().any(|f| f.node == node.node_name) {
            return Err(unusable(
                "another source disk maps to the same destination disk",
            ));
        }
        if node.ro {
            return Err(unusable("it is read-only"));
        }
        let backing = match disk.copy {
            DiskCopy::Top => Some(check_backing(node, disk)?),
            DiskCopy::Full => None,
        };
        let Some(size) = node.image.as_ref().map(|i| i.virtual_size) else {
            return Err(unusable(&format!(
                "QEMU reports no image for its node {}, so its size cannot be checked",
                node.node_name
            )));
        };
        if size < disk.size {
            let why = if may_grow {
                " (--create-dest-disks grows only a volume serve --libvirt adopts: a QEMU \
                 waiting for an incoming migration cannot resize its disks)"
            } else {
                ""
            };
            return Err(unusable(&format!(
                "it holds {size} bytes, the source disk {} bytes; grow its image to that size \
                 (qemu-img resize) before starting the destination QEMU{why}",
                disk.size
            )));
        }
        found.push(DestDisk {
            export: disk.node.clone(),
            node: node.node_name.clone(),
            backing,
        });
    }
    Ok(found)
}

/// For a top-only copy: the destination's disk sits on a backing image of the source's format
/// and virtual size, and the source sent its backing file's fingerprint. Returns what
/// [`verify_backing_fingerprints`] must compare.
fn check_backing(node: &BlockDeviceInfo, disk: &DiskSpec) -> Result<BackingCheck, MigrationError> {
    let refuse = |reason: String| MigrationError::BackingMismatch {
        node: disk.node.clone(),
        reason,
    };
    let Some(want) = &disk.backing else {
        return Err(refuse("the source named no backing image".into()));
    };
    let below = node
        .image
        .as_ref()
        .and_then(|i| i.backing_image.as_deref())
        .ok_or_else(|| {
            refuse(format!(
                "the destination's disk has no backing file (the source's is {})",
                want.filename
            ))
        })?;
    if below.format != want.format || below.virtual_size != want.size {
        return Err(refuse(format!(
            "the destination's backing file {} is {} of {} bytes, the source's {} is {} of {} \
             bytes",
            below.filename, below.format, below.virtual_size, want.filename, want.format, want.size
        )));
    }
    // Format and size alone would pass a template of the same size with other bytes.
    let Some(fingerprint) = want.fingerprint.clone() else {
        return Err(refuse(format!(
            "the source sent no fingerprint of its backing file {}, so the destination's {} \
             cannot be compared with it (the source could not read it, or runs an older \
             version)",
            want.filename, below.filename
        )));
    };
    Ok(BackingCheck {
        path: PathBuf::from(&below.filename),
        fingerprint,
    })
}

/// Compares the destination's backing file of each top-only disk with the source's
/// fingerprint; a file that cannot be read here is refused too (its content cannot be vouched
/// for).
pub(crate) async fn verify_backing_fingerprints(disks: &[DestDisk]) -> Result<(), MigrationError> {
    for disk in disks {
        let Some(check) = &disk.backing else {
            continue;
        };
        let refuse = |reason: String| MigrationError::BackingMismatch {
            node: disk.export.clone(),
            reason,
        };
        let file = check.path.clone();
        let got = tokio::task::spawn_blocking(move || backing_fingerprint(&file))
            .await
            .map_err(|_| MigrationError::Failed {
                desc: "fingerprinting a backing file failed".into(),
            })?;
        match got {
            Ok(got) if got == check.fingerprint => {
                tracing::info!(node = %disk.node, file = %check.path.display(), "backing file matches the source's");
            }
            Ok(_) => {
                return Err(refuse(format!(
                    "the destination's backing file {} differs from the source's in content",
                    check.path.display()
                )));
            }
            Err(e) => {
                return Err(refuse(format!(
                    "the destination's backing file {} cannot be read to compare it ({e})",
                    check.path.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn blocks() -> Vec<BlockInfo> {
        serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/tmp/a.qcow2", "image": {"virtual-size": 1024, "filename": "/tmp/a.qcow2", "format": "qcow2"}}},
            {"device": "", "inserted": {"node-name": "cdrom", "ro": true, "drv": "raw",
             "file": "/tmp/b.iso", "image": {"virtual-size": 2048, "filename": "/tmp/b.iso", "format": "raw"}}},
            {"device": "", "inserted": {"node-name": "shared", "ro": false, "drv": "raw",
             "file": "nbd://storage:10809/vol", "image": {"virtual-size": 4096, "filename": "nbd://storage:10809/vol", "format": "raw"}}},
            {"device": "floppy0"}
        ]))
        .expect("decode")
    }

    /// What the source of [`blocks`] sends of its local disks.
    fn all_local_specs() -> Vec<DiskSpec> {
        select(&blocks(), &DiskSelection::AllLocal, &CopyPlan::default())
            .expect("select")
            .iter()
            .map(SourceDisk::spec)
            .collect()
    }

    fn spec(node: &str, size: u64) -> DiskSpec {
        DiskSpec {
            node: node.into(),
            device: None,
            size,
            copy: DiskCopy::Full,
            backing: None,
        }
    }

    /// An overlay `disk0` of 1024 bytes on a raw template of 1024 bytes, as `query-block`
    /// shows it, on the source (`/src`) or the destination (`/dst`).
    fn overlay(dir: &str, template_format: &str, template_size: u64) -> Vec<BlockInfo> {
        serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": format!("{dir}/o.qcow2"), "backing_file": format!("{dir}/t.img"),
             "image": {"virtual-size": 1024, "filename": format!("{dir}/o.qcow2"),
                "format": "qcow2", "actual-size": 300,
                "backing-image": {"virtual-size": template_size,
                    "filename": format!("{dir}/t.img"), "format": template_format,
                    "actual-size": 1000}}}}
        ]))
        .expect("decode")
    }

    fn top_only() -> CopyPlan {
        CopyPlan {
            default: DiskCopy::Full,
            per_node: [("disk0".to_string(), DiskCopy::Top)].into(),
        }
    }

    /// The specs the source sends for `disks`, each backing with a fingerprint as if read.
    fn fingerprinted(disks: &[SourceDisk]) -> Vec<DiskSpec> {
        disks
            .iter()
            .map(|d| {
                let mut spec = d.spec();
                if let Some(b) = spec.backing.as_mut() {
                    b.fingerprint = Some("sha256-sampled:source".into());
                }
                spec
            })
            .collect()
    }

    /// `overlay`, its node `node` on device `device` (libvirt's case: node names differ
    /// between the hosts, device ids do not).
    fn overlay_on(dir: &str, node: &str, device: &str) -> Vec<BlockInfo> {
        let mut blocks = overlay(dir, "raw", 1024);
        blocks[0].qdev = Some(format!("/machine/peripheral/{device}/virtio-backend"));
        if let Some(n) = blocks[0].inserted.as_mut() {
            n.node_name = node.into();
        }
        blocks
    }

    #[test]
    fn a_top_only_disk_under_another_node_name_is_checked_against_the_destinations_template() {
        let src = select(
            &overlay_on("/src", "srcdisk", "vd0"),
            &DiskSelection::Nodes(vec!["vd0".into()]),
            &CopyPlan {
                default: DiskCopy::Top,
                per_node: BTreeMap::new(),
            },
        )
        .expect("select");

        let matched = check_destination(
            &overlay_on("/dst", "dstdisk", "vd0"),
            &fingerprinted(&src),
            false,
        )
        .expect("matched by device");

        assert_eq!(
            matched,
            [DestDisk {
                export: "srcdisk".into(),
                node: "dstdisk".into(),
                backing: Some(BackingCheck {
                    path: "/dst/t.img".into(),
                    fingerprint: "sha256-sampled:source".into(),
                }),
            }]
        );
    }

    #[tokio::test]
    async fn another_template_under_another_node_name_is_refused_by_content() {
        let dir = tempfile::tempdir().expect("dir");
        let (mine, theirs) = (dir.path().join("src.img"), dir.path().join("dst.img"));
        std::fs::write(&mine, vec![0x11u8; 1 << 20]).expect("source template");
        std::fs::write(&theirs, vec![0x33u8; 1 << 20]).expect("other template");
        let disk = DestDisk {
            export: "srcdisk".into(),
            node: "dstdisk".into(),
            backing: Some(BackingCheck {
                path: theirs.clone(),
                fingerprint: backing_fingerprint(&mine).expect("fingerprint"),
            }),
        };

        let err = verify_backing_fingerprints(&[disk])
            .await
            .expect_err("refused");

        assert_eq!(err.kind(), "backing-mismatch");
        let msg = err.to_string();
        assert!(
            msg.contains("differs") && msg.contains(&theirs.display().to_string()),
            "{msg}"
        );
    }

    #[test]
    fn a_top_only_disk_whose_source_sent_no_fingerprint_is_refused() {
        let src = select(
            &overlay("/src", "raw", 1024),
            &DiskSelection::AllLocal,
            &top_only(),
        )
        .expect("select");
        let unfingerprinted: Vec<DiskSpec> = src.iter().map(SourceDisk::spec).collect();

        let err = check_destination(&overlay("/dst", "raw", 1024), &unfingerprinted, false)
            .expect_err("refused");

        assert_eq!(err.kind(), "backing-mismatch");
        assert!(err.to_string().contains("no fingerprint"), "{err}");
    }

    #[tokio::test]
    async fn a_backing_file_the_source_cannot_read_is_refused_naming_it_and_the_fix() {
        let mut disks = select(
            &overlay("/nonexistent-qtm-test", "raw", 1024),
            &DiskSelection::AllLocal,
            &top_only(),
        )
        .expect("select");

        let err = fingerprint_backings(&mut disks).await.expect_err("refused");

        assert_eq!(err.kind(), "backing-mismatch");
        let msg = err.to_string();
        assert!(
            msg.contains("/nonexistent-qtm-test/t.img")
                && msg.contains("readable")
                && msg.contains("--disk-copy full"),
            "{msg}"
        );
    }

    #[test]
    fn a_destination_disk_qemu_gives_no_size_for_is_refused_not_taken_for_empty() {
        let src = all_local_specs();
        let dest: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/d"}}
        ]))
        .expect("decode");

        let err = check_destination(&dest, &src, true).expect_err("refused");

        assert_eq!(err.kind(), "destination-disk");
    }

    #[test]
    fn what_two_runs_create_never_shares_a_name_and_fits_qemus_node_name_limit() {
        let disk = SourceDisk {
            node: "libvirt-12-format".into(),
            device: Some("virtio-disk0".into()),
            size: 1024,
            format: "qcow2".into(),
            filename: "/pool/a.qcow2".into(),
            copy: DiskCopy::Full,
            backing: None,
            allocated: 0,
        };
        let (a, b) = (run_id(), run_id());

        assert_ne!(a, b);
        assert_ne!(disk.nbd_node(&a, 0), disk.nbd_node(&b, 0));
        assert_ne!(disk.job_id(&a), disk.job_id(&b));
        // QEMU 7.2 refuses node names of 32 characters or more.
        assert!(
            disk.nbd_node(&a, 99).len() < 32,
            "{}",
            disk.nbd_node(&a, 99)
        );
    }

    #[test]
    fn a_source_disk_qemu_gives_no_size_for_is_refused_not_taken_for_empty() {
        let blocks: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/tmp/a.qcow2"}}
        ]))
        .expect("decode");

        let err =
            select(&blocks, &DiskSelection::AllLocal, &CopyPlan::default()).expect_err("refused");

        assert_eq!(err.kind(), "source-not-ready");
        assert!(err.to_string().contains("disk0"), "{err}");
    }

    #[test]
    fn a_top_only_disk_names_its_backing_and_counts_the_top_image_only() {
        let all = DiskSelection::AllLocal;

        let full = select(&overlay("/src", "raw", 1024), &all, &CopyPlan::default()).expect("full");
        let top = select(&overlay("/src", "raw", 1024), &all, &top_only()).expect("top");

        assert_eq!((full[0].copy, full[0].allocated), (DiskCopy::Full, 1300));
        assert_eq!((top[0].copy, top[0].allocated), (DiskCopy::Top, 300));
        let backing = top[0].backing.as_ref().expect("backing");
        assert_eq!(
            (
                backing.filename.as_str(),
                backing.format.as_str(),
                backing.size
            ),
            ("/src/t.img", "raw", 1024)
        );
    }

    #[test]
    fn top_only_is_refused_for_a_disk_without_backing_file() {
        let err = select(&blocks(), &DiskSelection::AllLocal, &top_only()).expect_err("refused");

        assert_eq!(err.kind(), "backing-mismatch");
        assert!(err.to_string().contains("no backing file"), "{err}");
    }

    #[test]
    fn top_for_every_disk_copies_a_disk_without_backing_file_whole() {
        let top_for_all = CopyPlan {
            default: DiskCopy::Top,
            per_node: BTreeMap::new(),
        };

        let disks = select(&blocks(), &DiskSelection::AllLocal, &top_for_all).expect("select");

        assert_eq!(disks[0].copy, DiskCopy::Full);
        assert_eq!(disks[0].backing, None);
    }

    #[test]
    fn the_destination_backing_must_match_in_format_and_size() {
        let src = select(
            &overlay("/src", "raw", 1024),
            &DiskSelection::AllLocal,
            &top_only(),
        )
        .expect("select");
        let wanted = fingerprinted(&src);

        assert!(check_destination(&overlay("/dst", "raw", 1024), &wanted, false).is_ok());
        for (dest, why) in [
            (overlay("/dst", "qcow2", 1024), "format"),
            (overlay("/dst", "raw", 2048), "size"),
            (blocks(), "no backing file"),
        ] {
            let err = check_destination(&dest, &wanted, false).expect_err(why);
            assert_eq!(err.kind(), "backing-mismatch", "{why}: {err}");
        }
    }

    #[test]
    fn a_backing_fingerprint_tells_copies_from_other_files() {
        let dir = tempfile::tempdir().expect("dir");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        std::fs::write(&a, &data).expect("a");
        std::fs::write(&b, &data).expect("b");
        let mut other = data.clone();
        other[0] ^= 1;
        std::fs::write(&c, &other).expect("c");

        let fp = |p: &Path| backing_fingerprint(p).expect("fingerprint");

        assert_eq!(fp(&a), fp(&b));
        assert_ne!(fp(&a), fp(&c));
    }

    #[test]
    fn all_local_takes_writable_local_disks_only() {
        let disks =
            select(&blocks(), &DiskSelection::AllLocal, &CopyPlan::default()).expect("select");
        let names: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
        assert_eq!(names, ["disk0"]);
        assert_eq!(disks[0].size, 1024);
    }

    #[test]
    fn an_unknown_node_is_an_error_listing_the_known_ones() {
        let err = select(
            &blocks(),
            &DiskSelection::Nodes(vec!["nope".into()]),
            &CopyPlan::default(),
        )
        .expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("nope") && msg.contains("disk0"), "{msg}");
    }

    #[test]
    fn a_smaller_destination_disk_is_refused_even_when_it_may_grow() {
        let src = all_local_specs();
        let dest: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/d", "image": {"virtual-size": 512}}}
        ]))
        .expect("decode");
        for may_grow in [false, true] {
            let msg = check_destination(&dest, &src, may_grow)
                .expect_err("smaller")
                .to_string();
            assert!(
                msg.contains("512") && msg.contains("1024") && msg.contains("qemu-img resize"),
                "{msg}"
            );
        }
        assert!(matches!(
            check_destination(&[], &src, true),
            Err(MigrationError::DestDiskMissing { .. })
        ));
    }

    #[test]
    fn only_root_nodes_of_devices_can_be_asked_for_on_the_destination() {
        let dest: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/d", "image": {"virtual-size": 1024}}}
        ]))
        .expect("decode");
        let file_node = [spec("disk0-file", 1024)];
        assert!(matches!(
            check_destination(&dest, &file_node, false),
            Err(MigrationError::DestDiskMissing { .. })
        ));
        let twice = [spec("disk0", 1024), spec("disk0", 1024)];
        assert!(check_destination(&dest, &twice, false).is_err());
    }

    #[test]
    fn a_device_id_is_the_peripheral_id_or_the_whole_qom_path() {
        let block = |qdev: &str| BlockInfo {
            device: String::new(),
            qdev: Some(qdev.into()),
            inserted: None,
        };

        assert_eq!(
            device_id(&block("/machine/peripheral/virtio-disk0/virtio-backend")).as_deref(),
            Some("virtio-disk0")
        );
        assert_eq!(device_id(&block("ide0-0-0")).as_deref(), Some("ide0-0-0"));
        assert_eq!(
            device_id(&block("/machine/peripheral-anon/device[1]/virtio-backend")).as_deref(),
            Some("/machine/peripheral-anon/device[1]/virtio-backend")
        );
        assert_eq!(device_id(&block("")), None);
    }

    /// libvirt numbers its nodes in the order it opens them, so the same XML started twice may
    /// give a disk other node names; the device id is what the two hosts share.
    fn libvirt_blocks(first: &str, second: &str) -> Vec<BlockInfo> {
        serde_json::from_value(json!([
            {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"node-name": first, "ro": false, "drv": "qcow2",
             "file": "/tmp/a.qcow2", "image": {"virtual-size": 1024}}},
            {"device": "", "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
             "inserted": {"node-name": second, "ro": false, "drv": "raw",
             "file": "/tmp/b.raw", "image": {"virtual-size": 2048}}}
        ]))
        .expect("decode")
    }

    #[test]
    fn disks_are_matched_by_device_where_node_names_differ() {
        let source = libvirt_blocks("libvirt-2-format", "libvirt-1-format");
        let dest = libvirt_blocks("libvirt-1-format", "libvirt-2-format");
        let picked = select(
            &source,
            &DiskSelection::Nodes(vec!["virtio-disk1".into()]),
            &CopyPlan::default(),
        )
        .expect("by device id");
        let specs: Vec<DiskSpec> = select(&source, &DiskSelection::AllLocal, &CopyPlan::default())
            .expect("all")
            .iter()
            .map(SourceDisk::spec)
            .collect();

        let matched = check_destination(&dest, &specs, false).expect("matched");

        assert_eq!(picked[0].node, "libvirt-1-format");
        assert_eq!(picked[0].device.as_deref(), Some("virtio-disk1"));
        let pairs: Vec<(&str, &str)> = specs
            .iter()
            .zip(&matched)
            .map(|(s, d)| (s.node.as_str(), d.node.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("libvirt-2-format", "libvirt-1-format"),
                ("libvirt-1-format", "libvirt-2-format")
            ]
        );
        assert!(
            left_behind(
                &source,
                &[],
                &["virtio-disk0".into(), "libvirt-1-format".into()]
            )
            .is_empty(),
            "shared may be declared by device id or node name"
        );
    }

    #[test]
    fn the_destination_is_never_told_a_source_file_name() {
        let disk = SourceDisk {
            node: "disk0".into(),
            device: None,
            size: 1024,
            format: "qcow2".into(),
            filename: "rbd:pool/img:key=SECRET".into(),
            copy: DiskCopy::Full,
            backing: None,
            allocated: 0,
        };

        let wire = serde_json::to_string(&disk.spec()).expect("encode");

        assert!(
            !wire.contains("SECRET") && !wire.contains("filename"),
            "{wire}"
        );
    }

    #[test]
    fn writable_local_disks_not_copied_nor_declared_shared_are_left_behind() {
        let blocks = blocks();
        assert_eq!(left_behind(&blocks, &[], &[]), ["disk0"]);
        let copied =
            select(&blocks, &DiskSelection::AllLocal, &CopyPlan::default()).expect("select");
        assert!(left_behind(&blocks, &copied, &[]).is_empty());
        assert!(left_behind(&blocks, &[], &["disk0".to_string()]).is_empty());
    }
}
