//! `HOST[:PORT]` as operators and the command line write it: the one parser for every address
//! the tool takes (`--to`, `serve --listen`, `--source-connect`, `--nbd-connect`).
//!
//! An IPv6 address takes brackets when a port follows (`[2001:db8::1]:16515`); without a port
//! it may go bare (`2001:db8::1`) or in brackets. The host is kept without brackets.

use std::fmt;
use std::str::FromStr;

/// A host with an optional port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// A name or an IP address, IPv6 without brackets.
    pub host: String,
    pub port: Option<u16>,
}

/// Why a string is not `HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AddrError {
    #[error("{0:?} names no host: expected HOST[:PORT] ([IPv6]:PORT for IPv6)")]
    NoHost(String),
    #[error("{input:?}: {port:?} is not a port (0 to 65535)")]
    BadPort { input: String, port: String },
    #[error("{0:?}: an IPv6 address with a port goes in brackets, [ADDR]:PORT")]
    Brackets(String),
    #[error("{0:?} needs a port to connect to: HOST:PORT, PORT 1 to 65535")]
    NoPort(String),
}

impl Address {
    /// The port, or `default` when none was given.
    pub fn port_or(&self, default: u16) -> u16 {
        self.port.unwrap_or(default)
    }

    /// The port to connect to, which this use requires (port 0 is for listening only).
    pub fn require_port(&self) -> Result<u16, AddrError> {
        self.port
            .filter(|p| *p != 0)
            .ok_or_else(|| AddrError::NoPort(self.to_string()))
    }

    /// `host:port` for a socket API, IPv6 in brackets.
    pub fn with_port(&self, port: u16) -> String {
        format!("{}:{port}", bracketed(&self.host))
    }
}

/// `host` as it goes before `:PORT`: an IPv6 address in brackets.
pub fn bracketed(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

impl FromStr for Address {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Address, AddrError> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| AddrError::Brackets(s.to_string()))?;
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(AddrError::Brackets(s.to_string())),
                },
            }
        } else {
            match s.matches(':').count() {
                0 => (s, None),
                1 => s
                    .split_once(':')
                    .map(|(h, p)| (h, Some(p)))
                    .unwrap_or((s, None)),
                // A bare IPv6 address: it can carry no port.
                _ if s.parse::<std::net::Ipv6Addr>().is_ok() => (s, None),
                _ => return Err(AddrError::Brackets(s.to_string())),
            }
        };
        if host.trim().is_empty() {
            return Err(AddrError::NoHost(s.to_string()));
        }
        let port = match port {
            None => None,
            // Port 0 is kept: to listen on it is to let the kernel choose one.
            Some(p) => Some(p.parse::<u16>().ok().ok_or_else(|| AddrError::BadPort {
                input: s.to_string(),
                port: p.to_string(),
            })?),
        };
        Ok(Address {
            host: host.to_string(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => f.write_str(&self.with_port(port)),
            None => f.write_str(&self.host),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> (String, Option<u16>) {
        let a: Address = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        (a.host, a.port)
    }

    #[test]
    fn names_and_addresses_of_both_families_parse_with_or_without_a_port() {
        assert_eq!(parsed("host-b"), ("host-b".into(), None));
        assert_eq!(parsed("host-b:16515"), ("host-b".into(), Some(16515)));
        assert_eq!(parsed("198.18.0.1:1"), ("198.18.0.1".into(), Some(1)));
        assert_eq!(parsed("2001:db8::1"), ("2001:db8::1".into(), None));
        assert_eq!(parsed("[2001:db8::1]"), ("2001:db8::1".into(), None));
        assert_eq!(parsed("[::1]:49152"), ("::1".into(), Some(49152)));
    }

    #[test]
    fn malformed_addresses_are_refused_naming_the_input() {
        for bad in [
            "",
            ":16515",
            "host:65536",
            "host:x",
            "[::1",
            "[::1]x",
            "a:b:c",
        ] {
            let err = bad.parse::<Address>().expect_err(bad);
            assert!(
                err.to_string().contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn port_0_is_for_listening_only() {
        let any: Address = "127.0.0.1:0".parse().expect("listen address");

        assert_eq!(any.port, Some(0));
        assert!(any.require_port().is_err());
    }

    #[test]
    fn an_address_prints_as_it_is_written_back_with_brackets_for_ipv6() {
        for s in ["host-b", "host-b:1", "[::1]:49152", "198.18.0.1"] {
            assert_eq!(s.parse::<Address>().expect(s).to_string(), s);
        }
        assert_eq!(
            "::1".parse::<Address>().expect("v6").with_port(5),
            "[::1]:5"
        );
    }
}
