//! Local QEMU processes for the demo, the benchmarks and the tests.
//!
//! A [`Vm`] is one `qemu-system-x86_64` process with:
//! - two QMP sockets: `qmp.sock` for the tool and `monitor.sock` for whoever watches (a QMP
//!   socket serves one client at a time);
//! - RAM from a shared `memory-backend-file`, so a test can compare guest RAM byte for byte;
//! - optional disks, each a `-blockdev` node behind a virtio-blk device;
//! - `-incoming defer` and `-S` for a destination;
//! - KVM when it works on this machine, TCG otherwise (see [`probe_accel`]).
//!
//! The process runs in its own process group (so a Ctrl-C meant for the tool does not kill the
//! guest before the tool has rolled back) and is killed when the [`Vm`] is dropped.

pub mod binary;
pub mod workload;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

use crate::qemu::QueryKvm;
use crate::qmp::{Qmp, QmpError};

/// The QEMU binary; `QTM_QEMU` overrides it.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// How long a new QEMU may take to open its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which accelerator to run guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Image format of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// Creates a disk image with `qemu-img create` (sparse: it costs no space until written).
pub fn create_image(path: &Path, format: DiskFormat, size: u64) -> Result<(), VmError> {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format.as_str()])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(|source| VmError::Spawn {
            binary: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(VmError::Image {
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// One disk: an image file as block node `node`, attached to a virtio-blk device (`node-dev`
/// unless `device` names it).
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub node: String,
    pub path: PathBuf,
    pub format: DiskFormat,
    /// The device's id; `None`: `NODE-dev`.
    pub device: Option<String>,
}

impl DiskConfig {
    /// The id of the virtio-blk device the disk is attached to.
    pub fn device_id(&self) -> String {
        self.device
            .clone()
            .unwrap_or_else(|| format!("{}-dev", self.node))
    }
}

/// A guest kernel booted with `-kernel` (a multiboot ELF).
#[derive(Debug, Clone)]
pub struct KernelConfig {
    pub path: PathBuf,
    pub append: String,
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Names the VM in logs; also its `-name`.
    pub name: String,
    /// Directory for the sockets, RAM file and logs; created if missing.
    pub dir: PathBuf,
    pub ram_mib: u32,
    pub disks: Vec<DiskConfig>,
    /// Start as a migration destination: `-incoming defer`, CPUs stopped.
    pub incoming: bool,
    /// With `incoming`: leave out `-S`, so QEMU would run the guest on its own once the state
    /// is loaded (what a careless launcher does; the tool must keep control anyway).
    pub incoming_autostart: bool,
    /// `None`: probe (see [`probe_accel`]).
    pub accel: Option<Accel>,
    pub kernel: Option<KernelConfig>,
    /// Drop privileges to this user after start-up (`-runas`, or `-run-with user=` from 9.1), as libvirt runs QEMU.
    pub run_as: Option<String>,
    /// Run inside this network namespace (`ip netns exec`), to model another host.
    pub netns: Option<String>,
    /// The QEMU binary; `None`: `QTM_QEMU`, else `qemu-system-x86_64` (see [`binary`]).
    pub qemu: Option<PathBuf>,
    /// The machine type (`-machine`); `None`: `q35`, the binary's newest Q35 type. A VM that
    /// must migrate between QEMU versions needs a type both have (`pc-q35-7.2`).
    pub machine: Option<String>,
    /// Where the RAM file goes instead of the VM's directory: post-copy needs it on tmpfs
    /// (`/dev/shm`), since QEMU refuses `postcopy-ram` for a file on another file system. The
    /// file is removed when the [`Vm`] is dropped.
    pub ram_dir: Option<PathBuf>,
}

impl VmConfig {
    pub fn new(name: &str, dir: &Path) -> VmConfig {
        VmConfig {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            ram_mib: 128,
            disks: Vec::new(),
            incoming: false,
            incoming_autostart: false,
            accel: None,
            kernel: None,
            run_as: None,
            netns: None,
            qemu: None,
            machine: None,
            ram_dir: None,
        }
    }

    /// The same machine as a migration destination in `dir`: same RAM, devices and node names,
    /// with disks at `disk_paths` (in order).
    pub fn destination(&self, name: &str, dir: &Path, disk_paths: &[PathBuf]) -> VmConfig {
        let disks = self
            .disks
            .iter()
            .zip(disk_paths)
            .map(|(d, p)| DiskConfig {
                node: d.node.clone(),
                path: p.clone(),
                format: d.format,
                device: d.device.clone(),
            })
            .collect();
        VmConfig {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            disks,
            incoming: true,
            ..self.clone()
        }
    }
}

/// Why a VM could not be started or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    #[error("cannot create VM directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {binary}: is qemu-system-x86 installed (scripts/setup.sh)?")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QEMU for VM {name} exited during start-up ({status}); its log {log} ends with: {tail}"
    )]
    Exited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("QEMU for VM {name} did not open its QMP socket {path} within {after:?}")]
    NoSocket {
        name: String,
        path: PathBuf,
        after: Duration,
    },
    #[error("{binary} -version did not name a QEMU version: {output}")]
    Version { binary: PathBuf, output: String },
    #[error("cannot create disk image {path}: {detail}")]
    Image { path: PathBuf, detail: String },
    #[error("QMP on VM {name}")]
    Qmp {
        name: String,
        #[source]
        source: QmpError,
    },
}

/// A running QEMU process, killed on drop.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub accel: Accel,
    child: Child,
    qmp: PathBuf,
    monitor: PathBuf,
    ram: PathBuf,
    log: PathBuf,
    serial: PathBuf,
    pub config: VmConfig,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.config.ram_dir.is_some() {
            let _ = std::fs::remove_file(&self.ram);
        }
    }
}

impl Vm {
    /// Starts QEMU and waits until both QMP sockets accept connections.
    pub async fn launch(config: VmConfig) -> Result<Vm, VmError> {
        let accel = match config.accel {
            Some(a) => a,
            None => probe_accel().await,
        };
        launch_with(config, accel).await
    }

    /// The socket for the tool (migration driver).
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// A second QMP socket, for watching the VM while the tool drives it.
    pub fn monitor_path(&self) -> &Path {
        &self.monitor
    }

    /// The guest RAM file.
    pub fn ram_path(&self) -> &Path {
        &self.ram
    }

    /// QEMU's stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The guest's serial console output.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Connects to the watcher socket.
    pub async fn monitor(&self) -> Result<Qmp, VmError> {
        Qmp::connect(&self.monitor, START_TIMEOUT)
            .await
            .map_err(|source| VmError::Qmp {
                name: self.name.clone(),
                source,
            })
    }

    /// Asks QEMU to exit (`quit`, which flushes and closes its disks) and waits for it; kills
    /// it if it has not gone within `timeout`.
    pub async fn quit(&mut self, timeout: Duration) {
        if let Ok(qmp) = Qmp::connect(&self.monitor, timeout).await {
            let _ = qmp.call_timeout(&crate::qemu::Quit, timeout).await;
        }
        if !self.wait_exit(timeout).await {
            self.kill().await;
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Waits up to `timeout` for QEMU to exit by itself; true if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_ok()
    }

    /// The last lines of QEMU's stderr, for error messages and test failures.
    pub fn log_tail(&self) -> String {
        tail_of(&self.log)
    }
}

async fn launch_with(config: VmConfig, accel: Accel) -> Result<Vm, VmError> {
    std::fs::create_dir_all(&config.dir).map_err(|source| VmError::Dir {
        path: config.dir.clone(),
        source,
    })?;
    let dir = &config.dir;
    let qmp = dir.join("qmp.sock");
    let monitor = dir.join("monitor.sock");
    let ram = match &config.ram_dir {
        Some(ram_dir) => {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            ram_dir.join(format!(
                "qtm-{}-{n}-{}.ram",
                std::process::id(),
                config.name
            ))
        }
        None => dir.join("ram"),
    };
    let log = dir.join("qemu.log");
    let serial = dir.join("serial.log");
    for stale in [&qmp, &monitor] {
        let _ = std::fs::remove_file(stale);
    }

    let binary = binary::resolve(config.qemu.as_deref());
    let version = binary::version(&binary)?;
    let args = qemu_args(&config, accel, version, &qmp, &monitor, &ram, &serial);
    let mut cmd = match &config.netns {
        // `ip netns exec` execs QEMU in place: the child's pid is QEMU's.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(&binary);
            c
        }
        None => Command::new(&binary),
    };
    cmd.args(args);
    let log_file = std::fs::File::create(&log).map_err(|source| VmError::Dir {
        path: log.clone(),
        source,
    })?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log_file))
        .process_group(0)
        .kill_on_drop(true);
    tracing::info!(vm = %config.name, accel = accel.as_str(), %version, "starting QEMU");
    let mut child = cmd.spawn().map_err(|source| VmError::Spawn {
        binary: binary.display().to_string(),
        source,
    })?;

    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    for path in [&qmp, &monitor] {
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmError::Exited {
                    name: config.name.clone(),
                    status: status.to_string(),
                    tail: tail_of(&log),
                    log,
                });
            }
            // A connect can succeed on the listen backlog before QEMU has built the machine;
            // the QMP greeting comes only from QEMU's main loop, once everything (the RAM file
            // included) exists. So the event waited for is a completed handshake.
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if Qmp::connect(path, remaining.min(Duration::from_secs(5)))
                .await
                .is_ok()
            {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VmError::NoSocket {
                    name: config.name.clone(),
                    path: path.clone(),
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(Vm {
        name: config.name.clone(),
        accel,
        child,
        qmp,
        monitor,
        ram,
        log,
        serial,
        config,
    })
}

fn qemu_args(
    config: &VmConfig,
    accel: Accel,
    version: crate::qmp::QemuVersion,
    qmp: &Path,
    monitor: &Path,
    ram: &Path,
    serial: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &config.name]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    let machine = config.machine.as_deref().unwrap_or("q35");
    push(&["-machine", &format!("{machine},memory-backend=ram0")]);
    push(&["-accel", accel.as_str()]);
    push(&["-m", &format!("{}M", config.ram_mib)]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
            config.ram_mib,
            ram.display()
        ),
    ]);
    push(&["-serial", &format!("file:{}", serial.display())]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", monitor.display()),
    ]);
    for disk in &config.disks {
        let node = json!({
            "driver": disk.format.as_str(),
            "node-name": disk.node,
            "file": {"driver": "file", "filename": disk.path},
        });
        push(&["-blockdev", &node.to_string()]);
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive={},id={}", disk.node, disk.device_id()),
        ]);
    }
    if let Some(kernel) = &config.kernel {
        push(&["-kernel", &kernel.path.display().to_string()]);
        push(&["-append", &kernel.append]);
    }
    if config.incoming {
        push(&["-incoming", "defer"]);
        if !config.incoming_autostart {
            push(&["-S"]);
        }
    }
    if let Some(user) = &config.run_as {
        a.extend(binary::run_as_args(version, user));
    }
    a
}

fn tail_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(8);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(empty)".to_string()
    } else {
        tail
    }
}

static PROBED: OnceCell<Accel> = OnceCell::const_new();

/// The accelerator guests run with on this machine: `QTM_ACCEL` (`kvm` or `tcg`) when set,
/// otherwise KVM if a probe VM starts under it with KVM enabled, otherwise TCG. Probed once per
/// process.
///
/// The probe is needed because `/dev/kvm` existing says little: on nested set-ups KVM may be
/// present yet unusable, or usable only for firmware-level guests.
pub async fn probe_accel() -> Accel {
    *PROBED
        .get_or_init(|| async {
            match std::env::var("QTM_ACCEL").as_deref() {
                Ok("kvm") => return Accel::Kvm,
                Ok("tcg") => return Accel::Tcg,
                _ => {}
            }
            let accel = match probe_kvm().await {
                Ok(true) => Accel::Kvm,
                Ok(false) => Accel::Tcg,
                Err(e) => {
                    tracing::info!("KVM probe failed, using TCG: {e}");
                    Accel::Tcg
                }
            };
            tracing::info!(accel = accel.as_str(), "accelerator probed");
            accel
        })
        .await
}

async fn probe_kvm() -> Result<bool, VmError> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(false);
    }
    let dir = tempfile::tempdir().map_err(|source| VmError::Dir {
        path: std::env::temp_dir(),
        source,
    })?;
    let mut config = VmConfig::new("kvm-probe", dir.path());
    config.ram_mib = 16;
    let mut vm = launch_with(config, Accel::Kvm).await?;
    let qmp = Qmp::connect(vm.qmp_path(), START_TIMEOUT)
        .await
        .map_err(|source| VmError::Qmp {
            name: vm.name.clone(),
            source,
        })?;
    let kvm = qmp.call(&QueryKvm).await.map_err(|source| VmError::Qmp {
        name: vm.name.clone(),
        source,
    })?;
    vm.kill().await;
    Ok(kvm.enabled)
}

/// Writes `bytes` of pseudo-random data to `out`: xorshift64 from `seed`, cheap and
/// deterministic, and neither zero-page detection nor compression can shortcut it.
pub fn write_pseudo_random(
    out: &mut impl std::io::Write,
    bytes: u64,
    seed: u64,
) -> std::io::Result<()> {
    let mut state = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()
}

impl Vm {
    /// Fills the first `bytes` of guest RAM above 1 MiB (leaving firmware data alone) with
    /// pseudo-random data from `seed`, so a migration has real (non-zero) pages to move and a
    /// comparison afterwards means something.
    pub fn scribble_ram(&self, bytes: u64, seed: u64) -> std::io::Result<()> {
        self.write_ram(1 << 20, bytes, seed)
    }

    /// Writes `len` bytes of pseudo-random data into guest RAM at guest-physical `offset`,
    /// through the shared RAM file, from outside the guest; capped at the end of RAM.
    pub fn write_ram(&self, offset: u64, len: u64, seed: u64) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        let size = u64::from(self.config.ram_mib) << 20;
        let len = len.min(size.saturating_sub(offset));
        let mut file = std::fs::OpenOptions::new().write(true).open(&self.ram)?;
        file.seek(SeekFrom::Start(offset))?;
        write_pseudo_random(&mut file, len, seed)
    }
}
