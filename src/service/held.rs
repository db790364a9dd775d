//! Which QMP sockets the service's sessions hold: the first session to attach to a socket in
//! `--qmp-dir` holds it until the session ends, and another session naming it is refused
//! (`busy`), so no source can drive, or roll back and quit, a QEMU another source prepared.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The sockets held by the sessions of one service.
#[derive(Debug, Clone, Default)]
pub struct HeldSockets(Arc<Mutex<HashSet<PathBuf>>>);

/// One session's hold on a socket, released when dropped.
#[derive(Debug)]
pub struct Hold {
    held: HeldSockets,
    path: PathBuf,
}

impl HeldSockets {
    /// Holds `path` (by its resolved path, when it resolves), or `None` when another session
    /// holds it.
    pub fn hold(&self, path: &Path) -> Option<Hold> {
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(path.clone()).then(|| Hold {
            held: self.clone(),
            path,
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut set = self.held.0.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_socket_is_refused_to_a_second_holder_until_the_first_lets_go() {
        let held = HeldSockets::default();
        let path = Path::new("/nonexistent/vm1.sock");

        let first = held.hold(path);
        let second = held.hold(path);
        let other = held.hold(Path::new("/nonexistent/vm2.sock"));
        let first_held = first.is_some();
        drop(first);
        let after = held.hold(path);

        assert!(first_held);
        assert!(second.is_none());
        assert!(other.is_some());
        assert!(after.is_some());
    }
}
