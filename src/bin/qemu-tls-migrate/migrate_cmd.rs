//! `qemu-tls-migrate migrate`: arguments, their validation into [`MigrationOptions`], and the
//! run with progress and signal handling.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use qemu_tls_migrate::addr::Address;
use qemu_tls_migrate::migration::{
    self, Compression, ControlReceiver, Convergence, DiskSelection, DowntimeSteps, Endpoint,
    FinalStatus, MAX_MULTIFD_CHANNELS, MigrationOptions, Multifd, RemoteTarget, Report, RunContext,
    Throttle, TimeoutAction, TransportChoice, UNLIMITED_BANDWIDTH, ValidOptions, XbzrleCache,
};
use qemu_tls_migrate::peer::{Authz, DiskCopy};
use qemu_tls_migrate::pki::DEFAULT_PKI_DIR;
use qemu_tls_migrate::ports::{DEFAULT_RANGE, PortRange};
use qemu_tls_migrate::qemu::CopyMode;
use tokio_util::sync::CancellationToken;

use crate::jobs_cmd::RunningJob;
use crate::outcome::Outcome;
use crate::output::{ProgressOut, print_report, print_report_job};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MirrorModeArg {
    Background,
    WriteBlocking,
}

impl TransportArg {
    /// As the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            TransportArg::Auto => "auto",
            TransportArg::Tls => "tls",
            TransportArg::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TransportArg {
    /// TLS when both PKI directories are usable, TCP when neither is, refuse a mixed pair.
    Auto,
    /// QEMU-native TLS; refuse if either side's PKI is unusable.
    Tls,
    /// Plain TCP, unencrypted.
    Tcp,
}

/// Options shared by every command that runs a migration (`migrate`, `demo`).
#[derive(Debug, Clone, Args)]
pub struct TuningArgs {
    /// tls: native TLS; tcp: plain; auto: TLS between two secured hosts, TCP between two
    /// unsecured ones (with a warning), refusal for a mixed pair.
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Bandwidth cap of the RAM migration stream (QEMU's max-bandwidth: RAM and device state,
    /// not disks; see --disk-bandwidth) in bytes per second, with an optional K/M/G suffix
    /// (powers of 1024), or "unlimited". QEMU 7.2's own default would be 128M.
    #[arg(long, default_value = "unlimited", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Longest acceptable pause of the guest at switch-over, in milliseconds (QEMU's default:
    /// 300).
    #[arg(long, value_name = "MS")]
    pub downtime_limit: Option<u64>,
    /// Send RAM over N parallel connections (multifd), each with its own TLS session; "auto":
    /// one channel per two CPUs of the smaller host (the service reports the destination's),
    /// at most 8, and none (one stream) below 4 CPUs, where more channels measured no faster.
    #[arg(long, value_name = "N|auto", value_parser = parse_multifd)]
    pub multifd: Option<MultifdArg>,
    /// GnuTLS priority string for both ends, to choose ciphers (e.g.
    /// "NORMAL:-CIPHER-ALL:+AES-128-GCM").
    #[arg(long, value_name = "PRIORITY")]
    pub tls_priority: Option<String>,
    /// Ports for the migration stream are taken from this range (FIRST-LAST).
    #[arg(long, default_value_t = DEFAULT_RANGE, value_parser = parse_range)]
    pub port_range: PortRange,
    /// Give up when the migration has not completed after this many seconds (at most a week).
    #[arg(long, value_name = "SECS", value_parser = timeout_secs())]
    pub timeout: Option<u64>,
    /// Give up when no byte has moved for this many seconds (a destination that stopped
    /// answering).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = migration::DEFAULT_STALL_TIMEOUT.as_secs(),
        value_parser = timeout_secs()
    )]
    pub stall_timeout: u64,
    /// Timeout for each QMP command, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = migration::DEFAULT_QMP_TIMEOUT.as_secs(),
        value_parser = timeout_secs()
    )]
    pub qmp_timeout: u64,
    /// Print progress as JSON lines on stderr and exactly one JSON object on stdout at the end.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub convergence: ConvergenceArgs,
}

/// What helps a busy guest's migration finish (see the README's "When a VM will not
/// converge"). The report's "convergence" member says what acted.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Convergence (guests that dirty memory fast)")]
pub struct ConvergenceArgs {
    /// Let QEMU throttle the guest's vCPUs when passes do not converge (auto-converge): it
    /// takes --throttle-initial percent of their time first, --throttle-increment more each
    /// pass after.
    #[arg(long)]
    pub auto_converge: bool,
    /// With --auto-converge: first throttle, percent (QEMU's default 20).
    #[arg(long, value_name = "PCT", requires = "auto_converge", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_initial: Option<u8>,
    /// With --auto-converge: throttle added each pass, percent (QEMU's default 10).
    #[arg(long, value_name = "PCT", requires = "auto_converge", value_parser = clap::value_parser!(u8).range(1..=100))]
    pub throttle_increment: Option<u8>,
    /// Send pages sent before as XBZRLE deltas, against a cache of SIZE (K/M/G suffix); with no
    /// SIZE, sized from the guest's dirty rate sampled for a second first (two seconds of
    /// dirtying, 64 MiB to half the RAM).
    #[arg(long, value_name = "SIZE", num_args = 0..=1, default_missing_value = "auto", value_parser = parse_xbzrle)]
    pub xbzrle: Option<XbzrleCache>,
    /// Compress pages on the multifd channels (needs --multifd N; both sides use it).
    #[arg(long, value_enum, value_name = "METHOD")]
    pub compress: Option<CompressArg>,
    /// Raise the allowed downtime while the migration runs, in STEPS equal steps up to MAX_MS,
    /// one every EVERY_S seconds of the RAM phase (like Nova's downtime steps; defaults 10
    /// steps, 5 s).
    #[arg(long, value_name = "MAX_MS[:STEPS[:EVERY_S]]", value_parser = DowntimeSteps::parse)]
    pub downtime_steps: Option<DowntimeSteps>,
    /// What to do at --timeout (or the completion timeout): abort (roll back; the source runs
    /// on) or pause (pause the guest so the rest moves as downtime, like CloudStack's
    /// vm.migrate.pauseafter; the report's guest_pause says for how long). postcopy is refused,
    /// as --postcopy is.
    #[arg(long, value_enum, default_value = "abort")]
    pub timeout_action: TimeoutActionArg,
    /// A deadline of SECS per GiB of guest RAM plus copied disk (like KubeVirt's
    /// completionTimeoutPerGiB); with --timeout too, the earlier one holds.
    #[arg(long, value_name = "SECS", value_parser = timeout_secs())]
    pub completion_timeout_per_gib: Option<u64>,
    /// Post-copy: always refused, with the reasons (a lost link would lose the VM; QEMU 7.2's
    /// GnuTLS issue #1937 on TLS channels with a return path).
    #[arg(long)]
    pub postcopy: bool,
    /// Skip the forecast made before every migration (a second sampling the guest's dirty
    /// rate, and its RAM for data); the report's "forecast" shows it next to the result, and a
    /// no-go is a warning.
    #[arg(long)]
    pub no_forecast: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompressArg {
    Zstd,
    Zlib,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TimeoutActionArg {
    Abort,
    Pause,
    Postcopy,
}

fn parse_xbzrle(s: &str) -> Result<XbzrleCache, String> {
    if s == "auto" {
        return Ok(XbzrleCache::Auto);
    }
    match parse_bandwidth(s) {
        Ok(bytes) if bytes >= 1 << 20 && bytes != UNLIMITED_BANDWIDTH => {
            Ok(XbzrleCache::Bytes(bytes))
        }
        _ => Err(format!(
            "{s:?}: a cache size of at least 1M (K/M/G suffix), or nothing for auto"
        )),
    }
}

impl ConvergenceArgs {
    pub fn to_convergence(&self) -> Convergence {
        Convergence {
            auto_converge: self.auto_converge.then(|| {
                let d = Throttle::default();
                Throttle {
                    initial: self.throttle_initial.unwrap_or(d.initial),
                    increment: self.throttle_increment.unwrap_or(d.increment),
                }
            }),
            xbzrle: self.xbzrle,
            compress: self.compress.map(|c| match c {
                CompressArg::Zstd => Compression::Zstd,
                CompressArg::Zlib => Compression::Zlib,
            }),
            downtime_steps: self.downtime_steps,
            timeout_action: match self.timeout_action {
                TimeoutActionArg::Abort => TimeoutAction::Abort,
                TimeoutActionArg::Pause => TimeoutAction::Pause,
                TimeoutActionArg::Postcopy => TimeoutAction::Postcopy,
            },
            postcopy: self.postcopy,
            completion_timeout_per_gib: self.completion_timeout_per_gib.map(Duration::from_secs),
        }
    }
}

#[derive(Debug, Args)]
#[command(
    long_about = "Live-migrate a running QEMU VM to a QEMU started with `-incoming defer`, over \
QEMU-native TLS, by talking QMP to both.\n\n\
Per migration the tool creates tls-creds-x509 objects from each side's PKI directory (client on \
the source, server on the destination, peer verification on), sets tls-creds and tls-hostname, \
picks a port from 49152-49215, migrates, resumes the destination, and then removes every object \
it created and puts the migration capabilities and parameters back as they were. On any failure \
(bad certificates, dead destination, timeout, Ctrl-C) the destination is shut down and the source \
keeps running, with one exception: once the source has passed the switch-over, it is resumed \
only if the destination is known not to run the VM; otherwise it stays paused and the error \
(kind split-brain-risk, exit 1) says where the VM may run. The VM never runs on both hosts.\n\n\
A side is *secured* when its PKI directory holds a usable ca-cert.pem and, for the source, \
client-cert.pem/client-key.pem, for the destination, server-cert.pem/server-key.pem \
(see `qemu-tls-migrate pki check`); *unsecured* when it holds no TLS file at all; files that \
fail the checks make it *broken*, which is refused (exit 3), never downgraded to plain TCP.\n\n\
Every writable local disk must be copied (--disk, --all-local-disks) or declared shared \
(--shared-disk); otherwise the migration is refused (exit 3) naming the disk.",
    after_help = "Example (two QEMUs on this host, modelling two hosts):\n  \
qemu-tls-migrate migrate --source-qmp /run/vm1/qmp.sock --dest-qmp /run/vm1-in/qmp.sock \\\n    \
--dest-host host-b --dest-address 127.0.0.1 --source-pki-dir /etc/pki/host-a \\\n    \
--dest-pki-dir /etc/pki/host-b --json\n\n\
Block migration of a VM on local storage (the destination started with empty disks of the same \
node names and sizes):\n  \
qemu-tls-migrate migrate --source-qmp ... --dest-qmp ... --dest-host host-b --all-local-disks\n\n\
While it runs, `qemu-tls-migrate jobs` lists it, and `jobs cancel ID`, `jobs set ID \
--max-bandwidth RATE --downtime-limit MS` and `jobs pause ID` control it from any process of \
this user (ID: --job-id, or \"job\" in the JSON progress lines; see `jobs --help`).\n\n\
Exit codes: 0 completed, 1 migration failed (rolled back; or split-brain-risk: source left \
paused), 2 bad command line, 3 refused before anything was changed on either side, 4 cancelled by SIGINT, SIGTERM, SIGHUP, SIGQUIT or `jobs cancel` (rolled back; a second signal \
during the rollback does not interrupt it).\n\
With --json, stdout carries one object: {\"status\": \"completed\"|\"failed\"|\"cancelled\", \
\"transport\": \"tls\"|\"tcp\", \"ram\": {\"bytes\", \"total_ms\", \"downtime_ms\", \
\"throughput_mbps\", ...}, \"error\": {\"kind\", \"message\"} (on failure)}."
)]
pub struct MigrateArgs {
    /// QMP socket of the running source QEMU.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "domain",
        conflicts_with = "domain"
    )]
    pub source_qmp: Option<PathBuf>,
    /// Migrate this libvirt domain (instead of --source-qmp): it must be running or paused, with
    /// no libvirt job on it. The tool uses the QMP monitor the domain declares in its
    /// <qemu:commandline> (-qmp unix:PATH,server=on,wait=off) beside libvirt's own, or, when it
    /// declares none, libvirt's QMP passthrough (the report's "source_qmp" says which). Name
    /// its disks by target (--disk vda).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// libvirt URI for --domain.
    #[arg(long, value_name = "URI", default_value = qemu_tls_migrate::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// With --domain and --to a service started with --libvirt: the incoming domain's XML (the
    /// source's `virsh dumpxml --migratable`, rewritten: disk paths, VNC address). Default:
    /// the source's migratable XML as it is. The service creates the disks to be copied at the
    /// paths this XML names, and never overwrites an existing file.
    #[arg(long, value_name = "FILE", requires = "domain", requires = "to")]
    pub dest_xml: Option<PathBuf>,
    /// With --domain: after the destination confirmed it runs the VM, destroy the source
    /// domain (`virsh destroy`; its definition and disks stay, for the caller to clean up).
    /// Without it the source is left paused.
    #[arg(long, requires = "domain", conflicts_with = "dest_paused")]
    pub destroy_source: bool,
    /// QMP socket of the destination QEMU (started with -incoming defer). With --to: the
    /// socket's file name in the destination service's --qmp-dir. Not needed with --domain and
    /// --to, where the service (started with --libvirt) makes the incoming domain itself.
    #[arg(long, value_name = "PATH|NAME", required_unless_present_all = ["domain", "to"])]
    pub dest_qmp: Option<PathBuf>,
    /// Migrate to another host through its `qemu-tls-migrate serve` (default port 16515); the
    /// control channel uses mutual TLS with this host's --source-pki-dir/--pki-dir.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub to: Option<Address>,
    /// Make the destination accept only this source's certificate: an authz-simple object
    /// matching its distinguished name, set as tls-authz for the migration stream and NBD.
    #[arg(long)]
    pub authz: bool,
    /// The destination host's name: its certificate must carry it (see --tls-hostname), and
    /// the destination listens on it unless --dest-address is given.
    #[arg(long, value_name = "NAME")]
    pub dest_host: String,
    /// Address the destination listens on and the source connects to (default: --dest-host).
    #[arg(long, value_name = "ADDR")]
    pub dest_address: Option<String>,
    /// The name checked against the destination's certificate (default: --dest-host).
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,
    /// PKI directory for both sides (QEMU's layout: ca-cert.pem, server-*.pem, client-*.pem).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
    pub pki_dir: PathBuf,
    /// PKI directory of the source only (overrides --pki-dir).
    #[arg(long, value_name = "DIR")]
    pub source_pki_dir: Option<PathBuf>,
    /// PKI directory of the destination only (overrides --pki-dir).
    #[arg(long, value_name = "DIR")]
    pub dest_pki_dir: Option<PathBuf>,
    /// HOST:PORT the source connects to when it differs from where the destination listens
    /// (NAT, port forwarding, a proxy).
    #[arg(long, value_name = "HOST:PORT", hide = true)]
    pub source_connect: Option<Address>,
    /// Leave the destination paused after the migration (like virsh migrate --suspend).
    #[arg(long)]
    pub dest_paused: bool,
    /// Only forecast: sample the source guest's dirty rate and RAM, predict total time, passes
    /// and downtime with these settings, say go or no-go with the settings that would make it
    /// converge, and change nothing. Exit 0: it converges; 3: it will not as configured.
    #[arg(long)]
    pub plan: bool,
    /// Copy this disk to the destination over NBD before RAM moves: its block node name (as in
    /// -blockdev node-name=...) or its device id (-device ...,id=); with --domain, its target
    /// as in the domain's XML (vda). Repeat for several disks. ",copy=top" or ",copy=full"
    /// overrides --disk-copy for this disk.
    #[arg(
        long = "disk",
        value_name = "NODE[,copy=top|full]",
        conflicts_with = "all_local_disks",
        value_parser = parse_disk
    )]
    pub disks: Vec<(String, Option<DiskCopy>)>,
    /// full: copy each disk's whole backing chain (what the guest sees); top: only its top
    /// image (libvirt's --copy-storage-inc), for a qcow2 overlay on a template that the
    /// destination already has: its disk must be an overlay on a backing file of the same
    /// format, size and content (checked before anything starts; exit 3 otherwise). A disk
    /// without a backing file is copied whole (unless named with ,copy=top: then refused).
    #[arg(long, value_enum, default_value = "full")]
    pub disk_copy: DiskCopyArg,
    /// Cap of each disk's copy in bytes per second (the mirror's speed; K/M/G suffixes as
    /// --max-bandwidth). Zeroes do not count. Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth)]
    pub disk_bandwidth: Option<u64>,
    /// skip: blocks of zeroes cross the wire as NBD write-zeroes requests and stay sparse on the
    /// destination (detect-zeroes=unmap on the source's NBD client); copy: sent as data.
    #[arg(long, value_enum, default_value = "skip")]
    pub disk_zeroes: DiskZeroesArg,
    /// HOST:PORT the source's NBD clients connect to when it differs from where the
    /// destination's NBD server listens (NAT, a proxy).
    #[arg(long, value_name = "HOST:PORT", hide = true)]
    pub nbd_connect: Option<Address>,
    /// Copy every writable disk that is not on shared storage. Shared means a network driver
    /// (nbd, rbd, iscsi, gluster, ssh, http...) or a file on NFS, CIFS/SMB, Ceph, FUSE
    /// (GlusterFS), GFS2, OCFS2 or Lustre, as statfs reports for the image's path.
    #[arg(long)]
    pub all_local_disks: bool,
    /// background: guest writes during the copy are sent later from a dirty bitmap;
    /// write-blocking: guest writes wait for the destination, so a guest that writes faster
    /// than the network still converges.
    #[arg(long, value_enum, default_value = "background")]
    pub mirror_mode: MirrorModeArg,
    /// Grow destination disks smaller than the source's to the source's size (the destination
    /// QEMU must already have a disk with the same node name).
    #[arg(long)]
    pub create_dest_disks: bool,
    /// Declare this writable local disk (named as for --disk) shared: reachable from the
    /// destination by other means, so it is not copied. Repeat for several. Without it, a
    /// writable disk that is not on shared storage and not copied is refused (exit 3).
    #[arg(long = "shared-disk", value_name = "NODE")]
    pub shared_disks: Vec<String>,
    /// Migrate even when writable local disks are neither copied nor declared shared: the
    /// guest then runs on the destination without their contents (libvirt's --unsafe).
    #[arg(long = "unsafe")]
    pub allow_unsafe: bool,
    /// This migration's job id for `qemu-tls-migrate jobs` (letters, digits, '.', '_', '-';
    /// e.g. the VM's name); default: 8 random hexadecimal digits. An id in use is refused.
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Also write the final JSON object to this file (atomically: a temporary file renamed into
    /// place), so the result survives whatever the caller does with stdout and stderr.
    #[arg(long, value_name = "FILE")]
    pub result_file: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

impl MigrateArgs {
    pub fn options(&self) -> anyhow::Result<MigrationOptions> {
        let source = Endpoint {
            // With --domain, filled in from libvirt before the migration starts.
            qmp: self.source_qmp.clone().unwrap_or_default(),
            pki_dir: absolute_dir(self.source_pki_dir.as_ref().unwrap_or(&self.pki_dir))?,
        };
        let dest = Endpoint {
            qmp: self.dest_qmp.clone().unwrap_or_default(),
            pki_dir: absolute_dir(self.dest_pki_dir.as_ref().unwrap_or(&self.pki_dir))?,
        };
        let mut o = MigrationOptions::new(source, dest, &self.dest_host);
        o.dest_address = self.dest_address.clone();
        o.tls_hostname = self.tls_hostname.clone();
        o.source_connect = self.source_connect.clone();
        o.dest_paused = self.dest_paused;
        let mut nodes = Vec::new();
        o.disk_copy.default = self.disk_copy.into();
        for (node, copy) in &self.disks {
            if let Some(copy) = copy {
                o.disk_copy.per_node.insert(node.clone(), *copy);
            }
            nodes.push(node.clone());
        }
        o.disks = if self.all_local_disks {
            DiskSelection::AllLocal
        } else if nodes.is_empty() {
            DiskSelection::None
        } else {
            DiskSelection::Nodes(nodes)
        };
        o.disk_bandwidth = self.disk_bandwidth.filter(|b| *b != UNLIMITED_BANDWIDTH);
        o.skip_zeroes = self.disk_zeroes == DiskZeroesArg::Skip;
        o.nbd_connect = self.nbd_connect.clone();
        o.mirror_mode = match self.mirror_mode {
            MirrorModeArg::Background => CopyMode::Background,
            MirrorModeArg::WriteBlocking => CopyMode::WriteBlocking,
        };
        o.create_dest_disks = self.create_dest_disks;
        o.shared_disks = self.shared_disks.clone();
        o.allow_unsafe = self.allow_unsafe;
        if let Some(to) = &self.to {
            // The migration and NBD ports are on the host the service runs on.
            if o.dest_address.is_none() {
                o.dest_address = Some(to.host.clone());
            }
            if self.authz {
                // The service fills in the source certificate's name from the TLS session.
                o.authz = Authz::FromPeerCert;
            }
        } else if self.authz {
            o.authz = Authz::Identity(client_dn(&o.source.pki_dir)?);
        }
        self.tuning.apply(&mut o);
        Ok(o)
    }
}

impl TuningArgs {
    pub fn apply(&self, o: &mut MigrationOptions) {
        o.transport = match self.transport {
            TransportArg::Auto => TransportChoice::Auto,
            TransportArg::Tls => TransportChoice::Tls,
            TransportArg::Tcp => TransportChoice::Tcp,
        };
        o.max_bandwidth = self.max_bandwidth;
        o.downtime_limit = self.downtime_limit.map(Duration::from_millis);
        match self.multifd {
            Some(MultifdArg::Auto) => o.multifd = Multifd::Auto,
            Some(MultifdArg::Channels(n)) => o.multifd = Multifd::Channels(n),
            None => {}
        }
        o.tls_priority = self.tls_priority.clone();
        o.port_range = self.port_range;
        o.timeout = self.timeout.map(Duration::from_secs);
        o.stall_timeout = Duration::from_secs(self.stall_timeout);
        o.qmp_timeout = Duration::from_secs(self.qmp_timeout);
        o.convergence = self.convergence.to_convergence();
        o.forecast = !self.convergence.no_forecast;
    }
}

/// Seconds from 1 to [`migration::MAX_TIMEOUT`], for every timeout flag: clap refuses the rest
/// with a usage error (exit 2) that names the flag.
pub fn timeout_secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(1..=migration::MAX_TIMEOUT.as_secs())
}

/// `dir` made absolute against the current directory: QEMU opens the PKI files itself, from
/// its own current directory, so a relative path would name other files there.
pub fn absolute_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot resolve the directory {} against the current directory ({e}); give an \
             absolute path",
            dir.display()
        )
    })
}

/// The distinguished name of the client certificate in `pki_dir` (what `authz-simple` on the
/// destination must match).
fn client_dn(pki_dir: &std::path::Path) -> anyhow::Result<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = pki_dir.join(qemu_tls_migrate::pki::CLIENT_CERT);
    let der = CertificateDer::from_pem_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "--authz needs the source's certificate {}: {e}",
            path.display()
        )
    })?;
    qemu_tls_migrate::pki::certificate_authz_dn(der.as_ref()).map_err(|e| {
        anyhow::anyhow!(
            "--authz: the subject of {} cannot be QEMU's tls-authz identity: {e}",
            path.display()
        )
    })
}

/// `--disk-copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskCopyArg {
    Full,
    Top,
}

impl From<DiskCopyArg> for DiskCopy {
    fn from(a: DiskCopyArg) -> DiskCopy {
        match a {
            DiskCopyArg::Full => DiskCopy::Full,
            DiskCopyArg::Top => DiskCopy::Top,
        }
    }
}

/// `--disk-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskZeroesArg {
    Skip,
    Copy,
}

/// `--disk NODE[,copy=top|full]`: the node and, when given, its copy mode.
fn parse_disk(s: &str) -> Result<(String, Option<DiskCopy>), String> {
    let mut parts = s.split(',');
    let node = parts.next().unwrap_or_default().trim();
    if node.is_empty() {
        return Err(format!("--disk {s:?}: expected NODE[,copy=top|full]"));
    }
    let mut copy = None;
    for part in parts {
        copy = Some(match part.trim() {
            "copy=top" => DiskCopy::Top,
            "copy=full" => DiskCopy::Full,
            other => {
                return Err(format!(
                    "--disk {s:?}: unknown setting {other:?}; expected copy=top or copy=full"
                ));
            }
        });
    }
    Ok((node.to_string(), copy))
}

pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(UNLIMITED_BANDWIDTH);
    }
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("unknown suffix {c:?} in {s:?}: use K, M or G")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte rate like 500M, 1G or unlimited"))?;
    if n == 0 {
        return Err("a bandwidth of 0 would stop the migration; use \"unlimited\"".into());
    }
    n.checked_mul(mult)
        .filter(|v| *v <= UNLIMITED_BANDWIDTH)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// `--multifd`: a channel count or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultifdArg {
    Auto,
    Channels(u8),
}

fn parse_multifd(s: &str) -> Result<MultifdArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(MultifdArg::Auto);
    }
    match s.parse::<u8>() {
        Ok(n) if (1..=MAX_MULTIFD_CHANNELS).contains(&n) => Ok(MultifdArg::Channels(n)),
        _ => Err(format!(
            "{s:?}: use a channel count from 1 to {MAX_MULTIFD_CHANNELS}, or auto"
        )),
    }
}

fn parse_range(s: &str) -> Result<PortRange, String> {
    s.parse()
        .map_err(|e: qemu_tls_migrate::ports::PortError| e.to_string())
}

/// Runs a migration with progress output and signals cancelling it (see [`cancel_on_signal`]).
pub async fn run_migration(options: MigrationOptions, json: bool, quiet: bool) -> Report {
    match options.validate() {
        Ok(valid) => run_migration_to(&valid, None, json, quiet, None).await,
        Err(e) => Report::refused(e, Duration::ZERO),
    }
}

/// [`run_migration`], to a remote service when `remote` is given, controlled through `job`'s
/// socket when given (`jobs cancel` cancels it as a signal does).
pub async fn run_migration_to(
    options: &ValidOptions,
    remote: Option<&RemoteTarget>,
    json: bool,
    quiet: bool,
    job: Option<(&RunningJob, ControlReceiver)>,
) -> Report {
    let (job, control) = match job {
        Some((job, control)) => (Some(job), Some(control)),
        None => (None, None),
    };
    let mut out = ProgressOut::new(json, quiet);
    let cancel = match job {
        Some(job) => {
            out = out.with_job(job.id());
            job.cancel_token()
        }
        None => CancellationToken::new(),
    };
    let watcher = tokio::spawn(cancel_on_signal(cancel.clone()));
    let mut on_progress = |p: &migration::Progress| {
        if let Some(job) = job {
            job.update(p);
        }
        out.update(p)
    };
    let mut cx = RunContext::new(&mut on_progress, &cancel);
    cx.control = control;
    let report = match remote {
        None => migration::migrate(options, cx).await,
        Some(target) => migration::migrate_remote(options, target, cx).await,
    };
    watcher.abort();
    out.finish();
    report
}

/// Cancels `cancel` on the first SIGINT, SIGTERM, SIGHUP or SIGQUIT (the migration then rolls
/// back), and keeps catching them while the rollback runs: a second Ctrl-C, or a closing
/// terminal, must neither kill the tool half way through nor go unanswered.
pub async fn cancel_on_signal(cancel: CancellationToken) {
    let Some(mut signals) = Signals::register() else {
        return;
    };
    let Some(name) = signals.next().await else {
        return;
    };
    tracing::warn!("{name} received: cancelling the migration and rolling back");
    cancel.cancel();
    while let Some(name) = signals.next().await {
        tracing::warn!("{name} received: rollback in progress, please wait");
    }
}

/// The signals that cancel a run.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| {
            signal(kind)
                .map_err(|e| tracing::warn!("cannot catch signal {}: {e}", kind.as_raw_value()))
                .ok()
        };
        Some(Signals {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
            hup: listen(SignalKind::hangup())?,
            quit: listen(SignalKind::quit())?,
        })
    }

    /// The name of the next signal; `None` once none can come any more.
    async fn next(&mut self) -> Option<&'static str> {
        tokio::select! {
            Some(()) = self.int.recv() => Some("SIGINT"),
            Some(()) = self.term.recv() => Some("SIGTERM"),
            Some(()) = self.hup.recv() => Some("SIGHUP"),
            Some(()) = self.quit.recv() => Some("SIGQUIT"),
            else => None,
        }
    }
}

/// The directory `--result-file` names a file in.
fn result_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    }
}

/// Proves a result file can be written at `path`, changing nothing there.
fn check_result_file(path: &std::path::Path) -> Result<(), String> {
    let dir = result_dir(path);
    tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        format!(
            "--result-file {}: cannot write in {}: {e}; name a file in a writable directory",
            path.display(),
            dir.display()
        )
    })?;
    Ok(())
}

/// Writes `result` to `path` through a temporary file in the same directory, renamed into
/// place, so a reader never sees half a result.
fn write_result_file(path: &std::path::Path, result: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = result_dir(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| anyhow::anyhow!("--result-file: cannot write in {}: {e}", dir.display()))?;
    writeln!(tmp, "{result}")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("--result-file {}: {}", path.display(), e.error))?;
    Ok(())
}

/// The exit outcome for a report.
pub fn outcome_of(report: &Report) -> Outcome {
    match report.status {
        FinalStatus::Completed => Outcome::Success,
        FinalStatus::Cancelled => Outcome::Cancelled,
        FinalStatus::Failed if report.refused => Outcome::Refused,
        FinalStatus::Failed => Outcome::Failed,
    }
}

/// Looks the source domain up (refusing one that cannot move), names its disks for QEMU (a
/// domain's disks are named as in its XML, `vda`; QEMU knows them by device id), and, with
/// `--to`, makes the request for the incoming domain: its XML and the disks to create.
async fn resolve_domain(
    args: &MigrateArgs,
    name: &str,
    dest_xml: Option<String>,
    options: &mut MigrationOptions,
) -> Result<migration::DomainEndpoint, migration::MigrationError> {
    let source = migration::domain_endpoint(&args.connect, name, options.qmp_timeout).await?;
    let (disks, create) = match &options.disks {
        DiskSelection::Nodes(names) => {
            let devices = source.devices_of(names)?;
            let targets = source
                .disks
                .iter()
                .filter(|d| d.alias.as_ref().is_some_and(|a| devices.contains(a)))
                .map(|d| d.target.clone())
                .collect();
            (DiskSelection::Nodes(devices), Some(targets))
        }
        DiskSelection::AllLocal => (DiskSelection::AllLocal, None),
        DiskSelection::None => (DiskSelection::None, Some(Vec::new())),
    };
    let shared = source.devices_of(&options.shared_disks)?;
    let mut per_node = std::collections::BTreeMap::new();
    for (disk, copy) in &options.disk_copy.per_node {
        per_node.insert(source.device_of(disk)?, *copy);
    }
    options.disk_copy.per_node = per_node;
    if args.to.is_some() {
        // Each disk's own copy mode (`--disk vda,copy=top`), by target as the XML names it.
        let top_only = source
            .disks
            .iter()
            .filter(|d| {
                let copy = d
                    .alias
                    .as_ref()
                    .map_or(options.disk_copy.default, |a| options.disk_copy.for_node(a));
                copy == DiskCopy::Top
            })
            .map(|d| d.target.clone())
            .collect();
        let domain = migration::dest_domain(
            &args.connect,
            name,
            dest_xml,
            create,
            top_only,
            options.qmp_timeout,
        )
        .await?;
        options.dest_domain = Some(domain);
    }
    options.source.qmp = source.socket.clone();
    options.source_domain_uuid = Some(source.uuid.clone());
    options.disks = disks;
    options.shared_disks = shared;
    Ok(source)
}

/// `--plan`: the forecast alone.
async fn plan(options: &ValidOptions, json: bool) -> anyhow::Result<Outcome> {
    match migration::plan(options).await {
        Ok(f) => {
            crate::output::print_forecast(&f, json);
            Ok(if f.converges {
                Outcome::Success
            } else {
                Outcome::Refused
            })
        }
        Err(e) => {
            let report = Report::refused(e, Duration::ZERO);
            print_report(&report, json);
            Ok(outcome_of(&report))
        }
    }
}

pub async fn run(args: MigrateArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let mut options = args.options()?;
    // Lives until the migration is over: it may serve the source's QMP socket.
    let mut endpoint = None;
    if let Some(name) = &args.domain {
        let dest_xml = match &args.dest_xml {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("--dest-xml {}: cannot read it: {e}", path.display())
            })?),
            None => None,
        };
        match resolve_domain(&args, name, dest_xml, &mut options).await {
            Ok(source) => endpoint = Some(source),
            Err(e) => {
                let report = Report::refused(e, Duration::ZERO);
                print_report(&report, args.tuning.json);
                return Ok(outcome_of(&report));
            }
        }
    }

    if args.plan {
        return match options.validate() {
            Ok(valid) => plan(&valid, args.tuning.json).await,
            Err(e) => {
                let report = Report::refused(e, Duration::ZERO);
                print_report(&report, args.tuning.json);
                Ok(outcome_of(&report))
            }
        };
    }
    let remote = args.to.as_ref().map(|to| RemoteTarget {
        address: to.clone(),
        server_name: args.dest_host.clone(),
        qmp: args
            .dest_qmp
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        pki_dir: options.source.pki_dir.clone(),
    });
    if let Some(path) = &args.result_file
        && let Err(what) = check_result_file(path)
    {
        // Before anything moves: a result that cannot be delivered must not follow a migration.
        let report = Report::refused(
            migration::MigrationError::BadOptions { what },
            Duration::ZERO,
        );
        print_report(&report, args.tuning.json);
        return Ok(outcome_of(&report));
    }
    let vm = match (&args.domain, &args.source_qmp) {
        (Some(domain), _) => format!("domain {domain}"),
        (None, qmp) => qmp
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    let (job, control) = match RunningJob::start(args.job_id.as_deref(), vm) {
        Ok(started) => started,
        Err(e) => {
            // Before anything moves: a migration that cannot be cancelled by the caller must
            // not start.
            let what = crate::output::error_chain(&e).join(": ");
            let report = Report::refused(
                migration::MigrationError::BadOptions {
                    what: format!("control socket: {what}"),
                },
                Duration::ZERO,
            );
            print_report(&report, args.tuning.json);
            return Ok(outcome_of(&report));
        }
    };
    tracing::info!(job = job.id(), "migration job started");
    // Named to a second run on the same VM, which the VM's lock refuses.
    options.job_id = Some(job.id().to_string());
    let options = match options.validate() {
        Ok(valid) => valid,
        Err(e) => {
            let report = Report::refused(e, Duration::ZERO);
            print_report_job(&report, args.tuning.json, Some(job.id()));
            return Ok(outcome_of(&report));
        }
    };
    let mut report = run_migration_to(
        &options,
        remote.as_ref(),
        args.tuning.json,
        quiet,
        Some((&job, control)),
    )
    .await;
    let job_id = job.id().to_string();
    // The control socket goes before the result is printed: whoever reads the result and
    // lists jobs then no longer sees this one.
    drop(job);
    report.source_qmp_access = endpoint.as_ref().map(|e| e.access);
    drop(endpoint);
    if let (Some(name), true, FinalStatus::Completed) =
        (&args.domain, args.destroy_source, report.status)
    {
        // Completed means the destination confirmed it runs the guest (--dest-paused conflicts).
        if let Err(e) = migration::destroy_domain(&args.connect, name, options.qmp_timeout).await {
            report.warnings.push(format!(
                "--destroy-source: the source domain {name} was not destroyed: {e}"
            ));
        }
    }
    print_report_job(&report, args.tuning.json, Some(&job_id));
    if let Some(path) = &args.result_file
        && let Err(e) = write_result_file(
            path,
            &crate::output::report_json_job(&report, Some(&job_id)),
        )
    {
        // The migration's own outcome stands; the exit code must not lie about it.
        tracing::error!("{e:#}");
    }
    Ok(outcome_of(&report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disk_may_carry_its_copy_mode() {
        assert_eq!(parse_disk("disk0"), Ok(("disk0".into(), None)));
        assert_eq!(
            parse_disk("disk0,copy=top"),
            Ok(("disk0".into(), Some(DiskCopy::Top)))
        );
        assert!(parse_disk("disk0,copy=some").is_err());
        assert!(parse_disk(",copy=top").is_err());
    }

    #[test]
    fn bandwidth_accepts_suffixes_and_unlimited() {
        assert_eq!(parse_bandwidth("500M"), Ok(500 << 20));
        assert_eq!(parse_bandwidth("1g"), Ok(1 << 30));
        assert_eq!(parse_bandwidth("4096"), Ok(4096));
        assert_eq!(parse_bandwidth("unlimited"), Ok(UNLIMITED_BANDWIDTH));
        assert!(parse_bandwidth("0").is_err());
        assert!(parse_bandwidth("12X").is_err());
        assert!(parse_bandwidth("fast").is_err());
    }
}
