//! Migration between two hosts: the destination host's service ([`serve`]) and the source's
//! [`RemoteDestination`], joined by the control channel of [`crate::peer`].
//!
//! One session, as the source drives it:
//! 1. TLS (both ends authenticated), `hello` → `welcome` (is the service's host secured?).
//! 2. `preflight {qmp, plan}`: the service attaches to `--qmp-dir/qmp` and checks, changing
//!    nothing → `preflighted` or `error {refusal: true}`.
//! 3. `prepare` → `prepared {ports}`; from here the destination is changed.
//! 4. While RAM and disks move: `ping`/`pong` every second; `gone` if the destination QEMU
//!    exits.
//! 5. `finish {resume}` → `finished`, or `abort` → `aborted`.
//!
//! Either side that loses the channel (closed, or silent for the heartbeat timeout) rolls back
//! on its own: the service tears the destination down and releases its ports, the source
//! cancels and resumes its VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::MigrationError;
use super::destination::{DestPlan, DestPrepared, DestinationSide};
use super::driver::Destination;
use crate::peer::{
    self, Channel, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, Message, PeerError, PeerIdentity,
};
use crate::pki::{self, Role, Security};
use crate::ports::PortRange;

/// How long a request to the service may take (preparing includes NBD and credential checks;
/// finishing includes the destination loading the last of the state).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a new connection has to finish the TLS handshake and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a source finds a destination host's service.
#[derive(Debug, Clone)]
pub struct RemoteTarget {
    /// `HOST[:PORT]` of the service.
    pub address: String,
    /// The name the service's certificate must carry (the destination host's name).
    pub server_name: String,
    /// The QMP socket's file name in the service's `--qmp-dir`.
    pub qmp: String,
    /// The source host's PKI directory (its client certificate).
    pub pki_dir: PathBuf,
}

/// The destination side, reached through the destination host's service.
pub struct RemoteDestination {
    to_service: mpsc::UnboundedSender<Message>,
    from_service: mpsc::UnboundedReceiver<Result<Message, PeerError>>,
    qmp: String,
    /// Why the channel or the destination was lost, once it was.
    lost: Option<String>,
    /// The service's answer to `hello`: is its host secured?
    pub remote_security: Security,
    pub server: String,
}

impl std::fmt::Debug for RemoteDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteDestination")
            .field("server", &self.server)
            .field("qmp", &self.qmp)
            .finish_non_exhaustive()
    }
}

fn remote_error(e: PeerError) -> MigrationError {
    MigrationError::Remote {
        kind: e.kind().to_string(),
        message: e.to_string(),
        refusal: false,
    }
}

impl RemoteDestination {
    /// Connects to the service with mutual TLS and says hello.
    pub async fn connect(target: &RemoteTarget) -> Result<RemoteDestination, MigrationError> {
        let address = peer::with_default_port(&target.address);
        let config = peer::client_config(&target.pki_dir).map_err(|e| MigrationError::Remote {
            kind: "credentials".into(),
            message: e.to_string(),
            refusal: true,
        })?;
        let refusal = |e: PeerError| MigrationError::Remote {
            kind: "connect".into(),
            message: e.to_string(),
            refusal: true,
        };
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&address))
            .await
            .map_err(|_| refusal(PeerError::Silent(HANDSHAKE_TIMEOUT)))?
            .map_err(|source| {
                refusal(PeerError::Connect {
                    addr: address.clone(),
                    source,
                })
            })?;
        let name =
            rustls::pki_types::ServerName::try_from(target.server_name.clone()).map_err(|e| {
                MigrationError::Remote {
                    kind: "usage".into(),
                    message: format!("bad destination host name {:?}: {e}", target.server_name),
                    refusal: true,
                }
            })?;
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| refusal(PeerError::Silent(HANDSHAKE_TIMEOUT)))?
        .map_err(|source| {
            refusal(PeerError::Tls {
                peer: address.clone(),
                source,
            })
        })?;
        let mut channel = Channel::new(tls);
        let hello = Message::Hello { client: hostname() };
        channel.send(&hello).await.map_err(refusal)?;
        let (server, remote_security) = match channel.recv(HANDSHAKE_TIMEOUT).await {
            Ok(Message::Welcome {
                server,
                secured,
                reason,
            }) => (
                server,
                if secured {
                    Security::Secured
                } else {
                    Security::Unsecured {
                        reason: reason.unwrap_or_else(|| "not secured".into()),
                    }
                },
            ),
            Ok(Message::Error { kind, message, .. }) => {
                return Err(MigrationError::Remote {
                    kind,
                    message,
                    refusal: true,
                });
            }
            Ok(other) => return Err(refusal(PeerError::Unexpected(format!("{other:?}")))),
            Err(e) => return Err(refusal(e)),
        };
        let (to_service, outgoing) = mpsc::unbounded_channel();
        let (incoming, from_service) = mpsc::unbounded_channel();
        tokio::spawn(client_pump(channel, outgoing, incoming));
        Ok(RemoteDestination {
            to_service,
            from_service,
            qmp: target.qmp.clone(),
            lost: None,
            remote_security,
            server,
        })
    }

    /// Sends `msg` and waits for the answer (pongs and stray messages are skipped).
    async fn request(&mut self, msg: Message) -> Result<Message, MigrationError> {
        if let Some(reason) = &self.lost {
            return Err(MigrationError::DestinationDied {
                desc: Some(reason.clone()),
            });
        }
        self.to_service
            .send(msg)
            .map_err(|_| remote_error(PeerError::Closed))?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let answer = tokio::time::timeout_at(deadline, self.from_service.recv())
                .await
                .map_err(|_| remote_error(PeerError::Silent(REQUEST_TIMEOUT)))?;
            match answer {
                None => return Err(remote_error(PeerError::Closed)),
                Some(Err(e)) => {
                    self.lost = Some(e.to_string());
                    return Err(remote_error(e));
                }
                Some(Ok(Message::Pong)) => continue,
                Some(Ok(Message::Gone { reason })) => {
                    self.lost = Some(reason.clone());
                    return Err(MigrationError::DestinationDied { desc: Some(reason) });
                }
                Some(Ok(Message::Error {
                    kind,
                    message,
                    refusal,
                })) => {
                    return Err(MigrationError::Remote {
                        kind,
                        message,
                        refusal,
                    });
                }
                Some(Ok(other)) => return Ok(other),
            }
        }
    }
}

impl Destination for RemoteDestination {
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        let plan = serde_json::to_value(plan).map_err(|e| MigrationError::Failed {
            desc: e.to_string(),
        })?;
        let msg = Message::Preflight {
            qmp: self.qmp.clone(),
            plan,
        };
        match self.request(msg).await? {
            Message::Preflighted => Ok(()),
            other => Err(remote_error(PeerError::Unexpected(format!("{other:?}")))),
        }
    }

    async fn prepare(&mut self, _plan: &DestPlan) -> Result<DestPrepared, MigrationError> {
        match self.request(Message::Prepare).await? {
            Message::Prepared { prepared } => serde_json::from_value(prepared)
                .map_err(|e| remote_error(PeerError::Frame(e.to_string()))),
            other => Err(remote_error(PeerError::Unexpected(format!("{other:?}")))),
        }
    }

    async fn gone(&mut self) {
        if self.lost.is_some() {
            return;
        }
        loop {
            match self.from_service.recv().await {
                None => {
                    self.lost = Some("the control channel closed".into());
                    return;
                }
                Some(Err(e)) => {
                    self.lost = Some(e.to_string());
                    return;
                }
                Some(Ok(Message::Gone { reason })) => {
                    self.lost = Some(reason);
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    async fn finish(&mut self, resume: bool) -> Result<Vec<String>, MigrationError> {
        match self.request(Message::Finish { resume }).await? {
            Message::Finished { problems } => Ok(problems),
            other => Err(remote_error(PeerError::Unexpected(format!("{other:?}")))),
        }
    }

    async fn abort(&mut self) -> Vec<String> {
        if self.lost.is_some() {
            // The service rolls back on its own when it loses the channel.
            return Vec::new();
        }
        match self.request(Message::Abort).await {
            Ok(Message::Aborted { problems }) => problems,
            Ok(other) => vec![format!(
                "destination: unexpected answer to abort: {other:?}"
            )],
            Err(e) => vec![format!("destination: {e}")],
        }
    }
}

/// Moves messages between the channel and the migration, sends heartbeats, and reports a
/// channel that closed or fell silent.
async fn client_pump<S: AsyncRead + AsyncWrite + Unpin>(
    mut channel: Channel<S>,
    mut outgoing: mpsc::UnboundedReceiver<Message>,
    incoming: mpsc::UnboundedSender<Result<Message, PeerError>>,
) {
    let mut ping = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            msg = outgoing.recv() => {
                let Some(msg) = msg else { return }; // the migration is over
                if let Err(e) = channel.send(&msg).await {
                    let _ = incoming.send(Err(e));
                    return;
                }
            }
            _ = ping.tick() => {
                if let Err(e) = channel.send(&Message::Ping).await {
                    let _ = incoming.send(Err(e));
                    return;
                }
            }
            _ = tokio::time::sleep_until(last_heard + HEARTBEAT_TIMEOUT) => {
                let _ = incoming.send(Err(PeerError::Silent(HEARTBEAT_TIMEOUT)));
                return;
            }
            msg = channel.next() => {
                last_heard = Instant::now();
                let end = msg.is_err();
                if incoming.send(msg).is_err() || end {
                    return;
                }
            }
        }
    }
}

/// Runs one migration from the source in `opts` to the destination host's service at
/// `target`. The transport rule is applied to this host's PKI directory and the service's own
/// verdict on its host; the JSON report is the same as for a local migration.
pub async fn migrate_remote(
    opts: &super::MigrationOptions,
    target: &RemoteTarget,
    progress: &mut (dyn FnMut(&super::Progress) + Send),
    cancel: &CancellationToken,
) -> super::Report {
    let started = Instant::now();
    progress(&super::Progress {
        phase: super::Phase::Preflight,
        status: None,
        elapsed_ms: 0,
        ram: None,
        disks: Vec::new(),
    });
    let dest = match RemoteDestination::connect(target).await {
        Ok(d) => d,
        Err(e) => return super::Report::refused(e, started.elapsed()),
    };
    let src_security = pki::assess(&opts.source.pki_dir, Role::Client);
    let remote_dir = PathBuf::from(format!("{}:<service --pki-dir>", dest.server));
    let decision = super::decide_transport_from(
        opts.transport,
        (&src_security, &opts.source.pki_dir),
        (&dest.remote_security, &remote_dir),
    );
    match decision {
        Ok(decision) => super::migrate_to(opts, decision, dest, started, progress, cancel).await,
        Err(e) => {
            let mut dest = dest;
            let _ = dest.abort().await;
            super::Report::refused(e, started.elapsed())
        }
    }
}

/// Settings of the destination host's service.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `ADDR[:PORT]` to listen on.
    pub listen: String,
    pub pki_dir: PathBuf,
    /// Only QMP sockets in this directory can be named by a source.
    pub qmp_dir: PathBuf,
    /// Certificate names allowed to connect; empty: any certificate from the CA.
    pub allow_clients: Vec<String>,
    pub port_range: PortRange,
    pub qmp_timeout: Duration,
}

/// Runs the service until `shutdown` is cancelled: accepts sources, one session per
/// connection, several at once. On shutdown, running sessions roll back and end.
pub async fn serve(
    opts: &ServeOptions,
    shutdown: CancellationToken,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> Result<(), MigrationError> {
    let config = peer::server_config(&opts.pki_dir, &opts.allow_clients).map_err(|e| {
        MigrationError::Remote {
            kind: "credentials".into(),
            message: e.to_string(),
            refusal: true,
        }
    })?;
    let listen = peer::with_default_port(&opts.listen);
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|source| MigrationError::Remote {
            kind: "listen".into(),
            message: format!("cannot listen on {listen}: {source}"),
            refusal: true,
        })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving migrations");
        on_listening(addr);
    }
    let acceptor = TlsAcceptor::from(config);
    let opts = Arc::new(opts.clone());
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((tcp, remote)) = accepted else { continue };
                let (acceptor, opts, stop) = (acceptor.clone(), opts.clone(), shutdown.clone());
                sessions.spawn(async move {
                    if let Err(e) = session(tcp, acceptor, &opts, stop).await {
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

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Resolves a socket name a peer sent to a path inside `dir`; nothing else can be named.
fn qmp_path(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(format!(
            "{name:?} is not a file name in the service's QMP directory"
        ));
    }
    Ok(dir.join(name))
}

fn error_message(e: &MigrationError) -> Message {
    let mut chain = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    Message::Error {
        kind: e.kind().to_string(),
        message: chain.join(": "),
        refusal: e.is_refusal(),
    }
}

/// One source's session: handshake, then requests until finished, aborted, or the channel is
/// lost; whatever was prepared and not finished is rolled back.
async fn session(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    opts: &ServeOptions,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let local = tcp.local_addr().map(|a| a.ip().to_string()).ok();
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| PeerError::Silent(HANDSHAKE_TIMEOUT))?
        .map_err(|source| PeerError::Tls {
            peer: remote.clone(),
            source,
        })?;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| PeerIdentity::from_der(c.as_ref()));
    let mut channel = Channel::new(tls);
    let Some(identity) = identity.filter(|i| i.allowed_by(&opts.allow_clients)) else {
        let err = PeerError::NotAllowed {
            names: Vec::new(),
            allowed: opts.allow_clients.clone(),
        };
        let _ = channel
            .send(&Message::Error {
                kind: err.kind().into(),
                message: err.to_string(),
                refusal: true,
            })
            .await;
        return Err(err);
    };
    tracing::info!(%remote, client = %identity.dn, "source connected");

    let mut dest: Option<DestinationSide> = None;
    let mut plan: Option<DestPlan> = None;
    let mut prepared = false;
    let mut last_heard = Instant::now();
    let result = loop {
        let dest_gone = async {
            match (&mut dest, prepared) {
                (Some(d), true) => d.gone().await,
                _ => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break Err(PeerError::Closed),
            _ = tokio::time::sleep_until(last_heard + HEARTBEAT_TIMEOUT) => {
                break Err(PeerError::Silent(HEARTBEAT_TIMEOUT));
            }
            _ = dest_gone => {
                let _ = channel.send(&Message::Gone { reason: "the destination QEMU exited".into() }).await;
                break Err(PeerError::Closed);
            }
            msg = channel.next() => msg,
        };
        last_heard = Instant::now();
        let msg = match msg {
            Ok(m) => m,
            Err(e @ (PeerError::Frame(_) | PeerError::Version { .. })) => {
                let _ = channel
                    .send(&Message::Error {
                        kind: e.kind().into(),
                        message: e.to_string(),
                        refusal: !prepared,
                    })
                    .await;
                break Err(e);
            }
            Err(e) => break Err(e),
        };
        let reply = match msg {
            Message::Ping => Message::Pong,
            Message::Hello { client } => {
                tracing::debug!(%client, "hello");
                let security = pki::assess(&opts.pki_dir, Role::Server);
                Message::Welcome {
                    server: hostname(),
                    secured: security.is_secured(),
                    reason: match security {
                        Security::Secured => None,
                        Security::Unsecured { reason } => Some(reason),
                    },
                }
            }
            Message::Preflight {
                qmp,
                plan: requested,
            } if dest.is_none() => {
                match preflight(opts, &qmp, requested, local.as_deref(), &identity).await {
                    Ok((side, p)) => {
                        dest = Some(side);
                        plan = Some(p);
                        Message::Preflighted
                    }
                    Err(e) => error_message(&e),
                }
            }
            Message::Prepare => match (&mut dest, &plan) {
                (Some(d), Some(p)) if !prepared => match d.prepare(p).await {
                    Ok(ports) => {
                        prepared = true;
                        Message::Prepared {
                            prepared: serde_json::to_value(ports).unwrap_or_default(),
                        }
                    }
                    Err(e) => error_message(&e),
                },
                _ => error_message(&MigrationError::Failed {
                    desc: "prepare without a preflight".into(),
                }),
            },
            Message::Finish { resume } => match dest.take() {
                Some(mut d) => {
                    let reply = match d.finish(resume).await {
                        Ok(problems) => Message::Finished { problems },
                        Err(e) => {
                            let m = error_message(&e);
                            let _ = d.abort().await;
                            m
                        }
                    };
                    let _ = channel.send(&reply).await;
                    break Ok(());
                }
                None => error_message(&MigrationError::Failed {
                    desc: "nothing to finish".into(),
                }),
            },
            Message::Abort => {
                let problems = match dest.take() {
                    Some(mut d) => d.abort().await,
                    None => Vec::new(),
                };
                let _ = channel.send(&Message::Aborted { problems }).await;
                break Ok(());
            }
            other => {
                let e = PeerError::Unexpected(format!("{other:?}"));
                Message::Error {
                    kind: e.kind().into(),
                    message: e.to_string(),
                    refusal: !prepared,
                }
            }
        };
        if let Err(e) = channel.send(&reply).await {
            break Err(e);
        }
    };
    if let Some(mut d) = dest.take() {
        tracing::warn!(%remote, "rolling back the destination: the session ended early");
        for p in d.abort().await {
            tracing::warn!("{p}");
        }
    }
    result
}

async fn preflight(
    opts: &ServeOptions,
    qmp: &str,
    requested: serde_json::Value,
    local_address: Option<&str>,
    identity: &PeerIdentity,
) -> Result<(DestinationSide, DestPlan), MigrationError> {
    let path = qmp_path(&opts.qmp_dir, qmp).map_err(|desc| MigrationError::Remote {
        kind: "bad-request".into(),
        message: desc,
        refusal: true,
    })?;
    let mut plan: DestPlan =
        serde_json::from_value(requested).map_err(|e| MigrationError::Remote {
            kind: "bad-request".into(),
            message: format!("bad migration plan: {e}"),
            refusal: true,
        })?;
    // The service decides where it listens (the address the source reached it on) and from
    // which ports; a source that asks for authorization gets its own certificate's name.
    if let Some(addr) = local_address {
        plan.listen_address = addr.to_string();
    }
    plan.port_range = opts.port_range;
    if plan.authz_identity.is_some() {
        plan.authz_identity = Some(identity.dn.clone());
    }
    let mut side = DestinationSide::attach(&path, &opts.pki_dir, opts.qmp_timeout).await?;
    side.preflight(&plan).await?;
    Ok((side, plan))
}
