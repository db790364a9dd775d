//! `qemu-tls-migrate serve`: the destination host's service.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use qemu_tls_migrate::migration;
use qemu_tls_migrate::peer::DEFAULT_PORT;
use qemu_tls_migrate::pki::DEFAULT_PKI_DIR;
use qemu_tls_migrate::ports::{DEFAULT_RANGE, PortRange};
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
(started with -incoming defer; nothing outside that directory can be named), prepares it \
(credentials, NBD exports, incoming port from --port-range), and finishes or aborts on the \
source's word. If the source goes silent or the connection drops, the destination is torn down \
and its ports released, and the service goes on serving. Several migrations may run at once. \
SIGTERM, SIGINT, SIGHUP or SIGQUIT rolls back running sessions and exits 0.",
    after_help = "Example:\n  qemu-tls-migrate serve --qmp-dir /run/qemu-tls-migrate/incoming \
--allow-client host-a\n\nThe systemd unit qemu-conf/qemu-tls-migrate.service runs it as a \
service. With --json, one line {\"listening\": \"ADDR:PORT\"} is printed on stdout once the \
service accepts connections."
)]
pub struct ServeArgs {
    /// Address and port to listen on (default port 16515, outside the migration range).
    #[arg(long, value_name = "ADDR[:PORT]", default_value_t = format!("0.0.0.0:{DEFAULT_PORT}"))]
    pub listen: String,
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
        value_parser = crate::migrate_cmd::timeout_secs()
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
    /// Start incoming libvirt domains for sources that migrate a domain (`migrate --domain`):
    /// from the XML they send, paused, waiting with -incoming defer and a QMP monitor in
    /// --qmp-dir, with empty disks created for those to be copied (never over an existing
    /// file); destroyed, and the disks deleted, if the migration does not finish.
    #[arg(long)]
    pub libvirt: bool,
    /// libvirt URI for --libvirt.
    #[arg(long, value_name = "URI", default_value = qemu_tls_migrate::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// Print {"listening": "ADDR:PORT"} on stdout once ready.
    #[arg(long)]
    pub json: bool,
}

fn parse_range(s: &str) -> Result<PortRange, String> {
    s.parse()
        .map_err(|e: qemu_tls_migrate::ports::PortError| e.to_string())
}

pub async fn run(args: ServeArgs) -> anyhow::Result<Outcome> {
    let pki_dir = crate::migrate_cmd::absolute_dir(&args.pki_dir)?;
    let mut opts = ServeOptions::new(&args.listen, pki_dir, args.qmp_dir.clone());
    opts.allow_clients = args.allow_clients.clone();
    opts.port_range = args.port_range;
    opts.qmp_timeout = Duration::from_secs(args.qmp_timeout);
    opts.allow_plain = args.allow_plain;
    opts.tls_priority = args.tls_priority.clone();
    opts.max_sessions = args.max_sessions;
    opts.max_handshakes = args.max_handshakes;
    opts.max_handshakes_per_address = args.max_handshakes_per_address;
    opts.libvirt = args.libvirt.then(|| args.connect.clone());
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::migrate_cmd::cancel_on_signal(shutdown.clone()));
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
