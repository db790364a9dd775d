//! Drives one migration through the steps listed in the module docs of [`super`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::disks::{self, DestDisk, DiskProgress, DiskReport, SourceDisk};
use super::undo::{self, Undo};
use super::{
    FinalStatus, MigrationError, MigrationOptions, OBJECT_PREFIX, PROGRESS_INTERVAL, Phase,
    Progress, RamReport, Report, Side, Transport, decide_transport,
};
use crate::ports::{self, PortLease};
use crate::qemu::{
    BlockExportAdd, BlockJobCancel, BlockJobEvent, BlockResize, BlockdevAddNbd, BlockdevMirror,
    CapabilityState, Cont, InetAddress, Migrate, MigrateContinue, MigrateIncoming,
    MigrateSetCapabilities, MigrateSetParameters, MigrationEvent, MigrationInfo, MigrationStatus,
    NbdServerStart, NbdServerStop, ObjectAdd, ObjectDel, QueryBlock, QueryBlockJobs, QueryMigrate,
    QueryMigrateCapabilities, QueryMigrateParameters, QueryNamedBlockNodes, QueryStatus, RamStats,
    Stop, TlsEndpoint, tcp_uri,
};
use crate::qmp::{Events, Qmp, QmpError};

/// After the destination's QMP connection drops, how long the source has to report the
/// failure in its own words before the migration is declared lost.
const DEST_GONE_GRACE: Duration = Duration::from_secs(10);
/// How long the destination may take to finish loading after the source completed.
const DEST_FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one migration and returns its report. Never panics on outside input; on any failure
/// everything the migration changed is rolled back before this returns (see [`Report`]).
///
/// `progress` is called at each phase change and about every [`PROGRESS_INTERVAL`] while RAM
/// is migrating. `cancel` aborts the migration and rolls back (wire it to SIGINT/SIGTERM).
pub async fn migrate(
    opts: &MigrationOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
    cancel: &CancellationToken,
) -> Report {
    let mut run = Run {
        opts,
        started: Instant::now(),
        progress,
        undo: Vec::new(),
        warnings: Vec::new(),
        transport: None,
        ram: RamReport::default(),
        conns: None,
        ports: Vec::new(),
        disk_progress: Vec::new(),
        disk_reports: Vec::new(),
    };
    let result = run.execute(cancel).await;
    run.report(Phase::Cleanup, None, None);
    let cleanup_errors = match &run.conns {
        Some((src, dst)) => {
            let stack = std::mem::take(&mut run.undo);
            undo::unwind(stack, result.is_ok(), src, dst, opts.qmp_timeout).await
        }
        None => Vec::new(),
    };
    let (status, error) = match result {
        Ok(()) => (FinalStatus::Completed, None),
        Err(MigrationError::Cancelled) => (FinalStatus::Cancelled, Some(MigrationError::Cancelled)),
        Err(e) => (FinalStatus::Failed, Some(e)),
    };
    tracing::info!(?status, "migration finished");
    Report {
        status,
        transport: run.transport,
        ram: run.ram,
        disks: run.disk_reports,
        ports: run.ports.iter().map(PortLease::port).collect(),
        wall: run.started.elapsed(),
        warnings: run.warnings,
        cleanup_errors,
        error,
    }
}

struct Run<'a> {
    opts: &'a MigrationOptions,
    started: Instant,
    progress: &'a mut (dyn FnMut(&Progress) + Send),
    undo: Vec<Undo>,
    warnings: Vec<String>,
    transport: Option<Transport>,
    ram: RamReport,
    conns: Option<(Qmp, Qmp)>,
    /// Held until the migration ends, so no other migration on this host takes the port.
    ports: Vec<PortLease>,
    disk_progress: Vec<DiskProgress>,
    disk_reports: Vec<DiskReport>,
}

/// What the preflight learnt about the source.
struct SourceState {
    was_running: bool,
}

impl Run<'_> {
    fn report(&mut self, phase: Phase, status: Option<MigrationStatus>, ram: Option<RamStats>) {
        let p = Progress {
            phase,
            status,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            ram,
            disks: self.disk_progress.clone(),
        };
        (self.progress)(&p);
    }

    async fn execute(&mut self, cancel: &CancellationToken) -> Result<(), MigrationError> {
        let opts = self.opts;
        self.report(Phase::Preflight, None, None);

        // 1. Transport, from the PKI directories alone: nothing is connected yet.
        let decision = decide_transport(opts.transport, &opts.source.pki_dir, &opts.dest.pki_dir)?;
        if let Some(w) = &decision.warning {
            tracing::warn!("{w}");
            self.warnings.push(w.clone());
        }
        let transport = decision.transport;
        self.transport = Some(transport);

        // 2. Look, don't touch.
        let src = connect(Side::Source, &opts.source.qmp, opts.qmp_timeout).await?;
        let dst = connect(Side::Destination, &opts.dest.qmp, opts.qmp_timeout).await?;
        self.conns = Some((src.clone(), dst.clone()));
        let source_state = self.check_source(&src).await?;
        self.check_destination(&dst).await?;
        let t = opts.qmp_timeout;
        let src_caps = qmp(
            Side::Source,
            "query-migrate-capabilities",
            src.call_timeout(&QueryMigrateCapabilities, t),
        )
        .await?;
        let dst_caps = qmp(
            Side::Destination,
            "query-migrate-capabilities",
            dst.call_timeout(&QueryMigrateCapabilities, t),
        )
        .await?;
        let src_params = qmp(
            Side::Source,
            "query-migrate-parameters",
            src.call_timeout(&QueryMigrateParameters, t),
        )
        .await?;
        let dst_params = qmp(
            Side::Destination,
            "query-migrate-parameters",
            dst.call_timeout(&QueryMigrateParameters, t),
        )
        .await?;

        // Disks and ports are settled before anything changes, so a refusal leaves no trace.
        let (disks, dest_disks) = self.select_disks(&src, &dst).await?;
        let mig_lease = ports::allocate(opts.port_range)?;
        let port = mig_lease.port();
        self.ports.push(mig_lease);
        let nbd_port = if disks.is_empty() {
            None
        } else {
            let lease = ports::allocate(opts.port_range)?;
            let p = lease.port();
            self.ports.push(lease);
            Some(p)
        };

        // 3. Can QEMU itself read the credentials?
        if transport == Transport::Tls {
            self.probe_credentials(Side::Destination, &dst).await?;
            self.probe_credentials(Side::Source, &src).await?;
        }
        if cancel.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }

        // 4. Prepare both sides. From here on every change pushes its undo.
        self.report(Phase::Prepare, None, None);
        let creds = match transport {
            Transport::Tls => {
                let id = object_id("tls");
                self.add_credentials(Side::Destination, &dst, &id).await?;
                self.add_credentials(Side::Source, &src, &id).await?;
                id
            }
            // The empty string turns TLS off, whatever an earlier migration left set.
            Transport::Tcp => String::new(),
        };
        let mut wanted = vec![("events", true)];
        if opts.multifd.is_some() {
            wanted.push(("multifd", true));
        }
        self.set_capabilities(Side::Destination, &dst, &dst_caps, &wanted)
            .await?;
        if !disks.is_empty() {
            // Stop at pre-switchover, CPUs paused, to end the mirrors before the last RAM pass.
            wanted.push(("pause-before-switchover", true));
        }
        self.set_capabilities(Side::Source, &src, &src_caps, &wanted)
            .await?;

        let dst_set = MigrateSetParameters {
            tls_creds: Some(creds.clone()),
            multifd_channels: opts.multifd,
            ..Default::default()
        };
        self.set_parameters(Side::Destination, &dst, &dst_params, &dst_set)
            .await?;
        let src_set = MigrateSetParameters {
            tls_creds: Some(creds.clone()),
            tls_hostname: Some(match transport {
                Transport::Tls => opts.effective_tls_hostname().to_string(),
                Transport::Tcp => String::new(),
            }),
            max_bandwidth: Some(opts.max_bandwidth),
            downtime_limit: opts.downtime_limit.map(|d| d.as_millis() as u64),
            multifd_channels: opts.multifd,
            ..Default::default()
        };
        self.set_parameters(Side::Source, &src, &src_params, &src_set)
            .await?;

        if let Some(nbd_port) = nbd_port {
            self.export_disks(&dst, &disks, &dest_disks, nbd_port, &creds)
                .await?;
        }
        let listen_uri = tcp_uri(opts.listen_address(), port);
        let connect_uri = match &opts.source_connect {
            Some(hostport) => format!("tcp:{hostport}"),
            None => listen_uri.clone(),
        };

        let mut dst_events = dst.subscribe();
        self.undo.push(Undo::TearDownDestination);
        tracing::info!(uri = %listen_uri, "destination listening");
        qmp(
            Side::Destination,
            "migrate-incoming",
            dst.call_timeout(&MigrateIncoming { uri: listen_uri }, t),
        )
        .await?;

        // 5. Disks, then 6. RAM.
        let mut src_events = src.subscribe();
        if let Some(nbd_port) = nbd_port {
            self.mirror_disks(&src, &disks, nbd_port, &creds).await?;
            self.wait_mirrors_ready(&src, &disks, &mut src_events, &mut dst_events, cancel)
                .await?;
        }
        if source_state.was_running {
            self.undo.push(Undo::ResumeSource);
        }
        self.undo.push(Undo::CancelMigration);
        tracing::info!(uri = %connect_uri, %transport, "starting migration");
        qmp(
            Side::Source,
            "migrate",
            src.call_timeout(&Migrate { uri: connect_uri }, t),
        )
        .await?;
        self.report(Phase::Ram, Some(MigrationStatus::Setup), None);
        let info = self
            .follow(&src, &disks, &mut src_events, &mut dst_events, cancel)
            .await?;
        let ram = info.ram.unwrap_or_default();
        self.ram = RamReport::from_stats(
            &ram,
            info.total_time.unwrap_or(0),
            info.downtime.unwrap_or(0),
        );

        // 7. Finish on the destination.
        self.report(Phase::Finish, info.status, Some(ram));
        self.finish_destination(
            &dst,
            &mut dst_events,
            source_state.was_running,
            !disks.is_empty(),
        )
        .await
    }

    async fn check_source(&mut self, src: &Qmp) -> Result<SourceState, MigrationError> {
        let t = self.opts.qmp_timeout;
        let status = qmp(
            Side::Source,
            "query-status",
            src.call_timeout(&QueryStatus, t),
        )
        .await?;
        let movable = ["running", "paused", "prelaunch", "suspended", "debug"];
        if !movable.contains(&status.status.as_str()) {
            return Err(MigrationError::SourceNotReady {
                socket: self.opts.source.qmp.clone(),
                status: status.status,
            });
        }
        let info = qmp(
            Side::Source,
            "query-migrate",
            src.call_timeout(&QueryMigrate, t),
        )
        .await?;
        if let Some(s) = info.status
            && !(s.is_final() || s == MigrationStatus::None)
        {
            return Err(MigrationError::SourceNotReady {
                socket: self.opts.source.qmp.clone(),
                status: format!("{} with a migration already {s:?}", status.status),
            });
        }
        Ok(SourceState {
            was_running: status.running,
        })
    }

    async fn check_destination(&mut self, dst: &Qmp) -> Result<(), MigrationError> {
        let status = qmp(
            Side::Destination,
            "query-status",
            dst.call_timeout(&QueryStatus, self.opts.qmp_timeout),
        )
        .await?;
        if !status.is_incoming() {
            return Err(MigrationError::DestinationNotIncoming {
                socket: self.opts.dest.qmp.clone(),
                status: status.status,
            });
        }
        Ok(())
    }

    fn credentials(&self, side: Side, id: &str) -> ObjectAdd {
        let (dir, endpoint) = match side {
            Side::Source => (&self.opts.source.pki_dir, TlsEndpoint::Client),
            Side::Destination => (&self.opts.dest.pki_dir, TlsEndpoint::Server),
        };
        ObjectAdd::TlsCredsX509 {
            id: id.to_string(),
            dir: dir.clone(),
            endpoint,
            verify_peer: true,
            priority: self.opts.tls_priority.clone(),
        }
    }

    /// A throwaway `object-add`/`object-del`: QEMU reads the files at `object-add`, so this
    /// proves the QEMU process (often not root) can read them before anything is changed.
    async fn probe_credentials(&mut self, side: Side, q: &Qmp) -> Result<(), MigrationError> {
        let id = object_id("probe");
        let add = self.credentials(side, &id);
        let t = self.opts.qmp_timeout;
        match q.call_timeout(&add, t).await {
            Ok(_) => {}
            Err(QmpError::Qemu { desc, .. }) => {
                let (socket, dir) = self.endpoint_paths(side);
                return Err(MigrationError::CredentialsUnusable {
                    side,
                    socket: socket.to_path_buf(),
                    dir: dir.to_path_buf(),
                    desc,
                });
            }
            Err(source) => {
                return Err(MigrationError::Qmp {
                    side,
                    step: "credentials preflight",
                    source,
                });
            }
        }
        qmp(side, "object-del", q.call_timeout(&ObjectDel { id }, t)).await?;
        Ok(())
    }

    fn endpoint_paths(&self, side: Side) -> (&Path, &Path) {
        match side {
            Side::Source => (&self.opts.source.qmp, &self.opts.source.pki_dir),
            Side::Destination => (&self.opts.dest.qmp, &self.opts.dest.pki_dir),
        }
    }

    async fn add_credentials(
        &mut self,
        side: Side,
        q: &Qmp,
        id: &str,
    ) -> Result<(), MigrationError> {
        let add = self.credentials(side, id);
        qmp(
            side,
            "object-add tls-creds-x509",
            q.call_timeout(&add, self.opts.qmp_timeout),
        )
        .await?;
        self.undo.push(Undo::DeleteObject {
            side,
            id: id.to_string(),
        });
        Ok(())
    }

    /// Sets the `wanted` capabilities that differ from `saved`, remembering the old states.
    async fn set_capabilities(
        &mut self,
        side: Side,
        q: &Qmp,
        saved: &[CapabilityState],
        wanted: &[(&str, bool)],
    ) -> Result<(), MigrationError> {
        let current = |name: &str| {
            saved
                .iter()
                .find(|c| c.capability == name)
                .map(|c| c.state)
                .unwrap_or(false)
        };
        let (set, restore): (Vec<_>, Vec<_>) = wanted
            .iter()
            .filter(|(name, state)| current(name) != *state)
            .map(|(name, state)| {
                (
                    CapabilityState {
                        capability: name.to_string(),
                        state: *state,
                    },
                    CapabilityState {
                        capability: name.to_string(),
                        state: !*state,
                    },
                )
            })
            .unzip();
        if set.is_empty() {
            return Ok(());
        }
        self.undo.push(Undo::RestoreCapabilities {
            side,
            caps: restore,
        });
        qmp(
            side,
            "migrate-set-capabilities",
            q.call_timeout(
                &MigrateSetCapabilities { capabilities: set },
                self.opts.qmp_timeout,
            ),
        )
        .await?;
        Ok(())
    }

    async fn set_parameters(
        &mut self,
        side: Side,
        q: &Qmp,
        saved: &Map<String, Value>,
        set: &MigrateSetParameters,
    ) -> Result<(), MigrationError> {
        self.undo.push(Undo::RestoreParameters {
            side,
            params: MigrateSetParameters::restore_from(saved),
        });
        qmp(
            side,
            "migrate-set-parameters",
            q.call_timeout(set, self.opts.qmp_timeout),
        )
        .await?;
        Ok(())
    }

    /// Follows the outgoing migration to a final state, reporting progress. Fails on
    /// cancellation, the deadline, a stall, or a destination that went away.
    async fn follow(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
        dst_events: &mut Events,
        cancel: &CancellationToken,
    ) -> Result<MigrationInfo, MigrationError> {
        let mut switched = false;
        let opts = self.opts;
        let t = opts.qmp_timeout;
        let deadline = opts.timeout.map(|d| self.started + d);
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut last_bytes = 0;
        let mut last_change = Instant::now();
        let mut dest_gone_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::Timeout { after: opts.timeout.unwrap_or_default() });
                }
                event = src_events.next() => match event {
                    None => {
                        return Err(MigrationError::Qmp {
                            side: Side::Source,
                            step: "following the migration",
                            source: QmpError::Closed { peer: src.peer().to_string(), reason: "the source QEMU exited".into() },
                        });
                    }
                    Some(e) if e.event == "MIGRATION" => {
                        if let Ok(m) = serde_json::from_value::<MigrationEvent>(e.data) {
                            tracing::debug!(status = ?m.status, "source migration status");
                            if m.status.is_final() {
                                break;
                            }
                            if m.status == MigrationStatus::PreSwitchover && !switched {
                                switched = true;
                                self.switchover(src, disks, src_events).await?;
                            }
                        }
                    }
                    Some(_) => {}
                },
                event = dst_events.next(), if dest_gone_at.is_none() => {
                    if event.is_none() {
                        tracing::warn!("the destination QEMU's QMP connection closed");
                        dest_gone_at = Some(Instant::now());
                    }
                }
                _ = tick.tick() => {
                    let info = qmp(Side::Source, "query-migrate", src.call_timeout(&QueryMigrate, t)).await?;
                    let ram = info.ram.unwrap_or_default();
                    self.report(Phase::Ram, info.status, info.ram);
                    if info.status.is_some_and(MigrationStatus::is_final) {
                        break;
                    }
                    if info.status == Some(MigrationStatus::PreSwitchover) && !switched {
                        switched = true;
                        self.switchover(src, disks, src_events).await?;
                    }
                    if ram.transferred > last_bytes {
                        last_bytes = ram.transferred;
                        last_change = Instant::now();
                    } else if last_change.elapsed() >= opts.stall_timeout {
                        return Err(MigrationError::Stalled {
                            after: opts.stall_timeout,
                            status: format!("{:?}", info.status.unwrap_or(MigrationStatus::None)),
                        });
                    }
                    if dest_gone_at.is_some_and(|at| at.elapsed() >= DEST_GONE_GRACE) {
                        return Err(MigrationError::DestinationDied { desc: info.error_desc });
                    }
                }
            }
        }
        let info = qmp(
            Side::Source,
            "query-migrate",
            src.call_timeout(&QueryMigrate, t),
        )
        .await?;
        self.report(Phase::Ram, info.status, info.ram);
        if info.status == Some(MigrationStatus::Completed) {
            return Ok(self.final_stats(src, info).await);
        }
        let desc = info
            .error_desc
            .unwrap_or_else(|| format!("QEMU reports {:?}", info.status));
        // The destination exits when an incoming migration fails, so a dead destination is
        // often a consequence: the source's own words (a TLS error, say) explain more.
        match MigrationError::from_qemu_failure(desc, opts.effective_tls_hostname()) {
            MigrationError::Failed { desc } if dest_gone_at.is_some() => {
                Err(MigrationError::DestinationDied { desc: Some(desc) })
            }
            other => Err(other),
        }
    }

    /// QEMU 7.2 sets the status to `completed` a moment before it fills in `total-time` and
    /// `downtime`; a query in between sees neither. Asks again, briefly, until they are there.
    async fn final_stats(&mut self, src: &Qmp, mut info: MigrationInfo) -> MigrationInfo {
        for _ in 0..40 {
            if info.total_time.unwrap_or(0) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            match src.call_timeout(&QueryMigrate, self.opts.qmp_timeout).await {
                Ok(again) => info = again,
                Err(_) => break,
            }
        }
        info
    }

    /// Waits for the destination to finish loading, then resumes it (or pauses it, with
    /// `dest_paused`), so it runs exactly when the source ran before.
    async fn finish_destination(
        &mut self,
        dst: &Qmp,
        dst_events: &mut Events,
        source_was_running: bool,
        has_disks: bool,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        let deadline = Instant::now() + DEST_FINISH_TIMEOUT;
        let status = loop {
            let status = match dst.call_timeout(&QueryStatus, t).await {
                Ok(s) => s,
                Err(e) if e.is_closed() => {
                    return Err(MigrationError::DestinationDied { desc: None });
                }
                Err(source) => {
                    return Err(MigrationError::Qmp {
                        side: Side::Destination,
                        step: "query-status",
                        source,
                    });
                }
            };
            if !status.is_incoming() {
                break status;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(MigrationError::DestinationNotFinished { after: DEST_FINISH_TIMEOUT });
                }
                // A MIGRATION or RESUME event usually means it finished; re-check either way.
                _ = dst_events.next() => {}
                _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            }
        };
        if has_disks {
            // The exports must be gone before the guest runs and writes its disks itself.
            qmp(
                Side::Destination,
                "nbd-server-stop",
                dst.call_timeout(&NbdServerStop, t),
            )
            .await?;
            self.undo.retain(|u| !matches!(u, Undo::StopNbdServer));
        }
        let want_running = source_was_running && !self.opts.dest_paused;
        if want_running && !status.running {
            qmp(Side::Destination, "cont", dst.call_timeout(&Cont, t)).await?;
            tracing::info!("destination resumed");
        } else if !want_running && status.running {
            qmp(Side::Destination, "stop", dst.call_timeout(&Stop, t)).await?;
        }
        Ok(())
    }
}

impl Run<'_> {
    /// Picks the source disks to copy and checks the destination can take each.
    async fn select_disks(
        &mut self,
        src: &Qmp,
        dst: &Qmp,
    ) -> Result<(Vec<SourceDisk>, Vec<DestDisk>), MigrationError> {
        if self.opts.disks == disks::DiskSelection::None {
            return Ok((Vec::new(), Vec::new()));
        }
        let t = self.opts.qmp_timeout;
        let blocks = qmp(
            Side::Source,
            "query-block",
            src.call_timeout(&QueryBlock, t),
        )
        .await?;
        let selected = disks::select(&blocks, &self.opts.disks)?;
        if selected.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let dest_nodes = qmp(
            Side::Destination,
            "query-named-block-nodes",
            dst.call_timeout(&QueryNamedBlockNodes, t),
        )
        .await?;
        let dest = disks::check_destination(&dest_nodes, &selected, self.opts.create_dest_disks)?;
        tracing::info!(disks = ?selected.iter().map(|d| &d.node).collect::<Vec<_>>(), "disks to copy");
        Ok((selected, dest))
    }

    /// Destination side of the disk copy: grow what must grow, start the NBD server (with the
    /// migration's TLS credentials), export each disk writable.
    async fn export_disks(
        &mut self,
        dst: &Qmp,
        disks: &[SourceDisk],
        dest: &[DestDisk],
        port: u16,
        creds: &str,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        for (disk, d) in disks.iter().zip(dest) {
            if let DestDisk::Grow(size) = d {
                tracing::info!(node = %disk.node, size, "growing the destination disk");
                let resize = BlockResize {
                    node_name: disk.node.clone(),
                    size: *size,
                };
                qmp(
                    Side::Destination,
                    "block_resize",
                    dst.call_timeout(&resize, t),
                )
                .await?;
            }
        }
        let mut start = NbdServerStart::inet(self.opts.listen_address(), port);
        if !creds.is_empty() {
            start.tls_creds = Some(creds.to_string());
        }
        self.undo.push(Undo::StopNbdServer);
        qmp(
            Side::Destination,
            "nbd-server-start",
            dst.call_timeout(&start, t),
        )
        .await?;
        for disk in disks {
            let export = BlockExportAdd::nbd_writable(&disk.export_id(), &disk.node);
            qmp(
                Side::Destination,
                "block-export-add",
                dst.call_timeout(&export, t),
            )
            .await?;
        }
        tracing::info!(port, "destination exports its disks over NBD");
        Ok(())
    }

    /// Source side: an NBD client node per disk (TLS as the migration) and a mirror into it.
    async fn mirror_disks(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        port: u16,
        creds: &str,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        let host = self.opts.listen_address().to_string();
        let tls = !creds.is_empty();
        for disk in disks {
            let add = BlockdevAddNbd {
                driver: "nbd",
                node_name: disk.nbd_node(),
                server: InetAddress::new(&host, port),
                export: disk.node.clone(),
                tls_creds: tls.then(|| creds.to_string()),
                tls_hostname: tls.then(|| self.opts.effective_tls_hostname().to_string()),
            };
            qmp(Side::Source, "blockdev-add nbd", src.call_timeout(&add, t)).await?;
            self.undo.push(Undo::DeleteBlockNode {
                side: Side::Source,
                node: disk.nbd_node(),
            });
        }
        self.disk_progress = disks
            .iter()
            .map(|d| DiskProgress {
                device: d.node.clone(),
                offset: 0,
                len: d.size,
                ready: false,
            })
            .collect();
        for disk in disks {
            let mirror = BlockdevMirror {
                job_id: disk.job_id(),
                device: disk.node.clone(),
                target: disk.nbd_node(),
                sync: "full",
                copy_mode: self.opts.mirror_mode,
            };
            qmp(
                Side::Source,
                "blockdev-mirror",
                src.call_timeout(&mirror, t),
            )
            .await?;
            self.undo.push(Undo::CancelJob { job: disk.job_id() });
        }
        Ok(())
    }

    /// Follows the mirrors until every one is ready (source and destination in sync),
    /// reporting progress. Fails on a mirror error, a dead destination, a stall, the deadline,
    /// or cancellation.
    async fn wait_mirrors_ready(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
        dst_events: &mut Events,
        cancel: &CancellationToken,
    ) -> Result<(), MigrationError> {
        let opts = self.opts;
        let t = opts.qmp_timeout;
        let started = Instant::now();
        let deadline = opts.timeout.map(|d| self.started + d);
        let mut ready: HashMap<String, u64> = HashMap::new();
        let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
        let mut last_total = 0;
        let mut last_change = Instant::now();
        let node_of = |job: &str| {
            disks
                .iter()
                .find(|d| d.job_id() == job)
                .map(|d| d.node.clone())
        };
        self.report(Phase::Disks, None, None);
        while ready.len() < disks.len() {
            tokio::select! {
                _ = cancel.cancelled() => return Err(MigrationError::Cancelled),
                _ = sleep_until_opt(deadline) => {
                    return Err(MigrationError::Timeout { after: opts.timeout.unwrap_or_default() });
                }
                event = src_events.next() => {
                    let Some(e) = event else {
                        return Err(source_gone(src, "copying disks"));
                    };
                    let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else { continue };
                    let Some(node) = node_of(&job.device) else { continue };
                    match e.event.as_str() {
                        "BLOCK_JOB_READY" => {
                            tracing::info!(%node, bytes = job.len, "mirror ready");
                            ready.insert(node.clone(), started.elapsed().as_millis() as u64);
                            if let Some(p) = self.disk_progress.iter_mut().find(|p| p.device == node) {
                                p.offset = job.offset;
                                p.len = job.len;
                                p.ready = true;
                            }
                        }
                        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR" => {
                            return Err(MigrationError::MirrorFailed {
                                node,
                                desc: job.error.unwrap_or_else(|| format!("{} before the copy was in sync", e.event)),
                            });
                        }
                        _ => {}
                    }
                }
                event = dst_events.next() => {
                    if event.is_none() {
                        return Err(MigrationError::DestinationDied { desc: Some("while disks were being copied".into()) });
                    }
                }
                _ = tick.tick() => {
                    let jobs = qmp(Side::Source, "query-block-jobs", src.call_timeout(&QueryBlockJobs, t)).await?;
                    for p in self.disk_progress.iter_mut() {
                        if let Some(j) = jobs.iter().find(|j| node_of(&j.device).as_deref() == Some(p.device.as_str())) {
                            p.offset = j.offset;
                            p.len = j.len;
                            p.ready |= j.ready;
                        }
                    }
                    self.report(Phase::Disks, None, None);
                    let total: u64 = self.disk_progress.iter().map(|p| p.offset).sum();
                    if total > last_total {
                        last_total = total;
                        last_change = Instant::now();
                    } else if last_change.elapsed() >= opts.stall_timeout {
                        return Err(MigrationError::Stalled { after: opts.stall_timeout, status: "copying disks".into() });
                    }
                }
            }
        }
        self.disk_reports = self
            .disk_progress
            .iter()
            .map(|p| {
                let ms = ready.get(&p.device).copied().unwrap_or(0);
                let mbps = if ms == 0 {
                    0.0
                } else {
                    p.len as f64 * 8.0 / 1e6 / (ms as f64 / 1000.0)
                };
                DiskReport {
                    device: p.device.clone(),
                    bytes: p.len,
                    ms,
                    throughput_mbps: (mbps * 10.0).round() / 10.0,
                }
            })
            .collect();
        Ok(())
    }

    /// At `pre-switchover` (source CPUs paused): end every ready mirror without pivoting, so
    /// the destination's disks hold exactly the source's, then let the migration finish.
    async fn switchover(
        &mut self,
        src: &Qmp,
        disks: &[SourceDisk],
        src_events: &mut Events,
    ) -> Result<(), MigrationError> {
        let t = self.opts.qmp_timeout;
        for disk in disks {
            let cancel = BlockJobCancel {
                device: disk.job_id(),
                force: false,
            };
            qmp(
                Side::Source,
                "block-job-cancel",
                src.call_timeout(&cancel, t),
            )
            .await?;
        }
        let mut pending: Vec<String> = disks.iter().map(|d| d.job_id()).collect();
        let deadline = Instant::now() + t;
        while !pending.is_empty() {
            let event = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(MigrationError::MirrorFailed {
                        node: pending.join(", "),
                        desc: format!("the mirror did not finish within {t:?} at switch-over"),
                    });
                }
                event = src_events.next() => event,
            };
            let Some(e) = event else {
                return Err(source_gone(src, "switch-over"));
            };
            let Ok(job) = serde_json::from_value::<BlockJobEvent>(e.data.clone()) else {
                continue;
            };
            if !pending.contains(&job.device) {
                continue;
            }
            let node = disks
                .iter()
                .find(|d| d.job_id() == job.device)
                .map(|d| d.node.clone())
                .unwrap_or_else(|| job.device.clone());
            match (e.event.as_str(), job.error) {
                ("BLOCK_JOB_COMPLETED", None) => {
                    pending.retain(|j| j != &job.device);
                    if let Some(r) = self.disk_reports.iter_mut().find(|r| r.device == node) {
                        r.bytes = r.bytes.max(job.offset);
                    }
                }
                ("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED", error) => {
                    return Err(MigrationError::MirrorFailed {
                        node,
                        desc: error.unwrap_or_else(|| "cancelled before it was in sync".into()),
                    });
                }
                _ => {}
            }
        }
        tracing::info!("mirrors completed at switch-over; continuing");
        let cont = MigrateContinue {
            state: MigrationStatus::PreSwitchover,
        };
        qmp(Side::Source, "migrate-continue", src.call_timeout(&cont, t)).await?;
        Ok(())
    }
}

fn source_gone(src: &Qmp, step: &'static str) -> MigrationError {
    MigrationError::Qmp {
        side: Side::Source,
        step,
        source: QmpError::Closed {
            peer: src.peer().to_string(),
            reason: "the source QEMU exited".into(),
        },
    }
}

async fn connect(side: Side, socket: &Path, timeout: Duration) -> Result<Qmp, MigrationError> {
    Qmp::connect(socket, timeout)
        .await
        .map_err(|source| MigrationError::Connect {
            side,
            socket: socket.to_path_buf(),
            source,
        })
}

/// Tags a QMP failure with the side and step it happened at.
async fn qmp<T>(
    side: Side,
    step: &'static str,
    call: impl std::future::Future<Output = Result<T, QmpError>>,
) -> Result<T, MigrationError> {
    call.await
        .map_err(|source| MigrationError::Qmp { side, step, source })
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A QOM id unique within this host: prefix, purpose, process id and a counter.
fn object_id(purpose: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{OBJECT_PREFIX}{purpose}-{}-{n}", std::process::id())
}
