//! Post-copy, an explicit opt-in: which QEMUs it is offered on, the TLS setting that keeps it
//! clear of QEMU issue #1937, and the recovery of a post-copy whose link was cut.
//!
//! Once post-copy starts, the guest runs on the destination while the pages it has not yet
//! received are only on the source. A cut link then pauses the migration on both ends
//! (`postcopy-paused`) instead of losing it: the destination listens again
//! (`migrate-recover`) and the source reconnects (`migrate` with `resume: true`), over TLS with
//! the same credentials, and the rest of the memory follows. Only a lost host (or a link that
//! stays down past the recovery deadline) loses the VM; the source is never resumed after
//! post-copy started.
//!
//! QEMU issue #1937 (<https://gitlab.com/qemu-project/qemu/-/issues/1937>) is GnuTLS issue
//! #1717: TLS 1.3 rekeys itself after 16 million records (about 64 GB) for every cipher but
//! ChaCha20-Poly1305, and that rekey corrupts a session whose two directions run in two
//! threads at once, as post-copy's return path does. QEMU's workaround, commits 24ad5e19
//! ("crypto: implement workaround for GNUTLS thread safety problems"), edea8183 and eb3618e9
//! (v10.1.0-rc0), was found not to work and its build option was removed before 10.1.0
//! ("meson: remove 'gnutls-bug1717-workaround' for migration TLS crashes"), so no QEMU release
//! fixes it: the fix is in GnuTLS itself, and QEMU 10.0 here links Debian 12's GnuTLS 3.7.9.
//! This tool therefore keeps post-copy's TLS at version 1.2 ([`tls_priority`]), which has no
//! automatic rekey (the case QEMU's own workaround leaves unlocked), on the source's
//! credentials: the client's highest version bounds what the handshake agrees.
//!
//! What decides the QEMU versions is recovery: from QEMU 9.1 a failed `migrate resume=true`
//! (the link still down) goes back to `postcopy-paused` through `postcopy-recover-setup`, so
//! it can be tried again until the link is back. 7.2 has neither that state nor the TLS fix.

use std::time::Duration;

use crate::qmp::QemuVersion;

/// The first QEMU series post-copy is offered on, on both ends ([`check_versions`]).
pub const FIRST_QEMU: (u32, u32) = (9, 1);

/// How long a cut post-copy is retried (`--postcopy-recover-timeout`) when the caller sets
/// nothing: long enough for a link flap or a switch reboot, short of leaving a paused guest
/// for good.
pub const DEFAULT_RECOVER_TIMEOUT: Duration = Duration::from_secs(300);

/// The pause between two recovery attempts.
pub const RECOVER_RETRY: Duration = Duration::from_millis(500);

/// What `--help` and the report say about the risk that stays.
pub const RISK: &str = "with post-copy, the guest runs on the destination while part of its \
memory is still on the source: a cut link pauses the guest on both ends and the tool retries \
the recovery (migrate-recover, migrate resume=true) until --postcopy-recover-timeout, but a \
lost host (either one) loses the VM";

/// The refusal, naming the reasons, for a pair outside [`FIRST_QEMU`].
fn refusal(which: &str, v: QemuVersion) -> String {
    let (major, minor) = FIRST_QEMU;
    format!(
        "post-copy is refused: {which} runs QEMU {v}, and post-copy needs QEMU {major}.{minor} \
         or later on both ends (a cut link is recovered by retrying migrate-recover and \
         migrate resume=true until the link is back, which needs the postcopy-recover-setup \
         state of {major}.{minor}); and QEMU {v} is affected by QEMU issue #1937 (GnuTLS can \
         crash QEMU after about 64 GB over a TLS channel with a return path, which post-copy \
         needs; no QEMU release fixes it: 10.1.0's workaround, commit 24ad5e19, ships \
         disabled, so this tool keeps post-copy's TLS at 1.2). Use --auto-converge, or \
         --timeout-action pause, which finish a busy guest without post-copy"
    )
}

/// Refuses post-copy unless both QEMUs are [`FIRST_QEMU`] or later.
pub fn check_versions(source: QemuVersion, destination: QemuVersion) -> Result<(), String> {
    let ok = |v: QemuVersion| (v.major, v.minor) >= FIRST_QEMU;
    if !ok(source) {
        return Err(refusal("the source", source));
    }
    if !ok(destination) {
        return Err(refusal("the destination", destination));
    }
    Ok(())
}

/// The GnuTLS priority for the source's credentials when post-copy may start: the caller's
/// (or GnuTLS's `NORMAL`) without TLS 1.3, whose automatic rekey is issue #1937.
pub fn tls_priority(asked: Option<&str>) -> String {
    format!("{}:-VERS-TLS1.3", asked.unwrap_or("NORMAL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_copy_is_refused_on_7_2_at_either_end_naming_the_issue_and_the_version() {
        let (old, new) = (QemuVersion::new(7, 2, 22), QemuVersion::new(10, 0, 2));
        let err = check_versions(old, new).expect_err("refused");
        assert!(
            err.contains("post-copy is refused") && err.contains("#1937") && err.contains("9.1"),
            "{err}"
        );
        assert!(err.contains("the source runs QEMU 7.2.22"), "{err}");
        let err = check_versions(new, old).expect_err("refused");
        assert!(err.contains("the destination runs QEMU 7.2.22"), "{err}");
        check_versions(new, new).expect("10.0 both ends");
        check_versions(QemuVersion::new(9, 1, 0), new).expect("9.1");
    }

    #[test]
    fn post_copy_tls_leaves_out_tls_1_3() {
        assert_eq!(tls_priority(None), "NORMAL:-VERS-TLS1.3");
        assert_eq!(tls_priority(Some("SECURE256")), "SECURE256:-VERS-TLS1.3");
    }
}
