//! The incoming domain's XML, built by the service (`serve --libvirt`) from the parts of a
//! source's domain XML that this host allows; everything else is refused by name.
//!
//! 1. [`build`] parses the source's XML and walks it against [`RULES`], an explicit list of
//!    element paths (`domain/devices/disk/driver`), their attributes and the values each may
//!    take, and which elements hold text: what a CloudStack VM's migratable XML uses (memory,
//!    vCPUs, CPU model, `os`, features, clock, `on_*`, disks, controllers, interfaces, serial and
//!    console on a pty, graphics, video, input, the guest-agent and SPICE channels, rng from
//!    `/dev/urandom`, memballoon, watchdog). An element, attribute or value not on the list is
//!    refused ([`AllowError::NotAllowed`], `bad-request`), naming it: `<qemu:commandline>`
//!    arguments beyond a declared QMP monitor, `<seclabel>` other than a dynamic one,
//!    `<hostdev>`, `<filesystem>`, block and network disks, `<qemu:capabilities>`,
//!    `<launchSecurity>`, `<sysinfo type='fwcfg'>` files, `<nvram>`, `<metadata>`, ...
//! 2. The host's own rules then apply to what was allowed ([`Policy`]): each disk's file is one
//!    the service creates inside a `--storage-dir` or an existing file inside a `--shared-dir`
//!    (see [`super::storage`]), kernel, initrd and loader lie inside a `--boot-dir`, an
//!    `<emulator>` is one this host's libvirt lists, an interface's bridge exists here or its
//!    network is active here, graphics listen where the service says (`--graphics-listen`, port
//!    chosen by libvirt), a guest-agent channel's socket is the one libvirt chooses.
//! 3. [`AllowedDomain::render`] writes a new document from those parts alone, adding the
//!    service's own QMP monitor and `-incoming defer` (the only `<qemu:commandline>` the
//!    domain gets).
//!
//! ## Built afresh, not validated and spliced
//! Checking the source's document and then splicing edits into it would hand libvirt bytes the
//! service did not write: comments, CDATA, character references, namespace prefixes, attribute
//! whitespace. libvirt's parser (libxml2) and this one (`roxmltree`) would have to agree on all
//! of them for the check to mean anything; they do not always (`<name>a<!---->b</name>` is `a`
//! to `roxmltree::Node::text` and `ab` to libvirt). Here every name in the output comes from
//! [`RULES`] and every value is one that was checked, written escaped by [`render`], so libvirt
//! reads exactly what was checked. Text is taken only from elements holding a single text node
//! (a comment or processing instruction inside one is refused); elsewhere only whitespace may
//! sit between elements, and comments are dropped.
//!
//! Two parts of a migratable XML are dropped rather than refused, because dropping them leaves
//! the decision with this host: a dynamic `<seclabel>` without a label (this host's security
//! driver labels the domain its own way) and `<backingStore>` (libvirt reads a disk's backing
//! chain from the image, which the service made or the operator's shared storage holds).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use roxmltree::{Document, Node, NodeType};

use super::storage::{Place, StorageDirs, StorageError};
use crate::libvirt::QEMU_NS;
use crate::peer::NewDisk;

/// Why a source's domain was not allowed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllowError {
    #[error("the domain XML is not well-formed")]
    Xml(#[source] roxmltree::Error),
    #[error("{what} is not allowed in an incoming domain on this host{why}")]
    NotAllowed { what: String, why: String },
    #[error("the domain's disk {target} cannot be used here")]
    Disk {
        target: String,
        #[source]
        source: StorageError,
    },
    #[error("the domain's {what} cannot be used here")]
    File {
        what: String,
        #[source]
        source: StorageError,
    },
}

fn not_allowed(what: impl Into<String>) -> AllowError {
    AllowError::NotAllowed {
        what: what.into(),
        why: String::new(),
    }
}

/// [`not_allowed`] with the reason, or what would be allowed instead.
fn not_allowed_because(what: impl Into<String>, why: impl std::fmt::Display) -> AllowError {
    AllowError::NotAllowed {
        what: what.into(),
        why: format!("; {why}"),
    }
}

/// What an attribute or an element's text may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Value {
    OneOf(&'static [&'static str]),
    /// Decimal digits.
    Uint,
    /// Decimal digits, optionally negative.
    Int,
    /// `0x` and hexadecimal digits, or decimal digits (device addresses).
    Hex,
    /// A model, machine or feature name: `[A-Za-z0-9_.:+-]`, 1 to 64 of them.
    Word,
    /// Free text (a description, a kernel command line, an SMBIOS string), escaped on output.
    Text,
    /// An absolute path, checked against the operator's directories by [`Policy`].
    Path,
    Uuid,
    Mac,
    /// A network interface name.
    IfName,
    DomainName,
    /// A CPU list (`0-3,^2`).
    Cpuset,
    /// A disk's guest device name (`vda`, `hdc`).
    Dev,
    /// A user alias (`ua-` and a word): the only aliases a migratable XML keeps.
    Alias,
}

const YES_NO: Value = Value::OneOf(&["yes", "no"]);
const ON_OFF: Value = Value::OneOf(&["on", "off"]);
const LIFECYCLE: Value = Value::OneOf(&["destroy", "restart", "preserve", "rename-restart"]);
/// Longest free-text value taken.
const MAX_TEXT: usize = 4096;

impl Value {
    /// Whether `v` is such a value. No value holds a control character but free text's
    /// newlines and tabs (an attribute's would be normalised to spaces by an XML parser).
    pub(crate) fn check(self, v: &str, in_text: bool) -> bool {
        let word_of = |v: &str, extra: &str, max: usize| {
            !v.is_empty()
                && v.len() <= max
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        let word = |v: &str, extra: &str| word_of(v, extra, 64);
        let digits =
            |v: &str| !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit());
        let hex = |v: &str, n: usize| v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit());
        match self {
            Value::OneOf(list) => list.contains(&v),
            Value::Uint => digits(v),
            Value::Int => digits(v.strip_prefix('-').unwrap_or(v)),
            Value::Hex => match v.strip_prefix("0x") {
                Some(h) => {
                    !h.is_empty() && h.len() <= 8 && h.bytes().all(|b| b.is_ascii_hexdigit())
                }
                None => digits(v),
            },
            Value::Word => word(v, "_.:+-"),
            Value::Text => {
                v.len() <= MAX_TEXT
                    && v.chars()
                        .all(|c| !c.is_control() || (in_text && (c == '\n' || c == '\t')))
            }
            Value::Path => {
                v.starts_with('/') && v.len() <= 4096 && v.chars().all(|c| !c.is_control())
            }
            Value::Uuid => {
                let parts: Vec<&str> = v.split('-').collect();
                parts.len() == 5 && parts.iter().zip([8, 4, 4, 4, 12]).all(|(p, n)| hex(p, n))
            }
            Value::Mac => {
                let parts: Vec<&str> = v.split(':').collect();
                parts.len() == 6 && parts.iter().all(|p| hex(p, 2))
            }
            Value::IfName => v.len() <= 15 && word(v, "_.-"),
            Value::DomainName => {
                word_of(v, "_.+-", 128) && !v.starts_with('.') && !v.starts_with('-')
            }
            Value::Cpuset => {
                !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| b"0123456789,-^".contains(&b))
            }
            Value::Dev => {
                v.len() >= 2
                    && v.len() <= 16
                    && v.starts_with(|c: char| c.is_ascii_lowercase())
                    && v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            }
            Value::Alias => v.strip_prefix("ua-").is_some_and(|w| word(w, "_-")),
        }
    }
}

/// One element the service allows: its attributes with the values each may take, the value of
/// its text when it holds one (`None`: it holds elements only), and whether it may repeat in
/// its parent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rule {
    pub(crate) attrs: &'static [(&'static str, Value)],
    pub(crate) text: Option<Value>,
    pub(crate) repeat: bool,
}

const fn el(attrs: &'static [(&'static str, Value)]) -> Rule {
    Rule {
        attrs,
        text: None,
        repeat: false,
    }
}

const fn leaf(attrs: &'static [(&'static str, Value)], text: Value) -> Rule {
    Rule {
        attrs,
        text: Some(text),
        repeat: false,
    }
}

const fn many(rule: Rule) -> Rule {
    Rule {
        repeat: true,
        ..rule
    }
}

const UNIT: Value = Value::OneOf(&[
    "b", "bytes", "KB", "k", "KiB", "MB", "M", "MiB", "GB", "G", "GiB",
]);
const MEMORY: &[(&str, Value)] = &[("unit", UNIT)];
const ADDRESS: &[(&str, Value)] = &[
    (
        "type",
        Value::OneOf(&["pci", "drive", "virtio-serial", "usb", "ccid", "isa"]),
    ),
    ("domain", Value::Hex),
    ("bus", Value::Hex),
    ("slot", Value::Hex),
    ("function", Value::Hex),
    ("multifunction", ON_OFF),
    ("controller", Value::Uint),
    ("target", Value::Uint),
    ("unit", Value::Uint),
    ("port", Value::Word),
    ("iobase", Value::Hex),
    ("irq", Value::Hex),
];
const HYPERV_FLAGS: &[&str] = &[
    "relaxed",
    "vapic",
    "vpindex",
    "runtime",
    "synic",
    "stimer",
    "reset",
    "frequencies",
    "reenlightenment",
    "tlbflush",
    "ipi",
    "evmcs",
];
const IOTUNE: &[&str] = &[
    "total_bytes_sec",
    "read_bytes_sec",
    "write_bytes_sec",
    "total_iops_sec",
    "read_iops_sec",
    "write_iops_sec",
    "total_bytes_sec_max",
    "read_bytes_sec_max",
    "write_bytes_sec_max",
    "total_iops_sec_max",
    "read_iops_sec_max",
    "write_iops_sec_max",
    "size_iops_sec",
];
/// Devices that may carry an `<address>` (the guest's view: kept so the guest sees the same
/// machine) and a user `<alias>`.
const ADDRESSED: &[&str] = &[
    "disk",
    "controller",
    "interface",
    "serial",
    "console",
    "channel",
    "input",
    "video",
    "rng",
    "memballoon",
    "watchdog",
];

/// Every element an incoming domain may have, by path from the root; `<qemu:commandline>` is
/// apart ([`declared_monitor_only`]), and each of [`ADDRESSED`] also takes `address` and
/// `alias`, [`IOTUNE`] are `disk/iotune`'s children, [`HYPERV_FLAGS`] `features/hyperv`'s.
pub(crate) static RULES: &[(&str, Rule)] = &[
    ("domain", el(&[("type", Value::OneOf(&["kvm", "qemu"]))])),
    ("domain/name", leaf(&[], Value::DomainName)),
    ("domain/uuid", leaf(&[], Value::Uuid)),
    ("domain/title", leaf(&[], Value::Text)),
    ("domain/description", leaf(&[], Value::Text)),
    ("domain/memory", leaf(MEMORY, Value::Uint)),
    ("domain/currentMemory", leaf(MEMORY, Value::Uint)),
    (
        "domain/maxMemory",
        leaf(&[("unit", UNIT), ("slots", Value::Uint)], Value::Uint),
    ),
    ("domain/memoryBacking", el(&[])),
    ("domain/memoryBacking/hugepages", el(&[])),
    ("domain/memoryBacking/nosharepages", el(&[])),
    (
        "domain/vcpu",
        leaf(
            &[
                ("placement", Value::OneOf(&["static", "auto"])),
                ("current", Value::Uint),
                ("cpuset", Value::Cpuset),
            ],
            Value::Uint,
        ),
    ),
    ("domain/vcpus", el(&[])),
    (
        "domain/vcpus/vcpu",
        many(el(&[
            ("id", Value::Uint),
            ("enabled", YES_NO),
            ("hotpluggable", YES_NO),
            ("order", Value::Uint),
        ])),
    ),
    ("domain/iothreads", leaf(&[], Value::Uint)),
    ("domain/cputune", el(&[])),
    ("domain/cputune/shares", leaf(&[], Value::Uint)),
    ("domain/cputune/period", leaf(&[], Value::Uint)),
    ("domain/cputune/quota", leaf(&[], Value::Int)),
    ("domain/resource", el(&[])),
    (
        "domain/resource/partition",
        leaf(&[], Value::OneOf(&["/machine"])),
    ),
    ("domain/sysinfo", el(&[("type", Value::OneOf(&["smbios"]))])),
    ("domain/sysinfo/bios", el(&[])),
    ("domain/sysinfo/system", el(&[])),
    ("domain/sysinfo/baseBoard", many(el(&[]))),
    ("domain/sysinfo/chassis", el(&[])),
    (
        "domain/sysinfo/bios/entry",
        many(leaf(&[("name", Value::Word)], Value::Text)),
    ),
    (
        "domain/sysinfo/system/entry",
        many(leaf(&[("name", Value::Word)], Value::Text)),
    ),
    (
        "domain/sysinfo/baseBoard/entry",
        many(leaf(&[("name", Value::Word)], Value::Text)),
    ),
    (
        "domain/sysinfo/chassis/entry",
        many(leaf(&[("name", Value::Word)], Value::Text)),
    ),
    ("domain/os", el(&[])),
    (
        "domain/os/type",
        leaf(
            &[
                ("arch", Value::OneOf(&["x86_64", "i686", "aarch64"])),
                ("machine", Value::Word),
            ],
            Value::OneOf(&["hvm"]),
        ),
    ),
    (
        "domain/os/boot",
        many(el(&[(
            "dev",
            Value::OneOf(&["hd", "cdrom", "network", "fd"]),
        )])),
    ),
    (
        "domain/os/bootmenu",
        el(&[("enable", YES_NO), ("timeout", Value::Uint)]),
    ),
    (
        "domain/os/smbios",
        el(&[("mode", Value::OneOf(&["sysinfo", "host", "emulate"]))]),
    ),
    (
        "domain/os/bios",
        el(&[("useserial", YES_NO), ("rebootTimeout", Value::Int)]),
    ),
    ("domain/os/kernel", leaf(&[], Value::Path)),
    ("domain/os/initrd", leaf(&[], Value::Path)),
    ("domain/os/cmdline", leaf(&[], Value::Text)),
    (
        "domain/os/loader",
        leaf(
            &[
                ("readonly", YES_NO),
                ("type", Value::OneOf(&["rom", "pflash"])),
                ("secure", YES_NO),
            ],
            Value::Path,
        ),
    ),
    ("domain/features", el(&[])),
    ("domain/features/acpi", el(&[])),
    ("domain/features/apic", el(&[("eoi", ON_OFF)])),
    ("domain/features/pae", el(&[])),
    ("domain/features/hap", el(&[("state", ON_OFF)])),
    ("domain/features/vmport", el(&[("state", ON_OFF)])),
    ("domain/features/vmcoreinfo", el(&[("state", ON_OFF)])),
    (
        "domain/features/hyperv",
        el(&[("mode", Value::OneOf(&["custom", "passthrough"]))]),
    ),
    (
        "domain/features/hyperv/spinlocks",
        el(&[("state", ON_OFF), ("retries", Value::Uint)]),
    ),
    (
        "domain/features/hyperv/vendor_id",
        el(&[("state", ON_OFF), ("value", Value::Word)]),
    ),
    ("domain/features/kvm", el(&[])),
    ("domain/features/kvm/hidden", el(&[("state", ON_OFF)])),
    (
        "domain/cpu",
        el(&[
            (
                "mode",
                Value::OneOf(&["custom", "host-model", "host-passthrough", "maximum"]),
            ),
            ("match", Value::OneOf(&["exact", "minimum", "strict"])),
            ("check", Value::OneOf(&["none", "partial", "full"])),
            ("migratable", ON_OFF),
        ]),
    ),
    (
        "domain/cpu/model",
        leaf(
            &[("fallback", Value::OneOf(&["allow", "forbid"]))],
            Value::Word,
        ),
    ),
    ("domain/cpu/vendor", leaf(&[], Value::Word)),
    (
        "domain/cpu/topology",
        el(&[
            ("sockets", Value::Uint),
            ("dies", Value::Uint),
            ("cores", Value::Uint),
            ("threads", Value::Uint),
        ]),
    ),
    (
        "domain/cpu/feature",
        many(el(&[
            (
                "policy",
                Value::OneOf(&["force", "require", "optional", "disable", "forbid"]),
            ),
            ("name", Value::Word),
        ])),
    ),
    (
        "domain/clock",
        el(&[
            ("offset", Value::OneOf(&["utc", "localtime", "variable"])),
            ("adjustment", Value::Int),
            ("basis", Value::OneOf(&["utc", "localtime"])),
        ]),
    ),
    (
        "domain/clock/timer",
        many(el(&[
            (
                "name",
                Value::OneOf(&[
                    "platform",
                    "pit",
                    "rtc",
                    "hpet",
                    "tsc",
                    "kvmclock",
                    "hypervclock",
                ]),
            ),
            ("present", YES_NO),
            (
                "tickpolicy",
                Value::OneOf(&["delay", "catchup", "merge", "discard"]),
            ),
            (
                "track",
                Value::OneOf(&["boot", "guest", "wall", "realtime"]),
            ),
        ])),
    ),
    ("domain/on_poweroff", leaf(&[], LIFECYCLE)),
    ("domain/on_reboot", leaf(&[], LIFECYCLE)),
    ("domain/on_crash", leaf(&[], LIFECYCLE)),
    ("domain/pm", el(&[])),
    ("domain/pm/suspend-to-mem", el(&[("enabled", YES_NO)])),
    ("domain/pm/suspend-to-disk", el(&[("enabled", YES_NO)])),
    ("domain/devices", el(&[])),
    ("domain/devices/emulator", leaf(&[], Value::Path)),
    (
        "domain/devices/disk",
        many(el(&[
            ("type", Value::OneOf(&["file"])),
            ("device", Value::OneOf(&["disk", "cdrom", "floppy"])),
        ])),
    ),
    (
        "domain/devices/disk/driver",
        el(&[
            ("name", Value::OneOf(&["qemu"])),
            ("type", Value::OneOf(&["raw", "qcow2"])),
            (
                "cache",
                Value::OneOf(&[
                    "default",
                    "none",
                    "writethrough",
                    "writeback",
                    "directsync",
                    "unsafe",
                ]),
            ),
            ("io", Value::OneOf(&["native", "threads", "io_uring"])),
            ("discard", Value::OneOf(&["unmap", "ignore"])),
            ("detect_zeroes", Value::OneOf(&["off", "on", "unmap"])),
            (
                "error_policy",
                Value::OneOf(&["stop", "report", "ignore", "enospace"]),
            ),
            ("rerror_policy", Value::OneOf(&["stop", "report", "ignore"])),
            ("copy_on_read", ON_OFF),
            ("iothread", Value::Uint),
            ("queues", Value::Uint),
        ]),
    ),
    (
        "domain/devices/disk/source",
        el(&[
            ("file", Value::Path),
            (
                "startupPolicy",
                Value::OneOf(&["mandatory", "requisite", "optional"]),
            ),
        ]),
    ),
    (
        "domain/devices/disk/target",
        el(&[
            ("dev", Value::Dev),
            (
                "bus",
                Value::OneOf(&["virtio", "scsi", "ide", "sata", "usb", "fdc"]),
            ),
            ("tray", Value::OneOf(&["open", "closed"])),
            ("removable", ON_OFF),
        ]),
    ),
    ("domain/devices/disk/serial", leaf(&[], Value::Word)),
    ("domain/devices/disk/readonly", el(&[])),
    ("domain/devices/disk/shareable", el(&[])),
    ("domain/devices/disk/boot", el(&[("order", Value::Uint)])),
    (
        "domain/devices/disk/blockio",
        el(&[
            ("logical_block_size", Value::Uint),
            ("physical_block_size", Value::Uint),
        ]),
    ),
    ("domain/devices/disk/iotune", el(&[])),
    (
        "domain/devices/controller",
        many(el(&[
            (
                "type",
                Value::OneOf(&[
                    "usb",
                    "pci",
                    "ide",
                    "scsi",
                    "sata",
                    "virtio-serial",
                    "fdc",
                    "ccid",
                ]),
            ),
            ("index", Value::Uint),
            ("model", Value::Word),
            ("ports", Value::Uint),
            ("vectors", Value::Uint),
        ])),
    ),
    (
        "domain/devices/controller/model",
        el(&[("name", Value::Word)]),
    ),
    (
        "domain/devices/controller/target",
        el(&[
            ("chassisNr", Value::Uint),
            ("chassis", Value::Uint),
            ("port", Value::Hex),
            ("busNr", Value::Uint),
            ("index", Value::Uint),
            ("hotplug", ON_OFF),
        ]),
    ),
    (
        "domain/devices/controller/driver",
        el(&[
            ("queues", Value::Uint),
            ("iothread", Value::Uint),
            ("cmd_per_lun", Value::Uint),
            ("max_sectors", Value::Uint),
        ]),
    ),
    (
        "domain/devices/controller/master",
        el(&[("startport", Value::Uint)]),
    ),
    (
        "domain/devices/interface",
        many(el(&[("type", Value::OneOf(&["bridge", "network"]))])),
    ),
    (
        "domain/devices/interface/source",
        el(&[("bridge", Value::IfName), ("network", Value::Word)]),
    ),
    (
        "domain/devices/interface/mac",
        el(&[("address", Value::Mac)]),
    ),
    (
        "domain/devices/interface/model",
        el(&[("type", Value::Word)]),
    ),
    (
        "domain/devices/interface/link",
        el(&[("state", Value::OneOf(&["up", "down"]))]),
    ),
    ("domain/devices/interface/mtu", el(&[("size", Value::Uint)])),
    (
        "domain/devices/interface/driver",
        el(&[
            ("name", Value::OneOf(&["qemu", "vhost"])),
            ("queues", Value::Uint),
            ("txmode", Value::OneOf(&["iothread", "timer"])),
        ]),
    ),
    (
        "domain/devices/interface/boot",
        el(&[("order", Value::Uint)]),
    ),
    (
        "domain/devices/interface/rom",
        el(&[("bar", ON_OFF), ("enabled", YES_NO)]),
    ),
    ("domain/devices/interface/bandwidth", el(&[])),
    (
        "domain/devices/interface/bandwidth/inbound",
        el(&[
            ("average", Value::Uint),
            ("peak", Value::Uint),
            ("burst", Value::Uint),
            ("floor", Value::Uint),
        ]),
    ),
    (
        "domain/devices/interface/bandwidth/outbound",
        el(&[
            ("average", Value::Uint),
            ("peak", Value::Uint),
            ("burst", Value::Uint),
        ]),
    ),
    (
        "domain/devices/interface/virtualport",
        el(&[("type", Value::OneOf(&["openvswitch"]))]),
    ),
    (
        "domain/devices/interface/virtualport/parameters",
        el(&[("interfaceid", Value::Uuid), ("profileid", Value::Word)]),
    ),
    ("domain/devices/interface/vlan", el(&[("trunk", YES_NO)])),
    (
        "domain/devices/interface/vlan/tag",
        many(el(&[
            ("id", Value::Uint),
            ("nativeMode", Value::OneOf(&["tagged", "untagged"])),
        ])),
    ),
    (
        "domain/devices/serial",
        many(el(&[("type", Value::OneOf(&["pty"]))])),
    ),
    (
        "domain/devices/serial/target",
        el(&[
            (
                "type",
                Value::OneOf(&["isa-serial", "usb-serial", "pci-serial"]),
            ),
            ("port", Value::Uint),
        ]),
    ),
    (
        "domain/devices/serial/target/model",
        el(&[(
            "name",
            Value::OneOf(&["isa-serial", "usb-serial", "pci-serial"]),
        )]),
    ),
    (
        "domain/devices/console",
        many(el(&[("type", Value::OneOf(&["pty"]))])),
    ),
    (
        "domain/devices/console/target",
        el(&[
            ("type", Value::OneOf(&["serial", "virtio"])),
            ("port", Value::Uint),
        ]),
    ),
    (
        "domain/devices/graphics",
        many(el(&[
            ("type", Value::OneOf(&["vnc", "spice"])),
            ("port", Value::Int),
            ("tlsPort", Value::Int),
            ("autoport", YES_NO),
            ("listen", Value::Text),
            ("passwd", Value::Text),
            ("keymap", Value::Word),
            (
                "sharePolicy",
                Value::OneOf(&["allow-exclusive", "force-shared", "ignore"]),
            ),
            ("defaultMode", Value::OneOf(&["any", "secure", "insecure"])),
        ])),
    ),
    (
        "domain/devices/graphics/listen",
        many(el(&[
            ("type", Value::OneOf(&["address"])),
            ("address", Value::Text),
        ])),
    ),
    ("domain/devices/video", many(el(&[]))),
    (
        "domain/devices/video/model",
        el(&[
            (
                "type",
                Value::OneOf(&[
                    "vga", "cirrus", "vmvga", "qxl", "virtio", "bochs", "ramfb", "none",
                ]),
            ),
            ("vram", Value::Uint),
            ("vram64", Value::Uint),
            ("ram", Value::Uint),
            ("vgamem", Value::Uint),
            ("heads", Value::Uint),
            ("primary", YES_NO),
        ]),
    ),
    (
        "domain/devices/video/model/acceleration",
        el(&[("accel3d", YES_NO), ("accel2d", YES_NO)]),
    ),
    (
        "domain/devices/input",
        many(el(&[
            ("type", Value::OneOf(&["tablet", "mouse", "keyboard"])),
            ("bus", Value::OneOf(&["usb", "ps2", "virtio"])),
        ])),
    ),
    (
        "domain/devices/channel",
        many(el(&[("type", Value::OneOf(&["unix", "spicevmc"]))])),
    ),
    (
        "domain/devices/channel/source",
        el(&[("mode", Value::OneOf(&["bind"])), ("path", Value::Path)]),
    ),
    (
        "domain/devices/channel/target",
        el(&[
            ("type", Value::OneOf(&["virtio"])),
            (
                "name",
                Value::OneOf(&["org.qemu.guest_agent.0", "com.redhat.spice.0"]),
            ),
            ("state", Value::OneOf(&["connected", "disconnected"])),
        ]),
    ),
    (
        "domain/devices/rng",
        many(el(&[("model", Value::OneOf(&["virtio"]))])),
    ),
    (
        "domain/devices/rng/backend",
        leaf(
            &[("model", Value::OneOf(&["random"]))],
            Value::OneOf(&["/dev/urandom"]),
        ),
    ),
    (
        "domain/devices/rng/rate",
        el(&[("bytes", Value::Uint), ("period", Value::Uint)]),
    ),
    (
        "domain/devices/memballoon",
        el(&[
            ("model", Value::OneOf(&["virtio", "none"])),
            ("autodeflate", ON_OFF),
            ("freePageReporting", ON_OFF),
        ]),
    ),
    (
        "domain/devices/memballoon/stats",
        el(&[("period", Value::Uint)]),
    ),
    (
        "domain/devices/watchdog",
        el(&[
            ("model", Value::OneOf(&["i6300esb", "ib700", "itco"])),
            (
                "action",
                Value::OneOf(&[
                    "reset",
                    "shutdown",
                    "poweroff",
                    "pause",
                    "none",
                    "inject-nmi",
                ]),
            ),
        ]),
    ),
];

/// [`RULES`] by path, with the generated ones (addresses, aliases, I/O limits, Hyper-V flags).
pub(crate) static RULE_MAP: LazyLock<HashMap<String, Rule>> = LazyLock::new(|| {
    let mut map: HashMap<String, Rule> = RULES
        .iter()
        .map(|(path, rule)| (path.to_string(), *rule))
        .collect();
    for device in ADDRESSED {
        map.insert(format!("domain/devices/{device}/address"), el(ADDRESS));
        map.insert(
            format!("domain/devices/{device}/alias"),
            el(&[("name", Value::Alias)]),
        );
    }
    for limit in IOTUNE {
        map.insert(
            format!("domain/devices/disk/iotune/{limit}"),
            leaf(&[], Value::Uint),
        );
    }
    for flag in HYPERV_FLAGS {
        map.insert(
            format!("domain/features/hyperv/{flag}"),
            el(&[("state", ON_OFF)]),
        );
    }
    map
});

/// An element of the incoming domain: names from [`RULES`], values checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(&'static str, String)>,
    pub text: Option<String>,
    pub children: Vec<Element>,
}

impl Element {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    fn set_attr(&mut self, name: &'static str, value: &str) {
        match self.attrs.iter_mut().find(|(n, _)| *n == name) {
            Some(a) => a.1 = value.to_string(),
            None => self.attrs.push((name, value.to_string())),
        }
    }

    fn remove_attr(&mut self, name: &str) {
        self.attrs.retain(|(n, _)| *n != name);
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    fn children_mut<'s>(&'s mut self, name: &'s str) -> impl Iterator<Item = &'s mut Element> {
        self.children.iter_mut().filter(move |c| c.name == name)
    }
}

/// What this host decides about an incoming domain's references to it.
pub struct Policy<'a> {
    pub dirs: &'a StorageDirs,
    /// The address every graphics device listens on (`--graphics-listen`).
    pub graphics_listen: &'a str,
    /// The emulators this host's libvirt offers (its capabilities).
    pub emulators: &'a [String],
    /// Whether a bridge of this name exists here.
    pub bridge_exists: &'a dyn Fn(&str) -> bool,
    /// Whether a libvirt network of this name is active here.
    pub network_active: &'a dyn Fn(&str) -> bool,
}

impl std::fmt::Debug for Policy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("dirs", self.dirs)
            .field("graphics_listen", &self.graphics_listen)
            .field("emulators", &self.emulators)
            .finish_non_exhaustive()
    }
}

/// A disk the service is to create, or to adopt, at its resolved path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedDisk {
    pub disk: NewDisk,
    pub path: PathBuf,
    /// The file exists and the source asked for it to be adopted ([`NewDisk::adopt`]): it is
    /// checked ([`super::adopt`]) and used, never created nor deleted.
    pub adopt: bool,
}

/// A domain built from what this service allows, ready to be written out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedDomain {
    pub name: String,
    /// Its UUID, in lower case.
    pub uuid: String,
    pub new_disks: Vec<PlannedDisk>,
    root: Element,
}

/// Steps 1 and 2 of the module docs: the allowed domain for `xml`, with `disks` the disks the
/// source asks this host to create (each must be a file disk of the XML).
pub fn build(
    xml: &str,
    disks: &[NewDisk],
    policy: &Policy<'_>,
) -> Result<AllowedDomain, AllowError> {
    let doc = Document::parse(xml).map_err(AllowError::Xml)?;
    let root = doc.root_element();
    if root.tag_name().namespace().is_some() || root.tag_name().name() != "domain" {
        return Err(not_allowed(format!(
            "a root element <{}>, not <domain>",
            short(root.tag_name().name())
        )));
    }
    let mut domain = walk(root, "domain")?.ok_or_else(|| not_allowed("no <domain>"))?;
    let name = domain
        .child("name")
        .and_then(|n| n.text.clone())
        .ok_or_else(|| not_allowed("no <name>"))?;
    // The VM's identity, known before libvirt sees the domain: the service looks for the
    // same VM running here by it, and records it.
    let uuid = domain
        .child("uuid")
        .and_then(|u| u.text.as_deref())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| {
            not_allowed_because("a domain without <uuid>", "the VM's identity goes with it")
        })?;
    let new_disks = apply_disks(&mut domain, disks, policy.dirs)?;
    apply_os(&mut domain, policy.dirs)?;
    apply_devices(&mut domain, policy)?;
    Ok(AllowedDomain {
        name,
        uuid,
        new_disks,
        root: domain,
    })
}

/// The allowed element for `node` at `path` and everything allowed below it; `None` for an
/// element that is dropped (see the module docs).
fn walk(node: Node<'_, '_>, path: &str) -> Result<Option<Element>, AllowError> {
    let name = node.tag_name().name();
    if path == "domain/seclabel" {
        return dynamic_seclabel(node).map(|()| None);
    }
    if path == "domain/devices/disk/backingStore" {
        return Ok(None);
    }
    let rule = RULE_MAP
        .get(path)
        .ok_or_else(|| not_allowed(format!("element <{}> ({})", short(name), short(path))))?;
    let mut attrs = Vec::new();
    for attr in node.attributes() {
        let allowed = rule
            .attrs
            .iter()
            .find(|(n, _)| attr.namespace().is_none() && *n == attr.name());
        match allowed {
            Some((n, value)) if value.check(attr.value(), false) => {
                attrs.push((*n, attr.value().to_string()))
            }
            Some(_) => {
                return Err(not_allowed(format!(
                    "{}={:?} on <{name}> ({path})",
                    attr.name(),
                    short(attr.value())
                )));
            }
            None => {
                return Err(not_allowed(format!(
                    "attribute {} on <{name}> ({path})",
                    short(attr.name())
                )));
            }
        }
    }
    let mut element = Element {
        name: name.to_string(),
        attrs,
        text: None,
        children: Vec::new(),
    };
    match rule.text {
        Some(value) => element.text = Some(leaf_text(node, path, value)?),
        None => element.children = walk_children(node, path)?,
    }
    Ok(Some(element))
}

/// The text of an element that holds one: a single text node, or none (empty).
fn leaf_text(node: Node<'_, '_>, path: &str, value: Value) -> Result<String, AllowError> {
    let mut texts = Vec::new();
    for child in node.children() {
        match child.node_type() {
            NodeType::Text => texts.push(child.text().unwrap_or_default()),
            _ => {
                return Err(not_allowed_because(
                    format!(
                        "something other than text inside <{}> ({path})",
                        node.tag_name().name()
                    ),
                    "its value must be plain text, read the same by every XML parser",
                ));
            }
        }
    }
    let text = match texts.as_slice() {
        [] => "",
        [one] => one,
        _ => {
            return Err(not_allowed(format!(
                "split text inside <{}> ({path})",
                node.tag_name().name()
            )));
        }
    };
    if !value.check(text, true) {
        return Err(not_allowed(format!(
            "the value {:?} of <{}> ({path})",
            short(text),
            node.tag_name().name()
        )));
    }
    Ok(text.to_string())
}

/// The allowed children of a container element: elements (each on the list, and repeated only
/// where allowed), whitespace between them; comments are dropped.
fn walk_children(node: Node<'_, '_>, path: &str) -> Result<Vec<Element>, AllowError> {
    let mut children: Vec<Element> = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for child in node.children() {
        match child.node_type() {
            NodeType::Element => {}
            NodeType::Text if child.text().unwrap_or_default().trim().is_empty() => continue,
            NodeType::Comment => continue,
            _ => {
                return Err(not_allowed(format!(
                    "text or a processing instruction inside <{}> ({path}), between its elements",
                    node.tag_name().name()
                )));
            }
        }
        let name = child.tag_name().name();
        if path == "domain"
            && child.tag_name().namespace() == Some(QEMU_NS)
            && name == "commandline"
        {
            declared_monitor_only(child)?;
            continue;
        }
        if let Some(ns) = child.tag_name().namespace() {
            return Err(not_allowed(format!(
                "element <{}> of namespace {} (in {path})",
                short(name),
                short(ns)
            )));
        }
        let child_path = format!("{path}/{name}");
        let count = seen.entry(name).or_default();
        *count += 1;
        if *count > 1 && !RULE_MAP.get(&child_path).is_some_and(|r| r.repeat) {
            return Err(not_allowed(format!(
                "more than one <{}> in <{}> ({path})",
                short(name),
                node.tag_name().name()
            )));
        }
        if let Some(element) = walk(child, &child_path)? {
            children.push(element);
        }
    }
    Ok(children)
}

/// A `<seclabel>` that only asks for this host's default (dynamic, no label): dropped.
fn dynamic_seclabel(node: Node<'_, '_>) -> Result<(), AllowError> {
    let dynamic = node.attribute("type") == Some("dynamic")
        && node.attributes().all(|a| match a.name() {
            "type" => true,
            "relabel" => a.value() == "yes",
            "model" => Value::Word.check(a.value(), false),
            _ => false,
        })
        && node
            .children()
            .all(|c| c.is_text() && c.text().unwrap_or_default().trim().is_empty());
    if dynamic {
        Ok(())
    } else {
        Err(not_allowed_because(
            "a <seclabel> other than a dynamic one without a label (domain/seclabel)",
            "this host's security driver labels the domain",
        ))
    }
}

/// A `<qemu:commandline>` holding nothing but a declared QMP monitor (`-qmp` and
/// `unix:PATH,server=on,wait=off`), which the service replaces with its own; any other
/// argument, and any other element, is refused.
fn declared_monitor_only(node: Node<'_, '_>) -> Result<(), AllowError> {
    if node.attributes().next().is_some() {
        return Err(not_allowed("an attribute on <qemu:commandline>"));
    }
    let mut args = Vec::new();
    for child in node.children() {
        match child.node_type() {
            NodeType::Text if child.text().unwrap_or_default().trim().is_empty() => {}
            NodeType::Comment => {}
            NodeType::Element
                if child.tag_name().namespace() == Some(QEMU_NS)
                    && child.tag_name().name() == "arg"
                    && child.attributes().count() == 1
                    && child.children().next().is_none() =>
            {
                match child.attribute("value") {
                    Some(v) => args.push(v),
                    None => return Err(not_allowed("a <qemu:arg> without a value")),
                }
            }
            _ => {
                return Err(not_allowed(format!(
                    "<{}> inside <qemu:commandline>",
                    short(child.tag_name().name())
                )));
            }
        }
    }
    match args.as_slice() {
        [] => Ok(()),
        ["-qmp", spec] if is_plain_monitor(spec) => Ok(()),
        // What a service leaves on a domain it brought in (`render`): libvirt keeps a running
        // domain's arguments, so the next migration of that VM carries them here. Both are
        // replaced by this service's own.
        ["-qmp", spec, "-incoming", "defer"] if is_plain_monitor(spec) => Ok(()),
        [first, ..] if *first != "-qmp" => Err(not_allowed_because(
            format!("the QEMU argument {:?} in <qemu:commandline>", short(first)),
            "this service adds its own QMP monitor and -incoming, and nothing else",
        )),
        _ => Err(not_allowed_because(
            format!(
                "the QEMU argument list {:?} in <qemu:commandline>",
                args.iter().map(|a| short(a)).collect::<Vec<_>>()
            ),
            "only one declared QMP monitor (-qmp unix:PATH,server=on,wait=off) is taken, and \
             replaced by the service's own",
        )),
    }
}

/// `unix:PATH,server=on,wait=off` (or the older `server,nowait`), nothing more.
fn is_plain_monitor(spec: &str) -> bool {
    let Some(rest) = spec.strip_prefix("unix:") else {
        return false;
    };
    // Options follow the last unescaped comma-separated path; QEMU writes a comma in the
    // path as `,,`, so split on single commas only.
    let mut opts = Vec::new();
    let mut current = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                opts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    opts.push(current);
    let Some((path, options)) = opts.split_first() else {
        return false;
    };
    !path.is_empty()
        && options.iter().all(|o| {
            matches!(
                o.as_str(),
                "server" | "server=on" | "server=yes" | "wait=off" | "wait=no" | "nowait"
            )
        })
}

/// Disks: those the source asks for are created inside a storage directory, the others must
/// be existing files inside a shared directory; each `<source file>` becomes the resolved path.
fn apply_disks(
    domain: &mut Element,
    disks: &[NewDisk],
    dirs: &StorageDirs,
) -> Result<Vec<PlannedDisk>, AllowError> {
    check_new_disks(disks)?;
    let Some(devices) = domain.child_mut("devices") else {
        return match disks.first() {
            Some(d) => Err(not_allowed(format!(
                "no <devices>, so no disk {}",
                short(&d.target)
            ))),
            None => Ok(Vec::new()),
        };
    };
    let in_xml: Vec<&str> = devices
        .children
        .iter()
        .filter(|c| c.name == "disk")
        .filter_map(|d| d.child("target").and_then(|t| t.attr("dev")))
        .collect();
    if let Some(missing) = disks.iter().find(|d| !in_xml.contains(&d.target.as_str())) {
        return Err(not_allowed_because(
            format!("a disk {} to create", short(&missing.target)),
            format!(
                "the domain XML has no such file disk (it has: {})",
                in_xml.join(", ")
            ),
        ));
    }
    let mut planned = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    let mut paths: Vec<PathBuf> = Vec::new();
    for element in devices.children_mut("disk") {
        let target = element
            .child("target")
            .and_then(|t| t.attr("dev"))
            .ok_or_else(|| not_allowed("a <disk> without <target dev=...>"))?
            .to_string();
        if targets.contains(&target) {
            return Err(not_allowed(format!("two disks with target {target}")));
        }
        targets.push(target.clone());
        let new = disks.iter().find(|d| d.target == target);
        let Some((resolved, made)) = place_disk(element, &target, new, dirs)? else {
            continue;
        };
        if paths.contains(&resolved) {
            return Err(not_allowed(format!(
                "two disks on one file {}",
                resolved.display()
            )));
        }
        paths.push(resolved);
        planned.extend(made);
    }
    Ok(planned)
}

/// The disks the source asks to be created: each named once, raw or qcow2 (over a raw or
/// qcow2 template), of a size above 0.
fn check_new_disks(disks: &[NewDisk]) -> Result<(), AllowError> {
    for (i, disk) in disks.iter().enumerate() {
        if disks[..i].iter().any(|d| d.target == disk.target) {
            return Err(not_allowed(format!(
                "disk {} asked for twice",
                short(&disk.target)
            )));
        }
        let formats = ["raw", "qcow2"];
        let backing_ok = disk
            .backing
            .as_ref()
            .is_none_or(|b| formats.contains(&b.format.as_str()));
        if !formats.contains(&disk.format.as_str()) || !backing_ok || disk.size == 0 {
            return Err(not_allowed_because(
                format!(
                    "disk {} to be created as {:?} of {} bytes",
                    short(&disk.target),
                    short(&disk.format),
                    disk.size
                ),
                "only raw and qcow2 images, over raw or qcow2 templates, of a size above 0",
            ));
        }
    }
    Ok(())
}

/// One `<disk>` of target `target`: its `<source file>` resolved (inside a storage directory
/// when the source asks for it as `new`, else an existing file inside a shared directory) and
/// rewritten; the resolved path and the disk to create, or `None` for a disk with no file.
fn place_disk(
    element: &mut Element,
    target: &str,
    new: Option<&NewDisk>,
    dirs: &StorageDirs,
) -> Result<Option<(PathBuf, Option<PlannedDisk>)>, AllowError> {
    let format = element
        .child("driver")
        .and_then(|d| d.attr("type"))
        .map(str::to_string);
    let file = element
        .child_mut("source")
        .and_then(|source| source.attr("file").map(PathBuf::from));
    let Some(file) = file else {
        return match new {
            Some(_) => Err(not_allowed(format!(
                "no file for disk {target}; nothing to create"
            ))),
            None => Ok(None),
        };
    };
    let disk_error = |source| AllowError::Disk {
        target: target.to_string(),
        source,
    };
    let (resolved, made) = match new {
        Some(new) => {
            if format.as_ref().is_some_and(|f| *f != new.format) {
                return Err(not_allowed(format!(
                    "disk {target} to be created as {} but opened as {}",
                    new.format,
                    format.unwrap_or_default()
                )));
            }
            // A path that exists is adopted when asked for (a volume CloudStack made), else
            // refused as before; either way it lies in a storage directory.
            let adopt = new.adopt && std::fs::symlink_metadata(&file).is_ok();
            let path = if adopt {
                dirs.existing_file(&file, Place::Storage)
            } else {
                dirs.new_disk(&file)
            }
            .map_err(disk_error)?;
            let made = PlannedDisk {
                disk: new.clone(),
                path: path.clone(),
                adopt,
            };
            (path, Some(made))
        }
        None => (
            dirs.existing_file(&file, Place::Shared)
                .map_err(disk_error)?,
            None,
        ),
    };
    if let Some(source) = element.child_mut("source") {
        source.set_attr("file", &resolved.to_string_lossy());
    }
    Ok(Some((resolved, made)))
}

/// Kernel, initrd and loader files must lie in a boot directory.
fn apply_os(domain: &mut Element, dirs: &StorageDirs) -> Result<(), AllowError> {
    let Some(os) = domain.child_mut("os") else {
        return Ok(());
    };
    for what in ["kernel", "initrd", "loader"] {
        if let Some(element) = os.child_mut(what) {
            let path = PathBuf::from(element.text.clone().unwrap_or_default());
            let resolved =
                dirs.existing_file(&path, Place::Boot)
                    .map_err(|source| AllowError::File {
                        what: format!("<{what}> file"),
                        source,
                    })?;
            element.text = Some(resolved.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// The emulator, interfaces, graphics and channels, against this host.
fn apply_devices(domain: &mut Element, policy: &Policy<'_>) -> Result<(), AllowError> {
    let Some(devices) = domain.child_mut("devices") else {
        return Ok(());
    };
    check_emulator(devices, policy.emulators)?;
    for interface in devices.children.iter().filter(|c| c.name == "interface") {
        check_interface(interface, policy)?;
    }
    for graphics in devices.children_mut("graphics") {
        listen_here(graphics, policy.graphics_listen);
    }
    for channel in devices.children_mut("channel") {
        apply_channel(channel)?;
    }
    for rng in devices.children.iter().filter(|c| c.name == "rng") {
        if rng.child("backend").is_none() {
            return Err(not_allowed("an <rng> without a /dev/urandom backend"));
        }
    }
    Ok(())
}

/// The `<emulator>`, if named, must be one this host's libvirt offers.
fn check_emulator(devices: &Element, emulators: &[String]) -> Result<(), AllowError> {
    if let Some(emulator) = devices.child("emulator").and_then(|e| e.text.as_deref())
        && !emulators.iter().any(|e| e == emulator)
    {
        return Err(not_allowed_because(
            format!("the emulator {:?}", short(emulator)),
            format!(
                "this host's libvirt offers {}",
                if emulators.is_empty() {
                    "none".to_string()
                } else {
                    emulators.join(", ")
                }
            ),
        ));
    }
    Ok(())
}

/// An `<interface>` is on a bridge that exists here or on a libvirt network active here.
fn check_interface(interface: &Element, policy: &Policy<'_>) -> Result<(), AllowError> {
    let kind = interface.attr("type").unwrap_or_default().to_string();
    let source = interface.child("source");
    match kind.as_str() {
        "bridge" => {
            let bridge = source
                .and_then(|s| s.attr("bridge"))
                .ok_or_else(|| not_allowed("an <interface type='bridge'> without a bridge"))?;
            if source.is_some_and(|s| s.attr("network").is_some()) {
                return Err(not_allowed("an interface with both a bridge and a network"));
            }
            if !(policy.bridge_exists)(bridge) {
                return Err(not_allowed_because(
                    format!("an interface on bridge {bridge}"),
                    "no such bridge exists here",
                ));
            }
        }
        _ => {
            let network = source
                .and_then(|s| s.attr("network"))
                .ok_or_else(|| not_allowed("an <interface type='network'> without a network"))?;
            if source.is_some_and(|s| s.attr("bridge").is_some())
                || interface.child("virtualport").is_some()
            {
                return Err(not_allowed(
                    "an <interface type='network'> with a bridge or a virtual port",
                ));
            }
            if !(policy.network_active)(network) {
                return Err(not_allowed_because(
                    format!("an interface on libvirt network {network}"),
                    "no such network is active here",
                ));
            }
        }
    }
    Ok(())
}

/// `<graphics>` listen where this host says, on ports libvirt picks.
fn listen_here(graphics: &mut Element, address: &str) {
    graphics.remove_attr("port");
    graphics.remove_attr("tlsPort");
    graphics.set_attr("autoport", "yes");
    graphics.set_attr("listen", address);
    graphics.children.retain(|c| c.name != "listen");
    graphics.children.push(Element {
        name: "listen".into(),
        attrs: vec![("type", "address".into()), ("address", address.into())],
        text: None,
        children: Vec::new(),
    });
}

/// A `<channel>` is the guest agent's unix channel (its socket where libvirt chooses) or
/// SPICE's.
fn apply_channel(channel: &mut Element) -> Result<(), AllowError> {
    let kind = channel.attr("type").unwrap_or_default().to_string();
    let target = channel
        .child("target")
        .and_then(|t| t.attr("name"))
        .unwrap_or_default()
        .to_string();
    match (kind.as_str(), target.as_str()) {
        ("unix", "org.qemu.guest_agent.0") => {
            // libvirt chooses the socket's path in its own directory.
            channel.children.retain(|c| c.name != "source");
            channel.children.insert(
                0,
                Element {
                    name: "source".into(),
                    attrs: vec![("mode", "bind".into())],
                    text: None,
                    children: Vec::new(),
                },
            );
            Ok(())
        }
        ("spicevmc", "com.redhat.spice.0") if channel.child("source").is_none() => Ok(()),
        _ => Err(not_allowed_because(
            format!("a <channel type={kind:?}> named {target:?}"),
            "only the guest agent's unix channel (org.qemu.guest_agent.0) and SPICE's \
             (com.redhat.spice.0) are",
        )),
    }
}

impl AllowedDomain {
    /// Step 3 of the module docs: the document libvirt gets, with the service's QMP monitor at
    /// `monitor` and `-incoming defer`.
    pub fn render(&self, monitor: &Path) -> String {
        let mut out = String::with_capacity(8192);
        out.push_str("<domain");
        for (name, value) in &self.root.attrs {
            push_attr(&mut out, name, value);
        }
        push_attr(&mut out, "xmlns:qemu", QEMU_NS);
        out.push_str(">\n");
        for child in &self.root.children {
            render(&mut out, child, 1);
        }
        let spec = format!(
            "unix:{},server=on,wait=off",
            monitor.to_string_lossy().replace(',', ",,")
        );
        out.push_str("  <qemu:commandline>\n");
        for arg in ["-qmp", spec.as_str(), "-incoming", "defer"] {
            out.push_str("    <qemu:arg");
            push_attr(&mut out, "value", arg);
            out.push_str("/>\n");
        }
        out.push_str("  </qemu:commandline>\n</domain>\n");
        out
    }
}

/// Writes `e` and what it holds, indented by `depth`.
fn render(out: &mut String, e: &Element, depth: usize) {
    let indent = "  ".repeat(depth);
    out.push_str(&indent);
    out.push('<');
    out.push_str(&e.name);
    for (name, value) in &e.attrs {
        push_attr(out, name, value);
    }
    match (&e.text, e.children.is_empty()) {
        (Some(text), _) => {
            out.push('>');
            out.push_str(&crate::libvirt::xml::escape(text));
            out.push_str(&format!("</{}>\n", e.name));
        }
        (None, true) => out.push_str("/>\n"),
        (None, false) => {
            out.push_str(">\n");
            for child in &e.children {
                render(out, child, depth + 1);
            }
            out.push_str(&format!("{indent}</{}>\n", e.name));
        }
    }
}

fn push_attr(out: &mut String, name: &str, value: &str) {
    out.push(' ');
    out.push_str(name);
    out.push_str("='");
    out.push_str(&crate::libvirt::xml::escape(value));
    out.push('\'');
}

/// At most 64 characters of a peer's text, for an error message.
fn short(s: &str) -> String {
    if s.chars().count() <= 64 {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(64).collect::<String>())
    }
}

#[cfg(test)]
mod tests;
