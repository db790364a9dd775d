//! The asking end: list the jobs of a run directory, send one a request.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{JobStatus, MAX_LINE, Reply, Request};
use super::{JobsError, check_id, lock_name, open_run_dir, remove_files, socket_name, try_lock};

/// Every running job in `dir`, each asked for its status (within `timeout`), ordered by id. A
/// crashed job's leftover files are removed on the way; a job that does not answer is left out
/// (with a warning in the log).
pub async fn list(dir: &Path, timeout: Duration) -> Result<Vec<JobStatus>, JobsError> {
    let mut jobs = Vec::new();
    for id in live_ids(dir)? {
        match ask(dir, &id, &Request::Status, timeout).await {
            Ok(Reply::Status(status)) => jobs.push(status),
            Ok(other) => tracing::warn!(job = %id, "unexpected answer to status: {other:?}"),
            Err(e) => tracing::warn!(job = %id, "{e}"),
        }
    }
    Ok(jobs)
}

/// Sends `request` to the job `id` in `dir` and returns its reply. An id with no running job
/// is [`JobsError::UnknownJob`], naming the running ones.
pub async fn request(
    dir: &Path,
    id: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, JobsError> {
    let running = live_ids(dir)?;
    if check_id(id).is_err() || !running.iter().any(|r| r == id) {
        return Err(JobsError::UnknownJob {
            id: id.to_string(),
            running,
        });
    }
    ask(dir, id, request, timeout).await
}

/// The ids of the jobs whose process still holds their lock; the files of the others are
/// removed.
fn live_ids(dir: &Path) -> Result<Vec<String>, JobsError> {
    let Some(dir_fd) = open_run_dir(dir, false)? else {
        return Ok(Vec::new());
    };
    let entries = std::fs::read_dir(dir).map_err(|source| JobsError::RunDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ids: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let id = name
                .strip_suffix(".sock")
                .or_else(|| name.strip_suffix(".lock"))?;
            check_id(id).ok().map(|()| id.to_string())
        })
        .collect();
    ids.sort();
    ids.dedup();
    let mut live = Vec::new();
    for id in ids {
        if is_gone(&dir_fd, dir, &id)? {
            tracing::info!(job = %id, "removing a stale control socket: its process is gone");
            remove_files(&dir_fd, &id);
        } else {
            live.push(id);
        }
    }
    Ok(live)
}

/// Whether the job `id` has no process any more: its lock is missing or free. A free lock is
/// taken only for this look.
fn is_gone(dir_fd: &OwnedFd, dir: &Path, id: &str) -> Result<bool, JobsError> {
    let lock_missing = nix::sys::stat::fstatat(
        dir_fd,
        lock_name(id).as_str(),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .is_err();
    if lock_missing {
        // A socket without its lock: a job being removed, or one whose lock was deleted.
        return Ok(nix::sys::stat::fstatat(
            dir_fd,
            socket_name(id).as_str(),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok());
    }
    Ok(try_lock(dir_fd, dir, id, false)?.is_some())
}

/// One request, one reply.
async fn ask(
    dir: &Path,
    id: &str,
    request: &Request,
    timeout: Duration,
) -> Result<Reply, JobsError> {
    let path = dir.join(socket_name(id));
    let exchange = async {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|source| JobsError::Connect {
                id: id.to_string(),
                path: path.clone(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let protocol = |detail: String| JobsError::Protocol {
            id: id.to_string(),
            detail,
        };
        let mut line = serde_json::to_string(request).map_err(|e| protocol(e.to_string()))?;
        line.push('\n');
        write
            .write_all(line.as_bytes())
            .await
            .map_err(|e| protocol(format!("cannot send the request: {e}")))?;
        let mut answer = String::new();
        BufReader::new(read.take(MAX_LINE as u64))
            .read_line(&mut answer)
            .await
            .map_err(|e| protocol(format!("cannot read the reply: {e}")))?;
        if answer.trim().is_empty() {
            return Err(protocol(
                "the job closed the connection without a reply".into(),
            ));
        }
        serde_json::from_str::<Reply>(answer.trim()).map_err(|e| protocol(format!("{e}: {answer}")))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| JobsError::Timeout {
            id: id.to_string(),
            after: timeout,
        })?
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::future::BoxFuture;

    use super::super::{Handler, JobServer, new_id};
    use super::*;

    const T: Duration = Duration::from_secs(5);

    /// Answers a status, and echoes any other request as applied.
    struct Echo;

    impl Handler for Echo {
        fn handle(&self, request: Request) -> BoxFuture<'static, Reply> {
            Box::pin(async move {
                match request {
                    Request::Status => Reply::Status(JobStatus {
                        id: "x".into(),
                        pid: std::process::id(),
                        vm: "vm".into(),
                        phase: "ram".into(),
                        status: None,
                        elapsed_ms: 0,
                        ram: None,
                        disks: Vec::new(),
                    }),
                    other => Reply::Done {
                        applied: vec![format!("{other:?}")],
                    },
                }
            })
        }
    }

    fn run_dir() -> (tempfile::TempDir, std::path::PathBuf) {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("jobs");
        (parent, dir)
    }

    #[tokio::test]
    async fn a_request_reaches_the_job_and_its_reply_comes_back() {
        let (_parent, dir) = run_dir();
        let server = JobServer::start(&dir, "job1", Arc::new(Echo)).expect("start");

        let reply = request(&dir, "job1", &Request::Pause, T)
            .await
            .expect("reply");

        assert_eq!(
            reply,
            Reply::Done {
                applied: vec!["Pause".into()]
            }
        );
        drop(server);
    }

    #[tokio::test]
    async fn the_socket_is_0600_and_goes_with_the_server() {
        use std::os::unix::fs::PermissionsExt;
        let (_parent, dir) = run_dir();
        let server = JobServer::start(&dir, &new_id(), Arc::new(Echo)).expect("start");
        let socket = server.socket().to_path_buf();
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777;

        drop(server);

        assert_eq!(mode, 0o600);
        assert!(!socket.exists(), "socket left behind");
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0);
    }

    #[tokio::test]
    async fn an_id_in_use_is_refused() {
        let (_parent, dir) = run_dir();
        let _first = JobServer::start(&dir, "job1", Arc::new(Echo)).expect("start");

        let err = JobServer::start(&dir, "job1", Arc::new(Echo)).expect_err("taken");

        assert!(matches!(err, JobsError::IdInUse { .. }), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_id_names_the_running_ones() {
        let (_parent, dir) = run_dir();
        let _job = JobServer::start(&dir, "job1", Arc::new(Echo)).expect("start");

        let err = request(&dir, "nope", &Request::Cancel, T)
            .await
            .expect_err("unknown");

        assert!(err.is_unknown_job(), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("\"nope\"") && msg.contains("job1"), "{msg}");
    }

    #[tokio::test]
    async fn a_crashed_jobs_files_are_removed_by_the_next_listing() {
        let (_parent, dir) = run_dir();
        let _live = JobServer::start(&dir, "live", Arc::new(Echo)).expect("start");
        // What a killed job leaves: its socket and its lock file, the lock free.
        std::fs::write(dir.join("dead.lock"), b"").expect("lock file");
        std::os::unix::net::UnixListener::bind(dir.join("dead.sock")).expect("socket");

        let jobs = list(&dir, T).await.expect("list");

        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert!(!dir.join("dead.sock").exists());
        assert!(!dir.join("dead.lock").exists());
        assert!(dir.join("live.sock").exists());
    }

    #[tokio::test]
    async fn a_missing_run_dir_lists_nothing() {
        let (_parent, dir) = run_dir();

        assert!(list(&dir, T).await.expect("list").is_empty());
    }
}
