//! Phase 4, RAM: `migrate` on the source and one watch loop to a final state, with progress,
//! the convergence aids that act while it runs (downtime steps, the pause at the deadline),
//! controls from another task, and the switch-over of the disks at `pre-switchover`.

use std::os::fd::AsFd;
use std::time::Duration;

use super::super::control::{Control, ControlRequest};
use super::super::convergence::{Convergence, DowntimeStep, OnNoGo, TimeoutAction};
use super::super::destination::Destination;
use super::super::side::SideCtl;
use super::super::undo::Undo;
use super::super::{ForecastWhen, MigrationError, Phase, RamReport, forecast};
use super::prepare::Prepared;
use super::setup::Setup;
use super::timeline::Mark;
use super::watch::{Deadlines, Seen, Watch};
use super::{CommitPoint, Run};
use crate::qemu::{
    GetFd, Migrate, MigrateSetParameters, MigrationEvent, MigrationInfo, MigrationStatus,
    QueryCpusFast, QueryMigrate, Stop, tcp_uri,
};
use crate::qmp::Events;
use tokio_util::sync::CancellationToken;

/// The RAM phase's deadlines: with the timeout action pause, the one deadline pauses the guest;
/// otherwise it aborts, and `--pause-after`, when given, pauses the guest before.
fn ram_deadlines(c: &Convergence, deadline: Option<Duration>) -> Deadlines {
    match c.timeout_action {
        TimeoutAction::Pause | TimeoutAction::Postcopy => Deadlines {
            abort: None,
            pause: deadline,
        },
        _ => Deadlines {
            abort: deadline,
            pause: c.pause_after,
        },
    }
}

/// Whether QEMU's migration channels are up, every TLS handshake over: from `setup` QEMU moves
/// on only once they are. Before that, and while cancelling, a pause is held ([`HeldPause`]).
fn channels_up(status: MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::Active
            | MigrationStatus::WaitUnplug
            | MigrationStatus::PreSwitchover
            | MigrationStatus::Device
            | MigrationStatus::PostcopyActive
    )
}

/// A pause asked for before the migration's channels are up ([`channels_up`]), applied once
/// they are.
///
/// Until the TLS handshake of every migration channel is over, the destination's main loop may
/// sit in a blocking read of the source's first TLS record (QEMU 7.2 and 10.0:
/// scripts/repro-tls-incoming-blocks.py). `stop` on the source flushes every block node, the
/// NBD mirror targets served by that same destination main loop included, so a `stop` then
/// waits for ever, and with it the source's main loop that would send the record: both QEMUs
/// hang until the deadline cancels the migration. QEMU sets `active` once its channels are up.
#[derive(Debug, Default)]
struct HeldPause {
    /// The pause deadline passed.
    deadline: bool,
    /// `jobs pause` asked, answered once applied.
    controls: Vec<ControlRequest>,
}

impl Run<'_, '_> {
    /// Starts the RAM migration and follows it to completion; returns QEMU's last figures.
    pub(super) async fn move_ram<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        setup: &Setup,
        prepared: &Prepared,
        events: &mut Events,
    ) -> Result<MigrationInfo, MigrationError> {
        let opts = self.opts;
        if setup.was_running {
            src.undo.push(Undo::ResumeSource);
        }
        src.undo.push(Undo::CancelMigration);
        let port = prepared.ports.migration_port;
        let (host, port) = match &opts.source_connect {
            Some(a) => (a.host.as_str(), a.port_or(port)),
            None => (opts.connect_host(), port),
        };
        let uri = tcp_uri(host, port);
        self.timeline.mark(Mark::Ram);
        // multifd opens its channels from the URI's address, and a post-copy recovery
        // reconnects to it: those keep QEMU's own connection.
        let own = setup.multifd.is_none()
            && !setup.plan.postcopy
            && self.migrate_over_own_socket(src, host, port).await?;
        if !own {
            tracing::info!(%uri, transport = %self.transport, "starting migration");
            src.call("migrate", &Migrate { uri }).await?;
        }
        self.send_progress(Phase::Ram, Some(MigrationStatus::Setup), None);
        let info = self.follow(src, dest, setup, events).await?;
        let ram = info.ram.unwrap_or_default();
        self.said.ram = RamReport::from_stats(
            &ram,
            info.total_time.unwrap_or(0),
            info.downtime.unwrap_or(0),
        );
        Ok(info)
    }

    /// Starts the migration over a TCP connection the tool makes itself, with Nagle's algorithm
    /// off, handed to QEMU as libvirt does (`getfd`, `migrate fd:`). QEMU's own `tcp:`
    /// connection keeps Nagle on, and over TLS, which QEMU writes as many small records, that
    /// cost up to 4x the RAM time (scripts/repro-tls-nodelay.py).
    ///
    /// Returns `Ok(false)`, with nothing sent to the destination, when QEMU cannot take the
    /// socket (a monitor that drops descriptors, QEMU in another network namespace, where this
    /// process's connection would take another route): the caller then uses `tcp:`.
    async fn migrate_over_own_socket(
        &self,
        src: &mut SideCtl,
        host: &str,
        port: u16,
    ) -> Result<bool, MigrationError> {
        const FDNAME: &str = "qtm-migration";
        if !src.qmp.can_pass_fds() {
            return Ok(false);
        }
        match qemu_pid(src).await {
            Some(pid) if same_network_namespace(pid) => {}
            pid => {
                tracing::debug!(
                    ?pid,
                    "source QEMU not known to share this network namespace: it connects the \
                     migration stream itself"
                );
                return Ok(false);
            }
        }
        let connect_error = |what: String| MigrationError::Failed {
            desc: format!(
                "connecting the migration stream to {host} port {port}: {what}; the \
                 destination's migration ports (49152-49215) must be reachable from this host"
            ),
        };
        let target = host.trim_start_matches('[').trim_end_matches(']');
        let lookup = tokio::net::lookup_host((target, port));
        let addr = match tokio::time::timeout(self.opts.qmp_timeout, lookup).await {
            Ok(Ok(mut addrs)) => addrs.next(),
            Ok(Err(e)) => return Err(connect_error(format!("cannot resolve it: {e}"))),
            Err(_) => return Err(connect_error("name resolution timed out".into())),
        };
        let Some(addr) = addr else {
            return Err(connect_error("the name has no address".into()));
        };
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        };
        let socket = socket.map_err(|e| connect_error(format!("no socket: {e}")))?;
        if let Err(e) = socket.set_nodelay(true) {
            tracing::warn!("TCP_NODELAY on the migration stream: {e}");
        }
        // QEMU takes the socket before it is connected: a monitor that refuses it leaves the
        // destination's listener untouched, for QEMU's own `tcp:` connection. Until `migrate`
        // takes it over, the descriptor QEMU keeps is the tool's to close, a roll-back's or a
        // recovery's included.
        let fdname = FDNAME.to_string();
        let is_ours = |u: &Undo| matches!(u, Undo::CloseFd { fdname } if fdname == FDNAME);
        src.undo.push(Undo::CloseFd {
            fdname: fdname.clone(),
        });
        if let Err(e) = src
            .qmp
            .call_with_fd(&GetFd { fdname }, socket.as_fd(), src.timeout)
            .await
        {
            // The undo stays: a reply lost on the way may hide a descriptor QEMU kept (an
            // unwind's `closefd` of one it does not have is no error).
            tracing::debug!("getfd refused ({e}); QEMU connects the migration stream itself");
            return Ok(false);
        }
        // Connecting this copy connects the one QEMU holds: they are one socket.
        let connect = tokio::time::timeout(self.opts.qmp_timeout, socket.connect(addr));
        let stream = match connect.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_error(e.to_string())),
            Err(_) => {
                return Err(connect_error(format!(
                    "no answer within {:?}",
                    self.opts.qmp_timeout
                )));
            }
        };
        drop(stream);
        tracing::info!(
            uri = %format!("fd:{FDNAME}"),
            to = %addr,
            transport = %self.transport,
            "starting migration over a socket with TCP_NODELAY"
        );
        let uri = format!("fd:{FDNAME}");
        src.call("migrate", &Migrate { uri }).await?;
        src.undo.retain(|u| !is_ours(u));
        Ok(true)
    }

    /// Follows the outgoing migration to a final state, reporting progress. Fails on
    /// cancellation, the deadline, a stall, or a destination that went away.
    async fn follow<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        setup: &Setup,
        events: &mut Events,
    ) -> Result<MigrationInfo, MigrationError> {
        let deadlines = ram_deadlines(&self.opts.convergence, setup.deadline);
        let mut watch = Watch::new(
            self.opts,
            deadlines,
            self.started,
            "following the migration",
        );
        let connect_host = match &self.opts.source_connect {
            Some(a) => a.host.clone(),
            None => self.opts.connect_host().to_string(),
        };
        let mut switched = false;
        let mut now = MigrationStatus::Setup;
        let mut held = HeldPause::default();
        // Post-copy cannot be cancelled (neither side holds the whole guest): once it started,
        // a cancellation is noted and the migration finished.
        let uncancellable = CancellationToken::new();
        let mut cancel_noted = false;
        loop {
            let cancel = if self.in_postcopy() {
                if self.cx.cancel.is_cancelled() && !cancel_noted {
                    cancel_noted = true;
                    self.warn(
                        "cancellation asked during post-copy, which cannot be cancelled (neither \
                         side holds the whole guest): the migration is finished instead"
                            .into(),
                    );
                }
                &uncancellable
            } else {
                self.cx.cancel
            };
            let seen = watch
                .next(events, dest, cancel, &mut self.cx.control)
                .await?;
            let status = match seen {
                Seen::Event(e) if e.event == "MIGRATION" => {
                    match serde_json::from_value::<MigrationEvent>(e.data) {
                        Ok(m) => m.status,
                        Err(_) => continue,
                    }
                }
                Seen::Event(e) => {
                    self.note_stop(&e);
                    continue;
                }
                Seen::Tick => match self.poll_ram(src, &mut watch, setup).await {
                    Ok(status) => status,
                    Err(MigrationError::Stalled { .. }) if self.in_postcopy() => {
                        self.pause_stalled_postcopy(src).await;
                        watch = self.postcopy_watch();
                        continue;
                    }
                    Err(e) => return Err(e),
                },
                Seen::Deadline
                    if self.opts.convergence.timeout_action == TimeoutAction::Postcopy
                        && !self.in_postcopy() =>
                {
                    self.start_postcopy(src, dest, setup.was_running, "the deadline passed")
                        .await?;
                    self.said.convergence.timeout_action = Some(TimeoutAction::Postcopy);
                    self.said.convergence.timeout_action_at_ms = Some(self.elapsed_ms());
                    watch = self.postcopy_watch();
                    continue;
                }
                Seen::Deadline if !channels_up(now) => {
                    tracing::info!(
                        status = now.as_str(),
                        "the pause deadline passed before QEMU's migration channels were up: \
                         the guest is paused once they are"
                    );
                    held.deadline = true;
                    continue;
                }
                Seen::Deadline => {
                    self.pause_at_deadline(src, deadlines.pause).await?;
                    continue;
                }
                Seen::Control(request)
                    if request.control == Control::Pause && !channels_up(now) =>
                {
                    held.controls.push(request);
                    continue;
                }
                Seen::Control(request) => {
                    self.answer_control(src, request).await;
                    continue;
                }
            };
            tracing::debug!(status = status.as_str(), "source migration status");
            now = status;
            if channels_up(status) {
                if std::mem::take(&mut held.deadline) {
                    self.pause_at_deadline(src, deadlines.pause).await?;
                }
                for request in std::mem::take(&mut held.controls) {
                    self.answer_control(src, request).await;
                }
            }
            self.commit.note(status);
            if status.is_final() {
                break;
            }
            if status == MigrationStatus::PostcopyPaused {
                // An event may be stale (queued before a recovery): QEMU's word now decides,
                // or a working post-copy would be broken again on purpose.
                let now = src.call("query-migrate", &QueryMigrate).await?;
                if now.status != Some(MigrationStatus::PostcopyPaused) {
                    continue;
                }
                self.recover_postcopy(src, dest, &connect_host).await?;
                // What was queued meanwhile is history: recovery polled QEMU itself.
                while let Some(e) = events.try_next() {
                    self.note_stop(&e);
                }
                watch = self.postcopy_watch();
                continue;
            }
            if self.postcopy_due(status) {
                self.start_postcopy(
                    src,
                    dest,
                    setup.was_running,
                    "--postcopy: the first pass is over",
                )
                .await?;
                watch = self.postcopy_watch();
                continue;
            }
            if status == MigrationStatus::PreSwitchover && !switched {
                switched = true;
                self.timeline.mark(Mark::Switchover);
                self.switch_over(src, &setup.disks, events).await?;
                self.timeline.mark(Mark::Switched);
            }
        }
        self.ended(src, events, &watch).await
    }

    /// On a progress tick: QEMU's figures, reported and checked for a stall or a lost
    /// destination, and the next downtime step when one is due. Returns the status.
    async fn poll_ram(
        &mut self,
        src: &SideCtl,
        watch: &mut Watch,
        setup: &Setup,
    ) -> Result<MigrationStatus, MigrationError> {
        let info = src.call("query-migrate", &QueryMigrate).await?;
        let transferred = info.ram.unwrap_or_default().transferred;
        self.said.dirty_syncs = info.ram.map_or(0, |r| r.dirty_sync_count);
        self.send_progress(Phase::Ram, info.status, info.ram);
        self.note_convergence(&info);
        let status = info.status.unwrap_or(MigrationStatus::None);
        if !status.is_final() {
            watch.progressed(transferred, || status.as_str().to_string())?;
            watch.check_dest_lost(|| info.error_desc.clone())?;
            self.step_downtime(src, setup.downtime_start_ms).await?;
            if status == MigrationStatus::Active {
                self.judge_first_pass(src, &info, setup).await?;
            }
        }
        Ok(status)
    }

    /// Whether post-copy started.
    fn in_postcopy(&self) -> bool {
        self.commit == super::Commit::Passed(CommitPoint::Postcopy)
    }

    /// `--postcopy`: due once QEMU's first pass over the RAM is over (its second dirty sync).
    fn postcopy_due(&self, status: MigrationStatus) -> bool {
        self.opts.convergence.postcopy
            && !self.in_postcopy()
            && status == MigrationStatus::Active
            && self.said.dirty_syncs >= 2
    }

    /// The watch once post-copy started: no deadline acts any more (neither side may be
    /// rolled back), and the stall rule pauses the post-copy to recover it.
    fn postcopy_watch(&self) -> Watch {
        let none = Deadlines {
            abort: None,
            pause: None,
        };
        Watch::new(self.opts, none, self.started, "following the post-copy")
    }

    /// `--forecast first-pass` (the default): once QEMU's first pass is over, the forecast
    /// from its own figures, and what `--on-no-go` says to do when it is a no-go.
    async fn judge_first_pass(
        &mut self,
        src: &SideCtl,
        info: &MigrationInfo,
        setup: &Setup,
    ) -> Result<(), MigrationError> {
        if self.opts.forecast != ForecastWhen::FirstPass || self.said.forecast.is_some() {
            return Ok(());
        }
        let (Some(ram), Some(ram_start)) = (&info.ram, self.timeline.at(Mark::Ram)) else {
            return Ok(());
        };
        let limit_ms = self
            .said
            .convergence
            .downtime_steps
            .last()
            .map_or(setup.downtime_start_ms, |s| s.limit_ms);
        let Some(f) =
            forecast::from_first_pass(ram, ram_start.elapsed(), Duration::from_millis(limit_ms))
        else {
            return Ok(());
        };
        let verdict = (!f.converges).then(|| {
            (
                format!(
                    "judged after the first pass: the guest dirties {} MiB/s against the {} \
                     Mbit/s the pass reached",
                    f.dirty_rate_mib_s, f.throughput_mbps
                ),
                f.advice.join("; "),
            )
        });
        self.said.forecast = Some(f);
        let Some((why, advice)) = verdict else {
            return Ok(());
        };
        if self.opts.convergence.postcopy {
            // --postcopy is the remedy chosen for this: it switches now, whatever --on-no-go.
            tracing::info!(%why, "no-go after the first pass: post-copy takes over");
            return Ok(());
        }
        match self.opts.convergence.on_no_go {
            OnNoGo::Warn => {
                self.warn(format!(
                    "this migration will not converge as configured ({why}); consider: {advice}"
                ));
                Ok(())
            }
            OnNoGo::Pause => {
                tracing::warn!(%why, "no-go: pausing the guest so the migration finishes");
                src.call("stop (on no-go)", &Stop).await?;
                self.said.convergence.no_go_action = Some(OnNoGo::Pause);
                self.said.convergence.no_go_action_at_ms = Some(self.elapsed_ms());
                Ok(())
            }
            OnNoGo::Abort => {
                self.said.convergence.no_go_action = Some(OnNoGo::Abort);
                self.said.convergence.no_go_action_at_ms = Some(self.elapsed_ms());
                Err(MigrationError::NoGo { why, advice })
            }
        }
    }

    /// `--timeout-action pause`: what is left moves while the guest is paused, as downtime.
    /// `--pause-after`, or `--timeout-action pause`'s deadline: what is left moves while the
    /// guest is paused, as downtime.
    async fn pause_at_deadline(
        &mut self,
        src: &SideCtl,
        deadline: Option<Duration>,
    ) -> Result<(), MigrationError> {
        tracing::warn!(after = ?deadline, "deadline passed: pausing the guest so the migration finishes");
        src.call("stop (timeout action)", &Stop).await?;
        self.said.convergence.timeout_action = Some(TimeoutAction::Pause);
        self.said.convergence.timeout_action_at_ms = Some(self.elapsed_ms());
        Ok(())
    }

    /// The migration reached a final state: its figures when it completed, or the error that
    /// explains best why not.
    async fn ended(
        &mut self,
        src: &SideCtl,
        events: &mut Events,
        watch: &Watch,
    ) -> Result<MigrationInfo, MigrationError> {
        // A poll may have seen the end before the queued events were read: the STOP among
        // them dates the guest's pause.
        while let Some(e) = events.try_next() {
            self.note_stop(&e);
        }
        let info = src.call("query-migrate", &QueryMigrate).await?;
        self.send_progress(Phase::Ram, info.status, info.ram);
        if let Some(status) = info.status {
            self.commit.note(status);
        }
        if info.status == Some(MigrationStatus::Completed) {
            let info = self.final_stats(src, info).await;
            self.note_convergence(&info);
            return Ok(info);
        }
        let desc = info.error_desc.unwrap_or_else(|| {
            format!(
                "QEMU reports {}",
                info.status.map_or("no migration", MigrationStatus::as_str)
            )
        });
        // The destination exits when an incoming migration fails, so a dead destination is
        // often a consequence: the source's own words (a TLS error, say) explain more.
        match MigrationError::from_qemu_failure(desc, self.opts.effective_tls_hostname()) {
            MigrationError::Failed { desc } if watch.saw_dest_lost() => {
                Err(watch.lost_error(Some(format!("source reports: {desc}"))))
            }
            other => Err(other),
        }
    }

    /// Notes what the convergence aids did, from a `query-migrate` reply.
    fn note_convergence(&mut self, info: &MigrationInfo) {
        let conv = &mut self.said.convergence;
        if let Some(pct) = info.cpu_throttle_percentage {
            let max = conv.auto_converge_max_throttle_pct.unwrap_or(0);
            conv.auto_converge_max_throttle_pct = Some(max.max(pct));
        }
        if let Some(x) = info.xbzrle_cache {
            conv.xbzrle_bytes = Some(x.bytes);
        }
    }

    /// Raises the downtime limit when a step of `--downtime-steps` is due.
    async fn step_downtime(&mut self, src: &SideCtl, start_ms: u64) -> Result<(), MigrationError> {
        let (Some(steps), Some(ram_start)) = (
            self.opts.convergence.downtime_steps,
            self.timeline.at(Mark::Ram),
        ) else {
            return Ok(());
        };
        let Some(limit) = steps.limit_at(start_ms, ram_start.elapsed()) else {
            return Ok(());
        };
        let conv = &self.said.convergence;
        if conv.controls.iter().any(|c| c.sets_downtime()) {
            // An operator set the limit while the migration ran: theirs stands.
            return Ok(());
        }
        let current = conv.downtime_steps.last().map_or(start_ms, |s| s.limit_ms);
        if limit <= current {
            return Ok(());
        }
        tracing::info!(limit_ms = limit, "raising the downtime limit");
        let set = MigrateSetParameters {
            downtime_limit: Some(limit),
            ..Default::default()
        };
        src.call("migrate-set-parameters downtime-limit", &set)
            .await?;
        self.said.convergence.downtime_steps.push(DowntimeStep {
            at_ms: ram_start.elapsed().as_millis() as u64,
            limit_ms: limit,
        });
        Ok(())
    }

    /// QEMU 7.2 sets the status to `completed` a moment before it fills in `total-time` and
    /// `downtime`; a query in between sees neither. Asks again, briefly, until they are there.
    async fn final_stats(&mut self, src: &SideCtl, mut info: MigrationInfo) -> MigrationInfo {
        for _ in 0..40 {
            if info.total_time.unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            match src.call("query-migrate", &QueryMigrate).await {
                Ok(again) => info = again,
                Err(_) => break,
            }
        }
        info
    }
}

impl super::Commit {
    /// Records that the source passed the point of no return, when `status` says so.
    pub(super) fn note(&mut self, status: MigrationStatus) {
        match status {
            MigrationStatus::Device => self.pass(CommitPoint::DeviceState),
            MigrationStatus::Completed => self.pass(CommitPoint::Completed),
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover
            | MigrationStatus::PostcopyRecoverSetup => self.pass(CommitPoint::Postcopy),
            _ => {}
        }
    }
}

/// Whether the process `pid` shares this process's network namespace (so a connection made
/// here takes the route QEMU's own would).
fn same_network_namespace(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ns = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    match (
        ns("/proc/self/ns/net".into()),
        ns(format!("/proc/{pid}/ns/net")),
    ) {
        (Some(own), Some(peer)) => own == peer,
        _ => false,
    }
}

/// The source QEMU's process id in this PID namespace: the monitor socket's peer, or, through
/// a socket this process serves (libvirt's passthrough), the process of QEMU's first vCPU
/// thread, when that is a QEMU.
async fn qemu_pid(src: &SideCtl) -> Option<u32> {
    if let Some(pid) = src.qmp.peer_pid().filter(|p| *p != std::process::id()) {
        return Some(pid);
    }
    let cpus = src.qmp.call(&QueryCpusFast).await.ok()?;
    let tid = cpus.first()?.thread_id;
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    let tgid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))?
        .trim()
        .parse()
        .ok()?;
    // A thread id from another PID namespace can name any process here.
    let exe = std::fs::read_link(format!("/proc/{tgid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy();
    name.starts_with("qemu").then_some(tgid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_waits_while_the_migration_sets_up_or_is_cancelled() {
        for held in [
            MigrationStatus::None,
            MigrationStatus::Setup,
            MigrationStatus::Cancelling,
            MigrationStatus::Unknown,
        ] {
            assert!(!channels_up(held), "{held:?}");
        }
        for up in [MigrationStatus::Active, MigrationStatus::PreSwitchover] {
            assert!(channels_up(up), "{up:?}");
        }
    }

    #[test]
    fn the_ram_phase_pauses_at_pause_after_and_aborts_at_the_deadline() {
        let secs = |s| Some(Duration::from_secs(s));
        let mut c = Convergence {
            pause_after: secs(30),
            ..Convergence::default()
        };
        assert_eq!(
            ram_deadlines(&c, secs(600)),
            Deadlines {
                abort: secs(600),
                pause: secs(30)
            }
        );
        c.pause_after = None;
        c.timeout_action = TimeoutAction::Pause;
        assert_eq!(
            ram_deadlines(&c, secs(600)),
            Deadlines {
                abort: None,
                pause: secs(600)
            }
        );
    }
}
