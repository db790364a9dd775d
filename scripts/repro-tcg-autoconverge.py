#!/usr/bin/env python3
"""Does QEMU's auto-converge under TCG lose guest writes? A reproducer without this project's code.

Issue 22, part 4. The tool refused --auto-converge for guests without KVM after its test saw
one page (the workload guest's stack and tick counter, guest-physical 0x105000) differ between
source and destination after every auto-converge migration under TCG. This script repeats
that migration with raw QMP only, so anyone can tell a QEMU bug from an artefact of how the
pages were compared:

- two QEMUs (-accel tcg), the same machine as the project's fixture (q35, RAM in a shared
  memory-backend-file unless --no-backend), the guest the project builds (guest/, a multiboot
  ELF: `--elf`, default the newest target/debug/build/*/out/qtm-workload.elf) dirtying 64 MiB at
  20000 pages/s;
- optionally (--scribble) 64 MiB of pseudo-random bytes written into the source's RAM file from
  outside the guest at 1 MiB, right after start, as the project's fixture did to every pair;
- the source: capabilities `events` and `auto-converge` (unless --no-auto-converge),
  `cpu-throttle-initial` 60 and `cpu-throttle-increment` 20 and `max-bandwidth` 16 MiB/s (the
  tool's test's settings), migrate over plain TCP on loopback to a destination started with
  `-incoming defer -S`;
- when it completed: both RAMs saved with `pmemsave` (and the RAM files read, with a backend)
  and compared page by page, at the moment --compare says:
    settled      the source in `postmigrate` and the destination done loading and paused (the
                 only comparison that means anything);
    at-complete  the RAM files read as soon as the source's query-migrate says `completed`,
                 before asking either side anything else;
    dest-ran     settled, then the destination runs for --run-ms (cont, stop) first;
    src-ran      settled, then the source runs for --run-ms (cont, stop) first.
- --stop-source-after S: `stop` the source S seconds into the migration (the tool's
  --timeout-action pause), a control that needs no auto-converge.

What it showed (2026-12, README "When a VM will not converge"): QEMU 7.2.22 loses the
guest's stack and tick page (0x105000) in every settled comparison, with auto-converge and
without (--no-auto-converge --rate 2000, or --stop-source-after 10): TCG marks a page dirty
only when its TLB entry is refilled, and this guest (paging off) never flushes its TLB. 10.0.2
loses nothing. Not an artefact: the artefacts (--compare dest-ran, src-ran) look different,
hundreds of working-set pages.

Prints one line per run: the QEMU version, the mode, the throttle reached, the time, and the
differing pages (guest-physical addresses). Exit status 1 when a `settled` comparison found a
difference, else 0.

Example: scripts/repro-tcg-autoconverge.py --runs 3
         scripts/repro-tcg-autoconverge.py --qemu .qemu/10.0/bin/qemu-system-x86_64 --runs 3
"""

import argparse
import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

PAGE = 4096
MIB = 1 << 20


class Qmp:
    """One QMP connection: commands in order, events kept aside."""

    def __init__(self, path, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events = []
        self.greeting = self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            return reply["return"]

    def status(self):
        return self.cmd("query-status")["status"]


class Vm:
    def __init__(self, qemu, dirpath, name, args):
        self.name = name
        self.dir = dirpath
        self.ram = os.path.join(dirpath, f"{name}.ram")
        self.serial = os.path.join(dirpath, f"{name}.serial")
        qmp = os.path.join(dirpath, f"{name}.qmp")
        a = list(args) + [
            "-name", name,
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{qmp},server=on,wait=off",
        ]
        a = [x.replace("@RAM@", self.ram) for x in a]
        self.log = open(os.path.join(dirpath, f"{name}.log"), "w")
        self.proc = subprocess.Popen([qemu] + a, stdout=self.log, stderr=subprocess.STDOUT)
        self.qmp = Qmp(qmp)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def pmemsave(self, size, path):
        self.qmp.cmd("pmemsave", val=0, size=size, filename=path)
        with open(path, "rb") as f:
            return f.read()

    def ram_file(self):
        with open(self.ram, "rb") as f:
            return f.read()


def differing_pages(a, b):
    return [p * PAGE for p in range(min(len(a), len(b)) // PAGE)
            if a[p * PAGE:(p + 1) * PAGE] != b[p * PAGE:(p + 1) * PAGE]]


def show_pages(pages):
    head = ", ".join(f"0x{p:x}" for p in pages[:12])
    more = f", ... ({len(pages) - 12} more)" if len(pages) > 12 else ""
    return f"{len(pages)} [{head}{more}]"


def wait_for(what, pred, timeout, step=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(step)


def serial_passes(path):
    """The highest `qtm-workload: pass N` seen on the serial log."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return 0
    best = 0
    for line in text.splitlines():
        if line.startswith("qtm-workload: pass "):
            try:
                best = max(best, int(line.split()[2]))
            except (IndexError, ValueError):
                pass
    return best


def scribble(path, offset, length, seed):
    """Pseudo-random bytes into the RAM file, from outside the guest (the fixture's fill)."""
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        f.seek(offset)
        left = length
        while left:
            n = min(left, MIB)
            f.write(rng.randbytes(n))
            left -= n


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def one_run(opts, run):
    d = tempfile.mkdtemp(prefix="repro-tcg-ac-")
    ram = opts.ram_mib * MIB
    common = ["-nodefaults", "-no-user-config", "-display", "none", "-accel", opts.accel,
              "-m", f"{opts.ram_mib}M"]
    if opts.backend:
        common += ["-machine", f"{opts.machine},memory-backend=ram0", "-object",
                   f"memory-backend-file,id=ram0,size={opts.ram_mib}M,mem-path=@RAM@,share=on"]
    else:
        common += ["-machine", opts.machine]
    common += ["-kernel", opts.elf, "-append", f"wss={opts.wss} rate={opts.rate}"]
    for dirpath in opts.firmware:
        common += ["-L", dirpath]
    src = dst = None
    try:
        src = Vm(opts.qemu, d, "src", common)
        dst = Vm(opts.qemu, d, "dst", common + ["-incoming", "defer", "-S"])
        version = src.qmp.greeting["QMP"]["version"]["qemu"]
        version = f"{version['major']}.{version['minor']}.{version['micro']}"
        if opts.scribble:
            scribble(src.ram, MIB, ram // 2, 42 + run)
        wait_for("a workload pass", lambda: serial_passes(src.serial) > 0, 60)

        caps = [{"capability": "events", "state": True}]
        if opts.auto_converge:
            caps.append({"capability": "auto-converge", "state": True})
        src.qmp.cmd("migrate-set-capabilities", capabilities=caps)
        params = {"max-bandwidth": opts.max_bandwidth}
        if opts.auto_converge:
            params.update({"cpu-throttle-initial": opts.throttle_initial,
                           "cpu-throttle-increment": opts.throttle_increment})
        src.qmp.cmd("migrate-set-parameters", **params)
        dst.qmp.cmd("migrate-set-capabilities",
                    capabilities=[{"capability": "events", "state": True}])
        port = free_port()
        dst.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        started = time.monotonic()
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

        throttle = 0
        stopped_source = False
        at_complete = None
        while True:
            info = src.qmp.cmd("query-migrate")
            st = info.get("status")
            throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
            if st == "completed":
                if opts.compare == "at-complete" and opts.backend:
                    # Nothing else asked first: the RAM files as they are this instant.
                    at_complete = differing_pages(src.ram_file(), dst.ram_file())
                break
            if st in ("failed", "cancelled"):
                raise RuntimeError(f"migration {st}: {info.get('error-desc')}")
            elapsed = time.monotonic() - started
            if elapsed > opts.timeout:
                src.qmp.cmd("migrate_cancel")
                raise TimeoutError(f"not completed in {opts.timeout} s ({info.get('ram')})")
            if opts.stop_source_after and not stopped_source and elapsed > opts.stop_source_after:
                src.qmp.cmd("stop")
                stopped_source = True
            time.sleep(0.1)
        secs = time.monotonic() - started
        passes = info.get("ram", {}).get("dirty-sync-count", 0)

        src_status = wait_for("source postmigrate", lambda: src.qmp.status() == "postmigrate"
                              and "postmigrate", 60)
        dst_status = wait_for("destination loaded",
                              lambda: (lambda s: s if s != "inmigrate" else None)(dst.qmp.status()),
                              120)
        if opts.compare == "dest-ran":
            dst.qmp.cmd("cont")
            time.sleep(opts.run_ms / 1000)
            dst.qmp.cmd("stop")
        elif opts.compare == "src-ran":
            src.qmp.cmd("cont")
            time.sleep(opts.run_ms / 1000)
            src.qmp.cmd("stop")
        src_mem = src.pmemsave(ram, os.path.join(d, "src.pmem"))
        dst_mem = dst.pmemsave(ram, os.path.join(d, "dst.pmem"))
        pmem = differing_pages(src_mem, dst_mem)
        files = differing_pages(src.ram_file(), dst.ram_file()) if opts.backend else None
        line = (f"run {run}: QEMU {version} accel={opts.accel} "
                f"auto-converge={'on' if opts.auto_converge else 'off'} "
                f"backend={'file' if opts.backend else 'none'} scribble={opts.scribble} "
                f"compare={opts.compare} stop-source-after={opts.stop_source_after} | "
                f"completed in {secs:.1f} s, {passes} syncs, throttle {throttle}% | "
                f"source {src_status}, destination {dst_status} | "
                f"pmemsave differs: {show_pages(pmem)}")
        if files is not None:
            line += f" | RAM files differ: {show_pages(files)}"
        if at_complete is not None:
            line += f" | RAM files at 'completed' differed: {show_pages(at_complete)}"
        print(line, flush=True)
        return pmem, files
    finally:
        for vm in (src, dst):
            if vm:
                vm.kill()
        if opts.keep:
            print(f"  kept {d}", flush=True)
        else:
            shutil.rmtree(d, ignore_errors=True)


def default_elf():
    here = os.path.dirname(os.path.abspath(__file__))
    found = glob.glob(os.path.join(here, "..", "target", "*", "build", "*", "out",
                                   "qtm-workload.elf"))
    return max(found, key=os.path.getmtime) if found else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("-L", dest="firmware", action="append", default=[],
                   help="firmware directory for QEMU (repeatable)")
    p.add_argument("--elf", default=default_elf(), help="the workload guest (cargo build)")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--machine", default="q35")
    p.add_argument("--ram-mib", type=int, default=128)
    p.add_argument("--wss", type=int, default=64, help="guest working set, MiB")
    p.add_argument("--rate", type=int, default=20000, help="guest pages dirtied per second")
    p.add_argument("--no-auto-converge", dest="auto_converge", action="store_false")
    p.add_argument("--throttle-initial", type=int, default=60)
    p.add_argument("--throttle-increment", type=int, default=20)
    p.add_argument("--max-bandwidth", type=int, default=16 * MIB, help="bytes/s")
    p.add_argument("--no-backend", dest="backend", action="store_false",
                   help="plain -m RAM (no memory-backend-file; no RAM files to read)")
    p.add_argument("--scribble", action="store_true",
                   help="write random bytes into the running source's RAM file first")
    p.add_argument("--compare", default="settled",
                   choices=["settled", "at-complete", "dest-ran", "src-ran"])
    p.add_argument("--run-ms", type=int, default=200)
    p.add_argument("--stop-source-after", type=float, default=0)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--keep", action="store_true", help="keep each run's directory")
    opts = p.parse_args()
    if not opts.elf or not os.path.exists(opts.elf):
        sys.exit("no workload ELF: run `cargo build` first, or give --elf")
    if opts.scribble and not opts.backend:
        sys.exit("--scribble needs the RAM file (drop --no-backend)")
    found = False
    for run in range(1, opts.runs + 1):
        pmem, files = one_run(opts, run)
        if opts.compare == "settled" and (pmem or files):
            found = True
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
