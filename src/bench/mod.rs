//! Benchmark harness: native TLS against the plain TCP baseline, on fresh local VM pairs
//! running a known guest workload, with medians, spread and ratios (see `qemu-tls-migrate
//! bench`).
//!
//! One benchmark, step by step:
//! 1. A lab PKI (a throwaway CA, certificates for `src-host` and `dst-host`) under the work
//!    directory, and the guest workload ELF ([`crate::vm::workload`]).
//! 2. Rounds: `warmup` discarded rounds, then `repeat` measured ones. Each round runs every
//!    mode once, in the same order (A B C A B C ...), so slow drifts of the machine touch every
//!    mode alike.
//! 3. Each run: a fresh source VM booting the workload and a fresh destination (`-incoming
//!    defer`), both through [`crate::vm::Vm`]; wait until the workload has filled its working
//!    set; note both QEMUs' CPU times; migrate with [`crate::migration::migrate`] over loopback;
//!    note CPU times again; read the source's final `query-migrate`; kill both VMs and delete
//!    their files.
//! 4. Per mode: median, min/max and quartiles of each metric over the measured runs, and the
//!    ratio of each median to the `tcp` mode's ([`report`]).
//!
//! VMs live in `/dev/shm` when it exists: their RAM is a shared file, and a RAM file on a disk
//! file system costs write-back I/O that has nothing to do with migration.

pub mod gate;
pub mod libvirt;
mod measure;
pub mod phases;
mod proxy;

pub use proxy::ProxyKind;
mod report;
mod stats;
mod svg;

pub use crate::qemu::{CpuInfoFast, QueryCpusFast};
pub use measure::{CpuTimes, HostInfo, git_revision};
pub use report::{BenchReport, Metric, ModeSummary, RunResult, render_svg, render_table};
pub use stats::Stat;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::migration::{
    self, DiskSelection, Endpoint, FinalStatus, MigrationOptions, Progress, Transport,
    TransportChoice,
};
use crate::pki::{self, PkiError};
use crate::qemu::{MigrationInfo, QueryMigrate};
use crate::qmp::{Qmp, QmpError};
use crate::vm::workload::Workload;
use crate::vm::{self, Accel, DiskConfig, DiskFormat, Vm, VmConfig, VmError};

/// The source's host name in the lab PKI.
pub const SOURCE_HOST: &str = "src-host";
/// The destination's host name in the lab PKI (what `tls-hostname` checks).
pub const DEST_HOST: &str = "dst-host";
/// How long a workload guest may take to boot and fill its working set.
pub const WORKLOAD_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Default deadline of one migration.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// Deadline of each migration of the heavy profile, where some are not to converge.
pub const HEAVY_RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// GnuTLS priority strings of the cipher modes. QEMU 7.2 links GnuTLS 3.7, which negotiates
/// TLS 1.3 with each of these as the only cipher.
pub const PRIORITY_AES128_GCM: &str = "NORMAL:-CIPHER-ALL:+AES-128-GCM";
pub const PRIORITY_AES256_GCM: &str = "NORMAL:-CIPHER-ALL:+AES-256-GCM";
pub const PRIORITY_CHACHA20: &str = "NORMAL:-CIPHER-ALL:+CHACHA20-POLY1305";

/// One way of migrating, compared with the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mode {
    /// Short name, used in tables and files (`tcp`, `tls`, `tls-mfd2`, `tls-aes128`, ...).
    pub name: String,
    pub transport: Transport,
    /// multifd channels; `None`: multifd off.
    pub multifd: Option<u8>,
    /// GnuTLS priority string of both credentials objects; `None`: GnuTLS's default.
    pub tls_priority: Option<String>,
    /// QEMU migrates in plain TCP through an encrypting tunnel: a socat/OpenSSL TLS proxy pair
    /// (`tls-proxy`) or an SSH port forward (`ssh`).
    pub proxy: Option<ProxyKind>,
    /// A convergence aid (over TLS): `auto-converge`, `xbzrle`, `zstd`, `pause-after`.
    pub conv: Option<ConvMode>,
    /// The QEMU both VMs of this mode run; `None`: `QTM_QEMU` or the system's.
    pub qemu: Option<QemuBinary>,
    /// A libvirt domain between the bench's two libvirtd hosts, migrated by libvirt or by
    /// the tool ([`libvirt`]); `None`: a pair of the bench's own VMs.
    pub domain: Option<libvirt::DomainMode>,
}

/// A QEMU binary the bench runs some modes on (`bench --qemu LABEL=PATH`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuBinary {
    /// Short name in mode names (`tls@10.0`).
    pub label: String,
    pub path: PathBuf,
}

impl Mode {
    /// This mode on the QEMU `qemu`; the name gets `@LABEL` unless `keep_name` (the first
    /// QEMU of a comparison keeps the plain names, so that `tcp` stays the baseline).
    pub fn on_qemu(&self, qemu: &QemuBinary, keep_name: bool) -> Mode {
        Mode {
            name: if keep_name {
                self.name.clone()
            } else {
                format!("{}@{}", self.name, qemu.label)
            },
            qemu: Some(qemu.clone()),
            ..self.clone()
        }
    }

    /// Every mode on every QEMU of `qemus`, grouped by mode (`tls`, `tls@10.0`, ...), so that
    /// a round runs each mode on each QEMU in turn.
    pub fn across(modes: &[Mode], qemus: &[QemuBinary]) -> Vec<Mode> {
        if qemus.is_empty() {
            return modes.to_vec();
        }
        modes
            .iter()
            .flat_map(|m| qemus.iter().enumerate().map(|(i, q)| m.on_qemu(q, i == 0)))
            .collect()
    }
}

/// The convergence aids the bench compares (see [`crate::migration::Convergence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvMode {
    /// QEMU throttles the guest's vCPUs (initial 20%, +10% a pass: QEMU's defaults).
    AutoConverge,
    /// Pages sent again go as XBZRLE deltas (cache sized from the dirty rate).
    Xbzrle,
    /// Two multifd channels, zstd-compressed.
    Zstd,
    /// At the bench's `pause_after`, the guest is paused and the rest moves as downtime.
    PauseAfter,
}

impl Mode {
    /// The baseline: plain TCP, one stream.
    pub fn tcp() -> Mode {
        Mode {
            name: "tcp".into(),
            transport: Transport::Tcp,
            multifd: None,
            tls_priority: None,
            proxy: None,
            conv: None,
            qemu: None,
            domain: None,
        }
    }

    /// TLS with GnuTLS's default priority, one stream.
    pub fn tls() -> Mode {
        Mode {
            name: "tls".into(),
            transport: Transport::Tls,
            multifd: None,
            tls_priority: None,
            proxy: None,
            conv: None,
            qemu: None,
            domain: None,
        }
    }

    /// The proxied design: plain TCP inside a TLS proxy pair (KubeVirt's, tunnelled
    /// migration's).
    pub fn tls_proxy() -> Mode {
        Mode {
            name: "tls-proxy".into(),
            proxy: Some(ProxyKind::Socat),
            ..Mode::tcp()
        }
    }

    /// TLS with a convergence aid.
    pub fn converging(conv: ConvMode) -> Mode {
        let name = match conv {
            ConvMode::AutoConverge => "auto-converge",
            ConvMode::Xbzrle => "xbzrle",
            ConvMode::Zstd => "zstd",
            ConvMode::PauseAfter => "pause-after",
        };
        Mode {
            name: name.into(),
            conv: Some(conv),
            multifd: (conv == ConvMode::Zstd).then_some(2),
            ..Mode::tls()
        }
    }

    /// Proxmox's "secure" migration: plain TCP through an SSH port forward.
    pub fn ssh() -> Mode {
        Mode {
            name: "ssh".into(),
            proxy: Some(ProxyKind::Ssh),
            ..Mode::tcp()
        }
    }

    /// TLS over `channels` multifd connections.
    pub fn tls_multifd(channels: u8) -> Mode {
        Mode {
            name: format!("tls-mfd{channels}"),
            multifd: Some(channels),
            ..Mode::tls()
        }
    }

    /// Plain TCP over `channels` multifd connections.
    pub fn tcp_multifd(channels: u8) -> Mode {
        Mode {
            name: format!("tcp-mfd{channels}"),
            multifd: Some(channels),
            ..Mode::tcp()
        }
    }

    /// TLS limited to one cipher through the credentials' `priority`.
    pub fn tls_cipher(name: &str, priority: &str) -> Mode {
        Mode {
            name: name.into(),
            tls_priority: Some(priority.into()),
            ..Mode::tls()
        }
    }

    /// The standard matrix: `tcp`, `tls`, `tls-mfdN`, and TLS with AES-128-GCM, AES-256-GCM
    /// and ChaCha20-Poly1305.
    pub fn standard(multifd_channels: u8) -> Vec<Mode> {
        vec![
            Mode::tcp(),
            Mode::tls(),
            Mode::tls_multifd(multifd_channels),
            Mode::tls_cipher("tls-aes128", PRIORITY_AES128_GCM),
            Mode::tls_cipher("tls-aes256", PRIORITY_AES256_GCM),
            Mode::tls_cipher("tls-chacha20", PRIORITY_CHACHA20),
        ]
    }

    /// A libvirt-domain mode (`libvirt-tls`, `libvirt-tcp`, `tool-domain-tls`,
    /// `tool-domain-tcp`).
    pub fn domain(mode: libvirt::DomainMode) -> Mode {
        let base = if mode.tls() { Mode::tls() } else { Mode::tcp() };
        Mode {
            name: mode.name().into(),
            domain: Some(mode),
            ..base
        }
    }

    /// A mode by name: `tcp`, `tls`, `tls-mfdN`, `tcp-mfdN`, `tls-aes128`, `tls-aes256`,
    /// `tls-chacha20`.
    pub fn by_name(name: &str) -> Option<Mode> {
        let channels = |prefix: &str| {
            name.strip_prefix(prefix)
                .and_then(|n| n.parse::<u8>().ok())
                .filter(|n| *n > 0)
        };
        match name {
            "tcp" => Some(Mode::tcp()),
            "tls" => Some(Mode::tls()),
            "tls-proxy" => Some(Mode::tls_proxy()),
            "ssh" => Some(Mode::ssh()),
            "auto-converge" => Some(Mode::converging(ConvMode::AutoConverge)),
            "xbzrle" => Some(Mode::converging(ConvMode::Xbzrle)),
            "zstd" => Some(Mode::converging(ConvMode::Zstd)),
            "pause-after" => Some(Mode::converging(ConvMode::PauseAfter)),
            "tls-aes128" => Some(Mode::tls_cipher(name, PRIORITY_AES128_GCM)),
            "tls-aes256" => Some(Mode::tls_cipher(name, PRIORITY_AES256_GCM)),
            "tls-chacha20" => Some(Mode::tls_cipher(name, PRIORITY_CHACHA20)),
            "libvirt-tls" => Some(Mode::domain(libvirt::DomainMode::LibvirtTls)),
            "libvirt-tcp" => Some(Mode::domain(libvirt::DomainMode::LibvirtTcp)),
            "tool-domain-tls" => Some(Mode::domain(libvirt::DomainMode::ToolTls)),
            "tool-domain-tcp" => Some(Mode::domain(libvirt::DomainMode::ToolTcp)),
            _ => channels("tls-mfd")
                .map(Mode::tls_multifd)
                .or_else(|| channels("tcp-mfd").map(Mode::tcp_multifd)),
        }
    }

    /// What the mode is, in words.
    pub fn describe(&self) -> String {
        if let Some(d) = self.domain {
            return d.describe().into();
        }
        match self.proxy {
            Some(ProxyKind::Socat) => return "tcp through a socat/OpenSSL TLS proxy pair".into(),
            Some(ProxyKind::Ssh) => return "tcp through an SSH port forward (ssh -L)".into(),
            None => {}
        }
        let mut s = self.transport.to_string();
        if let Some(n) = self.multifd {
            s.push_str(&format!(", multifd {n} channels"));
        }
        if let Some(p) = &self.tls_priority {
            s.push_str(&format!(", priority {p}"));
        }
        if let Some(q) = &self.qemu {
            s.push_str(&format!(", QEMU {}", q.label));
        }
        match self.conv {
            Some(ConvMode::AutoConverge) => s.push_str(", auto-converge"),
            Some(ConvMode::Xbzrle) => s.push_str(", XBZRLE"),
            Some(ConvMode::Zstd) => s.push_str(", zstd compression"),
            Some(ConvMode::PauseAfter) => s.push_str(", guest paused at the deadline"),
            None => {}
        }
        s
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What the guest does while it migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// The guest workload runs, dirtying its working set at its rate.
    #[default]
    Running,
    /// The data plane alone: the source paused, its RAM (above the first MiB and the guest's
    /// own code) overwritten with pseudo-random bytes, so every page is sent once, in full.
    Static,
    /// As `running`, with a workload that dirties faster than plain TLS moves it: migrations
    /// that do not converge by the deadline are counted, not fatal.
    Heavy,
}

/// A checked benchmark plan.
#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub profile: Profile,
    /// The modes, in the order each round runs them; ratios are taken to the mode named `tcp`.
    pub modes: Vec<Mode>,
    pub ram_mib: u32,
    pub workload: WorkloadConfig,
    /// Size of one local (non-shared) disk to copy with the RAM; 0: no disk.
    pub disk_mib: u32,
    /// MiB of guest RAM, above the working set, to fill with data through the RAM file (from
    /// outside the guest, as `demo` and the integration tests do) right before each
    /// migration; 0: none. This is how the "TLS sends twice the RAM" puzzle was met: see
    /// README.md, "Performance".
    pub file_fill_mib: u32,
    /// Measured rounds.
    pub repeat: u32,
    /// Discarded rounds before the measured ones.
    pub warmup: u32,
    /// `None`: probe (KVM when it works, TCG otherwise).
    #[serde(serialize_with = "serialize_accel")]
    pub accel: Option<Accel>,
    /// Deadline of each migration.
    pub run_timeout: Duration,
    /// Cap of every mode's RAM stream, bytes per second; `None`: no cap.
    pub max_bandwidth: Option<u64>,
    /// The `pause-after` mode's deadline, after which it pauses the guest.
    pub pause_after: Duration,
    /// Where VM directories go; `None`: `/dev/shm` if present, else the temporary directory.
    pub work_dir: Option<PathBuf>,
}

/// The guest workload, as configured (kept serialisable for the report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WorkloadConfig {
    pub working_set_mib: u32,
    pub pages_per_sec: u32,
}

impl From<WorkloadConfig> for Workload {
    fn from(w: WorkloadConfig) -> Workload {
        Workload {
            working_set_mib: w.working_set_mib,
            pages_per_sec: w.pages_per_sec,
        }
    }
}

fn serialize_accel<S: serde::Serializer>(a: &Option<Accel>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(a.map_or("auto", Accel::as_str))
}

/// What the harness tells its caller while it runs (for a progress bar).
#[derive(Debug)]
pub enum BenchEvent<'a> {
    /// Run `run` of `runs` (0-based) starts: `mode`, in round `round` (0-based, warm-up rounds
    /// first).
    RunStarted {
        run: usize,
        runs: usize,
        round: u32,
        warmup: bool,
        mode: &'a Mode,
    },
    /// The VMs are up and the workload runs; migrating.
    Migrating {
        run: usize,
    },
    /// A progress sample of the running migration.
    Migration {
        run: usize,
        progress: &'a Progress,
    },
    RunFinished {
        run: usize,
        result: &'a RunResult,
    },
}

/// Why a benchmark stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    #[error("the benchmark needs at least one mode and one measured round")]
    EmptyPlan,
    #[error("cannot use work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the tls-proxy mode's proxies: {0}")]
    Proxy(String),
    #[error("cannot make the lab PKI")]
    Pki(#[source] PkiError),
    #[error("cannot install the guest workload in {dir}")]
    Workload {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start a VM for run {run} ({mode})")]
    Vm {
        run: usize,
        mode: String,
        #[source]
        source: Box<VmError>,
    },
    #[error(
        "the workload of run {run} did not start within {after:?}; serial log {serial} ends: {tail}"
    )]
    WorkloadNotRunning {
        run: usize,
        serial: PathBuf,
        after: Duration,
        tail: String,
    },
    #[error("cannot connect to the watcher socket of VM {vm}")]
    Monitor {
        vm: String,
        #[source]
        source: Box<VmError>,
    },
    #[error("QMP {step} on VM {vm}")]
    Qmp {
        vm: String,
        step: &'static str,
        #[source]
        source: Box<QmpError>,
    },
    #[error("cannot read CPU times of QEMU {pid}")]
    CpuTimes {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("migration of run {run} ({mode}) ended {status:?}")]
    Migration {
        run: usize,
        mode: String,
        status: FinalStatus,
        #[source]
        source: Option<Box<migration::MigrationError>>,
    },
    #[error("run {run} ({mode}) on the libvirt pair")]
    Libvirt {
        run: usize,
        mode: String,
        #[source]
        source: Box<libvirt::LibvirtBenchError>,
    },
    #[error("cannot start the libvirt pair")]
    LibvirtPair(#[source] Box<libvirt::LibvirtBenchError>),
    #[error("cannot find the tool's own executable for the libvirt modes")]
    Executable(#[source] std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

/// Runs the benchmark; `on_event` hears about each run and each migration progress sample.
pub async fn run(
    config: &BenchConfig,
    on_event: &mut (dyn FnMut(BenchEvent<'_>) + Send),
    cancel: &CancellationToken,
) -> Result<BenchReport, BenchError> {
    if config.modes.is_empty() || config.repeat == 0 {
        return Err(BenchError::EmptyPlan);
    }
    let started = std::time::SystemTime::now();
    let base = config.work_dir.clone().unwrap_or_else(default_work_dir);
    let root = tempfile::Builder::new()
        .prefix("qtm-bench-")
        .tempdir_in(&base)
        .map_err(|source| BenchError::WorkDir {
            path: base.clone(),
            source,
        })?;
    let lab = pki::init_lab(
        &root.path().join("pki"),
        &[SOURCE_HOST.to_string(), DEST_HOST.to_string()],
    )
    .map_err(BenchError::Pki)?;
    let workload = Workload::from(config.workload);
    let kernel = workload
        .kernel_in(root.path())
        .map_err(|source| BenchError::Workload {
            dir: root.path().to_path_buf(),
            source,
        })?;
    let accel = match config.accel {
        Some(a) => a,
        None => vm::probe_accel().await,
    };
    // The libvirt modes' two hosts, started once for the whole bench (as a host's daemons
    // run all the time).
    let mut pair = if config.modes.iter().any(|m| m.domain.is_some()) {
        let exe = std::env::current_exe().map_err(BenchError::Executable)?;
        let boot = kernel.path.parent().unwrap_or(root.path()).to_path_buf();
        Some(
            libvirt::LibvirtPair::start(root.path(), &lab.out, &boot, exe)
                .await
                .map_err(|e| BenchError::LibvirtPair(Box::new(e)))?,
        )
    } else {
        None
    };
    let ctx = RunContext {
        config,
        root: root.path(),
        source_pki: lab.out.join(SOURCE_HOST),
        dest_pki: lab.out.join(DEST_HOST),
        kernel,
        accel,
    };

    let rounds = config.warmup + config.repeat;
    let runs = rounds as usize * config.modes.len();
    let mut results = Vec::with_capacity(runs);
    let mut qemu_version = String::new();
    for round in 0..rounds {
        for mode in &config.modes {
            let index = results.len();
            if cancel.is_cancelled() {
                return Err(BenchError::Cancelled);
            }
            let warmup = round < config.warmup;
            on_event(BenchEvent::RunStarted {
                run: index,
                runs,
                round,
                warmup,
                mode,
            });
            let (result, version) = match (mode.domain, pair.as_mut()) {
                (Some(d), Some(pair)) => {
                    ctx.run_domain(pair, index, round, warmup, mode, d, on_event)
                        .await?
                }
                _ => {
                    ctx.run_once(index, round, warmup, mode, on_event, cancel)
                        .await?
                }
            };
            on_event(BenchEvent::RunFinished {
                run: index,
                result: &result,
            });
            // Every version the modes ran on, in the order first seen (`7.2.22, 10.0.2`).
            if !qemu_version.split(", ").any(|v| v == version) {
                if !qemu_version.is_empty() {
                    qemu_version.push_str(", ");
                }
                qemu_version.push_str(&version);
            }
            results.push(result);
        }
    }
    Ok(BenchReport::new(
        config,
        accel,
        qemu_version,
        base,
        started,
        results,
    ))
}

fn default_work_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

struct RunContext<'a> {
    config: &'a BenchConfig,
    root: &'a Path,
    source_pki: PathBuf,
    dest_pki: PathBuf,
    kernel: vm::KernelConfig,
    accel: Accel,
}

impl RunContext<'_> {
    /// One migration of a fresh libvirt domain between the libvirt pair's hosts, in domain
    /// mode `d` (verified by [`libvirt::LibvirtPair::migrate`]).
    #[allow(clippy::too_many_arguments)]
    async fn run_domain(
        &self,
        pair: &mut libvirt::LibvirtPair,
        index: usize,
        round: u32,
        warmup: bool,
        mode: &Mode,
        d: libvirt::DomainMode,
        on_event: &mut (dyn FnMut(BenchEvent<'_>) + Send),
    ) -> Result<(RunResult, String), BenchError> {
        let err = |e| BenchError::Libvirt {
            run: index,
            mode: mode.name.clone(),
            source: Box::new(e),
        };
        let name = format!("qtm-bench-{}-{index:03}", std::process::id());
        // The disk is what the libvirt modes are for: at least 1 MiB even without --disk-mib.
        let disk_mib = self.config.disk_mib.max(1);
        pair.start_domain(&name, self.config.ram_mib, disk_mib, &self.kernel)
            .await
            .map_err(err)?;
        on_event(BenchEvent::Migrating { run: index });
        let host_before = measure::host_busy_seconds().unwrap_or(0.0);
        let run = pair.migrate(&name, d).await.map_err(err)?;
        let host_cpu_s = (measure::host_busy_seconds().unwrap_or(0.0) - host_before).max(0.0);
        let result = RunResult {
            run: index,
            round,
            warmup,
            mode: mode.name.clone(),
            completed: true,
            total_ms: run.total_ms,
            setup_ms: run.setup_ms,
            downtime_ms: run.downtime_ms,
            guest_pause_ms: run.guest_pause_ms,
            wall_ms: run.wall_ms,
            ram_bytes: run.ram_bytes,
            guest_ram_bytes: run.guest_ram_bytes,
            ram_mbps: run.ram_mbps,
            dirty_sync_count: run.dirty_sync_count,
            disk_bytes: run.disk_bytes,
            disk_mbps: run.disk_mbps,
            host_cpu_s,
            phases: run.phases,
            setup_disks_ms: run.setup_disks_ms,
            forecast_ms: run.forecast_ms,
            ..RunResult::default()
        };
        Ok((result, "libvirt's (system)".into()))
    }

    /// One migration between fresh VMs; returns its measurements and QEMU's version.
    async fn run_once(
        &self,
        index: usize,
        round: u32,
        warmup: bool,
        mode: &Mode,
        on_event: &mut (dyn FnMut(BenchEvent<'_>) + Send),
        cancel: &CancellationToken,
    ) -> Result<(RunResult, String), BenchError> {
        let dir = self.root.join(format!("run-{index:03}-{}", mode.name));
        let vm_err = |source| BenchError::Vm {
            run: index,
            mode: mode.name.clone(),
            source: Box::new(source),
        };
        let (src_disks, dst_disks) = self.disks(&dir).map_err(|source| BenchError::WorkDir {
            path: dir.clone(),
            source,
        })?;
        let mut config = VmConfig::new("bench-source", &dir.join("source"));
        config.ram_mib = self.config.ram_mib;
        config.accel = Some(self.accel);
        config.kernel = Some(self.kernel.clone());
        config.disks = src_disks;
        config.qemu = mode.qemu.as_ref().map(|q| q.path.clone());
        let dst_paths: Vec<PathBuf> = dst_disks.iter().map(|d| d.path.clone()).collect();
        let dest_config =
            config.destination("bench-destination", &dir.join("destination"), &dst_paths);
        let source = Vm::launch(config).await.map_err(vm_err)?;
        let dest = Vm::launch(dest_config).await.map_err(vm_err)?;
        wait_for_workload(index, &source, cancel).await?;
        if self.config.profile == Profile::Static {
            self.pause_and_fill(&source).await?;
        } else if self.config.file_fill_mib > 0 {
            self.fill_through_ram_file(&source)
                .map_err(|source_err| BenchError::WorkDir {
                    path: source.ram_path().to_path_buf(),
                    source: source_err,
                })?;
        }

        let src_mon = monitor(&source).await?;
        let dst_mon = monitor(&dest).await?;
        let version = src_mon.greeting().version.qemu;
        let version = format!("{}.{}.{}", version.major, version.minor, version.micro);
        let src_vcpus = vcpu_threads(&source, &src_mon).await?;
        let dst_vcpus = vcpu_threads(&dest, &dst_mon).await?;
        let (src_pid, dst_pid) = (pid_of(&source), pid_of(&dest));
        let cpu = |pid: u32, vcpus: &[u32]| {
            CpuTimes::read(pid, vcpus).map_err(|source| BenchError::CpuTimes { pid, source })
        };
        let src_before = cpu(src_pid, &src_vcpus)?;
        let dst_before = cpu(dst_pid, &dst_vcpus)?;

        let mut options = self.options(mode, &source, &dest);
        // Held until the migration is over: the proxies carry it.
        let _proxies = if let Some(kind) = mode.proxy {
            let port = crate::ports::allocate(options.port_range)
                .map(|lease| lease.port())
                .map_err(|e| BenchError::Proxy(e.to_string()))?;
            // The lease is let go at once so the destination can take the same port; runs
            // are sequential, so nothing else takes it meanwhile.
            let pair =
                proxy::ProxyPair::start(kind, &self.source_pki, &self.dest_pki, DEST_HOST, port)
                    .await
                    .map_err(|e| BenchError::Proxy(e.to_string()))?;
            options.port_range = crate::ports::PortRange {
                first: port,
                last: port,
            };
            options.source_connect = Some(pair.source_connect.clone());
            Some(pair)
        } else {
            None
        };
        on_event(BenchEvent::Migrating { run: index });
        let mut on_progress = |p: &Progress| {
            on_event(BenchEvent::Migration {
                run: index,
                progress: p,
            })
        };
        let host_before = measure::host_busy_seconds().unwrap_or(0.0);
        let started = Instant::now();
        let report = match options.validate() {
            Ok(valid) => {
                let cx = migration::RunContext::new(&mut on_progress, cancel);
                migration::migrate(&valid, cx).await
            }
            Err(e) => migration::Report::refused(e, Duration::ZERO),
        };
        let wall = started.elapsed();
        let host_cpu_s = (measure::host_busy_seconds().unwrap_or(0.0) - host_before).max(0.0);
        let timed_out = report
            .error
            .as_ref()
            .is_some_and(|e| matches!(e, migration::MigrationError::Timeout { .. }));
        if report.status == FinalStatus::Failed && timed_out {
            // Did not converge by the deadline: a result of the run, not a failure of the
            // bench (rolled back; the source ran on).
            let result = RunResult {
                run: index,
                round,
                warmup,
                mode: mode.name.clone(),
                completed: false,
                wall_ms: wall.as_millis() as u64,
                host_cpu_s,
                ..RunResult::default()
            };
            drop(src_mon);
            drop(dst_mon);
            drop(source);
            drop(dest);
            let _ = std::fs::remove_dir_all(&dir);
            return Ok((result, version));
        }
        if report.status != FinalStatus::Completed {
            if report.status == FinalStatus::Cancelled {
                return Err(BenchError::Cancelled);
            }
            return Err(BenchError::Migration {
                run: index,
                mode: mode.name.clone(),
                status: report.status,
                source: report.error.map(Box::new),
            });
        }
        let src_after = cpu(src_pid, &src_vcpus)?;
        let dst_after = cpu(dst_pid, &dst_vcpus)?;
        let info: MigrationInfo =
            src_mon
                .call(&QueryMigrate)
                .await
                .map_err(|e| BenchError::Qmp {
                    vm: source.name.clone(),
                    step: "query-migrate",
                    source: Box::new(e),
                })?;
        let ram = info.ram.unwrap_or_default();
        let disk_bytes: u64 = report.disks.iter().map(|d| d.bytes).sum();
        let disk_ms: u64 = report.disks.iter().map(|d| d.ms).max().unwrap_or(0);
        let result = RunResult {
            run: index,
            round,
            warmup,
            mode: mode.name.clone(),
            completed: true,
            total_ms: info.total_time.unwrap_or(report.ram.total_ms),
            setup_ms: info.setup_time.unwrap_or(0),
            downtime_ms: info.downtime.unwrap_or(report.ram.downtime_ms),
            guest_pause_ms: report.guest_pause.as_ref().map(|p| p.ms),
            wall_ms: wall.as_millis() as u64,
            ram_bytes: ram.transferred,
            guest_ram_bytes: ram.total,
            ram_mbps: report.ram.throughput_mbps,
            normal_pages: ram.normal,
            duplicate_pages: ram.duplicate,
            dirty_sync_count: ram.dirty_sync_count,
            dirty_pages_rate: ram.dirty_pages_rate,
            src_cpu_s: src_after.non_vcpu_since(&src_before),
            dst_cpu_s: dst_after.non_vcpu_since(&dst_before),
            src_cpu_total_s: src_after.process_since(&src_before),
            dst_cpu_total_s: dst_after.process_since(&dst_before),
            disk_bytes,
            disk_mbps: (disk_ms > 0)
                .then(|| disk_bytes as f64 * 8.0 / 1e6 / (disk_ms as f64 / 1e3)),
            host_cpu_s,
            phases: report.timing,
            setup_disks_ms: None,
            forecast_ms: report.forecast.as_ref().map(|f| f.predicted_total_ms),
        };
        drop(src_mon);
        drop(dst_mon);
        drop(source);
        drop(dest);
        let _ = std::fs::remove_dir_all(&dir);
        Ok((result, version))
    }

    fn options(&self, mode: &Mode, source: &Vm, dest: &Vm) -> MigrationOptions {
        let mut o = MigrationOptions::new(
            Endpoint {
                qmp: source.qmp_path().to_path_buf(),
                pki_dir: self.source_pki.clone(),
            },
            Endpoint {
                qmp: dest.qmp_path().to_path_buf(),
                pki_dir: self.dest_pki.clone(),
            },
            DEST_HOST,
        );
        o.dest_address = Some("127.0.0.1".into());
        o.transport = match mode.transport {
            Transport::Tls => TransportChoice::Tls,
            Transport::Tcp => TransportChoice::Tcp,
        };
        o.multifd = mode
            .multifd
            .map_or(migration::Multifd::Off, migration::Multifd::Channels);
        o.tls_priority = mode.tls_priority.clone();
        o.timeout = Some(self.config.run_timeout);
        if let Some(cap) = self.config.max_bandwidth {
            o.max_bandwidth = cap;
        }
        match mode.conv {
            Some(ConvMode::AutoConverge) => {
                o.convergence.auto_converge = Some(crate::migration::Throttle::default());
            }
            Some(ConvMode::Xbzrle) => {
                o.convergence.xbzrle = Some(crate::migration::XbzrleCache::Auto);
            }
            Some(ConvMode::Zstd) => {
                o.convergence.compress = Some(crate::migration::Compression::Zstd);
            }
            Some(ConvMode::PauseAfter) => {
                o.timeout = Some(self.config.pause_after);
                o.convergence.timeout_action = crate::migration::TimeoutAction::Pause;
            }
            None => {}
        }
        if self.config.disk_mib > 0 {
            o.disks = DiskSelection::AllLocal;
        }
        o
    }

    /// The static profile's source: paused, then its RAM filled with pseudo-random bytes from
    /// 4 MiB (above the firmware and the workload's code) to the last MiB.
    async fn pause_and_fill(&self, vm: &Vm) -> Result<(), BenchError> {
        let qmp = monitor(vm).await?;
        qmp.call(&crate::qemu::Stop)
            .await
            .map_err(|e| BenchError::Qmp {
                vm: vm.name.clone(),
                step: "stop",
                source: Box::new(e),
            })?;
        drop(qmp);
        let start = 4u64 << 20;
        let end = (u64::from(self.config.ram_mib) << 20).saturating_sub(1 << 20);
        vm.write_ram(start, end.saturating_sub(start), 0x5eed)
            .map_err(|source| BenchError::WorkDir {
                path: vm.ram_path().to_path_buf(),
                source,
            })
    }

    /// Writes `file_fill_mib` MiB of data into the source's RAM file, starting above the
    /// workload's working set (which starts at 4 MiB), capped at the end of RAM.
    fn fill_through_ram_file(&self, vm: &Vm) -> std::io::Result<()> {
        let start = (4 + u64::from(self.config.workload.working_set_mib) + 1) << 20;
        let end = (u64::from(self.config.ram_mib) << 20).saturating_sub(1 << 20);
        let len = (u64::from(self.config.file_fill_mib) << 20).min(end.saturating_sub(start));
        vm.write_ram(start, len, 0x5eed)
    }

    /// The source's disk (filled with data) and the destination's empty one of the same size,
    /// when a disk size is configured.
    fn disks(&self, dir: &Path) -> std::io::Result<(Vec<DiskConfig>, Vec<DiskConfig>)> {
        if self.config.disk_mib == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        std::fs::create_dir_all(dir)?;
        let bytes = u64::from(self.config.disk_mib) << 20;
        let src = dir.join("source-disk.raw");
        let dst = dir.join("destination-disk.raw");
        fill_pseudo_random(&src, bytes, 0xd15c)?;
        std::fs::File::create(&dst)?.set_len(bytes)?;
        let disk = |path: PathBuf| DiskConfig {
            node: "disk0".into(),
            path,
            format: DiskFormat::Raw,
            device: None,
        };
        Ok((vec![disk(src)], vec![disk(dst)]))
    }
}

fn pid_of(vm: &Vm) -> u32 {
    vm.pid().unwrap_or(0)
}

async fn monitor(vm: &Vm) -> Result<Qmp, BenchError> {
    vm.monitor().await.map_err(|source| BenchError::Monitor {
        vm: vm.name.clone(),
        source: Box::new(source),
    })
}

async fn vcpu_threads(vm: &Vm, qmp: &Qmp) -> Result<Vec<u32>, BenchError> {
    let cpus = qmp
        .call(&QueryCpusFast)
        .await
        .map_err(|source| BenchError::Qmp {
            vm: vm.name.clone(),
            step: "query-cpus-fast",
            source: Box::new(source),
        })?;
    Ok(cpus.into_iter().map(|c| c.thread_id).collect())
}

/// Waits until the guest workload has filled its working set (or, idle, has started), seen on
/// its serial console.
async fn wait_for_workload(
    run: usize,
    vm: &Vm,
    cancel: &CancellationToken,
) -> Result<(), BenchError> {
    tokio::select! {
        _ = cancel.cancelled() => Err(BenchError::Cancelled),
        ready = crate::vm::workload::wait_ready(vm, WORKLOAD_START_TIMEOUT) => {
            ready.map_err(|tail| BenchError::WorkloadNotRunning {
                run,
                serial: vm.serial_path().to_path_buf(),
                after: WORKLOAD_START_TIMEOUT,
                tail,
            })
        }
    }
}

/// Writes `bytes` of pseudo-random data to a new file at `path` (disk contents that neither
/// zero detection nor compression can shortcut).
fn fill_pseudo_random(path: &Path, bytes: u64, seed: u64) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    crate::vm::write_pseudo_random(&mut file, bytes, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_by_name_and_multifd_needs_channels() {
        assert_eq!(Mode::by_name("tcp"), Some(Mode::tcp()));
        assert_eq!(Mode::by_name("tls-mfd4").and_then(|m| m.multifd), Some(4));
        assert_eq!(
            Mode::by_name("tls-chacha20").and_then(|m| m.tls_priority),
            Some(PRIORITY_CHACHA20.to_string())
        );
        assert_eq!(Mode::by_name("tls-mfd0"), None);
        assert_eq!(Mode::by_name("udp"), None);
    }

    #[test]
    fn the_standard_matrix_starts_with_the_baseline_and_names_are_unique() {
        let modes = Mode::standard(2);
        assert_eq!(modes[0], Mode::tcp());
        let mut names: Vec<&str> = modes.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), modes.len());
        for m in &modes {
            assert_eq!(Mode::by_name(&m.name).as_ref(), Some(m));
        }
    }

    #[test]
    fn modes_across_qemus_keep_the_first_qemus_names_and_group_by_mode() {
        let q = |label: &str| QemuBinary {
            label: label.into(),
            path: PathBuf::from(format!("/opt/{label}/qemu")),
        };
        let modes = Mode::across(&[Mode::tcp(), Mode::tls()], &[q("7.2"), q("10.0")]);
        let names: Vec<&str> = modes.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["tcp", "tcp@10.0", "tls", "tls@10.0"]);
        assert_eq!(
            modes[3].qemu.as_ref().map(|q| q.label.as_str()),
            Some("10.0")
        );
        assert_eq!(modes[3].transport, Transport::Tls);
        assert!(modes[3].describe().contains("QEMU 10.0"));
        assert_eq!(Mode::across(&[Mode::tls()], &[]), [Mode::tls()]);
    }
}
