//! `pki init` and `pki check` through the binary: one test per case of issue 3, QEMU 7.2 and
//! GnuTLS accepting what `pki init` makes, and agreement with libvirt's `virt-pki-validate`.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qemu_tls_migrate::pki::{self, HostCert, LabCa, Role};
use serde_json::Value;
use tempfile::TempDir;

use crate::fixture::{self, Cli};

/// A lab made by `pki init --host host-a --host host-b`; returns (tempdir, lab dir).
fn lab() -> (TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("lab");
    let done = Cli::new([
        "pki",
        "init",
        "--out",
        path_str(&out),
        "--host",
        "host-a",
        "--host",
        "host-b",
    ])
    .output_blocking();
    assert!(done.status.success(), "pki init: {done:?}");
    (tmp, out)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// `pki check --json` on `dir` for host name host-a: (exit code, report).
fn check(dir: &Path) -> (i32, Value) {
    let out = Cli::new([
        "pki",
        "check",
        "--dir",
        path_str(dir),
        "--hostname",
        "host-a",
        "--json",
    ])
    .output_blocking();
    let report: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    (out.status.code().expect("exit code"), report)
}

/// The (kind, file name) of every finding.
fn findings(report: &Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            let file = PathBuf::from(f["file"].as_str().expect("file"));
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (f["kind"].as_str().expect("kind").to_string(), name)
        })
        .collect()
}

fn one(kind: &str, file: &str) -> Vec<(String, String)> {
    vec![(kind.to_string(), file.to_string())]
}

fn ca_of(lab: &Path) -> LabCa {
    LabCa::load(lab).expect("load lab CA")
}

#[test]
fn pki_check_good_dir_exits_0_with_no_findings() {
    let (_tmp, lab) = lab();

    let (code, report) = check(&lab.join("host-a"));

    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["usable"], true);
    assert_eq!(findings(&report), vec![]);
    assert_eq!(report["files"].as_array().expect("files").len(), 5);
}

#[test]
fn pki_check_missing_file_names_the_file() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::remove_file(dir.join(pki::CLIENT_CERT)).expect("remove");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("missing", pki::CLIENT_CERT));
}

#[test]
fn pki_check_expired_server_cert_names_the_file() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    let now = time::OffsetDateTime::now_utc();
    let mut host = HostCert::new(vec!["host-a".to_string()]);
    host.not_before = now - time::Duration::days(400);
    host.not_after = now - time::Duration::days(35);
    let (cert, key) = ca_of(&lab).issue_pem(&host, Role::Server).expect("issue");
    fs::write(dir.join(pki::SERVER_CERT), cert).expect("write");
    fs::write(dir.join(pki::SERVER_KEY), key).expect("write");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("expired", pki::SERVER_CERT));
}

#[test]
fn pki_check_cert_from_other_ca_is_other_ca() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    let other = LabCa::generate("Some other CA").expect("other CA");
    let (cert, key) = other
        .issue_pem(&HostCert::new(vec!["host-a".to_string()]), Role::Client)
        .expect("issue");
    fs::write(dir.join(pki::CLIENT_CERT), cert).expect("write");
    fs::write(dir.join(pki::CLIENT_KEY), key).expect("write");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("other-ca", pki::CLIENT_CERT));
}

#[test]
fn pki_check_key_that_does_not_match_is_key_mismatch() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::copy(
        lab.join("host-b").join(pki::SERVER_KEY),
        dir.join(pki::SERVER_KEY),
    )
    .expect("copy");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("key-mismatch", pki::SERVER_KEY));
}

#[test]
fn pki_check_wrong_hostname_names_the_server_cert() {
    let (_tmp, lab) = lab();

    let (code, report) = check(&lab.join("host-b"));

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("wrong-hostname", pki::SERVER_CERT));
}

#[test]
fn pki_check_world_readable_key_is_an_error() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::set_permissions(dir.join(pki::CLIENT_KEY), fs::Permissions::from_mode(0o644))
        .expect("chmod");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(
        findings(&report),
        one("key-world-readable", pki::CLIENT_KEY)
    );
    assert_eq!(report["files"][4]["mode"], "0644");
}

#[test]
fn pki_check_empty_file_is_empty() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::write(dir.join(pki::CA_CERT), b"").expect("write");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("empty", pki::CA_CERT));
}

#[test]
fn pki_check_garbage_text_is_garbage() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::write(dir.join(pki::SERVER_KEY), b"hello, I am not a key\n").expect("write");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("garbage", pki::SERVER_KEY));
}

#[test]
fn pki_check_der_where_pem_is_expected_says_convert() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    let der = fixture::cert_der(&dir.join(pki::SERVER_CERT));
    fs::write(dir.join(pki::SERVER_CERT), der).expect("write");

    let (code, report) = check(&dir);

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("der-not-pem", pki::SERVER_CERT));
    let fix = report["findings"][0]["fix"].as_str().expect("fix");
    assert!(fix.contains("openssl x509 -inform DER"), "{fix}");
}

#[test]
fn pki_check_text_output_names_file_and_fix() {
    let (_tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::remove_file(dir.join(pki::SERVER_KEY)).expect("remove");

    let out = Cli::new([
        "pki",
        "check",
        "--dir",
        path_str(&dir),
        "--hostname",
        "host-a",
    ])
    .output_blocking();

    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains(&format!(
            "{}: does not exist",
            dir.join(pki::SERVER_KEY).display()
        )),
        "{text}"
    );
    assert!(text.contains("fix: "), "{text}");
}

#[test]
fn pki_check_missing_directory_exits_1() {
    let tmp = tempfile::tempdir().expect("tempdir");

    let (code, report) = check(&tmp.path().join("nope"));

    assert_eq!(code, 1);
    assert_eq!(findings(&report), one("dir-missing", "nope"));
}

// ---- QEMU 7.2 and GnuTLS accept what `pki init` makes ----

/// Runs QEMU with QMP on stdio, sends `qmp_capabilities`, the `object-add`, and `quit`; returns
/// the reply to the `object-add`.
fn qemu_object_add(dir: &Path, endpoint: &str) -> Value {
    let object_add = serde_json::json!({
        "execute": "object-add",
        "arguments": {
            "qom-type": "tls-creds-x509", "id": "tls0", "dir": dir,
            "endpoint": endpoint, "verify-peer": true
        }
    });
    let input =
        format!("{{\"execute\":\"qmp_capabilities\"}}\n{object_add}\n{{\"execute\":\"quit\"}}\n");
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64 (run scripts/setup.sh)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("write QMP");
    }
    let out = child.wait_with_output().expect("qemu exits after quit");
    let replies: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("return").is_some() || v.get("error").is_some())
        .collect();
    // Replies: qmp_capabilities, object-add, quit.
    replies.get(1).cloned().unwrap_or(Value::Null)
}

#[test]
fn qemu_accepts_lab_pki_for_both_endpoints() {
    let (_tmp, lab) = lab();

    let server = qemu_object_add(&lab.join("host-a"), "server");
    let client = qemu_object_add(&lab.join("host-b"), "client");

    assert_eq!(server, serde_json::json!({"return": {}}));
    assert_eq!(client, serde_json::json!({"return": {}}));
}

#[test]
fn qemu_refuses_a_dir_without_server_files() {
    let (_tmp, lab) = lab();

    let reply = qemu_object_add(&lab, "server");

    let desc = reply["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("Unable to access credentials"), "{reply}");
}

/// A `gnutls-serv` child, killed on drop.
struct GnutlsServer {
    child: Child,
    log: PathBuf,
}

impl Drop for GnutlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn gnutls_serv(dir: &Path, port: u16, log: PathBuf) -> GnutlsServer {
    let log_file = fs::File::create(&log).expect("log file");
    let err_file = log_file.try_clone().expect("log file");
    let child = Command::new("gnutls-serv")
        .arg("--port")
        .arg(port.to_string())
        .arg("--x509cafile")
        .arg(dir.join(pki::CA_CERT))
        .arg("--x509certfile")
        .arg(dir.join(pki::SERVER_CERT))
        .arg("--x509keyfile")
        .arg(dir.join(pki::SERVER_KEY))
        .args(["--require-client-cert", "--verify-client-cert"])
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .expect("start gnutls-serv (package gnutls-bin)");
    let server = GnutlsServer { child, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "gnutls-serv did not listen on {port} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn gnutls_cli(dir: &Path, port: u16, hostname: &str) -> Output {
    Command::new("gnutls-cli")
        .arg("--port")
        .arg(port.to_string())
        .arg("--x509cafile")
        .arg(dir.join(pki::CA_CERT))
        .arg("--x509certfile")
        .arg(dir.join(pki::CLIENT_CERT))
        .arg("--x509keyfile")
        .arg(dir.join(pki::CLIENT_KEY))
        .args(["--verify-hostname", hostname, "127.0.0.1"])
        .stdin(Stdio::null())
        .output()
        .expect("run gnutls-cli")
}

#[test]
fn gnutls_handshake_with_lab_certs_verifies_both_ends() {
    let (tmp, lab) = lab();
    let port = free_port();
    let server = gnutls_serv(&lab.join("host-a"), port, tmp.path().join("serv.log"));

    let good = gnutls_cli(&lab.join("host-b"), port, "host-a");
    let wrong_name = gnutls_cli(&lab.join("host-b"), port, "host-z");

    let client_out = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{good:?}");
    assert!(
        client_out.contains("Handshake was completed"),
        "{client_out}"
    );
    assert!(!wrong_name.status.success(), "{wrong_name:?}");
    let server_log = fs::read_to_string(&server.log).expect("server log");
    assert!(
        server_log.contains("The certificate is trusted"),
        "{server_log}"
    );
    assert!(server_log.contains("Subject: CN=host-b"), "{server_log}");
}

// ---- agreement with virt-pki-validate ----

/// The problems both `pki check` and `virt-pki-validate` look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Problem {
    CaMissing,
    ServerCertMissing,
    ClientCertMissing,
    ServerKeyMissing,
    ClientKeyMissing,
    WrongHostname,
    ServerKeyExposed,
    ServerKeyNotRoot,
}

/// `virt-pki-validate` reads fixed paths under /etc/pki and compares with `hostname`. It runs
/// here in private mount and UTS namespaces (`unshare -m -u`): /etc is bind-mounted aside, a
/// stand-in /etc of symlinks to every real entry plus `pki` -> the test's tree is bind-mounted
/// over it, and the host name is set to host-a. Nothing outside the namespace changes.
const VIRT_PKI_VALIDATE_IN_NAMESPACE: &str = r#"
set -eu
t="$1"
mkdir -p "$t/real-etc" "$t/fake-etc"
mount --bind /etc "$t/real-etc"
for e in "$t"/real-etc/* "$t"/real-etc/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    ln -s "$e" "$t/fake-etc/"
done
rm -f "$t/fake-etc/pki"
ln -s "$t/pki" "$t/fake-etc/pki"
mount --bind "$t/fake-etc" /etc
hostname host-a
exec virt-pki-validate
"#;

/// Copies a QEMU PKI directory into libvirt's layout under `t/pki`, keeping modes and owners.
fn libvirt_layout(dir: &Path, t: &Path) {
    let map = [
        (pki::CA_CERT, "CA/cacert.pem"),
        (pki::SERVER_CERT, "libvirt/servercert.pem"),
        (pki::CLIENT_CERT, "libvirt/clientcert.pem"),
        (pki::SERVER_KEY, "libvirt/private/serverkey.pem"),
        (pki::CLIENT_KEY, "libvirt/private/clientkey.pem"),
    ];
    for sub in ["CA", "libvirt/private"] {
        fs::create_dir_all(t.join("pki").join(sub)).expect("mkdir");
    }
    for (from, to) in map {
        let src = dir.join(from);
        let dst = t.join("pki").join(to);
        if let Ok(meta) = fs::metadata(&src) {
            fs::copy(&src, &dst).expect("copy");
            fs::set_permissions(&dst, meta.permissions()).expect("chmod");
            use std::os::unix::fs::MetadataExt;
            std::os::unix::fs::chown(&dst, Some(meta.uid()), Some(meta.gid())).expect("chown");
        }
    }
}

fn virt_pki_validate_problems(dir: &Path) -> BTreeSet<Problem> {
    let t = tempfile::tempdir().expect("tempdir");
    libvirt_layout(dir, t.path());
    let out = Command::new("unshare")
        .args(["-m", "-u", "sh", "-c", VIRT_PKI_VALIDATE_IN_NAMESPACE, "sh"])
        .arg(t.path())
        .output()
        .expect("run unshare (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Found") || text.contains("is missing"),
        "virt-pki-validate did not run: {out:?}"
    );
    let markers = [
        (
            "the CA certificate /etc/pki/CA/cacert.pem is missing",
            Problem::CaMissing,
        ),
        (
            "Did not find /etc/pki/libvirt/servercert.pem",
            Problem::ServerCertMissing,
        ),
        (
            "Did not find /etc/pki/libvirt/clientcert.pem",
            Problem::ClientCertMissing,
        ),
        ("Missing server private key", Problem::ServerKeyMissing),
        ("Missing client private key", Problem::ClientKeyMissing),
        (
            "does not seem to match the host name",
            Problem::WrongHostname,
        ),
        (
            "server private key need to be read only by root",
            Problem::ServerKeyExposed,
        ),
        (
            "server private key should be owned by root",
            Problem::ServerKeyNotRoot,
        ),
    ];
    markers
        .into_iter()
        .filter(|(marker, _)| text.contains(marker))
        .map(|(_, problem)| problem)
        .collect()
}

fn pki_check_problems(dir: &Path) -> BTreeSet<Problem> {
    let (_, report) = check(dir);
    findings(&report)
        .into_iter()
        .filter_map(|(kind, file)| match (kind.as_str(), file.as_str()) {
            ("missing", pki::CA_CERT) => Some(Problem::CaMissing),
            ("missing", pki::SERVER_CERT) => Some(Problem::ServerCertMissing),
            ("missing", pki::CLIENT_CERT) => Some(Problem::ClientCertMissing),
            ("missing", pki::SERVER_KEY) => Some(Problem::ServerKeyMissing),
            ("missing", pki::CLIENT_KEY) => Some(Problem::ClientKeyMissing),
            ("wrong-hostname", _) => Some(Problem::WrongHostname),
            ("key-world-readable", pki::SERVER_KEY) => Some(Problem::ServerKeyExposed),
            ("key-not-owned-by-root", pki::SERVER_KEY) => Some(Problem::ServerKeyNotRoot),
            _ => None,
        })
        .collect()
}

/// host-a's directory from a fresh lab, with the server key 0600 as virt-pki-validate wants.
fn validate_case() -> (TempDir, PathBuf) {
    let (tmp, lab) = lab();
    let dir = lab.join("host-a");
    fs::set_permissions(dir.join(pki::SERVER_KEY), fs::Permissions::from_mode(0o600))
        .expect("chmod");
    (tmp, dir)
}

fn assert_agree(dir: &Path, expected: &[Problem]) {
    let theirs = virt_pki_validate_problems(dir);
    let ours = pki_check_problems(dir);
    let expected: BTreeSet<Problem> = expected.iter().copied().collect();
    assert_eq!(theirs, expected, "virt-pki-validate");
    assert_eq!(ours, expected, "pki check");
}

#[test]
fn virt_pki_validate_agrees_on_good_dir() {
    let (_tmp, dir) = validate_case();

    assert_agree(&dir, &[]);
}

#[test]
fn virt_pki_validate_agrees_on_missing_files() {
    let cases = [
        (pki::CA_CERT, Problem::CaMissing),
        (pki::SERVER_CERT, Problem::ServerCertMissing),
        (pki::CLIENT_CERT, Problem::ClientCertMissing),
        (pki::SERVER_KEY, Problem::ServerKeyMissing),
        (pki::CLIENT_KEY, Problem::ClientKeyMissing),
    ];
    for (file, problem) in cases {
        let (_tmp, dir) = validate_case();
        fs::remove_file(dir.join(file)).expect("remove");

        assert_agree(&dir, &[problem]);
    }
}

#[test]
fn virt_pki_validate_agrees_on_wrong_hostname() {
    let (tmp, _) = validate_case();
    let dir = tmp.path().join("lab").join("host-b");
    fs::set_permissions(dir.join(pki::SERVER_KEY), fs::Permissions::from_mode(0o600))
        .expect("chmod");

    assert_agree(&dir, &[Problem::WrongHostname]);
}

#[test]
fn virt_pki_validate_agrees_on_world_readable_server_key() {
    let (_tmp, dir) = validate_case();
    fs::set_permissions(dir.join(pki::SERVER_KEY), fs::Permissions::from_mode(0o644))
        .expect("chmod");

    assert_agree(&dir, &[Problem::ServerKeyExposed]);
}

#[test]
fn virt_pki_validate_agrees_on_server_key_not_owned_by_root() {
    let (_tmp, dir) = validate_case();
    std::os::unix::fs::chown(dir.join(pki::SERVER_KEY), Some(65534), None).expect("chown");

    assert_agree(&dir, &[Problem::ServerKeyNotRoot]);
}
