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

use serde::{Deserialize, Serialize};

use super::disks::{self, DestDisk, SourceDisk};
use super::side::{SideCtl, object_id};
use super::undo::Undo;
use super::{MigrationError, PROGRESS_INTERVAL, Side};
use crate::ports::{self, PortLease, PortRange};
use crate::qemu::{
    BlockExportAdd, BlockResize, Cont, MigrateIncoming, MigrateSetParameters, NbdServerStart,
    NbdServerStop, ObjectAdd, QueryNamedBlockNodes, QueryStatus, Stop, tcp_uri,
};
use crate::qmp::{Events, QmpError};

/// How long the destination may take to finish loading after the source completed.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// What the source asks of the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestPlan {
    pub tls: bool,
    /// GnuTLS priority string for the credentials.
    pub tls_priority: Option<String>,
    pub multifd: Option<u8>,
    /// Disks to receive over NBD: node names and the source's sizes.
    pub disks: Vec<SourceDisk>,
    /// Grow smaller destination disks instead of refusing.
    pub create_dest_disks: bool,
    /// Accept only a source whose certificate has this distinguished name (`CN=host-a`).
    pub authz_identity: Option<String>,
    /// Where to listen for the migration stream and NBD.
    pub listen_address: String,
    pub port_range: PortRange,
}

/// What the destination tells the source once prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestPrepared {
    pub migration_port: u16,
    pub nbd_port: Option<u16>,
}

/// A destination QEMU being prepared for, receiving, or finishing a migration.
pub struct DestinationSide {
    ctl: SideCtl,
    events: Events,
    ports: Vec<PortLease>,
    has_disks: bool,
    /// What each disk needs, from the preflight.
    dest_disks: Vec<DestDisk>,
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
        let mut ctl = SideCtl::connect(Side::Destination, socket, pki_dir, timeout).await?;
        let events = ctl.qmp.subscribe();
        let status = ctl.call("query-status", &QueryStatus).await?;
        if !status.is_incoming() {
            return Err(MigrationError::DestinationNotIncoming {
                socket: socket.to_path_buf(),
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
        })
    }

    /// Checks everything that can be checked without changing anything: the disks, the ports,
    /// the credentials. A failure here leaves the destination as it was.
    pub async fn preflight(&mut self, plan: &DestPlan) -> Result<(), MigrationError> {
        self.dest_disks = if plan.disks.is_empty() {
            Vec::new()
        } else {
            let nodes = self
                .ctl
                .call("query-named-block-nodes", &QueryNamedBlockNodes)
                .await?;
            disks::check_destination(&nodes, &plan.disks, plan.create_dest_disks)?
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
        let creds = if plan.tls {
            let id = object_id("tls");
            self.ctl
                .add_credentials(&id, plan.tls_priority.as_deref())
                .await?;
            id
        } else {
            // The empty string turns TLS off, whatever an earlier migration left set.
            String::new()
        };
        let authz = match (&plan.authz_identity, plan.tls) {
            (Some(identity), true) => {
                let id = object_id("authz");
                let add = ObjectAdd::AuthzSimple {
                    id: id.clone(),
                    identity: identity.clone(),
                };
                self.ctl.add_object("object-add authz-simple", add).await?;
                Some(id)
            }
            _ => None,
        };
        let mut wanted = vec![("events", true)];
        if plan.multifd.is_some() {
            wanted.push(("multifd", true));
        }
        self.ctl.set_capabilities(&wanted).await?;
        self.ctl
            .set_parameters(&MigrateSetParameters {
                tls_creds: Some(creds.clone()),
                tls_authz: authz.clone().map(serde_json::Value::String),
                multifd_channels: plan.multifd,
                ..Default::default()
            })
            .await?;

        let mut nbd_port = nbd_port;
        if let Some(port) = nbd_port {
            for (disk, d) in plan.disks.iter().zip(&self.dest_disks) {
                if let DestDisk::Grow(size) = d {
                    tracing::info!(node = %disk.node, size, "growing the destination disk");
                    let resize = BlockResize {
                        node_name: disk.node.clone(),
                        size: *size,
                    };
                    self.ctl.call("block_resize", &resize).await?;
                }
            }
            self.ctl.undo.push(Undo::StopNbdServer);
            let (qmp, t) = (self.ctl.qmp.clone(), self.ctl.timeout);
            let port = self
                .bind_retrying(plan.port_range, port, "nbd-server-start", |port| {
                    let mut start = NbdServerStart::inet(&plan.listen_address, port);
                    if plan.tls {
                        start.tls_creds = Some(creds.clone());
                        start.tls_authz = authz.clone();
                    }
                    let qmp = qmp.clone();
                    async move { qmp.call_timeout(&start, t).await.map(drop) }
                })
                .await?;
            nbd_port = Some(port);
            for disk in &plan.disks {
                let export = BlockExportAdd::nbd_writable(&disk.export_id(), &disk.node);
                self.ctl.call("block-export-add", &export).await?;
            }
            self.has_disks = true;
            tracing::info!(port, "destination exports its disks over NBD");
        }

        self.ctl.undo.push(Undo::TearDownDestination);
        let (qmp, t) = (self.ctl.qmp.clone(), self.ctl.timeout);
        let migration_port = self
            .bind_retrying(
                plan.port_range,
                migration_port,
                "migrate-incoming",
                |port| {
                    let uri = tcp_uri(&plan.listen_address, port);
                    tracing::info!(%uri, "destination listening");
                    let qmp = qmp.clone();
                    async move {
                        qmp.call_timeout(&MigrateIncoming { uri }, t)
                            .await
                            .map(drop)
                    }
                },
            )
            .await?;
        Ok(DestPrepared {
            migration_port,
            nbd_port,
        })
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
    pub async fn gone(&mut self) {
        while self.events.next().await.is_some() {}
    }

    /// After the source completed: waits for the destination to finish loading, stops the NBD
    /// server, resumes the guest when `resume`, and removes what was added.
    pub async fn finish(&mut self, resume: bool) -> Result<Vec<String>, MigrationError> {
        let deadline = super::deadline_after(FINISH_TIMEOUT);
        let status = loop {
            let status = match self
                .ctl
                .qmp
                .call_timeout(&QueryStatus, self.ctl.timeout)
                .await
            {
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
            self.ctl.call("nbd-server-stop", &NbdServerStop).await?;
            self.ctl.undo.retain(|u| !matches!(u, Undo::StopNbdServer));
        }
        if resume && !status.running {
            self.ctl.call("cont", &Cont).await?;
            tracing::info!("destination resumed");
        } else if !resume && status.running {
            self.ctl.call("stop", &Stop).await?;
        }
        let problems = self.ctl.unwind(true).await;
        self.ports.clear();
        Ok(problems)
    }

    /// Rolls back everything: after `migrate-incoming` that means shutting the destination
    /// QEMU down, which cannot take another migration. Releases the ports.
    pub async fn abort(&mut self) -> Vec<String> {
        let problems = self.ctl.unwind(false).await;
        self.ports.clear();
        problems
    }
}
