#!/usr/bin/env bash
# Tests the Debian package on this machine (root, Debian 12): builds it twice (Cargo.toml's
# version and a higher one), installs the first, checks the binary, man pages, completions and
# units, runs the demo with the installed binary, upgrades to the second and reinstalls it,
# removes it and purges it, checking that nothing it installed is left. Prints how long each
# part took. Leaves the package purged, even when a check fails.
#
#   scripts/package-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=qemu-tls-migrate
OUT="$(mktemp -d -t qtm-package-test-XXXXXX)"
export QTM_LOCK_DIR="${QTM_LOCK_DIR:-$(mktemp -d -t qtm-locks-XXXXXX)}"
T0=$(date +%s)
step() { echo "package-test: $* ($(($(date +%s) - T0)) s)"; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }
purge() { dpkg --purge "$NAME" >/dev/null 2>&1 || true; }
trap 'purge; rm -rf "$OUT"' EXIT

if dpkg -s "$NAME" >/dev/null 2>&1; then
    echo "package-test: $NAME is installed here; purging it first" >&2
    purge
fi
command -v man >/dev/null || apt-get install -y --no-install-recommends man-db >/dev/null

step "building the package"
DEB1="$(bash scripts/package.sh "$OUT/v1" | tail -n1)"
T_BUILD=$(($(date +%s) - T0))
VERSION="$(dpkg-deb -f "$DEB1" Version)"
DEB2="$(QTM_DEB_VERSION="$VERSION+upgrade1" bash scripts/package.sh "$OUT/v2" | tail -n1)"
step "built $(basename "$DEB1") and $(basename "$DEB2"); Depends: $(dpkg-deb -f "$DEB1" Depends)"

install_deb() {
    if ! dpkg -i "$1" >"$OUT/dpkg.log" 2>&1; then
        # Missing dependencies: apt fetches them and finishes the configuration.
        apt-get install -f -y >>"$OUT/dpkg.log" 2>&1 || { cat "$OUT/dpkg.log" >&2; fail "dpkg -i $1"; }
    fi
    [[ "$(dpkg-query -W -f '${Status} ${Version}' "$NAME")" == "install ok installed $2" ]] ||
        fail "after dpkg -i $1: $(dpkg-query -W -f '${Status} ${Version}' "$NAME")"
}

# --- install
install_deb "$DEB1" "$VERSION"
step "installed $VERSION"
out="$(/usr/bin/$NAME --version)"
[[ "$out" == *"$VERSION"*"commit "*"tested with QEMU "* ]] || fail "--version says: $out"
echo "  $out"

pages=(/usr/share/man/man1/$NAME*.1.gz)
((${#pages[@]} >= 10)) || fail "only ${#pages[@]} man pages: ${pages[*]}"
for page in "${pages[@]}"; do
    text="$(MANWIDTH=80 man --warnings -E UTF-8 -l "$page" 2>"$OUT/man.err")"
    [[ ! -s "$OUT/man.err" ]] || fail "man -l $page warns: $(cat "$OUT/man.err")"
    [[ "$text" == *NAME*SYNOPSIS* ]] || fail "man -l $page: no NAME/SYNOPSIS"
done
man -w "$NAME-serve" >/dev/null || fail "man $NAME-serve is not found through the man path"
step "${#pages[@]} man pages render"

complete_line="$(bash -c "source /usr/share/bash-completion/completions/$NAME && complete -p $NAME")"
[[ "$complete_line" == *"$NAME"* ]] || fail "bash completion: $complete_line"
if command -v zsh >/dev/null; then
    zsh -c "autoload -Uz compinit && compinit -u && source /usr/share/zsh/vendor-completions/_$NAME" ||
        fail "zsh completion does not load"
fi
grep -q "_$NAME" "/usr/share/zsh/vendor-completions/_$NAME" || fail "zsh completion script"
step "bash completion loads: $complete_line"

units=(/lib/systemd/system/$NAME.service /lib/systemd/system/$NAME-renew.service
    /lib/systemd/system/$NAME-renew.path)
verify="$(systemd-analyze verify "${units[@]}" 2>&1)" || fail "systemd-analyze verify: $verify"
[[ -z "$verify" ]] || fail "systemd-analyze verify: $verify"
for unit in "$NAME.service" "$NAME-renew.service"; do
    echo "  $(systemd-analyze security --offline=true --no-pager "/lib/systemd/system/$unit" 2>&1 | tail -n1)"
done
for f in qemu.conf libvirtd.conf firewall.nft firewall.iptables; do
    [[ -f /usr/share/$NAME/$f ]] || fail "/usr/share/$NAME/$f missing"
done
[[ -f /usr/share/doc/$NAME/README.Debian ]] || fail "README.Debian missing"
step "units verify; templates and README.Debian in place"

# libvirt's qemu hook: run as libvirt runs it, it strips what a service gave a domain.
hook=/etc/libvirt/hooks/qemu.d/$NAME
[[ -x "$hook" ]] || fail "$hook missing or not executable"
xml="<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>v</name>
<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/q/qtm-in-1.sock,server=on,wait=off'/><qemu:arg value='-incoming'/><qemu:arg value='defer'/></qemu:commandline></domain>"
out="$(printf '%s' "$xml" | "$hook" v migrate begin -)" || fail "$hook exited $?"
[[ "$out" == *"<name>v</name>"* && "$out" != *qtm-in-* ]] || fail "$hook printed: $out"
step "the libvirt hook strips a service's arguments"

/usr/bin/$NAME demo --json --quiet >"$OUT/demo.json" || fail "demo: $(cat "$OUT/demo.json")"
grep -q '"status":"completed"' "$OUT/demo.json" || fail "demo: $(cat "$OUT/demo.json")"
step "the installed binary ran the demo"

# --- upgrade (keeping a local change to the conffile), then reinstall the same version
sed -i 's/^SERVE_ARGS=""$/SERVE_ARGS="--allow-client host-a"/' /etc/default/$NAME
install_deb "$DEB2" "$VERSION+upgrade1"
grep -q 'allow-client host-a' /etc/default/$NAME || fail "upgrade lost the local /etc/default/$NAME"
install_deb "$DEB2" "$VERSION+upgrade1"
/usr/bin/$NAME --version >/dev/null || fail "binary after upgrade"
step "upgraded to $VERSION+upgrade1 and reinstalled it"

# --- remove, purge: nothing of the package is left
files=()
while IFS= read -r f; do
    [[ -d "$f" ]] || files+=("$f")
done < <(dpkg -L "$NAME")
dpkg -r "$NAME" >/dev/null
[[ "$(dpkg-query -W -f '${Status}' "$NAME")" == "deinstall ok config-files" ]] ||
    fail "after dpkg -r: $(dpkg-query -W -f '${Status}' "$NAME")"
for f in "${files[@]}"; do
    [[ "$f" == /etc/default/$NAME || "$f" == "$hook" || ! -e "$f" ]] || fail "dpkg -r left $f"
done
[[ -f /etc/default/$NAME && -f "$hook" ]] || fail "dpkg -r removed a conffile"
# Kept without its binary, the hook must not stop libvirt's migrations.
printf '%s' "$xml" | "$hook" v migrate begin - >/dev/null || fail "$hook fails without the binary"
dpkg -P "$NAME" >/dev/null
! dpkg -s "$NAME" >/dev/null 2>&1 || fail "still known to dpkg after purge"
for f in "${files[@]}" /var/lib/$NAME; do
    [[ ! -e "$f" ]] || fail "dpkg -P left $f"
done
step "removed and purged cleanly (${#files[@]} files)"
echo "package-test: OK in $(($(date +%s) - T0)) s (building the package: $T_BUILD s)"
