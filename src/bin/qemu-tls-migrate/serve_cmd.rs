//! `qemu-tls-migrate serve`: the destination host's service.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use qemu_tls_migrate::addr::Address;
use qemu_tls_migrate::migration;
use qemu_tls_migrate::peer::DEFAULT_PORT;
use qemu_tls_migrate::pki::DEFAULT_PKI_DIR;
use qemu_tls_migrate::ports::{DEFAULT_RANGE, PortRange};
use qemu_tls_migrate::service::incoming::IncomingOptions;
use qemu_tls_migrate::service::{
    self, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_HANDSHAKES_PER_ADDRESS, DEFAULT_MAX_SESSIONS,
    ServeOptions,
};
use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;

#[derive(Debug, Args)]
#[command(
    long_about = "Serve migrations into this host. Sources connect with `qemu-tls-migrate migrate \
--to THIS-HOST --dest-qmp NAME`, over mutual TLS: this service presents the host's server \
certificate and requires a client certificate from the same CA (--allow-client narrows which \
names). For each source it attaches to the destination QEMU whose QMP socket is NAME in --qmp-dir \
(started with -incoming defer; nothing outside that directory can be named; the first session \
to name a socket holds it until it ends, and another gets `busy`), prepares it \
(credentials, NBD exports, incoming port from --port-range), and finishes or aborts on the \
source's word. If the source goes silent or the connection drops, the destination is torn down \
and its ports released, and the service goes on serving. Several migrations may run at once. \
SIGTERM, SIGINT, SIGHUP or SIGQUIT rolls back running sessions and exits 0. With --libvirt, \
the service starts incoming domains itself, built from what it allows (see --libvirt), with \
disks only in --storage-dir and --shared-dir, and records them in --state-dir: on start-up, \
before accepting connections, it rolls back the domains and disks a killed predecessor left.",
    after_help = "Example:\n  qemu-tls-migrate serve --qmp-dir /run/qemu-tls-migrate/incoming \
--allow-client host-a\n  qemu-tls-migrate serve --libvirt --storage-dir /mnt/PRIMARY-POOL \
--graphics-listen 10.1.1.5 --allow-client host-a\n\nThe systemd unit qemu-tls-migrate.service (the Debian \
package's; qemu-conf/ in the source) runs it as a service, with the options in SERVE_ARGS of \
/etc/default/qemu-tls-migrate. With --json, one line {\"listening\": \"ADDR:PORT\"} is printed on stdout once the \
service accepts connections."
)]
pub struct ServeArgs {
    /// Address and port to listen on (default port 16515, outside the migration range).
    #[arg(long, value_name = "ADDR[:PORT]", default_value_t = default_listen())]
    pub listen: Address,
    /// This host's PKI directory (server certificate for sources, and for QEMU).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
    pub pki_dir: PathBuf,
    /// Directory of the destination QEMUs' QMP sockets; sources name a socket by file name.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/qemu-tls-migrate/incoming"
    )]
    pub qmp_dir: PathBuf,
    /// Accept only sources whose certificate carries this name (repeat for several).
    #[arg(long = "allow-client", value_name = "NAME")]
    pub allow_clients: Vec<String>,
    /// Migration and NBD ports come from this range.
    #[arg(long, default_value_t = DEFAULT_RANGE, value_parser = parse_range)]
    pub port_range: PortRange,
    /// Timeout for each QMP command, in seconds.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = migration::DEFAULT_QMP_TIMEOUT.as_secs(),
        value_parser = crate::parse::timeout_secs()
    )]
    pub qmp_timeout: u64,
    /// Accept migrations in plain TCP (unencrypted RAM and a writable NBD export on the
    /// network) from sources that ask for them; each is logged. Without it they are refused.
    #[arg(long)]
    pub allow_plain: bool,
    /// GnuTLS priority string for the destination's TLS credentials (cipher floor); sources
    /// cannot choose it. Default: GnuTLS's own default.
    #[arg(long, value_name = "PRIORITY")]
    pub tls_priority: Option<String>,
    /// Most sources served at once; more connections are closed at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SESSIONS)]
    pub max_sessions: usize,
    /// Most TLS handshakes in flight at once; when all are taken, one pending for over a
    /// second is cut short for a newcomer. More connections are told the service is busy.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES)]
    pub max_handshakes: usize,
    /// Most TLS handshakes in flight at once from one source address.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HANDSHAKES_PER_ADDRESS)]
    pub max_handshakes_per_address: usize,
    /// Start incoming libvirt domains for sources that migrate a domain (`migrate --domain`).
    /// The service builds each from the parts of the source's XML it allows (memory, vCPUs,
    /// CPU model, os, features, clock, file disks, controllers, interfaces on a bridge or
    /// network that exists here, pty serial/console, graphics, video, input, guest-agent and
    /// SPICE channels, rng from /dev/urandom, memballoon, watchdog) and refuses anything else
    /// by name (bad-request): <qemu:commandline> arguments, <seclabel>, <hostdev>,
    /// <filesystem>, block or network disks, another <emulator>, ... It starts the domain
    /// paused, waiting with -incoming defer and a QMP monitor of its own in --libvirt-qmp-dir,
    /// with empty disks created for those to be copied (inside a --storage-dir, never over an
    /// existing file); destroyed, and the disks deleted, if the migration does not finish.
    #[arg(long)]
    pub libvirt: bool,
    /// With --libvirt: disks the service creates must lie in this directory once resolved
    /// (`..` and symbolic links); repeat for several (CloudStack's primary-storage mount
    /// points).
    #[arg(long = "storage-dir", value_name = "DIR", requires = "libvirt")]
    pub storage_dirs: Vec<PathBuf>,
    /// With --libvirt: disks the incoming domain uses without a copy (shared storage, ISOs)
    /// must lie in this directory; repeat for several.
    #[arg(long = "shared-dir", value_name = "DIR", requires = "libvirt")]
    pub shared_dirs: Vec<PathBuf>,
    /// With --libvirt: kernels, initrds and firmware an incoming domain boots must lie in this
    /// directory; repeat for several. Without it, a domain naming one is refused.
    #[arg(long = "boot-dir", value_name = "DIR", requires = "libvirt")]
    pub boot_dirs: Vec<PathBuf>,
    /// With --libvirt: the address an incoming domain's VNC or SPICE graphics listen on,
    /// whatever the source's XML says (ports chosen by libvirt).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = service::incoming::DEFAULT_GRAPHICS_LISTEN,
        requires = "libvirt"
    )]
    pub graphics_listen: String,
    /// With --libvirt: where the service records the incoming domains and disks it makes, so
    /// that after a crash the next start rolls back what was left, before accepting
    /// connections (created mode 0700).
    #[arg(
        long,
        value_name = "DIR",
        default_value = service::incoming::DEFAULT_STATE_DIR,
        requires = "libvirt"
    )]
    pub state_dir: PathBuf,
    /// With --libvirt: where incoming domains' QMP sockets are made, under names the service
    /// chooses; writable only by the service and QEMU's group (created mode 0770). Must not be
    /// --qmp-dir.
    #[arg(
        long,
        value_name = "DIR",
        default_value = service::incoming::DEFAULT_SOCKET_DIR,
        requires = "libvirt"
    )]
    pub libvirt_qmp_dir: PathBuf,
    /// With --libvirt: the group libvirt's QEMU runs in (default: libvirt-qemu, or qemu).
    #[arg(long, value_name = "GROUP", requires = "libvirt")]
    pub qemu_group: Option<String>,
    /// libvirt URI for --libvirt.
    #[arg(long, value_name = "URI", default_value = qemu_tls_migrate::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// Testing only: reach incoming domains' QMP sockets through files of the same names in
    /// DIR (proxies a test puts there).
    #[arg(long, value_name = "DIR", hide = true, requires = "libvirt")]
    pub qmp_interpose_dir: Option<PathBuf>,
    /// Print {"listening": "ADDR:PORT"} on stdout once ready.
    #[arg(long)]
    pub json: bool,
}

fn parse_range(s: &str) -> Result<PortRange, String> {
    s.parse()
        .map_err(|e: qemu_tls_migrate::ports::PortError| e.to_string())
}

pub async fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let pki_dir = crate::parse::absolute_dir(&args.pki_dir)?;
    let mut opts = ServeOptions::new(args.listen.clone(), pki_dir, args.qmp_dir.clone());
    opts.allow_clients = args.allow_clients.clone();
    opts.port_range = args.port_range;
    opts.qmp_timeout = Duration::from_secs(args.qmp_timeout);
    opts.allow_plain = args.allow_plain;
    opts.tls_priority = args.tls_priority.clone();
    opts.max_sessions = args.max_sessions;
    opts.max_handshakes = args.max_handshakes;
    opts.max_handshakes_per_address = args.max_handshakes_per_address;
    opts.libvirt = args.libvirt.then(|| args.connect.clone());
    opts.qmp_interpose_dir = args.qmp_interpose_dir.clone();
    opts.incoming = IncomingOptions {
        storage_dirs: args.storage_dirs.clone(),
        shared_dirs: args.shared_dirs.clone(),
        boot_dirs: args.boot_dirs.clone(),
        graphics_listen: args.graphics_listen.clone(),
        state_dir: args.state_dir.clone(),
        socket_dir: args.libvirt_qmp_dir.clone(),
        qemu_group: args.qemu_group.clone(),
    };
    // Before serving: what interrupted migrations of this host's VMs left (their journals).
    for recovery in qemu_tls_migrate::migration::recover::recover_all(opts.qmp_timeout).await {
        match recovery {
            Ok(r) => tracing::warn!("{}", r.describe()),
            Err(e) => tracing::error!("{}", crate::output::error_chain(&e).join(": ")),
        }
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::signals::cancel_on_signal(shutdown.clone()));
    let json = args.json;
    service::serve(&opts, shutdown, |addr| {
        if json {
            println!("{}", serde_json::json!({ "listening": addr.to_string() }));
        } else {
            tracing::warn!("listening on {addr}");
        }
    })
    .await?;
    Ok(Outcome::Success)
}

/// Every address of this host, on the service's own port.
fn default_listen() -> Address {
    Address {
        host: "0.0.0.0".into(),
        port: Some(DEFAULT_PORT),
    }
}
