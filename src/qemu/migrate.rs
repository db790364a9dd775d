//! Migration commands and replies (QEMU 7.2).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Empty, no_args_command};
use crate::qmp::Command;

/// Multifd compression methods of QEMU 7.2 (`multifd-compression`; `none` is no method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Zstd,
    Zlib,
}

impl Compression {
    /// QEMU's name (`multifd-compression`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Zlib => "zlib",
        }
    }
}

/// A migration's status, as in `query-migrate` and the `MIGRATION` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    /// QEMU 9.1 and later: a post-copy recovery connecting; back to `postcopy-paused` when
    /// it fails.
    PostcopyRecoverSetup,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
    /// A status newer than QEMU 7.2.
    #[serde(other)]
    Unknown,
}

impl MigrationStatus {
    /// QEMU's own word for it (`pre-switchover`), as `query-migrate` spells it: the one
    /// spelling of a status in logs, messages and output.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::PostcopyRecoverSetup => "postcopy-recover-setup",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
            MigrationStatus::Unknown => "unknown",
        }
    }

    /// A status the migration will not leave by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

no_args_command!(
    /// Status and statistics of the current or last migration.
    QueryMigrate,
    "query-migrate",
    MigrationInfo
);
no_args_command!(
    /// Every migration capability and whether it is on.
    QueryMigrateCapabilities,
    "query-migrate-capabilities",
    Vec<CapabilityState>
);
no_args_command!(
    /// Every migration parameter, as a JSON object (kept raw so that saving and restoring
    /// them never loses a member this tool does not model).
    QueryMigrateParameters,
    "query-migrate-parameters",
    Map<String, Value>
);
no_args_command!(
    /// Cancel the running outgoing migration.
    MigrateCancel,
    "migrate_cancel",
    Empty
);

/// `query-migrate` reply. Every member is optional: which appear depends on the status.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: Option<MigrationStatus>,
    pub ram: Option<RamStats>,
    /// With `xbzrle`: its cache's counters.
    pub xbzrle_cache: Option<XbzrleStats>,
    /// With `auto-converge`: how much of the guest's CPU time is taken away now.
    pub cpu_throttle_percentage: Option<u64>,
    pub total_time: Option<u64>,
    pub expected_downtime: Option<u64>,
    pub downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub error_desc: Option<String>,
}

/// RAM counters of `query-migrate`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    /// QEMU's rate over the last iteration, in megabits per second.
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub multifd_bytes: u64,
}

/// `query-migrate`'s `xbzrle-cache`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", default)]
pub struct XbzrleStats {
    pub cache_size: u64,
    /// Bytes sent as XBZRLE deltas.
    pub bytes: u64,
    pub pages: u64,
    pub cache_miss: u64,
    pub cache_miss_rate: f64,
    pub encoding_rate: f64,
    pub overflow: u64,
}

/// One capability and its state, in queries and in `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct CapabilityState {
    /// Kept as a string: 7.2 reports capabilities (such as `compress`) that later QEMUs
    /// removed, and later QEMUs report ones 7.2 lacks.
    pub capability: String,
    pub state: bool,
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    pub capabilities: Vec<CapabilityState>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Output = Empty;
}

/// `migrate-set-parameters`: only the members set are sent. Deserialized from a run's journal
/// ([`crate::migration::journal`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct MigrateSetParameters {
    /// Id of a `tls-creds-x509` object; the empty string turns TLS off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the destination's certificate must carry; empty: the host part of the URI.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// Id of an `authz-*` object the destination checks the source's certificate against;
    /// `Value::Null` clears it. (An empty string would not: 7.2 would look for an authz
    /// object named "" and fail every TLS handshake.)
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_value"
    )]
    pub tls_authz: Option<Value>,
    /// Bytes per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Bytes per second once post-copy started (0: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u8>,
    /// `none`, `zlib` or `zstd`; both sides must agree.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multifd_compression: Option<String>,
    /// Percent of the guest's CPU time auto-converge takes first, and adds each pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u8>,
    /// Bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache_size: Option<u64>,
}

/// A member that is present is `Some`, even when it is `null` (which clears `tls-authz`).
fn present_value<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

impl MigrateSetParameters {
    /// The parameters as they were in a `query-migrate-parameters` reply, limited to the ones
    /// this type models: what to send to put them back.
    pub fn restore_from(saved: &Map<String, Value>) -> MigrateSetParameters {
        let s = |k: &str| saved.get(k).and_then(Value::as_str).map(str::to_string);
        let n = |k: &str| saved.get(k).and_then(Value::as_u64);
        MigrateSetParameters {
            // 7.2 reports an unset tls-creds/tls-hostname as "", and omits tls-authz when unset.
            tls_creds: Some(s("tls-creds").unwrap_or_default()),
            tls_hostname: Some(s("tls-hostname").unwrap_or_default()),
            tls_authz: Some(
                s("tls-authz")
                    .filter(|a| !a.is_empty())
                    .map(Value::String)
                    .unwrap_or(Value::Null),
            ),
            max_bandwidth: n("max-bandwidth"),
            max_postcopy_bandwidth: n("max-postcopy-bandwidth"),
            downtime_limit: n("downtime-limit"),
            multifd_channels: n("multifd-channels").and_then(|v| u8::try_from(v).ok()),
            multifd_compression: s("multifd-compression"),
            cpu_throttle_initial: n("cpu-throttle-initial").and_then(|v| u8::try_from(v).ok()),
            cpu_throttle_increment: n("cpu-throttle-increment").and_then(|v| u8::try_from(v).ok()),
            xbzrle_cache_size: n("xbzrle-cache-size"),
        }
    }
}

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Output = Empty;
}

/// `migrate-incoming` on a destination started with `-incoming defer`.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Output = Empty;
}

/// `migrate` on the source.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    pub uri: String,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Output = Empty;
}

/// `getfd` on the source: QEMU keeps the descriptor sent with this command under `fdname`, for
/// a `migrate` to `fd:NAME`, which takes it over.
#[derive(Debug, Clone, Serialize)]
pub struct GetFd {
    pub fdname: String,
}

impl Command for GetFd {
    const NAME: &'static str = "getfd";
    type Output = Empty;
}

/// `closefd`: QEMU closes a descriptor it keeps from [`GetFd`] that no command took.
#[derive(Debug, Clone, Serialize)]
pub struct CloseFd {
    pub fdname: String,
}

impl Command for CloseFd {
    const NAME: &'static str = "closefd";
    type Output = Empty;
}

/// `migrate` with `resume: true`: a paused post-copy reconnects to a destination that listens
/// again ([`MigrateRecover`]).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateResume {
    pub uri: String,
    pub resume: bool,
}

impl Command for MigrateResume {
    const NAME: &'static str = "migrate";
    type Output = Empty;
}

/// `migrate-recover` on a destination in `postcopy-paused`: listen for the source's resume.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRecover {
    pub uri: String,
}

impl Command for MigrateRecover {
    const NAME: &'static str = "migrate-recover";
    type Output = Empty;
}

no_args_command!(
    /// Break a post-copy's channel on purpose (either end), so it can be recovered.
    MigratePause,
    "migrate-pause",
    Empty
);
no_args_command!(
    /// Switch a running pre-copy migration to post-copy (`postcopy-ram` on both ends).
    MigrateStartPostcopy,
    "migrate-start-postcopy",
    Empty
);

/// `migrate-continue`: leave a paused state (`pre-switchover`) and go on.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateContinue {
    pub state: MigrationStatus,
}

impl Command for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Output = Empty;
}

/// The `MIGRATION` event's data.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct MigrationEvent {
    pub status: MigrationStatus,
}

/// The migration URI for a TCP (and TLS-over-TCP) stream. IPv6 literals are bracketed.
pub fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_7_2_capabilities_with_removed_names_decode() {
        let v = json!([{"capability": "xbzrle", "state": false},
                       {"capability": "compress", "state": false},
                       {"capability": "events", "state": true}]);
        let caps: Vec<CapabilityState> = serde_json::from_value(v).expect("decode");
        assert_eq!(caps[1].capability, "compress");
    }

    #[test]
    fn unknown_migration_status_decodes() {
        let info: MigrationInfo = serde_json::from_value(
            json!({"status": "something-new", "ram": {"transferred": 5, "new": 1}}),
        )
        .expect("decode");
        assert_eq!(info.status, Some(MigrationStatus::Unknown));
        assert_eq!(info.ram.map(|r| r.transferred), Some(5));
    }

    #[test]
    fn set_parameters_sends_only_what_is_set() {
        let p = MigrateSetParameters {
            tls_creds: Some("qtm-1".into()),
            max_bandwidth: Some(0),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&p).expect("encode"),
            json!({"tls-creds": "qtm-1", "max-bandwidth": 0})
        );
    }

    #[test]
    fn restore_puts_back_empty_tls_settings() {
        let saved: Map<String, Value> = serde_json::from_value(json!({
            "tls-creds": "", "tls-hostname": "", "max-bandwidth": 134217728,
            "downtime-limit": 300, "multifd-channels": 2, "compress-level": 1}))
        .expect("map");
        let p = MigrateSetParameters::restore_from(&saved);
        assert_eq!(p.tls_creds.as_deref(), Some(""));
        assert_eq!(p.tls_authz, Some(Value::Null));
        assert_eq!(p.max_bandwidth, Some(134217728));
        assert_eq!(p.multifd_channels, Some(2));
    }

    #[test]
    fn ipv6_uri_is_bracketed() {
        assert_eq!(tcp_uri("::1", 49152), "tcp:[::1]:49152");
        assert_eq!(tcp_uri("host-b", 49153), "tcp:host-b:49153");
    }
}

/// `calc-dirty-rate`: QEMU samples how fast the guest dirties its memory, for `calc_time`
/// seconds, in the background (`query-dirty-rate` says when it is done).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    pub calc_time: u64,
    /// Pages sampled per GiB (QEMU's default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<u64>,
}

impl Command for CalcDirtyRate {
    const NAME: &'static str = "calc-dirty-rate";
    type Output = Empty;
}

/// `query-dirty-rate`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryDirtyRate;

/// `query-dirty-rate`'s reply.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    /// MiB per second; absent until a measurement has completed.
    #[serde(default)]
    pub dirty_rate: Option<i64>,
    /// `unstarted`, `measuring` or `measured`.
    pub status: String,
    #[serde(default)]
    pub calc_time: u64,
}

impl Command for QueryDirtyRate {
    const NAME: &'static str = "query-dirty-rate";
    type Output = DirtyRateInfo;
}

/// `query-memory-size-summary`: the guest's RAM.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QueryMemorySizeSummary;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct MemorySizeSummary {
    pub base_memory: u64,
    #[serde(default)]
    pub plugged_memory: Option<u64>,
}

impl Command for QueryMemorySizeSummary {
    const NAME: &'static str = "query-memory-size-summary";
    type Output = MemorySizeSummary;
}
