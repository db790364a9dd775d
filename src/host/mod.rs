//! Host set-up: CloudStack's "secure this KVM host" step, and the secured-host flag.
//!
//! - [`plan_secure`] works out what `host secure` changes under a root directory: the PKI
//!   directory from CloudStack's agent certificates, the libvirt certificate paths as symlinks
//!   into it, `qemu.conf`/`libvirtd.conf` settings, and firewall rules. [`SecurePlan::diff`]
//!   shows it (`--dry-run`), [`SecurePlan::apply`] does it.
//! - [`status`] answers whether the host is secured, and why not (`host status`).
//!
//! The settings and rules come from the templates in `qemu-conf/` (compiled in).
//!
//! Symlinks on the way to a configuration file are followed as the host would follow them,
//! with `root` as `/` ([`resolve_under`]): a managed `qemu.conf -> /srv/cm/qemu.conf` is
//! edited in `<root>/srv/cm/qemu.conf`, never outside `root`.

pub mod cloudstack;
mod conf;
mod diff;
mod secure;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

pub use conf::{Setting, apply as apply_settings, get as get_setting, parse_settings};
pub use diff::unified as unified_diff;
pub use secure::{
    Action, AppliedChange, SecureOptions, SecurePlan, SecureReport, plan_secure, render_template,
};

/// Where CloudStack's agent keeps the host's certificate, key and CA certificate.
pub const DEFAULT_CLOUDSTACK_DIR: &str = "/etc/cloudstack/agent";
/// CloudStack's CA certificate file name.
pub const CLOUDSTACK_CA: &str = "cloud.ca.crt";
/// CloudStack's host certificate file name.
pub const CLOUDSTACK_CERT: &str = "cloud.crt";
/// CloudStack's host private key file name.
pub const CLOUDSTACK_KEY: &str = "cloud.key";

/// libvirt's QEMU driver configuration.
pub const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// libvirtd's configuration.
pub const LIBVIRTD_CONF: &str = "/etc/libvirt/libvirtd.conf";
/// The CA certificate where libvirt (and `virt-pki-validate`) look for it.
pub const LIBVIRT_CA_CERT: &str = "/etc/pki/CA/cacert.pem";
/// libvirt's server certificate.
pub const LIBVIRT_SERVER_CERT: &str = "/etc/pki/libvirt/servercert.pem";
/// libvirt's client certificate.
pub const LIBVIRT_CLIENT_CERT: &str = "/etc/pki/libvirt/clientcert.pem";
/// libvirt's server key.
pub const LIBVIRT_SERVER_KEY: &str = "/etc/pki/libvirt/private/serverkey.pem";
/// libvirt's client key.
pub const LIBVIRT_CLIENT_KEY: &str = "/etc/pki/libvirt/private/clientkey.pem";
/// The nftables rules file `host secure` writes.
pub const NFT_RULES: &str = "/etc/nftables.d/qemu-tls-migrate.nft";
/// The iptables alternative (`iptables-restore --noflush`).
pub const IPTABLES_RULES: &str = "/etc/iptables/qemu-tls-migrate.rules";
/// The renewal follower's path unit `host secure` writes (watches `cloud.*`).
pub const RENEW_PATH_UNIT: &str = "/etc/systemd/system/qemu-tls-migrate-renew.path";
/// The oneshot service it starts (`host secure` again).
pub const RENEW_SERVICE_UNIT: &str = "/etc/systemd/system/qemu-tls-migrate-renew.service";
/// The link that enables the path unit (what `systemctl enable` makes).
pub const RENEW_PATH_WANTS: &str =
    "/etc/systemd/system/paths.target.wants/qemu-tls-migrate-renew.path";
/// libvirt's qemu hook `host secure` writes (the Debian package ships the same file): it runs
/// `host libvirt-hook`.
pub const LIBVIRT_HOOK: &str = "/etc/libvirt/hooks/qemu.d/qemu-tls-migrate";
/// Where the binary is installed by the Debian package.
pub const INSTALLED_BINARY: &str = "/usr/bin/qemu-tls-migrate";
/// Suffix of the one-time backup of a file `host secure` changes.
pub const BACKUP_SUFFIX: &str = ".qemu-tls-migrate.orig";

/// libvirtd's TLS port (libvirt's default `tls_port`).
pub const LIBVIRTD_TLS_PORT: u16 = 16514;
/// The port range QEMU migration and NBD streams use (libvirt's `migration_port_min`/`max`
/// defaults are 49152-49215).
pub const MIGRATION_PORTS: std::ops::RangeInclusive<u16> = 49152..=49215;

/// Why `host secure` could not do its work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// CloudStack's certificate files are not all there; nothing was changed.
    #[error(
        "missing CloudStack certificate files {}; nothing was changed: run CloudStack's \
         certificate provisioning for this host, or pass --from DIR",
        paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    MissingSource { paths: Vec<PathBuf> },
    /// A CloudStack certificate file is not what it should be; nothing was changed.
    #[error("{}: {problem}; nothing was changed: fix or re-provision the file", path.display())]
    BadSource { path: PathBuf, problem: String },
    /// A configuration file to edit is not a regular file, or its symlinks do not resolve.
    #[error("{}: {problem}; nothing was changed: make it a regular file or a symlink to one", path.display())]
    BadConfig { path: PathBuf, problem: String },
    /// The PKI directory QEMU reads does not hold CloudStack's current certificates (a
    /// renewal was not followed), and was not refreshed.
    #[error(
        "the PKI directory {} does not hold CloudStack's current certificates ({}); {why}; run \
         `qemu-tls-migrate host secure` (its renewal follower, qemu-tls-migrate-renew.path, \
         keeps them in step)",
        pki_dir.display(),
        files
            .iter()
            .map(|f| format!("{} {} from {}", f.copy.display(), f.state, f.source.display()))
            .collect::<Vec<_>>()
            .join(", ")
    )]
    StalePki {
        pki_dir: PathBuf,
        files: Vec<cloudstack::StaleFile>,
        why: String,
    },
    /// CloudStack's files, as they would be laid out, fail the checks of `pki check`;
    /// nothing was written.
    #[error(
        "CloudStack's certificates in {} fail the PKI checks ({}); nothing was written: fix \
         or re-provision them through CloudStack (a renewal caught half-way: run it again once \
         all three files are written)",
        source_dir.display(),
        problems.join("; ")
    )]
    RenewedUnusable {
        source_dir: PathBuf,
        problems: Vec<String>,
    },
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {}: check the path and its permissions", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `path` (absolute, as on the host) placed under `root`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// How many symlinks [`resolve_under`] follows before calling it a loop (Linux's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// `path` (absolute, as on the host) placed under `root` with every symlink on the way
/// followed as the host would: an absolute link target starts again at `root`, and `..`
/// stops at `root`. Parts that do not exist are kept as named.
pub fn resolve_under(root: &Path, path: &Path) -> Result<PathBuf, HostError> {
    let mut pending: VecDeque<OsString> = names(path).collect();
    let mut resolved = PathBuf::from("/");
    let mut hops = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&name);
        let on_disk = under(root, &candidate);
        let is_link = std::fs::symlink_metadata(&on_disk).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            resolved = candidate;
            continue;
        }
        hops += 1;
        if hops > MAX_SYMLINK_HOPS {
            return Err(HostError::BadConfig {
                path: under(root, path),
                problem: "too many levels of symbolic links".to_string(),
            });
        }
        let target = std::fs::read_link(&on_disk).map_err(|source| HostError::Io {
            action: "read the link",
            path: on_disk.clone(),
            source,
        })?;
        if target.is_absolute() {
            resolved = PathBuf::from("/");
        }
        for part in names(&target).collect::<Vec<_>>().into_iter().rev() {
            pending.push_front(part);
        }
    }
    Ok(under(root, &resolved))
}

/// The names in `path`, `..` included, without the root and `.`.
fn names(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

/// A configuration file under `root` (through its symlinks), as text for reading settings;
/// empty when it cannot be read. Bytes that are not UTF-8 become U+FFFD, which no setting
/// we read contains.
fn read_config(root: &Path, file: &str) -> String {
    let bytes = resolve_under(root, Path::new(file))
        .ok()
        .and_then(|path| std::fs::read(path).ok())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The secured-host flag, as the agent reports it to the management server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostStatus {
    /// True when the PKI directory is usable for migration in both roles.
    pub secured: bool,
    /// Why not: one line per problem, each naming the file and what to do.
    pub reasons: Vec<String>,
    /// The PKI directory checked (as on the host, not under `--root`).
    pub pki_dir: PathBuf,
    /// Configuration that differs from what `host secure` sets; does not affect `secured`.
    pub warnings: Vec<String>,
    /// Whether libvirt's own native-TLS migration (`virsh migrate --tls`, CloudStack's
    /// primary path, with this tool as its fallback) would work on this host.
    pub libvirt_tls_migration: LibvirtTlsStatus,
    /// CloudStack's own verdict (`cloud.crt` next to `agent.properties`, and the
    /// `qemu+tls://<privateIp>/system` self-connect), and whether the PKI directory holds the
    /// agent's current certificates.
    pub cloudstack: cloudstack::CloudStackStatus,
    /// When CloudStack's verdict and `secured` differ: a sentence naming both (`--transport
    /// auto` refuses then).
    pub disagreement: Option<String>,
}

/// What `virsh migrate --tls` needs of this host: QEMU's PKI directory usable (libvirt's
/// `migrate_tls_x509_cert_dir` defaults to it), libvirt's own certificates for the
/// `qemu+tls://` connection between the two libvirtds, and libvirtd listening with TLS.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LibvirtTlsStatus {
    pub ready: bool,
    /// Why not: one line per problem, each naming the file or setting and what to do.
    pub reasons: Vec<String>,
}

/// Whether the host under `root` is secured: its PKI directory (`qemu.conf`'s
/// `default_tls_x509_cert_dir`, else [`crate::pki::DEFAULT_PKI_DIR`]) is usable for both roles.
/// `qemu.conf`/`libvirtd.conf` settings that differ from `host secure`'s are warnings, and so
/// is a PKI directory that does not hold CloudStack's current certificates. CloudStack's own
/// verdict is reported beside it, with `self_connect` as the caller probed it (libvirt sits
/// above this module).
pub fn status(root: &Path, self_connect: cloudstack::SelfConnect) -> HostStatus {
    let pki_dir = get_setting(&read_config(root, QEMU_CONF), "default_tls_x509_cert_dir")
        .map(|v| PathBuf::from(conf::unquoted(&v)))
        .unwrap_or_else(|| PathBuf::from(crate::pki::DEFAULT_PKI_DIR));
    let report = crate::pki::check_dir(&under(root, &pki_dir), None);
    let reasons: Vec<String> = report
        .findings
        .iter()
        .filter(|f| f.severity == crate::pki::Severity::Error)
        .map(crate::pki::Finding::reason)
        .collect();
    let mut warnings = Vec::new();
    let wanted = [
        (QEMU_CONF, secure::qemu_conf_settings(&pki_dir)),
        (LIBVIRTD_CONF, secure::libvirtd_conf_settings()),
    ];
    for (file, settings) in wanted {
        let text = read_config(root, file);
        for setting in settings {
            let current = get_setting(&text, &setting.key);
            if !current
                .as_deref()
                .is_some_and(|v| conf::same_value(v, &setting.value))
            {
                warnings.push(format!(
                    "{file}: {} is {}, not {}; run `qemu-tls-migrate host secure`",
                    setting.key,
                    current.unwrap_or_else(|| "unset".to_string()),
                    setting.value
                ));
            }
        }
    }
    let secured = reasons.is_empty();
    let libvirt_tls_migration = libvirt_tls_status(root, secured);
    let cloudstack = cloudstack::cloudstack_status(
        &under(root, Path::new(DEFAULT_CLOUDSTACK_DIR)),
        Path::new(DEFAULT_CLOUDSTACK_DIR),
        &under(root, &pki_dir),
        self_connect,
    );
    if let cloudstack::Agreement::Stale { files } = &cloudstack.pki {
        warnings.push(format!(
            "{}: {} not hold CloudStack's current certificates (a renewal was not followed); \
             run `qemu-tls-migrate host secure`",
            files
                .iter()
                .map(|f| f.copy.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            if files.len() == 1 { "does" } else { "do" }
        ));
    }
    let disagreement = cloudstack::disagreement(&cloudstack, secured, &pki_dir);
    tracing::debug!(
        secured,
        reasons = reasons.len(),
        cloudstack = cloudstack.secured,
        "host status"
    );
    HostStatus {
        secured,
        reasons,
        pki_dir,
        warnings,
        libvirt_tls_migration,
        cloudstack,
        disagreement,
    }
}

/// See [`LibvirtTlsStatus`].
fn libvirt_tls_status(root: &Path, qemu_pki_usable: bool) -> LibvirtTlsStatus {
    let mut reasons = Vec::new();
    if !qemu_pki_usable {
        reasons.push(
            "QEMU's PKI directory is not usable (see reasons above); libvirt's migration TLS \
             uses it too"
                .to_string(),
        );
    }
    for file in [
        LIBVIRT_CA_CERT,
        LIBVIRT_SERVER_CERT,
        LIBVIRT_SERVER_KEY,
        LIBVIRT_CLIENT_CERT,
        LIBVIRT_CLIENT_KEY,
    ] {
        // Through symlinks, as libvirtd reads it (`host secure` links these into the PKI dir).
        let present = resolve_under(root, Path::new(file))
            .ok()
            .and_then(|p| std::fs::metadata(p).ok())
            .is_some_and(|m| m.is_file());
        if !present {
            reasons.push(format!(
                "{file}: missing; libvirtd needs it for qemu+tls:// between hosts (run \
                 `qemu-tls-migrate host secure`)"
            ));
        }
    }
    let libvirtd_conf = read_config(root, LIBVIRTD_CONF);
    let listen_tls = get_setting(&libvirtd_conf, "listen_tls");
    if listen_tls
        .as_deref()
        .is_some_and(|v| conf::unquoted(v) == "0")
    {
        reasons.push(format!(
            "{LIBVIRTD_CONF}: listen_tls is 0; set it to 1 and run libvirtd with --listen (or \
             its TLS socket unit) so the other host's libvirtd can reach port \
             {LIBVIRTD_TLS_PORT}"
        ));
    }
    LibvirtTlsStatus {
        ready: reasons.is_empty(),
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn resolve_under_follows_an_absolute_link_inside_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("etc/libvirt")).expect("mkdir");
        symlink(
            "/srv/cm/qemu.conf",
            root.path().join("etc/libvirt/qemu.conf"),
        )
        .expect("link");

        let resolved = resolve_under(root.path(), Path::new(QEMU_CONF)).expect("resolve");

        assert_eq!(resolved, root.path().join("srv/cm/qemu.conf"));
    }

    #[test]
    fn resolve_under_stops_dot_dot_at_root() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("etc/libvirt")).expect("mkdir");
        symlink(
            "../../../../../cm/qemu.conf",
            root.path().join("etc/libvirt/qemu.conf"),
        )
        .expect("link");

        let resolved = resolve_under(root.path(), Path::new(QEMU_CONF)).expect("resolve");

        assert_eq!(resolved, root.path().join("cm/qemu.conf"));
    }

    #[test]
    fn resolve_under_follows_a_linked_directory_and_chained_links() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("srv/libvirt")).expect("mkdir");
        std::fs::create_dir(root.path().join("etc")).expect("mkdir");
        symlink("/srv/libvirt", root.path().join("etc/libvirt")).expect("link");
        symlink("qemu.conf.v2", root.path().join("srv/libvirt/qemu.conf")).expect("link");

        let resolved = resolve_under(root.path(), Path::new(QEMU_CONF)).expect("resolve");

        assert_eq!(resolved, root.path().join("srv/libvirt/qemu.conf.v2"));
    }

    #[test]
    fn resolve_under_symlink_loop_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("etc/libvirt")).expect("mkdir");
        symlink("qemu.conf", root.path().join("etc/libvirt/qemu.conf")).expect("link");

        let err = resolve_under(root.path(), Path::new(QEMU_CONF)).expect_err("a loop");

        assert!(
            matches!(err, HostError::BadConfig { ref path, .. }
                if *path == root.path().join("etc/libvirt/qemu.conf")),
            "{err:?}"
        );
    }
}
