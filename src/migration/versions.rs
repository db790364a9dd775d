//! The two QEMUs' versions and machine types: what the report says about them, the warning for
//! a pair this tool was not tested with, and the check that the destination can load the
//! source's machine type at all.
//!
//! A newer QEMU loads an older machine type (`pc-q35-7.2` on 10.0), never the reverse: a 7.2
//! destination has no `pc-q35-10.0`, and a migration of such a guest would fail only once RAM
//! is on the wire. The destination's `query-machines` says beforehand, so the preflight
//! refuses it. A version outside [`TESTED_QEMU`] is never refused for that alone.

use serde::Serialize;

use super::MigrationError;
use super::side::SideCtl;
use crate::qemu::{MachineInfo, QomGet, QueryMachines, machine_name_from_qom_type};
use crate::qmp::QemuVersion;

/// The QEMU release series (major, minor) this tool is tested with, each and across each
/// other (scripts/test.sh runs the suite on both and migrates between them).
pub const TESTED_QEMU: &[(u32, u32)] = &[(7, 2), (10, 0)];

/// The versions of the two QEMUs of a migration, for its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QemuVersions {
    pub source: QemuVersion,
    pub destination: QemuVersion,
}

fn tested(v: QemuVersion) -> bool {
    TESTED_QEMU
        .iter()
        .any(|&(major, minor)| (v.major, v.minor) == (major, minor))
}

/// The tested series in words: `7.2 and 10.0`.
fn tested_list() -> String {
    let names: Vec<String> = TESTED_QEMU
        .iter()
        .map(|(a, b)| format!("{a}.{b}"))
        .collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

impl QemuVersions {
    /// A warning when either end runs a QEMU series outside [`TESTED_QEMU`].
    pub fn untested_warning(&self) -> Option<String> {
        let mut odd = Vec::new();
        if !tested(self.source) {
            odd.push(format!("the source runs QEMU {}", self.source));
        }
        if !tested(self.destination) {
            odd.push(format!("the destination runs QEMU {}", self.destination));
        }
        if odd.is_empty() {
            return None;
        }
        Some(format!(
            "{}: this tool was tested with QEMU {} (each, and between them); the migration goes \
             ahead",
            odd.join(" and "),
            tested_list()
        ))
    }
}

/// The running machine type of a QEMU (`pc-q35-7.2`), or `None` when it cannot be asked (a
/// QEMU without the QOM property; the check that needs it is then skipped).
pub(crate) async fn current_machine(ctl: &SideCtl) -> Option<String> {
    match ctl
        .call("qom-get /machine type", &QomGet::machine_type())
        .await
    {
        Ok(v) => v
            .as_str()
            .map(|t| machine_name_from_qom_type(t).to_string()),
        Err(e) => {
            tracing::info!("cannot ask the machine type (the check is skipped): {e}");
            None
        }
    }
}

/// Checks that a destination running QEMU `version`, whose `query-machines` is `machines` and
/// whose own machine type is `current`, can load a guest of machine type `wanted`.
pub(crate) fn check_machine(
    wanted: &str,
    machines: &[MachineInfo],
    current: Option<&str>,
    version: QemuVersion,
) -> Result<(), MigrationError> {
    let known = machines
        .iter()
        .any(|m| m.name == wanted || m.alias.as_deref() == Some(wanted));
    if !known {
        return Err(MigrationError::MachineTypeUnsupported {
            machine: wanted.to_string(),
            dest_qemu: version.to_string(),
        });
    }
    match current {
        Some(current) if current != wanted => Err(MigrationError::MachineTypeMismatch {
            machine: wanted.to_string(),
            dest_machine: current.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The destination side of [`check_machine`], asked over `ctl`.
pub(crate) async fn check_destination_machine(
    ctl: &SideCtl,
    wanted: &str,
) -> Result<(), MigrationError> {
    let machines = ctl.call("query-machines", &QueryMachines).await?;
    let current = current_machine(ctl).await;
    check_machine(
        wanted,
        &machines,
        current.as_deref(),
        ctl.qmp.greeting().version.qemu,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion::new(major, minor, micro)
    }

    /// Trimmed from real `query-machines` replies: 7.2 knows no 10.0 types.
    fn machines_7_2() -> Vec<MachineInfo> {
        serde_json::from_value(json!([
            {"hotpluggable-cpus": true, "name": "pc-q35-7.2", "numa-mem-supported": false,
             "default-cpu-type": "qemu64-x86_64-cpu", "cpu-max": 288, "deprecated": false,
             "default-ram-id": "pc.ram", "alias": "q35"},
            {"hotpluggable-cpus": true, "name": "pc-i440fx-7.2", "numa-mem-supported": false,
             "default-cpu-type": "qemu64-x86_64-cpu", "cpu-max": 255, "deprecated": false,
             "default-ram-id": "pc.ram", "alias": "pc", "is-default": true}
        ]))
        .expect("7.2 query-machines")
    }

    fn machines_10_0() -> Vec<MachineInfo> {
        serde_json::from_value(json!([
            {"hotpluggable-cpus": true, "name": "pc-q35-10.0", "numa-mem-supported": false,
             "default-cpu-type": "qemu64-x86_64-cpu", "acpi": true, "cpu-max": 4096,
             "deprecated": false, "default-ram-id": "pc.ram", "alias": "q35"},
            {"hotpluggable-cpus": true, "name": "pc-q35-7.2", "numa-mem-supported": false,
             "default-cpu-type": "qemu64-x86_64-cpu", "acpi": true, "cpu-max": 288,
             "deprecated": false, "default-ram-id": "pc.ram"}
        ]))
        .expect("10.0 query-machines")
    }

    #[test]
    fn a_10_0_machine_type_is_refused_by_a_7_2_destination_naming_both() {
        let err = check_machine(
            "pc-q35-10.0",
            &machines_7_2(),
            Some("pc-q35-7.2"),
            v(7, 2, 22),
        )
        .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("pc-q35-10.0") && text.contains("7.2.22"),
            "{text}"
        );
    }

    #[test]
    fn a_7_2_machine_type_goes_to_a_10_0_destination_running_it() {
        check_machine(
            "pc-q35-7.2",
            &machines_10_0(),
            Some("pc-q35-7.2"),
            v(10, 0, 2),
        )
        .expect("accepted");
    }

    #[test]
    fn a_destination_running_another_machine_type_is_refused() {
        let err = check_machine(
            "pc-q35-7.2",
            &machines_10_0(),
            Some("pc-q35-10.0"),
            v(10, 0, 2),
        )
        .expect_err("refused");
        assert!(err.to_string().contains("pc-q35-10.0"), "{err}");
    }

    #[test]
    fn qom_machine_types_lose_their_suffix() {
        assert_eq!(
            machine_name_from_qom_type("pc-q35-7.2-machine"),
            "pc-q35-7.2"
        );
        assert_eq!(
            machine_name_from_qom_type("pc-i440fx-10.0-machine"),
            "pc-i440fx-10.0"
        );
    }

    #[test]
    fn only_untested_series_get_a_warning_naming_the_tested_ones() {
        let pair = |s, d| QemuVersions {
            source: s,
            destination: d,
        };
        assert_eq!(pair(v(7, 2, 22), v(10, 0, 2)).untested_warning(), None);
        assert_eq!(pair(v(10, 0, 5), v(7, 2, 0)).untested_warning(), None);
        let w = pair(v(7, 2, 22), v(9, 2, 0))
            .untested_warning()
            .expect("warning");
        assert!(w.contains("destination runs QEMU 9.2.0"), "{w}");
        assert!(w.contains("7.2 and 10.0"), "{w}");
        assert!(!w.contains("source runs"), "{w}");
    }
}
