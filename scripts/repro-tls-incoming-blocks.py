#!/usr/bin/env python3
"""A TLS incoming migration freezes the destination QEMU until the client's first TLS record.

QEMU runs the server side of the migration's TLS handshake on its main thread over the accepted
socket left in blocking mode: gnutls_handshake() sits in recvmsg() until the peer sends its
ClientHello. Until then nothing else on that main loop runs: QMP does not answer, and an NBD
server in the same QEMU (a disk mirror's target) stops serving.

What qemu-tls-migrate hit (issue 19): the source's `migrate` connects (the TCP connect runs on a
thread), and a `stop` queued just before the connect's completion reaches the source's main
loop flushes every block node, the NBD mirror target included. The flush waits for the
destination's NBD server, frozen in the handshake; the ClientHello would be sent by the
source's main loop, blocked in that flush. Both QEMUs wait for ever. The tool therefore pauses
a guest only once the migration left `setup` (the handshake is over).

This script shows the destination half with no race: it opens a plain TCP connection to a TLS
migration listener and sends nothing. No project code needed:

    python3 scripts/repro-tls-incoming-blocks.py [path/to/qemu-system-x86_64]

Prints QEMU's version, whether `query-status` answers within 3 s while the connection is open
(QEMU 7.2 and 10.0: it does not), and again once the connection is closed (it does).
"""
import atexit, json, os, socket, subprocess, sys, tempfile, time

qemu = sys.argv[1] if len(sys.argv) > 1 else "qemu-system-x86_64"
d = tempfile.mkdtemp()
pki, sock = os.path.join(d, "pki"), os.path.join(d, "qmp.sock")
os.mkdir(pki)

def ssl(*args):
    subprocess.run(["openssl", *args], check=True, cwd=pki, capture_output=True)

ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out",
    "ca-cert.pem", "-days", "1", "-subj", "/CN=repro CA")
ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server-key.pem", "-out", "server.csr",
    "-subj", "/CN=localhost")
ssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
    "-CAcreateserial", "-out", "server-cert.pem", "-days", "1")

p = subprocess.Popen([qemu, "-nodefaults", "-display", "none", "-machine", "pc", "-accel", "tcg",
                      "-m", "64", "-qmp", f"unix:{sock},server=on,wait=off",
                      "-incoming", "defer"], stderr=subprocess.PIPE, text=True)
atexit.register(p.kill)  # also when a step fails or the monitor closes
for _ in range(100):
    if os.path.exists(sock):
        break
    time.sleep(0.05)
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
buf = b""

def reply(deadline=None):
    """The next message that is not an event, or None when none came by the deadline."""
    global buf
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            r = json.loads(line)
            if "event" not in r:
                return r
        s.settimeout(None if deadline is None else max(deadline - time.time(), 0.001))
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return None
        if not chunk:
            sys.exit("QEMU closed its monitor")
        buf += chunk

def cmd(c, **args):
    s.sendall((json.dumps({"execute": c, "arguments": args}) + "\n").encode())
    return reply()

reply()
cmd("qmp_capabilities")
print("QEMU", cmd("query-version")["return"]["qemu"])
print(cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "endpoint": "server",
                           "dir": pki, "verify-peer": False}))
print(cmd("migrate-set-parameters", **{"tls-creds": "tls0"}))
probe = socket.socket()
probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]
probe.close()
print(cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}"))

def answers_within(secs):
    s.sendall(b'{"execute": "query-status"}\n')
    return reply(time.time() + secs) is not None

print("before any connection, query-status answers:", answers_within(3))
peer = socket.create_connection(("127.0.0.1", port))
time.sleep(0.5)
frozen = not answers_within(3)
print("with a connection that sent nothing, query-status answers:", not frozen)
peer.close()
if frozen:
    reply(time.time() + 5)  # the late answer to the query sent while frozen
print("after closing it, query-status answers:", answers_within(5))
print("RESULT:", "the destination's main loop froze" if frozen else "not reproduced")
