#!/usr/bin/env python3
"""Does Nagle's algorithm on the source's migration socket slow QEMU's TLS migration?

Issue 21: the tool's TLS migration moved RAM slower than libvirt's own between the same two
libvirtds, and only over TLS. A probe of both QEMUs' sockets (pidfd_getfd + getsockopt while
the bench ran) found one difference: libvirt connects the migration socket itself and hands it
to QEMU (`migrate fd:`) with TCP_NODELAY set, while `migrate tcp:` leaves QEMU's own socket
with Nagle on (QEMU sets TCP_NODELAY only on multifd and NBD sockets).

This script measures that alone, with no project code: two QEMUs in two network namespaces
joined by a veth pair (198.18.0.0/15 addresses that exist only there; MTU 1500), the source
paused with RAM_MIB of random bytes in its RAM (a memory-backend-file written from outside), a
TLS migration (TLS 1.3, x509 credentials made with openssl) in each mode, the modes taking
turns, ROUNDS rounds:

    tcp           migrate tcp:ADDR:PORT (QEMU connects; Nagle on)
    fd-nodelay    a socket this script connected, TCP_NODELAY on, passed with getfd (libvirt's way)
    fd-nagle      the same socket without TCP_NODELAY (tells fd: from TCP_NODELAY)

    sudo python3 scripts/repro-tls-nodelay.py [--qemu PATH] [--ram-mib 256] [--rounds 5] [--plain]

Prints QEMU's total migration time and throughput per run, then each mode's median.
"""
import argparse, array, atexit, json, os, shutil, socket, statistics, subprocess, sys, tempfile, time

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--qemu", default="qemu-system-x86_64")
p.add_argument("--ram-mib", type=int, default=256)
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--modes", default="tcp,fd-nodelay,fd-nagle")
p.add_argument("--plain", action="store_true", help="no TLS (the same runs in clear, for contrast)")
p.add_argument("--in-ns", help=argparse.SUPPRESS)
opts = p.parse_args()

PORT = 49152
NS_S, NS_D = f"qtmrs{os.getpid() % 10000}", f"qtmrd{os.getpid() % 10000}"
SRC_IP, DST_IP = "198.18.250.2", "198.18.250.1"


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


if not opts.in_ns:
    # The source side (this script and the source QEMU) runs in its own namespace, so the
    # socket this script connects for fd: is on the veth like QEMU's own.
    for ns in (NS_S, NS_D):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    atexit.register(lambda: [subprocess.run(["ip", "netns", "del", n]) for n in (NS_S, NS_D)])
    sh("ip", "link", "add", "qtmrs0", "netns", NS_S, "type", "veth", "peer", "name", "qtmrd0",
       "netns", NS_D)
    for ns, dev, ip in ((NS_S, "qtmrs0", SRC_IP), (NS_D, "qtmrd0", DST_IP)):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
    r = subprocess.run(["ip", "netns", "exec", NS_S, sys.executable, *sys.argv,
                        "--in-ns", NS_D])
    sys.exit(r.returncode)

d = tempfile.mkdtemp()
atexit.register(shutil.rmtree, d, True)
pki = os.path.join(d, "pki")
os.mkdir(pki)


def ssl(*args):
    subprocess.run(["openssl", *args], check=True, cwd=pki, capture_output=True)


ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
    "ca-cert.pem", "-days", "1", "-subj", "/CN=repro CA")
for who, cn in (("server", "dest"), ("client", "source")):
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}-key.pem", "-out",
        f"{who}.csr", "-subj", f"/CN={cn}")
    ssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "1")

procs = []
atexit.register(lambda: [q.kill() for q in procs])


class Qmp:
    def __init__(self, path):
        for _ in range(200):
            self.s = socket.socket(socket.AF_UNIX)
            try:
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                time.sleep(0.05)
        else:
            sys.exit(f"no QEMU monitor at {path}")
        self.buf = b""
        self.reply()
        self.cmd("qmp_capabilities")

    def reply(self):
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                r = json.loads(line)
                if "event" not in r:
                    return r
            chunk = self.s.recv(65536)
            if not chunk:
                sys.exit("QEMU closed its monitor")
            self.buf += chunk

    def cmd(self, name, fds=None, **args):
        msg = json.dumps({"execute": name, "arguments": args}).encode() + b"\n"
        if fds:
            self.s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.s.sendall(msg)
        r = self.reply()
        if "error" in r:
            sys.exit(f"{name}: {r['error']}")
        return r["return"]


def qemu(name, ns, incoming, ram):
    qmp = os.path.join(d, f"{name}.sock")
    if os.path.exists(qmp):
        os.unlink(qmp)
    argv = [opts.qemu, "-nodefaults", "-display", "none", "-machine", "pc", "-accel", "tcg",
            "-S", "-m", f"{opts.ram_mib}",
            "-object", f"memory-backend-file,id=ram,size={opts.ram_mib}M,mem-path={ram},share=on",
            "-machine", "memory-backend=ram",
            "-object", f"tls-creds-x509,id=tls0,dir={pki},endpoint="
            f"{'server' if incoming else 'client'},verify-peer=on",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    if ns:
        argv = ["ip", "netns", "exec", ns, *argv]
    procs.append(subprocess.Popen(argv))
    return Qmp(qmp)


def one(mode):
    src_ram, dst_ram = os.path.join("/dev/shm", f"qtmr-src-{os.getpid()}"), \
        os.path.join("/dev/shm", f"qtmr-dst-{os.getpid()}")
    with open(src_ram, "wb") as f:
        for _ in range(opts.ram_mib):
            f.write(os.urandom(1 << 20))
    try:
        dst = qemu("dst", opts.in_ns, True, dst_ram)
        src = qemu("src", None, False, src_ram)
        if not opts.plain:
            dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
            src.cmd("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": "dest"})
        dst.cmd("migrate-incoming", uri=f"tcp:{DST_IP}:{PORT}")
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        if mode == "tcp":
            src.cmd("migrate", uri=f"tcp:{DST_IP}:{PORT}")
        else:
            s = socket.create_connection((DST_IP, PORT))
            if mode == "fd-nodelay":
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            src.cmd("getfd", fds=[s.fileno()], fdname="mig")
            s.close()
            src.cmd("migrate", uri="fd:mig")
        while True:
            q = src.cmd("query-migrate")
            if q.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if q["status"] != "completed":
            sys.exit(f"{mode}: {q}")
        return q["total-time"], q["ram"]["transferred"]
    finally:
        for q in procs:
            q.kill()
            q.wait()
        procs.clear()
        for f in (src_ram, dst_ram):
            if os.path.exists(f):
                os.unlink(f)


version = subprocess.run([opts.qemu, "--version"], capture_output=True, text=True).stdout
print(version.splitlines()[0], "(plain TCP)" if opts.plain else "(TLS)")
modes = opts.modes.split(",")
times = {m: [] for m in modes}
for r in range(opts.rounds):
    for m in modes:
        ms, sent = one(m)
        times[m].append(ms)
        # QEMU reports whole milliseconds; guard the division.
        rate = sent * 8 / max(ms, 1) / 1000
        print(f"round {r + 1} {m:11} {ms:6} ms  {rate:7.0f} Mbit/s", flush=True)
for m in modes:
    print(f"median {m:11} {statistics.median(times[m]):7.0f} ms  "
          f"(min {min(times[m])}, max {max(times[m])})")
