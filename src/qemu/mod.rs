//! Typed QMP commands and replies, written against QEMU 7.2's schema.
//!
//! Replies are decoded tolerantly: unknown members are ignored, enums carry an `Unknown`
//! variant, and members newer QEMUs added are optional. (The `qapi` crate's types are generated
//! from QEMU 9.1 and fail on 7.2 replies, which is why these exist.) Arguments serialise to
//! exactly what 7.2 accepts.
//!
//! The migration code builds every command through this module and never writes raw JSON.

mod block;
mod migrate;
mod object;
#[cfg(test)]
mod replies;

pub use block::*;
pub use migrate::*;
pub use object::*;

use serde::{Deserialize, Serialize};

use crate::qmp::Command;

/// Declares a command with no arguments.
macro_rules! no_args_command {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $out:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, serde::Serialize)]
        pub struct $ty;
        impl $crate::qmp::Command for $ty {
            const NAME: &'static str = $name;
            type Output = $out;
        }
    };
}
pub(crate) use no_args_command;

/// A `{}` reply, accepting anything.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Empty {}

no_args_command!(
    /// The VM's run state.
    QueryStatus,
    "query-status",
    StatusInfo
);
no_args_command!(
    /// Resume guest CPUs.
    Cont,
    "cont",
    Empty
);
no_args_command!(
    /// Pause guest CPUs.
    Stop,
    "stop",
    Empty
);
no_args_command!(
    /// Ask QEMU to exit.
    Quit,
    "quit",
    Empty
);
no_args_command!(
    /// Whether KVM is present and in use.
    QueryKvm,
    "query-kvm",
    KvmInfo
);

no_args_command!(
    /// The host thread of each vCPU.
    QueryCpusFast,
    "query-cpus-fast",
    Vec<CpuInfoFast>
);

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    pub cpu_index: u32,
    /// The vCPU's thread id, in QEMU's PID namespace.
    pub thread_id: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU's RunState (`running`, `paused`, `inmigrate`, `postmigrate`, `finish-migrate`, ...).
    pub status: String,
}

impl StatusInfo {
    /// Waiting for an incoming migration (`-incoming defer` or `-incoming URI`).
    pub fn is_incoming(&self) -> bool {
        self.status == "inmigrate"
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// `qom-list`: the children of a QOM path (the tool uses `/objects` to find what it added).
#[derive(Debug, Clone, Serialize)]
pub struct QomList {
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Output = Vec<QomProperty>;
}

#[derive(Debug, Clone, Deserialize)]
pub struct QomProperty {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// An HMP command through QMP (`human-monitor-command`), for the few things only HMP does,
/// such as `qemu-io` in tests.
#[derive(Debug, Clone, Serialize)]
pub struct HumanMonitorCommand {
    #[serde(rename = "command-line")]
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Output = String;
}

no_args_command!(
    /// The QEMU version (the same as the greeting's, asked again where the greeting was
    /// not QEMU's own, e.g. through libvirt).
    QueryVersion,
    "query-version",
    VersionInfo
);
no_args_command!(
    /// The machine types this QEMU binary can run (and so load a migration of).
    QueryMachines,
    "query-machines",
    Vec<MachineInfo>
);

/// `query-version`'s reply.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub qemu: crate::qmp::QemuVersion,
    #[serde(default)]
    pub package: String,
}

/// One entry of `query-machines` (7.2 and 10.0 have more members; only these are used).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct MachineInfo {
    /// A versioned type (`pc-q35-7.2`).
    pub name: String,
    /// `q35` or `pc` on the newest type of its family.
    #[serde(default)]
    pub alias: Option<String>,
}

/// `qom-get`: one property of a QOM object, as JSON (the type depends on the property).
#[derive(Debug, Clone, Serialize)]
pub struct QomGet {
    pub path: String,
    pub property: String,
}

impl Command for QomGet {
    const NAME: &'static str = "qom-get";
    type Output = serde_json::Value;
}

impl QomGet {
    /// The running machine's QOM type: `pc-q35-7.2-machine` (the versioned type's name with
    /// `-machine`; an alias such as `q35` is already resolved).
    pub fn machine_type() -> QomGet {
        QomGet {
            path: "/machine".into(),
            property: "type".into(),
        }
    }
}

/// The machine type name from its QOM type name (`pc-q35-7.2-machine` -> `pc-q35-7.2`).
pub fn machine_name_from_qom_type(qom_type: &str) -> &str {
    qom_type.strip_suffix("-machine").unwrap_or(qom_type)
}
