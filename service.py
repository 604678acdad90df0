"""Run bgservice from a checkout: ``python service.py [OPTIONS]`` (see ``--help``)."""

from bgservice.__main__ import main

if __name__ == "__main__":
    main()
