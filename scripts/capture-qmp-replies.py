#!/usr/bin/env python3
"""Captures the QMP replies the tool's typed commands read, from a real QEMU, into
src/qemu/replies/<major.minor>/<command>.json (the unit tests in src/qemu/replies.rs parse
every one of them with the tool's own types). Run it once per QEMU version:

    scripts/capture-qmp-replies.py qemu-system-x86_64
    scripts/capture-qmp-replies.py .qemu/10.0/bin/qemu-system-x86_64

The VM is a 64 MiB q35 guest with no firmware run (-S) and one qcow2 disk node; its RAM is
migrated into `exec:cat >/dev/null` to get query-migrate both while active (bandwidth capped)
and completed.
"""
import json, os, socket, subprocess, sys, tempfile, time

qemu = sys.argv[1]
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "qemu", "replies")
work = tempfile.mkdtemp(prefix="qtm-capture-")
disk = os.path.join(work, "d0.qcow2")
subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
sock_path = os.path.join(work, "qmp.sock")
proc = subprocess.Popen([qemu, "-S", "-nodefaults", "-display", "none", "-machine", "q35",
                         "-m", "64", "-qmp", f"unix:{sock_path},server=on,wait=off",
                         "-blockdev", f"driver=file,filename={disk},node-name=d0-file",
                         "-blockdev", "driver=qcow2,file=d0-file,node-name=d0"])
for _ in range(200):
    if os.path.exists(sock_path):
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
f = s.makefile("rw")
greeting = json.loads(f.readline())
major = greeting["QMP"]["version"]["qemu"]["major"]
minor = greeting["QMP"]["version"]["qemu"]["minor"]
out = os.path.join(root, f"{major}.{minor}")
os.makedirs(out, exist_ok=True)


def call(cmd, args=None):
    msg = {"execute": cmd}
    if args is not None:
        msg["arguments"] = args
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r


def save(name, reply):
    with open(os.path.join(out, name + ".json"), "w") as fh:
        json.dump(reply["return"], fh, indent=1, sort_keys=True)
        fh.write("\n")


call("qmp_capabilities")
for cmd in ["query-version", "query-status", "query-kvm", "query-migrate-capabilities",
            "query-migrate-parameters", "query-block", "query-named-block-nodes",
            "query-block-jobs", "query-memory-size-summary", "query-machines"]:
    save(cmd, call(cmd))
call("calc-dirty-rate", {"calc-time": 1})
for _ in range(100):
    r = call("query-dirty-rate")
    if r["return"].get("status") == "measured":
        break
    time.sleep(0.1)
save("query-dirty-rate", r)
save("query-migrate-none", call("query-migrate"))
call("migrate-set-parameters", {"max-bandwidth": 16 << 10})
call("migrate", {"uri": "exec:cat >/dev/null"})
# The first reply that shows RAM on its way: the guest's RAM is all zero pages, and QEMU 10.0
# finished this migration within 1.2 s even under the 16 KiB/s cap (7.2 took longer).
for _ in range(400):
    r = call("query-migrate")
    if r["return"].get("status") == "active" and r["return"].get("ram", {}).get("transferred"):
        break
    time.sleep(0.005)
save("query-migrate-active", r)
call("migrate-set-parameters", {"max-bandwidth": 1 << 40})
for _ in range(400):
    r = call("query-migrate")
    if r["return"].get("status") in ("completed", "failed"):
        break
    time.sleep(0.05)
save("query-migrate-completed", r)
call("quit")
proc.wait(timeout=10)
print(out)
