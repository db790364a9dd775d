//! The migration's owner: `migrate` runs the migration in a second process of its own session
//! (the *owner*), which a caller's SIGTERM and SIGKILL to the `migrate` process do not reach;
//! the `migrate` process the caller started (the *foreground*) relays the owner's output and
//! exits with its exit code.
//!
//! 1. The foreground re-executes its own binary with the same arguments and
//!    [`OWNER_ENV`] set, `setsid()` in the child before `exec` (no `fork` inside a tokio
//!    runtime: the runtime starts after this, in the owner). The owner's stdin is a pipe the
//!    foreground never writes to: its *lifeline*.
//! 2. The owner's stdout and stderr are pipes to the foreground, which copies them to its own;
//!    stderr is bounded when it is not a terminal ([`STDERR_HEAD`], [`STDERR_TAIL`]), so a
//!    caller that reads nothing until exit (CloudStack's `Script`) never blocks the tool. The
//!    owner also holds the read ends itself, so a write never fails with EPIPE while the
//!    foreground dies.
//! 3. SIGINT, SIGTERM, SIGHUP or SIGQUIT to the foreground is passed on to the owner as
//!    SIGTERM (cancel and roll back, as before); the foreground keeps relaying until the owner
//!    ends.
//! 4. When the foreground dies (EOF on the lifeline), the owner points its stdout and stderr
//!    at /dev/null and cancels the migration ([`caller_gone`]): it rolls back by the
//!    one-running-copy rule and writes `--result-file` itself.

#![allow(clippy::print_stderr)]

use std::collections::VecDeque;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};
use std::sync::LazyLock;

use tokio_util::sync::CancellationToken;

use crate::outcome::Outcome;

/// Set in the owner's environment: the numbers of the two read ends it holds ("OUT,ERR"; ERR
/// is "-" when stderr is the foreground's terminal).
const OWNER_ENV: &str = "QTM_MIGRATE_OWNER";
/// How much of the owner's stderr is passed on as it comes when stderr is not a terminal.
const STDERR_HEAD: usize = 24 * 1024;
/// How much of the rest (its last lines) is passed on at the end.
const STDERR_TAIL: usize = 8 * 1024;

static CALLER_GONE: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// Cancelled in the owner once its foreground is gone.
pub fn caller_gone() -> CancellationToken {
    CALLER_GONE.clone()
}

/// Whether this process is a migration's owner.
pub fn is_owner() -> bool {
    std::env::var_os(OWNER_ENV).is_some()
}

/// In the owner, before anything else: watches the lifeline.
pub fn start_owner() {
    let kept: Vec<RawFd> = std::env::var(OWNER_ENV)
        .unwrap_or_default()
        .split(',')
        .filter_map(|f| f.parse().ok())
        .collect();
    for fd in &kept {
        // SAFETY: fcntl on a descriptor handed to this process; close-on-exec again, so no
        // child of the owner holds its pipes.
        unsafe { nix::libc::fcntl(*fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
    }
    let spawned = std::thread::Builder::new()
        .name("lifeline".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            silence(&kept);
            tracing::warn!("the caller is gone: cancelling the migration and rolling back");
            CALLER_GONE.cancel();
        });
    if let Err(e) = spawned {
        tracing::error!("cannot watch the caller: {e}");
    }
}

/// Points stdout and stderr at /dev/null and closes the kept read ends of their pipes.
fn silence(kept: &[RawFd]) {
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        for target in [1, 2] {
            // SAFETY: dup2 onto the standard descriptors, which stay open (now /dev/null).
            unsafe { nix::libc::dup2(null.as_raw_fd(), target) };
        }
    }
    for fd in kept {
        // SAFETY: these descriptors were handed to this process for it alone and nothing else
        // in it uses them.
        unsafe { nix::libc::close(*fd) };
    }
}

/// The foreground: starts the owner, relays its output, passes signals on, and returns its
/// exit code.
pub fn run_foreground() -> anyhow::Result<Outcome> {
    let err_tty = std::io::stderr().is_terminal();
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .stdin(Stdio::piped())
        .stdout(Stdio::from(out_w));
    let kept: Vec<RawFd> = if err_tty {
        drop(err_w);
        cmd.stderr(Stdio::inherit());
        vec![out_r.as_raw_fd()]
    } else {
        cmd.stderr(Stdio::from(err_w));
        vec![out_r.as_raw_fd(), err_r.as_raw_fd()]
    };
    let names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    cmd.env(OWNER_ENV, names.join(","));
    let keep = kept.clone();
    // SAFETY: only async-signal-safe calls (setsid, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in &keep {
                if nix::libc::fcntl(*fd, nix::libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the migration's owner process: {e}"))?;
    drop(cmd);
    let owner = child.id();
    // Held, never written: its end is the owner's sign that the caller is gone.
    let lifeline = child.stdin.take();
    let out = std::thread::spawn(move || relay_all(out_r));
    let err = (!err_tty).then(|| std::thread::spawn(move || relay_bounded(err_r)));
    let status = runtime()?.block_on(wait_passing_signals(child, owner))?;
    let _ = out.join();
    if let Some(err) = err {
        let _ = err.join();
    }
    drop(lifeline);
    Ok(outcome_of_owner(status, owner))
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Waits for the owner, passing each cancelling signal on to it as SIGTERM.
async fn wait_passing_signals(
    mut child: std::process::Child,
    owner: u32,
) -> anyhow::Result<ExitStatus> {
    let mut signals = crate::signals::Signals::register();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    loop {
        let next = async {
            match signals.as_mut() {
                Some(s) => s.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = &mut rx => return Ok(status??),
            Some(name) = next => {
                tracing::warn!("{name} received: asking the migration's owner (pid {owner}) to cancel");
                let pid = nix::unistd::Pid::from_raw(owner as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
    }
}

/// The owner's exit code as this process's.
fn outcome_of_owner(status: ExitStatus, owner: u32) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Outcome::Relayed(code.clamp(0, 255) as u8),
        (None, signal) => {
            eprintln!(
                "error: the migration's owner process (pid {owner}) was killed (signal {}); \
                 `qemu-tls-migrate recover --json` says where the VM is and puts it back",
                signal.unwrap_or(0)
            );
            Outcome::Failed
        }
    }
}

/// Copies the owner's stdout (the result) as it comes.
fn relay_all(from: OwnedFd) {
    let mut from = std::fs::File::from(from);
    let mut stdout = std::io::stdout();
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || stdout.write_all(&buf[..n]).is_err() {
            break;
        }
        let _ = stdout.flush();
    }
}

/// Copies the owner's stderr line by line: the first [`STDERR_HEAD`] bytes as they come, then
/// only the last [`STDERR_TAIL`] bytes at the end, with a line saying how much was left out.
fn relay_bounded(from: OwnedFd) {
    let reader = std::io::BufReader::new(std::fs::File::from(from));
    let mut stderr = std::io::stderr();
    let mut sent = 0usize;
    let mut tail: VecDeque<Vec<u8>> = VecDeque::new();
    let mut tail_len = 0usize;
    let mut dropped = 0usize;
    let mut tailing = false;
    for line in reader.split(b'\n') {
        let Ok(mut line) = line else { break };
        line.truncate(STDERR_TAIL / 2);
        line.push(b'\n');
        tailing |= sent + line.len() > STDERR_HEAD;
        if !tailing {
            sent += line.len();
            let _ = stderr.write_all(&line);
            continue;
        }
        tail_len += line.len();
        tail.push_back(line);
        while tail_len > STDERR_TAIL {
            if let Some(old) = tail.pop_front() {
                tail_len -= old.len();
                dropped += 1;
            }
        }
    }
    if dropped > 0 {
        let _ = writeln!(
            stderr,
            "qemu-tls-migrate: {dropped} lines of progress and log left out (output kept under \
             {} KiB for callers that read only at exit)",
            (STDERR_HEAD + STDERR_TAIL) / 1024
        );
    }
    for line in tail {
        let _ = stderr.write_all(&line);
    }
}
