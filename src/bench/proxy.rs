//! The `tls-proxy` peer design: QEMU migrates in plain TCP through a pair of TLS proxies, the
//! design of KubeVirt's migration proxy and of tunnelled migration, for comparison with
//! QEMU-native TLS on the same VM. The proxies are `socat` with OpenSSL (a packaged, real TLS
//! proxy), both ends verifying the other against the lab CA:
//!
//! ```text
//! source QEMU --tcp--> socat (client) ==TLS==> socat (server) --tcp--> destination QEMU
//! ```

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// How long a proxy may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running proxy pair; both are killed on drop.
#[derive(Debug)]
pub struct ProxyPair {
    _client: Child,
    _server: Child,
    /// `HOST:PORT` the source QEMU connects to.
    pub source_connect: String,
}

/// Why a proxy pair could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("cannot start socat (install the socat package)")]
    Spawn(#[source] std::io::Error),
    #[error("cannot find a free local port")]
    Port(#[source] std::io::Error),
    #[error("socat did not listen on port {port} within {READY_TIMEOUT:?}")]
    NotListening { port: u16 },
}

impl ProxyPair {
    /// Starts the pair on loopback: the server end forwards to `dest_port`, where the
    /// destination QEMU will listen; `dest_name` is the name the server's certificate carries.
    pub async fn start(
        source_pki: &Path,
        dest_pki: &Path,
        dest_name: &str,
        dest_port: u16,
    ) -> Result<ProxyPair, ProxyError> {
        let (tls_port, plain_port) = (free_port()?, free_port()?);
        let file = |dir: &Path, name: &str| dir.join(name).display().to_string();
        let server = spawn(&[
            format!(
                "OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},cafile={},verify=1",
                file(dest_pki, SERVER_CERT),
                file(dest_pki, SERVER_KEY),
                file(dest_pki, CA_CERT),
            ),
            format!("TCP:127.0.0.1:{dest_port}"),
        ])?;
        let client = spawn(&[
            format!("TCP-LISTEN:{plain_port},bind=127.0.0.1,reuseaddr,fork"),
            format!(
                "OPENSSL:127.0.0.1:{tls_port},cert={},key={},cafile={},verify=1,commonname={dest_name}",
                file(source_pki, CLIENT_CERT),
                file(source_pki, CLIENT_KEY),
                file(source_pki, CA_CERT),
            ),
        ])?;
        wait_listening(tls_port).await?;
        wait_listening(plain_port).await?;
        Ok(ProxyPair {
            _client: client,
            _server: server,
            source_connect: format!("127.0.0.1:{plain_port}"),
        })
    }
}

fn spawn(args: &[String]) -> Result<Child, ProxyError> {
    Command::new("socat")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(ProxyError::Spawn)
}

/// A port the kernel says is free now (bind to 0, read it, let go).
fn free_port() -> Result<u16, ProxyError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(ProxyError::Port)?;
    l.local_addr().map(|a| a.port()).map_err(ProxyError::Port)
}

/// Waits until a socket listens on `port`, without connecting: a connection through the pair
/// would reach the destination's port and end its incoming migration.
async fn wait_listening(port: u16) -> Result<(), ProxyError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if listens(port) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProxyError::NotListening { port });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `/proc/net/tcp` shows a socket in state LISTEN on local port `port`.
fn listens(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let wanted = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1).unwrap_or_default();
        let state = fields.nth(1).unwrap_or_default();
        local.ends_with(&wanted) && state == "0A"
    })
}
