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
use crate::peer::DiskSpec;
use crate::qemu::{BlockDeviceInfo, BlockInfo};

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

    /// What the destination is told about this disk: its node and size, never its file name
    /// (a path or URL may carry credentials and says nothing the destination needs).
    pub fn spec(&self) -> DiskSpec {
        DiskSpec {
            node: self.node.clone(),
            device: self.device.clone(),
            size: self.size,
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

/// The export's id on the destination; the export's NBD name is the node name.
pub(crate) fn export_id(node: &str) -> String {
    format!("{OBJECT_PREFIX}export-{node}")
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
    let nodes: Vec<(&BlockDeviceInfo, Option<String>)> = blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref().map(|n| (n, device_id(b))))
        .collect();
    let to_disk = |(n, device): &(&BlockDeviceInfo, Option<String>)| SourceDisk {
        node: n.node_name.clone(),
        device: device.clone(),
        size: n.image.as_ref().map(|i| i.virtual_size).unwrap_or(0),
        format: n.drv.clone(),
        filename: n.file.clone(),
    };
    match selection {
        DiskSelection::None => Ok(Vec::new()),
        DiskSelection::AllLocal => Ok(nodes
            .iter()
            .filter(|(n, _)| !n.ro && is_local(n))
            .map(to_disk)
            .collect()),
        DiskSelection::Nodes(names) => names
            .iter()
            .map(|name| {
                nodes
                    .iter()
                    .find(|(n, device)| {
                        &n.node_name == name || device.as_deref() == Some(name.as_str())
                    })
                    .map(to_disk)
                    .ok_or_else(|| MigrationError::UnknownDisk {
                        node: name.clone(),
                        available: nodes.iter().map(|(n, _)| n.node_name.clone()).collect(),
                    })
            })
            .collect(),
    }
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

/// The destination's disk for one source disk, and what must be done before it can take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DestDisk {
    /// The destination's root node for the disk.
    pub node: String,
    /// Smaller than the source: grow it (`--create-dest-disks`) to this many bytes.
    pub grow: Option<u64>,
}

/// Checks the destination has, for each disk, the root node attached to the same guest device
/// (or, for a disk named by node alone or whose device the destination lacks, a root node of
/// that name attached to a device: never a file node or a node no device uses), writable and
/// as large as the source's (or smaller and allowed to grow to exactly the source's size). A
/// disk asked for twice is refused.
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
        let twice = |reason: &str| MigrationError::DestDiskUnusable {
            node: disk.node.clone(),
            reason: reason.into(),
        };
        if disks[..i].iter().any(|d| d.node == disk.node) {
            return Err(twice("it is named twice"));
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
            return Err(twice(
                "another source disk maps to the same destination disk",
            ));
        }
        if node.ro {
            return Err(MigrationError::DestDiskUnusable {
                node: disk.node.clone(),
                reason: "it is read-only".into(),
            });
        }
        let size = node.image.as_ref().map(|i| i.virtual_size).unwrap_or(0);
        let grow = match (size >= disk.size, may_grow) {
            (true, _) => None,
            (false, true) => Some(disk.size),
            (false, false) => {
                return Err(MigrationError::DestDiskUnusable {
                    node: disk.node.clone(),
                    reason: format!(
                        "it holds {size} bytes, the source disk {} bytes; grow it, or pass \
                         --create-dest-disks",
                        disk.size
                    ),
                });
            }
        };
        found.push(DestDisk {
            node: node.node_name.clone(),
            grow,
        });
    }
    Ok(found)
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
        let src: Vec<DiskSpec> = select(&blocks(), &DiskSelection::AllLocal)
            .expect("select")
            .iter()
            .map(SourceDisk::spec)
            .collect();
        let dest: Vec<BlockInfo> = serde_json::from_value(json!([
            {"device": "", "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2",
             "file": "/d", "image": {"virtual-size": 512}}}
        ]))
        .expect("decode");
        assert!(check_destination(&dest, &src, false).is_err());
        assert_eq!(
            check_destination(&dest, &src, true).expect("grow"),
            vec![DestDisk {
                node: "disk0".into(),
                grow: Some(1024)
            }]
        );
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
        let file_node = [DiskSpec {
            node: "disk0-file".into(),
            device: None,
            size: 1024,
        }];
        assert!(matches!(
            check_destination(&dest, &file_node, false),
            Err(MigrationError::DestDiskMissing { .. })
        ));
        let twice = [
            DiskSpec {
                node: "disk0".into(),
                device: None,
                size: 1024,
            },
            DiskSpec {
                node: "disk0".into(),
                device: None,
                size: 1024,
            },
        ];
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
        let picked = select(&source, &DiskSelection::Nodes(vec!["virtio-disk1".into()]))
            .expect("by device id");
        let specs: Vec<DiskSpec> = select(&source, &DiskSelection::AllLocal)
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
        let copied = select(&blocks, &DiskSelection::AllLocal).expect("select");
        assert!(left_behind(&blocks, &copied, &[]).is_empty());
        assert!(left_behind(&blocks, &[], &["disk0".to_string()]).is_empty());
    }
}
