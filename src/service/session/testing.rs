//! What the session's unit tests share: options, a peer's identity, a session's context.

use super::Context;
use crate::peer::PeerIdentity;
use crate::service::ServeOptions;

/// The service's defaults, with directories that do not exist.
pub fn opts() -> ServeOptions {
    ServeOptions::new("127.0.0.1:0", "/nonexistent".into(), "/nonexistent".into())
}

/// A source that presented `CN=host-b`.
pub fn identity() -> PeerIdentity {
    PeerIdentity {
        dn: Ok("CN=host-b".into()),
        names: vec!["host-b".into()],
        ips: Vec::new(),
    }
}

/// A session's context with [`opts`] and [`identity`].
pub fn context() -> Context {
    Context {
        opts: std::sync::Arc::new(opts()),
        identity: identity(),
        local_address: None,
        holds: Default::default(),
    }
}
