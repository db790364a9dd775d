//! A job's end: the control socket and its lock, served until dropped.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::future::BoxFuture;
use nix::fcntl::Flock;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::protocol::{MAX_LINE, Reply, Request};
use super::{
    JobsError, REQUEST_READ_TIMEOUT, check_id, open_run_dir, remove_files, socket_name, try_lock,
};

/// What a job does with each request (its status, a cancel, a control).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> BoxFuture<'static, Reply>;
}

/// A job's control socket, served on the current tokio runtime until this is dropped; dropping
/// removes the socket and the lock file.
#[derive(Debug)]
pub struct JobServer {
    id: String,
    socket: PathBuf,
    dir_fd: OwnedFd,
    task: tokio::task::JoinHandle<()>,
    _lock: Flock<File>,
}

impl JobServer {
    /// Takes the id `id` in `dir` and serves `handler` on `dir/ID.sock` (see the module docs).
    /// Must be called within a tokio runtime.
    pub fn start(dir: &Path, id: &str, handler: Arc<dyn Handler>) -> Result<JobServer, JobsError> {
        check_id(id)?;
        let dir_fd = open_run_dir(dir, true)?.ok_or_else(|| JobsError::RunDir {
            path: dir.to_path_buf(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let lock = try_lock(&dir_fd, dir, id, true)?
            .ok_or_else(|| JobsError::IdInUse { id: id.to_string() })?;
        // Holding the lock: a socket of this name is a crashed job's.
        remove_socket(&dir_fd, id);
        let socket = dir.join(socket_name(id));
        let io_err = |source: std::io::Error| JobsError::RunDir {
            path: socket.clone(),
            source,
        };
        let listener = UnixListener::bind(&socket).map_err(io_err)?;
        // The directory (0700) already keeps others out; the socket's own mode says so too.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
                .map_err(io_err)?;
        }
        tracing::info!(job = id, socket = %socket.display(), "control socket listening");
        let task = tokio::spawn(serve(listener, handler));
        Ok(JobServer {
            id: id.to_string(),
            socket,
            dir_fd,
            task,
            _lock: lock,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for JobServer {
    fn drop(&mut self) {
        self.task.abort();
        // Both files go while the lock is still held; the lock itself goes with `_lock`.
        remove_files(&self.dir_fd, &self.id);
        tracing::debug!(job = %self.id, "control socket removed");
    }
}

fn remove_socket(dir_fd: &OwnedFd, id: &str) {
    let _ = nix::unistd::unlinkat(
        dir_fd,
        socket_name(id).as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
}

async fn serve(listener: UnixListener, handler: Arc<dyn Handler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, handler.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: one request line, one reply line.
async fn connection(stream: UnixStream, handler: Arc<dyn Handler>) {
    let me = nix::unistd::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == me => {}
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                "control socket: a peer of another user refused"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("control socket: peer credentials unknown ({e}); refused");
            return;
        }
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    let read = tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Ok(Ok(n)) if n > 0 => match serde_json::from_str::<Request>(line.trim()) {
            Ok(request) => {
                tracing::info!(?request, "control request");
                handler.handle(request).await
            }
            Err(e) => Reply::Error {
                message: format!("bad request: {e}"),
                applied: Vec::new(),
            },
        },
        _ => return,
    };
    let Ok(mut text) = serde_json::to_string(&reply) else {
        return;
    };
    text.push('\n');
    let _ = write.write_all(text.as_bytes()).await;
    let _ = write.shutdown().await;
}
