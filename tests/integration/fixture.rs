//! The one place integration tests start QEMU, make PKIs and run migrations.
//!
//! Every QEMU is a [`Vm`] owned by a [`Pair`] (killed on drop, in its own process group); when a
//! test panics, the pair prints each QEMU's stderr. Waits are on events (QMP events, progress
//! callbacks, sockets), each with a named timeout, never on fixed sleeps.

#![allow(dead_code, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qemu_tls_migrate::migration::{self, Endpoint, MigrationOptions, Progress, Report};
use qemu_tls_migrate::pki::{HostCert, LabCa};
use qemu_tls_migrate::qemu::{QomList, QueryStatus};
use qemu_tls_migrate::qmp::Qmp;
use qemu_tls_migrate::vm::{Vm, VmConfig};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The name the destination's certificate carries in these tests.
pub const DEST_HOST: &str = "localhost";
/// Guest RAM of test VMs.
pub const RAM_MIB: u32 = 128;
/// How long a test waits for any single expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A lab CA that issues host PKI directories on demand.
pub struct Lab {
    pub dir: TempDir,
    pub ca: LabCa,
}

impl Lab {
    pub fn new(name: &str) -> Lab {
        let dir = tempfile::Builder::new()
            .prefix("qtm-lab-")
            .tempdir()
            .expect("lab dir");
        let ca = LabCa::generate(name).expect("lab CA");
        Lab { dir, ca }
    }

    /// A PKI directory (the five files) for a host whose certificates carry `names`.
    pub fn host(&self, dir_name: &str, names: &[&str]) -> PathBuf {
        let dir = self.dir.path().join(dir_name);
        let cert = HostCert::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        self.ca.write_host_dir(&dir, &cert).expect("host PKI dir");
        dir
    }
}

/// A source VM and a destination VM waiting with `-incoming defer`.
pub struct Pair {
    pub dir: TempDir,
    pub source: Vm,
    pub dest: Vm,
}

impl Pair {
    /// Starts a source (RAM partly filled with data) and a matching destination.
    pub async fn start() -> Pair {
        Pair::start_with(|_| {}).await
    }

    /// Like [`Pair::start`], with the configuration adjusted (by `tweak`) before launch; the
    /// destination gets the same machine.
    pub async fn start_with(tweak: impl FnOnce(&mut VmConfig)) -> Pair {
        let dir = tempfile::Builder::new()
            .prefix("qtm-test-")
            .tempdir()
            .expect("test dir");
        let mut config = VmConfig::new("source", &dir.path().join("source"));
        config.ram_mib = RAM_MIB;
        tweak(&mut config);
        let source = Vm::launch(config.clone()).await.expect("source VM");
        let dest_disks: Vec<PathBuf> = Vec::new();
        let dest = Vm::launch(config.destination("dest", &dir.path().join("dest"), &dest_disks))
            .await
            .expect("destination VM");
        source
            .scribble_ram(u64::from(RAM_MIB / 2) << 20, 42)
            .expect("fill source RAM");
        Pair { dir, source, dest }
    }

    /// Migration options from this pair's source to its destination with the given PKIs.
    pub fn options(&self, source_pki: &Path, dest_pki: &Path) -> MigrationOptions {
        let mut o = MigrationOptions::new(
            Endpoint {
                qmp: self.source.qmp_path().to_path_buf(),
                pki_dir: source_pki.to_path_buf(),
            },
            Endpoint {
                qmp: self.dest.qmp_path().to_path_buf(),
                pki_dir: dest_pki.to_path_buf(),
            },
            DEST_HOST,
        );
        o.qmp_timeout = Duration::from_secs(10);
        o.timeout = Some(Duration::from_secs(120));
        o
    }

    /// A fresh destination for the VM now running on `self.dest`, to migrate onwards.
    pub async fn next_destination(&self, name: &str) -> Vm {
        Vm::launch(
            self.source
                .config
                .destination(name, &self.dir.path().join(name), &[]),
        )
        .await
        .expect("next destination VM")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for vm in [&self.source, &self.dest] {
                eprintln!("--- QEMU {} stderr: {}", vm.name, vm.log_tail());
            }
        }
    }
}

/// Runs a migration in-process, with no progress output and no cancellation.
pub async fn migrate(options: &MigrationOptions) -> Report {
    migrate_observed(options, |_| {}, &CancellationToken::new()).await
}

/// Runs a migration, handing every progress sample to `observe`.
pub async fn migrate_observed(
    options: &MigrationOptions,
    mut observe: impl FnMut(&Progress) + Send,
    cancel: &CancellationToken,
) -> Report {
    let mut cb = |p: &Progress| observe(p);
    migration::migrate(options, &mut cb, cancel).await
}

/// Connects to a VM's watcher socket.
pub async fn monitor(vm: &Vm) -> Qmp {
    vm.monitor().await.expect("monitor socket")
}

/// The VM's run state (`running`, `paused`, `postmigrate`, ...).
pub async fn status(vm: &Vm) -> String {
    monitor(vm)
        .await
        .call(&QueryStatus)
        .await
        .expect("query-status")
        .status
}

/// The ids of QOM objects this tool created that still exist on `vm`.
pub async fn tool_objects(vm: &Vm) -> Vec<String> {
    monitor(vm)
        .await
        .call(&QomList {
            path: "/objects".into(),
        })
        .await
        .expect("qom-list /objects")
        .into_iter()
        .map(|p| p.name)
        .filter(|n| n.starts_with(migration::OBJECT_PREFIX))
        .collect()
}

/// The VM's migration parameters (raw).
pub async fn migrate_parameters(vm: &Vm) -> serde_json::Map<String, Value> {
    monitor(vm)
        .await
        .call(&qemu_tls_migrate::qemu::QueryMigrateParameters)
        .await
        .expect("query-migrate-parameters")
}

/// Asserts that the source VM runs, and that the tool left nothing on it.
pub async fn assert_source_untouched(vm: &Vm) {
    assert_eq!(status(vm).await, "running", "source VM must be running");
    assert_eq!(tool_objects(vm).await, Vec::<String>::new());
    let params = migrate_parameters(vm).await;
    assert_eq!(params.get("tls-creds"), Some(&Value::from("")));
}

/// The error kind of a report (`None` when it completed).
pub fn error_kind(report: &Report) -> Option<&'static str> {
    report.error.as_ref().map(|e| e.kind())
}

/// A one-connection TCP proxy that records the first bytes the client (the migration source)
/// sends, so a test can see what crosses the wire. It forwards to the port the destination
/// VM listens on, asked of the destination's watcher socket when the connection arrives.
pub struct WireTap {
    pub addr: String,
    first_bytes: Arc<Mutex<Vec<u8>>>,
}

impl WireTap {
    pub async fn start(dest_monitor: PathBuf) -> WireTap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let record = first_bytes.clone();
        tokio::spawn(async move {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let port = incoming_port(&dest_monitor).await;
            let mut server = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("proxy connect to destination");
            let mut buf = vec![0u8; 64];
            let n = client.read(&mut buf).await.unwrap_or(0);
            record.lock().expect("lock").extend_from_slice(&buf[..n]);
            if server.write_all(&buf[..n]).await.is_err() {
                return;
            }
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
        WireTap { addr, first_bytes }
    }

    pub fn first_bytes(&self) -> Vec<u8> {
        self.first_bytes.lock().expect("lock").clone()
    }
}

/// The port a destination listens on for its incoming migration (`query-migrate`'s
/// `socket-address` on the destination).
async fn incoming_port(monitor_path: &Path) -> u16 {
    let qmp = Qmp::connect(monitor_path, EVENT_TIMEOUT)
        .await
        .expect("destination monitor");
    let info = qmp
        .execute_raw("query-migrate", None, EVENT_TIMEOUT)
        .await
        .expect("query-migrate on destination");
    info["socket-address"][0]["port"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .expect("destination socket-address port")
}

/// Runs the `qemu-tls-migrate` binary with `args`, returning its output.
pub async fn run_cli(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qemu-tls-migrate"))
        .args(args)
        .output()
        .await
        .expect("run qemu-tls-migrate")
}

/// The one JSON object a `--json` run printed on stdout.
pub fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one JSON line on stdout, got {text:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(lines[0]).expect("stdout is JSON")
}

/// Makes every directory from `path` up to the filesystem root traversable by others, so a
/// QEMU that dropped privileges (`-runas nobody`) can reach files below it.
pub fn open_path_for_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for dir in path.ancestors() {
        if let Ok(meta) = std::fs::metadata(dir) {
            let mode = meta.permissions().mode();
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o055));
        }
    }
}
