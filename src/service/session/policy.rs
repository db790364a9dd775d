//! The service's own rules for what a source may ask: the plan it applies whatever the source
//! sent, and the only socket names a source can use.

use std::path::{Path, PathBuf};

use crate::migration::MigrationError;
use crate::peer::{Authz, DestPlan, PeerIdentity};
use crate::pki::Security;
use crate::service::ServeOptions;

/// Resolves a socket name a peer sent to a path inside `dir`; nothing else can be named.
pub fn qmp_path(dir: &Path, name: &str) -> Result<PathBuf, MigrationError> {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0');
    if !plain {
        return Err(MigrationError::BadRequest {
            desc: format!("{name:?} is not a file name in the service's QMP directory"),
        });
    }
    Ok(dir.join(name))
}

/// The service's policy applied to a source's plan: what this host accepts, whatever the
/// source asked for.
pub fn apply_policy(
    mut plan: DestPlan,
    opts: &ServeOptions,
    security: &Security,
    identity: &PeerIdentity,
    local_address: Option<&str>,
) -> Result<DestPlan, MigrationError> {
    match security {
        // A broken secured host takes no migration at all, whatever the source concluded.
        Security::Broken { problems } => {
            return Err(MigrationError::PkiBroken {
                side: crate::migration::Side::Destination,
                dir: opts.pki_dir.clone(),
                problems: problems.clone(),
            });
        }
        Security::Unsecured { reason } if plan.tls => {
            return Err(MigrationError::Unsecured {
                side: crate::migration::Side::Destination,
                dir: opts.pki_dir.clone(),
                reason: reason.clone(),
            });
        }
        _ => {}
    }
    if !plan.tls {
        if !opts.allow_plain {
            return Err(MigrationError::PlainRefused);
        }
        tracing::warn!(client = %identity.subject(), "plain TCP migration allowed by --allow-plain: RAM and disks cross the network unencrypted");
    }
    // The destination's cipher floor is this host's choice, not the peer's.
    if plan.tls_priority.is_some() && plan.tls_priority != opts.tls_priority {
        tracing::info!(asked = ?plan.tls_priority, applied = ?opts.tls_priority, "ignoring the source's TLS priority");
    }
    plan.tls_priority = opts.tls_priority.clone();
    // Post-copy is offered only to a destination the source's own process drives.
    plan.postcopy = false;
    if let Some(addr) = local_address {
        plan.listen_address = addr.to_string();
    }
    plan.port_range = opts.port_range;
    // Whoever the source asks to authorise, only its own certificate can be; and when this
    // service restricts its clients, the migration stream and NBD are restricted too.
    plan.authz = match plan.authz {
        Authz::Off if opts.allow_clients.is_empty() => Authz::Off,
        _ if !plan.tls => Authz::Off,
        _ => Authz::Identity(
            identity
                .dn
                .clone()
                .map_err(|e| MigrationError::AuthzSubject {
                    desc: e.to_string(),
                })?,
        ),
    };
    Ok(plan)
}
#[cfg(test)]
mod tests {
    use super::super::testing::{identity, opts, plan};
    use super::*;

    #[test]
    fn a_plain_plan_is_refused_unless_the_service_allows_plain() {
        let err = apply_policy(plan(false), &opts(), &Security::Secured, &identity(), None)
            .expect_err("refused");
        assert_eq!(err.kind(), "plain-refused");
        let mut allow = opts();
        allow.allow_plain = true;
        assert!(apply_policy(plan(false), &allow, &Security::Secured, &identity(), None).is_ok());
    }

    #[test]
    fn the_service_not_the_peer_chooses_priority_address_ports_and_authz() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let applied = apply_policy(
            plan(true),
            &o,
            &Security::Secured,
            &identity(),
            Some("198.18.0.1"),
        )
        .expect("ok");
        assert_eq!(applied.tls_priority, None);
        assert_eq!(applied.listen_address, "198.18.0.1");
        assert_eq!(applied.port_range, o.port_range);
        assert_eq!(applied.authz, Authz::Identity("CN=host-b".into()));
    }

    #[test]
    fn a_restricted_service_sets_authz_even_when_the_source_did_not_ask() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let mut p = plan(true);
        p.authz = Authz::Off;
        let applied =
            apply_policy(p.clone(), &o, &Security::Secured, &identity(), None).expect("ok");
        assert_eq!(applied.authz, Authz::Identity("CN=host-b".into()));
        let open = apply_policy(p, &opts(), &Security::Secured, &identity(), None).expect("ok");
        assert_eq!(open.authz, Authz::Off);
    }

    #[test]
    fn a_subject_qemus_authz_cannot_match_is_refused_before_anything_changes() {
        let mut o = opts();
        o.allow_clients = vec!["host-b".into()];
        let mut unmatchable = identity();
        unmatchable.dn = Err(crate::pki::DnError::Empty);

        let err = apply_policy(plan(true), &o, &Security::Secured, &unmatchable, None)
            .expect_err("refused");

        assert_eq!(err.kind(), "not-allowed");
        assert!(err.to_string().contains("tls-authz"), "{err}");
    }

    #[test]
    fn a_broken_service_host_takes_no_migration_and_an_unsecured_one_no_tls() {
        let broken = Security::Broken {
            problems: vec!["server-key.pem: readable by all".into()],
        };
        let err = apply_policy(plan(true), &opts(), &broken, &identity(), None).expect_err("no");
        assert_eq!(err.kind(), "pki-broken");
        let unsecured = Security::Unsecured {
            reason: "no TLS files".into(),
        };
        let err = apply_policy(plan(true), &opts(), &unsecured, &identity(), None).expect_err("no");
        assert_eq!(err.kind(), "unsecured");
    }

    #[test]
    fn only_plain_file_names_in_the_qmp_directory_can_be_named() {
        let dir = Path::new("/run/qtm");
        assert_eq!(qmp_path(dir, "vm1.sock").expect("ok"), dir.join("vm1.sock"));
        for bad in ["", ".", "..", "../etc/x", "a/b", "a\0b"] {
            assert!(qmp_path(dir, bad).is_err(), "{bad:?}");
        }
    }
}
