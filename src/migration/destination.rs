//! The destination side of a migration, driven over its QMP socket: by the local driver when
//! both QEMUs are reachable from this process, or by the destination host's service on behalf
//! of a remote source.
//!
//! 1. [`DestinationSide::attach`]: connect, check the QEMU waits with `-incoming defer`, save
//!    its migration settings. Changes nothing.
//! 2. [`DestinationSide::prepare`]: check the disks it must take, reserve ports, prove QEMU can
//!    read the credentials, then create them (and an `authz-simple` object when asked), set
//!    capabilities and parameters, export the disks over NBD, `migrate-incoming`.
//! 3. [`DestinationSide::finish`] once the source completed: wait until the state is loaded,
//!    stop the NBD server, resume (or not), put everything back but the VM.
//!    Or [`DestinationSide::abort`]: tear the destination QEMU down and release everything.

use std::path::Path;
use std::time::Duration;

use super::disks::{self, DestDisk};
use super::options::COMPRESS_NEEDS_MULTIFD;
use super::side::{SideCtl, object_id};
use super::undo::Undo;
use super::{MigrationError, PROGRESS_INTERVAL, Side, check_multifd_channels};
use crate::peer::{Authz, DestPlan, DestPrepared};
use crate::ports::{self, PortLease, PortRange};
use crate::qemu::{
    BlockExportAdd, CapabilityState, Cont, MigrateIncoming, MigrateRecover, MigrateSetCapabilities,
    MigrateSetParameters, MigrationStatus, NbdServerStart, NbdServerStop, ObjectAdd, QueryBlock,
    QueryMigrate, QueryStatus, Stop, tcp_uri,
};
use crate::qmp::{Events, QmpError};

/// How long the destination may take to finish loading after the source completed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// How a destination finished.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// Clean-up problems.
    pub problems: Vec<String>,
    /// When the guest resumed here (its `RESUME` event), microseconds since the epoch on this
    /// host's clock; `None` when it was left paused or QEMU did not say.
    pub resumed_at_us: Option<i64>,
}

/// How long to wait for the `RESUME` event after `cont` answered, for the pause figure only.
const RESUME_EVENT_WAIT: Duration = Duration::from_secs(2);
/// When `cont` has not answered after this long, a `query-status` is sent behind it.
const CONT_PROBE_AFTER: Duration = Duration::from_secs(1);
/// After `cont` went unanswered: how many new connections ask whether the guest runs, each
/// allowed [`ASK_AGAIN_TIMEOUT`], [`ASK_AGAIN_PAUSE`] apart (about 20 s in all).
const ASK_AGAIN_TRIES: u32 = 3;
const ASK_AGAIN_TIMEOUT: Duration = Duration::from_secs(5);
const ASK_AGAIN_PAUSE: Duration = Duration::from_secs(2);

/// How a destination rolled back, as the source needs to know it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AbortOutcome {
    /// The destination is known not to run the guest and never to have run it: the tool never
    /// resumed it, and it could not start on its own (autostart was turned off before it was
    /// given the migration). Only then may a source that passed the switch-over resume.
    pub stopped: bool,
    /// Clean-up problems.
    pub problems: Vec<String>,
}

/// A destination QEMU being prepared for, receiving, or finishing a migration.
pub struct DestinationSide {
    ctl: SideCtl,
    events: Events,
    ports: Vec<PortLease>,
    has_disks: bool,
    /// What each disk needs, from the preflight.
    dest_disks: Vec<DestDisk>,
    /// Whether this QEMU may run the guest; decides what a roll-back may do to it.
    resume: Resume,
    /// Where `prepare` listened (address, port range): a post-copy recovery listens there
    /// again.
    listen: Option<(String, PortRange)>,
}

/// Whether a destination may run the guest. Its autostart is off before it gets the
/// migration, so only the tool's `cont` can start it: once that was sent, nothing of the
/// tool's stops, quits or kills this QEMU again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resume {
    /// No `cont` was sent, or QEMU is known not to have carried it out.
    NotSent,
    /// `cont` was sent and its outcome could not be learnt: the guest may run here.
    MayRun,
    /// QEMU confirmed the guest runs here.
    Running,
}

/// What asking a destination to resume led to.
enum ResumeOutcome {
    /// The guest runs; the `RESUME` event's time when QEMU said.
    Running(Option<i64>),
    /// QEMU did not carry `cont` out: it answered with an error, or a `query-status` it
    /// answered after `cont` on the same connection found the guest not running and no
    /// `RESUME` event came before that answer.
    NotResumed(String),
    /// No answer that tells: what was last seen of the destination.
    Unknown(String),
}

impl std::fmt::Debug for DestinationSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationSide")
            .field("socket", &self.ctl.socket)
            .finish_non_exhaustive()
    }
}

impl DestinationSide {
    /// Connects to the destination QEMU and checks it waits for a migration. Changes nothing.
    pub async fn attach(
        socket: &Path,
        pki_dir: &Path,
        timeout: Duration,
    ) -> Result<DestinationSide, MigrationError> {
        let ctl = SideCtl::connect(Side::Destination, socket, pki_dir, timeout).await?;
        DestinationSide::attach_ctl(ctl).await
    }

    /// [`DestinationSide::attach`] over an established connection.
    pub(crate) async fn attach_ctl(mut ctl: SideCtl) -> Result<DestinationSide, MigrationError> {
        let socket = ctl.socket.clone();
        let events = ctl.qmp.subscribe();
        let status = ctl.call("query-status", &QueryStatus).await?;
        if !status.is_incoming() {
            return Err(MigrationError::DestinationNotIncoming {
                socket,
                status: status.status,
            });
        }
        ctl.save_settings().await?;
        Ok(DestinationSide {
            ctl,
            events,
            ports: Vec::new(),
            has_disks: false,
            dest_disks: Vec::new(),
            resume: Resume::NotSent,
            listen: None,
        })
    }

    /// The destination QEMU's version (its greeting's).
    pub fn qemu_version(&self) -> crate::qmp::QemuVersion {
        self.ctl.qmp.greeting().version.qemu
    }

    /// Checks everything that can be checked without changing anything: the machine type, the
    /// disks, the ports, the credentials. A failure here leaves the destination as it was.
    pub async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        // What a peer sends is checked by the same rules as the options.
        if let Some(n) = plan.multifd {
            check_multifd_channels(n).map_err(|desc| MigrationError::BadRequest { desc })?;
        }
        if plan.multifd_compression.is_some() && plan.multifd.is_none() {
            return Err(MigrationError::BadRequest {
                desc: COMPRESS_NEEDS_MULTIFD.into(),
            });
        }
        if let Some(machine) = &plan.machine {
            super::versions::check_destination_machine(&self.ctl, machine).await?;
        }
        if plan.postcopy {
            self.probe_postcopy().await?;
        }
        self.dest_disks = if plan.disks.is_empty() {
            Vec::new()
        } else {
            // Only the root nodes the guest's devices use may be exported: never a file node
            // or any other node a peer might name.
            let blocks = self.ctl.call("query-block", &QueryBlock).await?;
            let matched = disks::check_destination(&blocks, &plan.disks, plan.create_dest_disks)?;
            // A top-only copy is only as good as the template under it: same bytes here.
            disks::verify_backing_fingerprints(&matched).await?;
            matched
        };
        self.ports.push(ports::allocate(plan.port_range)?);
        if !plan.disks.is_empty() {
            self.ports.push(ports::allocate(plan.port_range)?);
        }
        if plan.tls {
            self.ctl
                .probe_credentials(plan.tls_priority.as_deref())
                .await?;
        }
        Ok(())
    }

    /// Makes the changes: credentials, capabilities, parameters, NBD exports, and finally
    /// `migrate-incoming`. Every change is undone by [`DestinationSide::abort`].
    pub async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError> {
        let migration_port = self.ports.first().map(PortLease::port);
        let nbd_port = self.ports.get(1).map(PortLease::port);
        let Some(migration_port) = migration_port else {
            return Err(MigrationError::Failed {
                desc: "destination prepared without its preflight".into(),
            });
        };
        let (creds, authz) = self.credentials(plan).await?;
        let mut wanted = vec![("events", true)];
        if plan.multifd.is_some() {
            wanted.push(("multifd", true));
        }
        if plan.postcopy {
            wanted.push(("postcopy-ram", true));
        }
        self.ctl.set_capabilities(&wanted).await?;
        self.ctl
            .set_parameters(&MigrateSetParameters {
                tls_creds: Some(creds.clone()),
                tls_authz: authz.clone().map(serde_json::Value::String),
                multifd_channels: plan.multifd,
                multifd_compression: plan.multifd_compression.map(|c| c.as_str().to_string()),
                ..Default::default()
            })
            .await?;
        let nbd_port = match nbd_port {
            Some(port) => Some(self.export_disks(plan, port, &creds, authz).await?),
            None => None,
        };
        let migration_port = self.listen(plan, migration_port).await?;
        Ok(DestPrepared {
            migration_port,
            nbd_port,
        })
    }

    /// This side's credentials (the probed object; none for plain TCP, whose empty string
    /// turns TLS off whatever an earlier migration left set) and, when asked, an
    /// `authz-simple` object for the source's certificate.
    async fn credentials(
        &mut self,
        plan: &DestPlan,
    ) -> Result<(String, Option<String>), MigrationError> {
        if !plan.tls {
            return Ok((String::new(), None));
        }
        let creds = self
            .ctl
            .credentials_id(plan.tls_priority.as_deref())
            .await?;
        let authz = match &plan.authz {
            Authz::Identity(identity) => {
                let id = object_id("authz");
                let add = ObjectAdd::AuthzSimple {
                    id: id.clone(),
                    identity: identity.clone(),
                };
                self.ctl.add_object("object-add authz-simple", add).await?;
                Some(id)
            }
            Authz::FromPeerCert => {
                // Only the service knows the peer's certificate; it resolves this first.
                return Err(MigrationError::BadRequest {
                    desc: "authorization by the peer's certificate outside a service".into(),
                });
            }
            Authz::Off => None,
        };
        Ok((creds, authz))
    }

    /// Starts the NBD server (on `port`, or another when that
    /// was taken meanwhile) and exports the disks the preflight matched; returns the port.
    async fn export_disks(
        &mut self,
        plan: &DestPlan,
        port: u16,
        creds: &str,
        authz: Option<String>,
    ) -> Result<u16, MigrationError> {
        self.ctl.undo.push(Undo::StopNbdServer);
        let (qmp, t) = (self.ctl.qmp.clone(), self.ctl.timeout);
        let started = self
            .bind_retrying(plan.port_range, port, "nbd-server-start", |port| {
                let mut start = NbdServerStart::inet(&plan.listen_address, port);
                if plan.tls {
                    start.tls_creds = Some(creds.to_string());
                    start.tls_authz = authz.clone();
                }
                let qmp = qmp.clone();
                async move { qmp.call_timeout(&start, t).await.map(drop) }
            })
            .await;
        let port = match started {
            Ok(port) => port,
            Err(e) => {
                // Refused, not timed out: no server of ours runs. One that runs is another
                // run's ("NBD server already running"), and is not ours to stop.
                let maybe_ours =
                    matches!(&e, MigrationError::Qmp { source, .. } if source.is_timeout());
                if !maybe_ours {
                    self.ctl.undo.retain(|u| !matches!(u, Undo::StopNbdServer));
                }
                return Err(e);
            }
        };
        // The disks the preflight matched and checked, and no others.
        for d in &self.dest_disks {
            let export = BlockExportAdd::nbd_writable(&object_id("export"), &d.node, &d.export);
            self.ctl.call("block-export-add", &export).await?;
        }
        self.has_disks = true;
        tracing::info!(port, "destination exports its disks over NBD");
        Ok(port)
    }

    /// Turns autostart off and listens for the migration stream (`migrate-incoming`) on
    /// `port`, or another when that was taken meanwhile; returns the port.
    async fn listen(&mut self, plan: &DestPlan, port: u16) -> Result<u16, MigrationError> {
        self.listen = Some((plan.listen_address.clone(), plan.port_range));
        self.ctl.undo.push(Undo::TearDownDestination);
        // `stop` on a QEMU in `inmigrate` turns its autostart off: started without -S, it
        // would otherwise run the guest as soon as the state is loaded, before the tool knows
        // the source has finished. From here on only `finish` resumes it.
        self.ctl.call("stop (autostart off)", &Stop).await?;
        let (qmp, t) = (self.ctl.qmp.clone(), self.ctl.timeout);
        self.bind_retrying(plan.port_range, port, "migrate-incoming", |port| {
            let uri = tcp_uri(&plan.listen_address, port);
            tracing::info!(%uri, "destination listening");
            let qmp = qmp.clone();
            async move {
                qmp.call_timeout(&MigrateIncoming { uri }, t)
                    .await
                    .map(drop)
            }
        })
        .await
    }

    /// Runs `listen` on `port`; when QEMU finds the port taken (it was free when reserved, but
    /// 49152-49215 lies in Linux's ephemeral range, so an outgoing connection may have taken
    /// it since), reserves another and tries again. Returns the port QEMU listens on.
    async fn bind_retrying<F, Fut>(
        &mut self,
        range: PortRange,
        mut port: u16,
        step: &'static str,
        mut listen: F,
    ) -> Result<u16, MigrationError>
    where
        F: FnMut(u16) -> Fut,
        Fut: std::future::Future<Output = Result<(), QmpError>>,
    {
        const TRIES: usize = 8;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match listen(port).await {
                Ok(()) => return Ok(port),
                Err(e)
                    if attempt < TRIES
                        && e.qemu_error()
                            .is_some_and(|(_, desc)| desc.contains("Address already in use")) =>
                {
                    // The taken port stays reserved here, so the next pick differs.
                    let lease = ports::allocate(range)?;
                    tracing::info!(
                        taken = port,
                        next = lease.port(),
                        "port taken meanwhile; trying another"
                    );
                    port = lease.port();
                    self.ports.push(lease);
                }
                Err(e) => return Err(self.ctl.error(step, e)),
            }
        }
    }

    /// Resolves when the destination QEMU's QMP connection closes (QEMU exited).
    pub async fn lost(&mut self) {
        while self.events.next().await.is_some() {}
    }

    /// After the source completed: waits for the destination to finish loading, stops the NBD
    /// server, resumes the guest when `resume`, and removes what was added. Each step may take
    /// up to [`FINISH_TIMEOUT`]: loading the last state of a large VM takes a while, and giving
    /// up here would leave the VM paused on both hosts.
    pub async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError> {
        let deadline = super::deadline_after(FINISH_TIMEOUT);
        let qmp = self.ctl.qmp.clone();
        let status = loop {
            let status = match qmp.call_timeout(&QueryStatus, FINISH_TIMEOUT).await {
                Ok(s) => s,
                Err(e) if e.is_closed() => {
                    return Err(MigrationError::DestinationDied { desc: None });
                }
                Err(source) => return Err(self.ctl.error("query-status", source)),
            };
            if !status.is_incoming() {
                break status;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(MigrationError::DestinationNotFinished { after: FINISH_TIMEOUT });
                }
                // A MIGRATION or RESUME event usually means it finished; re-check either way.
                _ = self.events.next() => {}
                _ = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            }
        };
        if self.has_disks {
            // The exports must be gone before the guest runs and writes its disks itself.
            qmp.call_timeout(&NbdServerStop, FINISH_TIMEOUT)
                .await
                .map_err(|e| self.ctl.error("nbd-server-stop", e))?;
            self.ctl.undo.retain(|u| !matches!(u, Undo::StopNbdServer));
        }
        let mut resumed_at_us = None;
        if resume && !status.running {
            // From here on the guest may run on this host, whatever `cont` answers.
            self.resume = Resume::MayRun;
            match self.resume_and_confirm().await {
                ResumeOutcome::Running(at) => {
                    self.resume = Resume::Running;
                    tracing::info!("destination resumed");
                    resumed_at_us = match at {
                        Some(at) => Some(at),
                        None => self.resume_event_time().await,
                    };
                }
                ResumeOutcome::NotResumed(why) => {
                    self.resume = Resume::NotSent;
                    return Err(MigrationError::DestinationNotResumed { desc: why });
                }
                ResumeOutcome::Unknown(last_seen) => {
                    return Err(MigrationError::DestinationResumeUnknown {
                        holder: self.holder(),
                        last_seen,
                    });
                }
            }
        } else if !resume && status.running {
            qmp.call_timeout(&Stop, FINISH_TIMEOUT)
                .await
                .map_err(|e| self.ctl.error("stop", e))?;
        }
        let problems = self.ctl.unwind(true).await;
        self.ports.clear();
        Ok(Finished {
            problems,
            resumed_at_us,
        })
    }

    /// Sends `cont` and learns whether the guest now runs here. QEMU answers one
    /// connection's commands in order, so besides `cont`'s own reply (and the `RESUME` event
    /// it causes), a `query-status` sent after it tells, once answered, what `cont` did; that
    /// catches a reply lost on the way while `cont` itself takes as long as it needs. When
    /// nothing answers within [`FINISH_TIMEOUT`], it asks again on new connections
    /// ([`DestinationSide::ask_again`]).
    async fn resume_and_confirm(&mut self) -> ResumeOutcome {
        let qmp = self.ctl.qmp.clone();
        let cont = qmp.call_timeout(&Cont, FINISH_TIMEOUT);
        let probe = async {
            tokio::time::sleep(CONT_PROBE_AFTER).await;
            qmp.call_timeout(&QueryStatus, FINISH_TIMEOUT).await
        };
        tokio::pin!(cont, probe);
        let (mut cont_done, mut probe_done) = (false, false);
        let mut last_seen = "cont sent, no answer".to_string();
        let deadline = super::deadline_after(FINISH_TIMEOUT);
        loop {
            tokio::select! {
                reply = &mut cont, if !cont_done => {
                    cont_done = true;
                    match reply {
                        Ok(_) => return ResumeOutcome::Running(None),
                        // QEMU refused it: the guest was not started.
                        Err(e) if e.qemu_error().is_some() => {
                            return ResumeOutcome::NotResumed(format!("QEMU refused cont: {e}"));
                        }
                        Err(e) => {
                            tracing::warn!("no answer to cont: {e}; asking the destination again");
                            last_seen = format!("cont sent, then: {e}");
                            if e.is_closed() {
                                break;
                            }
                        }
                    }
                }
                status = &mut probe, if !probe_done => {
                    probe_done = true;
                    match status {
                        Ok(s) if s.running => {
                            tracing::warn!("cont's reply was lost; query-status says the guest runs");
                            return ResumeOutcome::Running(None);
                        }
                        // Answered after `cont`, so `cont` was dealt with; no RESUME came
                        // before this answer, so it never ran.
                        Ok(s) => {
                            return ResumeOutcome::NotResumed(format!(
                                "cont was not carried out: query-status after it says {}",
                                s.status
                            ));
                        }
                        Err(e) => {
                            last_seen = format!("cont sent, then query-status: {e}");
                            if e.is_closed() {
                                break;
                            }
                        }
                    }
                }
                event = self.events.next() => match event {
                    Some(e) if e.event == "RESUME" => {
                        return ResumeOutcome::Running(e.timestamp_us());
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
            if cont_done && probe_done {
                break;
            }
        }
        self.ask_again(last_seen).await
    }

    /// After `cont` went unanswered: closes the connection (QEMU then drops whatever of it it
    /// had not started, so that `cont` cannot be carried out later from it) and asks on new
    /// connections, [`ASK_AGAIN_TRIES`] times, whether the guest runs. Only "running" tells
    /// anything: any other state seen on a new connection might be a guest that ran and
    /// stopped again, so it is reported, not acted on.
    async fn ask_again(&mut self, mut last_seen: String) -> ResumeOutcome {
        self.ctl.qmp.close().await;
        for attempt in 1..=ASK_AGAIN_TRIES {
            let asked = async {
                let qmp = crate::qmp::Qmp::connect(&self.ctl.socket, ASK_AGAIN_TIMEOUT).await?;
                let status = qmp.call_timeout(&QueryStatus, ASK_AGAIN_TIMEOUT).await;
                qmp.close().await;
                status
            };
            match asked.await {
                Ok(s) if s.running => {
                    tracing::warn!(attempt, "the destination runs the guest (asked again)");
                    return ResumeOutcome::Running(None);
                }
                Ok(s) => {
                    last_seen = format!("{}, on a new connection after cont", s.status);
                }
                Err(e) => {
                    last_seen = format!("no answer on a new connection ({e})");
                }
            }
            tracing::warn!(attempt, %last_seen, "the destination's state after cont is unknown");
            tokio::time::sleep(ASK_AGAIN_PAUSE).await;
        }
        ResumeOutcome::Unknown(last_seen)
    }

    /// The timestamp of the `RESUME` event that follows `cont`, in microseconds since the epoch.
    async fn resume_event_time(&mut self) -> Option<i64> {
        let wait = async {
            while let Some(e) = self.events.next().await {
                if e.event == "RESUME" {
                    return e.timestamp_us();
                }
            }
            None
        };
        tokio::time::timeout(RESUME_EVENT_WAIT, wait)
            .await
            .ok()
            .flatten()
    }

    /// Whether this QEMU can take post-copy: QEMU checks only when `postcopy-ram` is turned
    /// on (its RAM must be anonymous, tmpfs or hugetlbfs, userfaultfd must work), so it is
    /// turned on and straight off again. Left to the version check on a QEMU older than
    /// [`super::postcopy::FIRST_QEMU`], which refuses it anyway.
    async fn probe_postcopy(&mut self) -> Result<(), MigrationError> {
        let v = self.qemu_version();
        if (v.major, v.minor) < super::postcopy::FIRST_QEMU
            || self.ctl.capability_on("postcopy-ram")
        {
            // Already on: QEMU accepted it, and turning it off here would leave it off.
            return Ok(());
        }
        let set = |state| MigrateSetCapabilities {
            capabilities: vec![CapabilityState {
                capability: "postcopy-ram".into(),
                state,
            }],
        };
        let qmp = &self.ctl.qmp;
        match qmp.call_timeout(&set(true), self.ctl.timeout).await {
            Ok(_) => {
                if let Err(e) = qmp.call_timeout(&set(false), self.ctl.timeout).await {
                    tracing::warn!("postcopy-ram probe: turning it off again: {e}");
                }
                Ok(())
            }
            Err(e) => Err(MigrationError::BadOptions {
                what: format!(
                    "post-copy is refused: the destination QEMU cannot take it ({})",
                    e.qemu_error()
                        .map_or(e.to_string(), |(_, desc)| desc.to_string())
                ),
            }),
        }
    }

    /// Post-copy starts: from here this QEMU holds the guest's newest state, so nothing of
    /// the tool's stops, quits or undoes anything here again (as after `cont`). With
    /// `autostart`, turns autostart back on (`cont` on a QEMU still `inmigrate` does only
    /// that), so the guest runs here as soon as the source hands it over.
    pub async fn enter_postcopy(&mut self, autostart: bool) -> Result<(), MigrationError> {
        self.resume = Resume::MayRun;
        if autostart {
            self.ctl.call("cont (post-copy autostart)", &Cont).await?;
        }
        Ok(())
    }

    /// Post-copy recovery: `migrate-recover` on a port of its own from the range, with the
    /// credentials and parameters `prepare` set. Returns the port.
    pub async fn listen_again(&mut self) -> Result<u16, MigrationError> {
        let Some((address, range)) = self.listen.clone() else {
            return Err(MigrationError::Failed {
                desc: "post-copy recovery on a destination that never listened".into(),
            });
        };
        let lease = ports::allocate(range)?;
        let port = lease.port();
        self.ports.push(lease);
        let (qmp, t) = (self.ctl.qmp.clone(), self.ctl.timeout);
        self.bind_retrying(range, port, "migrate-recover", |port| {
            let uri = tcp_uri(&address, port);
            tracing::info!(%uri, "destination listening again (post-copy recovery)");
            let qmp = qmp.clone();
            async move { qmp.call_timeout(&MigrateRecover { uri }, t).await.map(drop) }
        })
        .await
    }

    /// The incoming migration's status (`postcopy-paused` while the link is cut).
    pub async fn incoming_status(&self) -> Result<Option<MigrationStatus>, MigrationError> {
        let info = self.ctl.call("query-migrate", &QueryMigrate).await?;
        Ok(info.status)
    }

    /// Whether anything was changed on this destination (and not yet put back).
    pub fn changed(&self) -> bool {
        !self.ctl.undo.is_empty()
    }

    /// This destination, as a report names it.
    pub fn holder(&self) -> String {
        format!("the destination QEMU ({})", self.ctl.socket.display())
    }

    /// Whether the guest may run here: `cont` was sent and not known to have failed.
    pub fn may_run(&self) -> bool {
        self.resume != Resume::NotSent
    }

    /// Rolls back everything: after `migrate-incoming` that means shutting the destination
    /// QEMU down, which cannot take another migration. Releases the ports.
    ///
    /// A destination that may run the guest ([`DestinationSide::may_run`]) is left exactly as
    /// it is: never stopped or quit, and none of the tool's other changes undone either (a
    /// QEMU that did not answer would hold each undo to its timeout, and the operator needs
    /// to find it as it was); the outcome lists what stays.
    pub async fn abort(&mut self) -> AbortOutcome {
        self.ports.clear();
        if self.may_run() {
            let left = self.ctl.undo.take_all();
            tracing::error!(socket = %self.ctl.socket.display(), "the destination may run the guest: leaving it as it is");
            let mut problems = vec![format!(
                "destination: left as it is, since it may run the guest ({}): nothing was \
                 stopped or removed there",
                self.ctl.socket.display()
            )];
            problems.extend(left.iter().filter_map(Undo::left_behind));
            return AbortOutcome {
                stopped: false,
                problems,
            };
        }
        let problems = self.ctl.unwind(false).await;
        AbortOutcome {
            // Autostart was off before `migrate-incoming`, so only our `cont` could run it.
            stopped: true,
            problems,
        }
    }
}

fn no_postcopy() -> MigrationError {
    MigrationError::Failed {
        desc: "post-copy is not offered with this destination".into(),
    }
}

/// The destination side as the driver sees it: prepared, watched, finished or aborted.
/// Implemented locally by [`DestinationSide`] and remotely over the control channel.
#[allow(async_fn_in_trait)]
pub trait Destination {
    /// Whether anything on the destination was changed (decides "refused" versus "failed").
    fn changed(&self) -> bool;
    /// Where the guest may run if this destination's state becomes unknown, for the report.
    fn holder(&self) -> String;
    /// Whose clock the destination's event timestamps come from, next to this host's.
    fn clock(&self) -> &'static str {
        "one host"
    }
    /// The destination host's CPU count (for `--multifd auto`).
    fn cpus(&self) -> u32 {
        super::host_cpus()
    }
    /// The destination QEMU's version, once known (after the preflight at the latest).
    fn qemu_version(&self) -> Option<crate::qmp::QemuVersion> {
        None
    }
    /// Checks without changing anything (disks, ports, credentials).
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError>;
    /// Makes the destination ready to receive; returns its ports.
    async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError>;
    /// Resolves when the destination is lost (its QEMU exited, or its host stopped answering).
    async fn lost(&mut self);
    /// After the source completed: finish loading, resume when `resume`; returns clean-up
    /// problems.
    async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError>;
    /// Rolls everything back; says whether the destination is known not to run the guest.
    async fn abort(&mut self) -> AbortOutcome;
    /// Whether post-copy can be driven on this destination (autostart, recovery).
    fn offers_postcopy(&self) -> bool {
        false
    }
    /// Post-copy starts; the guest runs here with `autostart`
    /// ([`DestinationSide::enter_postcopy`]).
    async fn enter_postcopy(&mut self, _autostart: bool) -> Result<(), MigrationError> {
        Err(no_postcopy())
    }
    /// Post-copy recovery: listen again; returns the port ([`DestinationSide::listen_again`]).
    async fn listen_again(&mut self) -> Result<u16, MigrationError> {
        Err(no_postcopy())
    }
    /// The incoming migration's status, as the destination QEMU says.
    async fn incoming_status(&mut self) -> Result<Option<MigrationStatus>, MigrationError> {
        Err(no_postcopy())
    }
    /// Post-copy: break the destination's end of a stalled channel (`migrate-pause`).
    async fn pause_incoming(&mut self) -> Result<(), MigrationError> {
        Err(no_postcopy())
    }
    /// Once [`Destination::lost`] returned: what is known of why.
    fn lost_reason(&self) -> Option<String> {
        None
    }
    /// How the run's journal names this destination.
    fn journal_dest(&self) -> super::journal::JournalDest {
        super::journal::JournalDest::Remote {
            address: self.holder(),
        }
    }
    /// From now on, record this destination's changes in `journal` (a local QEMU's; a
    /// remote service keeps its own).
    fn journal_to(&mut self, _journal: &std::sync::Arc<super::journal::Journal>) {}
}

impl Destination for DestinationSide {
    fn changed(&self) -> bool {
        DestinationSide::changed(self)
    }
    fn holder(&self) -> String {
        DestinationSide::holder(self)
    }
    fn qemu_version(&self) -> Option<crate::qmp::QemuVersion> {
        Some(DestinationSide::qemu_version(self))
    }
    async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        DestinationSide::preflight(self, plan).await
    }
    async fn prepare(&mut self, plan: &DestPlan) -> Result<DestPrepared, MigrationError> {
        DestinationSide::prepare(self, plan).await
    }
    async fn lost(&mut self) {
        DestinationSide::lost(self).await
    }
    async fn finish(&mut self, resume: bool) -> Result<Finished, MigrationError> {
        DestinationSide::finish(self, resume).await
    }
    async fn abort(&mut self) -> AbortOutcome {
        DestinationSide::abort(self).await
    }
    fn offers_postcopy(&self) -> bool {
        true
    }
    async fn enter_postcopy(&mut self, autostart: bool) -> Result<(), MigrationError> {
        DestinationSide::enter_postcopy(self, autostart).await
    }
    async fn listen_again(&mut self) -> Result<u16, MigrationError> {
        DestinationSide::listen_again(self).await
    }
    async fn incoming_status(&mut self) -> Result<Option<MigrationStatus>, MigrationError> {
        DestinationSide::incoming_status(self).await
    }
    async fn pause_incoming(&mut self) -> Result<(), MigrationError> {
        self.ctl
            .call("migrate-pause", &crate::qemu::MigratePause)
            .await?;
        Ok(())
    }
    fn lost_reason(&self) -> Option<String> {
        Some("its QEMU exited".into())
    }
    fn journal_dest(&self) -> super::journal::JournalDest {
        super::journal::JournalDest::Local {
            qmp: self.ctl.socket.clone(),
        }
    }
    fn journal_to(&mut self, journal: &std::sync::Arc<super::journal::Journal>) {
        self.ctl.undo.journal_to(journal.clone(), Side::Destination);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use serde_json::json;

    use super::*;
    use crate::peer::Authz;
    use crate::qmp::fake::{self, Received};

    const T: Duration = Duration::from_secs(5);

    /// A destination QEMU that waits with `-incoming defer` and has loaded the state once
    /// `migrate-incoming` was sent.
    async fn incoming_destination() -> (DestinationSide, Received) {
        incoming_destination_with(json!([])).await
    }

    /// [`incoming_destination`] whose `query-block` answers `blocks`.
    async fn incoming_destination_with(blocks: serde_json::Value) -> (DestinationSide, Received) {
        incoming_destination_answering(blocks, |_| None).await
    }

    /// [`incoming_destination_with`], answering the commands `refuse` picks with its error.
    async fn incoming_destination_answering(
        blocks: serde_json::Value,
        refuse: impl Fn(&str) -> Option<String> + Send + 'static,
    ) -> (DestinationSide, Received) {
        fake_destination(blocks, refuse, OnCont::Runs).await
    }

    /// How a fake destination treats `cont` (the state is loaded before `cont` comes).
    #[derive(Clone, Copy)]
    enum OnCont {
        /// Carries it out and answers.
        Runs,
        /// Carries it out, but the reply is lost; later commands are answered.
        RunsReplyLost,
        /// Neither `cont` nor anything after it is ever answered (a hung QEMU).
        Hangs,
    }

    /// A destination QEMU waiting with `-incoming defer`, that has loaded the state once
    /// `migrate-incoming` was sent, answers `query-block` with `blocks`, the commands
    /// `refuse` picks with its error, and `cont` as `on_cont` says.
    async fn fake_destination(
        blocks: serde_json::Value,
        refuse: impl Fn(&str) -> Option<String> + Send + 'static,
        on_cont: OnCont,
    ) -> (DestinationSide, Received) {
        let (qmp, peer) = fake::connect(json!([]), T).await.expect("fake QEMU");
        let (loaded, running, hung) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let received = peer.answer_some(move |name, _| {
            if hung.load(Ordering::SeqCst) {
                return None;
            }
            if let Some(desc) = refuse(name) {
                return Some(Err(desc));
            }
            Some(Ok(match name {
                "query-block" => blocks.clone(),
                "query-status" if running.load(Ordering::SeqCst) => {
                    json!({"running": true, "status": "running"})
                }
                "query-status" if loaded.load(Ordering::SeqCst) => {
                    json!({"running": false, "status": "paused"})
                }
                "query-status" => json!({"running": false, "status": "inmigrate"}),
                "query-migrate-capabilities" => json!([]),
                "migrate-incoming" => {
                    loaded.store(true, Ordering::SeqCst);
                    json!({})
                }
                "cont" => match on_cont {
                    OnCont::Runs => {
                        running.store(true, Ordering::SeqCst);
                        json!({})
                    }
                    OnCont::RunsReplyLost => {
                        running.store(true, Ordering::SeqCst);
                        return None;
                    }
                    OnCont::Hangs => {
                        hung.store(true, Ordering::SeqCst);
                        return None;
                    }
                },
                _ => json!({}),
            }))
        });
        let ctl = SideCtl::with_qmp(
            Side::Destination,
            qmp,
            Path::new("/nonexistent/fake.sock"),
            Path::new("/nonexistent"),
            T,
        );
        let side = DestinationSide::attach_ctl(ctl).await.expect("attach");
        (side, received)
    }

    /// A [`fake_destination`] that passed preflight and prepare.
    async fn loaded_destination(on_cont: OnCont) -> (DestinationSide, Received) {
        let (mut side, received) = fake_destination(json!([]), |_| None, on_cont).await;
        side.preflight(&plan()).await.expect("preflight");
        side.prepare(&plan()).await.expect("prepare");
        (side, received)
    }

    #[tokio::test]
    async fn a_lost_reply_to_cont_is_settled_by_the_status_asked_behind_it() {
        let (mut side, received) = loaded_destination(OnCont::RunsReplyLost).await;

        let finished = side.finish(true).await;

        assert!(finished.is_ok(), "{finished:?}");
        let sent = names(&received);
        assert!(position(&sent, "cont") < sent.len() - 1, "{sent:?}");
        assert!(!sent.contains(&"quit".to_string()), "{sent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_destination_that_never_answers_cont_is_left_as_it_is() {
        let (mut side, received) = loaded_destination(OnCont::Hangs).await;

        let err = side.finish(true).await.expect_err("state unknown");
        let sent_before_abort = names(&received).len();
        let outcome = side.abort().await;

        assert!(
            matches!(err, MigrationError::DestinationResumeUnknown { .. }),
            "{err}"
        );
        assert!(!outcome.stopped, "the guest may run there");
        assert_eq!(
            names(&received).len(),
            sent_before_abort,
            "nothing sent to a destination that may run the guest"
        );
        assert!(
            outcome.problems.iter().any(|p| p.contains("left as it is")),
            "{:?}",
            outcome.problems
        );
    }

    fn plan() -> DestPlan {
        DestPlan {
            machine: None,
            postcopy: false,
            tls: false,
            multifd_compression: None,
            tls_priority: None,
            multifd: None,
            disks: Vec::new(),
            create_dest_disks: false,
            authz: Authz::Off,
            listen_address: "127.0.0.1".into(),
            port_range: crate::ports::DEFAULT_RANGE,
        }
    }

    fn names(received: &Received) -> Vec<String> {
        received
            .lock()
            .expect("lock")
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn position(names: &[String], name: &str) -> usize {
        names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} never sent: {names:?}"))
    }

    #[tokio::test]
    async fn prepare_turns_autostart_off_before_migrate_incoming() {
        let (mut side, received) = incoming_destination().await;

        side.preflight(&plan()).await.expect("preflight");
        side.prepare(&plan()).await.expect("prepare");

        let sent = names(&received);
        assert!(
            position(&sent, "stop") < position(&sent, "migrate-incoming"),
            "{sent:?}"
        );
    }

    #[tokio::test]
    async fn an_aborted_destination_that_was_never_resumed_is_known_not_to_run() {
        let (mut side, received) = incoming_destination().await;
        side.preflight(&plan()).await.expect("preflight");
        side.prepare(&plan()).await.expect("prepare");

        let outcome = side.abort().await;

        assert!(outcome.stopped);
        assert_eq!(names(&received).last().map(String::as_str), Some("quit"));
    }

    #[tokio::test]
    async fn a_destination_once_resumed_is_never_reported_stopped() {
        let (mut side, received) = incoming_destination().await;
        side.preflight(&plan()).await.expect("preflight");
        side.prepare(&plan()).await.expect("prepare");
        side.finish(true).await.expect("finish");

        let outcome = side.abort().await;

        assert!(names(&received).contains(&"cont".to_string()));
        assert!(!outcome.stopped, "the guest may have run here");
    }

    /// A destination whose disk is node `dstdisk` on device `vd0`, an overlay on `template`.
    fn overlay_on(template: &Path) -> serde_json::Value {
        json!([{"device": "", "qdev": "/machine/peripheral/vd0/virtio-backend",
            "inserted": {"node-name": "dstdisk", "ro": false, "drv": "qcow2", "file": "/d.qcow2",
                "image": {"virtual-size": 1048576, "filename": "/d.qcow2", "format": "qcow2",
                    "backing-image": {"virtual-size": 1048576, "format": "raw",
                        "filename": template.display().to_string()}}}}])
    }

    /// A plan copying the source's `srcdisk` (device `vd0`) top-only onto a template whose
    /// fingerprint is `template`'s.
    fn top_only_plan(template: &Path) -> DestPlan {
        DestPlan {
            machine: None,
            disks: vec![crate::peer::DiskSpec {
                node: "srcdisk".into(),
                device: Some("vd0".into()),
                size: 1048576,
                copy: crate::peer::DiskCopy::Top,
                backing: Some(crate::peer::BackingSpec {
                    filename: "/src/template.raw".into(),
                    format: "raw".into(),
                    size: 1048576,
                    fingerprint: Some(disks::backing_fingerprint(template).expect("read")),
                }),
            }],
            ..plan()
        }
    }

    #[tokio::test]
    async fn a_template_under_another_node_name_is_compared_and_refused_when_it_differs() {
        let dir = tempfile::tempdir().expect("dir");
        let (mine, theirs) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        std::fs::write(&mine, vec![0x11u8; 1 << 20]).expect("source template");
        std::fs::write(&theirs, vec![0x33u8; 1 << 20]).expect("another template");
        let (mut side, received) = incoming_destination_with(overlay_on(&theirs)).await;

        let err = side
            .preflight(&top_only_plan(&mine))
            .await
            .expect_err("refused");

        assert_eq!(err.kind(), "backing-mismatch", "{err}");
        assert!(err.to_string().contains("differs"), "{err}");
        assert!(!side.changed());
        assert_eq!(
            names(&received),
            [
                "query-status",
                "query-migrate-capabilities",
                "query-migrate-parameters",
                "query-block"
            ]
        );
    }

    #[tokio::test]
    async fn the_disk_the_preflight_matched_is_the_one_exported_under_the_sources_name() {
        let dir = tempfile::tempdir().expect("dir");
        let template = dir.path().join("template.raw");
        std::fs::write(&template, vec![0x11u8; 1 << 20]).expect("template");
        let (mut side, received) = incoming_destination_with(overlay_on(&template)).await;
        let plan = top_only_plan(&template);

        side.preflight(&plan).await.expect("preflight");
        side.prepare(&plan).await.expect("prepare");

        let exports: Vec<serde_json::Value> = received
            .lock()
            .expect("lock")
            .iter()
            .filter(|(name, _)| name == "block-export-add")
            .map(|(_, args)| args.clone())
            .collect();
        assert_eq!(exports.len(), 1, "{exports:?}");
        assert_eq!(exports[0]["node-name"], "dstdisk");
        assert_eq!(exports[0]["name"], "srcdisk");
    }

    #[tokio::test]
    async fn an_nbd_server_another_run_started_is_not_stopped_by_this_runs_roll_back() {
        let dir = tempfile::tempdir().expect("dir");
        let template = dir.path().join("template.raw");
        std::fs::write(&template, vec![0x11u8; 1 << 20]).expect("template");
        let (mut side, received) = incoming_destination_answering(overlay_on(&template), |name| {
            (name == "nbd-server-start").then(|| "NBD server already running".to_string())
        })
        .await;
        let plan = top_only_plan(&template);
        side.preflight(&plan).await.expect("preflight");

        let err = side.prepare(&plan).await.expect_err("refused by QEMU");
        side.abort().await;

        assert_eq!(err.kind(), "qmp", "{err}");
        let sent = names(&received);
        assert!(!sent.contains(&"nbd-server-stop".to_string()), "{sent:?}");
    }

    #[tokio::test]
    async fn a_peer_cannot_ask_for_more_multifd_channels_than_the_bound() {
        let (mut side, _received) = incoming_destination().await;
        let mut greedy = plan();
        greedy.multifd = Some(crate::migration::MAX_MULTIFD_CHANNELS + 1);

        let err = side.preflight(&greedy).await.expect_err("refused");

        assert_eq!(err.kind(), "bad-request");
    }
}
