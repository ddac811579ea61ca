#!/bin/sh
# Remove what install.sh added: the service, the system user it created, the venv, the
# home (the node's keys and state) and PREFIX itself once empty. Run it from PREFIX:
#   sudo /opt/skyhop/uninstall.sh
set -eu
PREFIX=$(cd "$(dirname "$0")" && pwd)
UNIT=skyhop-agent.service
[ -f "$PREFIX/bundle.env" ] || { echo "uninstall.sh: $PREFIX holds no skyhop install" >&2; exit 1; }

if [ -f "/etc/systemd/system/$UNIT" ] && grep -q "$PREFIX/bin/skyhop" "/etc/systemd/system/$UNIT"; then
    systemctl disable --now "$UNIT" >/dev/null 2>&1 || true
    rm -f "/etc/systemd/system/$UNIT"
    systemctl daemon-reload || true
fi
if [ -f "$PREFIX/created-user" ]; then
    userdel "$(cat "$PREFIX/created-user")" 2>/dev/null || true
fi
# Only what install.sh made: PREFIX may be shared (/opt, a home directory).
rm -rf "$PREFIX/venv" "$PREFIX/home"
rm -f "$PREFIX/bin/skyhop" "$PREFIX/$UNIT" "$PREFIX/installed-files" "$PREFIX/created-user" \
    "$PREFIX/bundle.env" "$PREFIX/uninstall.sh"
rmdir "$PREFIX/bin" 2>/dev/null || true
rmdir "$PREFIX" 2>/dev/null || true
echo "skyhop uninstall: removed the install in $PREFIX"
