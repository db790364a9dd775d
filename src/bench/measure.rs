//! What the harness reads from the host: CPU time of QEMU processes (from `/proc`), the
//! machine it runs on, and the git revision of the tree it was built from.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` times: `USER_HZ`, 100 on every Linux ABI this
/// tool runs on (x86-64, arm64).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of a process, and of its vCPU threads among them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    /// The whole process, exited threads included (the kernel folds them into the process).
    pub process: f64,
    /// The vCPU threads (running guest code, under TCG also translating it).
    pub vcpus: f64,
}

impl CpuTimes {
    /// Reads `/proc/PID/stat` and `/proc/PID/task/TID/stat` for each vCPU thread.
    pub fn read(pid: u32, vcpu_threads: &[u32]) -> std::io::Result<CpuTimes> {
        let process = stat_cpu_seconds(&Path::new("/proc").join(pid.to_string()).join("stat"))?;
        let mut vcpus = 0.0;
        for tid in vcpu_threads {
            let path = Path::new("/proc")
                .join(pid.to_string())
                .join("task")
                .join(tid.to_string())
                .join("stat");
            vcpus += stat_cpu_seconds(&path)?;
        }
        Ok(CpuTimes { process, vcpus })
    }

    /// CPU seconds spent between `before` and `self` outside the vCPU threads: the cost of
    /// migrating (the migration thread, multifd and TLS threads, the main loop).
    pub fn non_vcpu_since(&self, before: &CpuTimes) -> f64 {
        ((self.process - self.vcpus) - (before.process - before.vcpus)).max(0.0)
    }

    /// CPU seconds of the whole process between `before` and `self`.
    pub fn process_since(&self, before: &CpuTimes) -> f64 {
        (self.process - before.process).max(0.0)
    }
}

/// Busy CPU seconds of the whole machine since boot (`/proc/stat`'s `cpu` line: user, nice,
/// system, irq, softirq, steal; idle and iowait left out).
pub fn host_busy_seconds() -> std::io::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    parse_host_busy(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected format of /proc/stat",
        )
    })
}

fn parse_host_busy(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| f.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    Some(busy as f64 / USER_HZ)
}

/// utime + stime of a `stat` file, in seconds. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn stat_cpu_seconds(path: &Path) -> std::io::Result<f64> {
    let text = std::fs::read_to_string(path)?;
    parse_stat_cpu_seconds(&text).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected format of {}", path.display()),
        )
    })
}

fn parse_stat_cpu_seconds(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state (field 3) is index 0, so utime (14) is 11 and stime (15) is 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// The machine a benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_mib: u64,
    /// The KVM modules present (`kvm_intel`, `kvm_amd`, `kvm_pvm` for a PVM nested set-up, ...).
    pub kvm_modules: Vec<String>,
}

impl HostInfo {
    pub fn probe() -> HostInfo {
        let uname = nix::sys::utsname::uname().ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb / 1024)
            .unwrap_or(0);
        // /sys/module lists built-in modules too, unlike /proc/modules.
        let mut kvm_modules: Vec<String> = std::fs::read_dir("/sys/module")
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|m| m.starts_with("kvm"))
                    .collect()
            })
            .unwrap_or_default();
        kvm_modules.sort();
        HostInfo {
            hostname: uname
                .as_ref()
                .map(|u| u.nodename().to_string_lossy().into_owned())
                .unwrap_or_default(),
            kernel: uname
                .as_ref()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_mib,
            kvm_modules,
        }
    }
}

/// The git revision of the source tree this binary was built from (`-dirty` with local
/// changes), or the crate version when that tree is not a git checkout.
pub fn git_revision() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(rev) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{rev}-dirty") } else { rev }
        }
        None => format!("v{}", env!("CARGO_PKG_VERSION")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busy_time_leaves_idle_and_iowait_out() {
        let stat = "cpu  100 20 30 5000 40 1 2 3 0 0\ncpu0 50 10 15 2500 20 0 1 1 0 0\n";

        assert_eq!(parse_host_busy(stat), Some(1.56));
        assert_eq!(parse_host_busy("intr 1 2 3"), None);
    }

    #[test]
    fn stat_times_are_read_after_a_command_name_with_spaces() {
        let line = "4242 (CPU 0/KVM) S 1 4242 4242 0 -1 4194624 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_seconds(line), Some(3.0));
    }

    #[test]
    fn the_own_process_has_cpu_times() {
        let t = CpuTimes::read(std::process::id(), &[]).expect("own stat");
        assert!(t.process >= 0.0 && t.vcpus == 0.0);
    }
}
