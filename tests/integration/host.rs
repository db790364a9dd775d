//! `host secure` and `host status` through the binary, on a temporary root holding a realistic
//! CloudStack agent directory and Debian's stock `qemu.conf`/`libvirtd.conf` (abridged).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use qemu_tls_migrate::pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, HostCert, LabCa, SERVER_CERT};
use serde_json::Value;
use tempfile::TempDir;

use crate::fixture::Cli;

/// Abridged from Debian 12's /etc/libvirt/qemu.conf: the TLS block and its neighbours.
const STOCK_QEMU_CONF: &str = r#"# Main configuration file for the QEMU driver.
# All settings described here are optional - if omitted, sensible
# defaults are used.

# Use of TLS requires that x509 certificates be issued. The default is
# to keep them in /etc/pki/qemu. This directory must contain
#
#  ca-cert.pem - the CA master certificate
#  server-cert.pem - the server certificate signed with ca-cert.pem
#  server-key.pem  - the server private key
#
# and optionally may contain
#
#  dh-params.pem - the DH params configuration file
#
#default_tls_x509_cert_dir = "/etc/pki/qemu"


# The default TLS configuration only uses certificates for the server
# allowing the client to verify the server's identity and establish
# an encrypted channel.
#
# It is possible to use x509 certificates for authentication too, by
# issuing an x509 certificate to every client who needs to connect.
#
# Enabling this option will reject any client who does not have a
# certificate signed by the CA in /etc/pki/qemu/ca-cert.pem
#
#default_tls_x509_verify = 1

vnc_listen = "0.0.0.0"
#user = "qemu"
security_driver = "none"
"#;

/// Abridged from Debian 12's /etc/libvirt/libvirtd.conf, with TCP turned on as some hosts have.
const STOCK_LIBVIRTD_CONF: &str = r#"# Master libvirt daemon configuration file
#

#################################################################
#
# Network connectivity controls
#

# Flag listening for secure TLS connections on the public TCP/IP port.
#listen_tls = 0

# Listen for unencrypted TCP connections on the public TCP/IP port.
listen_tcp = 1

# Override the port for accepting secure TLS connections
#tls_port = "16514"

#listen_addr = "192.168.0.1"

unix_sock_group = "libvirt"
unix_sock_rw_perms = "0770"

# Change the authentication scheme for TLS sockets.
#auth_tls = "none"

#################################################################
#
# TLS x509 certificate configuration
#

# Override the default server key file path
#key_file = "/etc/pki/libvirt/private/serverkey.pem"

# Override the default server certificate file path
#cert_file = "/etc/pki/libvirt/servercert.pem"

# Override the default CA certificate path
#ca_file = "/etc/pki/CA/cacert.pem"

log_level = 3
"#;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A root with CloudStack's agent certificates (one certificate for both roles, as
/// CloudStack's CA issues it, named after host-a) and the stock configuration files.
fn cloudstack_root() -> TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let agent = root.path().join("etc/cloudstack/agent");
    fs::create_dir_all(&agent).expect("mkdir");
    let ca = LabCa::generate("CloudStack CA").expect("ca");
    let (cert, key) = ca
        .issue_dual_pem(&HostCert::new(vec!["host-a".to_string()]))
        .expect("issue");
    fs::write(agent.join("cloud.ca.crt"), ca.cert_pem()).expect("write");
    fs::write(agent.join("cloud.crt"), cert).expect("write");
    fs::write(agent.join("cloud.key"), key).expect("write");
    fs::set_permissions(agent.join("cloud.key"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let libvirt = root.path().join("etc/libvirt");
    fs::create_dir_all(&libvirt).expect("mkdir");
    fs::write(libvirt.join("qemu.conf"), STOCK_QEMU_CONF).expect("write");
    fs::set_permissions(libvirt.join("qemu.conf"), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    fs::write(libvirt.join("libvirtd.conf"), STOCK_LIBVIRTD_CONF).expect("write");
    root
}

/// Every path under `root` with its contents (or link target) and mode.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (String, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("metadata");
            let what = if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).expect("read_link").display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_string()
            } else {
                String::from_utf8_lossy(&fs::read(&path).expect("read")).into_owned()
            };
            out.insert(path, (what, meta.mode() & 0o7777));
        }
    }
    out
}

fn secure(root: &Path, extra: &[&str]) -> (Output, Value) {
    let mut args = vec!["host", "secure", "--root", path_str(root), "--json"];
    args.extend_from_slice(extra);
    let out = Cli::new(&args).output_blocking();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out, json)
}

/// True when `old`'s lines appear in `new` in the same order, except those in `replaced`.
fn keeps_lines(old: &str, new: &str, replaced: &[&str]) -> bool {
    let mut new_lines = new.lines();
    old.lines()
        .filter(|l| !replaced.contains(l))
        .all(|l| new_lines.any(|n| n == l))
}

#[test]
fn host_secure_root_sets_configs_and_keeps_other_lines() {
    let root = cloudstack_root();

    let (out, report) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    assert_eq!(report["pki"]["usable"], true, "{report:#}");
    let qemu_conf = fs::read_to_string(root.path().join("etc/libvirt/qemu.conf")).expect("read");
    let libvirtd_conf =
        fs::read_to_string(root.path().join("etc/libvirt/libvirtd.conf")).expect("read");
    assert!(qemu_conf.contains(
        "#default_tls_x509_cert_dir = \"/etc/pki/qemu\"\ndefault_tls_x509_cert_dir = \"/etc/pki/qemu\"\n"
    ));
    assert!(qemu_conf.contains("#default_tls_x509_verify = 1\ndefault_tls_x509_verify = 1\n"));
    assert!(keeps_lines(STOCK_QEMU_CONF, &qemu_conf, &[]));
    for line in [
        "listen_tls = 1",
        "listen_tcp = 0",
        "tls_port = \"16514\"",
        "auth_tls = \"none\"",
        "key_file = \"/etc/pki/libvirt/private/serverkey.pem\"",
        "cert_file = \"/etc/pki/libvirt/servercert.pem\"",
        "ca_file = \"/etc/pki/CA/cacert.pem\"",
    ] {
        assert_eq!(
            libvirtd_conf.lines().filter(|l| *l == line).count(),
            1,
            "{line} in\n{libvirtd_conf}"
        );
    }
    assert!(keeps_lines(
        STOCK_LIBVIRTD_CONF,
        &libvirtd_conf,
        &["listen_tcp = 1"]
    ));
    assert_eq!(
        fs::read_to_string(
            root.path()
                .join("etc/libvirt/libvirtd.conf.qemu-tls-migrate.orig")
        )
        .expect("backup"),
        STOCK_LIBVIRTD_CONF
    );
    assert_eq!(
        fs::metadata(root.path().join("etc/libvirt/qemu.conf"))
            .expect("meta")
            .mode()
            & 0o777,
        0o600
    );
}

#[test]
fn host_secure_root_lays_out_pki_and_libvirt_symlinks() {
    let root = cloudstack_root();

    let (out, _) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    let pki = root.path().join("etc/pki/qemu");
    let cloud = root.path().join("etc/cloudstack/agent");
    assert_eq!(
        fs::read(pki.join("server-cert.pem")).expect("read"),
        fs::read(cloud.join("cloud.crt")).expect("read")
    );
    assert_eq!(
        fs::read(pki.join("client-key.pem")).expect("read"),
        fs::read(cloud.join("cloud.key")).expect("read")
    );
    assert_eq!(
        fs::metadata(pki.join("server-key.pem"))
            .expect("meta")
            .mode()
            & 0o777,
        0o640
    );
    assert_eq!(
        fs::read_link(root.path().join("etc/pki/libvirt/private/serverkey.pem")).expect("link"),
        PathBuf::from("../../qemu/server-key.pem")
    );
    assert_eq!(
        fs::read(root.path().join("etc/pki/CA/cacert.pem")).expect("through the link"),
        fs::read(cloud.join("cloud.ca.crt")).expect("read")
    );
    let nft = fs::read_to_string(root.path().join("etc/nftables.d/qemu-tls-migrate.nft"))
        .expect("nft rules");
    assert!(
        nft.contains("tcp dport { 16514, 16515, 49152-49215 }"),
        "{nft}"
    );
    let ipt = fs::read_to_string(root.path().join("etc/iptables/qemu-tls-migrate.rules"))
        .expect("iptables rules");
    assert!(ipt.contains("--dports 49152:49215"), "{ipt}");
    assert!(
        ipt.contains("--dport 16515"),
        "the migration service port: {ipt}"
    );
}

/// Runs `host secure` on `root` twice: both succeed, and the second changes nothing (it says
/// so, and every file is as the first left it).
fn assert_a_second_secure_changes_nothing(root: &Path) {
    let (first, _) = secure(root, &[]);
    let after_first = snapshot(root);

    let (second, report) = secure(root, &[]);

    assert!(first.status.success(), "{first:?}");
    assert!(second.status.success(), "{second:?}");
    assert_eq!(report["changes"], serde_json::json!([]), "{report:#}");
    assert_eq!(snapshot(root), after_first);
}

#[test]
fn host_secure_root_twice_changes_nothing() {
    let root = cloudstack_root();

    assert_a_second_secure_changes_nothing(root.path());
}

#[test]
fn host_secure_replaces_existing_libvirt_cert_with_symlink_after_backup() {
    let root = cloudstack_root();
    let old_cert = root.path().join("etc/pki/libvirt/servercert.pem");
    fs::create_dir_all(old_cert.parent().expect("parent")).expect("mkdir");
    fs::write(&old_cert, "old certificate\n").expect("write");

    let (out, _) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    assert!(
        fs::symlink_metadata(&old_cert)
            .expect("meta")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_to_string(
            root.path()
                .join("etc/pki/libvirt/servercert.pem.qemu-tls-migrate.orig")
        )
        .expect("backup"),
        "old certificate\n"
    );
}

#[test]
fn host_secure_dry_run_prints_a_diff_and_changes_nothing() {
    let root = cloudstack_root();
    let before = snapshot(root.path());

    let out = Cli::new([
        "host",
        "secure",
        "--root",
        path_str(root.path()),
        "--dry-run",
    ])
    .output_blocking();

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("-listen_tcp = 1\n+listen_tcp = 0\n"),
        "{text}"
    );
    assert!(text.contains("+default_tls_x509_verify = 1\n"), "{text}");
    assert!(text.contains("@@ "), "{text}");
    assert_eq!(snapshot(root.path()), before);
}

#[test]
fn host_secure_missing_source_cert_is_an_error_touching_nothing() {
    let root = cloudstack_root();
    fs::remove_file(root.path().join("etc/cloudstack/agent/cloud.key")).expect("remove");
    let before = snapshot(root.path());

    let (out, _) = secure(root.path(), &[]);

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("cloud.key"), "{stderr}");
    assert_eq!(snapshot(root.path()), before);
}

#[test]
fn host_secure_from_takes_certs_from_another_dir() {
    let root = cloudstack_root();
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let agent = root.path().join("etc/cloudstack/agent");
    for name in ["cloud.ca.crt", "cloud.crt", "cloud.key"] {
        fs::rename(agent.join(name), elsewhere.path().join(name)).expect("move");
    }

    let (out, report) = secure(root.path(), &["--from", path_str(elsewhere.path())]);

    assert!(out.status.success(), "{out:?}");
    assert_eq!(report["pki"]["usable"], true, "{report:#}");
}

#[test]
fn host_status_reports_unsecured_then_secured() {
    let root = cloudstack_root();
    let status = |root: &Path| {
        let out =
            Cli::new(["host", "status", "--root", path_str(root), "--json"]).output_blocking();
        let json: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
        (out.status.code(), json)
    };

    let (code_before, before) = status(root.path());
    let (secured, _) = secure(root.path(), &[]);
    let (code_after, after) = status(root.path());

    assert_eq!(code_before, Some(1));
    assert_eq!(before["secured"], false);
    let reasons = before["reasons"].as_array().expect("reasons");
    assert!(
        reasons[0]
            .as_str()
            .expect("reason")
            .contains("etc/pki/qemu: directory does not exist"),
        "{before:#}"
    );
    assert!(secured.status.success(), "{secured:?}");
    assert_eq!(code_after, Some(0));
    assert_eq!(after["secured"], true, "{after:#}");
    assert_eq!(after["reasons"], serde_json::json!([]));
    assert_eq!(after["warnings"], serde_json::json!([]));
    assert_eq!(before["libvirt_tls_migration"]["ready"], false);
    assert!(
        before["libvirt_tls_migration"]["reasons"]
            .as_array()
            .is_some_and(|r| r
                .iter()
                .any(|x| x.as_str().is_some_and(|s| s.contains("servercert.pem")))),
        "{before:#}"
    );
    assert_eq!(after["libvirt_tls_migration"]["ready"], true, "{after:#}");
}

#[test]
fn host_secure_edits_symlinked_configs_through_the_link() {
    let root = cloudstack_root();
    let libvirt = root.path().join("etc/libvirt");
    let real = libvirt.join("real");
    fs::create_dir(&real).expect("mkdir");
    let managed_qemu_conf = format!("user = \"libvirt-qemu\"\ngroup = \"kvm\"\n{STOCK_QEMU_CONF}");
    fs::write(real.join("qemu.conf"), &managed_qemu_conf).expect("write");
    fs::rename(libvirt.join("libvirtd.conf"), real.join("libvirtd.conf")).expect("move");
    fs::remove_file(libvirt.join("qemu.conf")).expect("remove");
    // An absolute link (resolved under --root, as on the host) and a relative one.
    std::os::unix::fs::symlink("/etc/libvirt/real/qemu.conf", libvirt.join("qemu.conf"))
        .expect("symlink");
    std::os::unix::fs::symlink("real/libvirtd.conf", libvirt.join("libvirtd.conf"))
        .expect("symlink");

    let (out, _) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        fs::read_link(libvirt.join("qemu.conf")).expect("still a link"),
        PathBuf::from("/etc/libvirt/real/qemu.conf")
    );
    assert_eq!(
        fs::read_link(libvirt.join("libvirtd.conf")).expect("still a link"),
        PathBuf::from("real/libvirtd.conf")
    );
    let qemu_conf = fs::read_to_string(real.join("qemu.conf")).expect("read");
    assert!(
        qemu_conf.contains("\ndefault_tls_x509_cert_dir = \"/etc/pki/qemu\"\n"),
        "{qemu_conf}"
    );
    assert!(
        keeps_lines(&managed_qemu_conf, &qemu_conf, &[]),
        "{qemu_conf}"
    );
    let libvirtd_conf = fs::read_to_string(real.join("libvirtd.conf")).expect("read");
    assert!(
        libvirtd_conf.contains("\nlisten_tls = 1\n"),
        "{libvirtd_conf}"
    );
    assert!(
        keeps_lines(STOCK_LIBVIRTD_CONF, &libvirtd_conf, &["listen_tcp = 1"]),
        "{libvirtd_conf}"
    );
    assert_eq!(
        fs::read_to_string(real.join("qemu.conf.qemu-tls-migrate.orig")).expect("backup"),
        managed_qemu_conf
    );
}

#[test]
fn host_secure_symlinked_configs_twice_changes_nothing() {
    let root = cloudstack_root();
    let libvirt = root.path().join("etc/libvirt");
    fs::create_dir(libvirt.join("real")).expect("mkdir");
    fs::rename(libvirt.join("qemu.conf"), libvirt.join("real/qemu.conf")).expect("move");
    std::os::unix::fs::symlink("/etc/libvirt/real/qemu.conf", libvirt.join("qemu.conf"))
        .expect("symlink");

    assert_a_second_secure_changes_nothing(root.path());
}

#[test]
fn host_secure_keeps_mode_and_owner_of_config_files_and_backups() {
    let root = cloudstack_root();
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd")
        .expect("a nobody user");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let libvirt = root.path().join("etc/libvirt");
    std::os::unix::fs::chown(libvirt.join("qemu.conf"), Some(uid), Some(gid)).expect("chown");
    std::os::unix::fs::chown(libvirt.join("libvirtd.conf"), Some(0), Some(gid)).expect("chown");
    fs::set_permissions(
        libvirt.join("libvirtd.conf"),
        fs::Permissions::from_mode(0o640),
    )
    .expect("chmod");
    let owner_and_mode = |name: &str| {
        let meta = fs::symlink_metadata(libvirt.join(name)).expect("meta");
        (meta.uid(), meta.gid(), meta.mode() & 0o7777)
    };

    let (out, _) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    assert_eq!(owner_and_mode("qemu.conf"), (uid, gid, 0o600));
    assert_eq!(
        owner_and_mode("qemu.conf.qemu-tls-migrate.orig"),
        (uid, gid, 0o600)
    );
    assert_eq!(owner_and_mode("libvirtd.conf"), (0, gid, 0o640));
    assert_eq!(
        owner_and_mode("libvirtd.conf.qemu-tls-migrate.orig"),
        (0, gid, 0o640)
    );
}

#[test]
fn host_secure_keeps_non_utf8_bytes_and_single_quoted_values() {
    let root = cloudstack_root();
    let libvirt = root.path().join("etc/libvirt");
    let qemu_conf: Vec<u8> = [
        b"# Verwaltet von Puppet f\xfcr host-a (latin-1)\n" as &[u8],
        STOCK_QEMU_CONF.as_bytes(),
        b"user = 'qemu'\ngroup = 'kvm' # '#' inside 'quotes' is kept\n",
    ]
    .concat();
    let libvirtd_conf = format!(
        "{STOCK_LIBVIRTD_CONF}listen_addr = '0.0.0.0'\nauth_tls = 'none' # certificates only\n"
    );
    fs::write(libvirt.join("qemu.conf"), &qemu_conf).expect("write");
    fs::write(libvirt.join("libvirtd.conf"), &libvirtd_conf).expect("write");

    let (out, _) = secure(root.path(), &[]);

    assert!(out.status.success(), "{out:?}");
    let qemu_after = fs::read(libvirt.join("qemu.conf")).expect("read");
    assert!(
        qemu_after.starts_with(b"# Verwaltet von Puppet f\xfcr host-a (latin-1)\n"),
        "{}",
        String::from_utf8_lossy(&qemu_after)
    );
    assert!(
        qemu_after.ends_with(b"user = 'qemu'\ngroup = 'kvm' # '#' inside 'quotes' is kept\n"),
        "{}",
        String::from_utf8_lossy(&qemu_after)
    );
    let libvirtd_after = fs::read_to_string(libvirt.join("libvirtd.conf")).expect("read");
    let auth_tls: Vec<&str> = libvirtd_after
        .lines()
        .filter(|l| l.starts_with("auth_tls"))
        .collect();
    assert_eq!(auth_tls, ["auth_tls = 'none' # certificates only"]);
    assert!(
        libvirtd_after.contains("\nlisten_addr = '0.0.0.0'\n"),
        "{libvirtd_after}"
    );
}

#[test]
fn host_status_accepts_single_quoted_values_and_non_utf8_bytes() {
    let root = cloudstack_root();
    let (secured, _) = secure(root.path(), &[]);
    let libvirt = root.path().join("etc/libvirt");
    fs::write(
        libvirt.join("qemu.conf"),
        b"# f\xfcr host-a\ndefault_tls_x509_cert_dir = '/etc/pki/qemu'\ndefault_tls_x509_verify = 1\n",
    )
    .expect("write");
    let libvirtd_conf = fs::read_to_string(libvirt.join("libvirtd.conf")).expect("read");
    fs::write(
        libvirt.join("libvirtd.conf"),
        libvirtd_conf.replace("auth_tls = \"none\"", "auth_tls = 'none'"),
    )
    .expect("write");

    let out =
        Cli::new(["host", "status", "--root", path_str(root.path()), "--json"]).output_blocking();

    let status: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(secured.status.success(), "{secured:?}");
    assert_eq!(status["secured"], true, "{status:#}");
    assert_eq!(status["warnings"], serde_json::json!([]), "{status:#}");
}

#[test]
fn host_secure_config_that_is_a_directory_is_an_error_touching_nothing() {
    let root = cloudstack_root();
    let libvirt = root.path().join("etc/libvirt");
    fs::remove_file(libvirt.join("libvirtd.conf")).expect("remove");
    fs::create_dir(libvirt.join("libvirtd.conf")).expect("mkdir");
    let before = snapshot(root.path());

    let (out, _) = secure(root.path(), &[]);

    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains("libvirtd.conf: is not a regular file"),
        "{stderr}"
    );
    assert_eq!(snapshot(root.path()), before);
}

/// The renewal follower's command line, read off the service unit `host secure` wrote.
fn follower_command(root: &Path) -> Vec<String> {
    let unit = fs::read_to_string(root.join("etc/systemd/system/qemu-tls-migrate-renew.service"))
        .expect("the follower's service unit");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    line.split_whitespace().map(str::to_string).collect()
}

fn status_json(root: &Path) -> (Option<i32>, Value) {
    let out = Cli::new(["host", "status", "--root", path_str(root), "--json"]).output_blocking();
    let json = serde_json::from_slice(&out.stdout).expect("one JSON object");
    (out.status.code(), json)
}

#[test]
fn host_secure_follower_puts_pki_and_links_back_after_keystore_cert_import() {
    let root = cloudstack_root();
    fs::write(
        root.path().join("etc/cloudstack/agent/agent.properties"),
        "host=198.18.0.10\n",
    )
    .expect("write");
    let (secured, _) = secure(root.path(), &[]);
    let renewal_ca = LabCa::generate("CloudStack CA, renewed").expect("ca");
    let server_link = root.path().join("etc/pki/libvirt/servercert.pem");

    crate::fixture::cloudstack::keystore_cert_import(root.path(), &renewal_ca, &["host-a"], 2);
    let (_, stale) = status_json(root.path());
    let repointed = fs::read_link(&server_link).expect("link");
    let mut follower = follower_command(root.path());
    follower.extend(["--root".to_string(), path_str(root.path()).to_string()]);
    let run = std::process::Command::new(&follower[0])
        .args(&follower[1..])
        .output()
        .expect("run the follower's command");
    let (code, after) = status_json(root.path());

    assert!(secured.status.success(), "{secured:?}");
    let wants = root
        .path()
        .join("etc/systemd/system/paths.target.wants/qemu-tls-migrate-renew.path");
    assert_eq!(
        fs::read_link(wants).expect("enabled"),
        PathBuf::from("/etc/systemd/system/qemu-tls-migrate-renew.path")
    );
    let path_unit = fs::read_to_string(
        root.path()
            .join("etc/systemd/system/qemu-tls-migrate-renew.path"),
    )
    .expect("path unit");
    assert!(
        path_unit.contains("\nPathChanged=/etc/cloudstack/agent/cloud.crt\n"),
        "{path_unit}"
    );
    assert_eq!(follower[1..4], ["host", "secure", "--root"]);
    // The renewal left QEMU's copy stale and libvirt's links on cloud.*.
    assert_eq!(repointed, PathBuf::from("/etc/cloudstack/agent/cloud.crt"));
    assert_eq!(stale["cloudstack"]["pki"]["state"], "stale", "{stale:#}");
    assert!(
        stale["warnings"][0]
            .as_str()
            .expect("warning")
            .contains("server-cert.pem"),
        "{stale:#}"
    );
    // The follower's run put both back.
    assert!(run.status.success(), "{run:?}");
    let pki = root.path().join("etc/pki/qemu");
    let agent = root.path().join("etc/cloudstack/agent");
    for (copy, source) in [
        ("server-cert.pem", "cloud.crt"),
        ("client-key.pem", "cloud.key"),
        ("ca-cert.pem", "cloud.ca.crt"),
    ] {
        assert_eq!(
            fs::read(pki.join(copy)).expect("read"),
            fs::read(agent.join(source)).expect("read"),
            "{copy}"
        );
    }
    assert_eq!(
        fs::read_link(&server_link).expect("link"),
        PathBuf::from("../qemu/server-cert.pem")
    );
    assert_eq!(code, Some(0), "{after:#}");
    assert_eq!(after["secured"], true, "{after:#}");
    assert_eq!(after["cloudstack"]["secured"], true, "{after:#}");
    assert_eq!(after["cloudstack"]["pki"]["state"], "in-step", "{after:#}");
    assert_eq!(after["disagreement"], Value::Null, "{after:#}");
    assert_eq!(after["warnings"], serde_json::json!([]), "{after:#}");
}

#[test]
fn host_status_names_both_verdicts_when_cloudstack_disagrees() {
    let root = cloudstack_root();
    let (secured, _) = secure(root.path(), &[]);
    let agent = root.path().join("etc/cloudstack/agent");
    fs::write(agent.join("agent.properties"), "host=198.18.0.10\n").expect("write");
    fs::remove_file(agent.join("cloud.crt")).expect("rm");

    let (code, status) = status_json(root.path());

    assert!(secured.status.success(), "{secured:?}");
    assert_eq!(code, Some(1), "{status:#}");
    assert_eq!(status["secured"], true, "{status:#}");
    assert_eq!(status["cloudstack"]["agent_installed"], true);
    assert_eq!(status["cloudstack"]["cert_present"], false);
    assert_eq!(status["cloudstack"]["secured"], false);
    assert_eq!(
        status["cloudstack"]["self_connect"]["state"], "not-checked",
        "{status:#}"
    );
    let said = status["disagreement"].as_str().expect("a disagreement");
    assert!(
        said.contains("CloudStack calls this host not secured"),
        "{said}"
    );
    assert!(said.contains("/etc/cloudstack/agent/cloud.crt"), "{said}");
    assert!(said.contains("/etc/pki/qemu is usable"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_status_probes_the_agents_self_connect_through_libvirt() {
    // A real libvirtd that does not listen for TLS (the test pair's): the agent's
    // qemu+tls://<privateIp>/system self-connect fails, and says where.
    let pair = crate::fixture::LibvirtPair::shared();
    let ip = pair.hosts.a_addr.clone();

    let out = Cli::new(["host", "status", "--private-ip", &ip, "--json"])
        .in_host(&pair.a)
        .output()
        .await;

    let status: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let probe = &status["cloudstack"]["self_connect"];
    assert_eq!(probe["state"], "failed", "{status:#}");
    assert_eq!(probe["uri"], format!("qemu+tls://{ip}/system"));
    assert!(!probe["error"].as_str().expect("error").is_empty());
}

#[test]
fn host_secure_midway_through_a_renewal_writes_nothing_and_says_why() {
    let root = cloudstack_root();
    let (first, _) = secure(root.path(), &[]);
    // keystore-cert-import caught between its writes: a new cloud.crt, the old cloud.key.
    let ca = LabCa::generate("CloudStack CA, renewed").expect("ca");
    let (cert, _key) = ca
        .issue_dual_pem(&HostCert::new(vec!["host-a".to_string()]))
        .expect("issue");
    fs::write(root.path().join("etc/cloudstack/agent/cloud.crt"), cert).expect("write");
    let before = snapshot(root.path());

    let (second, _) = secure(root.path(), &[]);

    assert!(first.status.success(), "{first:?}");
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("fail the PKI checks"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(
        snapshot(root.path()),
        before,
        "nothing changed but cloud.crt"
    );
}

#[test]
fn host_secure_installs_the_libvirt_hook_which_strips_a_services_arguments_from_incoming_xml() {
    let root = cloudstack_root();
    let (out, _) = secure(root.path(), &[]);
    let hook = root
        .path()
        .join("etc/libvirt/hooks/qemu.d/qemu-tls-migrate");
    let brought_in = "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/qemu-tls-migrate/libvirt/qtm-in-0123456789abcdef.sock,server=on,wait=off'/>
    <qemu:arg value='-incoming'/>
    <qemu:arg value='defer'/>
  </qemu:commandline>
</domain>
";
    // As libvirt calls it: the domain XML on standard input.
    let call = |op: &str, sub: &str| {
        let mut child = std::process::Command::new(&hook)
            .args(["vm1", op, sub, "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run the hook");
        std::io::Write::write_all(
            &mut child.stdin.take().expect("stdin"),
            brought_in.as_bytes(),
        )
        .expect("write XML");
        child.wait_with_output().expect("hook output")
    };
    let migrate = call("migrate", "begin");
    let start = call("start", "begin");

    assert!(out.status.success(), "{out:?}");
    let mode = fs::metadata(&hook).expect("the hook").permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert!(migrate.status.success() && start.status.success());
    assert_eq!(
        String::from_utf8_lossy(&migrate.stdout),
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
</domain>
"
    );
    assert!(
        start.stdout.is_empty(),
        "other operations keep libvirt's XML"
    );
    let (again, json) = secure(root.path(), &[]);
    assert!(again.status.success());
    assert_eq!(json["changes"].as_array().map(Vec::len), Some(0), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_status_calls_a_host_secured_when_the_agents_self_connect_works() {
    // CloudStack's two conditions met on a real libvirtd listening for TLS: cloud.crt beside
    // agent.properties, and qemu+tls://<privateIp>/system answering with the client
    // certificates libvirt reads from /etc/pki (seen through an overlay: this machine has
    // none). A host of its own, so the shared pair keeps not listening for TLS.
    let hosts = crate::fixture::TwoHosts::create();
    let ip = hosts.a_addr.clone();
    let scratch = TempDir::new().expect("tempdir");
    let ca = LabCa::generate("CloudStack CA").expect("ca");
    let pki = scratch.path().join("pki");
    ca.write_host_dir(&pki, &HostCert::new(vec![ip.clone()]))
        .expect("host PKI");
    let properties = scratch.path().join("agent.properties");
    fs::write(&properties, format!("host={ip}\n")).expect("write");
    let host = crate::fixture::LibvirtHost::start_with(&hosts.a, Some(&pki));
    let [ca_cert, client_cert, client_key, server_cert] =
        [CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT].map(|f| pki.join(f));
    let files = [
        (ca_cert.as_path(), "/etc/pki/CA/cacert.pem"),
        (client_cert.as_path(), "/etc/pki/libvirt/clientcert.pem"),
        (
            client_key.as_path(),
            "/etc/pki/libvirt/private/clientkey.pem",
        ),
        (server_cert.as_path(), "/etc/cloudstack/agent/cloud.crt"),
        (
            properties.as_path(),
            "/etc/cloudstack/agent/agent.properties",
        ),
    ];

    let out = Cli::new(["host", "status", "--private-ip", &ip, "--json"])
        .in_host_with_etc(&host, &scratch.path().join("etc"), &files)
        .output()
        .await;

    let status: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("one JSON object ({e}): {out:?}"));
    let cloudstack = &status["cloudstack"];
    crate::fixture::show("CloudStack's verdict", cloudstack);
    assert_eq!(cloudstack["self_connect"]["state"], "ok", "{status:#}");
    assert_eq!(
        cloudstack["self_connect"]["uri"],
        format!("qemu+tls://{ip}/system")
    );
    assert_eq!(cloudstack["agent_installed"], true, "{status:#}");
    assert_eq!(cloudstack["cert_present"], true, "{status:#}");
    assert_eq!(cloudstack["secured"], true, "{status:#}");
}
