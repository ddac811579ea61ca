#!/bin/sh
# Install this skyhop bundle: a venv from the bundle's own wheels (never the network),
# the node's home, and (as root) a system user and a systemd service.
#
#   sudo ./install.sh                          # /opt/skyhop, user skyhop, service started
#   ./install.sh --prefix DIR --no-systemd     # no root, no service: trials and tests
#
# Re-running a newer bundle upgrades in place: the venv is refreshed, the bundle's files
# replace the old ones, the node's state (HOME/models/tensorrt, anything the bundle did
# not put there) stays, and the service restarts. PREFIX/uninstall.sh removes it all.
set -eu

PREFIX=/opt/skyhop
SYSTEMD=1
PYTHON=python3
USER_NAME=skyhop
UNIT=skyhop-agent.service
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "$0"
    echo "options: --prefix DIR  --no-systemd  --python PYTHON  --user NAME"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --python) PYTHON=$2; shift 2 ;;
        --user) USER_NAME=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { echo "skyhop install: $*"; }
die() { echo "skyhop install: error: $*" >&2; exit 1; }

. "$HERE/bundle.env"   # NODE ROLE PYTHON_VERSION PLATFORM SKYHOP_VERSION

[ "$SYSTEMD" = 0 ] || [ "$(id -u)" = 0 ] || die "run as root, or pass --prefix DIR --no-systemd"
[ "$SYSTEMD" = 0 ] || [ "$ROLE" != client ] || SYSTEMD=0   # a client runs no service
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: install Python $PYTHON_VERSION"
have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$have" = "$PYTHON_VERSION" ] || die "this bundle is for Python $PYTHON_VERSION, \
$PYTHON is $have: pass --python python$PYTHON_VERSION, or bundle with --python $have"
machine=$(uname -m)
[ "linux_$machine" = "$PLATFORM" ] || die "this bundle is for $PLATFORM, this machine is \
linux_$machine: bundle with --platform linux_$machine"

say "checking the bundle's files (sha256)"
(cd "$HERE" && sha256sum --check --quiet --strict SHA256SUMS) \
    || die "the bundle is damaged: copy it again"

# pip reads only the bundle: no index, no config or variables that could add one.
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
VENV=$PREFIX/venv
if [ -x "$VENV/bin/python" ] && [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PYTHON_VERSION" ]; then
    say "upgrading $VENV"
else
    rm -rf "$VENV"
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed: on Debian, Ubuntu and \
JetPack install python$PYTHON_VERSION-venv"
fi
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$HERE/wheels" \
    --requirement "$HERE/wheels/requirements.txt"
# The same version number may be a newer build: always put this bundle's skyhop in.
"$VENV/bin/python" -m pip install --quiet --no-index --no-deps --force-reinstall \
    "$HERE"/wheels/skyhop-*.whl
mkdir -p "$PREFIX/bin"
ln -sf "$VENV/bin/skyhop" "$PREFIX/bin/skyhop"

# The home: the bundle's files replace their old copies; files an older bundle put there
# and this one does not are removed; anything else is the node's state and stays.
HOME_DIR=$PREFIX/home
if [ -f "$PREFIX/installed-files" ]; then
    (cd "$HERE" && find home -type f | sort) > "$PREFIX/.new-files"
    sort "$PREFIX/installed-files" | comm -23 - "$PREFIX/.new-files" | while read -r old; do
        rm -f "$PREFIX/$old"
        rmdir "$(dirname "$PREFIX/$old")" 2>/dev/null || true   # once empty
    done
    rm -f "$PREFIX/.new-files"
fi
(cd "$HERE" && find home -type d) | while read -r dir; do mkdir -p "$PREFIX/$dir"; done
(cd "$HERE" && find home -type f) | while read -r file; do
    cp -p "$HERE/$file" "$PREFIX/$file.new" && mv -f "$PREFIX/$file.new" "$PREFIX/$file"
done
(cd "$HERE" && find home -type f | sort) > "$PREFIX/installed-files"
chmod 0700 "$HOME_DIR/keys" "$HOME_DIR/pki" 2>/dev/null || true
mkdir -p "$HOME_DIR/models/tensorrt"
cp "$HERE/uninstall.sh" "$PREFIX/uninstall.sh"
cp "$HERE/bundle.env" "$PREFIX/bundle.env"

# The unit, rendered for this prefix; installed and started only with systemd.
backoff="# RestartSteps= needs systemd 254 or later"
version=$(systemctl --version 2>/dev/null | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
if [ -n "$version" ] && [ "$version" -ge 254 ]; then
    backoff="RestartSteps=10
RestartMaxDelaySec=300"
fi
protect_home=yes   # read-only where PREFIX itself is under a home
case "$PREFIX" in /home/*|/root/*|/run/user/*) protect_home=read-only ;; esac
groups=""
for g in video render; do getent group "$g" >/dev/null 2>&1 && groups="$groups $g"; done
awk -v prefix="$PREFIX" -v node="$NODE" -v role="$ROLE" -v user="$USER_NAME" \
    -v groups="${groups# }" -v backoff="$backoff" -v protect_home="$protect_home" '{
        gsub(/@PREFIX@/, prefix); gsub(/@NODE@/, node); gsub(/@ROLE@/, role)
        gsub(/@USER@/, user); gsub(/@GROUPS@/, groups); gsub(/@BACKOFF@/, backoff)
        gsub(/@PROTECT_HOME@/, protect_home); print
    }' "$HERE/$UNIT" > "$PREFIX/$UNIT"

if [ "$SYSTEMD" = 1 ]; then
    if ! id "$USER_NAME" >/dev/null 2>&1; then
        say "creating system user $USER_NAME"
        useradd --system --user-group --home-dir "$HOME_DIR" --no-create-home \
            --shell /usr/sbin/nologin "$USER_NAME"
        echo "$USER_NAME" > "$PREFIX/created-user"   # uninstall.sh removes only this one
    fi
    chown -R "$USER_NAME:$USER_NAME" "$HOME_DIR"
    install -m 0644 "$PREFIX/$UNIT" "/etc/systemd/system/$UNIT"
    systemctl daemon-reload
    systemctl enable "$UNIT" >/dev/null
    systemctl restart "$UNIT"
    say "node $NODE installed in $PREFIX; service $UNIT started (journalctl -u $UNIT)"
else
    say "node $NODE installed in $PREFIX (no service)"
    [ "$ROLE" = client ] || say "start it: $PREFIX/bin/skyhop agent --home $HOME_DIR"
fi
