//! Integration tests against real QEMU 7.2 processes, real TLS and real sockets.
//! One test binary; every QEMU is started through `fixture`.

mod authz_dn;
mod bench;
mod block;
mod cli;
mod convergence;
mod fixture;
mod host;
mod incoming;
mod jobs;
mod libvirt;
mod migration;
mod pki;
mod remote;
mod safety;
mod survival;
