//! The one watch loop of a migration's long phases (disk copy, RAM): cancellation, the
//! whole-migration deadline and the pause deadline, the source's events, a lost destination, controls from another
//! task, and a tick every [`PROGRESS_INTERVAL`] on which the phase polls progress and feeds
//! the stall check.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::super::control::{ControlReceiver, ControlRequest};
use super::super::destination::Destination;
use super::super::{MigrationError, MigrationOptions, PROGRESS_INTERVAL, Side};
use crate::qmp::{Event, Events, QmpError};

/// After the destination went away, how long the source has to report the failure in its own
/// words before the migration is declared lost.
const DEST_LOST_GRACE: Duration = Duration::from_secs(10);

/// What the watch loop saw.
pub(super) enum Seen {
    /// A source event.
    Event(Event),
    /// Time to poll progress.
    Tick,
    /// The pause deadline passed and the guest is to be paused (`--pause-after`, or
    /// `--timeout-action pause`'s deadline). Seen once.
    Deadline,
    /// A control from another task, to apply and answer.
    Control(ControlRequest),
}

/// A phase's deadlines, each measured from the migration's start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Deadlines {
    /// Fail with [`MigrationError::Timeout`].
    pub abort: Option<Duration>,
    /// Say so once ([`Seen::Deadline`]): the phase pauses the guest and goes on.
    pub pause: Option<Duration>,
}

/// A lost destination is not an error at once: the source usually reports the failure in its
/// own words (a TLS error, a mirror error) within [`DEST_LOST_GRACE`], which explains more;
/// after that it is [`MigrationError::DestinationDied`].
pub(super) struct Watch {
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    pause_at: Option<Instant>,
    tick: tokio::time::Interval,
    stall: StallWatch,
    lost: Lost,
    step: &'static str,
}

/// Whether the destination was seen to go away.
enum Lost {
    No,
    Since { at: Instant, reason: Option<String> },
}

impl Watch {
    pub fn new(
        opts: &MigrationOptions,
        deadlines: Deadlines,
        started: Instant,
        step: &'static str,
    ) -> Watch {
        Watch {
            deadline: deadlines.abort.and_then(|d| started.checked_add(d)),
            timeout: deadlines.abort,
            pause_at: deadlines.pause.and_then(|d| started.checked_add(d)),
            tick: tokio::time::interval(PROGRESS_INTERVAL),
            stall: StallWatch::new(opts.stall_timeout),
            lost: Lost::No,
            step,
        }
    }

    /// The next thing to act on, or the error that ends the phase.
    pub async fn next<D: Destination>(
        &mut self,
        src_events: &mut Events,
        dest: &mut D,
        cancel: &CancellationToken,
        control: &mut Option<ControlReceiver>,
    ) -> Result<Seen, MigrationError> {
        loop {
            let watching_dest = matches!(self.lost, Lost::No);
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                request = ControlReceiver::next(control) => return Ok(Seen::Control(request)),
                _ = sleep_until_opt(self.deadline) => {
                    return Err(MigrationError::Timeout { after: self.timeout.unwrap_or_default() });
                }
                _ = sleep_until_opt(self.pause_at) => {
                    self.pause_at = None;
                    return Ok(Seen::Deadline);
                }
                event = src_events.next() => {
                    return match event {
                        Some(e) => Ok(Seen::Event(e)),
                        None => Err(MigrationError::Qmp {
                            side: Side::Source,
                            step: self.step,
                            source: QmpError::Closed {
                                peer: String::new(),
                                reason: "the source QEMU exited".into(),
                            },
                        }),
                    };
                }
                _ = dest.lost(), if watching_dest => {
                    let reason = dest.lost_reason();
                    tracing::warn!(?reason, "the destination went away");
                    self.lost = Lost::Since { at: Instant::now(), reason };
                }
                _ = self.tick.tick() => return Ok(Seen::Tick),
            }
        }
    }

    /// Records the latest byte count; an error once it has not grown for the stall timeout.
    pub fn progressed(
        &mut self,
        bytes: u64,
        status: impl FnOnce() -> String,
    ) -> Result<(), MigrationError> {
        self.stall.check(bytes, status)
    }

    /// An error once the destination has been gone for longer than the grace period.
    pub fn check_dest_lost(
        &self,
        desc: impl FnOnce() -> Option<String>,
    ) -> Result<(), MigrationError> {
        match &self.lost {
            Lost::Since { at, .. } if at.elapsed() >= DEST_LOST_GRACE => {
                Err(self.lost_error(desc()))
            }
            _ => Ok(()),
        }
    }

    /// The error for a destination gone, with `desc` (what the source saw) and the reason the
    /// destination gave, where known.
    pub fn lost_error(&self, desc: Option<String>) -> MigrationError {
        let reason = match &self.lost {
            Lost::Since { reason, .. } => reason.as_ref(),
            Lost::No => None,
        };
        let desc = match (desc, reason) {
            (Some(d), Some(r)) => Some(format!("{d}; {r}")),
            (d, r) => d.or_else(|| r.cloned()),
        };
        MigrationError::DestinationDied { desc }
    }

    /// Whether the destination was seen to go away.
    pub fn saw_dest_lost(&self) -> bool {
        matches!(self.lost, Lost::Since { .. })
    }
}

/// Declares a copy stalled when its byte count has not grown for `after`.
struct StallWatch {
    after: Duration,
    bytes: u64,
    since: Instant,
}

impl StallWatch {
    fn new(after: Duration) -> StallWatch {
        StallWatch {
            after,
            bytes: 0,
            since: Instant::now(),
        }
    }

    /// Records the latest byte count; an error naming `status` once it has been still too long.
    fn check(&mut self, bytes: u64, status: impl FnOnce() -> String) -> Result<(), MigrationError> {
        if bytes > self.bytes {
            self.bytes = bytes;
            self.since = Instant::now();
        } else if self.since.elapsed() >= self.after {
            return Err(MigrationError::Stalled {
                after: self.after,
                status: status(),
            });
        }
        Ok(())
    }
}

/// The error for a source QEMU that closed its connection at `step`.
pub(super) fn source_gone(peer: &str, step: &'static str) -> MigrationError {
    MigrationError::Qmp {
        side: Side::Source,
        step,
        source: QmpError::Closed {
            peer: peer.to_string(),
            reason: "the source QEMU exited".into(),
        },
    }
}

pub(super) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
