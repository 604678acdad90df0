"""The ``bgservice`` command, ``python -m bgservice`` and ``python service.py``."""

import sys


def main() -> None:
    # The imports take a few hundred milliseconds on a busy host: a Ctrl-C then ends the
    # command as one after them does (exit 130, as a shell reports SIGINT), no traceback.
    try:
        from bgservice.cli import main as command
    except KeyboardInterrupt:
        sys.exit(130)
    command()


if __name__ == "__main__":
    main()
