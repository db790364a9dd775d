//! The session's states and what each request does in each: [`State::step`] answers at once
//! or hands back the [`Work`] that runs beside the session's loop.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use tokio::time::Instant;

use super::Context;
use super::policy::{apply_policy, qmp_path};
use crate::migration::{DestinationSide, MigrationError};
use crate::peer::{DestPlan, Message, NewDisk, PeerError};
use crate::pki::{self, Role};
use crate::service::incoming::IncomingDomain;
use crate::service::{ServeOptions, hostname};

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
pub(super) type Work = Pin<Box<dyn Future<Output = (State, Message)> + Send>>;

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

/// How far a session reached into this host. The one answer behind both what an error reply
/// says (a refusal, `refusal: true`, only while nothing was changed) and what a session that
/// ends early rolls back (whatever its state holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Footprint {
    /// Nothing attached, nothing made.
    None,
    /// Attached to a destination QEMU and checked: the session holds that connection, the
    /// ports it leased and the credentials the check made, and changed nothing the migration
    /// would use.
    Checked,
    /// The destination was changed (possibly only partly), or a domain was made for the source.
    Changed,
}

impl State {
    /// Starts the work for `msg` in this state, or answers at once with the unchanged state.
    pub fn step(self, msg: Message, cx: &Context) -> Step {
        match (self, msg) {
            (state, Message::Ping) => Step::Reply(state, Message::Pong),
            (state @ State::Greeted, Message::Hello { client }) => {
                tracing::debug!(%client, "hello");
                Step::Reply(state, welcome(cx))
            }
            (State::Greeted, Message::Preflight { qmp, plan }) => {
                work(preflight(cx.clone(), Target::Named(qmp), plan))
            }
            // The domain's own socket, whatever name came with the request.
            (State::DomainReady { incoming }, Message::Preflight { plan, .. }) => {
                work(preflight(cx.clone(), Target::Incoming(incoming), plan))
            }
            (State::Greeted, Message::StartDomain { xml, disks }) => {
                work(start_domain(cx.clone(), xml, disks))
            }
            (
                State::Preflighted {
                    side,
                    plan,
                    incoming,
                },
                Message::Prepare,
            ) => work(prepare(side, plan, incoming)),
            (State::Prepared { side, incoming }, Message::Finish { resume }) => {
                work(finish(side, incoming, resume))
            }
            (state, Message::Abort) => work(abort(state)),
            (state, other) => {
                // The type only: a message (a start-domain's whole XML) is never echoed back.
                let e = PeerError::Unexpected(format!(
                    "{} in state {}",
                    other.type_name(),
                    state.name()
                ));
                let reply = Message::Error {
                    kind: e.kind(),
                    message: e.to_string(),
                    refusal: state.refusal(),
                };
                Step::Reply(state, reply)
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

    /// How far this state reached into this host.
    pub fn footprint(&self) -> Footprint {
        match self {
            State::Greeted | State::Done => Footprint::None,
            State::Preflighted { incoming: None, .. } => Footprint::Checked,
            State::Preflighted {
                incoming: Some(_), ..
            }
            | State::DomainReady { .. }
            | State::Prepared { .. } => Footprint::Changed,
        }
    }

    /// Whether an error reply in this state says that nothing was changed.
    pub fn refusal(&self) -> bool {
        self.footprint() != Footprint::Changed
    }

    /// The state a failed `preflight` goes back to: waiting with its domain, or greeted.
    fn before_preflight(incoming: Option<Box<IncomingDomain>>) -> State {
        match incoming {
            Some(incoming) => State::DomainReady { incoming },
            None => State::Greeted,
        }
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

/// What a request's work hands back: the next state, and the reply or why the request failed.
type Outcome = (State, Result<Message, MigrationError>);

/// `request` as the session's work; a failure's reply is a refusal exactly when the state it
/// leaves is one ([`State::refusal`]).
fn work(request: impl Future<Output = Outcome> + Send + 'static) -> Step {
    Step::Work(Box::pin(async move {
        let (next, result) = request.await;
        let reply = result.unwrap_or_else(|e| error_message(&e, next.refusal()));
        (next, reply)
    }))
}

/// The answer to `hello`: this host, its security verdict and its CPUs.
fn welcome(cx: &Context) -> Message {
    Message::Welcome {
        server: hostname(),
        security: pki::assess(&cx.opts.pki_dir, Role::Server),
        cpus: crate::migration::host_cpus(),
    }
}

/// The destination QEMU a `preflight` attaches to.
enum Target {
    /// From `Greeted`: the socket of this name in `--qmp-dir`.
    Named(String),
    /// From `DomainReady`: the incoming domain's own socket.
    Incoming(Box<IncomingDomain>),
}

/// `preflight` on `target`: `Preflighted` (with the incoming domain, if any) when the
/// destination can take the plan; otherwise the state it came from.
async fn preflight(cx: Context, target: Target, plan: DestPlan) -> Outcome {
    let (checked, incoming) = match target {
        Target::Named(qmp) => (preflight_named(&cx, &qmp, plan).await, None),
        Target::Incoming(incoming) => {
            let path = interposed(&cx.opts, incoming.qmp_path()).await;
            (preflight_at(&cx, &path, plan).await, Some(incoming))
        }
    };
    match checked {
        Ok((side, plan)) => {
            let qemu = Some(side.qemu_version());
            (
                State::Preflighted {
                    side: Box::new(side),
                    plan: Box::new(plan),
                    incoming,
                },
                // DestinationSide::preflight checks every top-only disk's backing.
                Ok(Message::Preflighted {
                    backing_checked: true,
                    qemu,
                }),
            )
        }
        Err(e) => (State::before_preflight(incoming), Err(e)),
    }
}

/// `start-domain` (`--libvirt` only): the incoming domain built, made and started paused.
async fn start_domain(cx: Context, xml: String, disks: Vec<NewDisk>) -> Outcome {
    let Some(host) = cx.opts.prepared.clone() else {
        let e = MigrationError::BadRequest {
            desc: "this service manages no libvirt domains (start it with --libvirt)".into(),
        };
        return (State::Greeted, Err(e));
    };
    match IncomingDomain::start(host, &xml, &disks).await {
        Ok(incoming) => {
            let qmp = incoming.qmp_name();
            let incoming = Box::new(incoming);
            (
                State::DomainReady { incoming },
                Ok(Message::DomainStarted { qmp }),
            )
        }
        Err(e) => (State::Greeted, Err(e)),
    }
}

/// `prepare`: the destination changed to take the migration. A failure that changed nothing
/// leaves the session preflighted.
async fn prepare(
    mut side: Box<DestinationSide>,
    plan: Box<DestPlan>,
    incoming: Option<Box<IncomingDomain>>,
) -> Outcome {
    match side.prepare(&plan).await {
        Ok(prepared) => (
            State::Prepared { side, incoming },
            Ok(Message::Prepared { prepared }),
        ),
        Err(e) if side.changed() => (State::Prepared { side, incoming }, Err(e)),
        Err(e) => (
            State::Preflighted {
                side,
                plan,
                incoming,
            },
            Err(e),
        ),
    }
}

/// `finish`: the destination loaded, resumed when asked, and kept. After a failure the source
/// decides what comes next (it asks for an abort).
async fn finish(
    mut side: Box<DestinationSide>,
    mut incoming: Option<Box<IncomingDomain>>,
    resume: bool,
) -> Outcome {
    // Written down first: from here the domain may run the guest.
    if let Some(incoming) = incoming.as_mut() {
        incoming.mark_resuming();
    }
    match side.finish(resume).await {
        Ok(done) => {
            if let Some(incoming) = incoming {
                incoming.settle();
            }
            let reply = Message::Finished {
                problems: done.problems,
                resumed_at_us: done.resumed_at_us,
            };
            (State::Done, Ok(reply))
        }
        Err(e) => {
            // Failed before `cont` was sent: the domain never ran the guest, so a roll-back
            // may remove it after all.
            if !side.may_run()
                && let Some(incoming) = incoming.as_mut()
            {
                incoming.clear_resuming();
            }
            (State::Prepared { side, incoming }, Err(e))
        }
    }
}

/// `abort`: whatever the state holds rolled back.
async fn abort(state: State) -> Outcome {
    let outcome = state.roll_back().await;
    let reply = Message::Aborted {
        stopped: outcome.stopped,
        problems: outcome.problems,
    };
    (State::Done, Ok(reply))
}

/// Preflight on the socket named `qmp` in `--qmp-dir`, which this session then holds (another
/// session naming it is refused `busy`) until it ends; released at once when refused.
async fn preflight_named(
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
    let deadline = Instant::now() + crate::service::INTERPOSE_WAIT;
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
    use super::super::testing::{context, fake_destination, plan};
    use super::*;
    use crate::peer::ErrorKind;

    #[tokio::test]
    async fn an_error_reply_is_a_refusal_until_the_destination_is_changed() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = dir.path().join("vm.sock");
        let _qemu = fake_destination(&socket, "");
        let timeout = std::time::Duration::from_secs(5);
        let mut side = DestinationSide::attach(&socket, Path::new("/nonexistent"), timeout)
            .await
            .expect("attach");
        let plan = DestPlan {
            machine: None,
            port_range: crate::ports::DEFAULT_RANGE,
            ..plan(false)
        };
        side.preflight(&plan).await.expect("preflight");
        let preflighted = State::Preflighted {
            side: Box::new(side),
            plan: Box::new(plan.clone()),
            incoming: None,
        };
        let checked = (preflighted.footprint(), preflighted.refusal());
        let State::Preflighted { mut side, .. } = preflighted else {
            panic!("preflighted");
        };

        side.prepare(&plan).await.expect("prepare");
        let prepared = State::Prepared {
            side,
            incoming: None,
        };

        assert_eq!(
            (State::Greeted.footprint(), State::Greeted.refusal()),
            (Footprint::None, true)
        );
        assert_eq!(checked, (Footprint::Checked, true));
        assert_eq!(
            (prepared.footprint(), prepared.refusal()),
            (Footprint::Changed, false)
        );
        assert_eq!(State::Done.footprint(), Footprint::None);
        prepared.roll_back().await;
    }

    #[test]
    fn a_message_out_of_order_is_named_by_its_type_never_echoed_back() {
        let cx = context();
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
        let cx = context();
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
