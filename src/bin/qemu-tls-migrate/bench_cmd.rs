//! `qemu-tls-migrate bench`: TLS against the TCP baseline, side by side. (Stub: being written.)

use clap::Args;

use crate::outcome::Outcome;

#[derive(Debug, Args)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs, _quiet: bool) -> anyhow::Result<Outcome> {
    anyhow::bail!("bench is not written yet")
}
