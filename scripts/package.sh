#!/usr/bin/env bash
# Builds the Debian package (Debian 12 first) from a staged tree with dpkg-deb: the release
# binary, man pages and bash/zsh completions generated from the command-line definitions, the
# systemd units (the `serve` service, the CloudStack certificate-renewal follower), the
# qemu-conf/ templates under /usr/share/qemu-tls-migrate, README.Debian.
#
#   scripts/package.sh [OUT_DIR]      (default target/debian; prints the .deb's path last)
#
# The version is Cargo.toml's; QTM_DEB_VERSION overrides it (scripts/package-test.sh builds a
# higher one to test an upgrade). Library dependencies come from dpkg-shlibdeps (dpkg-dev)
# when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=qemu-tls-migrate
OUT="$(mkdir -p "${1:-target/debian}" && cd "${1:-target/debian}" && pwd)"
CARGO_VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
VERSION="${QTM_DEB_VERSION:-$CARGO_VERSION}"
ARCH="$(dpkg --print-architecture)"
# What the binary runs besides what it links: qemu-img and qemu-io (disks, the demo's check)
# and qemu-system-x86_64 (demo, bench, the destination QEMUs of the tests).
DEPENDS_EXTRA="qemu-system-x86 (>= 1:7.2), qemu-utils (>= 1:7.2)"

[[ -n "$CARGO_VERSION" ]] || { echo "package.sh: no version in Cargo.toml" >&2; exit 1; }

cargo build --release --locked --quiet
BIN=target/release/$NAME

STAGE="$(mktemp -d -t qtm-deb-XXXXXX)"
trap 'rm -rf "$STAGE"' EXIT
ROOT="$STAGE/root"
DOC="$ROOT/usr/share/doc/$NAME"
SHARE="$ROOT/usr/share/$NAME"
UNITS="$ROOT/lib/systemd/system"
install -d "$ROOT/DEBIAN" "$ROOT/usr/bin" "$ROOT/usr/share/man/man1" "$DOC" "$SHARE" "$UNITS" \
    "$ROOT/usr/share/bash-completion/completions" "$ROOT/usr/share/zsh/vendor-completions" \
    "$ROOT/etc/default" "$ROOT/etc/libvirt/hooks/qemu.d"

install -m 0755 --strip "$BIN" "$ROOT/usr/bin/$NAME"
"$BIN" man --out "$STAGE/man" >/dev/null
for page in "$STAGE"/man/*.1; do
    gzip -9n <"$page" >"$ROOT/usr/share/man/man1/$(basename "$page").gz"
done
"$BIN" completions bash --out "$ROOT/usr/share/bash-completion/completions/$NAME"
"$BIN" completions zsh --out "$ROOT/usr/share/zsh/vendor-completions/_$NAME"
chmod 0644 "$ROOT/usr/share/bash-completion/completions/$NAME" \
    "$ROOT/usr/share/zsh/vendor-completions/_$NAME"

install -m 0644 qemu-conf/* "$SHARE/"
install -m 0644 qemu-conf/*.service qemu-conf/*.path "$UNITS/"
install -m 0644 packaging/debian/qemu-tls-migrate.default "$ROOT/etc/default/$NAME"
install -m 0755 packaging/debian/libvirt-hook "$ROOT/etc/libvirt/hooks/qemu.d/$NAME"
install -m 0644 packaging/debian/README.Debian README.md "$DOC/"
cat >"$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: $NAME

Files: *
License: Apache-2.0
 On Debian systems the full text of the license is in /usr/share/common-licenses/Apache-2.0.
EOF
printf '%s (%s) unstable; urgency=medium\n\n  * Built from commit %s.\n\n -- %s maintainers <root@localhost>  %s\n' \
    "$NAME" "$VERSION" "$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)" "$NAME" \
    "$(date -R -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}")" | gzip -9n >"$DOC/changelog.Debian.gz"

for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$ROOT/DEBIAN/$script"
done
printf '%s\n' "/etc/default/$NAME" "/etc/libvirt/hooks/qemu.d/$NAME" >"$ROOT/DEBIAN/conffiles"

# Library dependencies as Debian computes them (libc6, libgcc-s1, libvirt0 with versions).
SHLIBS="libc6, libgcc-s1, libvirt0"
if command -v dpkg-shlibdeps >/dev/null; then
    mkdir -p "$STAGE/src/debian"
    printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$NAME" "$NAME" >"$STAGE/src/debian/control"
    SHLIBS="$(cd "$STAGE/src" && dpkg-shlibdeps -O -e"$ROOT/usr/bin/$NAME" 2>/dev/null |
        sed -n 's/^shlibs:Depends=//p')"
fi

cat >"$ROOT/DEBIAN/control" <<EOF
Package: $NAME
Version: $VERSION
Architecture: $ARCH
Maintainer: $NAME maintainers <root@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
Depends: $SHLIBS, $DEPENDS_EXTRA
Recommends: libvirt-clients, libvirt-daemon-system
Suggests: nftables | iptables
Section: admin
Priority: optional
Description: live migration of QEMU/KVM VMs over QEMU-native TLS
 qemu-tls-migrate migrates running QEMU virtual machines between hosts over
 QEMU's own TLS (RAM and NBD disk copies), talking QMP to the source and
 destination QEMU. It ships the destination service (qemu-tls-migrate.service,
 installed disabled), "host secure" to install CloudStack agent certificates as
 QEMU and libvirt expect them, and a unit to follow certificate renewals.
EOF
(cd "$ROOT" && find . -type f ! -path './DEBIAN/*' ! -path './etc/*' -printf '%P\0' |
    sort -z | xargs -0 md5sum) >"$ROOT/DEBIAN/md5sums"

DEB="$OUT/${NAME}_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
