//! The options every command that runs a migration takes (`migrate`, `demo`): transport,
//! bandwidth, timeouts, multifd, and the convergence aids; and how they fill in
//! [`MigrationOptions`].

use std::time::Duration;

use clap::{Args, ValueEnum};
use qemu_tls_migrate::migration::{
    self, Compression, Convergence, DowntimeSteps, ForecastWhen, MigrationOptions, Multifd, OnNoGo,
    Throttle, TimeoutAction, TransportChoice, UNLIMITED_BANDWIDTH, XbzrleCache,
};
use qemu_tls_migrate::ports::{DEFAULT_RANGE, PortRange};

use crate::parse::{
    parse_bandwidth, parse_multifd, parse_pause_after, parse_range, parse_timeout, timeout_secs,
};

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
    /// (powers of 1024), or "unlimited" (or 0, as CloudStack's vm.migrate.speed 0 means). QEMU
    /// 7.2's own default would be 128M.
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
    pub multifd: Option<Multifd>,
    /// GnuTLS priority string for both ends, to choose ciphers (e.g.
    /// "NORMAL:-CIPHER-ALL:+AES-128-GCM").
    #[arg(long, value_name = "PRIORITY")]
    pub tls_priority: Option<String>,
    /// Ports for the migration stream are taken from this range (FIRST-LAST).
    #[arg(long, default_value_t = DEFAULT_RANGE, value_parser = parse_range)]
    pub port_range: PortRange,
    /// Give up (roll back; the source runs on) when the migration has not completed after
    /// DURATION: a number of seconds, or with a unit: 30000ms, 600s, 10m, 2h (1 s to a week).
    /// With --pause-after, the guest is paused first and this still aborts.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
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
    /// pass after. Under KVM and TCG alike (QEMU 7.2's TCG can miss writes of a guest that
    /// never flushes its TLB in any migration of more than one pass, with this or without:
    /// see the README).
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
    /// on) or pause (pause the guest so the rest moves as downtime; the report's guest_pause
    /// says for how long) or postcopy (switch to post-copy, as --postcopy does but only at the
    /// deadline; same conditions and risk). For a pause and a later abort, use --pause-after
    /// with --timeout.
    #[arg(long, value_enum, default_value = "abort")]
    pub timeout_action: TimeoutActionArg,
    /// Pause the guest DURATION after the migration started, so the rest moves as downtime
    /// (CloudStack's vm.migrate.pauseafter, in milliseconds: --pause-after 30000ms), while
    /// --timeout, which must be later, still aborts: e.g. --pause-after 30000ms --timeout 600s.
    /// A number of seconds, or with a unit: ms, s, m, h; 0: no pause. Acts in the RAM phase
    /// (at its start when it passed during the disk copy). Not with --timeout-action pause.
    #[arg(long, value_name = "DURATION", value_parser = parse_pause_after)]
    pub pause_after: Option<Duration>,
    /// A deadline of SECS per GiB of guest RAM plus copied disk (like KubeVirt's
    /// completionTimeoutPerGiB); with --timeout too, the earlier one holds.
    #[arg(long, value_name = "SECS", value_parser = timeout_secs())]
    pub completion_timeout_per_gib: Option<u64>,
    /// Post-copy, an explicit opt-in: switch to post-copy once QEMU's first pass over the RAM
    /// is over (libvirt's --postcopy-after-precopy), so a guest that dirties memory faster
    /// than the link moves it still finishes, without pausing it. Needs QEMU 9.1 or later on
    /// both ends and a destination driven by this process (--dest-qmp), with no disk to copy;
    /// refused otherwise (exit 3, nothing changed; QEMU 7.2 is refused). Its TLS is kept at
    /// version 1.2 (QEMU issue #1937: GnuTLS's TLS 1.3 rekey breaks a channel with a return
    /// path; no QEMU release fixes it). The risk that stays: the guest then runs on the
    /// destination while part of its memory is still on the source; a cut link pauses it on
    /// both ends and the tool retries the recovery until --postcopy-recover-timeout, but a
    /// lost host (either one) loses the VM. The source is never resumed once post-copy began.
    /// A no-go verdict after the first pass is then not acted on (--on-no-go): post-copy is
    /// the remedy. A post-copy that moves nothing for --stall-timeout (a link that drops
    /// packets) is paused and recovered; once post-copy began, a cancellation is noted and
    /// the migration finished.
    #[arg(long)]
    pub postcopy: bool,
    /// How long a post-copy whose link was cut is retried (migrate-recover on the destination,
    /// migrate resume=true on the source) before the tool gives up and reports both ends
    /// paused (default 300 s). A number of seconds, or with a unit: ms, s, m, h.
    #[arg(long, value_name = "DURATION", value_parser = parse_pause_after)]
    pub postcopy_recover_timeout: Option<Duration>,
    /// Bandwidth cap of the RAM stream once post-copy started (QEMU's max-postcopy-bandwidth;
    /// libvirt's --postcopy-bandwidth, here in bytes per second with an optional K/M/G
    /// suffix), so post-copy leaves room on a shared link. Default unlimited: the pages still
    /// on the source move as fast as the link allows, since the guest, now on the
    /// destination, waits on each one it touches and a lost host loses the VM until they
    /// are all over. Only with --postcopy or --timeout-action postcopy.
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth)]
    pub postcopy_bandwidth: Option<u64>,
    /// When to judge whether the migration converges as configured. first-pass (default):
    /// data moves at once, and the verdict comes from QEMU's own figures once its first pass
    /// over the RAM is over (the throughput this host and link reached, the guest's dirty
    /// rate). before: a second of sampling the guest before anything starts (what --plan
    /// shows; the throughput is --max-bandwidth or a reference figure). off: no verdict. The
    /// report's "forecast" says which was made, next to the measured time.
    #[arg(long, value_enum, default_value = "first-pass", value_name = "WHEN")]
    pub forecast: ForecastArg,
    /// Same as --forecast off.
    #[arg(long, conflicts_with = "forecast")]
    pub no_forecast: bool,
    /// What a no-go verdict leads to: warn (the report says so, the migration goes on under
    /// --timeout and --timeout-action), pause (pause the guest so the rest moves as downtime,
    /// like --timeout-action pause), or abort (cancel and roll back, kind no-go, exit 1; the
    /// source runs on).
    #[arg(long, value_enum, default_value = "warn", value_name = "ACTION")]
    pub on_no_go: OnNoGoArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForecastArg {
    FirstPass,
    Before,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnNoGoArg {
    Warn,
    Pause,
    Abort,
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
            on_no_go: match self.on_no_go {
                OnNoGoArg::Warn => OnNoGo::Warn,
                OnNoGoArg::Pause => OnNoGo::Pause,
                OnNoGoArg::Abort => OnNoGo::Abort,
            },
            pause_after: self.pause_after.filter(|d| !d.is_zero()),
            postcopy: self.postcopy,
            postcopy_recover_timeout: self.postcopy_recover_timeout,
            postcopy_bandwidth: self
                .postcopy_bandwidth
                .filter(|&b| b != UNLIMITED_BANDWIDTH),
            completion_timeout_per_gib: self.completion_timeout_per_gib.map(Duration::from_secs),
        }
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
        if let Some(multifd) = self.multifd {
            o.multifd = multifd;
        }
        o.tls_priority = self.tls_priority.clone();
        o.port_range = self.port_range;
        o.timeout = self.timeout;
        o.stall_timeout = Duration::from_secs(self.stall_timeout);
        o.qmp_timeout = Duration::from_secs(self.qmp_timeout);
        o.convergence = self.convergence.to_convergence();
        o.forecast = match self.convergence.forecast {
            _ if self.convergence.no_forecast => ForecastWhen::Off,
            ForecastArg::FirstPass => ForecastWhen::FirstPass,
            ForecastArg::Before => ForecastWhen::Before,
            ForecastArg::Off => ForecastWhen::Off,
        };
    }
}
