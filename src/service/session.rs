//! One source's session with the service, as an explicit state machine.
//!
//! ```text
//! Greeted --preflight--> Preflighted --prepare--> Prepared --finish--> Done
//!    \                       \                       \--abort-----> Done
//!     \----------------------- \--abort / lost / shutdown: roll back
//! ```
//!
//! 1. TLS (both ends authenticated; names checked against `--allow-client` in the handshake),
//!    then `hello` → `welcome` with this host's [`crate::pki::Security`] verdict.
//! 2. `preflight {qmp, plan}`: the service applies its own policy to the plan (plain TCP only
//!    with `--allow-plain`, its own TLS priority, listen address and ports, `tls-authz`), attaches
//!    to `--qmp-dir/qmp` and checks, changing nothing → `preflighted`, or a refusal. From then on
//!    the session holds that socket ([`super::held`]): another session naming it is `busy`.
//!    (With `--libvirt`, `start-domain` comes first and the preflight is on the incoming
//!    domain's own socket, whatever name is sent.)
//! 3. `prepare` → `prepared {ports}`; from here the destination is changed.
//! 4. `finish {resume}` → `finished`; or `abort` → `aborted {stopped}`.
//!
//! A request runs as the session's one piece of work *beside* the loop that reads frames, so
//! pings are answered at every moment, however long `prepare` or `finish` take. When the channel
//! is lost (closed, or silent for [`HEARTBEAT_TIMEOUT`]) or the service shuts down, the work
//! under way is completed, and whatever was prepared and not finished is rolled back: a `finish`
//! under way is completed because the source has already handed the VM over.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::incoming::IncomingDomain;
use super::limits::HandshakeSlot;
use super::{ServeOptions, hostname};
use crate::migration::{DestinationSide, MigrationError};
use crate::peer::{
    Authz, Channel, DestPlan, ErrorKind, HEARTBEAT_TIMEOUT, Message, PeerError, PeerIdentity,
    tls_failure_reason,
};
use crate::pki::{self, Role, Security};

/// How long a new connection has to finish the TLS handshake: a real one takes 2-4 ms here
/// (median of 20 between two network namespaces; under 100 ms at worst on a loaded 2-core
/// host; see the README), so 3 s leaves a loaded host ample room while a connection that never
/// sends its ClientHello holds its slot only briefly.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Where a session is.
#[derive(Debug)]
pub enum State {
    /// Connected and authenticated; nothing attached.
    Greeted,
    /// (`--libvirt`) The incoming domain was started for this source and waits.
    DomainReady { incoming: Box<IncomingDomain> },
    /// Attached to a destination QEMU and checked; nothing changed on it.
    Preflighted {
        side: Box<DestinationSide>,
        plan: Box<DestPlan>,
        incoming: Option<Box<IncomingDomain>>,
    },
    /// The destination was changed (possibly only partly, after a failed `prepare` or
    /// `finish`); it is rolled back unless it finishes.
    Prepared {
        side: Box<DestinationSide>,
        incoming: Option<Box<IncomingDomain>>,
    },
    /// Finished or rolled back; the session ends.
    Done,
}

/// A request under way: it owns the state while it runs and hands back the next state and
/// the reply.
type Work = Pin<Box<dyn Future<Output = (State, Message)> + Send>>;

/// What a message leads to: work that runs beside the loop, or an answer at once.
pub enum Step {
    Work(Work),
    Reply(State, Message),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Work(_) => f.write_str("Step::Work"),
            Step::Reply(state, msg) => write!(f, "Step::Reply({state:?}, {msg:?})"),
        }
    }
}

/// What the session knows of its peer and host, for each step.
#[derive(Debug, Clone)]
pub struct Context {
    pub opts: std::sync::Arc<ServeOptions>,
    pub identity: PeerIdentity,
    /// The address the source reached this service on: the destination listens there too.
    pub local_address: Option<String>,
    /// The QMP sockets this session holds, released when the session ends.
    pub holds: std::sync::Arc<std::sync::Mutex<Vec<super::held::Hold>>>,
}

impl State {
    /// Starts the work for `msg` in this state, or answers at once with the unchanged state.
    pub fn step(self, msg: Message, cx: &Context) -> Step {
        match (self, msg) {
            (state, Message::Ping) => Step::Reply(state, Message::Pong),
            (state @ State::Greeted, Message::Hello { client }) => {
                tracing::debug!(%client, "hello");
                let security = pki::assess(&cx.opts.pki_dir, Role::Server);
                let welcome = Message::Welcome {
                    server: hostname(),
                    security,
                    cpus: crate::migration::host_cpus(),
                };
                Step::Reply(state, welcome)
            }
            (State::Greeted, Message::Preflight { qmp, plan }) => {
                let cx = cx.clone();
                Step::Work(Box::pin(async move {
                    match preflight(&cx, &qmp, plan).await {
                        Ok((side, plan)) => (
                            State::Preflighted {
                                side: Box::new(side),
                                plan: Box::new(plan),
                                incoming: None,
                            },
                            // DestinationSide::preflight checks every top-only disk's backing.
                            Message::Preflighted {
                                backing_checked: true,
                            },
                        ),
                        Err(e) => (State::Greeted, error_message(&e, true)),
                    }
                }))
            }
            (State::Greeted, Message::StartDomain { xml, disks }) => {
                let cx = cx.clone();
                Step::Work(Box::pin(async move {
                    let Some(host) = cx.opts.prepared.clone() else {
                        let e = MigrationError::BadRequest {
                            desc: "this service manages no libvirt domains (start it with \
                                   --libvirt)"
                                .into(),
                        };
                        return (State::Greeted, error_message(&e, true));
                    };
                    match IncomingDomain::start(host, &xml, &disks).await {
                        Ok(incoming) => {
                            let qmp = incoming.qmp_name();
                            (
                                State::DomainReady {
                                    incoming: Box::new(incoming),
                                },
                                Message::DomainStarted { qmp },
                            )
                        }
                        Err(e) => (State::Greeted, error_message(&e, true)),
                    }
                }))
            }
            (State::DomainReady { incoming }, Message::Preflight { plan, .. }) => {
                let cx = cx.clone();
                Step::Work(Box::pin(async move {
                    // The domain's own socket, whatever name came with the request.
                    let path = interposed(&cx.opts, incoming.qmp_path()).await;
                    match preflight_at(&cx, &path, plan).await {
                        Ok((side, plan)) => (
                            State::Preflighted {
                                side: Box::new(side),
                                plan: Box::new(plan),
                                incoming: Some(incoming),
                            },
                            // DestinationSide::preflight checks every top-only disk's backing.
                            Message::Preflighted {
                                backing_checked: true,
                            },
                        ),
                        Err(e) => (State::DomainReady { incoming }, error_message(&e, false)),
                    }
                }))
            }
            (
                State::Preflighted {
                    mut side,
                    plan,
                    incoming,
                },
                Message::Prepare,
            ) => Step::Work(Box::pin(async move {
                match side.prepare(&plan).await {
                    Ok(prepared) => (
                        State::Prepared { side, incoming },
                        Message::Prepared { prepared },
                    ),
                    Err(e) => {
                        // Refused only when nothing was changed (or made) yet.
                        let refusal = !side.changed() && incoming.is_none();
                        let reply = error_message(&e, refusal);
                        if side.changed() {
                            (State::Prepared { side, incoming }, reply)
                        } else {
                            (
                                State::Preflighted {
                                    side,
                                    plan,
                                    incoming,
                                },
                                reply,
                            )
                        }
                    }
                }
            })),
            (
                State::Prepared {
                    mut side,
                    mut incoming,
                },
                Message::Finish { resume },
            ) => {
                Step::Work(Box::pin(async move {
                    // Written down first: from here the domain may run the guest.
                    if let Some(incoming) = incoming.as_mut() {
                        incoming.mark_resuming();
                    }
                    match side.finish(resume).await {
                        Ok(done) => {
                            if let Some(incoming) = incoming {
                                incoming.settle();
                            }
                            (
                                State::Done,
                                Message::Finished {
                                    problems: done.problems,
                                    resumed_at_us: done.resumed_at_us,
                                },
                            )
                        }
                        // The source decides what comes next (it asks for an abort).
                        Err(e) => {
                            // Failed before `cont` was sent: the domain never ran the guest,
                            // so a roll-back may remove it after all.
                            if !side.may_run()
                                && let Some(incoming) = incoming.as_mut()
                            {
                                incoming.clear_resuming();
                            }
                            (State::Prepared { side, incoming }, error_message(&e, false))
                        }
                    }
                }))
            }
            (state, Message::Abort) => Step::Work(Box::pin(async move {
                let outcome = state.roll_back().await;
                (
                    State::Done,
                    Message::Aborted {
                        stopped: outcome.stopped,
                        problems: outcome.problems,
                    },
                )
            })),
            (state, other) => {
                let refusal = !state.changed();
                // The type only: a message (a start-domain's whole XML) is never echoed back.
                let e = PeerError::Unexpected(format!(
                    "{} in state {}",
                    other.type_name(),
                    state.name()
                ));
                Step::Reply(
                    state,
                    Message::Error {
                        kind: e.kind(),
                        message: e.to_string(),
                        refusal,
                    },
                )
            }
        }
    }

    /// Rolls back whatever this state holds: the destination QEMU's changes, then the
    /// incoming domain and the disks made for it.
    pub async fn roll_back(self) -> crate::migration::AbortOutcome {
        let (mut outcome, incoming) = match self {
            State::Preflighted {
                mut side, incoming, ..
            }
            | State::Prepared { mut side, incoming } => (side.abort().await, incoming),
            State::DomainReady { incoming } => (
                crate::migration::AbortOutcome {
                    stopped: true,
                    problems: Vec::new(),
                },
                Some(incoming),
            ),
            State::Greeted | State::Done => (
                crate::migration::AbortOutcome {
                    stopped: true,
                    problems: Vec::new(),
                },
                None,
            ),
        };
        match incoming {
            // The destination QEMU may run the guest: its domain and disks stay.
            Some(incoming) if !outcome.stopped => {
                tracing::error!(domain = %incoming.name(), "the incoming domain may run the guest: left as it is");
                outcome.problems.push(format!(
                    "destination: the domain {} and its disks were left in place, since it may \
                     run the guest",
                    incoming.name()
                ));
                // It is this host's VM now, whichever copy runs: no restart may remove it.
                incoming.settle();
            }
            Some(incoming) => outcome.problems.extend(incoming.remove().await),
            None => {}
        }
        outcome
    }

    /// Whether this state holds a destination that was changed (or made for the source).
    pub fn changed(&self) -> bool {
        matches!(
            self,
            State::Prepared { .. }
                | State::DomainReady { .. }
                | State::Preflighted {
                    incoming: Some(_),
                    ..
                }
        )
    }

    fn name(&self) -> &'static str {
        match self {
            State::Greeted => "greeted",
            State::DomainReady { .. } => "domain-ready",
            State::Preflighted { .. } => "preflighted",
            State::Prepared { .. } => "prepared",
            State::Done => "done",
        }
    }
}

/// Runs one source's session: handshake, then requests until finished, aborted, or the
/// channel is lost; whatever was prepared and not finished is rolled back.
pub async fn run(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    handshake: HandshakeSlot,
    opts: &std::sync::Arc<ServeOptions>,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let local_address = tcp.local_addr().map(|a| a.ip().to_string()).ok();
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => accepted,
        _ = handshake.cut_short.cancelled() => return Err(PeerError::CutShort),
    };
    let tls = accepted
        .map_err(|_| PeerError::Silent(HANDSHAKE_TIMEOUT))?
        .map_err(|source| PeerError::Tls {
            peer: remote.clone(),
            reason: tls_failure_reason(&source),
            source,
        })?;
    drop(handshake);
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
                kind: err.kind(),
                message: err.to_string(),
                refusal: true,
            })
            .await;
        return Err(err);
    };
    tracing::info!(%remote, client = %identity.subject(), "source connected");
    let cx = Context {
        opts: opts.clone(),
        identity,
        local_address,
        holds: Default::default(),
    };

    let mut state = Some(State::Greeted);
    let mut work: Option<Work> = None;
    // Why the session is ending, once it is: it ends as soon as no work is under way.
    let mut ending: Option<Result<(), PeerError>> = None;
    let mut channel_ok = true;
    let mut last_heard = Instant::now();
    loop {
        if work.is_none() {
            if let Some(result) = ending.take() {
                if let Some(state) = state.take() {
                    if state.changed() || matches!(state, State::Preflighted { .. }) {
                        tracing::warn!(%remote, "rolling back the destination: the session ended early");
                        for p in state.roll_back().await.problems {
                            tracing::warn!("{p}");
                        }
                    }
                }
                return result;
            }
            if matches!(state, Some(State::Done)) {
                return Ok(());
            }
        }
        let idle = work.is_none();
        let dest_gone = async {
            match (&mut state, idle) {
                (Some(State::Prepared { side, .. }), true) => side.lost().await,
                _ => std::future::pending().await,
            }
        };
        let running = async {
            match work.as_mut() {
                Some(w) => w.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            (next, reply) = running => {
                work = None;
                state = Some(next);
                if channel_ok && let Err(e) = channel.send(&reply).await {
                    channel_ok = false;
                    ending.get_or_insert(Err(e));
                }
            }
            _ = shutdown.cancelled(), if ending.is_none() => {
                ending = Some(Err(PeerError::Closed));
            }
            _ = tokio::time::sleep_until(last_heard + HEARTBEAT_TIMEOUT), if channel_ok => {
                channel_ok = false;
                ending.get_or_insert(Err(PeerError::Silent(HEARTBEAT_TIMEOUT)));
            }
            _ = dest_gone => {
                let _ = channel.send(&Message::Gone { reason: "the destination QEMU exited".into() }).await;
                ending.get_or_insert(Err(PeerError::Closed));
            }
            msg = channel.next(), if channel_ok => {
                last_heard = Instant::now();
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        channel_ok = false;
                        if matches!(e, PeerError::Frame(_) | PeerError::Version { .. }) {
                            let refusal = !state.as_ref().is_some_and(State::changed);
                            let _ = channel.send(&Message::Error { kind: e.kind(), message: e.to_string(), refusal }).await;
                        }
                        ending.get_or_insert(Err(e));
                        continue;
                    }
                };
                let reply = match (state.take(), &work) {
                    (Some(current), None) => match current.step(msg, &cx) {
                        Step::Work(w) => {
                            work = Some(w);
                            None
                        }
                        Step::Reply(current, reply) => {
                            state = Some(current);
                            Some(reply)
                        }
                    },
                    // Busy: only pings are answered while a request runs.
                    (current, _) => {
                        state = current;
                        Some(match msg {
                            Message::Ping => Message::Pong,
                            other => Message::Error {
                                kind: ErrorKind::Busy,
                                message: format!("{} while a request is under way", other.type_name()),
                                refusal: false,
                            },
                        })
                    }
                };
                if let Some(reply) = reply
                    && let Err(e) = channel.send(&reply).await
                {
                    channel_ok = false;
                    ending.get_or_insert(Err(e));
                }
            }
        }
    }
}

/// Resolves a socket name a peer sent to a path inside `dir`; nothing else can be named.
pub fn qmp_path(dir: &Path, name: &str) -> Result<PathBuf, MigrationError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(MigrationError::BadRequest {
            desc: format!("{name:?} is not a file name in the service's QMP directory"),
        });
    }
    Ok(dir.join(name))
}

/// The service's policy applied to a source's plan: what this host accepts, whatever the
/// source asked for.
pub fn apply_policy(
    mut plan: DestPlan,
    opts: &ServeOptions,
    security: &Security,
    identity: &PeerIdentity,
    local_address: Option<&str>,
) -> Result<DestPlan, MigrationError> {
    match security {
        // A broken secured host takes no migration at all, whatever the source concluded.
        Security::Broken { problems } => {
            return Err(MigrationError::PkiBroken {
                side: crate::migration::Side::Destination,
                dir: opts.pki_dir.clone(),
                problems: problems.clone(),
            });
        }
        Security::Unsecured { reason } if plan.tls => {
            return Err(MigrationError::Unsecured {
                side: crate::migration::Side::Destination,
                dir: opts.pki_dir.clone(),
                reason: reason.clone(),
            });
        }
        _ => {}
    }
    if !plan.tls {
        if !opts.allow_plain {
            return Err(MigrationError::PlainRefused);
        }
        tracing::warn!(client = %identity.subject(), "plain TCP migration allowed by --allow-plain: RAM and disks cross the network unencrypted");
    }
    // The destination's cipher floor is this host's choice, not the peer's.
    if plan.tls_priority.is_some() && plan.tls_priority != opts.tls_priority {
        tracing::info!(asked = ?plan.tls_priority, applied = ?opts.tls_priority, "ignoring the source's TLS priority");
    }
    plan.tls_priority = opts.tls_priority.clone();
    if let Some(addr) = local_address {
        plan.listen_address = addr.to_string();
    }
    plan.port_range = opts.port_range;
    // Whoever the source asks to authorise, only its own certificate can be; and when this
    // service restricts its clients, the migration stream and NBD are restricted too.
    plan.authz = match plan.authz {
        Authz::Off if opts.allow_clients.is_empty() => Authz::Off,
        _ if !plan.tls => Authz::Off,
        _ => Authz::Identity(
            identity
                .dn
                .clone()
                .map_err(|e| MigrationError::AuthzSubject {
                    desc: e.to_string(),
                })?,
        ),
    };
    Ok(plan)
}

/// Preflight on the socket named `qmp` in `--qmp-dir`, which this session then holds (another
/// session naming it is refused `busy`) until it ends; released at once when refused.
async fn preflight(
    cx: &Context,
    qmp: &str,
    plan: DestPlan,
) -> Result<(DestinationSide, DestPlan), MigrationError> {
    let path = qmp_path(&cx.opts.qmp_dir, qmp)?;
    let hold = cx
        .opts
        .held
        .hold(&path)
        .ok_or_else(|| MigrationError::QmpSocketHeld {
            socket: path.clone(),
        })?;
    let prepared = preflight_at(cx, &path, plan).await?;
    cx.holds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(hold);
    Ok(prepared)
}

/// `socket`, or (with the test seam [`ServeOptions::qmp_interpose_dir`]) the file of its name
/// in that directory, once it appears.
async fn interposed(opts: &ServeOptions, socket: &Path) -> PathBuf {
    let (Some(dir), Some(name)) = (&opts.qmp_interpose_dir, socket.file_name()) else {
        return socket.to_path_buf();
    };
    let path = dir.join(name);
    let deadline = Instant::now() + super::INTERPOSE_WAIT;
    while !path.exists() && Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::warn!(socket = %path.display(), "test seam: reaching the incoming domain through an interposed socket");
    path
}

/// Attaches to the destination QEMU at `path` and checks it can take `plan`, changing nothing.
async fn preflight_at(
    cx: &Context,
    path: &Path,
    plan: DestPlan,
) -> Result<(DestinationSide, DestPlan), MigrationError> {
    let security = pki::assess(&cx.opts.pki_dir, Role::Server);
    let plan = apply_policy(
        plan,
        &cx.opts,
        &security,
        &cx.identity,
        cx.local_address.as_deref(),
    )?;
    let mut side = DestinationSide::attach(path, &cx.opts.pki_dir, cx.opts.qmp_timeout).await?;
    if let Err(e) = side.preflight(&plan).await {
        side.abort().await;
        return Err(e);
    }
    Ok((side, plan))
}

/// The error reply for a failed request; `refusal` says nothing was changed.
fn error_message(e: &MigrationError, refusal: bool) -> Message {
    let mut chain = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    Message::Error {
        kind: e.error_kind(),
        message: chain.join(": "),
        refusal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ServeOptions {
        ServeOptions::new(
            "127.0.0.1:1".parse().expect("address"),
            "/nonexistent".into(),
            "/nonexistent".into(),
        )
    }

    fn identity() -> PeerIdentity {
        PeerIdentity {
            dn: Ok("CN=host-b".into()),
            names: vec!["host-b".into()],
            ips: Vec::new(),
        }
    }

    fn plan(tls: bool) -> DestPlan {
        DestPlan {
            tls,
            tls_priority: Some("NORMAL:+NULL".into()),
            multifd: None,
            multifd_compression: None,
            disks: Vec::new(),
            create_dest_disks: false,
            authz: Authz::Identity("CN=someone-else".into()),
            listen_address: "0.0.0.0".into(),
            port_range: "1-65535".parse().expect("range"),
        }
    }

    #[test]
    fn a_plain_plan_is_refused_unless_the_service_allows_plain() {
        let err = apply_policy(plan(false), &opts(), &Security::Secured, &identity(), None)
            .expect_err("refused");
        assert_eq!(err.kind(), "plain-refused");
        let mut allow = opts();
        allow.allow_plain = true;
        assert!(apply_policy(plan(false), &allow, &Security::Secured, &identity(), None).is_ok());
    }

    #[test]
    fn the_service_not_the_peer_chooses_priority_address_ports_and_authz() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let applied = apply_policy(
            plan(true),
            &o,
            &Security::Secured,
            &identity(),
            Some("198.18.0.1"),
        )
        .expect("ok");
        assert_eq!(applied.tls_priority, None);
        assert_eq!(applied.listen_address, "198.18.0.1");
        assert_eq!(applied.port_range, o.port_range);
        assert_eq!(applied.authz, Authz::Identity("CN=host-b".into()));
    }

    #[test]
    fn a_restricted_service_sets_authz_even_when_the_source_did_not_ask() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let mut p = plan(true);
        p.authz = Authz::Off;
        let applied =
            apply_policy(p.clone(), &o, &Security::Secured, &identity(), None).expect("ok");
        assert_eq!(applied.authz, Authz::Identity("CN=host-b".into()));
        let open = apply_policy(p, &opts(), &Security::Secured, &identity(), None).expect("ok");
        assert_eq!(open.authz, Authz::Off);
    }

    #[test]
    fn a_subject_qemus_authz_cannot_match_is_refused_before_anything_changes() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let mut unmatchable = identity();
        unmatchable.dn = Err(crate::pki::DnError::Empty);

        let err = apply_policy(plan(true), &o, &Security::Secured, &unmatchable, None)
            .expect_err("refused");

        assert_eq!(err.kind(), "not-allowed");
        assert!(err.to_string().contains("tls-authz"), "{err}");
    }

    #[test]
    fn a_broken_service_host_takes_no_migration_and_an_unsecured_one_no_tls() {
        let broken = Security::Broken {
            problems: vec!["server-key.pem: readable by all".into()],
        };
        let err = apply_policy(plan(true), &opts(), &broken, &identity(), None).expect_err("no");
        assert_eq!(err.kind(), "pki-broken");
        let unsecured = Security::Unsecured {
            reason: "no TLS files".into(),
        };
        let err = apply_policy(plan(true), &opts(), &unsecured, &identity(), None).expect_err("no");
        assert_eq!(err.kind(), "unsecured");
    }

    #[test]
    fn only_plain_file_names_in_the_qmp_directory_can_be_named() {
        let dir = Path::new("/run/qtm");
        assert_eq!(qmp_path(dir, "vm1.sock").expect("ok"), dir.join("vm1.sock"));
        for bad in ["", ".", "..", "../etc/x", "a/b", "a\0b"] {
            assert!(qmp_path(dir, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_message_out_of_order_is_named_by_its_type_never_echoed_back() {
        let cx = Context {
            opts: std::sync::Arc::new(opts()),
            identity: identity(),
            local_address: None,
            holds: Default::default(),
        };
        let xml = "<domain><name>secret-vm</name></domain>".to_string();

        let Step::Reply(_, reply) = State::Done.step(
            Message::StartDomain {
                xml,
                disks: Vec::new(),
            },
            &cx,
        ) else {
            panic!("a start-domain once done is answered at once");
        };

        let Message::Error { message, .. } = reply else {
            panic!("an error: {reply:?}");
        };
        assert!(message.contains("start-domain"), "{message}");
        assert!(!message.contains("secret-vm"), "{message}");
    }

    #[test]
    fn a_request_out_of_order_is_refused_without_a_change() {
        let cx = Context {
            opts: std::sync::Arc::new(opts()),
            identity: identity(),
            local_address: None,
            holds: Default::default(),
        };
        let Step::Reply(state, reply) = State::Greeted.step(Message::Prepare, &cx) else {
            panic!("prepare before preflight must be answered at once");
        };
        assert!(matches!(state, State::Greeted));
        assert!(matches!(
            reply,
            Message::Error {
                kind: ErrorKind::Protocol,
                refusal: true,
                ..
            }
        ));
        let Step::Reply(_, pong) = State::Greeted.step(Message::Ping, &cx) else {
            panic!("ping is answered at once");
        };
        assert_eq!(pong, Message::Pong);
    }
}
