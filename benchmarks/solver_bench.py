"""Planner latency and quality on seeded random problems; JSON on stdout.

Same as `tetris bench solver`; arguments are passed through (e.g. `--seeds 5`)."""

import sys

from tetris.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", "solver", *sys.argv[1:]]))
