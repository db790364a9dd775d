//! Asynchronous QMP (QEMU Machine Protocol) client.
//!
//! This module knows the protocol and nothing else: no QEMU command names beyond the handshake,
//! no migration. Typed commands live in [`crate::qemu`] and reach the wire through the
//! [`Command`] trait defined here.
//!
//! The protocol, as this client drives it:
//! 1. Connect to the Unix socket; QEMU sends a greeting (`{"QMP": {...}}`).
//! 2. Send `qmp_capabilities` (asking for `oob` when the greeting offers it).
//! 3. From then on every command carries a numeric `id`; one reader task matches each reply to
//!    its caller by that id and hands every event to every subscriber.
//!
//! Guarantees:
//! - Many commands may be in flight at once; each has its own timeout.
//! - A command that times out leaves nothing behind: its late reply is recognised by id and
//!   dropped, so it never answers the next command.
//! - Events are never lost to command traffic: each subscriber has an unbounded queue.
//! - A closed socket, or bytes that are not QMP, fail every pending and future command with an
//!   error; nothing waits forever and nothing panics. An unknown event or an unknown field in a
//!   reply is not an error.
//! - A file descriptor can go with a command ([`Qmp::call_with_fd`], as QEMU's `getfd` takes
//!   one) over a Unix socket; a peer that cannot take it answers with an error, as QEMU does
//!   to a `getfd` without one.

mod error;
pub mod fake;
mod wire;

pub use error::QmpError;
pub use wire::{Event, Greeting, QemuVersion};

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

use wire::Incoming;

/// The timeout for a command when the caller gives none.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest line this client accepts from QEMU. Real replies are far smaller; the limit keeps
/// a peer that never sends a newline from growing the buffer without bound.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// A QMP command with typed arguments and reply.
///
/// The arguments are the `Serialize` form of the implementing type; a unit struct or a struct
/// with no fields sends no `arguments` member.
pub trait Command: Serialize {
    /// The command name, as in QEMU's QAPI schema (`query-status`, `migrate`, ...).
    const NAME: &'static str;
    /// The decoded `return` member of a successful reply.
    type Output: DeserializeOwned;
}

type Reply = Result<Value, QmpError>;

#[derive(Debug)]
struct Shared {
    /// Names the peer in every error (the socket path, or a label for non-socket streams).
    peer: String,
    next_id: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// `Some` once the reader task has stopped: the reason every later command fails with.
    closed: Option<String>,
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    subscribers: Vec<mpsc::UnboundedSender<Event>>,
}

type Writer = Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

/// A connected QMP client. Cheap to clone; all clones share one connection.
#[derive(Clone)]
pub struct Qmp {
    shared: Arc<Shared>,
    writer: Writer,
    greeting: Arc<Greeting>,
    oob: bool,
    /// A duplicate of the Unix socket, for a command that carries a file descriptor
    /// (`SCM_RIGHTS`); `None` when the peer cannot take one.
    fd_socket: Option<Arc<OwnedFd>>,
    /// The peer's process id (`SO_PEERCRED`), when the socket is a Unix socket.
    peer_pid: Option<u32>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("peer", &self.shared.peer)
            .field("oob", &self.oob)
            .finish_non_exhaustive()
    }
}

/// A stream of the events QEMU sent after [`Qmp::subscribe`] was called.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Events {
    /// The next event, or `None` once the connection is closed and every queued event was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// An event already queued, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

/// Removes a pending command's entry when its caller stops waiting (timeout or a dropped
/// future), so the reader drops the late reply instead of misdelivering it.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.pending.remove(&self.id);
        }
    }
}

impl Qmp {
    /// Connects to QEMU's QMP Unix socket at `path` and negotiates capabilities, all within
    /// `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let peer = path.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::ConnectTimeout {
                peer: peer.clone(),
                after: timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: PathBuf::from(path),
                source,
            })?;
        let peer_pid = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .and_then(|pid| u32::try_from(pid).ok());
        let fd_socket = stream.as_fd().try_clone_to_owned().ok().map(Arc::new);
        let (read, write) = stream.into_split();
        let mut qmp = Self::handshake(peer, read, write, timeout).await?;
        qmp.fd_socket = fd_socket;
        qmp.peer_pid = peer_pid;
        Ok(qmp)
    }

    /// The process id of the monitor's peer, as the kernel reports it for a Unix socket
    /// (`None` for any other stream): QEMU's, or this process's own for a socket it serves
    /// itself (libvirt's passthrough).
    pub fn peer_pid(&self) -> Option<u32> {
        self.peer_pid
    }

    /// Whether [`Qmp::call_with_fd`] can pass a descriptor to this peer.
    pub fn can_pass_fds(&self) -> bool {
        self.fd_socket.is_some()
    }

    /// Executes a typed command with `fd` passed alongside it (`SCM_RIGHTS`), as `getfd` and
    /// `add-fd` expect. Fails with [`QmpError::Protocol`] at once when the peer cannot take a
    /// descriptor ([`Qmp::can_pass_fds`]).
    pub async fn call_with_fd<C: Command>(
        &self,
        cmd: &C,
        fd: BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<C::Output, QmpError> {
        if self.fd_socket.is_none() {
            return Err(QmpError::protocol(
                &self.shared.peer,
                format!(
                    "{} needs a file descriptor, which this monitor cannot take",
                    C::NAME
                ),
            ));
        }
        let args = encode_args(C::NAME, cmd)?;
        let value = self
            .send_with(C::NAME, args, timeout, false, Some(fd))
            .await?;
        decode_reply::<C::Output>(C::NAME, value)
    }

    /// Runs the protocol over any byte stream; `peer` names it in errors. Used by
    /// [`Qmp::connect`] and by tests that script a fake peer.
    pub async fn handshake<R, W>(
        peer: String,
        read: R,
        write: W,
        timeout: Duration,
    ) -> Result<Qmp, QmpError>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
        let first = tokio::time::timeout(timeout, lines.next())
            .await
            .map_err(|_| QmpError::ConnectTimeout {
                peer: peer.clone(),
                after: timeout,
            })?;
        let greeting = match first {
            None => {
                return Err(QmpError::Closed {
                    peer,
                    reason: "closed before sending a greeting".into(),
                });
            }
            Some(Err(e)) => return Err(QmpError::protocol(&peer, e.to_string())),
            Some(Ok(line)) => Greeting::parse(&line).map_err(|detail| QmpError::Protocol {
                peer: peer.clone(),
                detail,
            })?,
        };
        let oob = greeting.offers_oob();

        let shared = Arc::new(Shared {
            peer,
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
        });
        tokio::spawn(reader_task(shared.clone(), lines));

        let qmp = Qmp {
            shared,
            writer: Arc::new(tokio::sync::Mutex::new(Box::new(write))),
            greeting: Arc::new(greeting),
            oob,
            fd_socket: None,
            peer_pid: None,
        };
        let enable: Vec<&str> = if oob { vec!["oob"] } else { vec![] };
        let args = if enable.is_empty() {
            None
        } else {
            Some(serde_json::json!({ "enable": enable }))
        };
        qmp.execute_raw("qmp_capabilities", args, timeout).await?;
        Ok(qmp)
    }

    /// The greeting QEMU sent (its version and capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// The peer's name as used in errors (normally the socket path).
    pub fn peer(&self) -> &str {
        &self.shared.peer
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        self.shared
            .state
            .lock()
            .map(|s| s.closed.is_none())
            .unwrap_or(false)
    }

    /// Ends this client's side of the connection (shuts its write half down, which QEMU reads
    /// as the client leaving): QEMU then drops whatever it had not started of this
    /// connection's commands and serves the next client of its socket. Every clone is closed
    /// with it.
    pub async fn close(&self) {
        let mut writer = self.writer.lock().await;
        if let Err(e) = writer.shutdown().await {
            tracing::debug!(peer = %self.shared.peer, "closing the QMP connection: {e}");
        }
    }

    /// Starts receiving events. Only events that arrive after this call are delivered.
    pub fn subscribe(&self) -> Events {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Ok(mut state) = self.shared.state.lock() {
            // A closed connection gets a stream that ends at once.
            if state.closed.is_none() {
                state.subscribers.push(tx);
            }
        }
        Events { rx }
    }

    /// Executes a typed command with [`DEFAULT_COMMAND_TIMEOUT`].
    pub async fn call<C: Command>(&self, cmd: &C) -> Result<C::Output, QmpError> {
        self.call_timeout(cmd, DEFAULT_COMMAND_TIMEOUT).await
    }

    /// Executes a typed command, failing with [`QmpError::Timeout`] after `timeout`.
    pub async fn call_timeout<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, QmpError> {
        let args = encode_args(C::NAME, cmd)?;
        let value = self.send(C::NAME, args, timeout, false).await?;
        decode_reply::<C::Output>(C::NAME, value)
    }

    /// Executes a typed command out of band (`exec-oob`), so it overtakes commands QEMU is still
    /// working on. Falls back to a normal command when QEMU did not offer `oob`. Only commands
    /// QEMU marks `allow-oob` (such as `migrate-recover`, `migrate-pause`) may be sent this way.
    pub async fn call_oob<C: Command>(
        &self,
        cmd: &C,
        timeout: Duration,
    ) -> Result<C::Output, QmpError> {
        let args = encode_args(C::NAME, cmd)?;
        let value = self.send(C::NAME, args, timeout, self.oob).await?;
        decode_reply::<C::Output>(C::NAME, value)
    }

    /// Executes a command given by name with raw JSON arguments, returning the raw `return`.
    pub async fn execute_raw(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(name, args, timeout, false).await
    }

    async fn send(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
        oob: bool,
    ) -> Result<Value, QmpError> {
        self.send_with(name, args, timeout, oob, None).await
    }

    async fn send_with(
        &self,
        name: &str,
        args: Option<Value>,
        timeout: Duration,
        oob: bool,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut state = self.shared.state.lock().map_err(|_| self.poisoned())?;
            if let Some(reason) = &state.closed {
                return Err(QmpError::Closed {
                    peer: self.shared.peer.clone(),
                    reason: reason.clone(),
                });
            }
            state.pending.insert(id, tx);
        }
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };

        let mut msg = serde_json::Map::new();
        let verb = if oob { "exec-oob" } else { "execute" };
        msg.insert(verb.into(), Value::String(name.into()));
        if let Some(args) = args {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = Value::Object(msg).to_string();
        tracing::debug!(peer = %self.shared.peer, "-> {line}");
        line.push('\n');

        // A timeout too long for an `Instant` (`Duration::MAX`) means no deadline.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let write = async {
            let mut w = self.writer.lock().await;
            let mut bytes = line.as_bytes();
            if let (Some(fd), Some(socket)) = (fd, &self.fd_socket) {
                // Whatever the writer holds goes first; the descriptor rides on the first
                // byte of this line, the rest through the writer.
                w.flush().await?;
                let sent = send_with_fd(socket.as_fd(), bytes, fd).await?;
                bytes = &bytes[sent..];
            }
            w.write_all(bytes).await?;
            w.flush().await
        };
        match until(deadline, write).await {
            None => return Err(self.timeout(name, timeout)),
            Some(Err(e)) => {
                return Err(QmpError::Closed {
                    peer: self.shared.peer.clone(),
                    reason: format!("write failed: {e}"),
                });
            }
            Some(Ok(())) => {}
        }
        match until(deadline, rx).await {
            None => Err(self.timeout(name, timeout)),
            // The reader dropped the sender without answering: it has stopped.
            Some(Err(_)) => Err(QmpError::Closed {
                peer: self.shared.peer.clone(),
                reason: self.close_reason(),
            }),
            Some(Ok(reply)) => reply.map_err(|e| e.for_command(name)),
        }
    }

    fn timeout(&self, command: &str, after: Duration) -> QmpError {
        QmpError::Timeout {
            peer: self.shared.peer.clone(),
            command: command.to_string(),
            after,
        }
    }

    fn poisoned(&self) -> QmpError {
        QmpError::protocol(&self.shared.peer, "internal state lock poisoned".into())
    }

    fn close_reason(&self) -> String {
        self.shared
            .state
            .lock()
            .ok()
            .and_then(|s| s.closed.clone())
            .unwrap_or_else(|| "connection closed".into())
    }
}

/// `fut`'s output, or `None` when `deadline` passed first; no deadline waits as long as it takes.
async fn until<F: std::future::Future>(
    deadline: Option<tokio::time::Instant>,
    fut: F,
) -> Option<F::Output> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Sends the start of `bytes` with `fd` attached (`SCM_RIGHTS`) on the non-blocking Unix
/// socket `socket`; returns how many bytes went.
async fn send_with_fd(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fd: BorrowedFd<'_>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
    let fds = [fd.as_raw_fd()];
    loop {
        let iov = [std::io::IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        match sendmsg::<UnixAddr>(
            socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => return Ok(n),
            // The socket's buffer is full (QEMU not reading yet): the caller's deadline bounds
            // the wait.
            Err(nix::errno::Errno::EAGAIN) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn encode_args<C: Serialize>(name: &str, cmd: &C) -> Result<Option<Value>, QmpError> {
    let value = serde_json::to_value(cmd).map_err(|source| QmpError::Encode {
        command: name.to_string(),
        source,
    })?;
    Ok(match value {
        Value::Null => None,
        Value::Object(m) if m.is_empty() => None,
        other => Some(other),
    })
}

fn decode_reply<T: DeserializeOwned>(name: &str, value: Value) -> Result<T, QmpError> {
    serde_json::from_value(value).map_err(|source| QmpError::Decode {
        command: name.to_string(),
        source,
    })
}

/// Reads every line QEMU sends, routing replies by id and events to subscribers, until the
/// stream ends or stops being QMP. Then fails everything pending and refuses what comes later.
async fn reader_task<R>(shared: Arc<Shared>, mut lines: FramedRead<R, LinesCodec>)
where
    R: AsyncRead + Unpin,
{
    let reason = loop {
        let line = match lines.next().await {
            None => break "QEMU closed the connection".to_string(),
            Some(Err(e)) => break format!("unreadable stream: {e}"),
            Some(Ok(line)) => line,
        };
        if line.trim().is_empty() {
            continue;
        }
        tracing::debug!(peer = %shared.peer, "<- {line}");
        match Incoming::parse(&line) {
            Err(detail) => break format!("not QMP: {detail}"),
            Ok(Incoming::Reply { id, result }) => {
                let sender = shared
                    .state
                    .lock()
                    .ok()
                    .and_then(|mut s| s.pending.remove(&id));
                match sender {
                    Some(tx) => {
                        let _ = tx.send(result.map_err(|(class, desc)| QmpError::Qemu {
                            peer: shared.peer.clone(),
                            command: String::new(),
                            class,
                            desc,
                        }));
                    }
                    // The caller gave up (timeout) or the id is not ours: drop it.
                    None => tracing::debug!(peer = %shared.peer, id, "reply nobody waits for"),
                }
            }
            Ok(Incoming::UntaggedError { class, desc }) => {
                // QEMU answers a message it could not parse with an error that has no id; it
                // cannot be matched to a caller, so it is logged and the caller times out.
                tracing::warn!(peer = %shared.peer, %class, %desc, "QMP error without id");
            }
            Ok(Incoming::Event(event)) => {
                if let Ok(mut state) = shared.state.lock() {
                    state
                        .subscribers
                        .retain(|tx| tx.send(event.clone()).is_ok());
                }
            }
            Ok(Incoming::Other) => {
                tracing::debug!(peer = %shared.peer, "ignoring unknown QMP message");
            }
        }
    };
    tracing::debug!(peer = %shared.peer, %reason, "QMP reader stopped");
    if let Ok(mut state) = shared.state.lock() {
        state.closed = Some(reason.clone());
        for (_, tx) in state.pending.drain() {
            let _ = tx.send(Err(QmpError::Closed {
                peer: shared.peer.clone(),
                reason: reason.clone(),
            }));
        }
        // Dropping the senders ends every subscriber's stream.
        state.subscribers.clear();
    }
}

#[cfg(test)]
mod tests;
