//! CloudStack's certificates before a migration, on each end: the PKI directory QEMU is about
//! to be handed follows the agent's current `cloud.*` ([`crate::host::cloudstack::follow`]),
//! and with `--transport auto` the tool and CloudStack agree on whether the host is secured.
//!
//! Run before the transport is decided and before anything is connected: a stale copy that
//! cannot be refreshed, or a disagreement, is a refusal.

use std::path::Path;

use super::{MigrationError, Side, TransportChoice};
use crate::host::cloudstack::{self, Followed, SelfConnect};
use crate::pki;

/// Follows CloudStack's certificates into `pki_dir` (the `side`'s PKI directory) when
/// `agent_dir` holds them; returns a note for the report when the directory was refreshed.
/// A refresh needs root (checked here).
pub fn follow(
    side: Side,
    agent_dir: Option<&Path>,
    pki_dir: &Path,
) -> Result<Option<String>, MigrationError> {
    let Some(agent_dir) = agent_dir else {
        return Ok(None);
    };
    let may_refresh = nix::unistd::geteuid().is_root();
    match cloudstack::follow(agent_dir, pki_dir, may_refresh) {
        Ok(Followed::Refreshed { files }) => Ok(Some(format!(
            "the {side}'s PKI directory {} was stale after a CloudStack certificate renewal and \
             was refreshed from {} ({} files written, checked as `pki check` does first)",
            pki_dir.display(),
            agent_dir.display(),
            files.len()
        ))),
        Ok(Followed::InStep | Followed::NotCloudStack) => Ok(None),
        Err(source) => Err(MigrationError::CloudStackPki { side, source }),
    }
}

/// With `--transport auto`: refuses when CloudStack (`cloud.crt` next to `agent.properties`)
/// and the tool's PKI check (`pki_dir` for `side`'s role) disagree on whether this host is
/// secured. The libvirt self-connect is not probed here (`host status` does it).
pub fn check_agreement(
    choice: TransportChoice,
    side: Side,
    agent_dir: Option<&Path>,
    pki_dir: &Path,
) -> Result<(), MigrationError> {
    let Some(agent_dir) = agent_dir else {
        return Ok(());
    };
    if choice != TransportChoice::Auto {
        return Ok(());
    }
    let status = cloudstack::cloudstack_status(
        agent_dir,
        agent_dir,
        pki_dir,
        SelfConnect::NotChecked {
            reason: "not probed before a migration".into(),
        },
    );
    let tool_secured = pki::assess(pki_dir, side.role()).is_secured();
    match cloudstack::disagreement(&status, tool_secured, pki_dir) {
        None => Ok(()),
        Some(desc) => Err(MigrationError::CloudStackDisagrees { side, desc }),
    }
}

/// [`follow`] then [`check_agreement`] for each `(side, agent_dir, pki_dir)` on this host,
/// in order; the notes of any refresh.
pub(crate) fn prepare(
    choice: TransportChoice,
    sides: &[(Side, Option<&Path>, &Path)],
) -> Result<Vec<String>, MigrationError> {
    let mut notes = Vec::new();
    for &(side, agent_dir, pki_dir) in sides {
        notes.extend(follow(side, agent_dir, pki_dir)?);
        check_agreement(choice, side, agent_dir, pki_dir)?;
    }
    Ok(notes)
}
