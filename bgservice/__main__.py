"""The ``bgservice`` command, ``python -m bgservice`` and ``python service.py``."""

import signal


def main() -> None:
    # The imports and click's parsing take a few hundred milliseconds on a busy host. A
    # Ctrl-C among them showed a traceback, or click's "Aborted!" and exit 1: it is held
    # until the command runs (bgservice.cli._ServeByDefault.invoke lets it in), then ends
    # the command as one after it does (exit 130, as a shell reports SIGINT). Held, not
    # lost, and only when SIGINT would interrupt: ignored at start it stays ignored.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    from bgservice.cli import main as command

    command()


if __name__ == "__main__":
    main()
