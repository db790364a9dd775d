//! The `qemu-tls-migrate` command: parses the command line, sets up logging, runs one command
//! and maps its outcome to the exit code. Everything else lives in the library.

#![allow(clippy::print_stderr)]

mod assets_cmd;
mod bench_cmd;
mod demo;
mod host_cmd;
mod jobs_cmd;
mod migrate_cmd;
mod outcome;
mod output;
mod owner;
mod parse;
mod pki_cmd;
mod recover_cmd;
mod running;
mod serve_cmd;
mod signals;
mod tuning;

use std::process::ExitCode;
use std::sync::LazyLock;

use clap::{ArgAction, CommandFactory, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use outcome::Outcome;

#[derive(Debug, Parser)]
#[command(
    name = "qemu-tls-migrate",
    version = VERSION.as_str(),
    about = "Live-migrate QEMU VMs over QEMU-native TLS, driving QMP directly",
    long_about = "Live-migrate QEMU/KVM virtual machines between hosts over QEMU-native TLS, \
talking QMP to the source and destination QEMU processes (no libvirt tunnel).\n\n\
Start with `qemu-tls-migrate demo` to see a whole TLS migration on this machine; use \
`pki check` to see whether a host's certificates are usable, and `migrate` for real work.",
    after_help = "Every command takes --json for machine-readable output (one JSON object on \
stdout; progress, where there is any, as JSON lines on stderr).\n\
Exit codes: 0 success, 1 failed, 2 bad command line, 3 refused before changing anything, \
4 cancelled, 5 migration completed but --destroy-source failed (`jobs`: 3 no such job)."
)]
struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, with QMP traffic).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// No logs and no progress on stderr: only the result (with --json, exactly one JSON
    /// object on stdout and nothing else on either stream, for callers that merge the two).
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    // `about` rather than doc comments: a variant's doc comment would replace the long help
    // its Args define (clap resets long_about to the comment).
    #[command(about = "Migrate a running VM to a QEMU waiting with -incoming defer.")]
    Migrate(Box<migrate_cmd::MigrateArgs>),
    #[command(
        about = "Show a complete TLS migration between two local VMs, with nothing to prepare."
    )]
    Demo(Box<demo::DemoArgs>),
    #[command(
        about = "Benchmark native TLS against the plain TCP baseline, interleaved in one run."
    )]
    Bench(Box<bench_cmd::BenchArgs>),
    #[command(
        about = "List the migrations running on this host; cancel one, change its bandwidth or downtime limit, or pause its guest."
    )]
    Jobs(jobs_cmd::JobsArgs),
    #[command(
        about = "Put back a VM an interrupted migration left (from its journal), or say its state."
    )]
    Recover(recover_cmd::RecoverArgs),
    #[command(about = "Serve migrations into this host (the destination side of `migrate --to`).")]
    Serve(Box<serve_cmd::ServeArgs>),
    /// Check or create PKI directories (QEMU's tls-creds-x509 layout).
    #[command(subcommand)]
    Pki(pki_cmd::PkiCommand),
    /// Secure this host (CloudStack layout, qemu.conf, libvirtd.conf, firewall) or report it.
    #[command(subcommand)]
    Host(host_cmd::HostCommand),
    /// Write man pages for every command into a directory (for packaging).
    #[command(hide = true)]
    Man(assets_cmd::ManArgs),
    /// Print a shell completion script (for packaging).
    #[command(hide = true)]
    Completions(assets_cmd::CompletionsArgs),
}

/// What `--version` says: the version, the commit it was built from (`build.rs`), and the QEMU
/// versions it was tested with.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} (commit {}; tested with QEMU {})",
        env!("CARGO_PKG_VERSION"),
        env!("QTM_GIT_COMMIT"),
        qemu_tls_migrate::TESTED_QEMU_VERSIONS.join(", ")
    )
});

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet);
    if owner::is_owner() {
        owner::start_owner();
    }
    match run(cli) {
        Ok(outcome) => outcome.exit_code(),
        Err(err) => {
            let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            Outcome::Failed.exit_code()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let quiet = cli.quiet;
    match cli.command {
        // The migration runs in an owner process the caller's kill does not reach.
        Command::Migrate(args) if !args.plan && !owner::is_owner() => owner::run_foreground(),
        Command::Migrate(args) => runtime()?.block_on(migrate_cmd::run(*args, quiet)),
        Command::Recover(args) => runtime()?.block_on(recover_cmd::run(args)),
        Command::Demo(args) => runtime()?.block_on(demo::run(*args, quiet)),
        Command::Bench(args) => runtime()?.block_on(bench_cmd::run(*args, quiet)),
        Command::Serve(args) => runtime()?.block_on(serve_cmd::run(*args)),
        Command::Jobs(args) => runtime()?.block_on(jobs_cmd::run(args)),
        Command::Pki(cmd) => pki_cmd::run(cmd),
        Command::Host(cmd) => host_cmd::run(cmd),
        Command::Man(args) => assets_cmd::man(Cli::command(), &args),
        Command::Completions(args) => assets_cmd::completions(Cli::command(), &args),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Logs go to stderr: warnings by default, `-v` info, `-vv` debug, none with `-q` (the result
/// says what went wrong); `RUST_LOG` overrides.
fn init_logging(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "off",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("qemu_tls_migrate={level},{level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn version_names_the_commit_and_the_tested_qemus() {
        let version = Cli::command().render_version();
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        assert!(version.contains("commit "), "{version}");
        for qemu in qemu_tls_migrate::TESTED_QEMU_VERSIONS {
            assert!(version.contains(qemu), "{version}");
        }
    }

    #[test]
    fn each_command_shows_its_own_long_help() {
        let mut cli = Cli::command();
        for (name, words) in [
            ("migrate", "Per migration the tool creates tls-creds-x509"),
            ("serve", "SIGTERM"),
            (
                "jobs",
                "List the migrations running on this host, and control one",
            ),
        ] {
            let sub = cli.find_subcommand_mut(name).expect("subcommand");
            let help = sub.render_long_help().to_string();
            assert!(help.contains(words), "{name} --help: {help}");
        }
    }
}
