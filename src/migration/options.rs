//! What one migration is asked to do: [`MigrationOptions`] as a caller fills them in, and
//! [`ValidOptions`], the only form the library's migrations take, made by
//! [`MigrationOptions::validate`]. Each rule lives once, here, as a function the command
//! line's parsers, the running controls and the destination's checks of a peer's plan call too.

use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use super::convergence::{Convergence, TimeoutAction};
use super::disks::{CopyPlan, DiskSelection};
use super::{
    DEFAULT_QMP_TIMEOUT, DEFAULT_STALL_TIMEOUT, DestDomain, MAX_MULTIFD_CHANNELS, MAX_TIMEOUT,
    MigrationError, TransportChoice, UNLIMITED_BANDWIDTH,
};
use crate::peer::Authz;
use crate::ports::PortRange;
use crate::qemu::CopyMode;
use crate::vm_lock::{VmKey, VmLock};

/// Why compression is refused without multifd.
pub(crate) const COMPRESS_NEEDS_MULTIFD: &str =
    "compression works on multifd channels only: add --multifd N";

/// A migration bandwidth in bytes per second: 1 to [`UNLIMITED_BANDWIDTH`].
pub fn check_bandwidth(bytes_per_s: u64) -> Result<u64, String> {
    if bytes_per_s == 0 || bytes_per_s > UNLIMITED_BANDWIDTH {
        return Err(format!(
            "bandwidth {bytes_per_s} bytes/s: use 1 to {UNLIMITED_BANDWIDTH} (unlimited)"
        ));
    }
    Ok(bytes_per_s)
}

/// A timeout (QMP, stall, the whole migration's): 1 s to [`MAX_TIMEOUT`]; `what` names it.
pub fn check_timeout(what: &str, d: Duration) -> Result<Duration, String> {
    if d < Duration::from_secs(1) || d > MAX_TIMEOUT {
        return Err(format!(
            "{what} {d:?} is outside 1 s to {} s",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
}

/// A pause deadline ([`Convergence::pause_after`]): 1 ms to [`MAX_TIMEOUT`] (CloudStack's
/// `vm.migrate.pauseafter` is in milliseconds).
pub fn check_pause_after(d: Duration) -> Result<Duration, String> {
    if d < Duration::from_millis(1) || d > MAX_TIMEOUT {
        return Err(format!(
            "pause deadline {d:?} is outside 1 ms to {} s (leave it out for none)",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
}

/// The pause deadline against the abort deadline: both may be given, the pause first.
fn check_deadlines(c: &Convergence, timeout: Option<Duration>) -> Result<(), String> {
    let Some(pause) = c.pause_after else {
        return Ok(());
    };
    check_pause_after(pause)?;
    if c.timeout_action == TimeoutAction::Pause {
        return Err(format!(
            "pause deadline {pause:?} with the timeout action pause: both make a pause \
             deadline; give the pause as --pause-after and the abort as --timeout"
        ));
    }
    match timeout {
        Some(t) if pause >= t => Err(format!(
            "pause deadline {pause:?} is not before the migration timeout {t:?}, which would \
             abandon the migration first: pause earlier or give it longer"
        )),
        _ => Ok(()),
    }
}

/// A multifd channel count: 1 to [`MAX_MULTIFD_CHANNELS`].
pub fn check_multifd_channels(n: u8) -> Result<u8, String> {
    if !(1..=MAX_MULTIFD_CHANNELS).contains(&n) {
        return Err(format!(
            "{n} multifd channels: use 1 to {MAX_MULTIFD_CHANNELS}"
        ));
    }
    Ok(n)
}

/// How the RAM stream is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Multifd {
    /// One stream (multifd off).
    #[default]
    Off,
    /// This many parallel channels, each with its own TLS session.
    Channels(u8),
    /// From both hosts' CPU counts ([`super::auto_multifd`]).
    Auto,
}

impl Multifd {
    /// The channels for a pair of hosts with these CPU counts; `None`: one stream.
    pub fn channels(self, source_cpus: u32, dest_cpus: u32) -> Option<u8> {
        match self {
            Multifd::Off => None,
            Multifd::Channels(n) => Some(n),
            Multifd::Auto => super::auto_multifd(source_cpus, dest_cpus),
        }
    }
}

/// One side's QMP socket and PKI directory.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub qmp: PathBuf,
    pub pki_dir: PathBuf,
}

/// A checked description of one migration.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    pub source: Endpoint,
    pub dest: Endpoint,
    /// The destination host's name: what its certificate must carry (unless `tls_hostname`
    /// says otherwise) and, unless `dest_address` is set, where it listens.
    pub dest_host: String,
    /// The address the destination listens on and the source connects to.
    pub dest_address: Option<String>,
    /// `HOST:PORT` the source connects to when it differs from where the destination listens
    /// (NAT, port forwarding, a proxy).
    pub source_connect: Option<crate::addr::Address>,
    pub transport: TransportChoice,
    pub tls_hostname: Option<String>,
    /// GnuTLS priority string for both credentials objects (cipher choice).
    pub tls_priority: Option<String>,
    /// Bytes per second; [`UNLIMITED_BANDWIDTH`] for no limit.
    pub max_bandwidth: u64,
    pub downtime_limit: Option<Duration>,
    /// Parallel RAM channels.
    pub multifd: Multifd,
    pub port_range: PortRange,
    pub qmp_timeout: Duration,
    pub stall_timeout: Duration,
    /// Whole-migration deadline.
    pub timeout: Option<Duration>,
    /// Leave the destination paused after completion (like `virsh migrate --suspend`).
    pub dest_paused: bool,
    /// Disks to copy over NBD before RAM moves (non-shared storage).
    pub disks: DiskSelection,
    /// How mirrors treat guest writes during the copy.
    pub mirror_mode: CopyMode,
    /// Whole chain or top image only, per disk.
    pub disk_copy: CopyPlan,
    /// Bytes per second each disk's mirror may copy (its `speed`); `None`: no limit. RAM's
    /// `max_bandwidth` does not cover disks.
    pub disk_bandwidth: Option<u64>,
    /// Send zeroes as NBD `WRITE_ZEROES` requests (`detect-zeroes: unmap` on the source's NBD
    /// client node) instead of as data; the destination then keeps them sparse too.
    pub skip_zeroes: bool,
    /// `HOST:PORT` the source's NBD clients connect to when it differs from where the
    /// destination's NBD server listens (NAT, a proxy), like `source_connect` for RAM.
    pub nbd_connect: Option<crate::addr::Address>,
    /// Grow an adopted destination volume smaller than the source's disk instead of refusing
    /// (`serve --libvirt` does, before its QEMU opens it: an incoming QEMU cannot resize).
    pub create_dest_disks: bool,
    /// Which source certificate the destination accepts, through an `authz-simple` object
    /// (`tls-authz`).
    pub authz: Authz,
    /// Writable local disks the caller declares shared (reachable from the destination), so
    /// they are neither copied nor refused.
    pub shared_disks: Vec<String>,
    /// Migrate even when writable local disks are neither copied nor declared shared.
    pub allow_unsafe: bool,
    /// Through a service started with `--libvirt`: have it start this incoming domain first.
    pub dest_domain: Option<DestDomain>,
    /// What may help a busy guest's migration finish.
    pub convergence: Convergence,
    /// When convergence is judged: after the first pass (the default: nothing waits), before
    /// starting (a second of sampling the guest), or not at all.
    pub forecast: ForecastWhen,
    /// This run's job id (`migrate --job-id`, or the one the jobs module chose): kept in the
    /// VM's lock ([`crate::vm_lock`]), so that a second run on the same VM is told which run
    /// holds it.
    pub job_id: Option<String>,
    /// When the source is a libvirt domain: its UUID, a key of the VM's lock beside the source
    /// socket (a passthrough socket is private to each run, so it alone would not tell two
    /// runs on one domain apart).
    pub source_domain_uuid: Option<String>,
    /// CloudStack's agent directory on the source's host (`cloud.*`, `agent.properties`):
    /// the source's PKI directory is checked against it before the migration
    /// ([`super::cloudstack`]); `None`: not checked.
    pub source_cloudstack_dir: Option<PathBuf>,
    /// The same for a destination on this host (local mode); a remote destination's service
    /// checks its own.
    pub dest_cloudstack_dir: Option<PathBuf>,
}

impl MigrationOptions {
    /// Options with this tool's defaults for everything but the two sides and the host name.
    pub fn new(source: Endpoint, dest: Endpoint, dest_host: &str) -> MigrationOptions {
        MigrationOptions {
            source,
            dest,
            dest_host: dest_host.to_string(),
            dest_address: None,
            source_connect: None,
            transport: TransportChoice::Auto,
            tls_hostname: None,
            tls_priority: None,
            max_bandwidth: UNLIMITED_BANDWIDTH,
            downtime_limit: None,
            multifd: Multifd::Off,
            port_range: crate::ports::DEFAULT_RANGE,
            qmp_timeout: DEFAULT_QMP_TIMEOUT,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            timeout: None,
            dest_paused: false,
            disks: DiskSelection::None,
            mirror_mode: CopyMode::Background,
            disk_copy: CopyPlan::default(),
            disk_bandwidth: None,
            skip_zeroes: true,
            nbd_connect: None,
            create_dest_disks: false,
            authz: Authz::Off,
            shared_disks: Vec::new(),
            allow_unsafe: false,
            dest_domain: None,
            convergence: Convergence::default(),
            forecast: ForecastWhen::FirstPass,
            job_id: None,
            source_domain_uuid: None,
            // The command line's default is CloudStack's directory; a library caller (the
            // demo, the benches: lab PKIs) asks for the check.
            source_cloudstack_dir: None,
            dest_cloudstack_dir: None,
        }
    }

    /// Checks what the types cannot: timeouts from 1 s to [`MAX_TIMEOUT`], a pause deadline
    /// before the migration's timeout (and not with the timeout action pause), 1 to
    /// [`MAX_MULTIFD_CHANNELS`] multifd channels, a non-zero bandwidth no larger than
    /// [`UNLIMITED_BANDWIDTH`], a port range with `0 < first <= last`, a destination host name.
    /// Every problem is named in one [`MigrationError::BadOptions`] (a refusal: nothing was
    /// touched). The library's migrations take only what this returns, so no caller can skip it.
    pub fn validate(self) -> Result<ValidOptions, MigrationError> {
        let mut problems = Vec::new();
        let mut timeout = |what: &str, d: Duration| {
            if let Err(e) = check_timeout(what, d) {
                problems.push(e);
            }
        };
        timeout("qmp timeout", self.qmp_timeout);
        timeout("stall timeout", self.stall_timeout);
        if let Some(d) = self.timeout {
            timeout("migration timeout", d);
        }
        if let Multifd::Channels(n) = self.multifd
            && let Err(e) = check_multifd_channels(n)
        {
            problems.push(e);
        }
        if let Err(e) = check_bandwidth(self.max_bandwidth) {
            problems.push(e);
        }
        for (what, address) in [
            ("--source-connect", &self.source_connect),
            ("--nbd-connect", &self.nbd_connect),
        ] {
            if let Some(Err(e)) = address.as_ref().map(crate::addr::Address::require_port) {
                problems.push(format!("{what}: {e}"));
            }
        }
        if self.disk_bandwidth == Some(0) {
            problems.push("disk bandwidth 0 bytes/s: leave it out for no limit".into());
        }
        let PortRange { first, last } = self.port_range;
        if first == 0 || last < first {
            problems.push(format!(
                "port range {first}-{last}: expected 0 < FIRST <= LAST"
            ));
        }
        if self.dest_host.trim().is_empty() {
            problems.push("the destination host name is empty".into());
        }
        if self.convergence.postcopy_recover_timeout == Some(Duration::ZERO) {
            problems.push(
                "--postcopy-recover-timeout 0: a cut post-copy needs time to be recovered".into(),
            );
        }
        if let Some(b) = self.convergence.postcopy_bandwidth {
            if let Err(e) = check_bandwidth(b) {
                problems.push(format!("--postcopy-bandwidth: {e}"));
            } else if !self.convergence.wants_postcopy() {
                problems.push(
                    "--postcopy-bandwidth without --postcopy or --timeout-action postcopy: \
                     it would never act"
                        .into(),
                );
            }
        }
        if let Err(e) = check_deadlines(&self.convergence, self.timeout) {
            problems.push(e);
        }
        if self.convergence.compress.is_some() && self.multifd == Multifd::Off {
            problems.push(COMPRESS_NEEDS_MULTIFD.into());
        }
        if problems.is_empty() {
            Ok(ValidOptions(self))
        } else {
            Err(MigrationError::BadOptions {
                what: problems.join("; "),
            })
        }
    }

    /// The name the destination's certificate is checked against.
    pub fn effective_tls_hostname(&self) -> &str {
        self.tls_hostname.as_deref().unwrap_or(&self.dest_host)
    }

    /// Where the destination listens.
    pub fn listen_address(&self) -> &str {
        self.dest_address.as_deref().unwrap_or(&self.dest_host)
    }

    /// Where the source connects to reach the destination's ports.
    pub fn connect_host(&self) -> &str {
        self.listen_address()
    }

    /// Where the source's NBD clients connect for a server on `port`: `nbd_connect` when set
    /// (checked by [`MigrationOptions::validate`]), else the destination's address.
    pub(crate) fn nbd_server(&self, port: u16) -> crate::qemu::InetAddress {
        match &self.nbd_connect {
            Some(a) => crate::qemu::InetAddress::new(&a.host, a.port_or(port)),
            None => crate::qemu::InetAddress::new(self.connect_host(), port),
        }
    }
}

/// When a migration judges whether it will converge as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForecastWhen {
    /// From QEMU's own figures once the first pass is over (its dirty-page rate, the
    /// throughput it reached): data starts moving at once.
    #[default]
    FirstPass,
    /// Before anything starts: a second of sampling the guest's dirty rate and its RAM, with
    /// the throughput the cap or the reference machine gives (what `--plan` shows).
    Before,
    /// Not at all.
    Off,
}

/// [`MigrationOptions`] that passed [`MigrationOptions::validate`]; read through `Deref`.
#[derive(Debug, Clone)]
pub struct ValidOptions(MigrationOptions);

impl Deref for ValidOptions {
    type Target = MigrationOptions;
    fn deref(&self) -> &MigrationOptions {
        &self.0
    }
}

impl ValidOptions {
    /// Takes the lock of the source VM (its socket, and its domain's UUID when it is one) for
    /// this run: a run that holds it is the only one driving that VM. Changes nothing.
    pub(crate) fn lock_source(&self) -> Result<VmLock, MigrationError> {
        let mut keys = vec![VmKey::socket(&self.source.qmp)];
        keys.extend(self.source_domain_uuid.as_deref().map(VmKey::domain));
        Ok(VmLock::acquire(&keys, self.job_id.as_deref())?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Endpoint;
    use super::*;

    fn options() -> MigrationOptions {
        let side = |name: &str| Endpoint {
            qmp: PathBuf::from(format!("/run/{name}.sock")),
            pki_dir: PathBuf::from("/etc/pki/qemu"),
        };
        MigrationOptions::new(side("src"), side("dst"), "host-b")
    }

    #[test]
    fn validate_accepts_the_defaults_and_the_bounds() {
        let mut o = options();
        o.clone().validate().expect("defaults");
        o.qmp_timeout = MAX_TIMEOUT;
        o.stall_timeout = Duration::from_secs(1);
        o.timeout = Some(MAX_TIMEOUT);
        o.multifd = Multifd::Channels(64);

        o.validate().expect("bounds");
    }

    #[test]
    fn validate_refuses_each_bad_option_naming_it_as_a_usage_refusal() {
        type Spoil = fn(&mut MigrationOptions);
        let cases: [(&str, Spoil); 16] = [
            ("qmp timeout", |o| o.qmp_timeout = Duration::ZERO),
            ("qmp timeout", |o| o.qmp_timeout = Duration::MAX),
            ("stall timeout", |o| o.stall_timeout = Duration::ZERO),
            ("migration timeout", |o| o.timeout = Some(Duration::ZERO)),
            ("migration timeout", |o| {
                o.timeout = Some(MAX_TIMEOUT + Duration::from_secs(1))
            }),
            ("migration timeout 500ms", |o| {
                o.timeout = Some(Duration::from_millis(500))
            }),
            ("pause deadline 0ns", |o| {
                o.convergence.pause_after = Some(Duration::ZERO)
            }),
            (
                "pause deadline 600s is not before the migration timeout 600s",
                |o| {
                    o.convergence.pause_after = Some(Duration::from_secs(600));
                    o.timeout = Some(Duration::from_secs(600));
                },
            ),
            ("timeout action pause", |o| {
                o.convergence.pause_after = Some(Duration::from_secs(30));
                o.convergence.timeout_action = TimeoutAction::Pause;
            }),
            ("multifd", |o| o.multifd = Multifd::Channels(0)),
            ("multifd", |o| o.multifd = Multifd::Channels(65)),
            ("bandwidth", |o| o.max_bandwidth = 0),
            ("--postcopy-bandwidth: bandwidth 0", |o| {
                o.convergence.postcopy = true;
                o.convergence.postcopy_bandwidth = Some(0);
            }),
            ("--postcopy-bandwidth without --postcopy", |o| {
                o.convergence.postcopy_bandwidth = Some(1 << 20)
            }),
            ("port range", |o| {
                o.port_range = PortRange {
                    first: 50000,
                    last: 49999,
                }
            }),
            ("destination host", |o| o.dest_host = " ".into()),
        ];
        for (what, spoil) in cases {
            let mut o = options();
            spoil(&mut o);

            let err = o.validate().map(drop).expect_err(what);

            assert!(matches!(err, MigrationError::BadOptions { .. }), "{err}");
            assert_eq!(err.kind(), "usage");
            assert_eq!(err.kind(), "usage", "{err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn a_pause_deadline_and_a_later_abort_deadline_go_together() {
        let mut o = options();
        o.convergence.pause_after = Some(Duration::from_millis(30_000));
        o.timeout = Some(Duration::from_secs(600));
        o.clone().validate().expect("pause at 30 s, abort at 600 s");
        o.timeout = None;
        o.clone().validate().expect("a pause deadline alone");
        o.convergence.pause_after = Some(Duration::from_millis(1));
        o.validate().expect("as short as 1 ms");
    }

    #[test]
    fn an_address_to_connect_to_needs_a_port() {
        let mut o = options();
        o.source_connect = Some("198.18.0.1".parse().expect("address"));

        let err = o.validate().map(drop).expect_err("no port");

        assert!(err.to_string().contains("--source-connect"), "{err}");
    }
}
