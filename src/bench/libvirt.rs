//! libvirt's own migration as bench modes, beside the tool's: a pair of real libvirtd daemons
//! the bench starts itself, and one libvirt domain migrated between them per run, either by
//! libvirt (`virsh migrate --live --p2p [--tls] --copy-storage-all`) or by the tool (`migrate
//! --domain NAME --to` into `serve --libvirt`, the CloudStack agent's command line).
//!
//! Each host lives in a network namespace of its own (a veth pair, addresses in
//! 198.18.0.0/15) and a mount namespace of its own, where `/run`, `/etc/libvirt`,
//! `/var/lib/libvirt`, `/var/log/libvirt`, `/var/cache/libvirt` and `/etc/hosts` are this
//! host's files under the bench's work directory, so the two libvirtds do not see each other's
//! domains or disks (`/var/lib/libvirt/images/NAME.qcow2` is a different file on each host).
//! Each libvirtd has a `host_uuid` of its own (libvirt refuses to migrate to its own UUID) and
//! listens for TLS with the bench's lab PKI (its `src-host` / `dst-host` certificates), and its
//! QEMU's migration TLS directory holds that host's PKI files, `dh-params.pem` included.
//!
//! The namespace holder (a shell) is the child subreaper of the daemons it starts, and reaps
//! the QEMUs libvirt daemonises when they exit: otherwise they are orphans of PID 1, which on
//! this kind of machine reaps only every ~2 s, and libvirt waits for a killed QEMU to vanish
//! (at the end of its own migration, and at the tool's `--destroy-source`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use super::{DEST_HOST, SOURCE_HOST};
use crate::migration::Timing;

/// How long a host's daemons may take to open their sockets.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one migration command (libvirt's or the tool's) may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the destination service may take to say it listens.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(30);
/// The user libvirt's QEMU runs as on Debian (qemu.conf's default).
const QEMU_GROUP: &str = "libvirt-qemu";
/// Where each host keeps its domains' disks, inside its mount namespace.
const IMAGES: &str = "/var/lib/libvirt/images";

/// Who migrates the domain, over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainMode {
    /// `virsh migrate --live --p2p --tls --copy-storage-all`.
    LibvirtTls,
    /// The same without `--tls`: QEMU's streams in plain TCP.
    LibvirtTcp,
    /// `migrate --domain --to` into `serve --libvirt`, `--destroy-source`.
    ToolTls,
    /// The same with `--transport tcp`.
    ToolTcp,
}

impl DomainMode {
    pub fn name(self) -> &'static str {
        match self {
            DomainMode::LibvirtTls => "libvirt-tls",
            DomainMode::LibvirtTcp => "libvirt-tcp",
            DomainMode::ToolTls => "tool-domain-tls",
            DomainMode::ToolTcp => "tool-domain-tcp",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, DomainMode::LibvirtTls | DomainMode::ToolTls)
    }

    pub fn by_libvirt(self) -> bool {
        matches!(self, DomainMode::LibvirtTls | DomainMode::LibvirtTcp)
    }

    /// What the mode is, and what its wall time covers.
    pub fn describe(self) -> &'static str {
        match self {
            DomainMode::LibvirtTls => {
                "libvirt's own migration, QEMU native TLS (virsh migrate --live --p2p --tls \
                 --copy-storage-all); wall: the virsh command, from the connection to the \
                 destination libvirtd through starting its QEMU, the disk and RAM copy, to the \
                 source QEMU's exit"
            }
            DomainMode::LibvirtTcp => {
                "libvirt's own migration, QEMU streams in plain TCP (virsh migrate --live --p2p \
                 --copy-storage-all); wall as libvirt-tls"
            }
            DomainMode::ToolTls => {
                "the tool over TLS (migrate --domain --to serve --libvirt --destroy-source); \
                 wall: the migrate command, from its checks and the control channel through the \
                 service starting the destination QEMU, the disk and RAM copy, to the source \
                 domain destroyed"
            }
            DomainMode::ToolTcp => {
                "the tool in plain TCP (--transport tcp); wall as tool-domain-tls"
            }
        }
    }
}

/// Why the libvirt pair or one of its migrations failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibvirtBenchError {
    #[error("libvirt bench host: {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("{what} not ready after {after:?}: {detail}")]
    NotReady {
        what: String,
        after: Duration,
        detail: String,
    },
    #[error("run not verified: {0}")]
    Verify(String),
    #[error("{what}: unexpected output: {detail}")]
    Output { what: String, detail: String },
}

type Result<T> = std::result::Result<T, LibvirtBenchError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LibvirtBenchError {
    let what = what.into();
    move |source| LibvirtBenchError::Io { what, source }
}

/// One libvirt host: its namespaces' holder (which starts and reaps the daemons) and files.
#[derive(Debug)]
struct Host {
    /// The lab PKI host name (`src-host`, `dst-host`).
    name: &'static str,
    netns: String,
    addr: String,
    /// This host's directories (`run`, `etc`, `lib`, `log`, `cache`, `hosts`).
    dir: PathBuf,
    holder: std::process::Child,
}

/// The measurements of one domain migration.
#[derive(Debug, Clone, Default)]
pub struct DomainRun {
    pub wall_ms: u64,
    /// QEMU's RAM migration time, setup to completion.
    pub total_ms: u64,
    pub setup_ms: u64,
    pub downtime_ms: u64,
    pub guest_pause_ms: Option<u64>,
    pub ram_bytes: u64,
    pub guest_ram_bytes: u64,
    pub ram_mbps: f64,
    pub dirty_sync_count: u64,
    pub disk_bytes: u64,
    pub disk_mbps: Option<f64>,
    pub phases: Timing,
    /// libvirt's: its set-up and disk copy, not split ([`libvirt_run`]).
    pub setup_disks_ms: Option<u64>,
    pub forecast_ms: Option<u64>,
}

/// The two hosts, the tool's service on the destination, and the guest's boot files.
#[derive(Debug)]
pub struct LibvirtPair {
    src: Host,
    dst: Host,
    /// The tool, for `serve --libvirt` and `migrate --domain`.
    exe: PathBuf,
    /// The guest kernel's directory (the service's `--boot-dir`).
    boot_dir: PathBuf,
    service: Option<(tokio::process::Child, String)>,
}

impl LibvirtPair {
    /// Starts both hosts under `root` with the lab's host directories in `lab` (one per host
    /// name), the guest kernel in `boot_dir`; `exe` is the tool.
    pub async fn start(
        root: &Path,
        lab: &Path,
        boot_dir: &Path,
        exe: PathBuf,
    ) -> Result<LibvirtPair> {
        use std::os::unix::fs::PermissionsExt;
        // libvirt's QEMU (another user) reaches the guest kernel and the hosts' files below.
        for dir in [root, boot_dir] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io(format!("chmod {}", dir.display())))?;
        }
        let id = std::process::id() % 10000;
        let (src_ns, dst_ns) = (format!("qtmbs{id}"), format!("qtmbd{id}"));
        // 198.18.0.0/15 is reserved for benchmarking; the test fixture's pairs use 198.18.x.
        let x = std::process::id() % 250;
        let (dst_addr, src_addr) = (format!("198.19.{x}.1"), format!("198.19.{x}.2"));
        let hosts_file =
            format!("127.0.0.1 localhost\n{src_addr} {SOURCE_HOST}\n{dst_addr} {DEST_HOST}\n");
        for ns in [&src_ns, &dst_ns] {
            // A namespace a killed bench left behind.
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let (veth_s, veth_d) = (format!("qbs{id}"), format!("qbd{id}"));
        ip(&[
            "link", "add", &veth_s, "netns", &src_ns, "type", "veth", "peer", "name", &veth_d,
            "netns", &dst_ns,
        ])?;
        for (ns, veth, addr) in [(&src_ns, &veth_s, &src_addr), (&dst_ns, &veth_d, &dst_addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
        }
        let start = |name: &'static str, ns: &str, addr: &str| {
            Host::start(
                name,
                ns,
                addr,
                &root.join(format!("libvirt-{name}")),
                &lab.join(name),
                &hosts_file,
            )
        };
        let src = start(SOURCE_HOST, &src_ns, &src_addr)?;
        let dst = start(DEST_HOST, &dst_ns, &dst_addr)?;
        for h in [&src, &dst] {
            h.wait_ready().await?;
        }
        // The first define probes QEMU's capabilities (~2 s): paid here, not by a run.
        for h in [&src, &dst] {
            h.virsh(&["domcapabilities", "--virttype", "qemu"]).await?;
        }
        Ok(LibvirtPair {
            src,
            dst,
            exe,
            boot_dir: boot_dir.to_path_buf(),
            service: None,
        })
    }

    /// Defines and starts domain `name` on the source: `ram_mib`, TCG, booting `kernel`, a
    /// qcow2 disk of `disk_mib` MiB of pseudo-random data; waits until its workload has filled
    /// its working set.
    pub async fn start_domain(
        &self,
        name: &str,
        ram_mib: u32,
        disk_mib: u32,
        kernel: &crate::vm::KernelConfig,
    ) -> Result<()> {
        let raw = self.src.dir.join(format!("lib/images/{name}.raw"));
        super::fill_pseudo_random(&raw, u64::from(disk_mib) << 20, 0xd15c)
            .map_err(io(format!("write {}", raw.display())))?;
        let disk = self.src.image(name);
        run_local(
            "qemu-img convert",
            tokio::process::Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&disk),
        )
        .await?;
        let _ = std::fs::remove_file(&raw);
        let serial = self.src.serial(name);
        let _ = std::fs::remove_file(&serial);
        let xml = domain_xml(name, ram_mib, kernel, &format!("{IMAGES}/{name}.qcow2"));
        let xml_path = self.src.dir.join(format!("{name}.xml"));
        std::fs::write(&xml_path, xml).map_err(io("write the domain XML"))?;
        let xml_arg = xml_path.to_string_lossy();
        self.src.virsh(&["define", &xml_arg]).await?;
        self.src.virsh(&["start", name]).await?;
        crate::vm::workload::wait_ready_in(&serial, super::WORKLOAD_START_TIMEOUT)
            .await
            .map_err(|tail| LibvirtBenchError::NotReady {
                what: format!("the workload of domain {name}"),
                after: super::WORKLOAD_START_TIMEOUT,
                detail: tail,
            })
    }

    /// Migrates domain `name` (started by [`LibvirtPair::start_domain`]) from the source to
    /// the destination in `mode`, then checks that it runs there and that its disk is the
    /// source's, and removes it from both hosts.
    pub async fn migrate(&mut self, name: &str, mode: DomainMode) -> Result<DomainRun> {
        let run = if mode.by_libvirt() {
            self.migrate_by_libvirt(name, mode.tls()).await
        } else {
            self.migrate_by_tool(name, mode.tls()).await
        };
        let verified = match &run {
            Ok(_) => self.verify(name).await,
            Err(_) => Ok(()),
        };
        self.remove_domain(name).await;
        let run = run?;
        verified?;
        Ok(run)
    }

    async fn migrate_by_libvirt(&self, name: &str, tls: bool) -> Result<DomainRun> {
        // libvirt copies into a destination file that exists (it precreates only volumes of a
        // storage pool), of the source's virtual size.
        let size = self.virtual_size(&self.src.image(name)).await?;
        run_local(
            "qemu-img create",
            tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(self.dst.image(name))
                .arg(size.to_string()),
        )
        .await?;
        let dest_uri = format!("qemu+tls://{DEST_HOST}/system?pkipath=/etc/libvirt/pki");
        let migrate_uri = format!("tcp://{}", self.dst.addr);
        let mut args = vec!["migrate", "--live", "--p2p", "--copy-storage-all"];
        if tls {
            args.extend(["--tls", "--tls-destination", DEST_HOST]);
        }
        args.extend(["--migrateuri", &migrate_uri, name, &dest_uri]);
        let started = Instant::now();
        self.src.virsh(&args).await?;
        let wall_ms = started.elapsed().as_millis() as u64;
        // The source's: the destination's lacks the disk copy and starts later.
        let stats = self
            .src
            .virsh(&["domjobinfo", "--completed", "--rawstats", name])
            .await?;
        Ok(libvirt_run(&parse_job_stats(&stats), wall_ms))
    }

    async fn migrate_by_tool(&mut self, name: &str, tls: bool) -> Result<DomainRun> {
        let service = self.service().await?;
        let pki = self.src.dir.join("pki");
        // The service allows no file-backed consoles in an incoming domain: the destination
        // gets the serial console as a pty (the guest's device is the same).
        let xml = self.src.virsh(&["dumpxml", "--migratable", name]).await?;
        let dest_xml: String = xml
            .lines()
            .filter(|l| !l.contains("-serial.log'/>"))
            .map(|l| {
                l.replace("<serial type='file'>", "<serial type='pty'>")
                    .replace("<console type='file'>", "<console type='pty'>")
                    + "\n"
            })
            .collect();
        let dest_xml_path = self.src.dir.join(format!("{name}-dest.xml"));
        std::fs::write(&dest_xml_path, dest_xml).map_err(io("write the destination XML"))?;
        let mut cmd = self.src.command(&self.exe);
        cmd.args([
            "migrate", "--json", "-q", "--domain", name, "--to", &service,
        ])
        .args(["--dest-host", DEST_HOST, "--pki-dir"])
        .arg(&pki)
        .arg("--dest-xml")
        .arg(&dest_xml_path)
        .args([
            "--all-local-disks",
            "--destroy-source",
            "--no-cloudstack-check",
        ]);
        if !tls {
            cmd.args(["--transport", "tcp"]);
        }
        let started = Instant::now();
        let out = output_within(cmd, "migrate --domain").await?;
        let wall_ms = started.elapsed().as_millis() as u64;
        let report: Value =
            serde_json::from_slice(&out.stdout).map_err(|e| LibvirtBenchError::Output {
                what: "migrate --json".into(),
                detail: format!("{e}: {}", String::from_utf8_lossy(&out.stdout)),
            })?;
        if !out.status.success() || report["status"] != "completed" {
            return Err(LibvirtBenchError::Command {
                what: "migrate --domain".into(),
                status: out.status.to_string(),
                stderr: format!("{report}"),
            });
        }
        Ok(tool_run(&report, wall_ms))
    }

    /// The tool's `serve --libvirt` on the destination (started at the first use, as a host
    /// runs it all the time); its address.
    async fn service(&mut self) -> Result<String> {
        if let Some((child, addr)) = &mut self.service {
            if matches!(child.try_wait(), Ok(None)) {
                return Ok(addr.clone());
            }
        }
        let mut cmd = self.dst.command(&self.exe);
        cmd.args(["serve", "--json", "--libvirt", "--listen"])
            .arg(format!("{}:0", self.dst.addr))
            .arg("--pki-dir")
            .arg(self.dst.dir.join("pki"))
            .arg("--qmp-dir")
            .arg(self.dst.dir.join("qmp"))
            .args(["--storage-dir", IMAGES, "--boot-dir"])
            .arg(&self.boot_dir)
            .arg("--state-dir")
            .arg(self.dst.dir.join("service-state"))
            .args([
                "--allow-client",
                SOURCE_HOST,
                "--no-cloudstack-check",
                "--allow-plain",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(self.dst.dir.join("service.log"))
                    .map_err(io("the service's log"))?,
            ));
        let mut child = cmd.spawn().map_err(io("start serve --libvirt"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LibvirtBenchError::Output {
                what: "serve --libvirt".into(),
                detail: "no stdout".into(),
            })?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(SERVICE_TIMEOUT, lines.next_line())
            .await
            .map_err(|_| LibvirtBenchError::NotReady {
                what: "serve --libvirt".into(),
                after: SERVICE_TIMEOUT,
                detail: std::fs::read_to_string(self.dst.dir.join("service.log"))
                    .unwrap_or_default(),
            })?
            .map_err(io("read the service's stdout"))?
            .unwrap_or_default();
        let addr = serde_json::from_str::<Value>(&line)
            .ok()
            .and_then(|v| v["listening"].as_str().map(str::to_string))
            .ok_or_else(|| LibvirtBenchError::Output {
                what: "serve --libvirt".into(),
                detail: format!(
                    "{line} {}",
                    std::fs::read_to_string(self.dst.dir.join("service.log")).unwrap_or_default()
                ),
            })?;
        self.service = Some((child, addr.clone()));
        Ok(addr)
    }

    /// The domain runs on the destination per libvirt, is gone or shut off on the source, and
    /// the destination's disk holds what the source's does.
    async fn verify(&self, name: &str) -> Result<()> {
        let state = self.dst.virsh(&["domstate", name]).await?;
        if state.trim() != "running" {
            return Err(LibvirtBenchError::Verify(format!(
                "domain {name} is {} on the destination",
                state.trim()
            )));
        }
        if let Ok(state) = self.src.virsh(&["domstate", name]).await
            && state.trim() == "running"
        {
            return Err(LibvirtBenchError::Verify(format!(
                "domain {name} still runs on the source"
            )));
        }
        self.dst.virsh(&["destroy", name]).await?;
        let out = tokio::process::Command::new("qemu-img")
            .args(["compare", "-q", "-U"])
            .arg(self.src.image(name))
            .arg(self.dst.image(name))
            .output()
            .await
            .map_err(io("run qemu-img compare"))?;
        if !out.status.success() {
            return Err(LibvirtBenchError::Verify(format!(
                "the disks of domain {name} differ ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Domain `name` gone from both hosts, with its disks and serial logs.
    async fn remove_domain(&self, name: &str) {
        for h in [&self.src, &self.dst] {
            let _ = h.virsh(&["destroy", name]).await;
            let _ = h.virsh(&["undefine", name]).await;
            let _ = std::fs::remove_file(h.image(name));
            let _ = std::fs::remove_file(h.serial(name));
        }
    }

    async fn virtual_size(&self, image: &Path) -> Result<u64> {
        let out = tokio::process::Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(image)
            .output()
            .await
            .map_err(io("run qemu-img info"))?;
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["virtual-size"].as_u64())
            .ok_or_else(|| LibvirtBenchError::Output {
                what: format!("qemu-img info {}", image.display()),
                detail: String::from_utf8_lossy(&out.stderr).into(),
            })
    }
}

impl Drop for LibvirtPair {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.service {
            let _ = child.start_kill();
        }
        for h in [&mut self.src, &mut self.dst] {
            h.stop();
        }
        for ns in [&self.src.netns, &self.dst.netns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

impl Host {
    fn start(
        name: &'static str,
        netns: &str,
        addr: &str,
        dir: &Path,
        pki: &Path,
        hosts_file: &str,
    ) -> Result<Host> {
        use std::io::BufRead;
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        for (from, to) in [
            ("/etc/libvirt", "etc"),
            ("/var/lib/libvirt", "lib"),
            ("/var/log/libvirt", "log"),
            ("/var/cache/libvirt", "cache"),
        ] {
            let status = std::process::Command::new("cp")
                .args(["-a", from])
                .arg(dir.join(to))
                .status()
                .map_err(io("run cp"))?;
            if !status.success() {
                return Err(LibvirtBenchError::Command {
                    what: format!("cp -a {from}"),
                    status: status.to_string(),
                    stderr: String::new(),
                });
            }
        }
        let write = |rel: &str, text: &[u8]| {
            std::fs::write(dir.join(rel), text).map_err(io(format!("write {rel}")))
        };
        let append = |rel: &str, text: &str| -> Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(dir.join(rel))
                .map_err(io(format!("open {rel}")))?;
            std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(format!("write {rel}")))
        };
        std::fs::create_dir_all(dir.join("run/lock")).map_err(io("create run"))?;
        std::fs::create_dir_all(dir.join("lib/images")).map_err(io("create images"))?;
        write("hosts", hosts_file.as_bytes())?;
        write("kvm", b"")?;
        // QMP sockets of the service's incoming domains: root:libvirt-qemu 0770.
        let qmp = dir.join("qmp");
        std::fs::create_dir_all(&qmp).map_err(io("create qmp"))?;
        if let Ok(Some(group)) = nix::unistd::Group::from_name(QEMU_GROUP) {
            let _ = nix::unistd::chown(&qmp, None, Some(group.gid));
        }
        std::fs::set_permissions(&qmp, std::fs::Permissions::from_mode(0o770))
            .map_err(io("chmod qmp"))?;
        // The tool's PKI directory (QEMU's file names), libvirt's (its own names, for the
        // daemon's TLS listener and its p2p client), and QEMU's migration TLS under libvirt.
        let copy_pki = |to: &Path, names: &[(&str, &str)]| -> Result<()> {
            std::fs::create_dir_all(to).map_err(io(format!("create {}", to.display())))?;
            for (from, name) in names {
                let target = to.join(name);
                std::fs::copy(pki.join(from), &target)
                    .map_err(io(format!("copy {from} to {}", target.display())))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644))
                    .map_err(io("chmod a PKI file"))?;
            }
            Ok(())
        };
        use crate::pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, DH_PARAMS, SERVER_CERT, SERVER_KEY};
        let qemu_names = [
            CA_CERT,
            SERVER_CERT,
            SERVER_KEY,
            CLIENT_CERT,
            CLIENT_KEY,
            DH_PARAMS,
        ]
        .map(|n| (n, n));
        copy_pki(&dir.join("pki"), &qemu_names)?;
        copy_pki(&dir.join("etc/migrate-tls"), &qemu_names)?;
        copy_pki(
            &dir.join("etc/pki"),
            &[
                (CA_CERT, "cacert.pem"),
                (SERVER_CERT, "servercert.pem"),
                (SERVER_KEY, "serverkey.pem"),
                (CLIENT_CERT, "clientcert.pem"),
                (CLIENT_KEY, "clientkey.pem"),
            ],
        )?;
        // The tool's keys: root and libvirt's QEMU only (a key open to others is refused).
        let group = nix::unistd::Group::from_name(QEMU_GROUP).ok().flatten();
        for key in ["pki/server-key.pem", "pki/client-key.pem"] {
            let key = dir.join(key);
            if let Some(g) = &group {
                let _ = nix::unistd::chown(&key, None, Some(g.gid));
            }
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640))
                .map_err(io("chmod a key"))?;
        }
        append(
            "etc/qemu.conf",
            "\n# qemu-tls-migrate bench host\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
             security_driver = \"none\"\n\
             migrate_tls_x509_cert_dir = \"/etc/libvirt/migrate-tls\"\n",
        )?;
        let uuid =
            std::fs::read_to_string("/proc/sys/kernel/random/uuid").map_err(io("read a UUID"))?;
        append(
            "etc/libvirtd.conf",
            &format!(
                "\n# qemu-tls-migrate bench host\nlisten_tls = 1\nlisten_tcp = 0\n\
                 auth_tls = \"none\"\nlisten_addr = \"{addr}\"\n\
                 ca_file = \"/etc/libvirt/pki/cacert.pem\"\n\
                 cert_file = \"/etc/libvirt/pki/servercert.pem\"\n\
                 key_file = \"/etc/libvirt/pki/serverkey.pem\"\n\
                 host_uuid = \"{}\"\n",
                uuid.trim()
            ),
        )?;
        // The holder: in `netns`, a private mount namespace with this host's directories; it
        // starts both daemons and then reaps whatever exits below it (dash's `wait` reaps any
        // child, and as the subreaper it gets the QEMUs libvirt daemonised).
        let script = r#"set -e
mount --bind "$1/run" /run
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
mount --bind "$1/hosts" /etc/hosts
if [ -e /dev/kvm ]; then mount --bind "$1/kvm" /dev/kvm; fi
virtlogd </dev/null >"$1/virtlogd.log" 2>&1 &
libvirtd --listen </dev/null >"$1/libvirtd.log" 2>&1 &
echo ready
exec >/dev/null
while :; do wait; sleep 1; done"#;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, "unshare", "--mount"])
            .args(["--propagation", "private", "sh", "-c", script, "sh"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
        // attribute survives the execs of `ip netns exec` and `unshare` (neither forks).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)
            });
        }
        let mut holder = cmd.spawn().map_err(io("start the namespace holder"))?;
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .map_err(io("read the holder"))?;
        }
        let host = Host {
            name,
            netns: netns.to_string(),
            addr: addr.to_string(),
            dir: dir.to_path_buf(),
            holder,
        };
        if line.trim() != "ready" {
            return Err(LibvirtBenchError::NotReady {
                what: format!("the namespaces of {name}"),
                after: Duration::ZERO,
                detail: "the holder failed to mount".into(),
            });
        }
        Ok(host)
    }

    async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        for sock in ["virtlogd-sock", "libvirt-sock"] {
            let path = self.dir.join("run/libvirt").join(sock);
            while std::os::unix::net::UnixStream::connect(&path).is_err() {
                if Instant::now() > deadline {
                    return Err(LibvirtBenchError::NotReady {
                        what: format!("libvirtd of {}", self.name),
                        after: START_TIMEOUT,
                        detail: self.log_tail(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Domain `name`'s disk, as seen from outside the host.
    fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("lib/images/{name}.qcow2"))
    }

    /// Domain `name`'s serial console log, as seen from outside the host.
    fn serial(&self, name: &str) -> PathBuf {
        self.dir.join(format!("lib/qemu/{name}-serial.log"))
    }

    /// `program` inside this host's network and mount namespaces.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args([
            "--target",
            &self.holder.id().to_string(),
            "--mount",
            "--net",
        ])
        .arg(program)
        .stdin(Stdio::null())
        .kill_on_drop(true);
        cmd
    }

    /// `virsh -c qemu:///system ARGS` inside this host; its stdout.
    async fn virsh(&self, args: &[&str]) -> Result<String> {
        let mut cmd = self.command("virsh");
        cmd.args(["-c", "qemu:///system"]).args(args);
        let out = output_within(cmd, &format!("virsh {}", args.join(" "))).await?;
        if !out.status.success() {
            return Err(LibvirtBenchError::Command {
                what: format!("virsh {} on {}", args.join(" "), self.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Kills the QEMUs libvirt started here, the daemons (the holder's children), the holder.
    fn stop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Ok(entries) = std::fs::read_dir(self.dir.join("run/libvirt/qemu")) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Ok(text) = std::fs::read_to_string(e.path())
                    && let Ok(pid) = text.trim().parse::<i32>()
                {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.starts_with("qemu-system") {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
        let holder = self.holder.id();
        for pid in children_of(holder) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !children_of(holder).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in children_of(holder) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// PIDs of the live (not zombie) children of `parent`.
fn children_of(parent: u32) -> Vec<i32> {
    let path = format!("/proc/{parent}/task/{parent}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn ip(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(io("run ip"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LibvirtBenchError::Command {
            what: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

async fn output_within(
    mut cmd: tokio::process::Command,
    what: &str,
) -> Result<std::process::Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    tokio::time::timeout(MIGRATE_TIMEOUT, cmd.output())
        .await
        .map_err(|_| LibvirtBenchError::NotReady {
            what: what.into(),
            after: MIGRATE_TIMEOUT,
            detail: "timed out".into(),
        })?
        .map_err(io(format!("run {what}")))
}

async fn run_local(what: &str, cmd: &mut tokio::process::Command) -> Result<()> {
    let out = cmd.output().await.map_err(io(format!("run {what}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LibvirtBenchError::Command {
            what: what.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The bench domain: TCG (libvirt's QEMU may not open `/dev/kvm`), one vCPU, `ram_mib`,
/// booting the workload kernel, its serial console in a file, one virtio qcow2 disk.
fn domain_xml(name: &str, ram_mib: u32, kernel: &crate::vm::KernelConfig, disk: &str) -> String {
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{ram_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel><cmdline>{append}</cmdline></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='/var/lib/libvirt/qemu/{name}-serial.log'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
        kernel = kernel.path.display(),
        append = kernel.append,
    )
}

/// `virsh domjobinfo --rawstats` lines (`name: value`, or `name=value`), as numbers.
fn parse_job_stats(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter_map(|l| l.split_once('=').or_else(|| l.split_once(':')))
        .filter_map(|(k, v)| Some((k.trim().to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// A libvirt run from the source's completed job statistics. libvirt reports no `total-time`:
/// QEMU's RAM time is the setup time plus the RAM bytes over QEMU's final rate (QEMU computes
/// that rate over the time after set-up). The job ran from libvirt's begin phase on the source
/// to the destination's finish, so what it leaves beside the RAM time is the set-up and the
/// disk copy (with the finish, a few ms); libvirt reports no time of the disk copy of its own.
fn libvirt_run(stats: &std::collections::HashMap<String, f64>, wall_ms: u64) -> DomainRun {
    let get = |k: &str| stats.get(k).copied().unwrap_or(0.0);
    let ram_bytes = get("memory_processed") as u64;
    let bps = get("memory_bps");
    let setup_ms = get("setup_time") as u64;
    let transfer_ms = if bps > 0.0 {
        (ram_bytes as f64 / bps * 1000.0) as u64
    } else {
        0
    };
    let total_ms = setup_ms + transfer_ms;
    let job_ms = get("time_elapsed") as u64;
    DomainRun {
        wall_ms,
        total_ms,
        setup_ms,
        downtime_ms: get("downtime") as u64,
        ram_bytes,
        guest_ram_bytes: get("memory_total") as u64,
        // Over QEMU's total time, as the tool's runs are, not over the time after set-up.
        ram_mbps: mbps(ram_bytes, total_ms),
        dirty_sync_count: get("memory_iteration") as u64,
        disk_bytes: get("disk_processed") as u64,
        disk_mbps: None,
        phases: Timing {
            ram_ms: total_ms,
            ..Timing::default()
        },
        setup_disks_ms: (job_ms > 0).then(|| job_ms.saturating_sub(total_ms)),
        ..DomainRun::default()
    }
}

fn mbps(bytes: u64, ms: u64) -> f64 {
    if ms == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / 1e6 / (ms as f64 / 1e3)
    }
}

/// A tool run from its `migrate --json` report.
fn tool_run(r: &Value, wall_ms: u64) -> DomainRun {
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let t = &r["timing"];
    let disks = r["disks"].as_array().cloned().unwrap_or_default();
    let disk_bytes: u64 = disks.iter().map(|d| u(&d["bytes"])).sum();
    let disk_ms = disks.iter().map(|d| u(&d["ms"])).max().unwrap_or(0);
    let phases = Timing {
        setup_ms: u(&t["setup_ms"]),
        disks_ms: u(&t["disks_ms"]),
        ram_ms: u(&t["ram_ms"]),
        switchover_ms: u(&t["switchover_ms"]),
        finish_ms: u(&t["finish_ms"]),
        cleanup_ms: u(&t["cleanup_ms"]),
    };
    DomainRun {
        wall_ms,
        total_ms: u(&r["ram"]["total_ms"]),
        setup_ms: 0,
        downtime_ms: u(&r["ram"]["downtime_ms"]),
        guest_pause_ms: r["guest_pause"]["ms"].as_u64(),
        ram_bytes: u(&r["ram"]["bytes"]),
        guest_ram_bytes: u(&r["ram"]["guest_ram_bytes"]),
        ram_mbps: r["ram"]["throughput_mbps"].as_f64().unwrap_or(0.0),
        dirty_sync_count: u(&r["ram"]["dirty_sync_count"]),
        disk_bytes,
        disk_mbps: (disk_ms > 0).then(|| disk_bytes as f64 * 8.0 / 1e6 / (disk_ms as f64 / 1e3)),
        phases,
        setup_disks_ms: None,
        forecast_ms: r["forecast"]["predicted_total_ms"].as_u64(),
    }
}
