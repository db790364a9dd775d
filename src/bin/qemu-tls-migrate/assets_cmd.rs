//! Hidden commands that write what a package installs beside the binary, generated from the
//! command-line definitions so that they never drift from `--help`: `man --out DIR` (one man
//! page for the top command and one per subcommand, `qemu-tls-migrate-pki-check.1` style) and
//! `completions SHELL` (a bash or zsh completion script). `scripts/package.sh` runs both.

#![allow(clippy::print_stdout)]

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use clap_complete::Shell;

use crate::outcome::Outcome;

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write the man pages into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for (the package installs bash's and zsh's).
    #[arg(value_enum)]
    pub shell: Shell,
    /// Write the script to this file instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Writes a man page for `cmd` and for each of its visible subcommands, at any depth.
pub fn man(cmd: clap::Command, args: &ManArgs) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let source = format!(
        "{} {}",
        cmd.get_name(),
        cmd.get_version().unwrap_or_default()
    );
    let mut cmd = cmd.disable_help_subcommand(true);
    // Fills in each subcommand's display name (`qemu-tls-migrate-pki-check`), the page's name.
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, &source, &args.out, &mut written)?;
    for path in written {
        println!("{}", path.display());
    }
    Ok(Outcome::Success)
}

fn write_pages(
    cmd: &clap::Command,
    source: &str,
    out: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, source, out, written)?;
    }
    let page = clap_mangen::Man::new(cmd.clone())
        .source(source)
        .manual("qemu-tls-migrate manual");
    let path = page
        .generate_to(out)
        .with_context(|| format!("cannot write a man page into {}", out.display()))?;
    written.push(path);
    Ok(())
}

/// Writes the completion script for `shell` to `--out` or stdout.
pub fn completions(mut cmd: clap::Command, args: &CompletionsArgs) -> anyhow::Result<Outcome> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut script);
    match &args.out {
        Some(path) => std::fs::write(path, &script)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => std::io::stdout()
            .write_all(&script)
            .context("cannot write the completion script to stdout")?,
    }
    Ok(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{CompletionsArgs, ManArgs, Shell};

    #[test]
    fn a_man_page_for_every_visible_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = ManArgs {
            out: dir.path().to_path_buf(),
        };
        super::man(crate::Cli::command(), &args).expect("man");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for page in [
            "qemu-tls-migrate.1",
            "qemu-tls-migrate-migrate.1",
            "qemu-tls-migrate-serve.1",
            "qemu-tls-migrate-pki-check.1",
            "qemu-tls-migrate-host-secure.1",
        ] {
            assert!(names.iter().any(|n| n == page), "{page} in {names:?}");
        }
        assert!(
            !names
                .iter()
                .any(|n| n.contains("-man") || n.contains("completions")),
            "hidden commands get no page: {names:?}"
        );
        let top = std::fs::read_to_string(dir.path().join("qemu-tls-migrate.1")).expect("read");
        assert!(top.contains(env!("CARGO_PKG_VERSION")), "{top}");
    }

    #[test]
    fn completion_scripts_name_the_subcommands() {
        let dir = tempfile::tempdir().expect("tempdir");
        for shell in [Shell::Bash, Shell::Zsh] {
            let out = dir.path().join(format!("{shell:?}"));
            let args = CompletionsArgs {
                shell,
                out: Some(out.clone()),
            };
            super::completions(crate::Cli::command(), &args).expect("completions");
            let script = std::fs::read_to_string(&out).expect("read");
            assert!(
                script.contains("migrate") && script.contains("serve"),
                "{script}"
            );
        }
    }
}
