#!/usr/bin/env bash
# Fetches QEMU 10.0 from Debian's bookworm-backports into a directory of the project's own
# (default: .qemu/10.0 under the repository, gitignored; QTM_QEMU10_DIR overrides it), never
# installing it: the system's QEMU 7.2 stays what `qemu-system-x86_64` is, for the tests and for
# libvirt. Idempotent: does nothing when the wrapper already runs the pinned version, unpacked
# from the same packages.
#
# Result: DIR/bin/qemu-system-x86_64, a wrapper that runs the unpacked QEMU with its own data
# and module directories; the tests take it through `QTM_QEMU=DIR/bin/qemu-system-x86_64`.
# Prints that path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

# The exact build tested; bumping it means re-running the suite on the new one.
VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"
# The upstream version `qemu-system-x86_64 --version` reports for it.
UPSTREAM="10.0.2"
# qemu-system-x86 needs -common (the binary's helpers) and -data (firmware descriptors, option
# ROMs, keymaps); qemu-utils brings qemu-img/qemu-nbd of the same build. The two module packages
# are there because QEMU looks for a module in QEMU_MODULE_DIR and then in its built-in module
# directory, /usr/lib/x86_64-linux-gnu/qemu, which is 7.2's: a module 10.0 knows that its own
# directory lacks is taken from 7.2's, refused ("Only modules from the same build can be
# loaded") and QEMU aborts. `qom-list-types` loads every module, and libvirt's capability probe
# asks it: without these (7.2's qemu-system-common ships its opengl and spice modules, 10.0
# splits them out) libvirt 9.0 cannot use this QEMU as an emulator.
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils
    qemu-system-modules-opengl qemu-system-modules-spice)
DIR="${QTM_QEMU10_DIR:-$PWD/.qemu/10.0}"
WRAPPER="$DIR/bin/qemu-system-x86_64"
# What was unpacked (packages and version), written last: a directory unpacked from another
# package list is unpacked again.
STAMP="$DIR/packages"
stamp_text() { for p in "${PACKAGES[@]}"; do echo "$p=$VERSION"; done; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ -x "$WRAPPER" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$(stamp_text)" ] &&
    "$WRAPPER" --version 2>/dev/null | head -n1 | grep -q "version $UPSTREAM "; then
    echo "setup-qemu10: QEMU $UPSTREAM already unpacked in $DIR" >&2
    echo "$WRAPPER"
    exit 0
fi

# The backports suite beside Debian's own sources. Backports has priority 100 (NotAutomatic with
# ButAutomaticUpgrades): nothing installed comes from it unless asked for by version, so the
# system's QEMU 7.2 pin holds. Never trixie: its QEMU would become the candidate.
SOURCES=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    $SUDO tee "$SOURCES" >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
# (apt-cache show exits 0 for a missing version; madison lists only what the sources have.)
have_version() {
    for p in "${PACKAGES[@]}"; do
        apt-cache madison "$p" | awk -F'|' '{gsub(/ /, "", $2); print $2}' | grep -qxF "$VERSION" || return 1
    done
}
if ! have_version; then
    $SUDO apt-get update -q
fi
if ! have_version; then
    echo "setup-qemu10: qemu-system-x86=$VERSION not in the apt sources (bookworm-backports)" >&2
    exit 1
fi

work=$(mktemp -d -t qtm-qemu10-XXXXXX)
trap 'rm -rf "$work"' EXIT
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$p=$VERSION"); done
# apt-get download fetches into the current directory as the calling user (_apt needs to reach
# it when run as root).
chmod 755 "$work"
(cd "$work" && apt-get download -q "${specs[@]}")

rm -rf "$DIR.new"
mkdir -p "$DIR.new/root" "$DIR.new/bin"
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$DIR.new/root"
done

# Every shared library the binaries need must resolve on this Debian 12; a missing one is
# reported here, not at the first test.
missing=$(ldd "$DIR.new/root/usr/bin/qemu-system-x86_64" "$DIR.new/root/usr/bin/qemu-img" \
    "$DIR.new/root/usr/bin/qemu-nbd" | grep 'not found' || true)
if [ -n "$missing" ]; then
    echo "setup-qemu10: libraries missing for QEMU $UPSTREAM:" >&2
    echo "$missing" >&2
    exit 1
fi

# The wrapper: -L puts the unpacked data directory first (its option ROMs and descriptors
# belong to this build), then the system's SeaBIOS (the package's bios*.bin are symlinks into
# the seabios package, which is the system's: the same BIOS as 7.2's, so the ROM sizes match
# across versions). QEMU_MODULE_DIR keeps 10.0 from loading 7.2's modules. exec: the pid a
# caller sees is QEMU's.
root="$DIR/root"
for tool in qemu-system-x86_64 qemu-img qemu-nbd qemu-io; do
    case "$tool" in
        qemu-system-x86_64) extra="-L $root/usr/share/qemu -L /usr/share/seabios" ;;
        *) extra="" ;;
    esac
    cat >"$DIR.new/bin/$tool" <<EOF
#!/bin/sh
# QEMU $UPSTREAM unpacked by scripts/setup-qemu10.sh ($VERSION).
QEMU_MODULE_DIR="$root/usr/lib/x86_64-linux-gnu/qemu"
export QEMU_MODULE_DIR
exec "$root/usr/bin/$tool" $extra "\$@"
EOF
    chmod 755 "$DIR.new/bin/$tool"
done
stamp_text >"$DIR.new/packages"
rm -rf "$DIR"
mv "$DIR.new" "$DIR"

if ! "$WRAPPER" --version | head -n1 | grep -q "version $UPSTREAM "; then
    echo "setup-qemu10: $WRAPPER does not report QEMU $UPSTREAM" >&2
    exit 1
fi
echo "setup-qemu10: QEMU $UPSTREAM unpacked in $DIR" >&2
echo "$WRAPPER"
