#!/usr/bin/env bash
# Run the README's two commands, exactly as written, on a stock machine: a clean Debian 12
# root made by debootstrap (minbase: no python3, node, php, redis, chromium), with this
# checkout's HEAD copied in. Proves that they install what they need and that the suite
# passes with nothing skipped on a machine that has none of it (docs/deploy.md).
#
#   scripts/fresh-check.sh            as root, as in a container or CI image
#   scripts/fresh-check.sh --user     as a user with sudo (a developer's machine)
#
# Needs root (debootstrap, chroot, mounts) and debootstrap (installed when missing). The
# root is made once in $FRESH_ROOT (default /var/tmp/bgservice-fresh) and copied for
# each run, so every run starts from the same untouched machine. The first command
# (install, then the service's first answer) gets $FRESH_TIMEOUT seconds (default 1800:
# it installs everything from the network); past that the check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

user=0
case ${1-} in
    --user) user=1 ;;
    "") ;;
    *) echo "usage: scripts/fresh-check.sh [--user]" >&2; exit 2 ;;
esac
((EUID == 0)) || { echo "fresh-check: run as root (debootstrap, chroot)" >&2; exit 1; }
timeout=${FRESH_TIMEOUT:-1800}
if [[ ! $timeout =~ ^[1-9][0-9]*$ ]]; then
    echo "fresh-check: FRESH_TIMEOUT must be a whole number of seconds, not '$timeout'" >&2
    exit 2
fi

base=${FRESH_ROOT:-/var/tmp/bgservice-fresh}
mirror=http://deb.debian.org/debian
if [[ ! -x $base/stock/usr/bin/apt-get ]]; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
    rm -rf "$base/stock"
    debootstrap --variant=minbase bookworm "$base/stock" "$mirror"
    # A stock Debian 12 image's package sources: the release, its updates and security.
    printf '%s\n' "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" \
        >"$base/stock/etc/apt/sources.list"
fi

R=$base/run
cleanup() {
    for m in dev/shm dev/pts dev sys proc; do umount -l "$R/$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$R"
cp -a "$base/stock" "$R"

# The network this machine is on, not the project: name resolution, and any local CA a
# TLS-inspecting egress proxy needs (kept by update-ca-certificates when apt runs it).
cp /etc/resolv.conf "$R/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$R/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/"
    mkdir -p "$R/etc/ssl/certs"
    cp /etc/ssl/certs/ca-certificates.crt "$R/etc/ssl/certs/ca-certificates.crt"
fi
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount --bind /dev "$R/dev"
mount --bind /dev/pts "$R/dev/pts"
mount -t tmpfs -o mode=1777 shm "$R/dev/shm"  # Chromium's shared memory

# A clone of this checkout (its HEAD), where a newcomer's clone would be; a clone, not
# git archive, which leaves out what .gitattributes marks export-ignore (the PHP tests).
home=/root
if ((user)); then
    home=/home/dev
    chroot "$R" sh -c 'apt-get update -qq && apt-get install -y -qq sudo >/dev/null &&
        useradd -m -s /bin/bash dev && echo "dev ALL=(ALL) NOPASSWD: ALL" >/etc/sudoers.d/dev'
fi
git clone -q --no-hardlinks "$PWD" "$R$home/bgservice"
((user)) && chroot "$R" chown -R dev: "$home/bgservice"

# What the README says, word for word: the service (started, called once, stopped), then
# the test script (with no arguments: given some, it would skip its newer-Python part).
# Certificate variables pass through for the egress proxy above.
readme_service='scripts/install.sh && . .venv/bin/activate && bgservice'
script=$(cat <<EOF
set -euo pipefail -m  # -m: the service runs in a process group of its own, to stop it whole
cd ~/bgservice
bash -c '$readme_service' &
deadline=\$((SECONDS + $timeout))
until python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 12341)); \
s.sendall(b"test:fresh"); s.shutdown(socket.SHUT_WR); print("service answered:", s.recv(99))' \
2>/dev/null; do
    sleep 1
    kill -0 \$! 2>/dev/null || { echo "the service did not start"; exit 1; }
    if ((SECONDS >= deadline)); then
        echo "the service did not answer within $timeout s (FRESH_TIMEOUT)"
        kill -- -\$! 2>/dev/null || true
        exit 1
    fi
done
kill -- -\$!; wait || true
scripts/test.sh
EOF
)
envs=(HOME="$home" PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)
for v in SSL_CERT_FILE PIP_CERT REQUESTS_CA_BUNDLE NODE_EXTRA_CA_CERTS; do
    [[ -n ${!v-} ]] && envs+=("$v=${!v}")
done
if ((user)); then
    chroot --userspec=dev:dev "$R" env -i "${envs[@]}" USER=dev bash -c "$script"
else
    chroot "$R" env -i "${envs[@]}" USER=root bash -c "$script"
fi
