//! One side's QEMU as the migration drives it: its QMP connection, its PKI directory, the
//! settings saved before any change, and the undo stack of what was changed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Map, Value};

use super::undo::{self, Undo, UndoStack};
use super::{MigrationError, OBJECT_PREFIX, Side};
use crate::qemu::{
    CalcDirtyRate, CapabilityState, MigrateSetCapabilities, MigrateSetParameters, ObjectAdd,
    QueryDirtyRate, QueryMigrateCapabilities, QueryMigrateParameters, TlsEndpoint,
};
use crate::qmp::{Command, Qmp, QmpError};

pub(crate) struct SideCtl {
    pub side: Side,
    pub qmp: Qmp,
    pub socket: PathBuf,
    pub pki_dir: PathBuf,
    pub timeout: Duration,
    /// What was changed, with the credentials created by the preflight and not yet adopted
    /// by the migration (journalled, but not counted as a change).
    pub undo: UndoStack,
    caps: Vec<CapabilityState>,
    params: Map<String, Value>,
}

impl SideCtl {
    /// Connects to the side's QMP socket; changes nothing.
    pub async fn connect(
        side: Side,
        socket: &Path,
        pki_dir: &Path,
        timeout: Duration,
    ) -> Result<SideCtl, MigrationError> {
        let qmp =
            Qmp::connect(socket, timeout)
                .await
                .map_err(|source| MigrationError::Connect {
                    side,
                    socket: socket.to_path_buf(),
                    source,
                })?;
        Ok(SideCtl::with_qmp(side, qmp, socket, pki_dir, timeout))
    }

    /// A side over an established QMP connection (`socket` only names it in errors).
    pub fn with_qmp(
        side: Side,
        qmp: Qmp,
        socket: &Path,
        pki_dir: &Path,
        timeout: Duration,
    ) -> SideCtl {
        SideCtl {
            side,
            qmp,
            socket: socket.to_path_buf(),
            pki_dir: pki_dir.to_path_buf(),
            timeout,
            undo: UndoStack::default(),
            caps: Vec::new(),
            params: Map::new(),
        }
    }

    /// Runs a command, tagging a failure with this side and `step`.
    pub async fn call<C: Command>(
        &self,
        step: &'static str,
        cmd: &C,
    ) -> Result<C::Output, MigrationError> {
        self.qmp
            .call_timeout(cmd, self.timeout)
            .await
            .map_err(|source| self.error(step, source))
    }

    pub fn error(&self, step: &'static str, source: QmpError) -> MigrationError {
        MigrationError::Qmp {
            side: self.side,
            step,
            source,
        }
    }

    /// Reads the migration capabilities and parameters, to put them back afterwards.
    pub async fn save_settings(&mut self) -> Result<(), MigrationError> {
        self.caps = self
            .call("query-migrate-capabilities", &QueryMigrateCapabilities)
            .await?;
        self.params = self
            .call("query-migrate-parameters", &QueryMigrateParameters)
            .await?;
        Ok(())
    }

    fn credentials(&self, id: &str, priority: Option<&str>) -> ObjectAdd {
        ObjectAdd::TlsCredsX509 {
            id: id.to_string(),
            dir: self.pki_dir.clone(),
            endpoint: match self.side {
                Side::Source => TlsEndpoint::Client,
                Side::Destination => TlsEndpoint::Server,
            },
            verify_peer: true,
            priority: priority.map(str::to_string),
        }
    }

    /// Creates this side's `tls-creds-x509` object before anything else is changed: QEMU reads
    /// the files at `object-add`, so this proves the QEMU process (often not root) can read
    /// them. The object is kept as the migration's credentials ([`SideCtl::credentials_id`]
    /// adopts it), so a server's Diffie-Hellman set-up is paid once; until adopted it is not on
    /// the undo stack (nothing counts as changed) and [`SideCtl::unwind`] deletes it.
    pub async fn probe_credentials(
        &mut self,
        priority: Option<&str>,
    ) -> Result<(), MigrationError> {
        let id = object_id("tls");
        let started = std::time::Instant::now();
        // Journalled before it exists: a kill during the command must not leave it.
        self.undo.set_probed(Some(Undo::DeleteObject {
            side: self.side,
            id: id.clone(),
        }));
        match self
            .qmp
            .call_timeout(&self.credentials(&id, priority), self.timeout)
            .await
        {
            Ok(_) => {
                tracing::debug!(side = %self.side, %id, ms = started.elapsed().as_millis() as u64, "credentials loaded");
                Ok(())
            }
            Err(QmpError::Qemu { desc, .. }) => {
                self.undo.set_probed(None);
                Err(MigrationError::CredentialsUnusable {
                    side: self.side,
                    socket: self.socket.clone(),
                    dir: self.pki_dir.clone(),
                    desc,
                })
            }
            Err(source) => {
                // QEMU may still carry the command out after the timeout: remove it if so.
                let del = self.undo.take_probed().into_iter().collect();
                let _ = undo::unwind(del, false, &self.qmp, self.timeout).await;
                self.undo.set_probed(None);
                Err(self.error("credentials preflight", source))
            }
        }
    }

    /// The id of this side's credentials: the probed object, now on the undo stack, or (when
    /// none was probed) a new one.
    pub async fn credentials_id(
        &mut self,
        priority: Option<&str>,
    ) -> Result<String, MigrationError> {
        if let Some(Undo::DeleteObject { id, side }) = self.undo.take_probed() {
            self.undo.push(Undo::DeleteObject {
                side,
                id: id.clone(),
            });
            return Ok(id);
        }
        let id = object_id("tls");
        let add = self.credentials(&id, priority);
        self.add_object("object-add tls-creds-x509", add).await?;
        Ok(id)
    }

    /// Adds any object. Its deletion is registered first, as "may exist": a command that
    /// times out here may still be carried out by QEMU afterwards.
    pub async fn add_object(
        &mut self,
        step: &'static str,
        add: ObjectAdd,
    ) -> Result<(), MigrationError> {
        self.undo.push(Undo::DeleteObject {
            side: self.side,
            id: add.id().to_string(),
        });
        self.call(step, &add).await?;
        Ok(())
    }

    /// Sets the `wanted` capabilities that differ from the saved ones, remembering the old
    /// states.
    /// Whether capability `name` was on when the settings were saved.
    pub fn capability_on(&self, name: &str) -> bool {
        self.caps.iter().any(|c| c.capability == name && c.state)
    }

    pub async fn set_capabilities(
        &mut self,
        wanted: &[(&str, bool)],
    ) -> Result<(), MigrationError> {
        let current = |name: &str| {
            self.caps
                .iter()
                .find(|c| c.capability == name)
                .map(|c| c.state)
                .unwrap_or(false)
        };
        let (set, restore): (Vec<_>, Vec<_>) = wanted
            .iter()
            .filter(|(name, state)| current(name) != *state)
            .map(|(name, state)| {
                let cap = |state| CapabilityState {
                    capability: name.to_string(),
                    state,
                };
                (cap(*state), cap(!*state))
            })
            .unzip();
        if set.is_empty() {
            return Ok(());
        }
        self.undo.push(Undo::RestoreCapabilities {
            side: self.side,
            caps: restore,
        });
        self.call(
            "migrate-set-capabilities",
            &MigrateSetCapabilities { capabilities: set },
        )
        .await?;
        Ok(())
    }

    /// Sets migration parameters, remembering the saved ones.
    pub async fn set_parameters(
        &mut self,
        set: &MigrateSetParameters,
    ) -> Result<(), MigrationError> {
        self.undo.push(Undo::RestoreParameters {
            side: self.side,
            params: MigrateSetParameters::restore_from(&self.params),
        });
        self.call("migrate-set-parameters", set).await?;
        Ok(())
    }

    /// Runs one undo action now, out of stack order; returns what failed.
    pub async fn run_undo(&mut self, action: Undo) -> Vec<String> {
        undo::unwind(vec![action], false, &self.qmp, self.timeout).await
    }

    /// Unwinds the undo stack (and deletes probed credentials never adopted); returns what
    /// failed.
    pub async fn unwind(&mut self, succeeded: bool) -> Vec<String> {
        let stack = self.undo.take_all();
        undo::unwind(stack, succeeded, &self.qmp, self.timeout).await
    }
}

/// How long [`SideCtl::sample_dirty_rate`] samples (QEMU's shortest `calc-dirty-rate`).
const DIRTY_RATE_SAMPLE: Duration = Duration::from_secs(1);

impl SideCtl {
    /// The guest's dirty rate (MiB/s) over [`DIRTY_RATE_SAMPLE`] (`calc-dirty-rate`);
    /// read-only.
    pub async fn sample_dirty_rate(&self) -> Result<u64, MigrationError> {
        self.start_dirty_rate().await?;
        self.dirty_rate_result().await
    }

    /// Starts QEMU's dirty-rate measurement, which runs [`DIRTY_RATE_SAMPLE`] in the
    /// background.
    pub async fn start_dirty_rate(&self) -> Result<(), MigrationError> {
        let calc = CalcDirtyRate {
            calc_time: DIRTY_RATE_SAMPLE.as_secs(),
            sample_pages: None,
        };
        self.call("calc-dirty-rate", &calc).await.map(drop)
    }

    /// Waits for the measurement [`SideCtl::start_dirty_rate`] started; MiB/s.
    pub async fn dirty_rate_result(&self) -> Result<u64, MigrationError> {
        let deadline = tokio::time::Instant::now() + DIRTY_RATE_SAMPLE + self.timeout;
        loop {
            let info = self.call("query-dirty-rate", &QueryDirtyRate).await?;
            if info.status == "measured" {
                return Ok(info.dirty_rate.unwrap_or(0).max(0) as u64);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(MigrationError::Failed {
                    desc: format!("the dirty rate was not measured within {:?}", self.timeout),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A QOM id unique within this host: prefix, purpose, process id and a counter.
pub(crate) fn object_id(purpose: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{OBJECT_PREFIX}{purpose}-{}-{n}", std::process::id())
}
