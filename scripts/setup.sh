#!/usr/bin/env bash
# Installs, idempotently, what a fresh Debian 12 machine needs to build qemu-tls-migrate and run
# its tests, demo and benchmarks: QEMU 7.2 (qemu-system-x86 with the matching qemu-utils), and
# the small tools the tests use. Safe to run again: it does nothing when all is in place.
#
# `--qemu10` also unpacks QEMU 10.0 from bookworm-backports into .qemu/10.0 (scripts/setup-qemu10.sh;
# never installed system-wide) and prints the path of its qemu-system-x86_64 wrapper last.
set -euo pipefail

QEMU10=0
for arg in "$@"; do
    case "$arg" in
        --qemu10) QEMU10=1 ;;
        *) echo "usage: $0 [--qemu10]" >&2; exit 2 ;;
    esac
done
qemu10() {
    if [ "$QEMU10" = 1 ]; then bash "$(dirname "$0")/setup-qemu10.sh"; fi
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Packages besides QEMU: iproute2 for the two-host tests (network namespaces), libvirt-clients for
# virsh and virt-pki-validate (the PKI checks are compared with it), gnutls-bin for gnutls-cli
# probes; libvirt-daemon-system for the libvirt tests (each test host runs its own libvirtd and
# virtlogd, started by the tests, never as services); its -sysv flavour because no systemd runs
# here, and the default -systemd one would upgrade systemd itself. libvirt-dev and pkg-config let
# the `virt` crate (libvirt's Rust bindings) link against libvirt.so. socat for the bench's
# tls-proxy mode (a packaged TLS proxy with OpenSSL); openssh-server and -client for its ssh mode
# (an sshd the bench starts on loopback, never as a service).
EXTRA_PACKAGES=(iproute2 libvirt-clients gnutls-bin socat openssh-server openssh-client
    libvirt-daemon-system libvirt-daemon-system-sysv libvirt-dev pkg-config)

have_qemu_72() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    qemu-system-x86_64 --version | head -n1 | grep -q 'version 7\.2' || return 1
    qemu-img --version | head -n1 | grep -q 'version 7\.2' || return 1
}

have_extras() {
    for p in "${EXTRA_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || return 1
    done
}

if have_qemu_72 && have_extras; then
    echo "setup: QEMU 7.2, libvirt and test tools already installed"
    qemu10
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q

# Debian 12's qemu-system-x86 is 7.2; the image may carry a newer qemu-utils that conflicts with
# it, so install both at the same 7.2 version, downgrading qemu-utils in the same call.
version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "setup: no qemu-system-x86 candidate in the apt sources; is this Debian 12?" >&2
    exit 1
fi
case "$version" in
    *7.2*) ;;
    *) echo "setup: qemu-system-x86 candidate is $version, expected 7.2 (Debian 12)" >&2; exit 1 ;;
esac

# Installing libvirt-daemon-system must not start libvirtd or virtlogd: the tests start their own,
# in their own namespaces. Debian's invoke-rc.d asks /usr/sbin/policy-rc.d (exit 101: "denied");
# put one in place for the install when the image has none.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod 755 /usr/sbin/policy-rc.d
    trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi

# libvirt's QEMU driver does not pull in a qemu-system package with --no-install-recommends, and
# QEMU is pinned to 7.2 in this same call, so the libvirt packages cannot bring another QEMU.
$SUDO apt-get install -y -q --allow-downgrades --no-install-recommends \
    "qemu-system-x86=$version" "qemu-utils=$version" \
    "${EXTRA_PACKAGES[@]}"

have_qemu_72 || { echo "setup: QEMU 7.2 still missing after install" >&2; exit 1; }
echo "setup: installed QEMU $version"
qemu10
