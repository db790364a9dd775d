//! The destination host's service (`qemu-tls-migrate serve`): accepts sources over the mutual-TLS
//! control channel of [`crate::peer`] and runs one [`session`] per connection, each driving a
//! destination QEMU through [`crate::migration::DestinationSide`].
//!
//! The accept loop keeps the service alive against its peers:
//! 1. at most [`ServeOptions::max_sessions`] sessions and [`ServeOptions::max_handshakes`]
//!    TLS handshakes at once, at most [`ServeOptions::max_handshakes_per_address`] of them from
//!    one source address, each with [`session::HANDSHAKE_TIMEOUT`]; when all handshake slots
//!    are taken the oldest stalled one is cut short ([`limits`]); a connection over a limit
//!    gets [`peer::BUSY_ALERT`] (so its source reports a busy service) and is closed at once;
//! 2. a failing `accept` (out of file descriptors, say) backs off instead of spinning;
//! 3. every send to a peer has a time limit ([`crate::peer::SEND_TIMEOUT`]), so neither a
//!    session nor shutdown can be held up by a peer that stops reading;
//! 4. on shutdown each session rolls back what it prepared (a `finish` already under way is
//!    completed: the source has handed the VM over) and the loop returns.
//!
//! The service, not the source, decides what its host accepts: plain TCP only with
//! `--allow-plain`, its own GnuTLS priority, its own listen address and port range, and, when
//! `--allow-client` restricts the control channel, the same restriction on the migration stream
//! and the NBD server (`tls-authz` for the certificate the source presented).

pub mod adopt;
pub mod allowed;
pub mod held;
pub mod incoming;
pub mod limits;
pub mod records;
pub mod session;
pub mod storage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::peer::{self, PeerError};
use crate::ports::PortRange;

/// How long a session waits for [`ServeOptions::qmp_interpose_dir`]'s socket to appear.
pub const INTERPOSE_WAIT: Duration = Duration::from_secs(30);

/// Sessions served at once unless told otherwise.
pub const DEFAULT_MAX_SESSIONS: usize = 16;
/// TLS handshakes in flight at once unless told otherwise.
pub const DEFAULT_MAX_HANDSHAKES: usize = 8;
/// TLS handshakes in flight at once from one source address unless told otherwise: a source
/// host opens one connection per migration, and retries a few times when told the service is
/// busy, so a burst of migrations from one host gets through one after another.
pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 2;
/// Longest pause after a failed `accept`.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Settings of the destination host's service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Where to listen (the port defaults to [`crate::peer::DEFAULT_PORT`]).
    pub listen: crate::addr::Address,
    pub pki_dir: PathBuf,
    /// CloudStack's agent directory: before each migration is accepted, `pki_dir` is made to
    /// follow its current certificates ([`crate::migration::cloudstack::follow`]); `None` (the
    /// default here; `serve`'s is CloudStack's directory): not checked.
    pub cloudstack_dir: Option<PathBuf>,
    /// Only QMP sockets in this directory can be named by a source.
    pub qmp_dir: PathBuf,
    /// Certificate names allowed to connect; empty: any certificate from the CA. When set, the
    /// migration stream and NBD server accept only the certificate the source presented.
    pub allow_clients: Vec<String>,
    pub port_range: PortRange,
    pub qmp_timeout: Duration,
    /// Accept migrations without TLS (each one is logged). Off: a plan without TLS is refused.
    pub allow_plain: bool,
    /// GnuTLS priority string for the destination's credentials, whatever a source asks for;
    /// `None`: GnuTLS's default.
    pub tls_priority: Option<String>,
    pub max_sessions: usize,
    pub max_handshakes: usize,
    pub max_handshakes_per_address: usize,
    /// Manage incoming libvirt domains at this URI (`--libvirt`): a source may ask the
    /// service to start its domain here.
    pub libvirt: Option<String>,
    /// With `libvirt`: what an incoming domain may use here, and where the service keeps its
    /// sockets and records.
    pub incoming: incoming::IncomingOptions,
    /// A test seam, never needed in production: reach each incoming domain's QMP socket
    /// through the file of the same name in this directory (a proxy a test puts there, to
    /// lose replies on cue), waited for up to [`INTERPOSE_WAIT`]. Only the operator sets it.
    pub qmp_interpose_dir: Option<PathBuf>,
    /// The QMP sockets the sessions hold (shared by every session of one service).
    pub(crate) held: held::HeldSockets,
    /// With `libvirt`: what [`serve`] prepared from `incoming` before accepting connections.
    pub(crate) prepared: Option<Arc<incoming::Host>>,
}

impl ServeOptions {
    /// Options with this service's defaults for everything but where it listens, its PKI and
    /// its QMP directory.
    pub fn new(listen: crate::addr::Address, pki_dir: PathBuf, qmp_dir: PathBuf) -> ServeOptions {
        ServeOptions {
            listen,
            pki_dir,
            cloudstack_dir: None,
            qmp_dir,
            allow_clients: Vec::new(),
            port_range: crate::ports::DEFAULT_RANGE,
            qmp_timeout: crate::migration::DEFAULT_QMP_TIMEOUT,
            allow_plain: false,
            tls_priority: None,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            libvirt: None,
            qmp_interpose_dir: None,
            incoming: incoming::IncomingOptions::default(),
            held: held::HeldSockets::default(),
            prepared: None,
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("cannot load the service's TLS credentials")]
    Credentials(#[source] PeerError),
    #[error("cannot serve incoming libvirt domains")]
    Incoming(#[source] incoming::SetupError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the service until `shutdown` is cancelled: accepts sources, one session per
/// connection, several at once. On shutdown, running sessions roll back and end.
pub async fn serve(
    opts: &ServeOptions,
    shutdown: CancellationToken,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<(), ServiceError> {
    let config = peer::server_config(&opts.pki_dir, &opts.allow_clients)
        .map_err(ServiceError::Credentials)?;
    let mut opts = opts.clone();
    if let Some(uri) = &opts.libvirt {
        // Before any source can connect: what an earlier run left is rolled back first.
        let host = Arc::new(
            incoming::prepare(uri, &opts.incoming, &opts.qmp_dir)
                .map_err(ServiceError::Incoming)?,
        );
        for problem in incoming::recover(host.clone()).await {
            tracing::warn!("{problem}");
        }
        opts.prepared = Some(host);
    }
    let listen = peer::with_default_port(&opts.listen);
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|source| ServiceError::Listen {
            addr: listen.clone(),
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving migrations");
        on_listening(addr);
    }
    if opts.allow_plain {
        tracing::warn!("--allow-plain: sources may migrate into this host without TLS");
    }
    let acceptor = TlsAcceptor::from(config);
    let opts = Arc::new(opts);
    let sessions_free = Arc::new(Semaphore::new(opts.max_sessions.max(1)));
    let handshakes = limits::Handshakes::new(opts.max_handshakes, opts.max_handshakes_per_address);
    let mut sessions = tokio::task::JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(a) => {
                        backoff = Duration::from_millis(10);
                        a
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}; pausing {backoff:?}");
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                };
                let Ok(session_permit) = sessions_free.clone().try_acquire_owned() else {
                    tracing::warn!(%remote, limit = opts.max_sessions, "too many sessions: connection refused as busy");
                    refuse_busy(tcp);
                    continue;
                };
                let slot = match handshakes.admit(remote.ip(), Instant::now()) {
                    Ok(slot) => slot,
                    Err(refusal) => {
                        tracing::warn!(%remote, ?refusal, "too many TLS handshakes in flight: connection refused as busy");
                        refuse_busy(tcp);
                        continue;
                    }
                };
                let (acceptor, opts, stop) = (acceptor.clone(), opts.clone(), shutdown.clone());
                sessions.spawn(async move {
                    let _session_permit = session_permit;
                    if let Err(e) = session::run(tcp, acceptor, slot, &opts, stop).await {
                        tracing::warn!(%remote, "session ended: {e}");
                    }
                });
            }
            // Reap finished sessions as they end.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    tracing::info!("shutting down: rolling back running sessions");
    while sessions.join_next().await.is_some() {}
    Ok(())
}

/// Tells a connection the service will not serve that it is busy ([`peer::BUSY_ALERT`]) and
/// closes it, never waiting on it: the alert fits a fresh socket's send buffer, and what the
/// peer already sent is read first so that closing sends a FIN, not a reset that could discard
/// the alert on its way.
fn refuse_busy(tcp: TcpStream) {
    let _ = tcp.try_write(&peer::BUSY_ALERT);
    let mut sink = [0u8; 2048];
    for _ in 0..8 {
        if !matches!(tcp.try_read(&mut sink), Ok(n) if n > 0) {
            break;
        }
    }
    // Half-closed, so the FIN follows the alert at once.
    if let Ok(tcp) = tcp.into_std() {
        let _ = tcp.shutdown(std::net::Shutdown::Write);
    }
}

/// This host's name, as the service introduces itself.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
