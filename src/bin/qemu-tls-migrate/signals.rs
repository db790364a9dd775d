//! The signals that cancel a run (SIGINT, SIGTERM, SIGHUP, SIGQUIT), for every command that
//! runs one (`migrate`, `demo`, `bench`, `serve`).

use tokio_util::sync::CancellationToken;

/// Cancels `cancel` on the first SIGINT, SIGTERM, SIGHUP or SIGQUIT (the migration then rolls
/// back), and keeps catching them while the rollback runs: a second Ctrl-C, or a closing
/// terminal, must neither kill the tool half way through nor go unanswered.
/// In a migration's owner process, its caller going away cancels it the same way
/// ([`crate::owner::caller_gone`]).
pub async fn cancel_on_signal(cancel: CancellationToken) {
    let Some(mut signals) = Signals::register() else {
        return;
    };
    let gone = crate::owner::caller_gone();
    tokio::select! {
        Some(name) = signals.next() => {
            tracing::warn!("{name} received: cancelling the migration and rolling back");
        }
        () = gone.cancelled() => {}
        else => return,
    }
    cancel.cancel();
    while let Some(name) = signals.next().await {
        tracing::warn!("{name} received: rollback in progress, please wait");
    }
}

/// The signals that cancel a run.
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn register() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| {
            signal(kind)
                .map_err(|e| tracing::warn!("cannot catch signal {}: {e}", kind.as_raw_value()))
                .ok()
        };
        Some(Signals {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
            hup: listen(SignalKind::hangup())?,
            quit: listen(SignalKind::quit())?,
        })
    }

    /// The name of the next signal; `None` once none can come any more.
    pub async fn next(&mut self) -> Option<&'static str> {
        tokio::select! {
            Some(()) = self.int.recv() => Some("SIGINT"),
            Some(()) = self.term.recv() => Some("SIGTERM"),
            Some(()) = self.hup.recv() => Some("SIGHUP"),
            Some(()) = self.quit.recv() => Some("SIGQUIT"),
            else => None,
        }
    }
}
