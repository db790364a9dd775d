#!/usr/bin/env python3
"""QEMU aborts on `block_resize` of a disk of a QEMU waiting for an incoming migration.

A QEMU started with `-incoming defer` holds its images inactive (BDRV_O_INACTIVE) until the
migration completes; `block_resize` of such a node is not refused but reaches an assertion
(QEMU 7.2: block/io.c bdrv_co_write_req_prepare: `!(bs->open_flags & BDRV_O_INACTIVE)`) and
QEMU dies. No project code needed:

    python3 scripts/repro-resize-inactive.py [path/to/qemu-system-x86_64]

Prints QEMU's version, the reply to block_resize (or that the connection closed) and whether
QEMU is still alive. qemu-tls-migrate therefore grows a destination disk with `qemu-img resize`
before the destination QEMU opens it, never through the incoming QEMU.
"""
import json, os, socket, subprocess, sys, tempfile, time

qemu = sys.argv[1] if len(sys.argv) > 1 else "qemu-system-x86_64"
d = tempfile.mkdtemp()
img, sock = os.path.join(d, "disk.qcow2"), os.path.join(d, "qmp.sock")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "8M"], check=True)
p = subprocess.Popen([qemu, "-nodefaults", "-display", "none", "-machine", "pc", "-accel", "tcg",
                      "-m", "64", "-blockdev",
                      f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}",
                      "-qmp", f"unix:{sock},server=on,wait=off", "-incoming", "defer"],
                     stderr=subprocess.PIPE, text=True)
for _ in range(100):
    if os.path.exists(sock):
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
f = s.makefile("rw")
def cmd(c, **args):
    f.write(json.dumps({"execute": c, "arguments": args}) + "\n"); f.flush()
    while True:
        line = f.readline()
        if not line:
            return None
        r = json.loads(line)
        if "event" not in r:
            return r
f.readline()
cmd("qmp_capabilities")
print("QEMU", cmd("query-version")["return"]["qemu"])
try:
    reply = cmd("block_resize", **{"node-name": "disk0", "size": 16 << 20})
except ConnectionError as e:
    reply = None
print("block_resize ->", reply or "no reply: the connection closed")
try:
    p.wait(timeout=5)
    print("QEMU died, exit", p.returncode, ":", p.stderr.read().strip())
except subprocess.TimeoutExpired:
    print("QEMU still alive")
    p.kill()
