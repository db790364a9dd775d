//! The control socket's protocol: one JSON request line, one JSON reply line, per connection.
//!
//! ```text
//! -> {"request":"status"}
//! <- {"reply":"status","id":"3f9c2a1b","pid":4242,"vm":"/run/vm1/qmp.sock","phase":"ram",...}
//! -> {"request":"set","max_bandwidth":33554432,"downtime_limit_ms":2000}
//! <- {"reply":"done","applied":["max-bandwidth 33554432","downtime-limit 2000 ms"]}
//! -> {"request":"pause"}
//! <- {"reply":"error","message":"..."}
//! ```

use serde::{Deserialize, Serialize};

/// The longest request or reply line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// What a client asks of a running job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Where the job is ([`Reply::Status`]).
    Status,
    /// Cancel and roll back, as a signal does.
    Cancel,
    /// Change the migration's settings while it runs.
    Set {
        /// RAM stream cap, bytes per second.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bandwidth: Option<u64>,
        /// Longest pause at switch-over, milliseconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_limit_ms: Option<u64>,
    },
    /// Pause the guest so that the rest moves as downtime.
    Pause,
}

/// A job's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Status(JobStatus),
    /// The request was carried out; `applied` says what changed, in order.
    Done {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        applied: Vec<String>,
    },
    /// The request was refused or failed; nothing more than `applied` changed.
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        applied: Vec<String>,
    },
}

/// One running job as `jobs` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub pid: u32,
    /// What is being migrated: a QMP socket path or a libvirt domain name.
    pub vm: String,
    /// The run's phase (`preflight`, `prepare`, `disks`, `ram`, `finish`, `cleanup`).
    pub phase: String,
    /// The migration's own status, once it started (`active`, `device`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub elapsed_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamProgress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskProgress>,
}

/// RAM moved so far, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RamProgress {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Megabits per second, as last measured.
    pub mbps: f64,
}

/// One disk's copy so far, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub device: String,
    pub offset: u64,
    pub len: u64,
    pub ready: bool,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn requests_are_tagged_lines_and_parse_back() {
        let set = Request::Set {
            max_bandwidth: Some(1 << 25),
            downtime_limit_ms: None,
        };

        let text = serde_json::to_string(&set).expect("json");

        assert_eq!(text, r#"{"request":"set","max_bandwidth":33554432}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).expect("parse"), set);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"request":"cancel"}"#).expect("parse"),
            Request::Cancel
        );
    }

    #[test]
    fn unknown_requests_and_fields_are_refused() {
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
        assert!(
            serde_json::from_str::<Request>(r#"{"request":"set","max_bandwith":1}"#).is_err(),
            "a misspelt field must not be ignored"
        );
    }

    #[test]
    fn a_status_reply_is_flat_with_its_tag() {
        let status = Reply::Status(JobStatus {
            id: "ab12".into(),
            pid: 7,
            vm: "/run/vm1/qmp.sock".into(),
            phase: "ram".into(),
            status: Some("active".into()),
            elapsed_ms: 1500,
            ram: Some(RamProgress {
                transferred: 10,
                remaining: 20,
                total: 30,
                mbps: 1.5,
            }),
            disks: Vec::new(),
        });

        let value = serde_json::to_value(&status).expect("json");

        assert_eq!(value["reply"], "status");
        assert_eq!(value["id"], "ab12");
        assert_eq!(
            value["ram"],
            json!({"transferred": 10, "remaining": 20, "total": 30, "mbps": 1.5})
        );
        assert!(value.get("disks").is_none());
        assert_eq!(
            serde_json::from_value::<Reply>(value).expect("parse"),
            status
        );
    }
}
