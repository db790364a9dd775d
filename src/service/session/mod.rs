//! One source's session with the service, as an explicit state machine.
//!
//! ```text
//! Greeted --preflight--> Preflighted --prepare--> Prepared --finish--> Done
//!    \                       \                       \--abort-----> Done
//!     \----------------------- \--abort / lost / shutdown: roll back
//! ```
//!
//! 1. TLS (both ends authenticated; names checked against `--allow-client` in the handshake),
//!    then `hello` → `welcome` with this host's [`crate::pki::Security`] verdict.
//! 2. `preflight {qmp, plan}`: the service applies its own policy to the plan (plain TCP only
//!    with `--allow-plain`, its own TLS priority, listen address and ports, `tls-authz`), attaches
//!    to `--qmp-dir/qmp` and checks, changing nothing → `preflighted`, or a refusal. From then on
//!    the session holds that socket ([`super::held`]): another session naming it is `busy`.
//!    (With `--libvirt`, `start-domain` comes first and the preflight is on the incoming
//!    domain's own socket, whatever name is sent.)
//! 3. `prepare` → `prepared {ports}`; from here the destination is changed.
//! 4. `finish {resume}` → `finished`; or `abort` → `aborted {stopped}`.
//!
//! A request runs as the session's one piece of work *beside* the loop that reads frames
//! (`activity.rs`), so pings are answered at every moment, however long `prepare` or `finish`
//! take. When the channel is lost (closed, or silent for [`crate::peer::HEARTBEAT_TIMEOUT`]) or
//! the service shuts down, the work under way is completed, and whatever was prepared and not
//! finished is rolled back: a `finish` under way is completed because the source has already
//! handed the VM over. What each request does in each state is in `state.rs`; one
//! [`Footprint`] per state decides both whether an error reply is a refusal and what an early
//! end rolls back. The service's policy for a plan and the socket names a source may use are
//! in `policy.rs`.

mod activity;
mod policy;
mod state;
#[cfg(test)]
mod testing;

pub use policy::{apply_policy, qmp_path};
pub use state::{Footprint, State, Step};

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::ServeOptions;
use super::limits::HandshakeSlot;
use crate::peer::{Channel, Message, PeerError, PeerIdentity, tls_failure_reason};

/// How long a new connection has to finish the TLS handshake: a real one takes 2-4 ms here
/// (median of 20 between two network namespaces; under 100 ms at worst on a loaded 2-core
/// host; see the README), so 3 s leaves a loaded host ample room while a connection that never
/// sends its ClientHello holds its slot only briefly.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What the session knows of its peer and host, for each step.
#[derive(Debug, Clone)]
pub struct Context {
    pub opts: std::sync::Arc<ServeOptions>,
    pub identity: PeerIdentity,
    /// The address the source reached this service on: the destination listens there too.
    pub local_address: Option<String>,
    /// The QMP sockets this session holds, released when the session ends.
    pub holds: std::sync::Arc<std::sync::Mutex<Vec<super::held::Hold>>>,
}

/// Runs one source's session: handshake, then requests until finished, aborted, or the
/// channel is lost; whatever was prepared and not finished is rolled back.
pub async fn run(
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    handshake: HandshakeSlot,
    opts: &std::sync::Arc<ServeOptions>,
    shutdown: CancellationToken,
) -> Result<(), PeerError> {
    let local_address = tcp.local_addr().map(|a| a.ip().to_string()).ok();
    let remote = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => accepted,
        _ = handshake.cut_short.cancelled() => return Err(PeerError::CutShort),
    };
    let tls = accepted
        .map_err(|_| PeerError::Silent(HANDSHAKE_TIMEOUT))?
        .map_err(|source| PeerError::Tls {
            peer: remote.clone(),
            reason: tls_failure_reason(&source),
            source,
        })?;
    drop(handshake);
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| PeerIdentity::from_der(c.as_ref()));
    let mut channel = Channel::new(tls);
    let Some(identity) = identity.filter(|i| i.allowed_by(&opts.allow_clients)) else {
        let err = PeerError::NotAllowed {
            names: Vec::new(),
            allowed: opts.allow_clients.clone(),
        };
        let _ = channel
            .send(&Message::Error {
                kind: err.kind(),
                message: err.to_string(),
                refusal: true,
            })
            .await;
        return Err(err);
    };
    tracing::info!(%remote, client = %identity.subject(), "source connected");
    let cx = Context {
        opts: opts.clone(),
        identity,
        local_address,
        holds: Default::default(),
    };

    activity::serve(channel, &cx, &shutdown, &remote).await
}
