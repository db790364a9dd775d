//! The proxied peer designs, for comparison with QEMU-native TLS on the same VM: QEMU migrates
//! in plain TCP through an encrypting tunnel.
//!
//! - `tls-proxy`: the design of KubeVirt's migration proxy and of tunnelled migration, a pair
//!   of TLS proxies. They are `socat` with OpenSSL (a packaged, real TLS proxy), both ends
//!   verifying the other against the lab CA:
//!
//!   ```text
//!   source QEMU --tcp--> socat (client) ==TLS==> socat (server) --tcp--> destination QEMU
//!   ```
//! - `ssh`: Proxmox's "secure" migration, an SSH port forward (`ssh -L`) into an `sshd` that
//!   the bench starts on loopback with throwaway keys (never the host's SSH service), OpenSSH's
//!   default cipher:
//!
//!   ```text
//!   source QEMU --tcp--> ssh -L ==SSH==> sshd --tcp--> destination QEMU
//!   ```

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::pki::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY};

/// How long a proxy may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// A socat/OpenSSL TLS proxy pair.
    Socat,
    /// An SSH port forward.
    Ssh,
}

/// A running proxy pair; both are killed on drop (with the SSH pair's key directory).
#[derive(Debug)]
pub struct ProxyPair {
    _client: Child,
    _server: Child,
    _dir: Option<tempfile::TempDir>,
    /// Where the source QEMU connects.
    pub source_connect: crate::addr::Address,
}

/// Why a proxy pair could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    #[error("cannot start {program} (scripts/setup.sh installs it)")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the SSH tunnel's keys: {0}")]
    SshKeys(String),
    #[error("cannot find a free local port")]
    Port(#[source] std::io::Error),
    #[error("{program} did not listen on port {port} within {READY_TIMEOUT:?}")]
    NotListening { program: &'static str, port: u16 },
}

impl ProxyPair {
    /// Starts a pair of `kind` on loopback forwarding to `dest_port`; see [`ProxyPair::socat`]
    /// and [`ProxyPair::ssh`].
    pub async fn start(
        kind: ProxyKind,
        source_pki: &Path,
        dest_pki: &Path,
        dest_name: &str,
        dest_port: u16,
    ) -> Result<ProxyPair, ProxyError> {
        match kind {
            ProxyKind::Socat => ProxyPair::socat(source_pki, dest_pki, dest_name, dest_port).await,
            ProxyKind::Ssh => ProxyPair::ssh(dest_port).await,
        }
    }

    /// Starts the socat pair on loopback: the server end forwards to `dest_port`, where the
    /// destination QEMU will listen; `dest_name` is the name the server's certificate carries.
    pub async fn socat(
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
        wait_listening("socat", tls_port).await?;
        wait_listening("socat", plain_port).await?;
        Ok(ProxyPair {
            _client: client,
            _server: server,
            _dir: None,
            source_connect: crate::addr::Address {
                host: "127.0.0.1".into(),
                port: Some(plain_port),
            },
        })
    }

    /// Starts an `sshd` on loopback (throwaway host and client keys, this user only, port
    /// forwarding allowed, no other authentication) and an `ssh -N -L` into it that forwards
    /// to `dest_port`.
    pub async fn ssh(dest_port: u16) -> Result<ProxyPair, ProxyError> {
        let keys = |e: std::io::Error| ProxyError::SshKeys(e.to_string());
        let dir = tempfile::Builder::new()
            .prefix("qtm-bench-ssh-")
            .tempdir()
            .map_err(keys)?;
        let path = |name: &str| dir.path().join(name);
        for key in ["host_key", "client_key"] {
            let out = std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path(key))
                .output()
                .map_err(|source| ProxyError::Spawn {
                    program: "ssh-keygen",
                    source,
                })?;
            if !out.status.success() {
                return Err(ProxyError::SshKeys(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        std::fs::copy(path("client_key.pub"), path("authorized_keys")).map_err(keys)?;
        // sshd's privilege separation directory; a host without the SSH service may lack it.
        std::fs::create_dir_all("/run/sshd").map_err(keys)?;
        let (ssh_port, plain_port) = (free_port()?, free_port()?);
        let config = format!(
            "Port {ssh_port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             AllowTcpForwarding yes\nPidFile none\nLogLevel ERROR\n",
            path("host_key").display(),
            path("authorized_keys").display(),
        );
        std::fs::write(path("sshd_config"), config).map_err(keys)?;
        let server = spawn_program(
            "/usr/sbin/sshd",
            &[
                "-D".into(),
                "-e".into(),
                "-f".into(),
                path("sshd_config").display().to_string(),
            ],
        )?;
        wait_listening("sshd", ssh_port).await?;
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| "root".to_string(), |u| u.name);
        let client = spawn_program(
            "ssh",
            &[
                "-N".into(),
                "-o".into(),
                "BatchMode=yes".into(),
                "-o".into(),
                "StrictHostKeyChecking=no".into(),
                "-o".into(),
                "UserKnownHostsFile=/dev/null".into(),
                "-o".into(),
                "LogLevel=ERROR".into(),
                "-i".into(),
                path("client_key").display().to_string(),
                "-p".into(),
                ssh_port.to_string(),
                "-L".into(),
                format!("127.0.0.1:{plain_port}:127.0.0.1:{dest_port}"),
                format!("{user}@127.0.0.1"),
            ],
        )?;
        // ssh opens its forward's listener once logged in.
        wait_listening("ssh", plain_port).await?;
        Ok(ProxyPair {
            _client: client,
            _server: server,
            _dir: Some(dir),
            source_connect: crate::addr::Address {
                host: "127.0.0.1".into(),
                port: Some(plain_port),
            },
        })
    }
}

fn spawn(args: &[String]) -> Result<Child, ProxyError> {
    spawn_program("socat", args)
}

fn spawn_program(program: &'static str, args: &[String]) -> Result<Child, ProxyError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ProxyError::Spawn { program, source })
}

/// A port the kernel says is free now (bind to 0, read it, let go).
fn free_port() -> Result<u16, ProxyError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(ProxyError::Port)?;
    l.local_addr().map(|a| a.port()).map_err(ProxyError::Port)
}

/// Waits until a socket listens on `port`, without connecting: a connection through the pair
/// would reach the destination's port and end its incoming migration.
async fn wait_listening(program: &'static str, port: u16) -> Result<(), ProxyError> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    loop {
        if listens(port) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProxyError::NotListening { program, port });
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
