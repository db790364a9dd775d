//! An incoming libvirt domain, made by the service (`serve --libvirt`) for a source:
//!
//! 1. build the domain from what this host allows, not from what the source sent
//!    ([`super::allowed`]: an allow-list of elements and values; disks only in the operator's
//!    storage and shared directories, see [`super::storage`]); anything else is refused by
//!    name, and nothing is created;
//! 2. refuse a domain of the same name or UUID already running here (a VM must never run
//!    twice);
//! 3. write its record ([`super::records`]) before anything is created, then create each disk
//!    to be copied exclusively (an existing path is never opened, of two sessions naming one
//!    path one wins) and empty, with the source's format and virtual size; or, for a disk the
//!    source asked to adopt whose path exists (a volume CloudStack created), check that file
//!    ([`super::adopt`]) and record it apart;
//! 4. start it paused (`virsh create --paused`) with the service's own QMP monitor, a socket of
//!    a name the service chooses ([`incoming_socket`]) in a directory only the service and
//!    QEMU's group may write, and `-incoming defer`: libvirt then shows it `paused`, QEMU waits.
//!
//! [`IncomingDomain::remove`] undoes it all (destroy the domain, delete the disks it created,
//! the record; an adopted disk is left in place), unless `finish` began ([`IncomingDomain::mark_resuming`]): from then on the
//! domain may run the guest, and it is left as it is. After a finished migration the domain is
//! kept, running, with its disks ([`IncomingDomain::settle`]).
//!
//! A service that was killed leaves records behind; the next one rolls each back with
//! [`recover`] before it accepts connections: a domain still paused and never resumed is
//! destroyed and the disks made for it deleted; a domain that may run the guest, or that runs,
//! is left as it is and reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::adopt;
use super::allowed::{self, AllowError, AllowedDomain, Policy};
use super::records::{Record, RecordError, RecordFile, Records};
use super::storage::{self, CreatedFile, StorageDirs, StorageError};
use crate::libvirt::{DomainXml, Libvirt, LibvirtError, StateKind};
use crate::migration::{MigrationError, libvirt_call};
use crate::peer::NewDisk;

/// How long libvirt may take to answer (it runs QEMU's start-up inside `create`).
const LIBVIRT_TIMEOUT: Duration = Duration::from_secs(60);
/// The group QEMU runs in under libvirt when `--qemu-group` is not given: the first of these
/// that exists (Debian's, then Fedora's and EL's).
const QEMU_GROUPS: &[&str] = &["libvirt-qemu", "qemu"];

/// Where `serve --libvirt` may put and find an incoming domain's files, and where it keeps its
/// own sockets and records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingOptions {
    /// Disks the service creates lie in one of these (`--storage-dir`).
    pub storage_dirs: Vec<PathBuf>,
    /// Disks used without a copy lie in one of these (`--shared-dir`).
    pub shared_dirs: Vec<PathBuf>,
    /// Kernels, initrds and firmware lie in one of these (`--boot-dir`).
    pub boot_dirs: Vec<PathBuf>,
    /// The address graphics listen on (`--graphics-listen`).
    pub graphics_listen: String,
    /// The records of incoming domains (`--state-dir`).
    pub state_dir: PathBuf,
    /// The incoming domains' QMP sockets (`--libvirt-qmp-dir`).
    pub socket_dir: PathBuf,
    /// QEMU's group, which creates the sockets (`--qemu-group`); `None`: the first of
    /// [`QEMU_GROUPS`] that exists.
    pub qemu_group: Option<String>,
}

/// Default of [`IncomingOptions::state_dir`].
pub const DEFAULT_STATE_DIR: &str = "/var/lib/qemu-tls-migrate/incoming";
/// Default of [`IncomingOptions::socket_dir`].
pub const DEFAULT_SOCKET_DIR: &str = "/run/qemu-tls-migrate/libvirt";
/// Default of [`IncomingOptions::graphics_listen`]: VNC and SPICE reachable from this host only.
pub const DEFAULT_GRAPHICS_LISTEN: &str = "127.0.0.1";

impl Default for IncomingOptions {
    fn default() -> IncomingOptions {
        IncomingOptions {
            storage_dirs: Vec::new(),
            shared_dirs: Vec::new(),
            boot_dirs: Vec::new(),
            graphics_listen: DEFAULT_GRAPHICS_LISTEN.into(),
            state_dir: DEFAULT_STATE_DIR.into(),
            socket_dir: DEFAULT_SOCKET_DIR.into(),
            qemu_group: None,
        }
    }
}

/// Why the service cannot make incoming domains.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    #[error(
        "--libvirt needs somewhere for the domains' disks: give --storage-dir (disks it \
         creates) or --shared-dir (disks on shared storage)"
    )]
    NoStorage,
    #[error("a directory given for incoming domains cannot be used")]
    Storage(#[source] StorageError),
    #[error("the state directory cannot be used")]
    Records(#[source] RecordError),
    #[error(
        "refusing the QMP socket directory {path}: {problem}; remove it so that it is created \
         afresh (mode 0770, QEMU's group), or name another with --libvirt-qmp-dir"
    )]
    SocketDir { path: PathBuf, problem: String },
    #[error(
        "--libvirt-qmp-dir {path} must not be --qmp-dir: sources name sockets in --qmp-dir, and \
         an incoming domain's socket is the service's alone"
    )]
    SameSocketDir { path: PathBuf },
    #[error("no group {} on this host for QEMU's sockets; name it with --qemu-group", .tried.join(" or "))]
    NoQemuGroup { tried: Vec<String> },
    #[error("--graphics-listen {addr:?} is not an IP address")]
    GraphicsListen { addr: String },
}

/// What the service needs to make incoming domains, prepared once at start-up.
#[derive(Debug)]
pub struct Host {
    uri: String,
    dirs: StorageDirs,
    graphics_listen: String,
    socket_dir: PathBuf,
    records: Records,
}

/// Checks and creates what `opts` names (the storage directories must exist; the state and
/// socket directories are created when missing), for libvirt at `uri`.
pub fn prepare(uri: &str, opts: &IncomingOptions, qmp_dir: &Path) -> Result<Host, SetupError> {
    use crate::private_dir::{self, DirProblem, Strictness};
    if opts.storage_dirs.is_empty() && opts.shared_dirs.is_empty() {
        return Err(SetupError::NoStorage);
    }
    if opts.graphics_listen.parse::<std::net::IpAddr>().is_err() {
        return Err(SetupError::GraphicsListen {
            addr: opts.graphics_listen.clone(),
        });
    }
    let dirs = StorageDirs::new(&opts.storage_dirs, &opts.shared_dirs, &opts.boot_dirs)
        .map_err(SetupError::Storage)?;
    let records = Records::open(&opts.state_dir).map_err(SetupError::Records)?;
    let same = |a: &Path, b: &Path| {
        a == b
            || std::fs::canonicalize(a)
                .is_ok_and(|a| std::fs::canonicalize(b).is_ok_and(|b| a == b))
    };
    if same(&opts.socket_dir, qmp_dir) {
        return Err(SetupError::SameSocketDir {
            path: opts.socket_dir.clone(),
        });
    }
    let tried: Vec<String> = match &opts.qemu_group {
        Some(g) => vec![g.clone()],
        None => QEMU_GROUPS.iter().map(|g| g.to_string()).collect(),
    };
    let gid = tried
        .iter()
        .find_map(|g| nix::unistd::Group::from_name(g).ok().flatten())
        .map(|g| g.gid.as_raw())
        .ok_or(SetupError::NoQemuGroup {
            tried: tried.clone(),
        })?;
    let socket_problem = |problem: String| SetupError::SocketDir {
        path: opts.socket_dir.clone(),
        problem,
    };
    match private_dir::open(&opts.socket_dir, true, Strictness::SharedWithGroup { gid }) {
        Ok(_) => {}
        Err(DirProblem::Io(e)) => return Err(socket_problem(e.to_string())),
        Err(DirProblem::Unsafe(p)) => return Err(socket_problem(p)),
    }
    Ok(Host {
        uri: uri.to_string(),
        dirs,
        graphics_listen: opts.graphics_listen.clone(),
        socket_dir: opts.socket_dir.clone(),
        records,
    })
}

/// The QMP socket for a new incoming domain: `qtm-in-<random>.sock` in `dir`, a name no file
/// has (QEMU would replace an existing socket there). The one place that chooses it.
pub(crate) fn incoming_socket(dir: &Path) -> Result<PathBuf, MigrationError> {
    for _ in 0..8 {
        let path = dir.join(format!("qtm-in-{}.sock", random_id()?));
        if matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
        {
            return Ok(path);
        }
    }
    Err(MigrationError::Failed {
        desc: format!("no free socket name in {}", dir.display()),
    })
}

/// 16 random hexadecimal digits.
fn random_id() -> Result<String, MigrationError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| MigrationError::Failed {
            desc: "the system's random source failed".into(),
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A domain this service started for a source, and the disks it created for it.
#[derive(Debug)]
pub struct IncomingDomain {
    uri: String,
    name: String,
    uuid: String,
    created_disks: Vec<CreatedFile>,
    qmp: PathBuf,
    record: RecordFile,
}

impl IncomingDomain {
    /// Steps 1-4 of the module docs; on failure nothing is left behind.
    pub async fn start(
        host: Arc<Host>,
        xml: &str,
        disks: &[NewDisk],
    ) -> Result<IncomingDomain, MigrationError> {
        let (xml, disks) = (xml.to_string(), disks.to_vec());
        libvirt_call(LIBVIRT_TIMEOUT, move || start_blocking(&host, &xml, &disks)).await
    }

    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's QMP socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The socket's file name, as the source is told it.
    pub fn qmp_name(&self) -> String {
        self.qmp
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Whether `finish` began: the domain may run the guest.
    pub fn may_run_guest(&self) -> bool {
        self.record.record().resuming
    }

    /// Records that `finish` begins: from now on the domain may run the guest, and neither a
    /// roll-back nor a restarted service destroys it or deletes its disks.
    pub fn mark_resuming(&mut self) {
        if let Err(e) = self.record.update(|r| r.resuming = true) {
            // Kept in memory all the same: this service will not destroy it.
            tracing::warn!(domain = %self.name, "cannot write the record: {e}");
        }
    }

    /// `finish` failed before `cont` was sent (the destination knows it never ran the guest):
    /// a roll-back may remove the domain again.
    pub fn clear_resuming(&mut self) {
        if let Err(e) = self.record.update(|r| r.resuming = false) {
            tracing::warn!(domain = %self.name, "cannot write the record: {e}");
        }
    }

    /// The migration finished: the domain runs the guest and is this host's now; its record
    /// is removed.
    pub fn settle(self) {
        tracing::info!(domain = %self.name, "incoming domain finished");
        if let Err(e) = self.record.remove() {
            tracing::warn!(domain = %self.name, "cannot remove the record: {e}");
        }
    }

    /// Destroys the domain (if it still runs) and deletes the disks this service created; a
    /// domain that may run the guest is left as it is. Returns the problems met.
    pub async fn remove(self) -> Vec<String> {
        if self.may_run_guest() {
            let problem = format!(
                "destination: domain {} may run the guest (finish began): left as it is, with \
                 its disks",
                self.name
            );
            tracing::warn!("{problem}");
            self.settle();
            return vec![problem];
        }
        let result = libvirt_call(LIBVIRT_TIMEOUT, move || {
            let IncomingDomain {
                uri,
                name,
                uuid,
                created_disks,
                qmp,
                record,
            } = self;
            let mut problems = Vec::new();
            let destroyed = Libvirt::connect(&uri).and_then(|l| destroy_if_there(&l, &uuid));
            match destroyed {
                Ok(()) => {
                    problems.extend(delete_all(&created_disks));
                    remove_socket(&qmp);
                    if let Err(e) = record.remove() {
                        problems.push(format!("destination: {e}"));
                    }
                }
                // The record stays: a restarted service tries again.
                Err(e) => problems.push(format!("destination: destroy {name}: {e}")),
            }
            tracing::info!(domain = %name, "incoming domain removed");
            Ok(problems)
        })
        .await;
        result.unwrap_or_else(|e| vec![e.to_string()])
    }
}

/// Steps 1-4 of the module docs, in libvirt's thread; on failure nothing is left behind.
fn start_blocking(
    host: &Host,
    xml: &str,
    disks: &[NewDisk],
) -> Result<IncomingDomain, MigrationError> {
    let libvirt = Libvirt::connect(&host.uri)?;
    let emulators = libvirt.emulators()?;
    let network_active = |name: &str| libvirt.network_active(name).unwrap_or(false);
    let policy = Policy {
        dirs: &host.dirs,
        graphics_listen: &host.graphics_listen,
        emulators: &emulators,
        bridge_exists: &|name| nix::net::if_::if_nametoindex(name).is_ok(),
        network_active: &network_active,
    };
    let domain = allowed::build(xml, disks, &policy).map_err(refusal)?;
    refuse_if_running(&libvirt, &domain)?;
    let qmp = incoming_socket(&host.socket_dir)?;
    let mut record = write_record(host, &domain, &qmp)?;
    let mut created = Vec::new();
    let made = create_disks(host, &domain, &mut record, &mut created)
        .and_then(|()| create_paused(&libvirt, &domain, &qmp));
    if let Err(e) = made {
        for p in delete_all(&created) {
            tracing::warn!("{p}");
        }
        if let Err(e) = record.remove() {
            tracing::warn!("{e}");
        }
        return Err(e);
    }
    let adopted = domain.new_disks.iter().filter(|d| d.adopt).count();
    tracing::info!(domain = %domain.name, disks = created.len(), adopted, qmp = %qmp.display(), "incoming domain started paused");
    Ok(IncomingDomain {
        uri: host.uri.clone(),
        name: domain.name,
        uuid: domain.uuid,
        created_disks: created,
        qmp,
        record,
    })
}

/// Step 2: a domain of the same name, or the same VM under another name (its UUID), already
/// running here is refused: it would be the same VM running twice.
fn refuse_if_running(libvirt: &Libvirt, domain: &AllowedDomain) -> Result<(), MigrationError> {
    match libvirt.domain(&domain.name) {
        Ok(d) if d.is_active()? => {
            return Err(MigrationError::DomainExists {
                name: domain.name.clone(),
            });
        }
        Ok(_) | Err(LibvirtError::NoSuchDomain { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(d) = libvirt.domain_by_uuid(&domain.uuid)?
        && d.is_active()?
    {
        return Err(MigrationError::DomainExists {
            name: format!("{} (with the same UUID {})", d.name(), domain.uuid),
        });
    }
    Ok(())
}

/// Step 3's record, under the id of the domain's socket `qmp`, before anything is created.
fn write_record(
    host: &Host,
    domain: &AllowedDomain,
    qmp: &Path,
) -> Result<RecordFile, MigrationError> {
    let id = qmp
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .trim_start_matches("qtm-in-")
                .to_string()
        })
        .unwrap_or_default();
    let record = Record {
        uri: host.uri.clone(),
        name: domain.name.clone(),
        uuid: domain.uuid.clone(),
        qmp: qmp.to_path_buf(),
        disks: Vec::new(),
        adopted: Vec::new(),
        resuming: false,
    };
    host.records.create(&id, record).map_err(failed)
}

/// Step 3's disks: each created exclusively, written down in `record` and pushed to `created`
/// as soon as it exists, then made an empty image of the source's format and size; or, when
/// adopted, checked and written down as adopted (never deleted).
fn create_disks(
    host: &Host,
    domain: &AllowedDomain,
    record: &mut RecordFile,
    created: &mut Vec<CreatedFile>,
) -> Result<(), MigrationError> {
    for planned in &domain.new_disks {
        if planned.adopt {
            let file = adopt::check(&planned.path, &planned.disk, &host.dirs).map_err(|e| {
                MigrationError::DestDiskUnusable {
                    node: planned.disk.target.clone(),
                    reason: error_chain(&e),
                }
            })?;
            record
                .update(|r| r.adopted.push(file.clone()))
                .map_err(failed)?;
            continue;
        }
        let file = storage::create_exclusive(&planned.path)
            .map_err(|e| disk_error(&planned.disk.target, e))?;
        created.push(file.clone());
        record
            .update(|r| r.disks.push(file.clone()))
            .map_err(failed)?;
        create_image(&planned.path, &planned.disk)?;
        if !storage::is_still(&file) {
            return Err(MigrationError::DestDiskUnusable {
                node: planned.disk.target.clone(),
                reason: format!(
                    "{} was replaced while it was being created",
                    planned.path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Step 4: the domain started paused with its monitor at `qmp`.
fn create_paused(
    libvirt: &Libvirt,
    domain: &AllowedDomain,
    qmp: &Path,
) -> Result<(), MigrationError> {
    let xml = DomainXml::parse(domain.render(qmp))?;
    let started = libvirt.create_paused(&xml)?;
    // libvirt read the name and UUID the service checked (it wrote them itself).
    let uuid = started.uuid()?;
    if !uuid.eq_ignore_ascii_case(&domain.uuid) {
        let _ = started.destroy();
        return Err(MigrationError::Failed {
            desc: format!(
                "libvirt started {} with UUID {uuid}, not {}",
                domain.name, domain.uuid
            ),
        });
    }
    Ok(())
}

/// A record that cannot be written, as the source sees it.
fn failed(e: RecordError) -> MigrationError {
    MigrationError::Failed {
        desc: error_chain(&e),
    }
}

/// A refusal of the allow-list as the source sees it: `destination-disk` for a path that
/// exists, `bad-request` for everything else.
fn refusal(e: AllowError) -> MigrationError {
    match e {
        AllowError::Disk { target, source } => disk_error(&target, source),
        other => MigrationError::BadRequest {
            desc: error_chain(&other),
        },
    }
}

fn disk_error(target: &str, e: StorageError) -> MigrationError {
    match e {
        StorageError::Exists { .. } => MigrationError::DestDiskUnusable {
            node: target.to_string(),
            reason: e.to_string(),
        },
        other => MigrationError::BadRequest {
            desc: format!("disk {target}: {}", error_chain(&other)),
        },
    }
}

/// An error and its sources, joined as the binary prints them.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Rolls back each record a service that is gone left in `host`'s state directory (see the
/// module docs); returns what it could not do, or left alone, in words.
pub async fn recover(host: Arc<Host>) -> Vec<String> {
    let result = libvirt_call(LIBVIRT_TIMEOUT, move || {
        let (left, mut problems) = host.records.left_behind();
        if left.is_empty() {
            return Ok(problems);
        }
        let libvirt = match Libvirt::connect(&host.uri) {
            Ok(l) => l,
            Err(e) => {
                problems.push(format!(
                    "{} record(s) of incoming domains left by an earlier run wait in {}: {e}",
                    left.len(),
                    host.records.path().display()
                ));
                return Ok(problems);
            }
        };
        for left in left {
            let record = left.file.record().clone();
            match recover_one(&libvirt, &record) {
                Ok(note) => {
                    if let Some(note) = note {
                        problems.push(note);
                    }
                    if let Err(e) = left.file.remove() {
                        problems.push(e.to_string());
                    }
                }
                Err(e) => problems.push(format!(
                    "incoming domain {} (record {}): {e}; left for the next start",
                    record.name,
                    left.file.path().display()
                )),
            }
        }
        Ok(problems)
    })
    .await;
    result.unwrap_or_else(|e| vec![e.to_string()])
}

/// One record rolled back; `Some`: what was left alone, and why.
fn recover_one(libvirt: &Libvirt, r: &Record) -> Result<Option<String>, LibvirtError> {
    let domain = libvirt
        .domain_by_uuid(&r.uuid)?
        .filter(|d| d.name() == r.name);
    if r.resuming {
        return Ok(Some(format!(
            "incoming domain {} may run the guest (its finish began before this service \
             stopped): left as it is, with its disks; check it (virsh domstate {})",
            r.name, r.name
        )));
    }
    if let Some(d) = &domain {
        let state = d.state()?;
        if state.kind != StateKind::Paused {
            return Ok(Some(format!(
                "incoming domain {} is {} although this service never resumed it: left as it \
                 is, with its disks",
                r.name, state.kind
            )));
        }
        d.destroy()?;
    }
    // Only the disks it created: an adopted volume (`r.adopted`) stays where it is.
    for p in delete_all(&r.disks) {
        tracing::warn!("{p}");
    }
    remove_socket(&r.qmp);
    tracing::info!(domain = %r.name, disks = r.disks.len(), adopted = r.adopted.len(), "incoming domain left by an earlier run rolled back");
    Ok(None)
}

/// Destroys the domain of UUID `uuid` if it still runs. A transient domain whose QEMU was quit
/// (the roll-back's `quit`) vanishes at any moment: an error with the domain gone is success.
fn destroy_if_there(libvirt: &Libvirt, uuid: &str) -> Result<(), LibvirtError> {
    let attempt = match libvirt.domain_by_uuid(uuid)? {
        Some(d) => match d.is_active() {
            Ok(true) => d.destroy(),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        },
        None => Ok(()),
    };
    match attempt {
        Err(_) if libvirt.domain_by_uuid(uuid)?.is_none() => Ok(()),
        other => other,
    }
}

/// Removes a QMP socket a destroyed QEMU left behind (only a socket).
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// An empty image at `path` (`qemu-img create` onto the file just created), an overlay when
/// `disk` names a backing file.
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

fn delete_all(files: &[CreatedFile]) -> Vec<String> {
    files
        .iter()
        .filter_map(|f| storage::remove_created(f).err())
        .collect()
}
