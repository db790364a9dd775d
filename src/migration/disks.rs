//! Non-shared disks: which of the source's disks to copy, whether the destination can take
//! them, and the names of what the copy creates.
//!
//! A disk is *local* (copied by `--all-local-disks`) when it is writable and its image is a file
//! or block device on this host, not on shared storage. Shared means a network protocol driver
//! (`nbd`, `rbd`, `iscsi`, `gluster`, `ssh`, `http(s)`, ...) or a file on a network or cluster
//! file system (NFS, CIFS/SMB, Ceph, GlusterFS over FUSE, GFS2, OCFS2), told by `statfs`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{MigrationError, OBJECT_PREFIX};
use crate::qemu::{BlockDeviceInfo, BlockInfo};

/// Which disks to copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum DiskSelection {
    /// None: storage is shared, or the VM has no disks.
    #[default]
    None,
    /// Every writable disk not on shared storage.
    AllLocal,
    /// These block nodes (node names, as in `-blockdev node-name=...`).
    Nodes(Vec<String>),
}

/// A source disk to copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDisk {
    /// The block node the guest's device uses.
    pub node: String,
    /// Virtual size in bytes.
    pub size: u64,
    pub format: String,
    pub filename: String,
}

impl SourceDisk {
    /// The NBD client node on the source that writes into the destination's export.
    pub fn nbd_node(&self) -> String {
        format!("{OBJECT_PREFIX}nbd-{}", self.node)
    }

    /// The mirror job's id.
    pub fn job_id(&self) -> String {
        format!("{OBJECT_PREFIX}mirror-{}", self.node)
    }

    /// The export's id on the destination; the export's NBD name is the node name.
    pub fn export_id(&self) -> String {
        format!("{OBJECT_PREFIX}export-{}", self.node)
    }
}

/// Mirror progress of one disk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskProgress {
    pub device: String,
    pub offset: u64,
    pub len: u64,
    pub ready: bool,
}

/// The copy of one disk, in the final report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskReport {
    pub device: String,
    /// Bytes the mirror copied.
    pub bytes: u64,
    /// Time from the mirror's start until source and destination were in sync.
    pub ms: u64,
    /// Megabits per second over that time.
    pub throughput_mbps: f64,
}

/// Picks the disks to copy from the source's `query-block`.
pub(crate) fn select(
    blocks: &[BlockInfo],
    selection: &DiskSelection,
) -> Result<Vec<SourceDisk>, MigrationError> {
    let nodes: Vec<&BlockDeviceInfo> = blocks.iter().filter_map(|b| b.inserted.as_ref()).collect();
    let to_disk = |n: &BlockDeviceInfo| SourceDisk {
        node: n.node_name.clone(),
        size: n.image.as_ref().map(|i| i.virtual_size).unwrap_or(0),
        format: n.drv.clone(),
        filename: n.file.clone(),
    };
    match selection {
        DiskSelection::None => Ok(Vec::new()),
        DiskSelection::AllLocal => Ok(nodes
            .into_iter()
            .filter(|n| !n.ro && is_local(n))
            .map(to_disk)
            .collect()),
        DiskSelection::Nodes(names) => names
            .iter()
            .map(|name| {
                nodes
                    .iter()
                    .find(|n| &n.node_name == name)
                    .map(|n| to_disk(n))
                    .ok_or_else(|| MigrationError::UnknownDisk {
                        node: name.clone(),
                        available: nodes.iter().map(|n| n.node_name.clone()).collect(),
                    })
            })
            .collect(),
    }
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

/// What the destination must do before it can take `disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DestDisk {
    Ready,
    /// Smaller than the source: grow it (`--create-dest-disks`) to this many bytes.
    Grow(u64),
}

/// Checks the destination has a node of each disk's name and size (or may grow it).
pub(crate) fn check_destination(
    dest_nodes: &[BlockDeviceInfo],
    disks: &[SourceDisk],
    may_grow: bool,
) -> Result<Vec<DestDisk>, MigrationError> {
    disks
        .iter()
        .map(|disk| {
            let node = dest_nodes
                .iter()
                .find(|n| n.node_name == disk.node)
                .ok_or_else(|| MigrationError::DestDiskMissing {
                    node: disk.node.clone(),
                })?;
            let size = node.image.as_ref().map(|i| i.virtual_size).unwrap_or(0);
            if node.ro {
                return Err(MigrationError::DestDiskUnusable {
                    node: disk.node.clone(),
                    reason: "it is read-only".into(),
                });
            }
            match (size >= disk.size, may_grow) {
                (true, _) => Ok(DestDisk::Ready),
                (false, true) => Ok(DestDisk::Grow(disk.size)),
                (false, false) => Err(MigrationError::DestDiskUnusable {
                    node: disk.node.clone(),
                    reason: format!(
                        "it holds {size} bytes, the source disk {} bytes; grow it, or pass \
                         --create-dest-disks",
                        disk.size
                    ),
                }),
            }
        })
        .collect()
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

    #[test]
    fn all_local_takes_writable_local_disks_only() {
        let disks = select(&blocks(), &DiskSelection::AllLocal).expect("select");
        let names: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
        assert_eq!(names, ["disk0"]);
        assert_eq!(disks[0].size, 1024);
    }

    #[test]
    fn an_unknown_node_is_an_error_listing_the_known_ones() {
        let err =
            select(&blocks(), &DiskSelection::Nodes(vec!["nope".into()])).expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("nope") && msg.contains("disk0"), "{msg}");
    }

    #[test]
    fn a_smaller_destination_disk_is_refused_unless_it_may_grow() {
        let src = select(&blocks(), &DiskSelection::AllLocal).expect("select");
        let dest: Vec<BlockDeviceInfo> = serde_json::from_value(json!([
            {"node-name": "disk0", "ro": false, "drv": "qcow2", "file": "/d", "image": {"virtual-size": 512}}
        ]))
        .expect("decode");
        assert!(check_destination(&dest, &src, false).is_err());
        assert_eq!(
            check_destination(&dest, &src, true).expect("grow"),
            vec![DestDisk::Grow(1024)]
        );
        assert!(matches!(
            check_destination(&[], &src, true),
            Err(MigrationError::DestDiskMissing { .. })
        ));
    }
}
