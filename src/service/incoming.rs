//! An incoming libvirt domain, made by the service (`serve --libvirt`) for a source:
//!
//! 1. refuse a domain of the same name already running here (a VM must never run twice);
//! 2. refuse a disk file that already exists (never overwrite); create each disk to be copied
//!    empty, with the source's format and virtual size, at the XML's path;
//! 3. point the XML's QMP monitor into the service's `--qmp-dir` and add `-incoming defer`;
//! 4. start it paused (`virsh create --paused`): libvirt then shows it `paused`, QEMU waits.
//!
//! [`IncomingDomain::remove`] undoes it all (destroy the domain, delete the disks it created);
//! after a finished migration the domain is kept, running, and the disks with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::libvirt::{DomainXml, Libvirt, LibvirtError};
use crate::migration::{MigrationError, libvirt_call};
use crate::peer::NewDisk;

/// How long libvirt may take to answer (it runs QEMU's start-up inside `create`).
const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(60);

/// A domain this service started for a source, and the disks it created for it.
#[derive(Debug)]
pub struct IncomingDomain {
    uri: String,
    name: String,
    created_disks: Vec<PathBuf>,
    /// The QMP socket's file name in the service's directory.
    pub qmp: String,
}

impl IncomingDomain {
    /// Steps 1-4 of the module docs; on failure nothing is left behind.
    pub async fn start(
        uri: &str,
        qmp_dir: &Path,
        xml: &str,
        disks: &[NewDisk],
    ) -> Result<IncomingDomain, MigrationError> {
        let (uri, qmp_dir, xml, disks) = (
            uri.to_string(),
            qmp_dir.to_path_buf(),
            xml.to_string(),
            disks.to_vec(),
        );
        libvirt_call(LIBVIRT_TIMEOUT, move || {
            start_blocking(&uri, &qmp_dir, &xml, &disks)
        })
        .await
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Destroys the domain (if it still runs) and deletes the disks this service created.
    /// Only for a domain that never ran the guest: the caller checks.
    pub async fn remove(self) -> Vec<String> {
        let IncomingDomain {
            uri,
            name,
            created_disks,
            ..
        } = self;
        let result = libvirt_call(LIBVIRT_TIMEOUT, move || {
            let mut problems = Vec::new();
            let destroyed = Libvirt::connect(&uri)
                .and_then(|l| l.domain(&name))
                .and_then(|d| match d.is_active() {
                    Ok(true) => d.destroy(),
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                });
            match destroyed {
                Ok(()) | Err(LibvirtError::NoSuchDomain { .. }) => {}
                Err(e) => problems.push(format!("destination: destroy {name}: {e}")),
            }
            problems.extend(delete_all(&created_disks));
            tracing::info!(domain = %name, "incoming domain removed");
            Ok(problems)
        })
        .await;
        result.unwrap_or_else(|e| vec![e.to_string()])
    }
}

fn start_blocking(
    uri: &str,
    qmp_dir: &Path,
    xml: &str,
    disks: &[NewDisk],
) -> Result<IncomingDomain, MigrationError> {
    let bad = |desc: String| MigrationError::BadRequest { desc };
    let parsed = DomainXml::parse(xml)?;
    let name = parsed.name()?;
    let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
    if !plain {
        return Err(bad(format!("{name:?} is not a usable domain name")));
    }
    let libvirt = Libvirt::connect(uri)?;
    match libvirt.domain(&name) {
        Ok(d) if d.is_active()? => return Err(MigrationError::DomainExists { name }),
        Ok(_) | Err(LibvirtError::NoSuchDomain { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // The same VM under another name is the same VM running twice.
    if let Some(uuid) = parsed.uuid()?
        && let Some(d) = libvirt.domain_by_uuid(&uuid)?
        && d.is_active()?
    {
        return Err(MigrationError::DomainExists {
            name: format!("{} (with the same UUID {uuid})", d.name()),
        });
    }
    // Every path first, so nothing is created when one is refused.
    let xml_disks = parsed.disks()?;
    let mut planned = Vec::new();
    for disk in disks {
        let path = xml_disks
            .iter()
            .find(|d| d.target == disk.target)
            .and_then(|d| d.file.clone())
            .ok_or_else(|| {
                bad(format!(
                    "the domain XML has no file disk {}; nothing to create",
                    disk.target
                ))
            })?;
        if std::fs::symlink_metadata(&path).is_ok() {
            return Err(MigrationError::DestDiskUnusable {
                node: disk.target.clone(),
                reason: format!(
                    "{} exists on the destination host and is never overwritten; remove it, or \
                     give the destination another path (--dest-xml)",
                    path.display()
                ),
            });
        }
        planned.push((disk, path));
    }
    let mut created = Vec::new();
    let made = (|| {
        for (disk, path) in &planned {
            create_image(path, disk)?;
            created.push(path.clone());
        }
        let qmp = format!("{name}.sock");
        let edited = parsed
            .with_monitor(&qmp_dir.join(&qmp))?
            .with_qemu_args(&["-incoming", "defer"])?;
        libvirt.create_paused(&edited)?;
        Ok(qmp)
    })();
    match made {
        Ok(qmp) => {
            tracing::info!(domain = %name, disks = created.len(), "incoming domain started paused");
            Ok(IncomingDomain {
                uri: uri.to_string(),
                name,
                created_disks: created,
                qmp,
            })
        }
        Err(e) => {
            for p in delete_all(&created) {
                tracing::warn!("{p}");
            }
            Err(e)
        }
    }
}

/// An empty image at `path` (`qemu-img create`), an overlay when `disk` names a backing file.
fn create_image(path: &Path, disk: &NewDisk) -> Result<(), MigrationError> {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", &disk.format]);
    if let Some(backing) = &disk.backing {
        let backing_path = backing_path(path, &backing.file_name).map_err(|reason| {
            MigrationError::BackingMismatch {
                node: disk.target.clone(),
                reason,
            }
        })?;
        tracing::info!(disk = %path.display(), backing = %backing_path.display(), "creating an overlay");
        cmd.args(["-F", &backing.format, "-b"]).arg(backing_path);
    }
    let out = cmd
        .arg(path)
        .arg(disk.size.to_string())
        .output()
        .map_err(|e| MigrationError::Failed {
            desc: format!("cannot run qemu-img to create {}: {e}", path.display()),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MigrationError::DestDiskUnusable {
            node: path.display().to_string(),
            reason: format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// The backing file `file_name` beside the new disk `disk`: a plain name (no directory, not
/// hidden) of a regular file that exists there.
fn backing_path(disk: &Path, file_name: &str) -> Result<PathBuf, String> {
    let plain = !file_name.is_empty()
        && !file_name.contains('/')
        && !file_name.starts_with('.')
        && Path::new(file_name).file_name() == Some(std::ffi::OsStr::new(file_name));
    if !plain {
        return Err(format!(
            "backing file name {file_name:?} is not a plain file name"
        ));
    }
    let dir = disk.parent().unwrap_or(Path::new("/"));
    let path = dir.join(file_name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => Ok(path),
        Ok(_) => Err(format!("{} is not a regular file", path.display())),
        Err(e) => Err(format!(
            "the destination has no template {} beside the new disk ({e})",
            path.display()
        )),
    }
}

fn delete_all(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .filter_map(|p| {
            std::fs::remove_file(p)
                .err()
                .map(|e| format!("destination: delete {}: {e}", p.display()))
        })
        .collect()
}
