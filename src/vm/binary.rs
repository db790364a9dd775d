//! Which QEMU binary a VM runs, and its version: options that changed between the versions the
//! tool supports are chosen from it (QEMU 9.1 replaced `-runas USER` with `-run-with user=USER`;
//! 10.0 removed `-runas`).
//!
//! The binary is [`VmConfig::qemu`](super::VmConfig::qemu) when set, else `QTM_QEMU`, else
//! `qemu-system-x86_64` on `PATH`. Its `-version` is asked once per binary and process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{DEFAULT_QEMU, VmError};
use crate::qmp::QemuVersion;

/// The binary for a VM whose configuration names `configured` (or none).
pub fn resolve(configured: Option<&Path>) -> PathBuf {
    match configured {
        Some(path) => path.to_path_buf(),
        None => std::env::var_os("QTM_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU)),
    }
}

static VERSIONS: Mutex<Option<HashMap<PathBuf, QemuVersion>>> = Mutex::new(None);

/// `binary -version`, parsed; asked once per binary.
pub fn version(binary: &Path) -> Result<QemuVersion, VmError> {
    if let Some(v) = cached(binary) {
        return Ok(v);
    }
    let out = std::process::Command::new(binary)
        .arg("-version")
        .output()
        .map_err(|source| VmError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    let version = QemuVersion::from_version_output(first)
        .filter(|_| out.status.success())
        .ok_or_else(|| VmError::Version {
            binary: binary.to_path_buf(),
            output: format!("{} {}", first, String::from_utf8_lossy(&out.stderr).trim()),
        })?;
    if let Ok(mut map) = VERSIONS.lock() {
        map.get_or_insert_with(HashMap::new)
            .insert(binary.to_path_buf(), version);
    }
    Ok(version)
}

fn cached(binary: &Path) -> Option<QemuVersion> {
    VERSIONS.lock().ok()?.as_ref()?.get(binary).copied()
}

/// The options that make QEMU `version` drop its privileges to `user` after start-up.
pub fn run_as_args(version: QemuVersion, user: &str) -> [String; 2] {
    if version.at_least(9, 1) {
        ["-run-with".into(), format!("user={user}")]
    } else {
        ["-runas".into(), user.into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_both_packages() {
        let v72 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";
        let v10 = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";
        assert_eq!(
            QemuVersion::from_version_output(v72),
            Some(QemuVersion::new(7, 2, 22))
        );
        assert_eq!(
            QemuVersion::from_version_output(v10),
            Some(QemuVersion::new(10, 0, 2))
        );
        assert_eq!(QemuVersion::from_version_output("something else"), None);
    }

    #[test]
    fn privileges_drop_with_runas_before_9_1_and_run_with_after() {
        assert_eq!(
            run_as_args(QemuVersion::new(7, 2, 22), "nobody"),
            ["-runas".to_string(), "nobody".into()]
        );
        assert_eq!(
            run_as_args(QemuVersion::new(9, 1, 0), "nobody"),
            ["-run-with".to_string(), "user=nobody".into()]
        );
        assert_eq!(
            run_as_args(QemuVersion::new(10, 0, 2), "nobody")[1],
            "user=nobody"
        );
    }
}
