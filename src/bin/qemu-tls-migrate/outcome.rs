//! How a command ended, and the process exit code for it: the one place exit codes are mapped.

use std::process::ExitCode;

use qemu_tls_migrate::migration::{FinalStatus, Report};

/// The end of a command, mapped to a stable exit code (documented in `--help` and README.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0: the command did what it was asked (migration completed, PKI usable, ...).
    Success,
    /// Exit 1: the command ran and failed (migration failed, PKI check found errors).
    Failed,
    /// Exit 3: refused before anything was changed on either side (mixed secured/unsecured
    /// pair, broken PKI, bad destination, a local disk left behind). Exit 2 is clap's, for
    /// command-line usage errors.
    Refused,
    /// Exit 3 too, for `jobs`: no running job has the id asked for.
    NotFound,
    /// Exit 4: cancelled by SIGINT, SIGTERM, SIGHUP or SIGQUIT, with everything rolled back.
    Cancelled,
    /// Exit 5: the migration completed (the guest runs on the destination) but the source could
    /// not be ended as asked (`--destroy-source`): its paused copy is left for the caller.
    SourceNotEnded,
    /// The exit code of the migration's owner process, passed on by `migrate`'s foreground.
    Relayed(u8),
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Outcome::Success => 0,
            Outcome::Failed => 1,
            Outcome::Refused | Outcome::NotFound => 3,
            Outcome::Cancelled => 4,
            Outcome::SourceNotEnded => 5,
            Outcome::Relayed(code) => code,
        })
    }
}

/// The exit outcome for a report.
pub fn outcome_of(report: &Report) -> Outcome {
    match report.status {
        FinalStatus::Completed if report.source_end.as_ref().is_some_and(|e| e.failed()) => {
            Outcome::SourceNotEnded
        }
        FinalStatus::Completed => Outcome::Success,
        FinalStatus::Cancelled => Outcome::Cancelled,
        FinalStatus::Failed if report.refused => Outcome::Refused,
        FinalStatus::Failed => Outcome::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qemu_tls_migrate::migration::{MigrationError, SourceEnd};

    fn completed(source_end: Option<SourceEnd>) -> Report {
        let mut r = Report::refused(MigrationError::Cancelled, std::time::Duration::ZERO);
        r.status = FinalStatus::Completed;
        r.error = None;
        r.refused = false;
        r.source_end = source_end;
        r
    }

    #[test]
    fn a_completed_migration_whose_source_was_not_destroyed_exits_5() {
        let end = |destroyed: bool| SourceEnd {
            domain: "i-2-3-VM".into(),
            destroyed,
            error: (!destroyed).then(|| "read only access".into()),
        };
        assert_eq!(outcome_of(&completed(None)), Outcome::Success);
        assert_eq!(outcome_of(&completed(Some(end(true)))), Outcome::Success);
        let failed = outcome_of(&completed(Some(end(false))));
        assert_eq!(failed, Outcome::SourceNotEnded);
        assert_eq!(failed.exit_code(), ExitCode::from(5));
    }
}
