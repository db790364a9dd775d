//! When each phase of a run began, for the report's [`Timing`].

use tokio::time::Instant;

use super::super::Timing;

/// A moment a run's timing is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mark {
    /// The first disk's mirror started.
    Disks,
    /// `migrate` was sent.
    Ram,
    /// The source reached `pre-switchover` (its CPUs paused) and the mirrors are being ended.
    Switchover,
    /// `migrate-continue` was sent.
    Switched,
    /// The destination was asked to finish.
    Finish,
    /// It answered.
    Finished,
    /// Clean-up (or roll-back) began.
    Cleanup,
}

/// The marks a run passed, in order.
#[derive(Debug, Default)]
pub(super) struct Timeline(Vec<(Mark, Instant)>);

impl Timeline {
    /// Marks `mark` now (the first time only).
    pub fn mark(&mut self, mark: Mark) {
        if self.at(mark).is_none() {
            self.0.push((mark, Instant::now()));
        }
    }

    /// When `mark` was passed.
    pub fn at(&self, mark: Mark) -> Option<Instant> {
        self.0.iter().find(|(m, _)| *m == mark).map(|(_, at)| *at)
    }

    /// The phases' lengths between `started` and `end`; a phase never reached is 0.
    pub fn timing(&self, started: Instant, end: Instant) -> Timing {
        let ms = |from: Option<Instant>, to: Option<Instant>| match (from, to) {
            (Some(a), Some(b)) if b > a => (b - a).as_millis() as u64,
            _ => 0,
        };
        let at = |m| self.at(m);
        let first_byte = at(Mark::Disks).or(at(Mark::Ram)).or(at(Mark::Cleanup));
        let switchover_ms = ms(at(Mark::Switchover), at(Mark::Switched));
        Timing {
            setup_ms: ms(Some(started), first_byte),
            disks_ms: ms(at(Mark::Disks), at(Mark::Ram)),
            ram_ms: ms(at(Mark::Ram), at(Mark::Finish).or(at(Mark::Cleanup)))
                .saturating_sub(switchover_ms),
            switchover_ms,
            finish_ms: ms(at(Mark::Finish), at(Mark::Finished)),
            cleanup_ms: ms(at(Mark::Cleanup), Some(end)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn phases_never_reached_count_nothing_and_the_switch_over_is_not_ram() {
        let started = Instant::now();
        let mut t = Timeline::default();
        let step = |ms| tokio::time::advance(Duration::from_millis(ms));
        step(100).await;
        t.mark(Mark::Ram);
        step(300).await;
        t.mark(Mark::Switchover);
        step(20).await;
        t.mark(Mark::Switched);
        step(80).await;
        t.mark(Mark::Cleanup);
        step(5).await;

        let timing = t.timing(started, Instant::now());

        assert_eq!(
            (timing.setup_ms, timing.disks_ms, timing.ram_ms),
            (100, 0, 380)
        );
        assert_eq!(
            (timing.switchover_ms, timing.finish_ms, timing.cleanup_ms),
            (20, 0, 5)
        );
    }
}
