//! QMP through libvirt, for a domain that declares no QMP monitor of its own.
//!
//! libvirt keeps QEMU's monitor to itself. Two of its calls still reach QEMU:
//! `virDomainQemuMonitorCommand` (`virsh qemu-monitor-command`) sends one QMP command on
//! libvirt's monitor and returns QEMU's reply as text, and
//! `virConnectDomainQemuMonitorEventRegister` delivers QEMU's events. [`Passthrough`] turns the
//! two into an ordinary QMP socket in a private directory (mode 0700), so the rest of the tool
//! talks to such a domain exactly as to a QEMU whose socket it was given, with the same client,
//! timeouts and undo. libvirt marks the domain tainted `custom-monitor`, as it does for
//! `virsh qemu-monitor-command`.
//!
//! What differs from a socket of QEMU's own:
//! - the greeting offers no out-of-band execution;
//! - commands reach QEMU one at a time, each inside a libvirt job of its own (so a libvirt job
//!   already running on the domain makes them wait, and libvirt may refuse them);
//! - events come through libvirt's event loop, a little after QEMU sent them, so one may
//!   arrive after the reply to a command sent later. The tool never relies on that order: it
//!   cross-checks events with queries.
//!
//! libvirt's event loop ([`virEventRegisterDefaultImpl`], run on a thread of its own) is
//! started once per process, before the passthrough's connection is opened, since libvirt
//! delivers events (and keepalives) only on connections opened after it.

use std::ffi::{CStr, c_char, c_int, c_longlong, c_uint, c_void};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tokio::io::Interest;
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use virt::sys;

use super::{Domain, Libvirt, LibvirtError};

/// The longest command line a client may send; real commands are a few hundred bytes.
const MAX_LINE: usize = 1024 * 1024;

/// A QMP socket served through libvirt's monitor passthrough for one domain. Closed, its events
/// deregistered and its directory removed, on drop.
#[derive(Debug)]
pub struct Passthrough {
    path: PathBuf,
    stop: CancellationToken,
    inner: Arc<Inner>,
    callback: c_int,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Inner {
    // Before `libvirt`: dropped first.
    domain: Domain,
    libvirt: Libvirt,
    greeting: String,
    sinks: Arc<Sinks>,
}

/// Where QEMU's events go: one queue per connected client.
#[derive(Debug, Default)]
struct Sinks(Mutex<Vec<mpsc::UnboundedSender<String>>>);

impl Sinks {
    fn add(&self) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
        rx
    }

    fn send(&self, line: &str) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tx| tx.send(line.to_string()).is_ok());
    }
}

impl Passthrough {
    /// Connects to `uri`, looks up domain `name`, checks that libvirt passes a command through
    /// (`query-version`, whose reply becomes the greeting), subscribes to the domain's QEMU
    /// events and starts serving QMP on a socket of its own ([`Passthrough::path`]). Blocks on
    /// libvirt: run it off the async threads, inside a tokio runtime.
    pub fn start(uri: &str, name: &str) -> Result<Passthrough, LibvirtError> {
        start_event_loop()?;
        let libvirt = Libvirt::connect(uri)?;
        let domain = libvirt.domain(name)?;
        let version = domain.monitor_command(r#"{"execute":"query-version"}"#)?;
        let version: Value =
            serde_json::from_str(&version).map_err(|e| LibvirtError::Passthrough {
                name: name.to_string(),
                reason: format!("query-version answered with something not JSON: {e}"),
            })?;
        let Some(version) = version.get("return") else {
            return Err(LibvirtError::Passthrough {
                name: name.to_string(),
                reason: format!("query-version failed: {version}"),
            });
        };
        let greeting = json!({"QMP": {"version": version, "capabilities": []}}).to_string();
        let sinks = Arc::new(Sinks::default());
        let callback = register_events(&libvirt, &domain, sinks.clone())?;
        let dir = tempfile::Builder::new()
            .prefix("qtm-passthrough-")
            .tempdir()
            .map_err(|e| LibvirtError::Passthrough {
                name: name.to_string(),
                reason: format!("cannot make a private directory for its socket: {e}"),
            });
        let bound = dir.and_then(|dir| {
            let path = dir.path().join("qmp.sock");
            let listener = UnixListener::bind(&path).map_err(|e| LibvirtError::Passthrough {
                name: name.to_string(),
                reason: format!("cannot listen on {}: {e}", path.display()),
            })?;
            Ok((dir, path, listener))
        });
        let inner = Arc::new(Inner {
            libvirt,
            domain,
            greeting,
            sinks,
        });
        let (dir, path, listener) = match bound {
            Ok(bound) => bound,
            Err(e) => {
                deregister_events(&inner.libvirt, callback);
                return Err(e);
            }
        };
        let stop = CancellationToken::new();
        tokio::spawn(accept(listener, inner.clone(), stop.clone()));
        tracing::info!(domain = %name, socket = %path.display(), "QMP through libvirt's passthrough");
        Ok(Passthrough {
            path,
            stop,
            inner,
            callback,
            _dir: dir,
        })
    }

    /// The socket to connect a QMP client to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Passthrough {
    fn drop(&mut self) {
        self.stop.cancel();
        deregister_events(&self.inner.libvirt, self.callback);
    }
}

async fn accept(listener: UnixListener, inner: Arc<Inner>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "passthrough socket: accept failed");
                    return;
                }
            },
        };
        let (inner, stop) = (inner.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(stream, inner) => {}
            }
        });
    }
}

/// One client: the greeting, then each command passed through in turn while QEMU's events are
/// forwarded beside them.
async fn serve(stream: UnixStream, inner: Arc<Inner>) {
    let (read, write) = stream.into_split();
    let write = Arc::new(tokio::sync::Mutex::new(write));
    let send = |line: String| {
        let write = write.clone();
        async move {
            let mut w = write.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.write_all(b"\n").await
        }
    };
    if send(inner.greeting.clone()).await.is_err() {
        return;
    }
    let mut events = inner.sinks.add();
    let forward = {
        async move {
            while let Some(line) = events.recv().await {
                if send(line).await.is_err() {
                    return;
                }
            }
        }
    };
    let commands = async {
        let mut lines = FdLines::new(read);
        while let Some((line, fds)) = lines.next().await {
            let inner = inner.clone();
            let reply = match tokio::task::spawn_blocking(move || answer(&inner, &line, &fds)).await
            {
                Ok(reply) => reply,
                Err(_) => error_reply(None, "the passthrough failed"),
            };
            if send(reply).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = forward => {}
        _ = commands => {}
    }
}

/// The reply to one command line, QEMU's through libvirt or one of our own; `fds` came with
/// the line and go to QEMU with it.
fn answer(inner: &Inner, line: &str, fds: &[OwnedFd]) -> String {
    let Ok(Value::Object(mut cmd)) = serde_json::from_str::<Value>(line) else {
        return error_reply(None, "JSON parse error");
    };
    let id = cmd.remove("id");
    if cmd.contains_key("exec-oob") {
        return error_reply(id, "out-of-band execution is not offered through libvirt");
    }
    match cmd.get("execute").and_then(Value::as_str) {
        None => return error_reply(id, "QMP input lacks member 'execute'"),
        // libvirt's monitor left capabilities negotiation long ago; ours is a formality.
        Some("qmp_capabilities") => return with_id(json!({"return": {}}), id),
        Some(_) => {}
    }
    let cmd = Value::Object(cmd).to_string();
    let sent = match fds.is_empty() {
        true => inner.domain.monitor_command(&cmd),
        false => {
            let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            inner.domain.monitor_command_with_files(&cmd, &fds)
        }
    };
    match sent {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(mut reply)) => {
                // libvirt's own id for the command it sent.
                reply.remove("id");
                with_id(Value::Object(reply), id)
            }
            _ => error_reply(
                id,
                &format!("libvirt passed back something not QMP: {text}"),
            ),
        },
        Err(e) => error_reply(id, &format!("libvirt: {e}")),
    }
}

/// Command lines from a client, each with the descriptors that came with it (`SCM_RIGHTS`,
/// as QMP's `getfd` expects): a descriptor belongs to the line its bytes' chunk started in.
struct FdLines {
    read: OwnedReadHalf,
    buf: Vec<u8>,
    /// One `recvmsg`'s room, kept from read to read.
    chunk: Vec<u8>,
    /// Received descriptors, each with the offset in `buf` of the chunk that carried it.
    fds: Vec<(usize, OwnedFd)>,
}

impl FdLines {
    fn new(read: OwnedReadHalf) -> FdLines {
        FdLines {
            read,
            buf: Vec::new(),
            chunk: vec![0; 64 * 1024],
            fds: Vec::new(),
        }
    }

    /// The next line (without its end) and its descriptors; `None` at the end of the stream,
    /// on an error, or on a line longer than [`MAX_LINE`].
    async fn next(&mut self) -> Option<(String, Vec<OwnedFd>)> {
        loop {
            if let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let (mine, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fds)
                    .into_iter()
                    .partition(|(at, _)| *at <= end);
                self.fds = later
                    .into_iter()
                    .map(|(at, fd)| (at - end - 1, fd))
                    .collect();
                let text = String::from_utf8_lossy(&line[..end]);
                let text = text.strip_suffix('\r').unwrap_or(&text).to_string();
                return Some((text, mine.into_iter().map(|(_, fd)| fd).collect()));
            }
            if self.buf.len() > MAX_LINE {
                tracing::warn!("passthrough socket: a command line over {MAX_LINE} bytes");
                return None;
            }
            let at = self.buf.len();
            let socket = self.read.as_ref();
            let chunk = &mut self.chunk;
            let (n, fds) = socket
                .async_io(Interest::READABLE, || receive(socket, chunk))
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
            self.fds.extend(fds.into_iter().map(|fd| (at, fd)));
        }
    }
}

/// One `recvmsg` on a non-blocking socket into `chunk`: how many bytes came, and any
/// descriptors with them.
fn receive(socket: &UnixStream, chunk: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(chunk)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((n, fds))
}

fn with_id(mut reply: Value, id: Option<Value>) -> String {
    if let (Some(id), Value::Object(map)) = (id, &mut reply) {
        map.insert("id".into(), id);
    }
    reply.to_string()
}

fn error_reply(id: Option<Value>, desc: &str) -> String {
    with_id(
        json!({"error": {"class": "GenericError", "desc": desc}}),
        id,
    )
}

/// Starts libvirt's default event loop on a thread of its own, once per process.
fn start_event_loop() -> Result<(), LibvirtError> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("libvirt-events".into())
                .spawn(|| {
                    loop {
                        if let Err(e) = virt::event::event_run_default_impl() {
                            tracing::warn!(error = %e, "libvirt's event loop failed an iteration");
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                })
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|reason| LibvirtError::EventLoop { reason })
}

/// Registers [`on_event`] for every QEMU event of `domain`; returns libvirt's callback id.
fn register_events(
    libvirt: &Libvirt,
    domain: &Domain,
    sinks: Arc<Sinks>,
) -> Result<c_int, LibvirtError> {
    let opaque = Box::into_raw(Box::new(sinks)).cast::<c_void>();
    // SAFETY: both pointers are live for the call; a null event name means every event; libvirt
    // hands `opaque` to `on_event` until deregistration, then to `free_sinks`, exactly once.
    let id = unsafe {
        sys::virConnectDomainQemuMonitorEventRegister(
            libvirt.conn.as_ptr(),
            domain.dom.as_ptr(),
            std::ptr::null(),
            Some(on_event),
            opaque,
            Some(free_sinks),
            0,
        )
    };
    if id < 0 {
        // Whether libvirt already called `free_sinks` on this failure is not documented:
        // leaking one Arc is the safe side of a double free.
        return Err(LibvirtError::Domain {
            action: "subscribe to the QEMU events of",
            name: domain.name.clone(),
            uri: libvirt.uri.clone(),
            source: virt::error::Error::last_error(),
        });
    }
    Ok(id)
}

fn deregister_events(libvirt: &Libvirt, callback: c_int) {
    // SAFETY: the connection is open (it lives in `Inner`); the id came from registration.
    let rc =
        unsafe { sys::virConnectDomainQemuMonitorEventDeregister(libvirt.conn.as_ptr(), callback) };
    if rc < 0 {
        tracing::debug!(
            callback,
            "deregistering the passthrough's event callback failed"
        );
    }
}

/// libvirt's event callback: one QEMU event, as a QMP event line to every client.
unsafe extern "C" fn on_event(
    _conn: sys::virConnectPtr,
    _dom: sys::virDomainPtr,
    event: *const c_char,
    seconds: c_longlong,
    micros: c_uint,
    details: *const c_char,
    opaque: *mut c_void,
) {
    if event.is_null() || opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the `Box<Arc<Sinks>>` made at registration, freed only by
    // `free_sinks` after the last callback; libvirt's strings are NUL-terminated and live for
    // the call.
    let (sinks, name) = unsafe {
        (
            &*opaque.cast::<Arc<Sinks>>(),
            CStr::from_ptr(event).to_string_lossy(),
        )
    };
    let mut line = Map::new();
    line.insert("event".into(), Value::String(name.into_owned()));
    if !details.is_null() {
        // SAFETY: as above.
        let text = unsafe { CStr::from_ptr(details) }.to_string_lossy();
        if let Ok(data) = serde_json::from_str::<Value>(&text) {
            line.insert("data".into(), data);
        }
    }
    line.insert(
        "timestamp".into(),
        json!({"seconds": seconds, "microseconds": micros}),
    );
    sinks.send(&Value::Object(line).to_string());
}

unsafe extern "C" fn free_sinks(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: made by `Box::into_raw` at registration; libvirt calls this once.
        drop(unsafe { Box::from_raw(opaque.cast::<Arc<Sinks>>()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

    fn send(socket: &std::os::unix::net::UnixStream, bytes: &[u8], fd: Option<BorrowedFd<'_>>) {
        let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg: Vec<_> = match fd {
            Some(_) => vec![ControlMessage::ScmRights(&fds)],
            None => vec![],
        };
        let iov = [std::io::IoSlice::new(bytes)];
        let sent = sendmsg::<()>(socket.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .expect("sendmsg");
        assert_eq!(sent, bytes.len());
    }

    /// A descriptor goes to the line its chunk started in, never to a later one.
    #[tokio::test]
    async fn descriptors_belong_to_the_line_they_came_with() {
        let (client, server) = std::os::unix::net::UnixStream::pair().expect("pair");
        server.set_nonblocking(true).expect("nonblocking");
        let (read, _write) = UnixStream::from_std(server).expect("tokio").into_split();
        let mut lines = FdLines::new(read);
        let file = tempfile::tempfile().expect("tempfile");

        send(
            &client,
            b"{\"execute\":\"getfd\"}\r\n{\"execute\":\"x\"}\n",
            Some(file.as_fd()),
        );
        send(&client, b"{\"execute\":\"par", None);
        send(&client, b"t\"}\n", Some(file.as_fd()));
        drop(client);

        let (line, fds) = lines.next().await.expect("first line");
        assert_eq!(line, "{\"execute\":\"getfd\"}");
        assert_eq!(fds.len(), 1);
        let (line, fds) = lines.next().await.expect("second line");
        assert_eq!(line, "{\"execute\":\"x\"}");
        assert!(fds.is_empty());
        // The descriptor came with the end of a line started earlier: it is that line's.
        let (line, fds) = lines.next().await.expect("third line");
        assert_eq!(line, "{\"execute\":\"part\"}");
        assert_eq!(fds.len(), 1);
        assert!(lines.next().await.is_none(), "the end of the stream");
    }
}
