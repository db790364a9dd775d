//! CloudStack's certificates, followed: whether the PKI directory handed to QEMU still holds
//! what the agent's `cloud.*` hold after a renewal, a refresh of a stale copy, and CloudStack's
//! own notion of a secured host.
//!
//! A renewal (`SetupCertificateCommand` -> `scripts/util/keystore-cert-import`) rewrites
//! `cloud.crt`, `cloud.ca.crt` (and, with a new key, `cloud.key`) in the agent's directory,
//! `ln -sf`s libvirt's certificate paths at them, and leaves `/etc/pki/qemu` as it was. Until
//! `host secure` runs again (its renewal follower does it), QEMU would present the old
//! certificate. So before each migration, on each end:
//!
//! 1. [`compare`]: the SHA-256 fingerprints of every certificate in `cloud.ca.crt` and
//!    `cloud.crt` against `ca-cert.pem` and `server-cert.pem`/`client-cert.pem`. Keys are not
//!    compared: `pki check` proves each key matches its certificate, so a matching certificate
//!    ties the key too (and `cloud.key` is 0600, unreadable to a non-root caller).
//! 2. [`follow`]: a stale copy is refreshed when allowed (root, and the directory in
//!    `host secure`'s layout: one certificate and key for both roles), the new files first
//!    written to a staging directory beside it and put through every check of `pki check`;
//!    otherwise it is an error naming the files and the fix.
//!
//! [`cloudstack_status`] is CloudStack's own verdict (`LibvirtComputingResource.isHostSecured`):
//! `cloud.crt` next to `agent.properties`, and a `qemu+tls://<privateIp>/system` self-connect.

use std::fs;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;

use super::{CLOUDSTACK_CA, CLOUDSTACK_CERT, HostError};
use crate::pki;

/// The agent's configuration file; CloudStack calls a host secured when `cloud.crt` is next
/// to it.
pub const AGENT_PROPERTIES: &str = "agent.properties";

/// SHA-256 of each certificate's DER in a PEM file, in file order.
pub type Fingerprints = Vec<[u8; 32]>;

/// The fingerprints of every certificate in `path`.
pub fn fingerprints(path: &Path) -> Result<Fingerprints, HostError> {
    let bytes = fs::read(path).map_err(|source| HostError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let prints: Fingerprints = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .map(|der| {
            let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
            let mut out = [0u8; 32];
            out.copy_from_slice(digest.as_ref());
            out
        })
        .collect();
    if prints.is_empty() {
        return Err(HostError::BadSource {
            path: path.to_path_buf(),
            problem: "holds no PEM certificate".to_string(),
        });
    }
    Ok(prints)
}

/// A file of the PKI directory that does not hold what CloudStack's file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleFile {
    /// The copy QEMU reads.
    pub copy: PathBuf,
    /// CloudStack's file it should equal.
    pub source: PathBuf,
    /// `differs`, `missing` or `unreadable`.
    pub state: &'static str,
}

/// What [`compare`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Agreement {
    /// The agent directory holds no `cloud.crt`: nothing to follow.
    NotCloudStack { reason: String },
    /// Every certificate QEMU would read is CloudStack's current one.
    InStep,
    /// Some are not.
    Stale { files: Vec<StaleFile> },
}

/// The PKI files paired with the CloudStack file each is a copy of.
fn pairs(agent_dir: &Path, pki_dir: &Path) -> [(PathBuf, PathBuf); 3] {
    [
        (pki_dir.join(pki::CA_CERT), agent_dir.join(CLOUDSTACK_CA)),
        (
            pki_dir.join(pki::SERVER_CERT),
            agent_dir.join(CLOUDSTACK_CERT),
        ),
        (
            pki_dir.join(pki::CLIENT_CERT),
            agent_dir.join(CLOUDSTACK_CERT),
        ),
    ]
}

/// Compares the certificates in `pki_dir` with CloudStack's in `agent_dir` (step 1 of the
/// module docs). A CloudStack file that cannot be read or holds no certificate is an error:
/// there is no telling what the current certificate is.
pub fn compare(agent_dir: &Path, pki_dir: &Path) -> Result<Agreement, HostError> {
    let cert = agent_dir.join(CLOUDSTACK_CERT);
    if fs::symlink_metadata(&cert).is_err() {
        return Ok(Agreement::NotCloudStack {
            reason: format!("{} does not exist", cert.display()),
        });
    }
    let mut stale = Vec::new();
    for (copy, source) in pairs(agent_dir, pki_dir) {
        let wanted = fingerprints(&source)?;
        let state = match fingerprints(&copy) {
            Ok(have) if have == wanted => continue,
            Ok(_) => "differs",
            Err(HostError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
                "missing"
            }
            Err(_) => "unreadable",
        };
        stale.push(StaleFile {
            copy,
            source,
            state,
        });
    }
    Ok(if stale.is_empty() {
        Agreement::InStep
    } else {
        Agreement::Stale { files: stale }
    })
}

/// What [`follow`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Followed {
    /// No CloudStack certificates here: nothing checked.
    NotCloudStack,
    /// Already in step.
    InStep,
    /// The PKI directory was stale and was refreshed: these files were written.
    Refreshed { files: Vec<PathBuf> },
}

/// Makes sure `pki_dir` holds CloudStack's current certificates before QEMU is handed it
/// (step 2 of the module docs). `may_refresh`: the caller runs as root and may write there.
pub fn follow(agent_dir: &Path, pki_dir: &Path, may_refresh: bool) -> Result<Followed, HostError> {
    let files = match compare(agent_dir, pki_dir)? {
        Agreement::NotCloudStack { .. } => return Ok(Followed::NotCloudStack),
        Agreement::InStep => return Ok(Followed::InStep),
        Agreement::Stale { files } => files,
    };
    let stale = |why: String| HostError::StalePki {
        pki_dir: pki_dir.to_path_buf(),
        files: files.clone(),
        why,
    };
    if !may_refresh {
        return Err(stale("not refreshed: not running as root".to_string()));
    }
    if let Some(why) = not_host_secure_layout(pki_dir) {
        return Err(stale(format!("not refreshed: {why}")));
    }
    let written = refresh(agent_dir, pki_dir)?;
    tracing::info!(
        pki_dir = %pki_dir.display(),
        files = written.len(),
        "refreshed the PKI directory from CloudStack's renewed certificates"
    );
    Ok(Followed::Refreshed { files: written })
}

/// Why `pki_dir` is not laid out as `host secure` leaves it (one certificate and one key for
/// both roles, regular files), so that a refresh would overwrite something else; `None` when
/// it is.
fn not_host_secure_layout(pki_dir: &Path) -> Option<String> {
    let read = |name: &str| {
        let path = pki_dir.join(name);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => fs::read(&path).ok(),
            _ => None,
        }
    };
    for (a, b) in [
        (pki::SERVER_CERT, pki::CLIENT_CERT),
        (pki::SERVER_KEY, pki::CLIENT_KEY),
    ] {
        match (read(a), read(b)) {
            (Some(x), Some(y)) if x == y => {}
            _ => {
                return Some(format!(
                    "{} is not in `host secure`'s layout ({a} and {b} are not the same regular \
                     file's copies), so it is not this tool's to overwrite",
                    pki_dir.display()
                ));
            }
        }
    }
    None
}

/// Writes CloudStack's current files into `pki_dir` as `host secure` does, after the same
/// files written to a staging directory beside it passed every check of `pki check`
/// ([`check_staged`]). Returns the paths written.
///
/// The new files replace the old all at once: a copy of the directory (every entry, with its
/// mode and owner, and the directory's own) gets them, and one `renameat2(RENAME_EXCHANGE)`
/// swaps it with `pki_dir`, so a QEMU creating its credentials meanwhile reads either the old
/// set or the new one, never a new certificate beside the old key. A directory holding
/// anything but regular files and symbolic links is written file by file instead (each file
/// still replaced atomically).
pub fn refresh(agent_dir: &Path, pki_dir: &Path) -> Result<Vec<PathBuf>, HostError> {
    check_staged(agent_dir, pki_dir)?;
    if let Some(written) = refresh_by_exchange(agent_dir, pki_dir)? {
        return Ok(written);
    }
    let changes = super::secure::plan_pki_copy(agent_dir, pki_dir)?.apply_unchecked()?;
    Ok(changes.into_iter().map(|c| c.path).collect())
}

/// The staging directories beside a PKI directory: [`refresh`]'s copy to swap in, and
/// [`check_staged`]'s files to check. Each name carries its process's pid after the prefix.
const SWAP_PREFIX: &str = ".qemu-tls-migrate-swap-";
const CHECK_PREFIX: &str = ".qemu-tls-migrate-refresh-";
/// A staging directory whose name carries no pid (an older version's) is stale after this.
const UNOWNED_STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// The prefix of a staging directory of this process.
fn staging_prefix(kind: &str) -> String {
    format!("{kind}{}-", std::process::id())
}

/// Removes the staging directories a killed refresh or check left in `parent` (they hold
/// copies of the private keys): those whose process is gone, and those without a pid in their
/// name that are older than [`UNOWNED_STALE_AFTER`]. A failure is logged: the refresh goes on.
fn remove_stale_staging(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Some(rest) = [SWAP_PREFIX, CHECK_PREFIX]
            .iter()
            .find_map(|p| name.strip_prefix(p))
        else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let owner = rest
            .split_once('-')
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0);
        let stale = match owner {
            Some(pid) => {
                let pid = nix::unistd::Pid::from_raw(pid);
                nix::sys::signal::kill(pid, None) == Err(nix::errno::Errno::ESRCH)
            }
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m.elapsed().is_ok_and(|age| age > UNOWNED_STALE_AFTER)),
        };
        if !stale {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                tracing::info!(dir = %path.display(), "removed a staging directory a killed refresh left")
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), "cannot remove a stale staging directory: {e}")
            }
        }
    }
}

/// [`refresh`]'s swap; `None` when `pki_dir` cannot be copied whole (it does not exist yet,
/// or holds a directory or a special file).
fn refresh_by_exchange(
    agent_dir: &Path,
    pki_dir: &Path,
) -> Result<Option<Vec<PathBuf>>, HostError> {
    use super::secure::{copy_entry, io_err as io, sync_parent};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let (Ok(meta), Some(parent)) = (std::fs::symlink_metadata(pki_dir), pki_dir.parent()) else {
        return Ok(None);
    };
    if !meta.is_dir() {
        return Ok(None);
    }
    let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(pki_dir)
        .map_err(io("read", pki_dir))?
        .collect::<Result<_, _>>()
        .map_err(io("read", pki_dir))?;
    let copyable = entries
        .iter()
        .all(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()));
    if !copyable {
        tracing::info!(dir = %pki_dir.display(), "the PKI directory holds more than files: refreshed file by file");
        return Ok(None);
    }
    // Beside it, on the same file system (the swap needs that).
    let staging = tempfile::Builder::new()
        .prefix(&staging_prefix(SWAP_PREFIX))
        .tempdir_in(parent)
        .map_err(io("create a staging directory in", parent))?;
    let new = staging.path().join("pki");
    std::fs::create_dir(&new).map_err(io("create", &new))?;
    for entry in &entries {
        copy_entry(&entry.path(), &new.join(entry.file_name()))?;
    }
    let changes = super::secure::plan_pki_copy(agent_dir, &new)?.apply_unchecked()?;
    if changes.is_empty() {
        return Ok(Some(Vec::new()));
    }
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io("set the mode of", &new))?;
    std::os::unix::fs::lchown(&new, Some(meta.uid()), Some(meta.gid()))
        .map_err(io("set the owner of", &new))?;
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        &new,
        nix::fcntl::AT_FDCWD,
        pki_dir,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
    .map_err(|e| HostError::Io {
        action: "swap the refreshed copy with",
        path: pki_dir.to_path_buf(),
        source: e.into(),
    })?;
    sync_parent(pki_dir)?;
    // `new` now names the old directory: the staging directory's removal takes it.
    Ok(Some(
        changes
            .into_iter()
            .map(|c| pki_dir.join(c.path.strip_prefix(&new).unwrap_or(&c.path)))
            .collect(),
    ))
}

/// Writes the PKI files `host secure` would make from `agent_dir` into a staging directory
/// beside `pki_dir` (removed afterwards) and runs every check of `pki check` on them: an error
/// naming each problem when they are not usable, before anything real is written. Staging
/// directories a killed run left there go first ([`remove_stale_staging`]).
pub fn check_staged(agent_dir: &Path, pki_dir: &Path) -> Result<(), HostError> {
    // The nearest directory that exists (a first `host secure` creates the PKI directory's
    // parents later, as planned).
    let parent = pki_dir
        .ancestors()
        .skip(1)
        .find(|p| !p.as_os_str().is_empty() && p.is_dir())
        .unwrap_or(Path::new("."));
    remove_stale_staging(parent);
    let staging = tempfile::Builder::new()
        .prefix(&staging_prefix(CHECK_PREFIX))
        .tempdir_in(parent)
        .map_err(|source| HostError::Io {
            action: "create a staging directory in",
            path: parent.to_path_buf(),
            source,
        })?;
    let staged = staging.path().join("pki");
    super::secure::plan_pki_copy(agent_dir, &staged)?.apply_unchecked()?;
    let report = pki::check_dir(&staged, None);
    if report.usable {
        return Ok(());
    }
    Err(HostError::RenewedUnusable {
        source_dir: agent_dir.to_path_buf(),
        problems: report
            .findings
            .iter()
            .filter(|f| f.severity == pki::Severity::Error)
            .map(|f| {
                f.reason()
                    .replace(&staged.display().to_string(), "<staged>")
            })
            .collect(),
    })
}

/// CloudStack's own verdict on this host (`LibvirtComputingResource.isHostSecured`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloudStackStatus {
    /// The agent's directory looked at (as on the host).
    pub agent_dir: PathBuf,
    /// `agent.properties` is there: the CloudStack agent is installed.
    pub agent_installed: bool,
    /// `cloud.crt` is there, next to `agent.properties`.
    pub cert_present: bool,
    /// The `qemu+tls://<privateIp>/system` self-connect.
    pub self_connect: SelfConnect,
    /// Both conditions hold (a self-connect that was not checked does not count against it).
    pub secured: bool,
    /// Whether the PKI directory QEMU reads holds the agent's current certificates.
    pub pki: Agreement,
}

/// The outcome of the libvirt self-connect CloudStack makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum SelfConnect {
    Ok { uri: String },
    Failed { uri: String, error: String },
    NotChecked { reason: String },
}

/// CloudStack's verdict on the host whose agent directory is `agent_dir` and whose QEMU PKI
/// directory is `pki_dir` (both real paths), with `self_connect` as probed by the caller.
pub fn cloudstack_status(
    agent_dir: &Path,
    host_agent_dir: &Path,
    pki_dir: &Path,
    self_connect: SelfConnect,
) -> CloudStackStatus {
    let agent_installed = agent_dir.join(AGENT_PROPERTIES).is_file();
    let cert_present = agent_dir.join(CLOUDSTACK_CERT).is_file();
    let secured =
        agent_installed && cert_present && !matches!(self_connect, SelfConnect::Failed { .. });
    let pki = compare(agent_dir, pki_dir).unwrap_or_else(|e| Agreement::NotCloudStack {
        reason: e.to_string(),
    });
    CloudStackStatus {
        agent_dir: host_agent_dir.to_path_buf(),
        agent_installed,
        cert_present,
        self_connect,
        secured,
        pki,
    }
}

/// When CloudStack and the tool disagree on whether this host is secured, the sentence that
/// says so, naming both verdicts; `None` when they agree or the agent is not installed.
/// `tool_secured`: the tool's PKI check passed; `tool_dir`: the directory it checked.
pub fn disagreement(
    cloudstack: &CloudStackStatus,
    tool_secured: bool,
    tool_dir: &Path,
) -> Option<String> {
    if !cloudstack.agent_installed || cloudstack.secured == tool_secured {
        return None;
    }
    let cs = cloudstack.agent_dir.display();
    Some(if cloudstack.secured {
        format!(
            "CloudStack calls this host secured ({cs}/{CLOUDSTACK_CERT} is next to \
             {AGENT_PROPERTIES}) but the PKI directory {} that QEMU reads is not usable for TLS; \
             run `qemu-tls-migrate host secure` (or pass --transport explicitly)",
            tool_dir.display()
        )
    } else {
        let why = match &cloudstack.self_connect {
            SelfConnect::Failed { uri, error } => {
                format!("the self-connect to {uri} failed: {error}")
            }
            _ => format!("there is no {cs}/{CLOUDSTACK_CERT} next to {AGENT_PROPERTIES}"),
        };
        format!(
            "CloudStack calls this host not secured ({why}) but the PKI directory {} is usable \
             for TLS; provision the host's certificates through CloudStack and run \
             `qemu-tls-migrate host secure` (or pass --transport explicitly)",
            tool_dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::pki::{HostCert, LabCa};

    /// An agent directory with a CA and one dual-use certificate (as CloudStack issues them),
    /// and a PKI directory laid out from it as `host secure` does.
    struct Host {
        _tmp: tempfile::TempDir,
        agent: PathBuf,
        pki: PathBuf,
        ca: LabCa,
    }

    fn host() -> Host {
        let tmp = tempfile::tempdir().expect("tempdir");
        let agent = tmp.path().join("agent");
        let pki = tmp.path().join("pki");
        fs::create_dir(&agent).expect("mkdir");
        let ca = LabCa::generate("CloudStack CA").expect("ca");
        fs::write(agent.join(AGENT_PROPERTIES), "host=198.18.0.1\n").expect("write");
        renew(&agent, &ca, 1);
        refresh(&agent, &pki).expect("first layout");
        Host {
            _tmp: tmp,
            agent,
            pki,
            ca,
        }
    }

    /// What `keystore-cert-import` does to the agent's files: a new certificate and key, 0600.
    fn renew(agent: &Path, ca: &LabCa, serial: u64) {
        let mut cert = HostCert::new(vec!["host-a".to_string()]);
        cert.serial = Some(serial);
        let (cert, key) = ca.issue_dual_pem(&cert).expect("issue");
        for (name, bytes) in [
            (CLOUDSTACK_CA, ca.cert_pem().as_bytes()),
            (CLOUDSTACK_CERT, cert.as_bytes()),
            (super::super::CLOUDSTACK_KEY, key.as_bytes()),
        ] {
            fs::write(agent.join(name), bytes).expect("write");
            fs::set_permissions(agent.join(name), fs::Permissions::from_mode(0o600))
                .expect("chmod");
        }
    }

    #[test]
    fn compare_in_step_after_a_layout() {
        let h = host();

        assert_eq!(
            compare(&h.agent, &h.pki).expect("compare"),
            Agreement::InStep
        );
    }

    #[test]
    fn compare_after_a_renewal_names_both_certificate_copies() {
        let h = host();
        renew(&h.agent, &h.ca, 2);

        let found = compare(&h.agent, &h.pki).expect("compare");

        let Agreement::Stale { files } = found else {
            panic!("a renewal makes the copies stale: {found:?}");
        };
        let copies: Vec<_> = files.iter().map(|f| f.copy.clone()).collect();
        assert_eq!(
            copies,
            [h.pki.join(pki::SERVER_CERT), h.pki.join(pki::CLIENT_CERT)]
        );
        assert!(files.iter().all(|f| f.state == "differs"));
    }

    #[test]
    fn compare_a_renewed_ca_is_found_too() {
        let h = host();
        let other = LabCa::generate("CloudStack CA 2").expect("ca");
        fs::write(h.agent.join(CLOUDSTACK_CA), other.cert_pem()).expect("write");

        let found = compare(&h.agent, &h.pki).expect("compare");

        assert!(
            matches!(&found, Agreement::Stale { files } if files.len() == 1
                && files[0].copy == h.pki.join(pki::CA_CERT)),
            "{found:?}"
        );
    }

    #[test]
    fn compare_without_cloud_crt_is_not_cloudstack() {
        let h = host();
        fs::remove_file(h.agent.join(CLOUDSTACK_CERT)).expect("rm");

        assert!(matches!(
            compare(&h.agent, &h.pki).expect("compare"),
            Agreement::NotCloudStack { .. }
        ));
    }

    #[test]
    fn a_refresh_swaps_the_whole_directory_keeping_what_else_it_holds() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let h = host();
        fs::write(h.pki.join("operator-notes.txt"), "operator's own\n").expect("write");
        std::os::unix::fs::symlink("ca-cert.pem", h.pki.join("ca-link.pem")).expect("link");
        fs::set_permissions(&h.pki, fs::Permissions::from_mode(0o750)).expect("chmod");
        let before = fs::metadata(&h.pki).expect("meta").ino();
        renew(&h.agent, &h.ca, 2);

        let written = refresh(&h.agent, &h.pki).expect("refresh");

        let meta = fs::metadata(&h.pki).expect("meta");
        assert_ne!(meta.ino(), before, "a new directory, swapped in at once");
        assert_eq!(meta.mode() & 0o777, 0o750);
        assert!(
            written.contains(&h.pki.join(pki::SERVER_CERT)),
            "{written:?}"
        );
        assert_eq!(
            fs::read_to_string(h.pki.join("operator-notes.txt")).expect("kept"),
            "operator's own\n"
        );
        assert_eq!(
            fs::read_link(h.pki.join("ca-link.pem")).expect("link kept"),
            PathBuf::from("ca-cert.pem")
        );
        assert_eq!(
            fs::read(h.pki.join(pki::SERVER_CERT)).expect("read"),
            fs::read(h.agent.join(CLOUDSTACK_CERT)).expect("read")
        );
        let parent = h.pki.parent().expect("parent");
        let left: Vec<_> = fs::read_dir(parent)
            .expect("read")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".qemu-tls-migrate"))
            .collect();
        assert!(left.is_empty(), "staging left behind: {left:?}");
        assert!(pki::check_dir(&h.pki, None).usable);
    }

    #[test]
    fn a_refresh_removes_the_staging_a_killed_refresh_left_and_keeps_a_live_ones() {
        let h = host();
        let parent = h.pki.parent().expect("parent").to_path_buf();
        // A process that is gone: its pid, once reaped, names no process.
        let mut gone = std::process::Command::new("true").spawn().expect("spawn");
        let dead = gone.id();
        gone.wait().expect("wait");
        let left = parent.join(format!("{SWAP_PREFIX}{dead}-abc123"));
        fs::create_dir_all(left.join("pki")).expect("mkdir");
        fs::write(left.join("pki/server-key.pem"), "a key copy").expect("write");
        let checking = parent.join(format!("{CHECK_PREFIX}{dead}-def456"));
        fs::create_dir(&checking).expect("mkdir");
        let live = parent.join(format!("{SWAP_PREFIX}{}-ghi789", std::process::id()));
        fs::create_dir(&live).expect("mkdir");
        let unowned_new = parent.join(format!("{SWAP_PREFIX}jkl012"));
        fs::create_dir(&unowned_new).expect("mkdir");
        renew(&h.agent, &h.ca, 2);

        refresh(&h.agent, &h.pki).expect("refresh");

        assert!(!left.exists(), "a dead refresh's copy of the keys was left");
        assert!(!checking.exists(), "a dead check's staging was left");
        assert!(live.exists(), "a running refresh's staging was removed");
        assert!(
            unowned_new.exists(),
            "a recent staging without a pid was removed"
        );
    }

    #[test]
    fn follow_refreshes_a_stale_copy_with_the_new_certificate() {
        let h = host();
        renew(&h.agent, &h.ca, 2);

        let done = follow(&h.agent, &h.pki, true).expect("follow");

        assert!(
            matches!(&done, Followed::Refreshed { files }
                if files.contains(&h.pki.join(pki::SERVER_CERT))
                && files.contains(&h.pki.join(pki::CLIENT_KEY))),
            "{done:?}"
        );
        assert_eq!(
            fs::read(h.pki.join(pki::SERVER_CERT)).expect("read"),
            fs::read(h.agent.join(CLOUDSTACK_CERT)).expect("read")
        );
        assert!(pki::check_dir(&h.pki, None).usable);
        assert_eq!(
            follow(&h.agent, &h.pki, true).expect("again"),
            Followed::InStep
        );
    }

    #[test]
    fn follow_without_root_refuses_naming_the_files_and_host_secure() {
        let h = host();
        renew(&h.agent, &h.ca, 2);
        let before = fs::read(h.pki.join(pki::SERVER_CERT)).expect("read");

        let err = follow(&h.agent, &h.pki, false).expect_err("refused");

        let text = err.to_string();
        assert!(
            text.contains(&h.pki.join(pki::SERVER_CERT).display().to_string()),
            "{text}"
        );
        assert!(
            text.contains(&h.agent.join(CLOUDSTACK_CERT).display().to_string()),
            "{text}"
        );
        assert!(text.contains("host secure"), "{text}");
        assert_eq!(
            fs::read(h.pki.join(pki::SERVER_CERT)).expect("read"),
            before
        );
    }

    #[test]
    fn follow_leaves_a_directory_not_in_host_secure_layout_alone() {
        let h = host();
        h.ca.write_host_dir(&h.pki, &HostCert::new(vec!["host-a".to_string()]))
            .expect("lab layout: a certificate per role");
        let before = fs::read(h.pki.join(pki::SERVER_CERT)).expect("read");

        let err = follow(&h.agent, &h.pki, true).expect_err("refused");

        assert!(err.to_string().contains("layout"), "{err}");
        assert_eq!(
            fs::read(h.pki.join(pki::SERVER_CERT)).expect("read"),
            before
        );
    }

    #[test]
    fn refresh_of_files_that_fail_pki_check_writes_nothing() {
        let h = host();
        let before = fs::read(h.pki.join(pki::SERVER_CERT)).expect("read");
        // A certificate from another CA than cloud.ca.crt: it does not chain.
        let other = LabCa::generate("Elsewhere").expect("ca");
        let (cert, key) = other
            .issue_dual_pem(&HostCert::new(vec!["host-a".to_string()]))
            .expect("issue");
        fs::write(h.agent.join(CLOUDSTACK_CERT), cert).expect("write");
        fs::write(h.agent.join(super::super::CLOUDSTACK_KEY), key).expect("write");

        let err = follow(&h.agent, &h.pki, true).expect_err("unusable");

        assert!(matches!(err, HostError::RenewedUnusable { .. }), "{err:?}");
        assert_eq!(
            fs::read(h.pki.join(pki::SERVER_CERT)).expect("read"),
            before
        );
        let leftovers = fs::read_dir(h.pki.parent().expect("parent"))
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".qemu-tls-migrate-refresh-")
            })
            .count();
        assert_eq!(leftovers, 0, "the staging directory is removed");
    }

    #[test]
    fn disagreement_names_both_verdicts() {
        let h = host();
        fs::remove_file(h.agent.join(CLOUDSTACK_CERT)).expect("rm");
        let cs = cloudstack_status(
            &h.agent,
            &h.agent,
            &h.pki,
            SelfConnect::NotChecked {
                reason: "test".into(),
            },
        );

        let said = disagreement(&cs, true, &h.pki).expect("they disagree");

        assert!(!cs.secured);
        assert!(
            said.contains("CloudStack calls this host not secured"),
            "{said}"
        );
        assert!(said.contains(&h.pki.display().to_string()), "{said}");
        assert_eq!(disagreement(&cs, false, &h.pki), None);
    }
}
