//! Builds the guest workload (`guest/`): a 32-bit multiboot ELF that `src/vm/workload.rs`
//! embeds, so that the benchmarks and tests boot a guest built from this repository's source.
//!
//! It needs a C compiler that can target i386 (`cc -m32`, GCC here) and GNU ld; nothing from a
//! 32-bit libc, since the guest is freestanding. `QTM_GUEST_CC` names another compiler.
//!
//! It also records the git commit the binary is built from (`QTM_GIT_COMMIT` for
//! `--version`): `git rev-parse` of the checkout, or the `QTM_GIT_COMMIT` environment variable
//! when building from a tree without git (a source package), else `unknown`.

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
    git_commit();
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

/// Sets `QTM_GIT_COMMIT` for the crate, and asks to run again when the checkout's HEAD moves.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=QTM_GIT_COMMIT");
    let commit = std::env::var("QTM_GIT_COMMIT").ok().or_else(|| {
        // HEAD, the branch it names and packed-refs: a commit or a checkout changes one of them
        // (in a worktree, HEAD is the worktree's and the refs are the common directory's).
        for file in ["HEAD", "packed-refs"] {
            if let Some(path) = git(&["rev-parse", "--git-path", file]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            if let Some(path) = git(&["rev-parse", "--git-path", &branch]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
        git(&["rev-parse", "--short=12", "HEAD"])
    });
    println!(
        "cargo:rustc-env=QTM_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_string())
    );
}

/// One line of `git ARGS` output, if git runs and succeeds here.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let line = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !line.is_empty()).then_some(line)
}
