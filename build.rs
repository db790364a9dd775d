//! Builds the guest workload (`guest/`): a 32-bit multiboot ELF that `src/vm/workload.rs`
//! embeds, so that the benchmarks and tests boot a guest built from this repository's source.
//!
//! It needs a C compiler that can target i386 (`cc -m32`, GCC here) and GNU ld; nothing from a
//! 32-bit libc, since the guest is freestanding. `QTM_GUEST_CC` names another compiler.

#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &["guest/start.S", "guest/workload.c"];
const LINKER_SCRIPT: &str = "guest/link.ld";
const OUTPUT: &str = "qtm-workload.elf";

const CFLAGS: &[&str] = &[
    "-m32",
    "-march=i686",
    "-std=c11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    // Freestanding: no libc, no start files, no position independence, no stack protector
    // (nothing sets one up), no SSE (the guest never enables it), no CET notes.
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-mgeneral-regs-only",
    "-nostdlib",
    "-static",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

fn main() {
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-env-changed=QTM_GUEST_CC");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let out = out_dir.join(OUTPUT);
    let cc = std::env::var("QTM_GUEST_CC").unwrap_or_else(|_| "cc".to_string());

    let mut cmd = Command::new(&cc);
    cmd.args(CFLAGS)
        .arg(format!("-Wl,-T,{LINKER_SCRIPT}"))
        .args(SOURCES)
        .arg("-o")
        .arg(&out);
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run {cc} to build the guest workload in guest/: {e}; install gcc and \
             binutils (scripts/setup.sh), or point QTM_GUEST_CC at an i386-capable C compiler"
        )
    });
    assert!(
        status.success(),
        "building the guest workload with {cc} failed ({status}): {cmd:?}; it needs a compiler \
         that accepts -m32 (GCC with binutils) but no 32-bit libraries"
    );
}
