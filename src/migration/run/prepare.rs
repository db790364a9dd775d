//! Phase 2, prepare: the destination made ready to receive (its credentials, NBD exports,
//! `migrate-incoming`), then the source's credentials, capabilities and parameters. From here
//! every change has its undo on the side that made it.

use super::super::destination::Destination;
use super::super::side::SideCtl;
use super::super::{MigrationError, Transport};
use super::Run;
use super::setup::Setup;
use crate::peer::DestPrepared;
use crate::qemu::MigrateSetParameters;

/// What prepare made, for the copy and RAM phases.
#[derive(Debug)]
pub(super) struct Prepared {
    /// Where the destination listens for the migration stream and NBD.
    pub ports: DestPrepared,
    /// The source's `tls-creds-x509` object id; empty for plain TCP.
    pub creds: String,
}

impl Run<'_, '_> {
    pub(super) async fn prepare<D: Destination>(
        &mut self,
        src: &mut SideCtl,
        dest: &mut D,
        setup: &Setup,
    ) -> Result<Prepared, MigrationError> {
        let opts = self.opts;
        let tls = self.transport == Transport::Tls;
        let ports = dest.prepare(&setup.plan).await?;
        self.said.ports.push(ports.migration_port);
        self.said.ports.extend(ports.nbd_port);
        let creds = if tls {
            src.credentials_id(self.source_tls_priority().as_deref())
                .await?
        } else {
            String::new()
        };
        src.set_capabilities(&capabilities(opts, setup)).await?;
        let conv = &opts.convergence;
        src.set_parameters(&MigrateSetParameters {
            tls_creds: Some(creds.clone()),
            tls_hostname: Some(if tls {
                opts.effective_tls_hostname().to_string()
            } else {
                String::new()
            }),
            max_bandwidth: Some(opts.max_bandwidth),
            max_postcopy_bandwidth: setup
                .plan
                .postcopy
                .then(|| conv.postcopy_bandwidth.unwrap_or(0)),
            downtime_limit: opts.downtime_limit.map(|d| d.as_millis() as u64),
            multifd_channels: setup.multifd,
            multifd_compression: conv.compress.map(|c| c.as_str().to_string()),
            cpu_throttle_initial: conv.auto_converge.map(|t| t.initial),
            cpu_throttle_increment: conv.auto_converge.map(|t| t.increment),
            xbzrle_cache_size: setup.xbzrle_cache,
            ..Default::default()
        })
        .await?;
        Ok(Prepared { ports, creds })
    }
}

/// The source's capabilities for this migration.
fn capabilities(opts: &super::super::MigrationOptions, setup: &Setup) -> Vec<(&'static str, bool)> {
    let mut wanted = vec![("events", true)];
    if setup.multifd.is_some() {
        wanted.push(("multifd", true));
    }
    if !setup.disks.is_empty() {
        // Stop at pre-switchover, CPUs paused, to end the mirrors before the last RAM pass.
        wanted.push(("pause-before-switchover", true));
    }
    if opts.convergence.auto_converge.is_some() {
        wanted.push(("auto-converge", true));
    }
    if setup.xbzrle_cache.is_some() {
        wanted.push(("xbzrle", true));
    }
    if setup.plan.postcopy {
        wanted.push(("postcopy-ram", true));
    }
    wanted
}
