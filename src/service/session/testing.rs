//! What the session's unit tests share: options, a peer's identity and plan, a session's
//! context, and a destination QEMU faked on a Unix socket.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::Context;
use crate::peer::{Authz, DestPlan, PeerIdentity};
use crate::qmp::fake;
use crate::service::ServeOptions;

/// The service's defaults, with directories that do not exist.
pub fn opts() -> ServeOptions {
    ServeOptions::new(
        "127.0.0.1:0".parse().expect("address"),
        "/nonexistent".into(),
        "/nonexistent".into(),
    )
}

/// A source that presented `CN=host-b`.
pub fn identity() -> PeerIdentity {
    PeerIdentity {
        dn: Ok("CN=host-b".into()),
        names: vec!["host-b".into()],
        ips: Vec::new(),
    }
}

/// A source's plan for a migration without disks, asking for more than the service allows.
pub fn plan(tls: bool) -> DestPlan {
    DestPlan {
        machine: None,
        postcopy: false,
        tls,
        tls_priority: Some("NORMAL:+NULL".into()),
        multifd: None,
        multifd_compression: None,
        disks: Vec::new(),
        create_dest_disks: false,
        authz: Authz::Identity("CN=someone-else".into()),
        listen_address: "0.0.0.0".into(),
        port_range: "1-65535".parse().expect("range"),
    }
}

/// A session's context with [`opts`] and [`identity`].
pub fn context() -> Context {
    Context {
        opts: Arc::new(opts()),
        identity: identity(),
        local_address: None,
        holds: Default::default(),
    }
}

/// A destination QEMU 7.2 waiting with `-incoming defer`, faked on a Unix socket (one
/// connection): `inmigrate`, `paused` once `migrate-incoming` came, `running` after `cont`
/// (with its `RESUME` event); every other command answered `{}`.
pub struct FakeDestination {
    /// The name of each command received, in order; ends when the connection does.
    pub commands: mpsc::UnboundedReceiver<String>,
    /// Lets the held command (see [`fake_destination`]) be answered.
    pub release: Arc<Notify>,
    /// Closes the connection at once, as a QEMU that exits.
    pub exit: CancellationToken,
}

impl FakeDestination {
    /// Waits until the command `name` has been received (and any before it).
    pub async fn received(&mut self, name: &str) {
        while let Some(got) = self.commands.recv().await {
            if got == name {
                return;
            }
        }
        panic!("the connection ended before {name} came");
    }

    /// The commands received so far and not yet looked at.
    pub fn so_far(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.commands.try_recv().ok()).collect()
    }

    /// The commands received from now until the connection ends.
    pub async fn rest(&mut self) -> Vec<String> {
        let mut rest = Vec::new();
        while let Some(got) = self.commands.recv().await {
            rest.push(got);
        }
        rest
    }
}

/// Serves a [`FakeDestination`] at `path`; the command `held` is answered only once released.
pub fn fake_destination(path: &Path, held: &'static str) -> FakeDestination {
    let listener = UnixListener::bind(path).expect("bind the fake QMP socket");
    let (seen, commands) = mpsc::unbounded_channel();
    let (release, exit) = (Arc::new(Notify::new()), CancellationToken::new());
    let (released, exited) = (release.clone(), exit.clone());
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let (read, write, mut qemu) = fake::raw();
        tokio::spawn(async move {
            let mut client = tokio::io::join(read, write);
            let _ = tokio::io::copy_bidirectional(&mut socket, &mut client).await;
        });
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
            "package": ""}, "capabilities": []}});
        let _ = qemu.send(greeting).await;
        let mut status = "inmigrate";
        loop {
            let cmd = tokio::select! {
                cmd = qemu.recv() => cmd,
                () = exited.cancelled() => return,
            };
            let Some(cmd) = cmd else { return };
            let name = cmd["execute"].as_str().unwrap_or_default().to_string();
            let _ = seen.send(name.clone());
            if name == held {
                tokio::select! {
                    () = released.notified() => {}
                    () = exited.cancelled() => return,
                }
            }
            let answer = match name.as_str() {
                "query-status" => json!({"running": status == "running", "status": status}),
                "query-block" | "query-migrate-capabilities" => json!([]),
                _ => json!({}),
            };
            status = match name.as_str() {
                "migrate-incoming" => "paused",
                "cont" => "running",
                _ => status,
            };
            if qemu
                .send(json!({"return": answer, "id": cmd["id"]}))
                .await
                .is_err()
            {
                return;
            }
            if name == "cont" {
                let resume = json!({"event": "RESUME", "data": {},
                    "timestamp": {"seconds": 1, "microseconds": 0}});
                let _ = qemu.send(resume).await;
            }
        }
    });
    FakeDestination {
        commands,
        release,
        exit,
    }
}
