//! The source side of a migration between two hosts: [`RemoteDestination`] speaks the
//! [`crate::peer`] protocol to the destination host's service (`crate::service`), and
//! [`migrate_remote`] runs a migration through it.
//!
//! One session, as the source drives it:
//! 1. TLS (both ends authenticated), `hello` → `welcome` (is the service's host secured?).
//! 2. `preflight {qmp, plan}` → `preflighted`, or an error with `refusal: true`.
//! 3. `prepare` → `prepared {ports}`; from here the destination is changed.
//! 4. While RAM and disks move: `ping`/`pong` every second; `gone` if the destination QEMU
//!    exits.
//! 5. `finish {resume}` → `finished`, or `abort` → `aborted {stopped}`.
//!
//! A channel that closes or falls silent for [`HEARTBEAT_TIMEOUT`] is lost. The service then
//! rolls back on its own, unless it was already told to finish; so once `finish` was sent, a
//! lost channel leaves the destination's state unknown, and the driver keeps the source paused.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::destination::Destination;
use super::destination::{AbortOutcome, Finished};
use super::{MigrationError, Side};
use crate::peer::{
    self, Channel, DestPlan, DestPrepared, DiskCopy, ErrorKind, HEARTBEAT_INTERVAL,
    HEARTBEAT_TIMEOUT, Message, PeerError,
};
use crate::pki::{self, Role, Security};

/// How long a request to the service may take (preparing includes NBD and credential checks).
/// The service answers pings meanwhile, so a dead service is found by the heartbeat first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `finish` may take: the destination loads the last of the state, stops its NBD
/// server and resumes, each step allowed the destination's own finish timeout.
const FINISH_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a new connection has to finish the TLS handshake and say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many more times a source tries when the service says it is busy.
const BUSY_RETRIES: u32 = 4;
/// The first pause before trying again; each next one doubles (0.1 + 0.2 + 0.4 + 0.8 s).
const BUSY_BACKOFF: Duration = Duration::from_millis(100);

/// The pause before busy retry `n` (from 0): [`BUSY_BACKOFF`] doubled `n` times, plus up to
/// 50 ms from the clock, so sources refused together do not come back together.
fn busy_pause(n: u32) -> Duration {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 50_000_000)
        .unwrap_or(0);
    BUSY_BACKOFF * 2u32.saturating_pow(n) + Duration::from_nanos(u64::from(jitter))
}

/// Where a source finds a destination host's service.
#[derive(Debug, Clone)]
pub struct RemoteTarget {
    /// The service's address (the port defaults to [`crate::peer::DEFAULT_PORT`]).
    pub address: crate::addr::Address,
    /// The name the service's certificate must carry (the destination host's name).
    pub server_name: String,
    /// The QMP socket's file name in the service's `--qmp-dir`.
    pub qmp: String,
    /// The source host's PKI directory (its client certificate).
    pub pki_dir: PathBuf,
}

/// Whether the control channel to the service, and the destination behind it, still stand.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Up,
    /// Lost: the channel closed or fell silent.
    Lost {
        reason: String,
    },
    /// The service said its destination QEMU exited (`gone`); it then ends the session and
    /// rolls its side back on its own.
    QemuGone {
        reason: String,
    },
}

impl Link {
    /// Why it is down; `None` while it is up.
    fn down(&self) -> Option<&str> {
        match self {
            Link::Up => None,
            Link::Lost { reason } | Link::QemuGone { reason } => Some(reason),
        }
    }
}

/// How far the service was asked to go; decides what a lost channel leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Asked {
    /// Nothing that changes the destination (or a refusal of it).
    Nothing,
    /// `start-domain` or `prepare`: the destination may have been changed.
    Changes,
    /// `finish`: from then on the service may resume the destination even if the channel is
    /// lost.
    Finish,
}

/// The destination side, reached through the destination host's service.
pub struct RemoteDestination {
    to_service: mpsc::UnboundedSender<Message>,
    from_service: mpsc::UnboundedReceiver<Result<Message, PeerError>>,
    qmp: String,
    /// Whether the channel (or the destination behind it) is still there.
    link: Link,
    /// What the service was asked that changes its host.
    asked: Asked,
    /// The destination host's CPU count, from its welcome.
    cpus: u32,
    /// The destination QEMU's version, from the preflight's answer.
    qemu: Option<crate::qmp::QemuVersion>,
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
        kind: e.kind(),
        message: e.to_string(),
        refusal: false,
    }
}

impl RemoteDestination {
    /// Connects to the service with mutual TLS and says hello.
    pub async fn connect(target: &RemoteTarget) -> Result<RemoteDestination, MigrationError> {
        let tls = handshake(target).await?;
        let mut channel = Channel::new(tls);
        let hello = Message::Hello {
            client: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        };
        channel.send(&hello).await.map_err(refusal)?;
        let (server, remote_security, cpus) = match channel.recv(HANDSHAKE_TIMEOUT).await {
            Ok(Message::Welcome {
                server,
                security,
                cpus,
            }) => (server, security, cpus),
            Ok(Message::Error { kind, message, .. }) => {
                return Err(MigrationError::Remote {
                    kind,
                    message,
                    refusal: true,
                });
            }
            Ok(other) => return Err(refusal(PeerError::Unexpected(other.type_name().into()))),
            Err(e) => return Err(refusal(e)),
        };
        let (to_service, outgoing) = mpsc::unbounded_channel();
        let (incoming, from_service) = mpsc::unbounded_channel();
        tokio::spawn(client_pump(channel, outgoing, incoming));
        Ok(RemoteDestination {
            to_service,
            from_service,
            qmp: target.qmp.clone(),
            link: Link::Up,
            asked: Asked::Nothing,
            cpus,
            qemu: None,
            remote_security,
            server,
        })
    }

    /// Sends `msg` and waits up to `timeout` for the answer (pongs are skipped).
    async fn request(
        &mut self,
        msg: Message,
        timeout: Duration,
    ) -> Result<Message, MigrationError> {
        if let Some(reason) = self.link.down() {
            return Err(MigrationError::DestinationDied {
                desc: Some(reason.to_string()),
            });
        }
        self.to_service
            .send(msg)
            .map_err(|_| remote_error(PeerError::Closed))?;
        let deadline = Instant::now() + timeout;
        loop {
            let answer = tokio::time::timeout_at(deadline, self.from_service.recv())
                .await
                .map_err(|_| remote_error(PeerError::Silent(timeout)))?;
            match answer {
                None => return Err(remote_error(PeerError::Closed)),
                Some(Err(e)) => {
                    self.lose(e.to_string());
                    return Err(remote_error(e));
                }
                Some(Ok(Message::Pong)) => continue,
                Some(Ok(Message::Gone { reason })) => {
                    self.qemu_gone(reason.clone());
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

impl RemoteDestination {
    /// Notes that the channel was lost (the first reason stays).
    fn lose(&mut self, reason: String) {
        if self.link == Link::Up {
            self.link = Link::Lost { reason };
        }
    }

    /// Notes that the service said its destination QEMU exited (unless the link was down
    /// before).
    fn qemu_gone(&mut self, reason: String) {
        if self.link == Link::Up {
            self.link = Link::QemuGone { reason };
        }
    }

    /// Has the service (started with `--libvirt`) start the incoming domain; the following
    /// requests then name its QMP socket.
    pub async fn start_domain(&mut self, domain: &super::DestDomain) -> Result<(), MigrationError> {
        let msg = Message::StartDomain {
            xml: domain.xml.clone(),
            disks: domain.disks.clone(),
        };
        self.asked = self.asked.max(Asked::Changes);
        match self.request(msg, FINISH_REQUEST_TIMEOUT).await {
            Ok(Message::DomainStarted { qmp }) => {
                self.qmp = qmp;
                Ok(())
            }
            Ok(other) => Err(remote_error(PeerError::Unexpected(
                other.type_name().into(),
            ))),
            Err(e) => {
                if matches!(e, MigrationError::Remote { refusal: true, .. }) {
                    self.asked = Asked::Nothing;
                }
                Err(e)
            }
        }
    }
}

impl Destination for RemoteDestination {
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        let msg = Message::Preflight {
            qmp: self.qmp.clone(),
            plan: plan.clone(),
        };
        match self.request(msg, REQUEST_TIMEOUT).await? {
            Message::Preflighted {
                backing_checked,
                qemu,
            } => {
                self.qemu = qemu;
                match plan.disks.iter().find(|d| d.copy == DiskCopy::Top) {
                    Some(disk) if !backing_checked => Err(MigrationError::BackingMismatch {
                        node: disk.node.clone(),
                        reason: "the destination host's service is too old to check backing \
                                 files (upgrade it)"
                            .into(),
                    }),
                    _ => Ok(()),
                }
            }
            other => Err(remote_error(PeerError::Unexpected(
                other.type_name().into(),
            ))),
        }
    }

    async fn prepare(&mut self, _plan: &DestPlan) -> Result<DestPrepared, MigrationError> {
        self.asked = self.asked.max(Asked::Changes);
        match self.request(Message::Prepare, REQUEST_TIMEOUT).await {
            Ok(Message::Prepared { prepared }) => Ok(prepared),
            Ok(other) => Err(remote_error(PeerError::Unexpected(
                other.type_name().into(),
            ))),
            Err(e) => {
                if matches!(e, MigrationError::Remote { refusal: true, .. }) {
                    self.asked = Asked::Nothing;
                }
                Err(e)
            }
        }
    }

    fn changed(&self) -> bool {
        self.asked >= Asked::Changes
    }

    async fn lost(&mut self) {
        if self.link.down().is_some() {
            return;
        }
        loop {
            match self.from_service.recv().await {
                None => {
                    self.lose("the control channel closed".into());
                    return;
                }
                Some(Err(e)) => {
                    self.lose(e.to_string());
                    return;
                }
                Some(Ok(Message::Gone { reason })) => {
                    self.qemu_gone(reason);
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }

    fn lost_reason(&self) -> Option<String> {
        self.link
            .down()
            .map(|reason| format!("destination host: {reason}"))
    }

    async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError> {
        // Whatever happens to the channel from here, the service may resume the destination.
        self.asked = Asked::Finish;
        match self
            .request(Message::Finish { resume }, FINISH_REQUEST_TIMEOUT)
            .await?
        {
            Message::Finished {
                problems,
                resumed_at_us,
            } => Ok(Finished {
                problems,
                resumed_at_us,
            }),
            other => Err(remote_error(PeerError::Unexpected(
                other.type_name().into(),
            ))),
        }
    }

    async fn abort(&mut self) -> AbortOutcome {
        // Without `finish`, the service never resumes the destination, and the destination
        // cannot start on its own: a lost channel then still means "not running".
        let finish_sent = self.asked == Asked::Finish;
        let unknown = |problem: String| AbortOutcome {
            stopped: !finish_sent,
            problems: vec![problem],
        };
        // Before `finish`, a destination QEMU that exited (as one does once the source
        // cancels the stream it was loading) never ran the guest, and the service, which said
        // so, rolls back the rest on its own: nothing is left to report. (Whether the `gone`
        // came before the abort or instead of its answer is a race.)
        let gone_unresumed = |link: &Link| !finish_sent && matches!(link, Link::QemuGone { .. });
        if gone_unresumed(&self.link) {
            return AbortOutcome {
                stopped: true,
                problems: Vec::new(),
            };
        }
        if let Some(reason) = self.link.down() {
            return unknown(format!(
                "destination: channel lost ({reason}); the service rolls back on its own"
            ));
        }
        match self.request(Message::Abort, FINISH_REQUEST_TIMEOUT).await {
            Ok(Message::Aborted { stopped, problems }) => AbortOutcome { stopped, problems },
            Err(_) if gone_unresumed(&self.link) => {
                tracing::info!(
                    "the destination QEMU exited before the abort: the service rolls back"
                );
                AbortOutcome {
                    stopped: true,
                    problems: Vec::new(),
                }
            }
            Ok(other) => unknown(format!(
                "destination: unexpected answer to abort: {}",
                other.type_name()
            )),
            Err(e) => unknown(format!("destination: {e}")),
        }
    }

    fn clock(&self) -> &'static str {
        "two hosts"
    }

    fn cpus(&self) -> u32 {
        self.cpus
    }
    fn qemu_version(&self) -> Option<crate::qmp::QemuVersion> {
        self.qemu
    }

    fn holder(&self) -> String {
        format!("the destination host {} (its service)", self.server)
    }
}

/// A failure to reach the service: a refusal (nothing was changed anywhere).
fn refusal(e: PeerError) -> MigrationError {
    MigrationError::Remote {
        kind: match e.kind() {
            ErrorKind::Busy => ErrorKind::Busy,
            _ => ErrorKind::Connect,
        },
        message: e.to_string(),
        refusal: true,
    }
}

/// TCP and the mutual-TLS handshake with the service at `target`; a service that says it is
/// busy (over its handshake or session limits, before any handshake) is tried again a few
/// times, so a burst of migrations from one host gets through one after another.
async fn handshake(
    target: &RemoteTarget,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, MigrationError> {
    let address = peer::with_default_port(&target.address);
    let config = peer::client_config(&target.pki_dir).map_err(|e| MigrationError::Remote {
        kind: ErrorKind::Credentials,
        message: e.to_string(),
        refusal: true,
    })?;
    let name =
        rustls::pki_types::ServerName::try_from(target.server_name.clone()).map_err(|e| {
            MigrationError::Remote {
                kind: ErrorKind::Usage,
                message: format!("bad destination host name {:?}: {e}", target.server_name),
                refusal: true,
            }
        })?;
    let connector = TlsConnector::from(config);
    let mut busy_retries = 0;
    loop {
        let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(&address))
            .await
            .map_err(|_| refusal(PeerError::Silent(HANDSHAKE_TIMEOUT)))?
            .map_err(|source| {
                refusal(PeerError::Connect {
                    addr: address.clone(),
                    source,
                })
            })?;
        let handshake =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name.clone(), tcp))
                .await
                .map_err(|_| refusal(PeerError::Silent(HANDSHAKE_TIMEOUT)))?;
        match handshake {
            Ok(tls) => return Ok(tls),
            Err(source) if peer::is_busy_refusal(&source) && busy_retries < BUSY_RETRIES => {
                let pause = busy_pause(busy_retries);
                tracing::info!(%address, ?pause, "the service is busy; trying again");
                tokio::time::sleep(pause).await;
                busy_retries += 1;
            }
            Err(source) if peer::is_busy_refusal(&source) => {
                return Err(refusal(PeerError::Busy {
                    peer: address.clone(),
                    tries: BUSY_RETRIES + 1,
                }));
            }
            Err(source) => {
                return Err(refusal(PeerError::Tls {
                    peer: address.clone(),
                    reason: peer::tls_failure_reason(&source),
                    source,
                }));
            }
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
    opts: &super::ValidOptions,
    target: &RemoteTarget,
    cx: super::RunContext<'_>,
) -> super::Report {
    let started = Instant::now();
    let mut cx = cx;
    (cx.progress)(&super::Progress::phase(super::Phase::Preflight, 0));
    // Before anything else (the incoming domain included), and held until the roll-back is
    // over: no other run drives this VM.
    let lock = match opts.lock_source() {
        Ok(lock) => lock,
        Err(e) => return super::Report::refused(e, started.elapsed()),
    };
    match super::run::recover_first(opts, &lock).await {
        Ok(notes) => cx.notes.extend(notes),
        Err(e) => return super::Report::refused(e, started.elapsed()),
    }
    let sides = [(
        Side::Source,
        opts.source_cloudstack_dir.as_deref(),
        opts.source.pki_dir.as_path(),
    )];
    match super::cloudstack::prepare(opts.transport, &sides) {
        Ok(notes) => cx.notes.extend(notes),
        Err(e) => return super::Report::refused(e, started.elapsed()),
    }
    let src_security = pki::assess(&opts.source.pki_dir, Role::Client);
    // A service only ever runs on a secured host (its channel is mutual TLS), so an unsecured
    // source makes a mixed pair: refused by the rule, before the channel fails on the missing
    // certificate with a less useful message.
    if let Security::Unsecured { reason } = &src_security {
        let e = MigrationError::MixedSecurity {
            side: Side::Source,
            dir: opts.source.pki_dir.clone(),
            reason: reason.clone(),
        };
        return super::Report::refused(e, started.elapsed());
    }
    let mut dest = match RemoteDestination::connect(target).await {
        Ok(d) => d,
        Err(e) => return super::Report::refused(e, started.elapsed()),
    };
    let remote_dir = PathBuf::from(format!("{}:<service --pki-dir>", dest.server));
    let decision = super::decide_transport_from(
        opts.transport,
        (&src_security, &opts.source.pki_dir),
        (&dest.remote_security, &remote_dir),
    );
    // With a libvirt domain, the service first makes the incoming domain the rest drives.
    let ready = match (decision, &opts.dest_domain) {
        (Ok(decision), Some(domain)) => dest.start_domain(domain).await.map(|()| decision),
        (decision, _) => decision,
    };
    match ready {
        Ok(decision) => super::migrate_to(opts, decision, dest, &lock, started, cx).await,
        Err(e) => {
            let refused = !dest.changed();
            let outcome = dest.abort().await;
            let mut report = super::Report::refused(e, started.elapsed());
            report.refused = refused;
            report.cleanup_errors = outcome.problems;
            report
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::{Authz, BackingSpec, DiskSpec};

    /// The two ends a test holds: what the source sent, and the service's replies (kept open:
    /// a closed channel would read as a lost service).
    type Service = (
        mpsc::UnboundedReceiver<Message>,
        mpsc::UnboundedSender<Result<Message, PeerError>>,
    );

    /// A remote destination whose service answers the next request with `answer`.
    fn answering(answer: Message) -> (RemoteDestination, Service) {
        let (to_service, sent) = mpsc::unbounded_channel();
        let (replies, from_service) = mpsc::unbounded_channel();
        replies.send(Ok(answer)).expect("queue the answer");
        let dest = RemoteDestination {
            to_service,
            from_service,
            qmp: "vm1.sock".into(),
            link: Link::Up,
            asked: Asked::Nothing,
            cpus: 2,
            qemu: None,
            remote_security: Security::Unsecured {
                reason: String::new(),
            },
            server: "host-b".into(),
        };
        (dest, (sent, replies))
    }

    fn plan(copy: DiskCopy) -> DestPlan {
        DestPlan {
            machine: None,
            postcopy: false,
            tls: true,
            tls_priority: None,
            multifd: None,
            multifd_compression: None,
            disks: vec![DiskSpec {
                node: "disk0".into(),
                device: None,
                size: 1 << 30,
                copy,
                backing: (copy == DiskCopy::Top).then(|| BackingSpec {
                    filename: "/pool/template".into(),
                    format: "raw".into(),
                    size: 1 << 30,
                    fingerprint: None,
                }),
            }],
            create_dest_disks: false,
            authz: Authz::Off,
            listen_address: "198.18.0.1".into(),
            port_range: crate::ports::DEFAULT_RANGE,
        }
    }

    #[tokio::test]
    async fn a_top_only_copy_is_refused_by_a_service_that_did_not_check_the_backing() {
        let old = Message::Preflighted {
            backing_checked: false,
            qemu: None,
        };
        let (mut dest, _service) = answering(old.clone());
        let (mut full_dest, _full_service) = answering(old);

        let err = dest
            .preflight(&plan(DiskCopy::Top))
            .await
            .expect_err("refused");
        full_dest
            .preflight(&plan(DiskCopy::Full))
            .await
            .expect("a full copy needs no backing check");

        assert_eq!(err.kind(), "backing-mismatch");
        assert!(err.to_string().contains("too old"), "{err}");
        assert!(!dest.changed(), "a refusal: nothing was prepared");
    }

    #[tokio::test]
    async fn an_abort_answered_by_gone_before_finish_is_a_clean_roll_back() {
        let (mut dest, _service) = answering(Message::Gone {
            reason: "the destination QEMU exited".into(),
        });

        let outcome = dest.abort().await;

        assert!(outcome.stopped);
        assert_eq!(outcome.problems, Vec::<String>::new());
    }

    #[tokio::test]
    async fn a_destination_gone_after_finish_or_a_lost_channel_is_still_reported() {
        let (mut after_finish, _service) = answering(Message::Gone {
            reason: "the destination QEMU exited".into(),
        });
        after_finish.asked = Asked::Finish;
        let (mut lost, _lost_service) = answering(Message::Pong);
        lost.lose("the control channel closed".into());

        let (after_finish, lost) = (after_finish.abort().await, lost.abort().await);

        assert!(!after_finish.stopped, "it may have run the guest");
        assert_eq!(
            after_finish.problems.len(),
            1,
            "{:?}",
            after_finish.problems
        );
        assert!(lost.stopped, "no finish: it cannot run the guest");
        assert!(
            lost.problems[0].contains("channel lost"),
            "{:?}",
            lost.problems
        );
    }

    #[tokio::test]
    async fn a_top_only_copy_goes_on_once_the_service_checked_the_backing() {
        let (mut dest, _service) = answering(Message::Preflighted {
            backing_checked: true,
            qemu: None,
        });

        dest.preflight(&plan(DiskCopy::Top))
            .await
            .expect("checked by the service");
    }
}
