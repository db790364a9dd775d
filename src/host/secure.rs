//! `host secure`: lay out a CloudStack host's certificates for QEMU and libvirt, set
//! `qemu.conf`/`libvirtd.conf`, write firewall rules.
//!
//! The steps, all under `--root` (default `/`):
//! 1. Read `cloud.ca.crt`, `cloud.crt`, `cloud.key` from the CloudStack directory; a missing or
//!    non-PEM file is an error before anything is written.
//! 2. The PKI directory (`/etc/pki/qemu`) gets the five files as copies: `ca-cert.pem` from
//!    `cloud.ca.crt`, `server-cert.pem` and `client-cert.pem` from `cloud.crt`, `server-key.pem`
//!    and `client-key.pem` from `cloud.key` (certificates 0644, keys 0640 group QEMU's group).
//! 3. libvirt's paths become relative symlinks into it (`/etc/pki/CA/cacert.pem`,
//!    `/etc/pki/libvirt/servercert.pem`, ...), so one renewal updates both.
//! 4. `qemu.conf` and `libvirtd.conf` get the settings of the templates, other lines kept byte
//!    for byte. A file that is a symlink is edited where the link points (resolved under
//!    `--root`, see [`super::resolve_under`]); the link stays. The edited file keeps its mode,
//!    owner and group.
//! 5. nftables rules and an iptables alternative open 16514, 16515 (the migration service) and
//!    49152-49215 (written, not loaded).
//! 6. The renewal follower: `qemu-tls-migrate-renew.path` watching `cloud.crt`, `cloud.ca.crt`
//!    and `cloud.key` and `qemu-tls-migrate-renew.service` running this same `host secure`
//!    again (the templates of `qemu-conf/`, with this run's binary, `--from` and `--pki-dir`)
//!    in `/etc/systemd/system`, enabled by its link in `paths.target.wants` (systemd must be
//!    told: `systemctl daemon-reload`, `systemctl start qemu-tls-migrate-renew.path`). After
//!    `keystore-cert-import`'s `ln -sf` of libvirt's paths at `cloud.*`, the run it starts puts
//!    step 3's links back and copies the renewed files into the PKI directory.
//! 7. libvirt's qemu hook (`/etc/libvirt/hooks/qemu.d/qemu-tls-migrate`, the package's file
//!    with this run's binary): a domain libvirt migrates in loses the `-qmp` and
//!    `-incoming defer` a `serve --libvirt` gave it (`host libvirt-hook`); libvirtd reads its
//!    hooks when it starts.
//!
//! Before any PKI file is written, the same files are written to a staging directory and put
//! through every check of `pki check` ([`super::cloudstack::check_staged`]): a renewal caught
//! half-way (a new `cloud.crt`, the old `cloud.key`) is an error that changes nothing, and
//! the follower's `Restart=on-failure` runs it again once all three files are written.
//!
//! Every file that is replaced is first copied to `<file>.qemu-tls-migrate.orig`, once (same
//! mode, owner and group; a symlink is backed up as a symlink); what is already as wanted is left
//! alone, so a second run changes nothing.
//!
//! Every write is atomic and durable:
//! 1. write a temporary file in the same directory, with the final owner and mode;
//! 2. `fsync` it;
//! 3. rename it over the path (the backup: only if no backup is there yet);
//! 4. `fsync` the directory, so the rename survives a crash.
//!
//! A symlink is made next to its path and renamed over it; after a new symlink or directory
//! its directory is synced too.

use std::fs;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use super::conf::{self, Setting};
use super::{
    BACKUP_SUFFIX, CLOUDSTACK_CA, CLOUDSTACK_CERT, CLOUDSTACK_KEY, DEFAULT_CLOUDSTACK_DIR,
    HostError, INSTALLED_BINARY, IPTABLES_RULES, LIBVIRT_CA_CERT, LIBVIRT_CLIENT_CERT,
    LIBVIRT_CLIENT_KEY, LIBVIRT_HOOK, LIBVIRT_SERVER_CERT, LIBVIRT_SERVER_KEY, LIBVIRTD_CONF,
    NFT_RULES, QEMU_CONF, RENEW_PATH_UNIT, RENEW_PATH_WANTS, RENEW_SERVICE_UNIT, resolve_under,
    under,
};
use crate::pki;

const QEMU_CONF_TEMPLATE: &str = include_str!("../../qemu-conf/qemu.conf");
const LIBVIRTD_CONF_TEMPLATE: &str = include_str!("../../qemu-conf/libvirtd.conf");
const NFT_TEMPLATE: &str = include_str!("../../qemu-conf/firewall.nft");
const IPTABLES_TEMPLATE: &str = include_str!("../../qemu-conf/firewall.iptables");
const RENEW_PATH_TEMPLATE: &str = include_str!("../../qemu-conf/qemu-tls-migrate-renew.path");
const LIBVIRT_HOOK_TEMPLATE: &str = include_str!("../../packaging/debian/libvirt-hook");
const RENEW_SERVICE_TEMPLATE: &str = include_str!("../../qemu-conf/qemu-tls-migrate-renew.service");
/// The command line in the service template, replaced by the one this run was given.
const TEMPLATE_EXEC_START: &str = "ExecStart=/usr/bin/qemu-tls-migrate host secure";

const DIR_MODE: u32 = 0o755;
const CERT_MODE: u32 = 0o644;
const KEY_MODE: u32 = 0o640;
const RULES_MODE: u32 = 0o644;
/// libvirt runs its hooks as programs.
const HOOK_MODE: u32 = 0o755;
/// Mode of a newly created `qemu.conf` (Debian ships it 0600: it may hold passwords).
const NEW_QEMU_CONF_MODE: u32 = 0o600;
/// Mode of a newly created `libvirtd.conf` (as Debian ships it).
const NEW_LIBVIRTD_CONF_MODE: u32 = 0o644;

/// Renders a template: `{pki_dir}` becomes the PKI directory.
pub fn render_template(template: &str, pki_dir: &Path) -> String {
    template.replace("{pki_dir}", &pki_dir.display().to_string())
}

pub(super) fn qemu_conf_settings(pki_dir: &Path) -> Vec<Setting> {
    conf::parse_settings(&render_template(QEMU_CONF_TEMPLATE, pki_dir))
}

pub(super) fn libvirtd_conf_settings() -> Vec<Setting> {
    conf::parse_settings(LIBVIRTD_CONF_TEMPLATE)
}

/// What `host secure` is asked to do.
#[derive(Debug, Clone)]
pub struct SecureOptions {
    /// Everything read and written is placed under this directory (`/` on a real host).
    pub root: PathBuf,
    /// Where CloudStack's `cloud.ca.crt`, `cloud.crt`, `cloud.key` are; `None`:
    /// `<root>/etc/cloudstack/agent`. An explicit path is used as given, not under `root`.
    pub from: Option<PathBuf>,
    /// The PKI directory as on the host (default `/etc/pki/qemu`).
    pub pki_dir: PathBuf,
    /// The binary the renewal follower runs; `None`: the package's (`/usr/bin`).
    pub exec: Option<PathBuf>,
}

impl SecureOptions {
    /// The real host: root `/`, CloudStack's directory, `/etc/pki/qemu`.
    pub fn new(root: impl Into<PathBuf>) -> SecureOptions {
        SecureOptions {
            root: root.into(),
            from: None,
            pki_dir: PathBuf::from(pki::DEFAULT_PKI_DIR),
            exec: None,
        }
    }

    /// The command line that repeats this run: what the renewal follower runs.
    fn command_line(&self) -> Vec<String> {
        let exec = self
            .exec
            .clone()
            .unwrap_or_else(|| PathBuf::from(INSTALLED_BINARY));
        let mut argv = vec![
            exec.display().to_string(),
            "host".to_string(),
            "secure".to_string(),
        ];
        if let Some(from) = &self.from {
            argv.extend(["--from".to_string(), from.display().to_string()]);
        }
        if self.pki_dir != Path::new(pki::DEFAULT_PKI_DIR) {
            argv.extend(["--pki-dir".to_string(), self.pki_dir.display().to_string()]);
        }
        argv
    }

    /// The agent directory as the host sees it (what the path unit watches).
    fn host_source_dir(&self) -> PathBuf {
        self.from
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CLOUDSTACK_DIR))
    }

    fn source_dir(&self) -> PathBuf {
        self.from
            .clone()
            .unwrap_or_else(|| under(&self.root, Path::new(DEFAULT_CLOUDSTACK_DIR)))
    }
}

/// One change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create a directory.
    CreateDir { path: PathBuf, mode: u32 },
    /// Write a file (atomically), replacing what is there.
    WriteFile {
        path: PathBuf,
        contents: Vec<u8>,
        mode: u32,
        /// Owner to give it (that of the file it replaces, for configuration files).
        uid: Option<u32>,
        /// Group to give it (QEMU's group for keys, that of the file it replaces for
        /// configuration files), when known.
        gid: Option<u32>,
        /// What is there now, when it is a regular file (for the diff and the backup).
        old: Option<Vec<u8>>,
        /// Show a text diff on `--dry-run` (configuration), or just a line (certificates, keys).
        text: bool,
    },
    /// Make `path` a symlink to `target`, replacing what is there.
    Symlink {
        path: PathBuf,
        target: PathBuf,
        /// Something (file or other link) is there now and gets backed up.
        replaces: bool,
    },
}

impl Action {
    /// The path the action changes.
    pub fn path(&self) -> &Path {
        match self {
            Action::CreateDir { path, .. }
            | Action::WriteFile { path, .. }
            | Action::Symlink { path, .. } => path,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Action::CreateDir { .. } => "mkdir",
            Action::WriteFile { .. } => "write",
            Action::Symlink { .. } => "symlink",
        }
    }

    /// True when something already at the path is replaced (and backed up once).
    fn replaces(&self) -> bool {
        match self {
            Action::CreateDir { .. } => false,
            Action::WriteFile { old, path, .. } => old.is_some() || path.is_symlink(),
            Action::Symlink { replaces, .. } => *replaces,
        }
    }
}

/// The changes `host secure` would make; empty when the host is already as wanted.
#[derive(Debug, Clone)]
pub struct SecurePlan {
    pub root: PathBuf,
    pub source_dir: PathBuf,
    /// The PKI directory under `root`.
    pub pki_dir: PathBuf,
    pub actions: Vec<Action>,
    /// Paths that are already as wanted.
    pub unchanged: Vec<PathBuf>,
}

/// One change made (or, on a dry run, to be made), for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppliedChange {
    pub path: PathBuf,
    /// `mkdir`, `write` or `symlink`.
    pub action: &'static str,
    /// The one-time backup of what was there, when one was (or would be) made.
    pub backup: Option<PathBuf>,
}

/// What `host secure` did: the `--json` output.
#[derive(Debug, Clone, Serialize)]
pub struct SecureReport {
    pub root: PathBuf,
    pub source_dir: PathBuf,
    pub pki_dir: PathBuf,
    pub dry_run: bool,
    /// The changes made, or to be made on a dry run; empty when nothing needed changing.
    pub changes: Vec<AppliedChange>,
    pub unchanged: Vec<PathBuf>,
    /// The unified diff of the changes (dry run only).
    pub diff: Option<String>,
    /// `pki check` of the resulting PKI directory (after a real run).
    pub pki: Option<pki::Report>,
    /// How to load the firewall rules (they are written, not loaded).
    pub firewall_hint: String,
    /// How to start the renewal follower (its units are written and enabled, not started).
    pub follower_hint: String,
}

/// Works out what `host secure` changes; reads only. Missing or unparsable CloudStack files are
/// an error here, before anything is written.
pub fn plan_secure(options: &SecureOptions) -> Result<SecurePlan, HostError> {
    let root = &options.root;
    let source_dir = options.source_dir();
    let sources = read_sources(&source_dir)?;
    let pki_dir = under(root, &options.pki_dir);
    let mut planner = Planner::default();

    // 2. The PKI directory, with copies.
    planner.pki_files(&pki_dir, &sources)?;

    // 3. libvirt's paths, as relative symlinks into the PKI directory.
    let links = [
        (LIBVIRT_CA_CERT, pki::CA_CERT),
        (LIBVIRT_SERVER_CERT, pki::SERVER_CERT),
        (LIBVIRT_CLIENT_CERT, pki::CLIENT_CERT),
        (LIBVIRT_SERVER_KEY, pki::SERVER_KEY),
        (LIBVIRT_CLIENT_KEY, pki::CLIENT_KEY),
    ];
    for (link, name) in links {
        let link_abs = Path::new(link);
        let target = relative_target(link_abs, &options.pki_dir.join(name));
        let path = under(root, link_abs);
        if let Some(parent) = path.parent() {
            planner.dir(parent)?;
        }
        planner.symlink(&path, target)?;
    }

    // 4. Configuration files, edited where their symlinks point, keeping mode and owner.
    let configs = [
        (
            QEMU_CONF,
            qemu_conf_settings(&options.pki_dir),
            NEW_QEMU_CONF_MODE,
        ),
        (
            LIBVIRTD_CONF,
            libvirtd_conf_settings(),
            NEW_LIBVIRTD_CONF_MODE,
        ),
    ];
    for (file, settings, new_mode) in configs {
        let path = resolve_under(root, Path::new(file))?;
        let existing = config_metadata(&path)?;
        let old = match existing {
            Some(_) => read_optional(&path)?,
            None => None,
        };
        let new_text = conf::apply_bytes(old.as_deref().unwrap_or_default(), &settings);
        if let Some(parent) = path.parent() {
            planner.dir(parent)?;
        }
        let (mode, owner) = match existing {
            Some(meta) => (
                meta.mode() & 0o7777,
                Owner {
                    uid: Some(meta.uid()),
                    gid: Some(meta.gid()),
                },
            ),
            None => (new_mode, Owner::default()),
        };
        if path != under(root, Path::new(file)) {
            tracing::debug!(file, target = %path.display(), "editing through symlink");
        }
        planner.file(&path, new_text, mode, owner, true)?;
    }

    // 5. Firewall rules.
    for (file, template) in [
        (NFT_RULES, NFT_TEMPLATE),
        (IPTABLES_RULES, IPTABLES_TEMPLATE),
    ] {
        let path = under(root, Path::new(file));
        if let Some(parent) = path.parent() {
            planner.dir(parent)?;
        }
        let contents = template.as_bytes().to_vec();
        planner.file(&path, contents, RULES_MODE, Owner::default(), true)?;
    }

    // 6. The renewal follower: a path unit on cloud.* starting `host secure` again, enabled.
    for (unit, contents) in [
        (
            RENEW_PATH_UNIT,
            render_path_unit(&options.host_source_dir()),
        ),
        (
            RENEW_SERVICE_UNIT,
            render_service_unit(&options.command_line()),
        ),
    ] {
        let path = under(root, Path::new(unit));
        if let Some(parent) = path.parent() {
            planner.dir(parent)?;
        }
        planner.file(
            &path,
            contents.into_bytes(),
            RULES_MODE,
            Owner::default(),
            true,
        )?;
    }
    let wants = under(root, Path::new(RENEW_PATH_WANTS));
    if let Some(parent) = wants.parent() {
        planner.dir(parent)?;
    }
    planner.symlink(&wants, PathBuf::from(RENEW_PATH_UNIT))?;

    // 7. libvirt's qemu hook, running this binary.
    let hook = under(root, Path::new(LIBVIRT_HOOK));
    if let Some(parent) = hook.parent() {
        planner.dir(parent)?;
    }
    let exec = options.command_line()[0].clone();
    let quoted = format!("'{}'", exec.replace('\'', "'\\''"));
    let contents = LIBVIRT_HOOK_TEMPLATE.replace(INSTALLED_BINARY, &quoted);
    planner.file(
        &hook,
        contents.into_bytes(),
        HOOK_MODE,
        Owner::default(),
        true,
    )?;

    Ok(SecurePlan {
        root: root.clone(),
        source_dir,
        pki_dir,
        actions: planner.actions,
        unchanged: planner.unchanged,
    })
}

/// `%` as systemd reads it in a unit file (specifiers start with it).
fn unit_escape(s: &str) -> String {
    s.replace('%', "%%")
}

/// One word of an `ExecStart=` line: quoted (systemd's C-style) when it holds a space, a quote
/// or a backslash.
fn exec_word(word: &str) -> String {
    let escaped = unit_escape(word);
    if escaped.is_empty() || escaped.contains([' ', '\t', '"', '\'', '\\', ';']) {
        format!("\"{}\"", escaped.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        escaped
    }
}

/// The path unit, watching CloudStack's files in `agent_dir` (as on the host).
pub(super) fn render_path_unit(agent_dir: &Path) -> String {
    RENEW_PATH_TEMPLATE.replace(
        &format!("={DEFAULT_CLOUDSTACK_DIR}/"),
        &format!("={}/", unit_escape(&agent_dir.display().to_string())),
    )
}

/// The service unit, running `argv`.
pub(super) fn render_service_unit(argv: &[String]) -> String {
    let line = format!(
        "ExecStart={}",
        argv.iter()
            .map(|w| exec_word(w))
            .collect::<Vec<_>>()
            .join(" ")
    );
    RENEW_SERVICE_TEMPLATE.replace(TEMPLATE_EXEC_START, &line)
}

/// Only step 2 of [`plan_secure`]: the PKI directory `pki_dir` (a real path, not placed under
/// a root) gets its five files and `dh-params.pem` copied from CloudStack's files in
/// `source_dir`, exactly as `host secure` writes them. Reads only.
pub(super) fn plan_pki_copy(source_dir: &Path, pki_dir: &Path) -> Result<SecurePlan, HostError> {
    let sources = read_sources(source_dir)?;
    let mut planner = Planner::default();
    planner.pki_files(pki_dir, &sources)?;
    Ok(SecurePlan {
        root: PathBuf::from("/"),
        source_dir: source_dir.to_path_buf(),
        pki_dir: pki_dir.to_path_buf(),
        actions: planner.actions,
        unchanged: planner.unchanged,
    })
}

/// The group QEMU's keys get (QEMU's group, where one exists).
fn key_gid() -> Option<u32> {
    pki::qemu_group().and_then(|name| {
        nix::unistd::Group::from_name(&name)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    })
}

struct Sources {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read_sources(dir: &Path) -> Result<Sources, HostError> {
    let paths = [CLOUDSTACK_CA, CLOUDSTACK_CERT, CLOUDSTACK_KEY].map(|name| dir.join(name));
    let missing: Vec<PathBuf> = paths.iter().filter(|p| !p.is_file()).cloned().collect();
    if !missing.is_empty() {
        return Err(HostError::MissingSource { paths: missing });
    }
    let read = |path: &PathBuf| {
        fs::read(path).map_err(|source| HostError::Io {
            action: "read",
            path: path.clone(),
            source,
        })
    };
    let [ca_path, cert_path, key_path] = &paths;
    let (ca, cert, key) = (read(ca_path)?, read(cert_path)?, read(key_path)?);
    for (path, bytes) in [(ca_path, &ca), (cert_path, &cert)] {
        if CertificateDer::pem_slice_iter(bytes)
            .find_map(Result::ok)
            .is_none()
        {
            return Err(HostError::BadSource {
                path: path.clone(),
                problem: "holds no PEM certificate".to_string(),
            });
        }
    }
    if PrivateKeyDer::from_pem_slice(&key).is_err() {
        return Err(HostError::BadSource {
            path: key_path.clone(),
            problem: "holds no unencrypted PEM private key".to_string(),
        });
    }
    Ok(Sources { ca, cert, key })
}

/// `target` relative to the directory of `link` (both absolute host paths).
fn relative_target(link: &Path, target: &Path) -> PathBuf {
    let base: Vec<_> = link
        .parent()
        .map(|p| p.components().collect())
        .unwrap_or_default();
    let to: Vec<_> = target.components().collect();
    let common = base.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..base.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, HostError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => fs::read(path).map(Some).map_err(|source| HostError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostError::Io {
            action: "inspect",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The metadata of a configuration file (its symlinks already resolved); `None` when it does
/// not exist yet. Anything but a regular file is an error: it cannot be edited.
fn config_metadata(path: &Path) -> Result<Option<fs::Metadata>, HostError> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => Ok(Some(meta)),
        Ok(_) => Err(HostError::BadConfig {
            path: path.to_path_buf(),
            problem: "is not a regular file".to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HostError::Io {
            action: "inspect",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The owner and group a written file gets; `None`: whoever writes it (the group: its
/// default).
#[derive(Debug, Clone, Copy, Default)]
struct Owner {
    uid: Option<u32>,
    gid: Option<u32>,
}

#[derive(Default)]
struct Planner {
    actions: Vec<Action>,
    unchanged: Vec<PathBuf>,
}

impl Planner {
    /// Step 2: the PKI directory and its files, copied from CloudStack's.
    fn pki_files(&mut self, pki_dir: &Path, sources: &Sources) -> Result<(), HostError> {
        let key_gid = key_gid();
        let pki_files: [(&str, &[u8], u32, Option<u32>); 6] = [
            (pki::CA_CERT, &sources.ca, CERT_MODE, None),
            (pki::SERVER_CERT, &sources.cert, CERT_MODE, None),
            (pki::SERVER_KEY, &sources.key, KEY_MODE, key_gid),
            (pki::CLIENT_CERT, &sources.cert, CERT_MODE, None),
            (pki::CLIENT_KEY, &sources.key, KEY_MODE, key_gid),
            // A standard group, so QEMU never generates DH parameters on the migration path.
            (
                pki::DH_PARAMS,
                pki::FFDHE2048_PEM.as_bytes(),
                CERT_MODE,
                None,
            ),
        ];
        self.dir(pki_dir)?;
        for (name, contents, mode, gid) in pki_files {
            let owner = Owner { uid: None, gid };
            self.file(&pki_dir.join(name), contents.to_vec(), mode, owner, false)?;
        }
        Ok(())
    }

    fn dir(&mut self, path: &Path) -> Result<(), HostError> {
        if path.is_dir() || self.actions.iter().any(|a| a.path() == path) {
            return Ok(());
        }
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            self.dir(parent)?;
        }
        self.actions.push(Action::CreateDir {
            path: path.to_path_buf(),
            mode: DIR_MODE,
        });
        Ok(())
    }

    fn file(
        &mut self,
        path: &Path,
        contents: Vec<u8>,
        mode: u32,
        owner: Owner,
        text: bool,
    ) -> Result<(), HostError> {
        let old = read_optional(path)?;
        let same_contents = old.as_deref() == Some(contents.as_slice());
        let meta = fs::symlink_metadata(path).ok();
        let same_mode = meta.as_ref().is_some_and(|m| m.mode() & 0o7777 == mode);
        let same_user = owner
            .uid
            .is_none_or(|uid| meta.as_ref().is_some_and(|m| m.uid() == uid));
        let same_group = owner
            .gid
            .is_none_or(|gid| meta.as_ref().is_some_and(|m| m.gid() == gid));
        if same_contents && same_mode && same_user && same_group {
            self.unchanged.push(path.to_path_buf());
            return Ok(());
        }
        self.actions.push(Action::WriteFile {
            path: path.to_path_buf(),
            contents,
            mode,
            uid: owner.uid,
            gid: owner.gid,
            old,
            text,
        });
        Ok(())
    }

    fn symlink(&mut self, path: &Path, target: PathBuf) -> Result<(), HostError> {
        let replaces = match fs::read_link(path) {
            Ok(current) if current == target => {
                self.unchanged.push(path.to_path_buf());
                return Ok(());
            }
            Ok(_) => true,
            Err(_) => path.symlink_metadata().is_ok(),
        };
        self.actions.push(Action::Symlink {
            path: path.to_path_buf(),
            target,
            replaces,
        });
        Ok(())
    }
}

fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(BACKUP_SUFFIX);
    PathBuf::from(name)
}

impl SecurePlan {
    /// True when the host is already as `host secure` leaves it.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The changes, for the report.
    pub fn changes(&self) -> Vec<AppliedChange> {
        self.actions
            .iter()
            .map(|action| {
                let backup_at = backup_path(action.path());
                let backup = (action.replaces() && backup_at.symlink_metadata().is_err())
                    .then_some(backup_at);
                AppliedChange {
                    path: action.path().to_path_buf(),
                    action: action.kind(),
                    backup,
                }
            })
            .collect()
    }

    /// A unified diff of the configuration changes, and one line per other change.
    pub fn diff(&self) -> String {
        let mut out = String::new();
        for action in &self.actions {
            match action {
                Action::CreateDir { path, mode } => {
                    out.push_str(&format!("mkdir -m {mode:04o} {}\n", path.display()));
                }
                Action::Symlink { path, target, .. } => {
                    out.push_str(&format!("ln -sf {} {}\n", target.display(), path.display()));
                }
                Action::WriteFile {
                    path,
                    contents,
                    mode,
                    old,
                    text: true,
                    ..
                } => {
                    let old_text =
                        String::from_utf8_lossy(old.as_deref().unwrap_or_default()).into_owned();
                    let new_text = String::from_utf8_lossy(contents);
                    let old_name = if old.is_some() {
                        path.display().to_string()
                    } else {
                        "/dev/null".to_string()
                    };
                    let d = super::diff::unified(
                        &old_text,
                        &new_text,
                        &old_name,
                        &path.display().to_string(),
                    );
                    if d.is_empty() {
                        out.push_str(&format!("chmod {mode:04o} {}\n", path.display()));
                    } else {
                        out.push_str(&d);
                    }
                }
                Action::WriteFile {
                    path,
                    mode,
                    old,
                    text: false,
                    ..
                } => {
                    let verb = if old.is_some() { "replace" } else { "write" };
                    out.push_str(&format!(
                        "{verb} {} (mode {mode:04o}; contents not shown)\n",
                        path.display()
                    ));
                }
            }
        }
        out
    }

    /// Makes the changes: directories, then files (atomically), then symlinks; whatever is
    /// replaced is first backed up once to `<path>.qemu-tls-migrate.orig`. When PKI files are
    /// to be written, the same files are first written to a staging directory beside the PKI
    /// directory and must pass every check of `pki check` (a renewal caught half-way, a
    /// certificate that does not match its key or CA): otherwise nothing is changed.
    pub fn apply(&self) -> Result<Vec<AppliedChange>, HostError> {
        let writes_pki = self.actions.iter().any(
            |a| matches!(a, Action::WriteFile { path, .. } if path.parent() == Some(&self.pki_dir)),
        );
        if writes_pki {
            super::cloudstack::check_staged(&self.source_dir, &self.pki_dir)?;
        }
        self.apply_unchecked()
    }

    /// [`SecurePlan::apply`] without the staged check.
    pub(super) fn apply_unchecked(&self) -> Result<Vec<AppliedChange>, HostError> {
        let changes = self.changes();
        for (action, change) in self.actions.iter().zip(&changes) {
            if let Some(backup) = &change.backup {
                copy_entry(action.path(), backup)?;
                tracing::info!(path = %action.path().display(), backup = %backup.display(), "backed up");
            }
            match action {
                Action::CreateDir { path, mode } => create_dir(path, *mode)?,
                Action::WriteFile {
                    path,
                    contents,
                    mode,
                    uid,
                    gid,
                    ..
                } => {
                    let owner = Owner {
                        uid: *uid,
                        gid: *gid,
                    };
                    write_file(path, contents, *mode, owner)?;
                }
                Action::Symlink { path, target, .. } => make_symlink(path, target)?,
            }
            tracing::info!(path = %action.path().display(), action = action.kind(), "host secure");
        }
        Ok(changes)
    }
}

pub(super) fn io_err(
    action: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> HostError {
    let path = path.to_path_buf();
    move |source| HostError::Io {
        action,
        path,
        source,
    }
}

/// Copies what is at `path` to `backup`, durably: a symlink as the same symlink, a file with
/// its mode, owner and group; an existing `backup` is never replaced. (A file's one-time
/// backup; each entry of the PKI directory's copy a refresh swaps in.)
pub(super) fn copy_entry(path: &Path, backup: &Path) -> Result<(), HostError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.file_type().is_symlink() {
        let target = fs::read_link(path).map_err(io_err("read the link", path))?;
        // symlink(2) fails if the backup is there: it is never replaced.
        std::os::unix::fs::symlink(target, backup).map_err(io_err("back up to", backup))?;
        sync_parent(backup)?;
    } else {
        let mut original = fs::File::open(path).map_err(io_err("read", path))?;
        let owner = Owner {
            uid: Some(meta.uid()),
            gid: Some(meta.gid()),
        };
        let mut tmp = temp_next_to(backup, meta.mode() & 0o7777, owner)?;
        std::io::copy(&mut original, tmp.as_file_mut()).map_err(io_err("back up to", backup))?;
        tmp.as_file()
            .sync_all()
            .map_err(io_err("back up to", backup))?;
        tmp.persist_noclobber(backup)
            .map_err(|e| io_err("back up to", backup)(e.error))?;
        sync_parent(backup)?;
    }
    Ok(())
}

fn create_dir(path: &Path, mode: u32) -> Result<(), HostError> {
    fs::create_dir(path).map_err(io_err("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", path))?;
    sync_parent(path)
}

/// Replaces `path` atomically and durably with `contents` (steps 1-4 of the module docs).
fn write_file(path: &Path, contents: &[u8], mode: u32, owner: Owner) -> Result<(), HostError> {
    let mut tmp = temp_next_to(path, mode, owner)?;
    tmp.write_all(contents).map_err(io_err("write", path))?;
    tmp.as_file().sync_all().map_err(io_err("write", path))?;
    tmp.persist(path)
        .map_err(|e| io_err("replace", path)(e.error))?;
    sync_parent(path)
}

/// An empty temporary file in `path`'s directory (so a rename over `path` is atomic), with
/// `owner` and `mode`. It is created 0600, so nothing can read it before its mode is set.
fn temp_next_to(
    path: &Path,
    mode: u32,
    owner: Owner,
) -> Result<tempfile::NamedTempFile, HostError> {
    let parent = parent_dir(path);
    let tmp =
        tempfile::NamedTempFile::new_in(parent).map_err(io_err("create a file next to", path))?;
    set_owner(tmp.as_file(), path, owner)?;
    // After the chown, which may clear set-id bits.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err("set the mode of", path))?;
    Ok(tmp)
}

/// Gives `file` (about to become `path`) `owner`. As root a failure is an error; otherwise only
/// a group we are in can be given, and a failure is logged: the file stays ours, as any file a
/// non-root user writes.
fn set_owner(file: &fs::File, path: &Path, owner: Owner) -> Result<(), HostError> {
    let meta = file.metadata().map_err(io_err("inspect", path))?;
    let uid = owner.uid.filter(|&uid| uid != meta.uid());
    let gid = owner.gid.filter(|&gid| gid != meta.gid());
    if uid.is_none() && gid.is_none() {
        return Ok(());
    }
    let result = nix::unistd::fchown(
        file.as_fd(),
        uid.map(nix::unistd::Uid::from_raw),
        gid.map(nix::unistd::Gid::from_raw),
    );
    match result {
        Ok(()) => Ok(()),
        Err(errno) if nix::unistd::geteuid().is_root() => {
            Err(io_err("set the owner and group of", path)(
                std::io::Error::from(errno),
            ))
        }
        Err(errno) => {
            tracing::warn!(
                path = %path.display(),
                uid, gid, %errno,
                "not root: cannot give the file its owner and group; it stays ours"
            );
            Ok(())
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// `fsync`s the directory holding `path`, so that a rename or new entry there is durable.
pub(super) fn sync_parent(path: &Path) -> Result<(), HostError> {
    let dir = parent_dir(path);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync the directory", dir))
}

fn make_symlink(path: &Path, target: &Path) -> Result<(), HostError> {
    // Make the link next to it, then rename over: the path is never missing.
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".qemu-tls-migrate.tmp");
    let tmp = PathBuf::from(tmp_name);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io_err("create the symlink", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("replace", path))?;
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_targets_point_into_the_pki_dir() {
        assert_eq!(
            relative_target(
                Path::new("/etc/pki/libvirt/private/serverkey.pem"),
                Path::new("/etc/pki/qemu/server-key.pem")
            ),
            PathBuf::from("../../qemu/server-key.pem")
        );
        assert_eq!(
            relative_target(
                Path::new("/etc/pki/CA/cacert.pem"),
                Path::new("/etc/pki/qemu/ca-cert.pem")
            ),
            PathBuf::from("../qemu/ca-cert.pem")
        );
    }

    #[test]
    fn templates_hold_the_settings_the_issue_asks_for() {
        let qemu = qemu_conf_settings(Path::new("/etc/pki/qemu"));
        let libvirtd = libvirtd_conf_settings();

        let keys = |s: &[Setting]| s.iter().map(|s| s.key.clone()).collect::<Vec<_>>();
        assert_eq!(
            keys(&qemu),
            ["default_tls_x509_cert_dir", "default_tls_x509_verify"]
        );
        assert_eq!(qemu[0].value, "\"/etc/pki/qemu\"");
        assert_eq!(
            keys(&libvirtd),
            [
                "listen_tls",
                "listen_tcp",
                "tls_port",
                "auth_tls",
                "key_file",
                "cert_file",
                "ca_file"
            ]
        );
        assert!(NFT_TEMPLATE.contains("16514, 16515, 49152-49215"));
        assert!(IPTABLES_TEMPLATE.contains("49152:49215"));
    }

    #[test]
    fn the_follower_repeats_this_run_and_watches_its_agent_dir() {
        let options = SecureOptions {
            root: PathBuf::from("/tmp/r"),
            from: Some(PathBuf::from("/srv/cloud stack/agent")),
            pki_dir: PathBuf::from("/etc/pki/qemu-cs"),
            exec: Some(PathBuf::from("/opt/qtm/bin/qemu-tls-migrate")),
        };

        let service = render_service_unit(&options.command_line());
        let path = render_path_unit(&options.host_source_dir());

        assert!(
            service.contains(
                "\nExecStart=/opt/qtm/bin/qemu-tls-migrate host secure --from \
                 \"/srv/cloud stack/agent\" --pki-dir /etc/pki/qemu-cs\n"
            ),
            "{service}"
        );
        assert!(!service.contains(TEMPLATE_EXEC_START), "{service}");
        for name in ["cloud.crt", "cloud.ca.crt", "cloud.key"] {
            assert!(
                path.contains(&format!("\nPathChanged=/srv/cloud stack/agent/{name}\n")),
                "{path}"
            );
        }
        assert!(!path.contains("PathChanged=/etc/cloudstack"), "{path}");
    }

    #[test]
    fn the_default_follower_is_the_packaged_unit() {
        let options = SecureOptions::new("/");

        assert_eq!(
            render_service_unit(&options.command_line()),
            RENEW_SERVICE_TEMPLATE
        );
        assert_eq!(
            render_path_unit(&options.host_source_dir()),
            RENEW_PATH_TEMPLATE
        );
    }

    #[test]
    fn missing_sources_are_an_error_touching_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");

        let err = plan_secure(&SecureOptions::new(tmp.path())).expect_err("missing");

        assert!(matches!(err, HostError::MissingSource { ref paths } if paths.len() == 3));
        assert_eq!(fs::read_dir(tmp.path()).expect("dir").count(), 0);
    }
}
