//! Integration tests against real QEMU processes (7.2; all but the cross-version tests again on
//! 10.0 in scripts/test.sh's second pass, libvirt's domains included), real TLS and real sockets.
//! One test binary; every QEMU is started through `fixture`.

mod authz_dn;
mod bench;
mod block;
mod cli;
mod cloudstack;
mod convergence;
mod cross_version;
mod fixture;
mod host;
mod incoming;
mod jobs;
mod libvirt;
mod libvirt_survival;
mod migration;
mod pki;
mod postcopy;
mod remote;
mod safety;
mod survival;
