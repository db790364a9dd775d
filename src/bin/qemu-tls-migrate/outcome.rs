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
            Outcome::Relayed(code) => code,
        })
    }
}

/// The exit outcome for a report.
pub fn outcome_of(report: &Report) -> Outcome {
    match report.status {
        FinalStatus::Completed => Outcome::Success,
        FinalStatus::Cancelled => Outcome::Cancelled,
        FinalStatus::Failed if report.refused => Outcome::Refused,
        FinalStatus::Failed => Outcome::Failed,
    }
}
