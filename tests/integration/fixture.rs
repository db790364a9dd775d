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
use qemu_tls_migrate::pki::{DistinguishedName, DnType, DnValue, HostCert, LabCa};
use qemu_tls_migrate::qemu::{QomList, QueryStatus};
use qemu_tls_migrate::qmp::Qmp;
use qemu_tls_migrate::vm::{DiskConfig, DiskFormat, Vm, VmConfig, create_image};
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

    /// [`Lab::host`], the certificates' subject `subject` instead of `CN=<first name>`.
    pub fn host_with_subject(
        &self,
        dir_name: &str,
        names: &[&str],
        subject: DistinguishedName,
    ) -> PathBuf {
        let dir = self.dir.path().join(dir_name);
        let cert = HostCert::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .with_subject(subject);
        self.ca.write_host_dir(&dir, &cert).expect("host PKI dir");
        dir
    }
}

/// The DER of the client certificate in a host PKI directory.
pub fn client_cert_der(pki: &Path) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_file(pki.join(qemu_tls_migrate::pki::CLIENT_CERT))
        .expect("client certificate")
        .to_vec()
}

/// Subjects the `tls-authz` tests issue source certificates with, each named: several RDNs,
/// a value with a comma (and other characters RFC 4514 escapes), UTF-8 values, and the shape of
/// a CloudStack KVM agent's certificate (`keytool -dname cn=FQDN,ou=cloudstack,o=cloudstack,
/// c=cloudstack` in `scripts/util/keystore-setup`, re-issued by the management server's root
/// CA through `X500Principal`: CN first, every value a PrintableString).
pub fn authz_subjects() -> Vec<(&'static str, DistinguishedName)> {
    let printable = |s: &str| DnValue::PrintableString(s.try_into().expect("printable"));
    let dn = |attrs: Vec<(DnType, DnValue)>| {
        let mut dn = DistinguishedName::new();
        for (ty, value) in attrs {
            dn.push(ty, value);
        }
        dn
    };
    vec![
        (
            "several RDNs",
            dn(vec![
                (DnType::CountryName, printable("US")),
                (DnType::StateOrProvinceName, "Bavaria".into()),
                (DnType::LocalityName, "Munich".into()),
                (DnType::OrganizationName, "Acme".into()),
                (DnType::OrganizationalUnitName, "Migrations".into()),
                (DnType::CommonName, "host-b".into()),
            ]),
        ),
        (
            "a comma and other specials",
            dn(vec![
                (DnType::OrganizationName, "Acme, Inc.".into()),
                (DnType::OrganizationalUnitName, "#1 <ops>; \\a+b\" ".into()),
                (DnType::CommonName, "host-b".into()),
            ]),
        ),
        (
            "UTF-8",
            dn(vec![
                (DnType::OrganizationName, "Ünïcødé 日本".into()),
                (DnType::CommonName, "hôte-b".into()),
            ]),
        ),
        (
            "CloudStack agent",
            dn(vec![
                (DnType::CommonName, printable("kvm-b.cloud.example")),
                (DnType::OrganizationalUnitName, printable("cloudstack")),
                (DnType::OrganizationName, printable("cloudstack")),
                (DnType::CountryName, printable("cloudstack")),
            ]),
        ),
    ]
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
        Pair::start_in(test_dir(), tweak).await
    }

    /// A pair across two hosts: the source VM in namespace `b`, the destination in `a`.
    pub async fn start_on(hosts: &TwoHosts, disks: &[(&str, DiskFormat, u64)]) -> Pair {
        Pair::start_on_with(hosts, disks, |_| {}).await
    }

    /// [`Pair::start_on`] with the configuration adjusted (by `tweak`) before launch.
    pub async fn start_on_with(
        hosts: &TwoHosts,
        disks: &[(&str, DiskFormat, u64)],
        tweak: impl FnOnce(&mut VmConfig),
    ) -> Pair {
        Pair::start_on_filled(hosts, disks, tweak, true).await
    }

    /// [`Pair::start_on_with`], the source's RAM filled with random data (`fill`) or left as
    /// the guest makes it (for a comparison random data would drown, such as compression's).
    pub async fn start_on_filled(
        hosts: &TwoHosts,
        disks: &[(&str, DiskFormat, u64)],
        tweak: impl FnOnce(&mut VmConfig),
        fill: bool,
    ) -> Pair {
        let (a, b) = (hosts.a.clone(), hosts.b.clone());
        Pair::start_full(
            test_dir(),
            fill,
            disks,
            |c| {
                c.netns = Some(b);
                // Exact dirty tracking for the RAM comparison (see the RAM-integrity test).
                c.accel = Some(qemu_tls_migrate::vm::Accel::Tcg);
                tweak(c);
            },
            Some(a),
        )
        .await
    }

    async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut VmConfig)) -> Pair {
        Pair::start_full(dir, true, &[], tweak, None).await
    }

    async fn start_full(
        dir: TempDir,
        fill: bool,
        disks: &[(&str, DiskFormat, u64)],
        tweak: impl FnOnce(&mut VmConfig),
        dest_netns: Option<String>,
    ) -> Pair {
        let configs = make_disks(dir.path(), disks);
        let mut config = VmConfig::new("source", &dir.path().join("source"));
        config.ram_mib = RAM_MIB;
        config.disks = configs;
        tweak(&mut config);
        let source = Vm::launch(config.clone()).await.expect("source VM");
        // Each source disk gets an empty image of the same format and size on the destination.
        let dest_disks: Vec<PathBuf> = config
            .disks
            .iter()
            .map(|d| {
                let path = dir
                    .path()
                    .join(format!("dest-{}.{}", d.node, d.format.as_str()));
                create_image(&path, d.format, image_size(&d.path)).expect("destination image");
                path
            })
            .collect();
        let mut dest_config = config.destination("dest", &dir.path().join("dest"), &dest_disks);
        if dest_netns.is_some() {
            dest_config.netns = dest_netns;
        }
        let dest = Vm::launch(dest_config).await.expect("destination VM");
        if fill {
            source
                .scribble_ram(u64::from(RAM_MIB / 2) << 20, 42)
                .expect("fill source RAM");
        }
        Pair { dir, source, dest }
    }

    /// Starts a pair from images made by the test: the source's disks as given, the
    /// destination's at `dest_paths` (same node names and formats, in order).
    pub async fn start_with_images(
        dir: TempDir,
        disks: Vec<DiskConfig>,
        dest_paths: &[PathBuf],
    ) -> Pair {
        Pair::start_with_images_as(dir, disks, dest_paths, &[]).await
    }

    /// [`Pair::start_with_images`], the destination's disks named `dest_nodes` (in order; the
    /// source's names for the rest).
    async fn start_with_images_as(
        dir: TempDir,
        disks: Vec<DiskConfig>,
        dest_paths: &[PathBuf],
        dest_nodes: &[&str],
    ) -> Pair {
        let mut config = VmConfig::new("source", &dir.path().join("source"));
        config.ram_mib = RAM_MIB;
        config.disks = disks;
        let source = Vm::launch(config.clone()).await.expect("source VM");
        let mut dest_config = config.destination("dest", &dir.path().join("dest"), dest_paths);
        for (disk, node) in dest_config.disks.iter_mut().zip(dest_nodes) {
            disk.node = node.to_string();
        }
        let dest = Vm::launch(dest_config).await.expect("destination VM");
        Pair { dir, source, dest }
    }

    /// A pair whose one disk `disk0` is a qcow2 overlay on a raw template of `template_mib`
    /// (all data), with `overlay_mib` of its own data written at 8 MiB. The destination's
    /// `disk0` is an empty qcow2 overlay on the template `dest` asks for.
    pub async fn start_with_overlay(
        template_mib: u64,
        overlay_mib: u64,
        dest: DestBacking,
    ) -> Pair {
        Pair::start_with_overlay_named(template_mib, overlay_mib, dest, DiskNames::SAME).await
    }

    /// [`Pair::start_with_overlay`] with the disk's node names on each side and its device id
    /// as `names` says (libvirt's case: one device id, node names that differ).
    pub async fn start_with_overlay_named(
        template_mib: u64,
        overlay_mib: u64,
        dest: DestBacking,
        names: DiskNames<'_>,
    ) -> Pair {
        let dir = test_dir();
        let template = dir.path().join("src-template.raw");
        create_image(&template, DiskFormat::Raw, template_mib << 20).expect("template");
        qemu_io(
            &template,
            DiskFormat::Raw,
            &format!("write -P 0x11 0 {template_mib}M"),
        );
        let overlay = dir.path().join("disk0.qcow2");
        create_overlay(&overlay, &template);
        qemu_io(
            &overlay,
            DiskFormat::Qcow2,
            &format!("write -P 0x22 8M {overlay_mib}M"),
        );
        let dest_disk = dir.path().join("dest-disk0.qcow2");
        let dest_template = dir.path().join("dst-template.raw");
        match dest {
            DestBacking::SameTemplate => {
                std::fs::copy(&template, &dest_template).expect("copy of the template");
                create_overlay(&dest_disk, &dest_template);
            }
            DestBacking::OtherTemplate => {
                create_image(&dest_template, DiskFormat::Raw, template_mib << 20)
                    .expect("other template");
                qemu_io(
                    &dest_template,
                    DiskFormat::Raw,
                    &format!("write -P 0x33 0 {template_mib}M"),
                );
                create_overlay(&dest_disk, &dest_template);
            }
            DestBacking::None => {
                create_image(&dest_disk, DiskFormat::Qcow2, template_mib << 20)
                    .expect("destination image");
            }
        }
        let disk = DiskConfig {
            node: names.source.into(),
            path: overlay,
            format: DiskFormat::Qcow2,
            device: names.device.map(str::to_string),
        };
        Pair::start_with_images_as(dir, vec![disk], &[dest_disk], &[names.dest]).await
    }

    /// Starts a pair whose source has these disks (node name, format, MiB), each filled with
    /// its own byte pattern; the destination gets empty images of the same sizes.
    pub async fn start_with_disks(disks: &[(&str, DiskFormat, u64)]) -> Pair {
        Pair::start_full(test_dir(), true, disks, |_| {}, None).await
    }

    /// The source's and destination's image of each disk, in order.
    pub fn disk_images(&self) -> Vec<(PathBuf, PathBuf)> {
        self.source
            .config
            .disks
            .iter()
            .zip(&self.dest.config.disks)
            .map(|(s, d)| (s.path.clone(), d.path.clone()))
            .collect()
    }

    /// Shuts both QEMUs down cleanly (flushing their images).
    pub async fn quit_both(&mut self) {
        self.source.quit(EVENT_TIMEOUT).await;
        self.dest.quit(EVENT_TIMEOUT).await;
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

    /// Options for a TLS migration of this pair with fresh host PKIs from `lab`: the source as
    /// `src-host`, the destination as [`DEST_HOST`].
    pub fn tls_options(&self, lab: &Lab) -> MigrationOptions {
        self.options(
            &lab.host("src", &["src-host"]),
            &lab.host("dst", &[DEST_HOST]),
        )
    }

    /// A fresh destination for the VM now running on `self.dest`, to migrate onwards (in the
    /// same network namespace as the first destination).
    pub async fn next_destination(&self, name: &str) -> Vm {
        let mut config = self
            .source
            .config
            .destination(name, &self.dir.path().join(name), &[]);
        config.netns = self.dest.config.netns.clone();
        Vm::launch(config).await.expect("next destination VM")
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
    // Options a test spoils on purpose are refused as the command line's are.
    match options.clone().validate() {
        Ok(valid) => migration::migrate(&valid, migration::RunContext::new(&mut cb, cancel)).await,
        Err(e) => Report::refused(e, Duration::ZERO),
    }
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

/// The error's message (empty when the migration completed).
pub fn error_message(report: &Report) -> String {
    report
        .error
        .as_ref()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

/// Asserts that the source VM runs, and that the tool left nothing on it.
pub async fn assert_source_untouched(vm: &Vm) {
    assert_eq!(status(vm).await, "running", "source VM must be running");
    assert_eq!(tool_objects(vm).await, Vec::<String>::new());
    let params = migrate_parameters(vm).await;
    assert_eq!(params.get("tls-creds"), Some(&Value::from("")));
}

/// The error kind of a report (`None` when it completed).
pub fn error_kind(report: &Report) -> Option<&str> {
    report.error.as_ref().map(|e| e.kind())
}

/// A one-connection TCP proxy that records the first bytes the client (the migration source)
/// sends, so a test can see what crosses the wire. It forwards to the port the destination
/// VM listens on, asked of the destination's watcher socket when the connection arrives.
pub struct WireTap {
    pub addr: String,
    first_bytes: Arc<Mutex<Vec<u8>>>,
    server_bytes: Arc<Mutex<Vec<u8>>>,
}

impl WireTap {
    pub async fn start(dest_monitor: PathBuf) -> WireTap {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let server_bytes = Arc::new(Mutex::new(Vec::new()));
        let record = first_bytes.clone();
        let record_server = server_bytes.clone();
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
            // The server's first 16 KiB (its TLS handshake) are recorded on their way back.
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let upstream = tokio::io::copy(&mut cr, &mut sw);
            let downstream = async move {
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    let n = match sr.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    {
                        let mut rec = record_server.lock().expect("lock");
                        let room = (16 * 1024usize).saturating_sub(rec.len());
                        rec.extend_from_slice(&chunk[..n.min(room)]);
                    }
                    if cw.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = cw.shutdown().await;
            };
            let _ = tokio::join!(upstream, downstream);
        });
        WireTap {
            addr,
            first_bytes,
            server_bytes,
        }
    }

    /// The first bytes the destination sent back (its side of the TLS handshake).
    pub fn server_bytes(&self) -> Vec<u8> {
        self.server_bytes.lock().expect("lock").clone()
    }

    pub fn first_bytes(&self) -> Vec<u8> {
        self.first_bytes.lock().expect("lock").clone()
    }
}

/// A QMP proxy in front of a real QEMU's socket that holds back QEMU's reply to the commands
/// `delayed` picks, for `delay`, passing everything else through at once. The command itself
/// reaches QEMU at once: this models a QEMU (or host) that acts but answers late, which a real
/// QEMU cannot be made to do on cue.
pub struct QmpDelayProxy {
    pub path: PathBuf,
    task: tokio::task::JoinHandle<()>,
    held: Arc<tokio::sync::Notify>,
    /// The name of every command passed on to QEMU, in order, over all connections.
    commands: Arc<Mutex<Vec<String>>>,
}

impl QmpDelayProxy {
    pub async fn start(
        target: &Path,
        path: &Path,
        delayed: impl Fn(&Value) -> bool + Send + Sync + 'static,
        delay: Duration,
    ) -> QmpDelayProxy {
        QmpDelayProxy::start_with(target, path, delayed, delay, || {}).await
    }

    /// [`QmpDelayProxy::start`] that also runs `before` just before a held command is passed
    /// on to QEMU (e.g. to SIGSTOP that QEMU, so the command waits in its socket).
    pub async fn start_with(
        target: &Path,
        path: &Path,
        delayed: impl Fn(&Value) -> bool + Send + Sync + 'static,
        delay: Duration,
        before: impl Fn() + Send + Sync + 'static,
    ) -> QmpDelayProxy {
        use tokio::io::AsyncBufReadExt;
        let before = Arc::new(before);
        let commands: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = commands.clone();
        let listener = tokio::net::UnixListener::bind(path).expect("proxy socket");
        let target = target.to_path_buf();
        let delayed = Arc::new(delayed);
        let held_note = Arc::new(tokio::sync::Notify::new());
        let note = held_note.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::UnixStream::connect(&target).await else {
                    return;
                };
                let delayed = delayed.clone();
                let note = note.clone();
                let before = before.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (cr, mut cw) = client.into_split();
                    let (sr, mut sw) = server.into_split();
                    let held: Arc<Mutex<Vec<Value>>> = Arc::default();
                    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                    let writer = tokio::spawn(async move {
                        while let Some(line) = rx.recv().await {
                            if cw.write_all(line.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                    let held_up = held.clone();
                    let upstream = async move {
                        let mut lines = tokio::io::BufReader::new(cr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let cmd = serde_json::from_str::<Value>(&line).ok();
                            if let Some(name) = cmd.as_ref().and_then(|c| c["execute"].as_str()) {
                                seen.lock().expect("lock").push(name.to_string());
                            }
                            if let Some(cmd) = cmd
                                && delayed(&cmd)
                            {
                                held_up.lock().expect("lock").push(cmd["id"].clone());
                                before();
                                note.notify_one();
                            }
                            if sw.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    };
                    let downstream = async move {
                        let mut lines = tokio::io::BufReader::new(sr).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            let id = serde_json::from_str::<Value>(&line)
                                .map(|v| v["id"].clone())
                                .unwrap_or(Value::Null);
                            let hold = !id.is_null() && held.lock().expect("lock").contains(&id);
                            let line = format!("{line}\n");
                            if hold {
                                let tx = tx.clone();
                                tokio::spawn(async move {
                                    tokio::time::sleep(delay).await;
                                    let _ = tx.send(line);
                                });
                            } else if tx.send(line).is_err() {
                                return;
                            }
                        }
                    };
                    tokio::join!(upstream, downstream);
                    let _ = writer.await;
                });
            }
        });
        QmpDelayProxy {
            path: path.to_path_buf(),
            task,
            held: held_note,
            commands,
        }
    }

    /// The commands passed on to QEMU after the first one named `name`.
    pub fn commands_after(&self, name: &str) -> Vec<String> {
        let all = self.commands.lock().expect("lock");
        all.iter()
            .skip_while(|c| *c != name)
            .skip(1)
            .cloned()
            .collect()
    }

    /// Resolves once a command whose reply is held back has reached QEMU.
    pub async fn holding(&self) {
        self.held.notified().await;
    }
}

impl Drop for QmpDelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Longer than any test runs: a reply held this long is lost.
pub const FOREVER: Duration = Duration::from_secs(24 * 3600);

/// Sends `signal` to the process `pid` (a QEMU the test owns).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, signal).expect("signal the QEMU");
}

/// Whether the process `pid` still exists (a zombie counts as gone).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// A matcher for [`QmpDelayProxy`]: the command named `name`.
pub fn command_named(name: &'static str) -> impl Fn(&Value) -> bool + Send + Sync + 'static {
    move |cmd| cmd["execute"] == name
}

/// Waits until `vm`'s outgoing migration has completed (its own `query-migrate`).
pub async fn wait_migration_completed(vm: &Vm) {
    let qmp = monitor(vm).await;
    let completed = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let info = qmp
                .execute_raw("query-migrate", None, EVENT_TIMEOUT)
                .await
                .expect("query-migrate");
            if info["status"] == "completed" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        completed.is_ok(),
        "the source never completed its migration"
    );
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

/// [`run_cli`] with the environment variables `env` set (e.g. `QTM_RUN_DIR`).
pub async fn run_cli_env(args: &[&str], env: &[(&str, &Path)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qemu-tls-migrate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .await
        .expect("run qemu-tls-migrate")
}

/// The CLI with `args` and the environment variables `env`, its stdout and stderr piped; killed
/// when dropped.
pub fn spawn_cli_env(args: &[String], env: &[(&str, &Path)]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qemu-tls-migrate"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu-tls-migrate")
}

/// [`run_cli`] with `cwd` as the current directory (for relative paths in `args`).
pub async fn run_cli_from(cwd: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qemu-tls-migrate"))
        .args(args)
        .current_dir(cwd)
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

/// What the destination's disk of [`Pair::start_with_overlay`] sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestBacking {
    /// A copy of the source's template (another path, the same bytes).
    SameTemplate,
    /// A template of the same format and size with other bytes.
    OtherTemplate,
    /// No backing file: a plain empty qcow2 of the template's size.
    None,
}

/// The node names of a pair's disk on each side and the id of the device both attach it to.
#[derive(Debug, Clone, Copy)]
pub struct DiskNames<'a> {
    pub source: &'a str,
    pub dest: &'a str,
    /// `None`: `NODE-dev` (the source's node name).
    pub device: Option<&'a str>,
}

impl DiskNames<'static> {
    /// `disk0` on both sides, on device `disk0-dev`.
    pub const SAME: DiskNames<'static> = DiskNames {
        source: "disk0",
        dest: "disk0",
        device: None,
    };
    /// libvirt's case: node `srcdisk` on the source, `dstdisk` on the destination, both on
    /// device `vd0`.
    pub const DIFFERENT: DiskNames<'static> = DiskNames {
        source: "srcdisk",
        dest: "dstdisk",
        device: Some("vd0"),
    };
}

/// `qemu-img create -f qcow2 -b BACKING -F raw PATH`: an empty overlay on a raw template.
pub fn create_overlay(path: &Path, backing: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(backing)
        .arg(path)
        .output()
        .expect("qemu-img create");
    assert!(
        out.status.success(),
        "qemu-img create overlay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes an image file takes on the host (`qemu-img info`'s `actual-size`).
pub fn allocated_size(path: &Path) -> u64 {
    image_info(path)["actual-size"]
        .as_u64()
        .expect("actual-size")
}

/// A TCP proxy on 127.0.0.1 in front of `127.0.0.1:port` that counts the bytes its clients
/// send (every connection, for as long as it lives): what crossed the wire towards the server,
/// TLS records and NBD headers included.
pub struct CountingProxy {
    pub addr: String,
    sent: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(port: u16) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let upstream = async move {
                        let mut buf = vec![0u8; 256 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let downstream = async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(upstream, downstream);
                });
            }
        });
        CountingProxy { addr, sent, task }
    }

    /// Bytes the clients sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes a figure a test measured to stderr (seen with `--nocapture`): the README's block
/// migration figures come from these lines.
pub fn note(figures: std::fmt::Arguments<'_>) {
    show("measured", &figures);
}

/// Virtual size of an image, from `qemu-img info`.
pub fn image_size(path: &Path) -> u64 {
    image_info(path)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// `qemu-img info --output=json` of an image (opened shared, so a running QEMU may hold it).
fn image_info(path: &Path) -> Value {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img info");
    serde_json::from_slice(&out.stdout).expect("qemu-img info JSON")
}

/// Runs one qemu-io command on an image no QEMU has open.
pub fn qemu_io(path: &Path, format: DiskFormat, command: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", format.as_str(), "-c", command])
        .arg(path)
        .output()
        .expect("qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of two images (which no QEMU may hold open for writing).
pub fn images_identical(a: &Path, b: &Path) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img compare");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} vs {}: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Block jobs and tool-made block nodes still present on a VM.
pub async fn tool_block_leftovers(vm: &Vm) -> (Vec<String>, Vec<String>) {
    let qmp = monitor(vm).await;
    let jobs = qmp
        .call(&qemu_tls_migrate::qemu::QueryBlockJobs)
        .await
        .expect("query-block-jobs")
        .into_iter()
        .map(|j| j.device)
        .collect();
    let nodes = qmp
        .call(&qemu_tls_migrate::qemu::QueryNamedBlockNodes)
        .await
        .expect("query-named-block-nodes")
        .into_iter()
        .map(|n| n.node_name)
        .filter(|n| n.starts_with(migration::OBJECT_PREFIX))
        .collect();
    (jobs, nodes)
}

/// Waits (60 s at most) until `vm` runs a block job of this tool's; returns its id.
pub async fn wait_block_job(vm: &Vm) -> String {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(job) = tool_block_leftovers(vm).await.0.into_iter().next() {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never ran a block job of the tool's",
            vm.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn test_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("qtm-test-")
        .tempdir()
        .expect("test dir")
}

/// Two network namespaces joined by a veth pair, standing for two hosts: `a` (the destination,
/// `a_addr`) and `b` (the source, `b_addr`). The addresses exist only inside them. Removed on
/// drop.
pub struct TwoHosts {
    pub a: String,
    pub b: String,
    pub a_addr: String,
    pub b_addr: String,
    veth_b: String,
}

impl TwoHosts {
    pub fn create() -> TwoHosts {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id() % 10000);
        let (a, b) = (format!("qtm-a{id}"), format!("qtm-b{id}"));
        let (veth_a, veth_b) = (format!("qa{id}"), format!("qb{id}"));
        // 198.18.0.0/15 is reserved for benchmarking; a /30 per pair of namespaces.
        let (x, y) = (std::process::id() % 200, n % 60 * 4);
        let a_addr = format!("198.18.{x}.{}", y + 1);
        let b_addr = format!("198.18.{x}.{}", y + 2);
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        veth_between((&a, &veth_a, &a_addr), (&b, &veth_b, &b_addr));
        for ns in [&a, &b] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        TwoHosts {
            a,
            b,
            a_addr,
            b_addr,
            veth_b,
        }
    }

    /// Bytes the source's side of the link has sent (its veth's `tx_bytes`): what crossed the
    /// wire, TLS records and headers included.
    pub fn source_tx_bytes(&self) -> u64 {
        let out = std::process::Command::new("ip")
            .args([
                "-n",
                &self.b,
                "-j",
                "-s",
                "link",
                "show",
                "dev",
                &self.veth_b,
            ])
            .output()
            .expect("ip -s link");
        let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j JSON");
        v[0]["stats64"]["tx"]["bytes"].as_u64().expect("tx bytes")
    }

    /// Takes the link down (or up again) on the source's side.
    pub fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let out = std::process::Command::new("ip")
            .args(["-n", &self.b, "link", "set", &self.veth_b, state])
            .output()
            .expect("ip link");
        assert!(out.status.success());
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

/// A `qemu-tls-migrate serve` process, stopped with SIGTERM on drop.
pub struct Service {
    child: tokio::process::Child,
    pub addr: String,
}

impl Service {
    /// Starts the service in namespace `netns` (if any) on `listen_ip`, port chosen by the
    /// kernel, and waits until it says it listens.
    pub async fn start(
        netns: Option<&str>,
        listen_ip: &str,
        pki: &Path,
        qmp_dir: &Path,
        allow: &[&str],
    ) -> Service {
        Service::start_with(netns, listen_ip, pki, qmp_dir, allow, &[]).await
    }

    /// [`Service::start`] with more `serve` arguments.
    pub async fn start_with(
        netns: Option<&str>,
        listen_ip: &str,
        pki: &Path,
        qmp_dir: &Path,
        allow: &[&str],
        extra: &[&str],
    ) -> Service {
        let exe = env!("CARGO_BIN_EXE_qemu-tls-migrate");
        let cmd = match netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, exe]);
                c
            }
            None => tokio::process::Command::new(exe),
        };
        Service::launch(cmd, listen_ip, pki, qmp_dir, allow, extra).await
    }

    /// [`Service::start_with`] inside a libvirt host's namespaces (its own libvirtd). With
    /// `--libvirt` among `extra`, the host's images directory is its `--storage-dir`, the guest
    /// workload's directory its `--boot-dir`, and, unless `extra` names one, a `--state-dir` of
    /// its own (services running side by side never share records).
    pub async fn start_in_libvirt_host(
        host: &LibvirtHost,
        listen_ip: &str,
        pki: &Path,
        qmp_dir: &Path,
        extra: &[&str],
    ) -> Service {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let cmd = host.command(env!("CARGO_BIN_EXE_qemu-tls-migrate"));
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        if extra.contains(&"--libvirt") {
            let kernel = qemu_tls_migrate::vm::workload::workload_kernel(1, 1).expect("workload");
            let boot = kernel.path.parent().expect("the workload's directory");
            args.extend([
                "--storage-dir".to_string(),
                host.images_dir().display().to_string(),
                "--boot-dir".to_string(),
                boot.display().to_string(),
            ]);
            if !extra.contains(&"--state-dir") {
                let n = NEXT.fetch_add(1, Ordering::SeqCst);
                let state = host.dir.path().join(format!("state-{n}"));
                args.extend(["--state-dir".to_string(), state.display().to_string()]);
            }
        }
        Service::launch(cmd, listen_ip, pki, qmp_dir, &[], &strs(&args)).await
    }

    async fn launch(
        mut cmd: tokio::process::Command,
        listen_ip: &str,
        pki: &Path,
        qmp_dir: &Path,
        allow: &[&str],
        extra: &[&str],
    ) -> Service {
        cmd.args(["serve", "--json", "--listen", &format!("{listen_ip}:0")])
            .arg("--pki-dir")
            .arg(pki)
            .arg("--qmp-dir")
            .arg(qmp_dir)
            .args(["--qmp-timeout", "10"]);
        for name in allow {
            cmd.args(["--allow-client", name]);
        }
        cmd.args(extra);
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the service");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
        let line = tokio::time::timeout(EVENT_TIMEOUT, lines.next_line())
            .await
            .expect("the service says it listens")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("JSON");
        let addr = v["listening"]
            .as_str()
            .expect("listening address")
            .to_string();
        Service { child, addr }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL (no chance to clean up, as after a crash), and waits until it is gone.
    pub async fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL the service");
        tokio::time::timeout(EVENT_TIMEOUT, self.child.wait())
            .await
            .expect("the service dies")
            .expect("wait");
    }

    /// SIGTERM, then waits for a clean exit; returns the exit code.
    pub async fn stop(&mut self) -> Option<i32> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::time::timeout(EVENT_TIMEOUT, self.child.wait())
            .await
            .ok()
            .and_then(|s| s.ok())
            .and_then(|s| s.code())
    }
}

/// A `migrate --to` command line from host `b` to the service at `service_addr` (whose host
/// is `host-a`), naming `qmp` in the service's directory, with the PKI directory `pki`.
pub fn migrate_to_args(
    pair: &Pair,
    service_addr: &str,
    pki: &Path,
    qmp: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "migrate",
        "--json",
        "--source-qmp",
        &pair.source.qmp_path().display().to_string(),
        "--to",
        service_addr,
        "--dest-qmp",
        qmp,
        "--dest-host",
        "host-a",
        "--pki-dir",
        &pki.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Two hosts (`a` the destination, `b` the source) with PKI directories from one lab CA:
/// `host-a`'s and `host-b`'s.
pub fn two_secured_hosts() -> (TwoHosts, Lab, PathBuf, PathBuf) {
    let hosts = TwoHosts::create();
    let lab = Lab::new("Test CA");
    let pki_a = lab.host("host-a", &["host-a"]);
    let pki_b = lab.host("host-b", &["host-b"]);
    (hosts, lab, pki_a, pki_b)
}

/// The CLI with `args`, run in namespace `netns`, its stdout and stderr piped.
pub fn spawn_cli_in(netns: &str, args: &[String]) -> tokio::process::Child {
    cli_in(netns)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn qemu-tls-migrate in a namespace")
}

fn cli_in(netns: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        netns,
        env!("CARGO_BIN_EXE_qemu-tls-migrate"),
    ]);
    cmd
}

/// Borrowed views of owned arguments.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Runs the CLI inside a network namespace.
pub async fn run_cli_in(netns: &str, args: &[&str]) -> Output {
    cli_in(netns)
        .args(args)
        .output()
        .await
        .expect("run qemu-tls-migrate in a namespace")
}

/// A TLS connection (the control channel's, unframed) to the service at `addr` from host
/// `b`, with the client certificate in `pki`, verifying the service as `host-a`.
pub async fn tls_client(
    hosts: &TwoHosts,
    addr: &str,
    pki: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    try_tls_client(hosts, addr, pki).await.expect("TLS")
}

/// [`tls_client`], failing with the handshake's error.
pub async fn try_tls_client(
    hosts: &TwoHosts,
    addr: &str,
    pki: &Path,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = connect_in_netns(&hosts.b, addr);
    let config = qemu_tls_migrate::peer::client_config(pki).expect("client config");
    let name = rustls::pki_types::ServerName::try_from("host-a").expect("name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// A source speaking the control protocol to a service by hand (from host `b`), one request
/// at a time: for what the tool itself never sends.
pub struct PeerClient {
    channel: qemu_tls_migrate::peer::Channel<tokio_rustls::client::TlsStream<TcpStream>>,
}

impl PeerClient {
    /// Connects with the client certificate in `pki` and says hello.
    pub async fn connect(hosts: &TwoHosts, addr: &str, pki: &Path) -> PeerClient {
        use qemu_tls_migrate::peer::Message;
        let mut client = PeerClient {
            channel: qemu_tls_migrate::peer::Channel::new(tls_client(hosts, addr, pki).await),
        };
        let welcome = client
            .ask(Message::Hello {
                client: "test".into(),
            })
            .await;
        assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
        client
    }

    /// Sends `msg` and returns the service's answer (pings aside).
    pub async fn ask(
        &mut self,
        msg: qemu_tls_migrate::peer::Message,
    ) -> qemu_tls_migrate::peer::Message {
        self.channel.send(&msg).await.expect("send to the service");
        self.channel
            .recv(LIBVIRT_REQUEST_TIMEOUT)
            .await
            .expect("the service answers")
    }
}

/// How long a request that makes a libvirt domain may take.
pub const LIBVIRT_REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Source disk images (node name, format, MiB) in `dir`, each filled with its own pattern.
fn make_disks(dir: &Path, disks: &[(&str, DiskFormat, u64)]) -> Vec<DiskConfig> {
    disks
        .iter()
        .enumerate()
        .map(|(i, (node, format, mib))| {
            let path = dir.join(format!("{node}.{}", format.as_str()));
            create_image(&path, *format, mib << 20).expect("source image");
            qemu_io(
                &path,
                *format,
                &format!("write -P 0x{:x} 0 {}M", 0x30 + i, mib),
            );
            DiskConfig {
                node: node.to_string(),
                path,
                format: *format,
                device: None,
            }
        })
        .collect()
}

/// A TCP connection opened from inside network namespace `netns` (a thread enters it just
/// for the `connect`; the socket stays in that namespace), for tokio.
pub fn connect_in_netns(netns: &str, addr: &str) -> tokio::net::TcpStream {
    let (ns, addr) = (netns.to_string(), addr.to_string());
    let stream = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        std::net::TcpStream::connect(&addr).expect("connect in netns")
    })
    .join()
    .expect("netns thread");
    stream.set_nonblocking(true).expect("nonblocking");
    tokio::net::TcpStream::from_std(stream).expect("tokio stream")
}

/// Idle TCP connections to a service from one network namespace (so from one address) that
/// never send a ClientHello: each is kept open until the service closes it, then opened again
/// (after a short pause when the service refused it as busy, so the flood does not spin). Stops
/// on drop.
pub struct IdleFlood {
    stop: CancellationToken,
    counts: Arc<FloodCounts>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What a flood's connections got from the service.
#[derive(Debug, Default)]
pub struct FloodCounts {
    /// Connections opened.
    pub opened: std::sync::atomic::AtomicU64,
    /// Refused at once with the busy alert.
    pub busy: std::sync::atomic::AtomicU64,
    /// Closed by the service with nothing sent (the handshake deadline).
    pub closed_silently: std::sync::atomic::AtomicU64,
    /// Anything else the service sent.
    pub other: std::sync::atomic::AtomicU64,
}

impl IdleFlood {
    /// Starts `connections` idle connections from namespace `netns` to `addr`.
    pub fn start(netns: &str, addr: &str, connections: usize) -> IdleFlood {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = CancellationToken::new();
        let counts = Arc::new(FloodCounts::default());
        let tasks = (0..connections)
            .map(|_| {
                let (netns, addr) = (netns.to_string(), addr.to_string());
                let (stop, counts) = (stop.clone(), counts.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let (ns, to) = (netns.clone(), addr.clone());
                        let Ok(mut tcp) =
                            tokio::task::spawn_blocking(move || connect_in_netns(&ns, &to)).await
                        else {
                            return;
                        };
                        counts.opened.fetch_add(1, Relaxed);
                        let mut got = Vec::new();
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tcp.read_to_end(&mut got) => {}
                        }
                        if got == qemu_tls_migrate::peer::BUSY_ALERT {
                            counts.busy.fetch_add(1, Relaxed);
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            }
                        } else if got.is_empty() {
                            counts.closed_silently.fetch_add(1, Relaxed);
                        } else {
                            counts.other.fetch_add(1, Relaxed);
                        }
                    }
                })
            })
            .collect();
        IdleFlood {
            stop,
            counts,
            tasks,
        }
    }

    /// What the connections got so far.
    pub fn counts(&self) -> &FloodCounts {
        &self.counts
    }

    /// Waits until the flood has opened at least `n` connections (each accepted by the
    /// service: held in a handshake, or refused).
    pub async fn wait_opened(&self, n: u64) {
        tokio::time::timeout(EVENT_TIMEOUT, async {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while self
                .counts
                .opened
                .load(std::sync::atomic::Ordering::Relaxed)
                < n
            {
                tick.tick().await;
            }
        })
        .await
        .expect("the flood connects");
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        self.stop.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The user libvirt's QEMU runs as on Debian (`qemu.conf` default).
pub const LIBVIRT_QEMU_USER: &str = "libvirt-qemu";
/// How long a libvirt host's daemons may take to open their sockets.
pub const LIBVIRT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A libvirt host: a real `libvirtd` with its `virtlogd`, in network namespace `netns` and in a
/// mount namespace of its own, where `/run`, `/etc/libvirt`, `/var/lib/libvirt`,
/// `/var/log/libvirt` and `/var/cache/libvirt` are this host's directories under `dir` (so two
/// hosts do not see each other's domains) and `/dev/kvm` is hidden (see QEMU-NOTES: libvirt
/// would re-probe QEMU for 30+ s on every `define`, since its QEMU may not use `/dev/kvm`).
///
/// A holder process (`sleep`) keeps the mount namespace; the daemons run in the foreground as
/// our children, entered into both namespaces with `nsenter`. Because `/run` there is `dir/run`
/// bind-mounted, the libvirtd socket is reachable from outside at
/// `dir/run/libvirt/libvirt-sock` ([`LibvirtHost::uri`]). On drop, the QEMUs libvirt started
/// (daemonised, found by their pid files) are killed, then the daemons and the holder.
pub struct LibvirtHost {
    pub netns: String,
    pub dir: TempDir,
    /// How long [`LibvirtHost::start`] took, until both daemons answered on their sockets.
    pub started_in: Duration,
    holder: std::process::Child,
    virtlogd: std::process::Child,
    libvirtd: std::process::Child,
}

impl LibvirtHost {
    /// Starts libvirtd and virtlogd for a host living in network namespace `netns`, and waits
    /// until both accept connections on their sockets.
    pub fn start(netns: &str) -> LibvirtHost {
        use std::io::BufRead;
        use std::os::unix::fs::PermissionsExt;
        let t0 = std::time::Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("qtm-libvirt-")
            .tempdir()
            .expect("libvirt host dir");
        let root = dir.path();
        // libvirt's QEMU (user libvirt-qemu) reaches disk images and QMP sockets below `dir`.
        open_path_for_others(root);
        let copy = |from: &str, to: &str| {
            let out = std::process::Command::new("cp")
                .args(["-a", from])
                .arg(root.join(to))
                .output()
                .expect("cp");
            assert!(out.status.success(), "cp -a {from}: {out:?}");
        };
        copy("/etc/libvirt", "etc");
        copy("/var/lib/libvirt", "lib");
        copy("/var/log/libvirt", "log");
        copy("/var/cache/libvirt", "cache");
        std::fs::create_dir_all(root.join("run/lock")).expect("run dir");
        std::fs::set_permissions(root.join("run"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod run");
        std::fs::write(root.join("kvm"), b"").expect("kvm stand-in");
        std::fs::set_permissions(root.join("kvm"), std::fs::Permissions::from_mode(0o600))
            .expect("chmod kvm stand-in");
        for sub in ["images", "qmp"] {
            std::fs::create_dir(root.join(sub)).expect("host subdir");
        }
        // QEMU creates its QMP sockets in `qmp/`: root:libvirt-qemu 0770.
        let group = nix::unistd::Group::from_name(LIBVIRT_QEMU_USER)
            .expect("group lookup")
            .expect("group libvirt-qemu (scripts/setup.sh installs libvirt)");
        nix::unistd::chown(&root.join("qmp"), None, Some(group.gid)).expect("chown qmp");
        std::fs::set_permissions(root.join("qmp"), std::fs::Permissions::from_mode(0o770))
            .expect("chmod qmp");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("etc/qemu.conf"))
            .expect("qemu.conf");
        std::io::Write::write_all(
            &mut conf,
            b"\n# qemu-tls-migrate test host\n\
              cgroup_controllers = [ ]\n\
              namespaces = [ ]\n\
              security_driver = \"none\"\n",
        )
        .expect("write qemu.conf");

        // The holder: enters `netns`, unshares a private mount namespace, mounts this host's
        // directories, says so, and sleeps until killed.
        let script = r#"set -e
mount --bind "$1/run" /run
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
if [ -e /dev/kvm ]; then mount --bind "$1/kvm" /dev/kvm; fi
echo ready
exec sleep infinity >/dev/null"#;
        let mut holder = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "unshare", "--mount"])
            .args(["--propagation", "private", "sh", "-c", script, "sh"])
            .arg(root)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the namespace holder");
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.take().expect("holder stdout"))
            .read_line(&mut line)
            .expect("read the holder");
        assert_eq!(line.trim(), "ready", "the namespace holder failed to mount");
        let holder_pid = holder.id().to_string();

        let daemon = |program: &str| {
            let log = std::fs::File::create(root.join(format!("{program}.log"))).expect("log");
            std::process::Command::new("nsenter")
                .args(["--target", &holder_pid, "--mount", "--net", program])
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {program}: {e}"))
        };
        let virtlogd = daemon("virtlogd");
        let libvirtd = daemon("libvirtd");
        let mut host = LibvirtHost {
            netns: netns.to_string(),
            dir,
            started_in: Duration::ZERO,
            holder,
            virtlogd,
            libvirtd,
        };
        for sock in ["virtlogd-sock", "libvirt-sock"] {
            host.wait_for_socket(&host.run_dir().join("libvirt").join(sock));
        }
        host.started_in = t0.elapsed();
        host
    }

    /// Makes libvirtd probe QEMU's capabilities now (`virsh domcapabilities`; about 2 s on this
    /// machine, which the first `define` or `create` would otherwise pay).
    pub fn probe_qemu(&self) {
        let out = std::process::Command::new("nsenter")
            .args([
                "--target",
                &self.holder.id().to_string(),
                "--mount",
                "--net",
            ])
            .args([
                "virsh",
                "-c",
                "qemu:///system",
                "domcapabilities",
                "--virttype",
                "qemu",
            ])
            .output()
            .expect("virsh domcapabilities");
        assert!(
            out.status.success(),
            "virsh domcapabilities: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Gives this host the QEMU capabilities cache `other` probed. libvirtd reads its cache
    /// when first needed and finds it valid (same QEMU, same hidden `/dev/kvm`), so this host
    /// skips the probe.
    pub fn seed_qemu_capabilities(&self, other: &LibvirtHost) {
        let to = self.dir.path().join("cache/qemu");
        let _ = std::fs::remove_dir_all(to.join("capabilities"));
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(other.dir.path().join("cache/qemu/capabilities"))
            .arg(&to)
            .output()
            .expect("cp");
        assert!(out.status.success(), "copy the capabilities cache: {out:?}");
    }

    /// This host's `/run`, seen from outside its mount namespace.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A path inside this host's mount namespace as seen from outside it (`/run` is
    /// [`LibvirtHost::run_dir`]; other paths are the same on both sides).
    pub fn outside(&self, inside: &Path) -> PathBuf {
        match inside.strip_prefix("/run") {
            Ok(rest) => self.run_dir().join(rest),
            Err(_) => inside.to_path_buf(),
        }
    }

    /// A directory QEMU (as libvirt-qemu) can create QMP sockets in.
    pub fn qmp_dir(&self) -> PathBuf {
        self.dir.path().join("qmp")
    }

    /// A directory for this host's disk images, reachable by libvirt-qemu.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// A libvirt URI that reaches this host's libvirtd from outside its namespaces.
    pub fn uri(&self) -> String {
        format!(
            "qemu+unix:///system?socket={}",
            self.run_dir().join("libvirt/libvirt-sock").display()
        )
    }

    /// A command that runs `program` inside this host's network and mount namespaces (where
    /// `qemu:///system` is this host's libvirtd). Paths given to it must be absolute.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args([
            "--target",
            &self.holder.id().to_string(),
            "--mount",
            "--net",
        ])
        .arg(program)
        .kill_on_drop(true);
        cmd
    }

    /// `virsh -c qemu:///system ARGS` run inside this host.
    pub async fn virsh(&self, args: &[&str]) -> Output {
        self.command("virsh")
            .args(["-c", "qemu:///system"])
            .args(args)
            .output()
            .await
            .expect("run virsh")
    }

    /// `virsh ARGS`'s standard output, trimmed; panics with its stderr when it fails.
    pub async fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args).await;
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs the `qemu-tls-migrate` binary inside this host.
    pub async fn run_cli(&self, args: &[&str]) -> Output {
        self.command(env!("CARGO_BIN_EXE_qemu-tls-migrate"))
            .args(args)
            .output()
            .await
            .expect("run qemu-tls-migrate in a libvirt host")
    }

    fn wait_for_socket(&mut self, path: &Path) {
        let deadline = std::time::Instant::now() + LIBVIRT_START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return;
            }
            let exited = [
                ("libvirtd", &mut self.libvirtd),
                ("virtlogd", &mut self.virtlogd),
            ]
            .into_iter()
            .find_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => Some((name, status)),
                _ => None,
            });
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}): {}", self.log_tail(name));
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no socket at {} after {LIBVIRT_START_TIMEOUT:?}: {}",
                path.display(),
                self.log_tail("libvirtd")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last lines a daemon wrote (`libvirtd`, `virtlogd`).
    pub fn log_tail(&self, daemon: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// PIDs of the QEMU processes libvirt started here (its pid files in `/run/libvirt/qemu`).
    fn qemu_pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(self.run_dir().join("libvirt/qemu")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if std::thread::panicking() {
            eprintln!(
                "--- libvirtd ({}): {}",
                self.netns,
                self.log_tail("libvirtd")
            );
            if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log/qemu")) {
                for e in entries.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(10).collect();
                    eprintln!("--- {}: {:?}", e.path().display(), tail);
                }
            }
        }
        for pid in self.qemu_pids() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.starts_with("qemu-system") {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        for child in [&mut self.libvirtd, &mut self.virtlogd] {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Two libvirt hosts on [`TwoHosts`]' namespaces: `a` (the destination) and `b` (the source).
/// Tests that run at the same time share one pair ([`LibvirtPair::shared`]); it goes away when
/// the last of them drops it.
pub struct LibvirtPair {
    pub a: LibvirtHost,
    pub b: LibvirtHost,
    pub hosts: TwoHosts,
    /// How long [`LibvirtPair::start`] took, QEMU probe included.
    pub ready_in: Duration,
}

impl LibvirtPair {
    /// Starts both hosts (in parallel), and has them ready to define domains at once: `a`
    /// probes QEMU, `b` gets `a`'s capabilities cache (one probe per pair, not two).
    pub fn start() -> LibvirtPair {
        let t0 = std::time::Instant::now();
        let hosts = TwoHosts::create();
        let (a_ns, b_ns) = (hosts.a.clone(), hosts.b.clone());
        let a = std::thread::spawn(move || {
            let a = LibvirtHost::start(&a_ns);
            a.probe_qemu();
            a
        });
        let b = LibvirtHost::start(&b_ns);
        let a = a.join().expect("libvirt host a");
        b.seed_qemu_capabilities(&a);
        let ready_in = t0.elapsed();
        // Shown with --nocapture: the cost of a pair, for the suite's time budget.
        eprintln!(
            "libvirt pair: daemons answering after {:?} (a) and {:?} (b), ready after {ready_in:?}",
            a.started_in, b.started_in
        );
        LibvirtPair {
            a,
            b,
            hosts,
            ready_in,
        }
    }

    /// The pair other running tests use, or a new one.
    pub fn shared() -> Arc<LibvirtPair> {
        static SHARED: Mutex<std::sync::Weak<LibvirtPair>> = Mutex::new(std::sync::Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pair) = shared.upgrade() {
            return pair;
        }
        let pair = Arc::new(LibvirtPair::start());
        *shared = Arc::downgrade(&pair);
        pair
    }
}

impl LibvirtPair {
    /// A Linux bridge of this name in both hosts' network namespaces (made once), for
    /// domains with an interface, as CloudStack's `cloudbr0`.
    pub fn bridge(&self) -> &'static str {
        const BRIDGE: &str = "qtmbr0";
        for ns in [&self.hosts.a, &self.hosts.b] {
            let exists = std::process::Command::new("ip")
                .args(["-n", ns, "link", "show", BRIDGE])
                .output()
                .expect("ip link show")
                .status
                .success();
            if !exists {
                // Two tests may race to make it: a bridge that exists by now is as good.
                let _ = std::process::Command::new("ip")
                    .args(["-n", ns, "link", "add", BRIDGE, "type", "bridge"])
                    .output();
                ip(&["-n", ns, "link", "set", BRIDGE, "up"]);
            }
        }
        BRIDGE
    }
}

/// A domain shaped as CloudStack's agent defines one (LibvirtVMDef: SMBIOS sysinfo, boot
/// order, `on_*`, cputune shares, a custom CPU model and topology, acpi/apic/pae, kvmclock, a
/// qcow2 `vda` with a serial, an empty IDE cdrom, a virtio interface on `bridge`, pty serial
/// and console, VNC with a password, the guest agent's channel, a USB tablet, cirrus video, a
/// virtio rng on /dev/urandom, an i6300esb watchdog, a virtio balloon), TCG, [`RAM_MIB`],
/// with a QMP monitor declared at `monitor`. (No `<bandwidth>`: this kernel lacks the `sfq`
/// qdisc libvirt shapes it with.)
pub fn cloudstack_domain_xml(name: &str, disk: &Path, monitor: &Path, bridge: &str) -> String {
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <description>Debian GNU/Linux 12 (64-bit)</description>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Apache Software Foundation</entry>
      <entry name='product'>CloudStack KVM Hypervisor</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
    <smbios mode='sysinfo'/>
  </os>
  <on_reboot>restart</on_reboot>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <memory unit='MiB'>{RAM_MIB}</memory>
  <currentMemory unit='MiB'>{RAM_MIB}</currentMemory>
  <vcpu>1</vcpu>
  <cputune><shares>1000</shares></cputune>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model>\
<topology sockets='1' cores='1' threads='1'/></cpu>
  <features><pae/><apic/><acpi/></features>
  <clock offset='utc'><timer name='kvmclock'/></clock>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk device='disk' type='file'><driver name='qemu' type='qcow2' cache='none'/>\
<source file='{disk}'/><target dev='vda' bus='virtio'/><serial>9a2b7c1d3e4f</serial></disk>
    <disk device='cdrom' type='file'><driver name='qemu' type='raw'/>\
<target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='bridge'><source bridge='{bridge}'/><mac address='02:00:4c:5e:00:01'/>\
<model type='virtio'/><link state='up'/></interface>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target port='0'/></console>
    <graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='s3cret'/>
    <channel type='unix'><source mode='bind' \
path='/var/lib/libvirt/qemu/{name}.org.qemu.guest_agent.0'/>\
<target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <input type='tablet' bus='usb'/>
    <video><model type='cirrus'/></video>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend>\
<rate period='1000' bytes='2048'/></rng>
    <watchdog model='i6300esb' action='none'/>
    <memballoon model='virtio'><stats period='0'/></memballoon>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{monitor},server=on,wait=off'/>
  </qemu:commandline>
</domain>
",
        disk = disk.display(),
        monitor = monitor.display(),
    )
}

/// PIDs of every QEMU process on this machine, whichever host started it.
pub fn all_qemu_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.starts_with("qemu-system"))
        })
        .collect()
}

/// The command line of process `pid`, its arguments joined by spaces ("" once it is gone).
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// A unique domain name for a test (`qtm-<what>-<pid>-<n>`).
pub fn domain_name(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    format!(
        "qtm-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// The XML of a small test domain: TCG (`type='qemu'`: libvirt's QEMU may not open
/// `/dev/kvm`), [`RAM_MIB`], SeaBIOS idling with no bootable disk, one virtio qcow2 disk
/// `vda` at `disk`, no network, and, when `monitor` is given, a QMP monitor there declared in
/// `<qemu:commandline>`.
pub fn small_domain_xml(name: &str, disk: &Path, monitor: Option<&Path>) -> String {
    domain_xml(name, &[("vda", disk, DiskFormat::Qcow2)], monitor, None)
}

/// [`small_domain_xml`] with these virtio disks (target `vda`, image, format), booting
/// `kernel` (our guest workload) instead of idling in SeaBIOS when given.
pub fn domain_xml(
    name: &str,
    disks: &[(&str, &Path, DiskFormat)],
    monitor: Option<&Path>,
    kernel: Option<&qemu_tls_migrate::vm::KernelConfig>,
) -> String {
    let boot = match kernel {
        Some(k) => format!(
            "<kernel>{}</kernel><cmdline>{}</cmdline>",
            k.path.display(),
            k.append
        ),
        None => "<boot dev='hd'/>".into(),
    };
    let commandline = monitor
        .map(|m| {
            format!(
                "  <qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    \
                 <qemu:arg value='unix:{},server=on,wait=off'/>\n  </qemu:commandline>\n",
                m.display()
            )
        })
        .unwrap_or_default();
    let disks: String = disks
        .iter()
        .map(|(target, path, format)| {
            format!(
                "    <disk type='file' device='disk'>
      <driver name='qemu' type='{format}'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
",
                format = format.as_str(),
                path = path.display()
            )
        })
        .collect();
    format!(
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{RAM_MIB}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <memballoon model='none'/>
  </devices>
{commandline}</domain>
"
    )
}

/// Every frame on every interface of network namespace `netns` (the veth between two test
/// hosts included), read with an `AF_PACKET` socket while it runs, and searched for byte
/// strings that would show cleartext: what a tap on the link would see.
pub struct LinkCapture {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<CaptureResult>>,
}

/// What a [`LinkCapture`] saw.
#[derive(Debug, Default, Clone)]
pub struct CaptureResult {
    /// Frames and their bytes.
    pub frames: u64,
    pub bytes: u64,
    /// The needles found (by index into the needles given), with a count each.
    pub found: Vec<(usize, u64)>,
}

impl LinkCapture {
    pub fn start(netns: &str, needles: Vec<Vec<u8>>) -> LinkCapture {
        use nix::sys::socket::{
            AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket,
            sockopt,
        };
        use std::os::fd::AsRawFd;
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = netns.to_string();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let fd = socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::EthAll,
            )
            .expect("AF_PACKET socket");
            setsockopt(
                &fd,
                sockopt::ReceiveTimeout,
                &nix::sys::time::TimeVal::new(0, 50_000),
            )
            .expect("SO_RCVTIMEO");
            // Room for bursts while the thread copies (root may exceed rmem_max).
            setsockopt(&fd, sockopt::RcvBufForce, &(64 << 20)).expect("SO_RCVBUFFORCE");
            ready_tx.send(()).expect("ready");
            let (mut frames, mut seen) = (0u64, Vec::with_capacity(64 << 20));
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                    Ok(n) => n,
                    // Stopped: the frames already queued are read first, until the socket
                    // has been idle for one receive timeout, so what was sent before the
                    // stop is all seen.
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR)
                        if stopped.load(Ordering::SeqCst) =>
                    {
                        break;
                    }
                    Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                    Err(e) => panic!("capture: {e}"),
                };
                frames += 1;
                // Kept, and searched once the capture ends: searching as frames come would
                // fall behind a migration (the kernel then drops frames).
                seen.extend_from_slice(&buf[..n]);
            }
            CaptureResult {
                frames,
                bytes: seen.len() as u64,
                found: needles
                    .iter()
                    .enumerate()
                    .map(|(i, needle)| (i, memchr::memmem::find_iter(&seen, needle).count() as u64))
                    .collect(),
            }
        });
        ready_rx.recv().expect("capture started");
        LinkCapture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops capturing; what was seen.
    pub fn finish(mut self) -> CaptureResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("capture thread")
    }
}

impl Drop for LinkCapture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Sends `bytes` in clear over TCP from namespace `from` to `to_addr` in namespace `to`: the
/// control that shows a [`LinkCapture`] sees cleartext when there is some.
pub fn send_in_clear(from: &str, to: &str, to_addr: &str, bytes: &[u8]) {
    use std::io::{Read, Write};
    let in_netns = |ns: &str| {
        let file = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("netns file");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    };
    let (to, to_addr) = (to.to_string(), to_addr.to_string());
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        in_netns(&to);
        let listener = std::net::TcpListener::bind((to_addr.as_str(), 0)).expect("bind");
        port_tx
            .send((to_addr, listener.local_addr().expect("addr").port()))
            .expect("port");
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        got.len()
    });
    let (addr, port) = port_rx.recv().expect("listening");
    let (from, data) = (from.to_string(), bytes.to_vec());
    std::thread::spawn(move || {
        in_netns(&from);
        let mut conn = std::net::TcpStream::connect((addr.as_str(), port)).expect("connect");
        conn.write_all(&data).expect("write");
    })
    .join()
    .expect("sender");
    assert_eq!(receiver.join().expect("receiver"), bytes.len());
}

/// A second veth link between a [`TwoHosts`] pair's namespaces, with addresses of its own: a
/// test can cut it without cutting the link other tests use.
pub struct ExtraLink {
    pub a_addr: String,
    pub b_addr: String,
    ns_b: String,
    veth_b: String,
}

impl TwoHosts {
    pub fn extra_link(&self) -> ExtraLink {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}x{n}", std::process::id() % 10000);
        let (veth_a, veth_b) = (format!("xa{id}"), format!("xb{id}"));
        let (x, y) = (std::process::id() % 200, n % 60 * 4);
        let a_addr = format!("198.19.{x}.{}", y + 1);
        let b_addr = format!("198.19.{x}.{}", y + 2);
        veth_between((&self.a, &veth_a, &a_addr), (&self.b, &veth_b, &b_addr));
        ExtraLink {
            a_addr,
            b_addr,
            ns_b: self.b.clone(),
            veth_b,
        }
    }
}

impl ExtraLink {
    /// Takes the link down (or up again) on the source's side.
    pub fn set(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        let out = std::process::Command::new("ip")
            .args(["-n", &self.ns_b, "link", "set", &self.veth_b, state])
            .output()
            .expect("ip link");
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for ExtraLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["-n", &self.ns_b, "link", "del", &self.veth_b])
            .output();
    }
}

/// Shows `what` on stderr, which `cargo test -- --nocapture` prints: figures a test measured
/// (the README quotes some) and the JSON of runs whose outcome a reader may want to see.
pub fn show(label: &str, what: &dyn std::fmt::Display) {
    eprintln!("{label}: {what}");
}

/// How long to wait for the workload's next progress line (one comes about every 500 ms).
pub const PASS_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the serial log at `path` holds a workload progress line with more than `after`
/// passes.
pub async fn pass_beyond(path: &Path, after: u64) -> qemu_tls_migrate::vm::workload::PassLine {
    use qemu_tls_migrate::vm::workload;
    let deadline = tokio::time::Instant::now() + PASS_TIMEOUT;
    loop {
        let serial = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = workload::pass_lines(&serial)
            .into_iter()
            .find(|l| l.passes > after)
        {
            return line;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no workload pass beyond {after} within {PASS_TIMEOUT:?}; serial log: {serial}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `ip ARGS`; panics with its stderr when it fails.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A veth pair between two namespaces, each end (namespace, device, address) with its /30
/// address and up.
fn veth_between(a: (&str, &str, &str), b: (&str, &str, &str)) {
    ip(&[
        "link", "add", a.1, "netns", a.0, "type", "veth", "peer", "name", b.1, "netns", b.0,
    ]);
    for (ns, dev, addr) in [a, b] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
}

/// Panics unless the source's and the destination's guest RAM (their RAM files) are the same,
/// page for page; for a source that completed (`postmigrate`) and a destination left paused.
pub fn assert_ram_identical(pair: &Pair) {
    let src_ram = std::fs::read(pair.source.ram_path()).expect("source RAM");
    let dst_ram = std::fs::read(pair.dest.ram_path()).expect("destination RAM");
    let differing: Vec<usize> = (0..src_ram.len() / 4096)
        .filter(|page| {
            src_ram[page * 4096..(page + 1) * 4096] != dst_ram[page * 4096..(page + 1) * 4096]
        })
        .collect();
    assert!(
        differing.is_empty(),
        "guest RAM differs after migration in {} pages, first {:x?}",
        differing.len(),
        &differing[..differing.len().min(16)]
    );
}

/// A `migrate --json` command line from `pair`'s source to its destination (as
/// [`DEST_HOST`]), with these PKI directories.
pub fn migrate_args(pair: &Pair, src_pki: &str, dst_pki: &str) -> Vec<String> {
    [
        "migrate",
        "--json",
        "--source-qmp",
        &pair.source.qmp_path().display().to_string(),
        "--dest-qmp",
        &pair.dest.qmp_path().display().to_string(),
        "--dest-host",
        DEST_HOST,
        "--source-pki-dir",
        src_pki,
        "--dest-pki-dir",
        dst_pki,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
