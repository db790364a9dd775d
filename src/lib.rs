//! qemu-tls-migrate: live migration of QEMU virtual machines over QEMU-native TLS, driven over QMP.
//!
//! Layers, each knowing only the ones below it:
//! - [`service`]: the destination host's service (`serve`), one session state machine per
//!   source.
//! - [`migration`]: the plan (preflight, prepare destination, migrate RAM, switchover, finish)
//!   with an undo stack that rolls back whatever was done.
//! - [`libvirt`]: libvirt domains as endpoints: lookup, state, XML, declared QMP monitor,
//!   create-paused / resume / destroy.
//! - [`jobs`]: running migrations as jobs: a control socket each, listed and controlled by
//!   other processes.
//! - [`peer`]: the mutual-TLS control channel between a source and a destination host.
//! - [`pki`]: load, validate and create PKI directories; decides whether a side is *secured*.
//! - [`bench`]: benchmark harness (TLS against TCP, interleaved, with reports).
//! - [`host`]: secured-host state, CloudStack certificate layout, qemu.conf/libvirtd.conf, firewall.
//! - [`addr`]: `HOST[:PORT]`, parsed once for every address the tool takes.
//! - [`ports`]: migration and NBD port allocation, safe across concurrent migrations on one host.
//! - [`vm_lock`]: one migration at a time per VM, across processes.
//! - [`vm`]: launching local QEMU processes (demo, benchmarks, tests).
//! - [`qemu`]: typed QMP commands and replies, tolerant of QEMU 7.2.
//! - [`qmp`]: the asynchronous QMP protocol client; knows nothing of QEMU's command names.

pub mod addr;
pub mod bench;
pub mod host;
pub mod jobs;
pub mod libvirt;
pub mod migration;
pub mod peer;
pub mod pki;
pub mod ports;
mod private_dir;
pub mod qemu;
pub mod qmp;
pub mod service;
pub mod vm;
pub mod vm_lock;

/// The QEMU versions this release was tested with, listed by `--version`: Debian 12's QEMU and
/// the one in bookworm-backports (they migrate both ways with a 7.2 machine type). The one
/// place to change when the tested versions change.
pub const TESTED_QEMU_VERSIONS: &[&str] = &["7.2", "10.0"];
