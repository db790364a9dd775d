//! Block-layer commands (QEMU 7.2): the destination's NBD server and exports, the source's NBD
//! client nodes and mirror jobs, and the queries that find a VM's disks.

use serde::{Deserialize, Serialize};

use super::{Empty, no_args_command};
use crate::qmp::Command;

no_args_command!(
    /// Every block device with its inserted medium.
    QueryBlock,
    "query-block",
    Vec<BlockInfo>
);
no_args_command!(
    /// Every running block job.
    QueryBlockJobs,
    "query-block-jobs",
    Vec<BlockJobInfo>
);
no_args_command!(
    /// Every named block node.
    QueryNamedBlockNodes,
    "query-named-block-nodes",
    Vec<BlockDeviceInfo>
);
no_args_command!(
    /// Stop the NBD server and close every NBD export.
    NbdServerStop,
    "nbd-server-stop",
    Empty
);

/// One entry of `query-block`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockInfo {
    #[serde(default)]
    pub device: String,
    /// The device's QOM path, when attached with `-device`.
    #[serde(default)]
    pub qdev: Option<String>,
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node (`query-block`'s `inserted`, `query-named-block-nodes`).
#[derive(Debug, Clone, Deserialize)]
pub struct BlockDeviceInfo {
    #[serde(rename = "node-name", default)]
    pub node_name: String,
    #[serde(default)]
    pub ro: bool,
    /// The format driver (`qcow2`, `raw`, `nbd`, ...).
    #[serde(default)]
    pub drv: String,
    #[serde(default)]
    pub file: String,
    /// The backing file named in the image's header, when it has one.
    #[serde(default)]
    pub backing_file: Option<String>,
    pub image: Option<ImageInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub format: String,
    #[serde(rename = "virtual-size", default)]
    pub virtual_size: u64,
    /// Bytes the image file takes on the host (allocated blocks, metadata included).
    #[serde(rename = "actual-size", default)]
    pub actual_size: Option<u64>,
    /// The next image down the backing chain (for an overlay: its template).
    #[serde(rename = "backing-image")]
    pub backing_image: Option<Box<ImageInfo>>,
}

impl ImageInfo {
    /// This image and every image below it in the backing chain, top first.
    pub fn chain(&self) -> impl Iterator<Item = &ImageInfo> {
        std::iter::successors(Some(self), |i| i.backing_image.as_deref())
    }
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobInfo {
    /// The job id.
    pub device: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub error: Option<String>,
}

/// An inet address as QMP's `SocketAddress` (flat union) writes it.
#[derive(Debug, Clone, Serialize)]
pub struct InetAddress {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub host: String,
    /// A port number or service name, as a string.
    pub port: String,
}

impl InetAddress {
    pub fn new(host: &str, port: u16) -> InetAddress {
        InetAddress {
            kind: "inet",
            host: host.to_string(),
            port: port.to_string(),
        }
    }
}

/// `SocketAddressLegacy`, the older nested form `nbd-server-start` takes in 7.2.
#[derive(Debug, Clone, Serialize)]
pub struct LegacyInetAddress {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub data: LegacyInetData,
}

#[derive(Debug, Clone, Serialize)]
pub struct LegacyInetData {
    pub host: String,
    pub port: String,
}

/// `nbd-server-start` on the destination.
#[derive(Debug, Clone, Serialize)]
pub struct NbdServerStart {
    pub addr: LegacyInetAddress,
    #[serde(rename = "tls-creds", skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(rename = "tls-authz", skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

impl NbdServerStart {
    pub fn inet(host: &str, port: u16) -> NbdServerStart {
        NbdServerStart {
            addr: LegacyInetAddress {
                kind: "inet",
                data: LegacyInetData {
                    host: host.to_string(),
                    port: port.to_string(),
                },
            },
            tls_creds: None,
            tls_authz: None,
        }
    }
}

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Output = Empty;
}

/// `block-export-add` of a writable NBD export named after its node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockExportAdd {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub writable: bool,
    /// The NBD export name clients ask for.
    pub name: String,
}

impl BlockExportAdd {
    /// A writable NBD export `id` of block node `node`, which NBD clients open as `name`.
    pub fn nbd_writable(id: &str, node: &str, name: &str) -> BlockExportAdd {
        BlockExportAdd {
            kind: "nbd",
            id: id.to_string(),
            node_name: node.to_string(),
            writable: true,
            name: name.to_string(),
        }
    }
}

impl Command for BlockExportAdd {
    const NAME: &'static str = "block-export-add";
    type Output = Empty;
}

/// `blockdev-add` of an NBD client node on the source.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevAddNbd {
    pub driver: &'static str,
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub server: InetAddress,
    pub export: String,
    #[serde(rename = "tls-creds", skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    #[serde(rename = "tls-hostname", skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// `unmap` lets writes of zeroes through as discards (needed by `detect-zeroes: unmap`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub discard: Option<&'static str>,
    /// `unmap`: a write whose buffer is all zeroes goes out as an NBD `WRITE_ZEROES` request
    /// (a few bytes on the wire) instead of the data, and the server may punch a hole.
    #[serde(rename = "detect-zeroes", skip_serializing_if = "Option::is_none")]
    pub detect_zeroes: Option<&'static str>,
}

impl Command for BlockdevAddNbd {
    const NAME: &'static str = "blockdev-add";
    type Output = Empty;
}

/// `blockdev-del`.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevDel {
    #[serde(rename = "node-name")]
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Output = Empty;
}

/// `yank`: cuts the network connections of these instances at once, failing whatever waits
/// on them. An NBD client whose peer vanished (a cut link) otherwise holds its requests, and
/// with them QEMU's main loop in `blockdev-del` or a job's cancellation, until TCP gives up
/// (minutes).
#[derive(Debug, Clone, Serialize)]
pub struct Yank {
    pub instances: Vec<YankInstance>,
}

/// One instance for [`Yank`].
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum YankInstance {
    /// An NBD client node.
    BlockNode {
        #[serde(rename = "node-name")]
        node_name: String,
    },
    /// The outgoing or incoming migration.
    Migration,
}

impl Command for Yank {
    const NAME: &'static str = "yank";
    type Output = Empty;
}

/// Mirror copy modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Guest writes are copied later from a dirty bitmap.
    #[default]
    Background,
    /// Guest writes complete only once written to the target too, so a guest that writes
    /// faster than the network can still converge.
    WriteBlocking,
}

/// What a mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MirrorSync {
    /// The whole chain as the guest sees it.
    Full,
    /// Only what the top image holds; the target must already have the same backing chain.
    Top,
}

/// `blockdev-mirror` into an existing target node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockdevMirror {
    #[serde(rename = "job-id")]
    pub job_id: String,
    pub device: String,
    pub target: String,
    pub sync: MirrorSync,
    #[serde(rename = "copy-mode")]
    pub copy_mode: CopyMode,
    /// Bytes per second of data copied (zeroes and discards do not count); none: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
}

impl Command for BlockdevMirror {
    const NAME: &'static str = "blockdev-mirror";
    type Output = Empty;
}

/// `block-job-cancel`. On a mirror that is ready this completes the job without pivoting,
/// leaving the target a consistent copy (event `BLOCK_JOB_COMPLETED`).
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    pub device: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Output = Empty;
}

/// `block_resize` of a node.
#[derive(Debug, Clone, Serialize)]
pub struct BlockResize {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub size: u64,
}

impl Command for BlockResize {
    const NAME: &'static str = "block_resize";
    type Output = Empty;
}

/// Data of `BLOCK_JOB_READY`, `BLOCK_JOB_COMPLETED`, `BLOCK_JOB_CANCELLED`, `BLOCK_JOB_ERROR`.
#[derive(Debug, Clone, Deserialize)]
pub struct BlockJobEvent {
    pub device: String,
    #[serde(default)]
    pub len: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nbd_server_start_uses_the_legacy_address_form() {
        let mut s = NbdServerStart::inet("127.0.0.1", 49153);
        s.tls_creds = Some("qtm-tls-1".into());
        assert_eq!(
            serde_json::to_value(&s).expect("encode"),
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "49153"}},
                   "tls-creds": "qtm-tls-1"})
        );
    }

    #[test]
    fn query_block_of_qemu_7_2_decodes() {
        let v = json!([{"io-status": "ok", "device": "", "locked": false, "removable": false,
            "inserted": {"iops_rd": 0, "detect_zeroes": "off", "image": {"virtual-size": 67108864,
            "filename": "/tmp/d.qcow2", "cluster-size": 65536, "format": "qcow2", "actual-size": 200704,
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}, "dirty-flag": false},
            "ro": false, "drv": "qcow2", "node-name": "disk0", "file": "/tmp/d.qcow2", "encrypted": false,
            "write_threshold": 0, "cache": {"no-flush": false, "direct": false, "writeback": true}},
            "qdev": "/machine/peripheral/disk0-dev/virtio-backend", "type": "unknown"}]);
        let info: Vec<BlockInfo> = serde_json::from_value(v).expect("decode");
        let node = info[0].inserted.as_ref().expect("inserted");
        assert_eq!(node.node_name, "disk0");
        assert_eq!(node.image.as_ref().map(|i| i.virtual_size), Some(64 << 20));
    }

    #[test]
    fn an_overlay_of_qemu_7_2_shows_its_backing_chain() {
        let v = json!({"node-name": "disk0", "ro": false, "drv": "qcow2", "file": "/o.qcow2",
            "backing_file": "/t.qcow2", "backing_file_depth": 1,
            "image": {"virtual-size": 1024, "filename": "/o.qcow2", "format": "qcow2",
                "actual-size": 4096, "backing-filename": "/t.qcow2",
                "backing-image": {"virtual-size": 1024, "filename": "/t.qcow2", "format": "raw",
                    "actual-size": 8192}}});
        let node: BlockDeviceInfo = serde_json::from_value(v).expect("decode");
        let image = node.image.expect("image");
        let chain: Vec<&str> = image.chain().map(|i| i.filename.as_str()).collect();
        assert_eq!(chain, ["/o.qcow2", "/t.qcow2"]);
        assert_eq!(node.backing_file.as_deref(), Some("/t.qcow2"));
    }

    #[test]
    fn a_capped_top_mirror_encodes_as_qemu_expects() {
        let m = BlockdevMirror {
            job_id: "j".into(),
            device: "disk0".into(),
            target: "t".into(),
            sync: MirrorSync::Top,
            copy_mode: CopyMode::Background,
            speed: Some(1 << 20),
        };
        assert_eq!(
            serde_json::to_value(&m).expect("encode"),
            json!({"job-id": "j", "device": "disk0", "target": "t", "sync": "top",
                   "copy-mode": "background", "speed": 1048576})
        );
    }
}
