//! Drives one migration through the steps listed in the module docs of [`super`].

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::undo::{self, Undo};
use super::{
    FinalStatus, MigrationError, MigrationOptions, OBJECT_PREFIX, PROGRESS_INTERVAL, Phase,
    Progress, RamReport, Report, Side, Transport, decide_transport,
};
use crate::ports::{self, PortLease};
use crate::qemu::{
    CapabilityState, Cont, Migrate, MigrateIncoming, MigrateSetCapabilities, MigrateSetParameters,
    MigrationEvent, MigrationInfo, MigrationStatus, ObjectAdd, ObjectDel, QueryMigrate,
    QueryMigrateCapabilities, QueryMigrateParameters, QueryStatus, RamStats, Stop, TlsEndpoint,
    tcp_uri,
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
        _port: None,
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
    _port: Option<PortLease>,
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

        let lease = ports::allocate(opts.port_range)?;
        let port = lease.port();
        self._port = Some(lease);
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

        // 5. Migrate.
        let mut src_events = src.subscribe();
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
            .follow(&src, &mut src_events, &mut dst_events, cancel)
            .await?;
        let ram = info.ram.unwrap_or_default();
        self.ram = RamReport::from_stats(
            &ram,
            info.total_time.unwrap_or(0),
            info.downtime.unwrap_or(0),
        );

        // 6. Finish on the destination.
        self.report(Phase::Finish, info.status, Some(ram));
        self.finish_destination(&dst, &mut dst_events, source_state.was_running)
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
        src_events: &mut Events,
        dst_events: &mut Events,
        cancel: &CancellationToken,
    ) -> Result<MigrationInfo, MigrationError> {
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
            return Ok(info);
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

    /// Waits for the destination to finish loading, then resumes it (or pauses it, with
    /// `dest_paused`), so it runs exactly when the source ran before.
    async fn finish_destination(
        &mut self,
        dst: &Qmp,
        dst_events: &mut Events,
        source_was_running: bool,
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
