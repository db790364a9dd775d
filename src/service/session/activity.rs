//! The session's loop: what the session is doing ([`Activity`]) and what moves it on.
//!
//! ```text
//! Idle --request--> Working --reply--> Idle            (Idle in Done: the session ends)
//!  |                   |--shutdown--> Closing --done--> Ending
//!  |                   \--lost------> Orphaned --done--> Ending
//!  \--lost / shutdown / destination gone --------------> Ending: roll back what the state holds
//! ```
//!
//! While a request runs the loop keeps reading the channel: pings get `pong`, any other request
//! `busy`. The channel is lost when it closes, breaks, or stays silent for
//! [`HEARTBEAT_TIMEOUT`]; then, or on shutdown, the request under way is completed (its reply
//! still sent while the channel holds) and the session ends, rolling back what the state it
//! left holds: a `finish` completed leaves nothing to roll back.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::state::{Footprint, State, Step, Work};
use crate::peer::{Channel, ErrorKind, HEARTBEAT_TIMEOUT, Message, PeerError};

/// What the session is doing.
enum Activity {
    /// Waiting for the next request.
    Idle(State),
    /// A request runs; it owns the state until it hands back the next one and the reply.
    Working(Work),
    /// The service shuts down while a request runs: it is completed and answered (pings too,
    /// meanwhile), then the session ends.
    Closing(Work),
    /// The channel was lost while a request runs: it is completed, then the session ends.
    Orphaned { work: Work, why: PeerError },
    /// The session ends for `why`, once whatever `state` holds is rolled back.
    Ending { why: PeerError, state: State },
}

/// Serves requests on `channel` until the session is done (`Ok`), or ends early for the reason
/// returned, with whatever was prepared and not finished rolled back.
pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    channel: Channel<S>,
    cx: &Context,
    shutdown: &CancellationToken,
    remote: &str,
) -> Result<(), PeerError> {
    let mut link = Link {
        channel,
        last_heard: Instant::now(),
    };
    let mut activity = Activity::Idle(State::Greeted);
    loop {
        activity = match activity {
            Activity::Idle(State::Done) => return Ok(()),
            Activity::Idle(state) => idle(state, &mut link, cx, shutdown).await,
            Activity::Working(mut work) => match beside(&mut work, &mut link, Some(shutdown)).await
            {
                Beside::Done(state, reply) => match link.channel.send(&reply).await {
                    Ok(()) => Activity::Idle(state),
                    Err(why) => Activity::Ending { why, state },
                },
                Beside::ShutDown => Activity::Closing(work),
                Beside::Lost(why) => Activity::Orphaned { work, why },
            },
            Activity::Closing(mut work) => match beside(&mut work, &mut link, None).await {
                Beside::Done(state, reply) => {
                    let _ = link.channel.send(&reply).await;
                    Activity::Ending {
                        why: PeerError::Closed,
                        state,
                    }
                }
                Beside::ShutDown | Beside::Lost(_) => Activity::Orphaned {
                    work,
                    why: PeerError::Closed,
                },
            },
            Activity::Orphaned { work, why } => {
                let (state, _reply) = work.await;
                Activity::Ending { why, state }
            }
            Activity::Ending { why, state } => return Err(end(state, why, remote).await),
        };
    }
}

/// Idle: one event, a request (answered at once, or started as work), the channel lost,
/// shutdown, or (prepared) the destination QEMU gone.
async fn idle<S: AsyncRead + AsyncWrite + Unpin>(
    mut state: State,
    link: &mut Link<S>,
    cx: &Context,
    shutdown: &CancellationToken,
) -> Activity {
    let heard = tokio::select! {
        _ = shutdown.cancelled() => return Activity::Ending { why: PeerError::Closed, state },
        () = destination_gone(&mut state) => {
            let gone = Message::Gone { reason: "the destination QEMU exited".into() };
            let _ = link.channel.send(&gone).await;
            return Activity::Ending { why: PeerError::Closed, state };
        }
        heard = link.next() => heard,
    };
    let msg = match heard {
        Ok(msg) => msg,
        Err(e) => {
            let why = link.lost(e, state.refusal()).await;
            return Activity::Ending { why, state };
        }
    };
    match state.step(msg, cx) {
        Step::Work(work) => Activity::Working(work),
        Step::Reply(state, reply) => match link.channel.send(&reply).await {
            Ok(()) => Activity::Idle(state),
            Err(why) => Activity::Ending { why, state },
        },
    }
}

/// Resolves when a prepared session's destination QEMU exits; never in any other state.
async fn destination_gone(state: &mut State) {
    match state {
        State::Prepared { side, .. } => side.lost().await,
        _ => std::future::pending().await,
    }
}

/// How a request that ran beside the channel came to an end.
enum Beside {
    /// It is done: the next state and the reply.
    Done(State, Message),
    /// The service shuts down; the request still runs.
    ShutDown,
    /// The channel was lost, for this reason; the request still runs.
    Lost(PeerError),
}

/// Runs `work` while answering the channel (pings with `pong`, any other request `busy`)
/// until it is done, the channel is lost, or (watching `shutdown`) the service shuts down.
async fn beside<S: AsyncRead + AsyncWrite + Unpin>(
    work: &mut Work,
    link: &mut Link<S>,
    shutdown: Option<&CancellationToken>,
) -> Beside {
    loop {
        let heard = tokio::select! {
            (state, reply) = &mut *work => return Beside::Done(state, reply),
            () = cancelled(shutdown) => return Beside::ShutDown,
            heard = link.next() => heard,
        };
        let reply = match heard {
            Ok(Message::Ping) => Message::Pong,
            Ok(other) => Message::Error {
                kind: ErrorKind::Busy,
                message: format!("{} while a request is under way", other.type_name()),
                refusal: false,
            },
            // The state is the request's while it runs; a broken frame is answered as the
            // session always has, as a refusal.
            Err(e) => return Beside::Lost(link.lost(e, true).await),
        };
        if let Err(e) = link.channel.send(&reply).await {
            return Beside::Lost(e);
        }
    }
}

/// Resolves when `shutdown` is cancelled; never without one.
async fn cancelled(shutdown: Option<&CancellationToken>) {
    match shutdown {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// The end of a session for `why`: whatever `state` holds is rolled back first.
async fn end(state: State, why: PeerError, remote: &str) -> PeerError {
    if state.footprint() != Footprint::None {
        tracing::warn!(%remote, "rolling back the destination: the session ended early");
        for p in state.roll_back().await.problems {
            tracing::warn!("{p}");
        }
    }
    why
}

/// The control channel, and when the source was last heard on it.
struct Link<S> {
    channel: Channel<S>,
    last_heard: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// The next message. Any error means the channel is lost: it closed, broke, or was silent
    /// for [`HEARTBEAT_TIMEOUT`]. Cancel-safe, as [`Channel::next`] is.
    async fn next(&mut self) -> Result<Message, PeerError> {
        let heard = tokio::select! {
            heard = self.channel.next() => heard,
            () = tokio::time::sleep_until(self.last_heard + HEARTBEAT_TIMEOUT) => {
                return Err(PeerError::Silent(HEARTBEAT_TIMEOUT));
            }
        };
        self.last_heard = Instant::now();
        heard
    }

    /// `e`, the error [`Link::next`] gave, as why the channel is lost. A frame that was no
    /// message (or of another version) is answered first, with `refusal` saying whether
    /// nothing was changed.
    async fn lost(&mut self, e: PeerError, refusal: bool) -> PeerError {
        if matches!(e, PeerError::Frame(_) | PeerError::Version { .. }) {
            let reply = Message::Error {
                kind: e.kind(),
                message: e.to_string(),
                refusal,
            };
            let _ = self.channel.send(&reply).await;
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::DuplexStream;
    use tokio::net::UnixListener;
    use tokio::task::JoinHandle;

    use super::super::testing::{FakeDestination, context, fake_destination, opts, plan};
    use super::*;

    /// Longer than any step here takes; shorter than the heartbeat timeout.
    const T: Duration = Duration::from_secs(5);

    /// The source's end of a session's channel, the service's shutdown, and the session's task.
    type Session = (
        Channel<DuplexStream>,
        CancellationToken,
        JoinHandle<Result<(), PeerError>>,
    );

    /// A session serving an in-memory channel, with plain migrations allowed and `qmp_dir` as
    /// its QMP directory: the source's end of the channel, the service's shutdown, the session.
    fn session(qmp_dir: &Path) -> Session {
        let mut o = opts();
        o.qmp_dir = qmp_dir.to_path_buf();
        o.allow_plain = true;
        o.qmp_timeout = Duration::from_secs(60);
        let cx = Context {
            opts: Arc::new(o),
            ..context()
        };
        let (source, service) = tokio::io::duplex(64 * 1024);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task =
            tokio::spawn(async move { serve(Channel::new(service), &cx, &stop, "test").await });
        (Channel::new(source), shutdown, task)
    }

    /// Sends `msg` and returns the reply.
    async fn ask(source: &mut Channel<DuplexStream>, msg: Message) -> Message {
        source.send(&msg).await.expect("send");
        source.recv(T).await.expect("a reply")
    }

    fn preflight() -> Message {
        Message::Preflight {
            qmp: "vm.sock".into(),
            plan: plan(false),
        }
    }

    /// A session preflighted on a [`fake_destination`] in `dir` whose command `held` waits.
    async fn preflighted(dir: &Path, held: &'static str) -> (Session, FakeDestination) {
        let qemu = fake_destination(&dir.join("vm.sock"), held);
        let (mut source, shutdown, task) = session(dir);
        let checked = ask(&mut source, preflight()).await;
        assert!(
            matches!(checked, Message::Preflighted { .. }),
            "{checked:?}"
        );
        ((source, shutdown, task), qemu)
    }

    /// [`preflighted`], then prepared.
    async fn prepared(dir: &Path, held: &'static str) -> (Session, FakeDestination) {
        let ((mut source, shutdown, task), qemu) = preflighted(dir, held).await;
        let prepared = ask(&mut source, Message::Prepare).await;
        assert!(matches!(prepared, Message::Prepared { .. }), "{prepared:?}");
        ((source, shutdown, task), qemu)
    }

    /// How the session `task` ended.
    async fn ended(task: JoinHandle<Result<(), PeerError>>) -> Result<(), PeerError> {
        tokio::time::timeout(T, task)
            .await
            .expect("the session ends")
            .expect("the session's task")
    }

    #[tokio::test]
    async fn while_a_request_runs_pings_are_answered_and_other_requests_are_busy() {
        let dir = tempfile::tempdir().expect("dir");
        // A QMP socket that accepts and never greets: the preflight waits on it.
        let listener = UnixListener::bind(dir.path().join("vm.sock")).expect("bind");
        let (mut source, _shutdown, _task) = session(dir.path());
        source.send(&preflight()).await.expect("send");
        let (qemu, _) = listener.accept().await.expect("the preflight connects");

        let pong = ask(&mut source, Message::Ping).await;
        let busy = ask(&mut source, Message::Prepare).await;
        drop(qemu);
        let failed = source.recv(T).await.expect("the preflight's reply");
        let pong_after = ask(&mut source, Message::Ping).await;

        assert_eq!(pong, Message::Pong);
        assert!(
            matches!(
                busy,
                Message::Error {
                    kind: ErrorKind::Busy,
                    refusal: false,
                    ..
                }
            ),
            "{busy:?}"
        );
        assert!(
            matches!(failed, Message::Error { refusal: true, .. }),
            "{failed:?}"
        );
        assert_eq!(pong_after, Message::Pong);
    }

    #[tokio::test]
    async fn a_channel_lost_while_prepare_runs_ends_the_session_after_it_and_rolls_it_back() {
        let dir = tempfile::tempdir().expect("dir");
        let ((mut source, _shutdown, task), mut qemu) =
            preflighted(dir.path(), "migrate-incoming").await;
        source.send(&Message::Prepare).await.expect("send");
        qemu.received("migrate-incoming").await;

        drop(source);
        qemu.release.notify_one();
        let after = qemu.rest().await;
        let ended = ended(task).await;

        // Prepare went on to its end (`stop` comes after `migrate-incoming`), then was undone.
        assert_eq!(after.last().map(String::as_str), Some("quit"), "{after:?}");
        assert!(matches!(ended, Err(PeerError::Closed)), "{ended:?}");
    }

    #[tokio::test]
    async fn a_channel_closed_after_preflight_changes_nothing_on_the_destination() {
        let dir = tempfile::tempdir().expect("dir");
        let ((source, _shutdown, task), mut qemu) = preflighted(dir.path(), "").await;
        let preflight_sent = qemu.so_far();

        drop(source);
        let ended = ended(task).await;
        let after = qemu.rest().await;

        assert!(preflight_sent.contains(&"query-status".to_string()));
        assert!(after.is_empty(), "{after:?}");
        assert!(matches!(ended, Err(PeerError::Closed)), "{ended:?}");
    }

    #[tokio::test]
    async fn a_channel_closed_while_prepared_rolls_the_destination_back() {
        let dir = tempfile::tempdir().expect("dir");
        let ((source, _shutdown, task), mut qemu) = prepared(dir.path(), "").await;

        drop(source);
        let ended = ended(task).await;
        let after = qemu.rest().await;

        assert_eq!(after.last().map(String::as_str), Some("quit"), "{after:?}");
        assert!(matches!(ended, Err(PeerError::Closed)), "{ended:?}");
    }

    #[tokio::test]
    async fn a_finish_under_way_at_shutdown_is_completed_answered_and_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let ((mut source, shutdown, task), mut qemu) = prepared(dir.path(), "cont").await;
        source
            .send(&Message::Finish { resume: true })
            .await
            .expect("send");
        qemu.received("cont").await;

        shutdown.cancel();
        let pong = ask(&mut source, Message::Ping).await;
        qemu.release.notify_one();
        let finished = source.recv(T).await.expect("the finish's reply");
        let ended = ended(task).await;
        qemu.exit.cancel();
        let after = qemu.rest().await;

        assert_eq!(pong, Message::Pong);
        assert!(matches!(finished, Message::Finished { .. }), "{finished:?}");
        assert!(matches!(ended, Err(PeerError::Closed)), "{ended:?}");
        assert!(!after.contains(&"quit".to_string()), "{after:?}");
    }

    #[tokio::test]
    async fn a_destination_gone_while_prepared_is_told_to_the_source_and_the_session_ends() {
        let dir = tempfile::tempdir().expect("dir");
        let ((mut source, _shutdown, task), qemu) = prepared(dir.path(), "").await;

        qemu.exit.cancel();
        let gone = source.recv(T).await.expect("a message");
        let ended = ended(task).await;

        assert!(matches!(gone, Message::Gone { .. }), "{gone:?}");
        assert!(matches!(ended, Err(PeerError::Closed)), "{ended:?}");
    }
}
