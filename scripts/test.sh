#!/usr/bin/env bash
# The whole test procedure, the same for a newcomer and for CI (.ci/run calls it):
# install what is missing (scripts/install.sh --test), lint, type-check, start a
# redis-server of its own, and run every test, with "not installed" skips turned into
# failures. Arguments go to pytest; --print only says what would be installed.
#   TEST_REDIS_TIMEOUT  seconds its redis-server may take to answer (default 30)
set -euo pipefail

# Until `redis-cli -p PORT ping` answers, for at most SECONDS: a redis-server that could
# not start (its port taken meanwhile, a bad option) would otherwise be waited for forever.
wait_redis() {
    local port=$1 seconds=$2 log=$3
    local deadline=$((SECONDS + seconds))
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "test.sh: redis-server did not answer on port $port within $seconds s" \
                "(TEST_REDIS_TIMEOUT); the end of $log:" >&2
            tail -n 20 "$log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}
# Sourced (by the tests), it stops here: only wait_redis is defined.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    return 0
fi

cd "$(dirname "$0")/.."
redis_timeout=${TEST_REDIS_TIMEOUT:-30}
if [[ ! $redis_timeout =~ ^[1-9][0-9]*$ ]]; then
    echo "test.sh: TEST_REDIS_TIMEOUT must be a whole number of seconds, not '$redis_timeout'" >&2
    exit 2
fi

if [[ ${1-} == --print ]]; then
    exec scripts/install.sh --test --print
fi
if [[ ${1-} == -h || ${1-} == --help ]]; then  # (not pytest's: it ran everything first)
    sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
    echo "Usage: scripts/test.sh [--print | PYTEST_ARGS...]   (e.g. tests/test_cli.py -x)"
    exit 0
fi
scripts/install.sh --test

# The venv first on PATH, as activating it does: its python, and its node when the
# system's is too old for the compilers.
export VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH"

python -m ruff check .
python -m mypy

# A redis-server of our own on a free loopback port, for the shared-queue tests (tests that
# must restart Redis start their own); stopped when this script exits.
redis_dir=$(mktemp -d)
stop_redis() {
    # Never fails the run: the suite's result is the script's. Waits for the server to
    # exit (and its AOF rewrite child, if one runs) before removing its directory: a file
    # written during the removal made `rm -rf` fail, and CI with it, after every test passed.
    local pid
    pid=$(cat "$redis_dir/redis.pid" 2>/dev/null) || pid=
    if [[ -n $pid ]] && kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    for _ in $(seq 50); do rm -rf "$redis_dir" 2>/dev/null && return 0; sleep 0.1; done
    echo "note: could not remove $redis_dir" >&2
}
trap stop_redis EXIT
redis_port=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$redis_dir" --save '' \
    --appendonly yes --daemonize yes --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
wait_redis "$redis_port" "$redis_timeout" "$redis_dir/redis.log"
export BGSERVICE_TEST_REDIS="redis://127.0.0.1:$redis_port/0"

# A missing browser, phpunit or composer fails its tests instead of skipping them.
export BGSERVICE_TEST_STRICT=1

python -m pytest "$@"

# pyproject admits Python 3.11 and later; the suite above runs on the venv's. The newer
# ones installed here (on PATH, or under pyenv) run the parts that lean on asyncio's
# internals, each in a venv of its own inside the main one (.venv/python3.X: ignored by
# git, ruff and mypy as it is): the request path, the eager first step, the queue, the
# compilers. (On 3.12 every call that waited stopped the service, unseen on 3.11.) With
# arguments (a chosen test), only the suite above runs.
newer_python() {
    local py
    for py in "$(command -v "python$1" 2>/dev/null)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/"python$1"; do
        if [[ -x $py ]] && "$py" -c 'import ensurepip, venv' 2>/dev/null; then
            echo "$py"
            return
        fi
    done
}
if (($# == 0)); then
    for version in 3.12 3.13; do
        py=$(newer_python "$version")
        if [[ -z $py ]]; then
            echo "Python $version not installed: its part of the suite is not run"
            continue
        fi
        venv=.venv/python$version
        # --clear: a venv left without pip by an interrupted creation is made again.
        "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$py" -m venv --clear "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
        echo "--- Python $version ($py)"
        "$venv/bin/python" -m pytest -q -p no:cacheprovider \
            tests/test_stream_connections.py tests/test_stream.py tests/test_stream_framed.py \
            tests/test_queue.py tests/test_queue_after.py tests/test_queue_stats.py \
            tests/test_modules_compile.py tests/test_threads.py tests/test_processes.py \
            tests/test_http_input.py
    done
fi
