//! The shapes of QMP messages on the wire, decoded tolerantly: unknown members are ignored,
//! unknown message kinds are reported as [`Incoming::Other`] rather than as errors.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// QEMU's greeting: `{"QMP": {"version": {...}, "capabilities": [...]}}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Greeting {
    #[serde(default)]
    pub version: GreetingVersion,
    #[serde(default)]
    pub capabilities: Vec<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct GreetingVersion {
    #[serde(default)]
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}

/// A QEMU version (`query-version`'s and the greeting's `qemu` member); ordered by
/// major, minor, micro.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
pub struct QemuVersion {
    #[serde(default)]
    pub major: u32,
    #[serde(default)]
    pub minor: u32,
    #[serde(default)]
    pub micro: u32,
}

impl QemuVersion {
    pub const fn new(major: u32, minor: u32, micro: u32) -> QemuVersion {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }

    /// At least `major.minor` (any micro).
    pub fn at_least(self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// The same release series (`7.2.x` and `7.2.y`).
    pub fn same_series(self, other: QemuVersion) -> bool {
        (self.major, self.minor) == (other.major, other.minor)
    }

    /// From `qemu-system-x86_64 -version`'s first line: `QEMU emulator version 10.0.2 (...)`.
    pub fn from_version_output(text: &str) -> Option<QemuVersion> {
        let rest = text.split("version ").nth(1)?;
        let word = rest.split_whitespace().next()?;
        let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next().flatten().unwrap_or(0);
        let micro = parts.next().flatten().unwrap_or(0);
        Some(QemuVersion::new(major, minor, micro))
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

impl Greeting {
    pub(crate) fn parse(line: &str) -> Result<Greeting, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("bad greeting: {e}"))?;
        let inner = value
            .get("QMP")
            .ok_or_else(|| format!("expected a QMP greeting, got {}", truncate(line)))?;
        serde_json::from_value(inner.clone()).map_err(|e| format!("bad greeting: {e}"))
    }

    /// Whether QEMU offers out-of-band execution.
    pub fn offers_oob(&self) -> bool {
        self.capabilities.iter().any(|c| c.as_str() == Some("oob"))
    }
}

/// An asynchronous event: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<Timestamp>,
}

impl Event {
    /// When QEMU emitted it, in microseconds since the epoch (its host's clock).
    pub fn timestamp_us(&self) -> Option<i64> {
        self.timestamp
            .map(|t| t.seconds * 1_000_000 + t.microseconds)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// One decoded line from QEMU after the greeting.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A reply to a command we sent: the `return` value, or QEMU's error class and description.
    Reply {
        id: u64,
        result: Result<Value, (String, String)>,
    },
    /// An error QEMU could not tie to a command (it could not parse what it got).
    UntaggedError {
        class: String,
        desc: String,
    },
    Event(Event),
    /// Valid JSON of a kind this client does not know; ignored.
    Other,
}

impl Incoming {
    pub(crate) fn parse(line: &str) -> Result<Incoming, String> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("{e} in {}", truncate(line)))?;
        let Value::Object(map) = value else {
            return Err(format!("expected a JSON object, got {}", truncate(line)));
        };
        if let Some(name) = map.get("event").and_then(Value::as_str) {
            let timestamp = map
                .get("timestamp")
                .and_then(|t| serde_json::from_value(t.clone()).ok());
            return Ok(Incoming::Event(Event {
                event: name.to_string(),
                data: map.get("data").cloned().unwrap_or(Value::Null),
                timestamp,
            }));
        }
        let error = map.get("error").map(|e| {
            let class = e
                .get("class")
                .and_then(Value::as_str)
                .unwrap_or("GenericError");
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
            (class.to_string(), desc.to_string())
        });
        let id = map.get("id").and_then(Value::as_u64);
        match (id, map.get("return"), error) {
            (Some(id), Some(ret), None) => Ok(Incoming::Reply {
                id,
                result: Ok(ret.clone()),
            }),
            (Some(id), _, Some(err)) => Ok(Incoming::Reply {
                id,
                result: Err(err),
            }),
            (None, _, Some((class, desc))) => Ok(Incoming::UntaggedError { class, desc }),
            _ => Ok(Incoming::Other),
        }
    }
}

fn truncate(s: &str) -> String {
    const MAX: usize = 120;
    if s.len() <= MAX {
        s.to_string()
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    }
}
