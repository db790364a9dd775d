//! Replies captured from real QEMU 7.2 and 10.0 (`scripts/capture-qmp-replies.py`, one
//! directory per version under `src/qemu/replies/`), parsed with this module's own reply
//! types: a type that only fits one version fails here, not in a migration.
//!
//! What differs between the two, and what the tool does about it:
//! - `query-migrate`'s `ram`: 10.0 dropped `skipped` (never read) and added `postcopy-bytes`,
//!   `dirty-sync-missed-zero-copy` (ignored): every counter the tool reads is in both.
//! - `query-migrate-capabilities`: 10.0 dropped `block` and `compress` (the tool uses NBD
//!   mirroring and multifd compression, and never sets either) and added `dirty-limit`,
//!   `mapped-ram`, `switchover-ack`. The tool saves and restores only what it sets.
//! - `query-migrate-parameters`: 10.0 dropped `block-incremental` and the `compress-*` and
//!   `decompress-threads` parameters and added `zero-page-detection`, `direct-io`, `mode`,
//!   `avail-switchover-bandwidth` and others; the reply is kept as raw JSON, so saving and
//!   restoring never loses a member of either version.

use std::collections::BTreeSet;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::*;

macro_rules! captured {
    ($v:literal) => {
        [
            (
                "query-version",
                include_str!(concat!("replies/", $v, "/query-version.json")),
            ),
            (
                "query-status",
                include_str!(concat!("replies/", $v, "/query-status.json")),
            ),
            (
                "query-kvm",
                include_str!(concat!("replies/", $v, "/query-kvm.json")),
            ),
            (
                "query-machines",
                include_str!(concat!("replies/", $v, "/query-machines.json")),
            ),
            (
                "query-migrate-capabilities",
                include_str!(concat!("replies/", $v, "/query-migrate-capabilities.json")),
            ),
            (
                "query-migrate-parameters",
                include_str!(concat!("replies/", $v, "/query-migrate-parameters.json")),
            ),
            (
                "query-migrate-none",
                include_str!(concat!("replies/", $v, "/query-migrate-none.json")),
            ),
            (
                "query-migrate-active",
                include_str!(concat!("replies/", $v, "/query-migrate-active.json")),
            ),
            (
                "query-migrate-completed",
                include_str!(concat!("replies/", $v, "/query-migrate-completed.json")),
            ),
            (
                "query-block",
                include_str!(concat!("replies/", $v, "/query-block.json")),
            ),
            (
                "query-named-block-nodes",
                include_str!(concat!("replies/", $v, "/query-named-block-nodes.json")),
            ),
            (
                "query-block-jobs",
                include_str!(concat!("replies/", $v, "/query-block-jobs.json")),
            ),
            (
                "query-memory-size-summary",
                include_str!(concat!("replies/", $v, "/query-memory-size-summary.json")),
            ),
            (
                "query-dirty-rate",
                include_str!(concat!("replies/", $v, "/query-dirty-rate.json")),
            ),
        ]
    };
}

/// The captured versions, each with its directory's files.
const VERSIONS: [(&str, &[(&str, &str)]); 2] =
    [("7.2", &captured!("7.2")), ("10.0", &captured!("10.0"))];

fn reply<T: DeserializeOwned>(version: &str, name: &str) -> T {
    let (_, files) = VERSIONS
        .iter()
        .find(|(v, _)| *v == version)
        .expect("version");
    let (_, text) = files
        .iter()
        .find(|(n, _)| *n == name)
        .expect("captured reply");
    serde_json::from_str(text).unwrap_or_else(|e| panic!("QEMU {version} {name}: {e}"))
}

fn each_version(f: impl Fn(&str)) {
    for (v, _) in VERSIONS {
        f(v);
    }
}

#[test]
fn every_captured_reply_parses_with_the_tools_types_on_both_versions() {
    each_version(|v| {
        let version: VersionInfo = reply(v, "query-version");
        assert_eq!(format!("{}.{}", version.qemu.major, version.qemu.minor), v);
        let _: StatusInfo = reply(v, "query-status");
        let _: KvmInfo = reply(v, "query-kvm");
        let machines: Vec<MachineInfo> = reply(v, "query-machines");
        assert!(
            machines.iter().any(|m| m.name == "pc-q35-7.2"),
            "QEMU {v} loads pc-q35-7.2"
        );
        let _: Vec<CapabilityState> = reply(v, "query-migrate-capabilities");
        let _: Map<String, Value> = reply(v, "query-migrate-parameters");
        let _: Vec<BlockInfo> = reply(v, "query-block");
        let nodes: Vec<BlockDeviceInfo> = reply(v, "query-named-block-nodes");
        assert!(!nodes.is_empty(), "QEMU {v}: the disk's nodes");
        let _: Vec<BlockJobInfo> = reply(v, "query-block-jobs");
        let mem: MemorySizeSummary = reply(v, "query-memory-size-summary");
        assert_eq!(mem.base_memory, 64 << 20);
        let _: DirtyRateInfo = reply(v, "query-dirty-rate");
    });
}

#[test]
fn query_migrate_reads_the_same_counters_on_both_versions() {
    each_version(|v| {
        let none: MigrationInfo = reply(v, "query-migrate-none");
        assert_eq!(
            none.status, None,
            "QEMU {v}: no migration yet is an empty reply"
        );
        let active: MigrationInfo = reply(v, "query-migrate-active");
        assert_eq!(active.status, Some(MigrationStatus::Active), "QEMU {v}");
        let ram = active.ram.expect("ram while active");
        assert!(
            ram.transferred > 0 && ram.remaining > 0 && ram.total > 64 << 20,
            "QEMU {v}: {ram:?}"
        );
        let done: MigrationInfo = reply(v, "query-migrate-completed");
        assert_eq!(done.status, Some(MigrationStatus::Completed), "QEMU {v}");
        let ram = done.ram.expect("ram when completed");
        assert_eq!(ram.remaining, 0);
        assert!(
            ram.duplicate > 0,
            "QEMU {v}: zero pages counted as duplicate"
        );
        assert!(ram.dirty_sync_count >= 1);
        assert!(done.total_time.is_some() && done.downtime.is_some() && done.setup_time.is_some());
    });
}

fn names(v: &str, file: &str) -> BTreeSet<String> {
    match reply::<Value>(v, file) {
        Value::Array(caps) => caps
            .iter()
            .filter_map(|c| c["capability"].as_str().map(String::from))
            .collect(),
        Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn the_differences_between_7_2_and_10_0_are_the_ones_the_module_docs_name() {
    let gone = |file: &str| -> Vec<String> {
        names("7.2", file)
            .difference(&names("10.0", file))
            .cloned()
            .collect()
    };
    assert_eq!(gone("query-migrate-capabilities"), ["block", "compress"]);
    assert_eq!(
        gone("query-migrate-parameters"),
        [
            "block-incremental",
            "compress-level",
            "compress-threads",
            "compress-wait-thread",
            "decompress-threads"
        ]
    );
    assert!(names("10.0", "query-migrate-parameters").contains("zero-page-detection"));
    let ram = |v: &str| -> BTreeSet<String> {
        reply::<Value>(v, "query-migrate-completed")["ram"]
            .as_object()
            .expect("ram")
            .keys()
            .cloned()
            .collect()
    };
    let ram_gone: Vec<String> = ram("7.2").difference(&ram("10.0")).cloned().collect();
    assert_eq!(ram_gone, ["skipped"]);
}

/// Nothing the tool sets is gone in 10.0: the capabilities the source and destination
/// ask for, and every member of [`MigrateSetParameters`].
#[test]
fn every_capability_and_parameter_the_tool_sets_exists_on_both_versions() {
    let caps = [
        "events",
        "multifd",
        "pause-before-switchover",
        "auto-converge",
        "xbzrle",
    ];
    let all = MigrateSetParameters {
        tls_creds: Some(String::new()),
        tls_hostname: Some(String::new()),
        tls_authz: Some(Value::Null),
        max_bandwidth: Some(0),
        downtime_limit: Some(0),
        multifd_channels: Some(1),
        multifd_compression: Some("none".into()),
        cpu_throttle_initial: Some(1),
        cpu_throttle_increment: Some(1),
        xbzrle_cache_size: Some(0),
        max_postcopy_bandwidth: Some(0),
    };
    let params: Vec<String> = serde_json::to_value(&all)
        .expect("encode")
        .as_object()
        .expect("object")
        .keys()
        .cloned()
        .collect();
    assert_eq!(params.len(), 11, "every member set: {params:?}");
    each_version(|v| {
        let have = names(v, "query-migrate-capabilities");
        for c in caps {
            assert!(have.contains(c), "QEMU {v} lacks capability {c}");
        }
        let have = names(v, "query-migrate-parameters");
        for p in &params {
            assert!(have.contains(p), "QEMU {v} lacks parameter {p}");
        }
    });
}
