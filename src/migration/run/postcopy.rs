//! The RAM phase's post-copy steps (see [`crate::migration::postcopy`]): the switch, and the
//! recovery of a post-copy whose link was cut.
//!
//! The switch:
//! 1. the point of no return is passed ([`CommitPoint::Postcopy`]) and journalled
//!    (`postcopy`: a later recovery touches neither side);
//! 2. the destination is held as one that may run the guest (never stopped, quit or rolled
//!    back again), and its autostart goes back on (`cont`) when the guest ran before, so it
//!    runs there as soon as the source hands it over;
//! 3. `migrate-start-postcopy` on the source.
//!
//! The recovery, when the source says `postcopy-paused` (or post-copy stalls, which a link
//! that drops packets without a reset causes: the tool then pauses it itself with
//! `migrate-pause` on both ends), until `--postcopy-recover-timeout`:
//! 1. the destination, once `postcopy-paused` too, listens again (`migrate-recover`) on a
//!    port of its own from the range, with the same credentials;
//! 2. the source reconnects (`migrate` with `resume: true`); QEMU 9.1 and later go back to
//!    `postcopy-paused` when that fails, so it is tried again;
//! 3. done once the source is `postcopy-active` (or completed) again.

use tokio::time::{Instant, sleep};

use super::super::destination::Destination;
use super::super::journal::Stage;
use super::super::postcopy::{self, DEFAULT_RECOVER_TIMEOUT, RECOVER_RETRY};
use super::super::side::SideCtl;
use super::super::{MigrationError, PostcopyRecovery};
use super::{Commit, CommitPoint, Run};
use crate::qemu::{
    MigratePause, MigrateResume, MigrateStartPostcopy, MigrationStatus, QueryMigrate, tcp_uri,
};

/// How long one `migrate resume=true` may take to show whether it reconnected.
const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Run<'_, '_> {
    /// Switches the running migration to post-copy.
    pub(super) async fn start_postcopy<D: Destination>(
        &mut self,
        src: &SideCtl,
        dest: &mut D,
        was_running: bool,
        why: &str,
    ) -> Result<(), MigrationError> {
        tracing::warn!(%why, "switching to post-copy: {}", postcopy::RISK);
        self.commit = Commit::Passed(CommitPoint::Postcopy);
        self.journal_stage(Stage::Postcopy);
        self.said.convergence.postcopy_at_ms = Some(self.elapsed_ms());
        self.warn(format!(
            "post-copy started {} ms in ({why}): {}",
            self.elapsed_ms(),
            postcopy::RISK
        ));
        dest.enter_postcopy(was_running && !self.opts.dest_paused)
            .await?;
        src.call("migrate-start-postcopy", &MigrateStartPostcopy)
            .await?;
        Ok(())
    }

    /// Recovers a paused post-copy, retrying until the recovery deadline; records what it
    /// did in the report.
    pub(super) async fn recover_postcopy<D: Destination>(
        &mut self,
        src: &SideCtl,
        dest: &mut D,
        connect_host: &str,
    ) -> Result<(), MigrationError> {
        let timeout = self
            .opts
            .convergence
            .postcopy_recover_timeout
            .unwrap_or(DEFAULT_RECOVER_TIMEOUT);
        let began = Instant::now();
        let deadline = began + timeout;
        let paused_at_ms = self.elapsed_ms();
        tracing::warn!(?timeout, "post-copy paused (link cut?): recovering");
        let mut attempts = 0u32;
        let mut last = String::from("no attempt yet");
        let mut listening = None;
        let result = loop {
            if Instant::now() >= deadline {
                break Err(MigrationError::PostcopyNotRecovered {
                    after: timeout,
                    attempts,
                    last,
                });
            }
            attempts += 1;
            match self
                .recover_once(src, dest, connect_host, &mut listening)
                .await
            {
                Ok(true) => break Ok(()),
                Ok(false) => last = "the source did not reconnect".into(),
                Err(e) => last = e.to_string(),
            }
            tracing::info!(attempts, %last, "post-copy recovery attempt failed; retrying");
            sleep(RECOVER_RETRY).await;
        };
        self.said
            .convergence
            .postcopy_recoveries
            .push(PostcopyRecovery {
                paused_at_ms,
                attempts,
                recovered_after_ms: result.is_ok().then(|| began.elapsed().as_millis() as u64),
            });
        result
    }

    /// One attempt: the destination listens again once it is paused too (`listening`: the
    /// port it already listens on, kept while a resume that never reached it failed), the
    /// source reconnects; returns whether the migration runs again.
    async fn recover_once<D: Destination>(
        &mut self,
        src: &SideCtl,
        dest: &mut D,
        connect_host: &str,
        listening: &mut Option<u16>,
    ) -> Result<bool, MigrationError> {
        match dest.incoming_status().await? {
            Some(MigrationStatus::PostcopyPaused) => {}
            Some(MigrationStatus::PostcopyActive) => {
                // The destination has not noticed the cut: break its end on purpose.
                if let Err(e) = dest.pause_incoming().await {
                    tracing::warn!("migrate-pause on the destination: {e}");
                }
                return Ok(false);
            }
            other => {
                return Err(MigrationError::Failed {
                    desc: format!(
                        "the destination's incoming migration is {}",
                        other.map_or("unknown", MigrationStatus::as_str)
                    ),
                });
            }
        }
        let port = match dest.listen_again().await {
            Ok(port) => {
                self.said.ports.push(port);
                *listening = Some(port);
                port
            }
            // Still listening from the last attempt, which did not reach it.
            Err(e) if e.to_string().contains("already") && listening.is_some() => {
                listening.unwrap_or_default()
            }
            Err(e) => {
                *listening = None;
                return Err(e);
            }
        };
        let uri = tcp_uri(connect_host, port);
        tracing::info!(%uri, "source resuming post-copy");
        src.call("migrate resume=true", &MigrateResume { uri, resume: true })
            .await?;
        let until = Instant::now() + ATTEMPT_TIMEOUT;
        while Instant::now() < until {
            let info = src.call("query-migrate", &QueryMigrate).await?;
            match info.status {
                Some(MigrationStatus::PostcopyActive | MigrationStatus::Completed) => {
                    tracing::info!("post-copy recovered");
                    return Ok(true);
                }
                Some(MigrationStatus::PostcopyPaused) => return Ok(false),
                _ => sleep(RECOVER_RETRY / 5).await,
            }
        }
        Ok(false)
    }

    /// Post-copy stalled (a link that drops packets breaks no connection): pause it on the
    /// source so it can be recovered.
    pub(super) async fn pause_stalled_postcopy(&mut self, src: &SideCtl) {
        tracing::warn!("post-copy stalled: pausing it to recover");
        if let Err(e) = src.call("migrate-pause", &MigratePause).await {
            tracing::warn!("migrate-pause on the source: {e}");
        }
    }
}
