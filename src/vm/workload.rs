//! The guest workload: a small multiboot ELF built from `guest/` by `build.rs` and embedded
//! here, booted with `-kernel`, that dirties a chosen working set of RAM at a chosen rate.
//!
//! It runs under TCG and under this machine's nested KVM alike (which cannot boot a stock
//! Linux kernel). What the guest does is documented in `guest/workload.c`; in short:
//! 1. it calibrates the TSC against the PIT;
//! 2. writes a non-zero word into each page of the working set (which starts at 4 MiB of
//!    guest-physical RAM), so none of them is a zero page;
//! 3. then, forever, writes one word per page, pass after pass, paced to the requested pages per
//!    second (0: as fast as it can), halting between timer ticks when ahead;
//! 4. reports on COM1 (the VM's serial log) about every 500 ms: `qtm-workload: pass N pages P
//!    rate R`, and keeps a status block at guest-physical [`STATUS_ADDR`].
//!
//! A working set of 0 MiB is an idle guest: it halts between timer ticks and dirties almost
//! nothing, unlike a SeaBIOS guest without a boot disk.
//!
//! Rates seen on this machine: unpaced, about 15 million pages/s under TCG and 80 thousand
//! under its nested KVM (`kvm_pvm`), which runs this 32-bit guest through its instruction
//! emulator (it cannot emulate a protected-mode `iret`, so the guest returns from interrupts
//! without one). A paced rate up to those is kept within a fraction of a percent.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::KernelConfig;

/// The guest ELF, as built by `build.rs`.
pub const WORKLOAD_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qtm-workload.elf"));

/// Guest-physical address of the status block (see [`WorkloadStatus`]).
pub const STATUS_ADDR: u64 = 0x8000;
/// `"QTMW"`, little-endian, at the start of the status block once the TSC is calibrated.
pub const STATUS_MAGIC: u32 = 0x574D_5451;
/// What each progress line on the serial console starts with.
pub const SERIAL_PREFIX: &str = "qtm-workload: ";

/// What the guest does: dirty `working_set_mib` MiB at `pages_per_sec` pages per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// 0: an idle guest.
    pub working_set_mib: u32,
    /// 0: as fast as the virtual CPU can.
    pub pages_per_sec: u32,
}

impl Workload {
    /// A guest that dirties nothing of note.
    pub const IDLE: Workload = Workload {
        working_set_mib: 0,
        pages_per_sec: 0,
    };

    /// The guest's command line (`-append`).
    pub fn append(&self) -> String {
        format!("wss={} rate={}", self.working_set_mib, self.pages_per_sec)
    }

    /// The kernel configuration for a [`super::VmConfig`], with the ELF written into `dir`
    /// (created if missing) as `qtm-workload.elf`, readable by all (a QEMU started with
    /// `-runas` must read it too).
    pub fn kernel_in(&self, dir: &Path) -> io::Result<KernelConfig> {
        Ok(KernelConfig {
            path: install(dir)?,
            append: self.append(),
        })
    }
}

/// The kernel configuration of a workload guest that dirties `working_set_mib` MiB at
/// `pages_per_sec` pages per second, with the ELF installed once per build in the system's
/// temporary directory.
pub fn workload_kernel(working_set_mib: u32, pages_per_sec: u32) -> io::Result<KernelConfig> {
    let dir = std::env::temp_dir().join(format!("qtm-workload-{:016x}", fnv1a(WORKLOAD_ELF)));
    Workload {
        working_set_mib,
        pages_per_sec,
    }
    .kernel_in(&dir)
}

/// Writes the ELF as `dir/qtm-workload.elf` unless an identical file is there; returns its path.
/// The file is written under a temporary name and renamed, so concurrent callers never see a
/// partial file.
pub fn install(dir: &Path) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("qtm-workload.elf");
    if std::fs::read(&path).is_ok_and(|b| b == WORKLOAD_ELF) {
        return Ok(path);
    }
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::fs::write(tmp.path(), WORKLOAD_ELF)?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    let dir_mode = std::fs::metadata(dir)?.permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(dir_mode | 0o755))?;
    tmp.persist(&path).map_err(|e| e.error)?;
    Ok(path)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One `qtm-workload: pass N pages P rate R` line of the serial console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassLine {
    /// Passes over the working set completed.
    pub passes: u64,
    /// Pages dirtied since the fill.
    pub pages: u64,
    /// Pages per second since the previous line.
    pub rate: u64,
}

/// The progress lines in a serial log, in order; other lines are skipped.
pub fn pass_lines(serial: &str) -> Vec<PassLine> {
    serial
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(SERIAL_PREFIX)?.strip_prefix("pass ")?;
            let mut words = rest.split_whitespace();
            let passes = words.next()?.parse().ok()?;
            let pages = (words.next()? == "pages")
                .then(|| words.next()?.parse().ok())
                .flatten()?;
            let rate = (words.next()? == "rate")
                .then(|| words.next()?.parse().ok())
                .flatten()?;
            Some(PassLine {
                passes,
                pages,
                rate,
            })
        })
        .collect()
}

/// The status block at [`STATUS_ADDR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadStatus {
    /// Completed passes over the working set.
    pub passes: u32,
    /// Pages dirtied since the fill (updated about every 500 ms and at each pass end).
    pub pages: u64,
    pub working_set_pages: u32,
    /// The requested rate (0: unpaced).
    pub pages_per_sec: u32,
    /// TSC frequency the guest measured, in Hz.
    pub tsc_hz: u64,
    /// Whether the initial fill is done.
    pub filled: bool,
}

/// Reads the status block from a guest RAM file (a VM's [`super::Vm::ram_path`]); `None`
/// until the guest has written it.
pub fn read_status(ram_file: &Path) -> io::Result<Option<WorkloadStatus>> {
    let mut file = std::fs::File::open(ram_file)?;
    file.seek(SeekFrom::Start(STATUS_ADDR))?;
    let mut raw = [0u8; 40];
    file.read_exact(&mut raw)?;
    let word =
        |i: usize| u32::from_le_bytes([raw[i * 4], raw[i * 4 + 1], raw[i * 4 + 2], raw[i * 4 + 3]]);
    if word(0) != STATUS_MAGIC {
        return Ok(None);
    }
    Ok(Some(WorkloadStatus {
        passes: word(2),
        pages: u64::from(word(3)) | (u64::from(word(4)) << 32),
        working_set_pages: word(5),
        pages_per_sec: word(6),
        tsc_hz: u64::from(word(7)) * 16,
        filled: word(9) == 1,
    }))
}

/// Waits until the workload in `vm` has filled its working set (or, idle, has started), as
/// its serial console says, checking every 50 ms up to `timeout`. Returns the console's last
/// lines when it does not.
pub async fn wait_ready(vm: &super::Vm, timeout: std::time::Duration) -> Result<(), String> {
    wait_ready_in(vm.serial_path(), timeout)
        .await
        .map_err(|tail| {
            if tail.is_empty() {
                format!("(empty serial console); QEMU: {}", vm.log_tail())
            } else {
                tail
            }
        })
}

/// [`wait_ready`] for a guest whose serial console is the file `serial` (a libvirt domain's);
/// the error is the console's last lines, empty when it is.
pub async fn wait_ready_in(
    serial_path: &std::path::Path,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let ready = [
        format!("{SERIAL_PREFIX}filled"),
        format!("{SERIAL_PREFIX}idle"),
    ];
    loop {
        let serial = std::fs::read_to_string(serial_path).unwrap_or_default();
        if serial
            .lines()
            .any(|l| ready.iter().any(|r| l.starts_with(r.as_str())))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let tail: Vec<&str> = serial.lines().rev().take(3).collect();
            return Err(tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_guest_is_a_32_bit_multiboot_elf() {
        assert_eq!(&WORKLOAD_ELF[..4], b"\x7fELF");
        assert_eq!(
            WORKLOAD_ELF[4], 1,
            "ELFCLASS32: QEMU's multiboot loader refuses 64-bit"
        );
        // The multiboot header: 4-byte aligned, within the first 8 KiB.
        assert!(
            WORKLOAD_ELF[..8192]
                .chunks_exact(4)
                .any(|w| w == 0x1BAD_B002u32.to_le_bytes())
        );
    }

    #[test]
    fn append_carries_working_set_and_rate() {
        let w = Workload {
            working_set_mib: 256,
            pages_per_sec: 20_000,
        };
        assert_eq!(w.append(), "wss=256 rate=20000");
    }

    #[test]
    fn pass_lines_skips_other_lines() {
        let log = "qtm-workload: start wss_mib=64 rate=0 pages=16384 tsc_mhz=2595\n\
                   qtm-workload: pass 2 pages 41217 rate 82326\n\
                   noise\n\
                   qtm-workload: pass 5 pages 82433 rate 82034\n";
        let lines = pass_lines(log);
        assert_eq!(
            lines,
            [
                PassLine {
                    passes: 2,
                    pages: 41217,
                    rate: 82326
                },
                PassLine {
                    passes: 5,
                    pages: 82433,
                    rate: 82034
                },
            ]
        );
    }

    #[test]
    fn install_writes_the_elf_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = install(dir.path()).expect("install");
        let b = install(dir.path()).expect("install again");
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&a).expect("read"), WORKLOAD_ELF);
    }
}
