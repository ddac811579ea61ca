#!/bin/sh
# Install an aarch64 bundle in an emulated Debian arm64 root, offline, and run
# `skyhop check` there: the closest thing to a Jetson this x86_64 machine has.
#
#   sudo tools/aarch64_check.sh [MODELS]      # default: digits
#
# Needs root, qemu-user-static, binfmt-support and debootstrap (Debian packages) and the
# package index (for the root and the bundle's wheels). The root is Debian 12 arm64, so
# its Python is 3.11: JetPack 6's 3.10 is proven on x86_64 (tests/integration/
# test_bundle.py), the aarch64 wheels here. Emulation is slow: the run times say
# nothing about a real board. docs/deploy.md records what it printed.
set -eu
MODELS=${1:-digits}
ROOT=${ROOT:-/var/tmp/skyhop-arm64root}
REPO=$(cd "$(dirname "$0")/.." && pwd)
SKYHOP="$REPO/.venv/bin/skyhop"
WORK=$(mktemp -d)

[ -x "$ROOT/usr/bin/python3" ] || debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv bookworm "$ROOT" http://deb.debian.org/debian
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
# No /sys: ORT's cpuinfo then warns that it cannot read the CPU lists; with the host's
# sysfs mounted it reads x86 topology under an aarch64 emulator and crashes (SIGSEGV).
trap 'umount "$ROOT/proc" 2>/dev/null || true; rm -rf "$WORK"' EXIT

"$SKYHOP" init --home "$WORK/fleet" >/dev/null
"$SKYHOP" certs init --home "$WORK/fleet" >/dev/null
for m in $(echo "$MODELS" | tr , ' '); do "$SKYHOP" models fetch "$m" --home "$WORK/fleet" >/dev/null; done
"$SKYHOP" bundle arm-1 --home "$WORK/fleet" --out "$WORK/arm-1.tar.gz" \
    --platform linux_aarch64 --python 3.11 --models "$MODELS" --mqtt mqtt://127.0.0.1:1883
rm -rf "$ROOT/opt/skyhop-arm-1" "$ROOT/opt/skyhop"
tar xzf "$WORK/arm-1.tar.gz" -C "$ROOT/opt"

echo "== uname -m in the root: $(chroot "$ROOT" /usr/bin/uname -m)"
start=$(date +%s)
unshare -n chroot "$ROOT" /opt/skyhop-arm-1/install.sh --prefix /opt/skyhop --no-systemd
echo "== install (emulated, offline): $(( $(date +%s) - start )) s"
unshare -n chroot "$ROOT" /opt/skyhop/bin/skyhop check --home /opt/skyhop/home
